import math

import pytest

from medsd.labels import CHEXPERT_OBSERVATIONS, UncertaintyPolicy
from medsd.prompts import PromptParts, format_prompt, parse_prompt, prompt_for_labels


def row(view="Frontal", projection="PA", **values):
    labels = {o: math.nan for o in CHEXPERT_OBSERVATIONS}
    labels.update({k.replace("_", " "): v for k, v in values.items()})
    labels["Frontal/Lateral"] = view
    labels["AP/PA"] = projection
    return labels


def test_examples_from_the_issue():
    assert (
        prompt_for_labels(row(Cardiomegaly=1.0, Pleural_Effusion=1.0, Edema=0.0))
        == "a frontal PA chest x-ray showing cardiomegaly and pleural effusion"
    )
    assert prompt_for_labels(row(view="Lateral", projection=math.nan, No_Finding=1.0)) == (
        "a lateral chest x-ray with no finding"
    )


def test_findings_follow_schema_order_and_three_are_listed_with_commas():
    labels = row(Support_Devices=1.0, Edema=1.0, Cardiomegaly=1.0)
    assert prompt_for_labels(labels).endswith("showing cardiomegaly, edema and support devices")


def test_uncertain_labels_follow_the_policy():
    labels = row(Atelectasis=-1.0, Edema=1.0)
    assert prompt_for_labels(labels, policy="U-Ignore").endswith("showing edema")
    assert prompt_for_labels(labels, policy=UncertaintyPolicy.ZEROS).endswith("showing edema")
    assert prompt_for_labels(labels, policy="U-Ones").endswith("showing edema and atelectasis")


def test_uncertain_labels_can_be_worded_possible():
    labels = row(Atelectasis=-1.0, Edema=1.0, Consolidation=-1.0)
    assert prompt_for_labels(labels, name_uncertain=True).endswith(
        "showing edema, possible consolidation and possible atelectasis"
    )
    # U-Ones already names them as present: no hedging on top.
    assert prompt_for_labels(labels, policy="U-Ones", name_uncertain=True).endswith(
        "showing edema, consolidation and atelectasis"
    )
    # Only an uncertain mention is not "no finding".
    assert prompt_for_labels(row(Atelectasis=-1.0), name_uncertain=True) == (
        "a frontal PA chest x-ray showing possible atelectasis"
    )


def test_identifier_token_and_lateral_drops_projection():
    assert prompt_for_labels(row(view="Lateral", projection="AP", Edema=1.0), identifier="sks") == (
        "a sks lateral chest x-ray showing edema"
    )
    with pytest.raises(ValueError, match="identifier"):
        prompt_for_labels(row(), identifier="two words")


def test_bad_view_is_named():
    with pytest.raises(ValueError, match="view 'Oblique'"):
        format_prompt(PromptParts((), view="Oblique"))


@pytest.mark.parametrize(
    "parts",
    [
        PromptParts(("Cardiomegaly", "Pleural Effusion"), "Frontal", "PA"),
        PromptParts((), "Lateral"),
        PromptParts(("Edema",), None, None, "sks"),
        PromptParts(("Lung Lesion", "Pneumothorax", "Support Devices"), "Frontal", "AP", "zwx"),
        PromptParts(("Edema",), "Frontal", "AP", None, ("Consolidation", "Atelectasis")),
        PromptParts((), "Frontal", None, None, ("Atelectasis",)),
    ],
)
def test_parse_inverts_format(parts):
    assert parse_prompt(format_prompt(parts)) == parts


def test_parse_names_the_unknown_finding():
    with pytest.raises(ValueError, match="unknown finding 'broken heart'"):
        parse_prompt("a chest x-ray showing broken heart")
    with pytest.raises(ValueError, match="not of the form"):
        parse_prompt("a cat")
