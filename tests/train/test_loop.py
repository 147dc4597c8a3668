"""medsd.train.loop: the loop in process (no Ray Train): cached inputs train exactly like live encoding, and a
resumed run continues exactly where an uninterrupted one would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsd.train.checkpoint import load_checkpoint
from medsd.train.context import InProcessContext
from medsd.train.loop import RunPlan, _check_fingerprint, build_run, fingerprint, fit, resume
from medsd.train.run import prepare_run


def _train(cfg, tiny_model_dir: Path, checkpoint_root: Path | None = None):
    plan, dataset = prepare_run(cfg, cfg.data, tiny_model_dir)
    run = build_run(cfg, plan, InProcessContext(dataset, checkpoint_root))
    resume(run)
    fit(run)
    return run


def test_cached_inputs_train_like_live_encoding(local_ray, make_config, tiny_model_dir, tmp_path) -> None:
    overrides = ("method=lora", "validation.every_n_steps=0", "checkpoint.every_n_steps=100")
    cached = _train(make_config(*overrides, out=tmp_path / "cached"), tiny_model_dir)
    live = _train(
        make_config(*overrides, "cache_latents=false", "cache_text_embeddings=false", out=tmp_path / "live"),
        tiny_model_dir,
    )
    assert cached.plan.latents_cached and cached.plan.prompt_cache is not None
    assert not live.plan.latents_cached and live.plan.prompt_cache is None
    cached_losses = [row["loss"] for row in cached.history]
    live_losses = [row["loss"] for row in live.history]
    assert len(cached_losses) == 3
    assert cached_losses == pytest.approx(live_losses, rel=1e-3)


class Crash(Exception):
    pass


class CrashAfterFirstCheckpoint(InProcessContext):
    def report(self, metrics, checkpoint) -> None:
        super().report(metrics, checkpoint)
        raise Crash


def test_resume_continues_exactly(local_ray, make_config, tiny_model_dir, tmp_path) -> None:
    cfg = make_config(
        "method=dreambooth",
        "max_steps=4",
        "ema_decay=0.5",
        "validation.every_n_steps=0",
        "checkpoint.every_n_steps=2",
        "batch_size=32",
    )  # 82 images, 2 batches per epoch: step 3 starts epoch 1
    straight = _train(cfg, tiny_model_dir)
    root = tmp_path / "checkpoints"
    root.mkdir()
    plan, dataset = prepare_run(cfg, cfg.data, tiny_model_dir)
    crashing = build_run(cfg, plan, CrashAfterFirstCheckpoint(dataset, root))
    with pytest.raises(Crash):
        fit(crashing)
    assert [p.name for p in root.iterdir()] == ["step-00000002"]
    assert load_checkpoint(root / "step-00000002").step == 2
    resumed = _train(cfg, tiny_model_dir, checkpoint_root=root)
    assert [row["step"] for row in resumed.history] == [1, 2, 3, 4]
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in straight.history])
    for name, value in straight.method.trained_state().items():
        torch.testing.assert_close(resumed.method.trained_state()[name], value)


def test_a_checkpoint_of_other_settings_is_refused(make_config) -> None:
    saved = fingerprint(make_config("method=lora"), world_size=2)
    current = fingerprint(make_config("method=lora", "batch_size=4"), world_size=1)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 8 -> 4; world_size: 2 -> 1\)"):
        _check_fingerprint(saved, current, Path("step-00000002"))


def test_run_plan_survives_the_trip_to_workers(local_ray, make_config, tiny_model_dir) -> None:
    cfg = make_config("method=textual_inversion")
    plan, _dataset = prepare_run(cfg, cfg.data, tiny_model_dir)
    assert RunPlan.from_dict(plan.to_dict()) == plan
    assert plan.placeholder_tokens == {"Cardiomegaly": "<cardiomegaly>", "Edema": "<edema>"}
    assert plan.prompt_cache is None  # new tokens: prompts are encoded live
    assert len(plan.prompt_index) == len(plan.loss_weight) == len(plan.sample_ids) == 82
