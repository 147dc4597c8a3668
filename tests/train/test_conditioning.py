"""medsd.train.conditioning: prompts per image, DreamBooth instance and class sets, per-label runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsd.data import load_dataset
from medsd.labels import NO_FINDING
from medsd.prompts import parse_prompt
from medsd.train.batches import SAMPLE_ID
from medsd.train.conditioning import (
    EMPTY_PROMPT,
    LOSS_WEIGHT,
    PROMPT_INDEX,
    build_training_set,
    class_images_frame,
    class_prompt,
    expand_placeholders,
    per_label_configs,
    placeholder_token,
    placeholder_vectors,
    trained_labels,
    validation_rows,
)


def _prompts(training_set) -> list[str]:
    return [training_set.prompts[i] for i in training_set.images.frame[PROMPT_INDEX]]


def test_label_conditional_prompts_name_each_images_own_labels_and_view(make_config) -> None:
    cfg = make_config("labels=[Cardiomegaly, Edema, Pleural Effusion]")
    training_set = build_training_set(cfg, cfg.data)
    frame = training_set.images.frame
    assert training_set.prompts[0] == EMPTY_PROMPT
    assert frame[SAMPLE_ID].tolist() == list(range(len(frame)))
    assert (frame[LOSS_WEIGHT] == 1.0).all() and training_set.n_class == 0
    for row, prompt in zip(frame.to_dict("records"), _prompts(training_set), strict=True):
        parts = parse_prompt(prompt)
        positives = tuple(o for o in ("Cardiomegaly", "Edema", "Pleural Effusion") if row[o] == 1.0)
        uncertain = tuple(o for o in ("Cardiomegaly", "Edema", "Pleural Effusion") if row[o] == -1.0)
        assert parts.findings == positives, prompt
        assert parts.uncertain == uncertain, prompt  # "possible edema": the image may show it
        assert parts.view == row["Frontal/Lateral"]
    assert any(" and " in p for p in _prompts(training_set))  # multi-label images name every finding
    assert any(p.startswith("a lateral chest x-ray") for p in _prompts(training_set))
    assert any("possible" in p for p in _prompts(training_set))


def test_uncertain_findings_left_unnamed_when_asked(make_config) -> None:
    cfg = make_config("labels=[Cardiomegaly, Edema, Pleural Effusion]", "data.name_uncertain=false")
    prompts = _prompts(build_training_set(cfg, cfg.data))
    assert not any("possible" in p for p in prompts)
    assert any("edema" in p for p in prompts)


def test_textual_inversion_prompts_name_labels_by_token(make_config) -> None:
    cfg = make_config("method=textual_inversion")
    training_set = build_training_set(cfg, cfg.data)
    assert training_set.placeholder_tokens == {"Cardiomegaly": "<cardiomegaly>", "Edema": "<edema>"}
    assert any("showing <cardiomegaly> and <edema>" in p for p in training_set.prompts)
    assert not any("cardiomegaly" in p.replace("<cardiomegaly>", "") for p in training_set.prompts)
    assert placeholder_vectors("<edema>", 3) == ["<edema>", "<edema>_1", "<edema>_2"]
    assert (
        expand_placeholders("a chest x-ray showing <edema>", ["<edema>"], 2)
        == "a chest x-ray showing <edema> <edema>_1"
    )
    assert placeholder_token("Pleural Effusion") == "<pleural-effusion>"


def test_instance_set_with_real_no_finding_class_set(make_config) -> None:
    cfg = make_config(
        "conditioning=instance",
        "labels=[Cardiomegaly]",
        "dreambooth.num_class_images=8",
        "dreambooth.prior_loss_weight=0.5",
    )
    training_set = build_training_set(cfg, cfg.data)
    frame = training_set.images.frame
    assert (training_set.n_instance, training_set.n_class) == (15, 8)
    instance, klass = frame.iloc[:15], frame.iloc[15:]
    assert (instance["Cardiomegaly"] == 1.0).all() and (klass[NO_FINDING] == 1.0).all()
    prompts = _prompts(training_set)
    assert all(p.startswith("a sks ") and p.endswith("showing cardiomegaly") for p in prompts[:15])
    assert all(p.endswith("with no finding") and "sks" not in p for p in prompts[15:])
    # The class set weighs prior_loss_weight of the instance set in total, as paired batches would.
    np.testing.assert_allclose(klass[LOSS_WEIGHT].sum() / instance[LOSS_WEIGHT].sum(), 0.5)
    again = build_training_set(cfg, cfg.data)
    assert again.images.frame["Path"].tolist() == frame["Path"].tolist()  # the class sample is seeded


def test_generated_class_set_csv_loads_with_the_class_prompt(make_config, tmp_path: Path) -> None:
    cfg = make_config(
        "conditioning=instance", "labels=[Edema]", "dreambooth.class_source=generated", "dreambooth.num_class_images=3"
    )
    frame = class_images_frame("Edema", cfg.data, 3)
    assert frame["Path"].tolist() == ["edema/00000.png", "edema/00001.png", "edema/00002.png"]
    from PIL import Image

    for path in frame["Path"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / path)
    frame.to_csv(tmp_path / "class_images.csv", index=False)
    training_set = build_training_set(cfg, cfg.data, tmp_path / "class_images.csv")
    assert training_set.n_class == 3
    assert (
        _prompts(training_set)[-3:]
        == [class_prompt(cfg, "Edema")] * 3
        == ["a frontal PA chest x-ray showing edema"] * 3
    )
    with pytest.raises(ValueError, match="class images were not generated first"):
        build_training_set(cfg, cfg.data)


def test_validation_rows_and_per_label_configs(make_config) -> None:
    cfg = make_config()
    training_set = build_training_set(cfg, cfg.data)
    assert validation_rows(cfg, training_set) == [
        ("Cardiomegaly", "a frontal PA chest x-ray showing cardiomegaly"),
        ("Edema", "a frontal PA chest x-ray showing edema"),
        (NO_FINDING, "a frontal PA chest x-ray with no finding"),
    ]
    per_label = make_config("conditioning=per_label", "method=lora")
    configs = per_label_configs(per_label, per_label.data)
    assert [label for label, _ in configs] == ["Cardiomegaly", "Edema"]
    _, edema = configs[1]
    assert (edema.conditioning, edema.labels, Path(edema.out).name) == ("instance", ["Edema"], "edema")
    assert edema.checkpoint.run_name == "medsd-train-edema"
    instance_set = build_training_set(edema, edema.data)
    assert validation_rows(edema, instance_set)[0] == ("Edema (sks)", "a sks frontal PA chest x-ray showing edema")


def test_default_labels_are_the_observations_but_no_finding(make_config) -> None:
    cfg = make_config("labels=null")
    assert NO_FINDING not in trained_labels(cfg, cfg.data) and len(trained_labels(cfg, cfg.data)) == 13


def test_instance_label_without_positives_is_an_error(make_config) -> None:
    cfg = make_config("conditioning=instance", "labels=[Pleural Other]", "data.views=[Lateral]")
    with pytest.raises(ValueError, match=r"labels: no instance images for 'Pleural Other'"):
        build_training_set(cfg, cfg.data)
    assert isinstance(load_dataset(cfg.data).frame, pd.DataFrame)
