"""medsd.generate.plan: ids, seeds, shards and prompts of each plan kind; match frequencies; no source ids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsd.config import GenerateConfig, PhantomConfig, load_config
from medsd.generate.plan import (
    ID,
    LABEL,
    PROMPT,
    SEED,
    SHARD,
    allocate_views,
    build_plan,
    derive_seed,
    image_id,
    primary_label,
)
from medsd.labels import CHEXPERT_OBSERVATIONS, NO_FINDING, PATH_COLUMN, POSITIVE, UNCERTAIN, VIEW_COLUMN
from medsd.phantom import write_phantom
from medsd.prompts import PromptParts, parse_prompt, positive_findings, uncertain_findings

REPO = Path(__file__).resolve().parents[1]
MODEL_HASH = "0123456789abcdef"
MATCH_IMAGES = 3000
# Bootstrap sampling: a rate p over n draws has std sqrt(p(1-p)/n) <= 0.009 at n=3000; 0.04 is > 4 std.
FREQUENCY_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def phantom_csv(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("phantom") / "phantom"
    write_phantom(out, PhantomConfig(n_images=400, image_size_px=32, seed=0))
    return str(out / "train.csv")


def _per_label(**fields) -> GenerateConfig:
    defaults = {"labels": ["Cardiomegaly", "Pleural Effusion"], "per_label": 5, "rows_per_shard": 2}
    return GenerateConfig(**{**defaults, **fields})


def test_per_label_plan_has_n_per_label_plus_no_finding_with_single_finding_prompts():
    plan = build_plan(_per_label(guidance_scales=[3.0, 5.0]), MODEL_HASH)
    assert plan.images_per_label() == {"no-finding": 10, "cardiomegaly": 10, "pleural-effusion": 10}
    cardiomegaly = [row for row in plan.rows if row[LABEL] == "cardiomegaly"]
    assert {row[PROMPT] for row in cardiomegaly} == {"a frontal PA chest x-ray showing cardiomegaly"}
    assert all(row["Cardiomegaly"] == POSITIVE and math.isnan(row["Edema"]) for row in cardiomegaly)
    assert all(row[NO_FINDING] == POSITIVE for row in plan.rows if row[LABEL] == "no-finding")
    assert {row[PATH_COLUMN] for row in cardiomegaly} == {f"images/cardiomegaly/{row[ID]}.png" for row in cardiomegaly}
    assert len({row[ID] for row in plan.rows}) == len(plan.rows)


def test_same_config_same_plan_and_seeds_are_per_image():
    first, second = build_plan(_per_label(), MODEL_HASH), build_plan(_per_label(), MODEL_HASH)
    assert first.rows == second.rows
    assert first.fingerprint() == second.fingerprint()
    assert len({row[SEED] for row in first.rows}) == len(first.rows)
    # Adding a label changes no other label's seeds; another plan seed changes every seed.
    wider = build_plan(_per_label(labels=["Cardiomegaly", "Pleural Effusion", "Edema"]), MODEL_HASH)
    seeds_by_id = {row[ID]: row[SEED] for row in wider.rows}
    assert all(seeds_by_id[row[ID]] == row[SEED] for row in first.rows)
    reseeded = build_plan(_per_label(seed=1), MODEL_HASH)
    assert not {row[SEED] for row in reseeded.rows} & {row[SEED] for row in first.rows}
    assert build_plan(_per_label(), "another-model").fingerprint() != first.fingerprint()


def test_guidance_sweep_tags_each_image_and_shares_seeds_across_scales():
    plan = build_plan(_per_label(guidance_scales=[2.0, 7.5]), MODEL_HASH)
    low = {row[ID].removesuffix("-g2"): row for row in plan.rows if row["guidance_scale"] == 2.0}
    high = {row[ID].removesuffix("-g7.5"): row for row in plan.rows if row["guidance_scale"] == 7.5}
    assert low.keys() == high.keys() and len(low) == 15
    assert all(low[key][SEED] == high[key][SEED] for key in low)


def test_shards_stay_within_one_label_and_scale_and_cover_every_row_once():
    plan = build_plan(_per_label(per_label=5, rows_per_shard=2, guidance_scales=[3.0, 4.0]), MODEL_HASH)
    covered = []
    for shard in plan.shards:
        rows = plan.rows[shard.start : shard.stop]
        assert 1 <= len(rows) <= 2
        assert {row[LABEL] for row in rows} == {shard.label}
        assert len({row["guidance_scale"] for row in rows}) == 1
        assert {row[SHARD] for row in rows} == {shard.name} and shard.name == rows[0][ID]
        covered.extend(range(shard.start, shard.stop))
    assert covered == list(range(len(plan.rows)))


def test_view_mix_is_allocated_exactly_and_laterals_have_no_projection():
    assert allocate_views(5, {"Frontal": 0.8, "Lateral": 0.2}) == ["Frontal"] * 4 + ["Lateral"]
    assert allocate_views(3, {"Frontal": 1.0, "Lateral": 1.0}) == ["Frontal", "Frontal", "Lateral"]
    plan = build_plan(_per_label(per_label=4, views={"Frontal": 1.0, "Lateral": 1.0}), MODEL_HASH)
    laterals = [row for row in plan.rows if row[VIEW_COLUMN] == "Lateral"]
    assert len(laterals) == 6
    assert all(row["AP/PA"] == "" and row[PROMPT].startswith("a lateral chest x-ray") for row in laterals)


def test_ids_and_seeds_are_pure_functions():
    assert image_id("Pleural Effusion", 12, 4.0) == "pleural-effusion-000012-g4"
    assert image_id("No Finding", 3, 7.5) == "no-finding-000003-g7.5"
    assert derive_seed(0, "Edema/1") == derive_seed(0, "Edema/1") != derive_seed(0, "Edema/2")
    assert 0 <= derive_seed(123, "x") < 2**63
    assert primary_label(PromptParts(("Pleural Effusion", "Cardiomegaly"))) == "Cardiomegaly"
    assert primary_label(PromptParts(())) == NO_FINDING
    assert primary_label(PromptParts((), uncertain=("Atelectasis",))) == "Atelectasis"
    assert primary_label(PromptParts(("Edema",), uncertain=("Cardiomegaly",))) == "Edema"


def test_prompts_plan_parses_labels_from_each_prompt():
    prompts = ["a frontal AP chest x-ray showing edema and pleural effusion", "a lateral chest x-ray with no finding"]
    plan = build_plan(GenerateConfig(plan="prompts", prompts=prompts, per_label=3), MODEL_HASH)
    assert plan.images_per_label() == {"no-finding": 3, "edema": 3}
    edema = [row for row in plan.rows if row[LABEL] == "edema"]
    assert all(row["Edema"] == POSITIVE and row["Pleural Effusion"] == POSITIVE for row in edema)
    assert all(row["AP/PA"] == "AP" and row[PROMPT] == prompts[0] for row in edema)


def test_prompts_plan_rejects_prompts_outside_the_grammar_naming_each():
    prompts = ["a frontal chest x-ray showing edema", "an MRI of a knee", "a chest x-ray showing edema"]
    with pytest.raises(ValueError, match=r"generate.prompts\[1\].*an MRI.*generate.prompts\[2\].*names no view"):
        build_plan(GenerateConfig(plan="prompts", prompts=prompts, per_label=1), MODEL_HASH)


def test_match_plan_reproduces_source_label_frequencies(phantom_csv):
    cfg = GenerateConfig(plan="match", n_images=MATCH_IMAGES, source={"csv": phantom_csv})
    plan = build_plan(cfg, MODEL_HASH)
    assert len(plan.rows) == MATCH_IMAGES
    source = pd.read_csv(phantom_csv)
    source_rows = source.to_dict("records")
    source_findings = [positive_findings(row) for row in source_rows]
    source_uncertain = [uncertain_findings(row) for row in source_rows]
    for observation in CHEXPERT_OBSERVATIONS:
        if observation == NO_FINDING:  # the prompt says "no finding" when it names nothing, not even as possible
            expected = np.mean([not f and not u for f, u in zip(source_findings, source_uncertain, strict=True)])
        else:
            expected = np.mean([observation in findings for findings in source_findings])
            uncertain_share = np.mean([row[observation] == UNCERTAIN for row in plan.rows])
            expected_uncertain = np.mean([observation in u for u in source_uncertain])
            assert uncertain_share == pytest.approx(expected_uncertain, abs=FREQUENCY_TOLERANCE), observation
        assert plan.positive_rates()[observation] == pytest.approx(expected, abs=FREQUENCY_TOLERANCE), observation
    lateral_share = np.mean([row[VIEW_COLUMN] == "Lateral" for row in plan.rows])
    assert lateral_share == pytest.approx(np.mean(source[VIEW_COLUMN] == "Lateral"), abs=FREQUENCY_TOLERANCE)
    assert {row["Sex"] for row in plan.rows} <= {"Male", "Female"}
    assert all(parse_prompt(row[PROMPT]).view == row[VIEW_COLUMN] for row in plan.rows)


def test_match_plan_keeps_co_occurrence(phantom_csv):
    cfg = GenerateConfig(plan="match", n_images=MATCH_IMAGES, source={"csv": phantom_csv})
    plan = build_plan(cfg, MODEL_HASH)
    source = [positive_findings(row) for row in pd.read_csv(phantom_csv).to_dict("records")]
    pair = ("Cardiomegaly", "Edema")
    source_rate = np.mean([set(pair) <= set(findings) for findings in source])
    plan_rate = np.mean([row[pair[0]] == POSITIVE and row[pair[1]] == POSITIVE for row in plan.rows])
    assert plan_rate == pytest.approx(source_rate, abs=FREQUENCY_TOLERANCE)


def test_no_source_identifier_reaches_the_plan(phantom_csv):
    cfg = GenerateConfig(plan="match", n_images=200, source={"csv": phantom_csv})
    text = json.dumps(build_plan(cfg, MODEL_HASH).rows)
    assert "patient" not in text and "study" not in text and "view1" not in text


@pytest.mark.parametrize("name", ["generate-per-label.yaml", "generate-match.yaml", "generate-balanced.yaml"])
def test_example_configs_load_and_plan(name, phantom_csv):
    cfg = load_config(GenerateConfig, REPO / "configs" / name, [f"source.csv={phantom_csv}", "n_images=10"])
    plan = build_plan(cfg, MODEL_HASH)
    per_label_rows = (len(cfg.labels) + 1) * cfg.per_label * len(cfg.guidance_scales)
    assert len(plan.rows) == (10 if cfg.plan == "match" else per_label_rows)


def test_match_plan_names_the_source_field_on_a_bad_csv(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="generate.source.*nope.csv"):
        build_plan(GenerateConfig(plan="match", n_images=5, source={"csv": str(missing)}), MODEL_HASH)


def _balanced(phantom_csv: str, **fields) -> GenerateConfig:
    defaults = {"plan": "balanced", "labels": ["Atelectasis", "Cardiomegaly"], "per_label": 200}
    return GenerateConfig(**{**defaults, "source": {"csv": phantom_csv, "views": ["Frontal"]}, **fields})


def test_balanced_plan_draws_each_label_from_its_positive_source_rows(phantom_csv):
    plan = build_plan(_balanced(phantom_csv), MODEL_HASH)
    assert plan.images_per_label() == {"no-finding": 200, "atelectasis": 200, "cardiomegaly": 200}
    source = pd.read_csv(phantom_csv)
    frontal = source[source[VIEW_COLUMN] == "Frontal"]
    source_findings = {positive_findings(row) for row in frontal.to_dict("records")}
    atelectasis = [row for row in plan.rows if row[LABEL] == "atelectasis"]
    for row in plan.rows:
        findings = tuple(o for o in CHEXPERT_OBSERVATIONS if o != NO_FINDING and row[o] == POSITIVE)
        assert findings in source_findings, row[PROMPT]  # every prompt is a real row's combination of findings
        assert row[VIEW_COLUMN] == "Frontal"
    assert all(row["Atelectasis"] == POSITIVE for row in atelectasis)
    # An uncertain source label is worded "possible ..." and written -1.0 (uncertain), as the source had it.
    for row in plan.rows:
        uncertain = tuple(o for o in CHEXPERT_OBSERVATIONS if row[o] == UNCERTAIN)
        assert parse_prompt(row[PROMPT]).uncertain == uncertain, row[PROMPT]
    assert any("possible" in row[PROMPT] for row in plan.rows)
    # No Finding rows name no pathology; Support Devices (not a pathology in CheXpert) may come along.
    for row in plan.rows:
        if row[LABEL] == "no-finding":
            assert set(parse_prompt(row[PROMPT]).findings) <= {"Support Devices"}, row[PROMPT]
    # Co-occurrence comes along: the phantom's atelectasis mostly sits beside an effusion, never alone here.
    with_effusion = np.mean([row["Pleural Effusion"] == POSITIVE for row in atelectasis])
    atelectasis_rows = frontal[frontal["Atelectasis"] == POSITIVE]
    assert with_effusion == pytest.approx(np.mean(atelectasis_rows["Pleural Effusion"] == POSITIVE), abs=0.12)
    assert with_effusion > 0.2 and any(row[PROMPT] != atelectasis[0][PROMPT] for row in atelectasis)


def test_balanced_plan_labels_draw_independently_and_reproducibly(phantom_csv):
    both = build_plan(_balanced(phantom_csv), MODEL_HASH)
    alone = build_plan(_balanced(phantom_csv, labels=["Cardiomegaly"]), MODEL_HASH)
    assert build_plan(_balanced(phantom_csv), MODEL_HASH).fingerprint() == both.fingerprint()

    def cardiomegaly(plan):
        return [(row[PROMPT], row[SEED]) for row in plan.rows if row[LABEL] == "cardiomegaly"]

    assert cardiomegaly(both) == cardiomegaly(alone)
    assert both.source_sha256 is not None


def test_balanced_plan_names_a_label_without_positive_rows(phantom_csv, tmp_path):
    source = pd.read_csv(phantom_csv)
    source["Pneumothorax"] = np.where(source["Pneumothorax"] == POSITIVE, 0.0, source["Pneumothorax"])
    csv = tmp_path / "no-pneumothorax.csv"
    source.to_csv(csv, index=False)
    cfg = _balanced(str(csv), labels=["Pneumothorax"])
    with pytest.raises(ValueError, match=r"no-pneumothorax.csv has no row positive for 'Pneumothorax'"):
        build_plan(cfg, MODEL_HASH)


def test_balanced_plan_needs_a_source_csv():
    with pytest.raises(ValueError, match="generate.source.csv: the balanced plan samples a real CSV"):
        GenerateConfig(plan="balanced")
