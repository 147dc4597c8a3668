"""`medsd demo`: the whole of medsd on the embedded defaults, on a local Ray.

phantom dataset -> fine-tune the tiny model (label-conditional DreamBooth, Ray Train) -> per-label synthetic
dataset (Ray Data) -> evaluation (classifier AUC real vs synthetic vs mixed, fidelity, diversity,
memorization; Ray tasks) -> a sample grid of the fine-tuned model. Every stage reuses what a previous run
finished (the phantom, a finished model, the finished images, an evaluation of the same inputs), so a rerun
is quick and an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from medsd.config import DemoConfig, EvaluateConfig, GenerateConfig, ModelConfig, PhantomConfig, TrainConfig
from medsd.figures import save_image_grid
from medsd.labels import NO_FINDING
from medsd.models import native_image_size_px, resolve_model_dir
from medsd.phantom import PhantomSummary, write_phantom
from medsd.prompts import PromptParts, format_prompt
from medsd.ray_session import ensure_ray

log = logging.getLogger(__name__)

GRID_COLUMNS = 4
SNR_GAMMA = 5.0  # min-SNR loss weighting: measured on the phantom, sharper samples at the same steps
STAGES = 5
EVALUATION_SUMMARY = "demo_summary.json"  # in the evaluation folder: the table, flags and what they came from
FINISHED_MARKER = "demo_finished.json"  # in the training folder: the config of the run that finished the model
# `medsd demo --quick`: every stage at a smoke size (a few minutes on 2 cores); --set values still win.
QUICK_OVERRIDES = (
    "out=medsd-demo-quick",  # its own folder: a full run's stages would refuse the smaller stages' outputs
    "phantom.n_images=400",
    "train_steps=40",
    "train_batch_size=16",
    "per_label=16",
    "sample_steps=8",
    "eval_epochs=1",
    "grid_steps=8",
)


@dataclass(frozen=True)
class EvaluationSummary:
    """What the demo prints of an evaluation; kept next to it so that a rerun can reuse it."""

    auc_table: str
    flags: list[str]


@dataclass(frozen=True)
class DemoResult:
    out: Path
    phantom: PhantomSummary
    model_dir: Path
    synthetic_dir: Path
    evaluation_dir: Path
    auc_table: str
    grid_path: Path
    flags: list[str]

    def summary(self) -> str:
        lines = [
            "medsd demo finished:",
            f"  phantom dataset    {self.phantom.out}",
            f"  fine-tuned model   {self.model_dir}",
            f"  synthetic dataset  {self.synthetic_dir}",
            f"  evaluation         {self.evaluation_dir / 'report.md'}",
            f"  sample grid        {self.grid_path}",
            "",
            self.auc_table,
        ]
        lines += [f"  flag: {flag}" for flag in self.flags]
        return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the demo stages in order into ``cfg.out``; returns where each result is."""
    from medsd.evaluate import run_evaluation
    from medsd.generate import run_generate
    from medsd.train import run_training

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()

    _stage(1, f"phantom dataset -> {out / 'phantom'}")
    phantom = write_phantom(out / "phantom", cfg.phantom)

    size_px = native_image_size_px(resolve_model_dir(cfg.model.model, cfg.model.cache_dir))
    train_cfg = train_config(cfg, phantom, size_px)
    model_dir = Path(train_cfg.out) / "model"
    if _finished_training(train_cfg, cfg.phantom, model_dir):
        _stage(2, f"fine-tuning: reusing the finished model {model_dir}")
    else:
        _stage(2, f"fine-tuning the tiny model, {cfg.train_steps} steps (Ray Train) -> {train_cfg.out}")
        run_training(train_cfg)  # writes model_dir
        _mark_finished(train_cfg, cfg.phantom)

    generate_cfg = generate_config(cfg, model_dir, phantom)
    _stage(3, f"synthetic dataset, {cfg.per_label} images per label (Ray Data) -> {generate_cfg.out}")
    log.info("%s", run_generate(generate_cfg).summary_line())

    evaluate_cfg = evaluate_config(cfg, phantom, Path(generate_cfg.out), size_px)
    evaluation = _reusable_evaluation(evaluate_cfg, cfg.phantom)
    if evaluation is not None:
        _stage(4, f"evaluation: reusing {evaluate_cfg.out} (same config, same synthetic dataset)")
    else:
        _stage(4, f"evaluation: classifier arms as Ray tasks, fidelity, diversity, memorization -> {evaluate_cfg.out}")
        result = run_evaluation(evaluate_cfg)
        evaluation = EvaluationSummary(result.auc_table_text(), list(result.flags))
        _write_evaluation_summary(evaluate_cfg, cfg.phantom, evaluation)

    _stage(5, "sample grid of the fine-tuned model")
    grid_path = render_grid(cfg, model_dir, out / "samples" / "grid.png")
    return DemoResult(
        out=out,
        phantom=phantom,
        model_dir=model_dir,
        synthetic_dir=Path(generate_cfg.out),
        evaluation_dir=Path(evaluate_cfg.out),
        auc_table=evaluation.auc_table,
        grid_path=grid_path,
        flags=evaluation.flags,
    )


def train_config(cfg: DemoConfig, phantom: PhantomSummary, size_px: int) -> TrainConfig:
    """Label-conditional DreamBooth of the whole UNet and text encoder (configs/train-tiny-phantom.yaml)."""
    checkpoint_every = max(1, cfg.train_steps // 3)
    return TrainConfig.model_validate(
        {
            "out": str(Path(cfg.out) / "train"),
            "method": "dreambooth",
            "conditioning": "labels",
            # Prompts name every finding an image has, not only the demo's labels: a prompt that calls an image
            # with pneumonia "no finding" teaches the model that no finding may look like pneumonia.
            "labels": None,
            "data": {"csv": str(phantom.out / "train.csv"), "image_size_px": size_px, "views": ["Frontal"]},
            "model": cfg.model.model_dump(mode="json"),
            # The tiny text encoder is random: frozen, its embeddings of different findings are nearly equal.
            "train_text_encoder": True,
            "max_steps": cfg.train_steps,
            "batch_size": cfg.train_batch_size,
            "empty_prompt_fraction": 0.1,
            "snr_gamma": SNR_GAMMA,
            "optim": {"learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": min(25, cfg.train_steps // 10)},
            "checkpoint": {"every_n_steps": checkpoint_every, "num_to_keep": 1, "run_name": "demo"},
            "validation": {
                "every_n_steps": 0,
                "labels": [*cfg.labels, NO_FINDING],
                "images_per_label": 2,
                "steps": cfg.grid_steps,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        }
    )


def generate_config(cfg: DemoConfig, model_dir: Path, phantom: PhantomSummary) -> GenerateConfig:
    """A balanced per-label set of frontal images: each label's prompts are phantom training rows positive
    for it, co-occurring findings included (single-finding sets mislead the classifier: see bench/quality.py).
    Two one-thread actors fill two cores."""
    return GenerateConfig.model_validate(
        {
            "out": str(Path(cfg.out) / "synthetic"),
            "model": {**cfg.model.model_dump(mode="json"), "model": str(model_dir)},
            "plan": "balanced",
            "source": {"csv": str(phantom.out / "train.csv"), "views": ["Frontal"]},
            "labels": cfg.labels,
            "per_label": cfg.per_label,
            "steps": cfg.sample_steps,
            "guidance_scales": [cfg.guidance_scale],
            "seed": cfg.grid_seed,
            "num_actors": 2,
            "cpus_per_actor": 1,
        }
    )


def evaluate_config(cfg: DemoConfig, phantom: PhantomSummary, synthetic_dir: Path, size_px: int) -> EvaluateConfig:
    """Real = phantom train.csv, tested on phantom valid.csv (other patients), at the model's resolution."""
    return EvaluateConfig.model_validate(
        {
            "out": str(Path(cfg.out) / "evaluate"),
            "real": {"csv": str(phantom.out / "train.csv"), "image_size_px": size_px, "views": ["Frontal"]},
            "test_csv": str(phantom.out / "valid.csv"),
            "labels": cfg.labels,
            "synthetic": [str(synthetic_dir)],
            "epochs": cfg.eval_epochs,
            "seed": cfg.grid_seed,
        }
    )


def render_grid(cfg: DemoConfig, model_dir: Path, path: Path) -> Path:
    """One row per label plus No Finding, one seed per column, sampled in a Ray task."""
    labels = (*cfg.labels, NO_FINDING)
    prompts, seeds = grid_prompts_and_seeds(labels, cfg.grid_seed)
    model = {**cfg.model.model_dump(mode="json"), "model": str(model_dir)}
    images = ray.get(_render_samples.remote(model, prompts, seeds, cfg.grid_steps, cfg.guidance_scale))
    grid = images.reshape(len(labels), GRID_COLUMNS, *images.shape[1:])
    column_titles = [f"seed {seed}" for seed in seeds[:GRID_COLUMNS]]
    return save_image_grid(grid, labels, path, column_titles=column_titles)


def grid_prompts_and_seeds(labels: tuple[str, ...], first_seed: int) -> tuple[list[str], list[int]]:
    """One row per label, one seed per column; the same seeds in every row so rows compare."""
    prompts, seeds = [], []
    for label in labels:
        findings = () if label == NO_FINDING else (label,)
        for column in range(GRID_COLUMNS):
            prompts.append(format_prompt(PromptParts(findings, view="Frontal", projection="PA")))
            seeds.append(first_seed + column)
    return prompts, seeds


def _training_key(train_cfg: TrainConfig, phantom_cfg: PhantomConfig) -> dict:
    """What decides the fine-tuned model: the training config and the phantom it reads."""
    return {"train": train_cfg.model_dump(mode="json"), "phantom": phantom_cfg.model_dump(mode="json")}


def _finished_training(train_cfg: TrainConfig, phantom_cfg: PhantomConfig, model_dir: Path) -> bool:
    """The model folder exists and the run that finished it had this exact key (see _mark_finished)."""
    marker = Path(train_cfg.out) / FINISHED_MARKER
    if not (model_dir / "model_index.json").is_file() or not marker.is_file():
        return False
    return json.loads(marker.read_text()) == _training_key(train_cfg, phantom_cfg)


def _mark_finished(train_cfg: TrainConfig, phantom_cfg: PhantomConfig) -> None:
    # Written only after training returns: an interrupted run leaves no marker and is resumed, not reused.
    (Path(train_cfg.out) / FINISHED_MARKER).write_text(json.dumps(_training_key(train_cfg, phantom_cfg), indent=1))


def _evaluation_key(evaluate_cfg: EvaluateConfig, phantom_cfg: PhantomConfig) -> dict:
    """What decides an evaluation: its config and the checksums of the synthetic images and tables."""
    from medsd.generate.manifest import MANIFEST_FILE

    checksums = [json.loads((Path(f) / MANIFEST_FILE).read_text())["checksums"] for f in evaluate_cfg.synthetic]
    return {
        "config": evaluate_cfg.model_dump(mode="json"),
        "phantom": phantom_cfg.model_dump(mode="json"),
        "synthetic_checksums": checksums,
    }


def _reusable_evaluation(evaluate_cfg: EvaluateConfig, phantom_cfg: PhantomConfig) -> EvaluationSummary | None:
    path = Path(evaluate_cfg.out) / EVALUATION_SUMMARY
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != _evaluation_key(evaluate_cfg, phantom_cfg):
        return None
    return EvaluationSummary(saved["auc_table"], saved["flags"])


def _write_evaluation_summary(
    evaluate_cfg: EvaluateConfig, phantom_cfg: PhantomConfig, summary: EvaluationSummary
) -> None:
    record = {"key": _evaluation_key(evaluate_cfg, phantom_cfg), "auc_table": summary.auc_table, "flags": summary.flags}
    (Path(evaluate_cfg.out) / EVALUATION_SUMMARY).write_text(json.dumps(record, indent=1))


def _stage(number: int, what: str) -> None:
    log.info("[%d/%d] %s", number, STAGES, what)


@ray.remote(num_cpus=2)
def _render_samples(model_config: dict, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float):
    # Imported here: the worker, not the driver, loads torch and the model.
    from medsd.models import load_pipeline
    from medsd.sampling import sample_images

    started = time.perf_counter()
    pipe = load_pipeline(ModelConfig.model_validate(model_config))
    images = sample_images(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    log.info("sampled %d grid images in %.1f s", len(images), time.perf_counter() - started)
    return images
