"""medsd.train.run end to end on the tiny model and a small phantom: each method through Ray Train, the exact
output layout, outputs loadable by plain diffusers, one real 2-worker gloo run, and every bad-input error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from diffusers import StableDiffusionPipeline

from medsd.adapters import LEARNED_EMBEDS_FILE, LORA_WEIGHTS_FILE, PLACEHOLDER_TOKENS_FILE
from medsd.config import ModelConfig, TrainConfig
from medsd.models import load_pipeline
from medsd.sampling import sample_images
from medsd.train import run_training
from medsd.train.card import CONFIG_FILE
from medsd.train.checkpoint import load_checkpoint
from medsd.train.run import check_model, preflight, resolve_data
from medsd.train.validation import read_metrics_csv

SAMPLE = {"steps": 2, "guidance_scale": 2.0}
# Everything a run writes at the top of its output folder (num_workers=0: Ray keeps no checkpoint folder).
RUN_FILES = {"cache", "loss_curve.png", "metrics.csv", "model", CONFIG_FILE, "validation"}
VALIDATION_FILES = ["final.png", "step-00000002.png"]


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _check_run_outputs(out: Path, cfg: TrainConfig, steps: int) -> None:
    assert _files(out / "validation") == VALIDATION_FILES
    rows = read_metrics_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    card = (out / "model" / "model_card.md").read_text()
    assert f"{cfg.method} ({cfg.conditioning} conditioning)" in card
    assert "Synthetic, not diagnostic" in card
    assert f"{steps} optimizer steps" in card
    saved = yaml.safe_load((out / "model" / CONFIG_FILE).read_text())
    assert TrainConfig.model_validate(saved) == cfg


def test_lora_live_encoding_with_text_encoder_ema_snr_and_accumulation(local_ray, make_config, tiny_model_dir):
    cfg = make_config(
        "method=lora",
        "train_text_encoder=true",
        "cache_latents=false",
        "ema_decay=0.9",
        "snr_gamma=5.0",
        "noise_offset=0.05",
        "optim.gradient_accumulation_steps=2",
        "lora.rank=2",
    )
    result = run_training(cfg)
    out = Path(cfg.out)
    assert {p.name for p in out.iterdir()} == RUN_FILES - {"cache"}  # nothing cached: encoders ran every step
    assert _files(out / "model") == sorted(["model_card.md", LORA_WEIGHTS_FILE, CONFIG_FILE])
    _check_run_outputs(out, cfg, steps=3)
    assert result.runs[0].steps == 3 and result.runs[0].model_dir == out / "model"

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(out / "model"))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    image = sample_images(pipe, ["a frontal PA chest x-ray showing cardiomegaly"], [0], **SAMPLE)
    assert image.shape == (1, 64, 64)


def test_dreambooth_instance_with_prior_preservation_v_prediction_and_cached_inputs(
    local_ray, make_config, tiny_model_dir
):
    cfg = make_config(
        "method=dreambooth",
        "conditioning=instance",
        "labels=[Cardiomegaly]",
        "dreambooth.num_class_images=10",
        "prediction_type=v_prediction",
        "gradient_checkpointing=true",
    )
    run_training(cfg)
    out = Path(cfg.out)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert sorted(p.name for p in (out / "cache").iterdir())[0].startswith("latents-")
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(
        [CONFIG_FILE, "model_card.md", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    )
    _check_run_outputs(out, cfg, steps=3)
    card = (out / "model" / "model_card.md").read_text()
    assert "15 training images, plus 10 class images (no_finding" in card

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = sample_images(pipe, ["a sks frontal PA chest x-ray showing cardiomegaly"], [0], **SAMPLE)
    assert image.shape == (1, 64, 64)


def test_textual_inversion_one_token_per_label(local_ray, make_config, tiny_model_dir):
    cfg = make_config("method=textual_inversion", "textual_inversion.num_vectors=2", "optim.learning_rate=0.05")
    run_training(cfg)
    out = Path(cfg.out)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert _files(out / "model") == sorted(
        [
            CONFIG_FILE,
            "model_card.md",
            PLACEHOLDER_TOKENS_FILE,
            f"cardiomegaly/{LEARNED_EMBEDS_FILE}",
            f"edema/{LEARNED_EMBEDS_FILE}",
        ]
    )
    _check_run_outputs(out, cfg, steps=3)

    pipe = load_pipeline(ModelConfig(model=str(tiny_model_dir)))
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    pipe.load_textual_inversion(str(out / "model" / "cardiomegaly"))  # plain diffusers
    learned = pipe.text_encoder.get_input_embeddings().weight.detach()
    start = before[pipe.tokenizer("chest", add_special_tokens=False).input_ids].mean(0)
    token_ids = pipe.tokenizer.convert_tokens_to_ids(["<cardiomegaly>", "<cardiomegaly>_1"])
    assert not np.allclose(learned[token_ids].numpy(), start.numpy())  # trained away from the initial word
    np.testing.assert_array_equal(learned[: len(before)].numpy(), before.numpy())  # no other row changed
    image = sample_images(pipe, ["a frontal PA chest x-ray showing <cardiomegaly>"], [0], **SAMPLE)
    assert image.shape == (1, 64, 64)


def test_per_label_lora_with_generated_class_images(local_ray, make_config):
    cfg = make_config(
        "method=lora",
        "conditioning=per_label",
        "dreambooth.class_source=generated",
        "dreambooth.num_class_images=4",
        "dreambooth.class_sampling_steps=2",
        "max_steps=2",
        "validation.every_n_steps=0",
    )
    result = run_training(cfg)
    out = Path(cfg.out)
    assert [run.label for run in result.runs] == ["Cardiomegaly", "Edema"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["cardiomegaly", "edema", CONFIG_FILE])
    for slug in ("cardiomegaly", "edema"):
        run_out = out / slug
        assert {p.name for p in run_out.iterdir()} == RUN_FILES | {"class_images"}
        assert _files(run_out / "class_images") == sorted(
            ["class_images.csv", "class_images.json"] + [f"{slug}/{i:05d}.png" for i in range(4)]
        )
        assert (run_out / "model" / LORA_WEIGHTS_FILE).is_file()
        sub_cfg = TrainConfig.model_validate(yaml.safe_load((run_out / "model" / CONFIG_FILE).read_text()))
        assert sub_cfg.conditioning == "instance" and sub_cfg.checkpoint.run_name == f"medsd-train-{slug}"
        assert _files(run_out / "validation") == ["final.png"]


def test_two_gloo_workers_train_disjoint_halves_of_each_step(local_ray, make_config, tiny_model_dir, tmp_path):
    cfg = make_config(
        "method=dreambooth",
        "scaling.num_workers=2",
        "batch_size=4",
        "max_steps=2",
        "checkpoint.every_n_steps=2",
        "validation.every_n_steps=0",
        "log_sample_ids=true",
    )
    result = run_training(cfg)
    out = Path(cfg.out)
    assert result.runs[0].steps == 2
    rows = read_metrics_csv(out / "metrics.csv")
    ids = [[int(i) for i in row["sample_ids"].split()] for row in rows]
    assert [len(step) for step in ids] == [8, 8]  # 4 per worker x 2 workers
    assert len(set(ids[0]) | set(ids[1])) == 16  # one epoch: no sample twice
    checkpoints = sorted((out / "checkpoints" / cfg.checkpoint.run_name).glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000002"]
    assert load_checkpoint(checkpoints[0]).fingerprint["world_size"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"), safety_checker=None)
    assert sample_images(pipe, ["a chest x-ray with no finding"], [1], **SAMPLE).shape == (1, 64, 64)


# ---------------------------------------------------------------------------------------------------------------
# Bad config or data: clear errors before any worker (or Ray) starts
# ---------------------------------------------------------------------------------------------------------------


def test_missing_base_model_names_the_field(make_config, tmp_path):
    cfg = make_config(f"model.model={tmp_path / 'no-such-model'}")
    with pytest.raises(FileNotFoundError, match=r"model\.model: model '.*no-such-model': no such folder"):
        run_training(cfg)


def test_unknown_method_names_the_field(make_config):
    with pytest.raises(ValueError, match=r"method: Input should be 'dreambooth', 'lora' or 'textual_inversion'"):
        make_config("method=hypernetwork")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.image_size_px=60"], r"data\.image_size_px=60 must be a multiple of 8"),
        (["data.image_size_px=128"], r"data\.image_size_px=128: the tiny model takes 64 px images only"),
        (["prediction_type=v_prediction"], r"prediction_type='v_prediction' differs from the base model's 'epsilon'"),
        (["model.precision=fp16"], r"model\.precision='fp16' is not supported on CPU"),
    ],
)
def test_model_it_cannot_train_fails_naming_the_field(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_model(make_config(*overrides))


def test_labels_absent_from_the_data(make_config, phantom_csv):
    cfg = make_config("labels=[Cardiomegaly, Hernia]")
    with pytest.raises(ValueError, match=r"labels: \['Hernia'\] are not labels of the data"):
        preflight(cfg, resolve_data(cfg, Path(cfg.out)))
    grid = make_config("validation.labels=[Nodule]")
    with pytest.raises(ValueError, match=r"validation\.labels: \['Nodule'\] are not labels of the data"):
        preflight(grid, resolve_data(grid, Path(grid.out)))


def test_empty_selection(make_config):
    cfg = make_config("conditioning=instance", "labels=[Pleural Other]", "data.views=[Lateral]")
    with pytest.raises(ValueError, match=r"labels: no instance images for 'Pleural Other'.*no rows left after filters"):
        preflight(cfg, cfg.data)
    too_big = make_config("batch_size=200")
    with pytest.raises(ValueError, match=r"batch_size: 82 training images .* cannot fill one step of batch_size=200"):
        preflight(too_big, too_big.data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["conditioning=instance"], r"labels: conditioning='instance' trains exactly one label"),
        (["method=textual_inversion", "train_text_encoder=true"], r"train_text_encoder: textual_inversion trains"),
        (["method=textual_inversion", "conditioning=per_label"], r"dreambooth\.prior_preservation: class prompts"),
        (["optim.warmup_steps=3"], r"optim\.warmup_steps: 3 must be below max_steps=3"),
        (["scaling.use_gpu=true", "model.device=cpu"], r"scaling\.use_gpu: true but model\.device='cpu'"),
        (["labels=[Edema, Edema]"], r"labels: duplicates \['Edema'\]"),
        (["conditioning=per_label", "labels=[No Finding]"], r"labels: 'No Finding' cannot be an instance label"),
        (["data.observations=[Edema]"], r"labels: \['Cardiomegaly'\] are not in data\.observations"),
        (["optim.learning_rat=0.1"], r"unknown config key 'optim\.learning_rat'; did you mean 'optim\.learning_rate'"),
    ],
)
def test_inconsistent_config_fails_naming_the_field(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(*overrides)
