"""`medsd train` on the driver: check everything, prepare data and caches, run the Ray Train trainer(s).

Every check that can fail (model, resolution, labels, selections, batch size) runs before Ray starts and
before any worker does, and all problems are reported at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medsd.config import DataConfig, TrainConfig
from medsd.data import load_dataset
from medsd.labels import NO_FINDING
from medsd.models import (
    TINY_MODEL,
    model_hash,
    native_image_size_px,
    resolve_model_dir,
    select_dtype,
    vae_downsampling,
)
from medsd.phantom import write_phantom
from medsd.ray_session import ensure_ray
from medsd.train.card import RunFacts, write_resolved_config
from medsd.train.conditioning import (
    TrainingSet,
    build_training_set,
    check_labels_in_data,
    per_label_configs,
    placeholder_token,
    placeholder_vectors,
    trained_labels,
    uses_class_set,
    validation_rows,
)

logger = logging.getLogger(__name__)

PHANTOM_FOLDER = "phantom"
CACHE_FOLDER = "cache"
CLASS_IMAGES_FOLDER = "class_images"
CHECKPOINTS_FOLDER = "checkpoints"


@dataclass(frozen=True)
class RunResult:
    """One trained model or adapter."""

    label: str | None  # the label of a per_label run
    out: Path
    model_dir: Path  # the output to load (diffusers folder, LoRA or embeddings folder)
    steps: int
    final_loss: float | None
    samples_per_second: float | None


@dataclass(frozen=True)
class TrainResult:
    out: Path
    runs: list[RunResult]
    seconds: float
    method: str
    conditioning: str

    def summary(self) -> str:
        """What the CLI and the job print: one line per trained model or adapter."""
        lines = [f"medsd train finished in {self.seconds:.0f} s ({self.method}, {self.conditioning} conditioning):"]
        for run in self.runs:
            loss = "n/a" if run.final_loss is None else f"{run.final_loss:.4f}"
            name = f"{run.label}: " if run.label else ""
            lines.append(f"  {name}{run.model_dir} (step {run.steps}, loss {loss})")
        return "\n".join(lines)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says into ``cfg.out``; rerunning the same config resumes from the latest checkpoint.

    ValueError / FileNotFoundError before any worker starts for a bad config, model or data.
    """
    started = time.perf_counter()
    cfg = _with_absolute_paths(cfg)
    model_dir = check_model(cfg)
    out = Path(cfg.out)
    data = resolve_data(cfg, out)
    runs = per_label_configs(cfg, data) if cfg.conditioning == "per_label" else [(None, cfg)]
    for _label, run_cfg in runs:
        preflight(run_cfg, data)
    write_resolved_config(cfg, out)
    ensure_ray()
    results = [train_one(run_cfg, data, model_dir, label) for label, run_cfg in runs]
    return TrainResult(out, results, time.perf_counter() - started, cfg.method, cfg.conditioning)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def check_model(cfg: TrainConfig) -> Path:
    """Resolve the base model and check it can train at this resolution, precision and with these tokens."""
    try:
        model_dir = Path(resolve_model_dir(cfg.model.model, cfg.model.cache_dir))
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"model.model: {error}") from None
    problems = []
    if not cfg.scaling.use_gpu:  # a GPU run's precision is checked on the workers, which have the GPUs
        import torch

        try:
            select_dtype(torch.device("cpu"), cfg.model.precision)
        except ValueError as error:
            problems.append(str(error))
    problems += _resolution_problems(cfg, model_dir)
    problems += _scheduler_problems(cfg, model_dir)
    if cfg.method == "textual_inversion":
        problems += _token_problems(cfg, model_dir)
    if problems:
        raise ValueError(f"model {cfg.model.model} ({model_dir}): " + "; ".join(problems))
    return model_dir


def _resolution_problems(cfg: TrainConfig, model_dir: Path) -> list[str]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(model_dir / "unet")
    vae_factor = vae_downsampling(model_dir)
    unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)  # each down block but the last halves the latents
    size = cfg.data.image_size_px
    if size % (vae_factor * unet_factor):
        return [
            f"data.image_size_px={size} must be a multiple of {vae_factor * unet_factor} (the VAE downsamples "
            f"{vae_factor}x, the UNet {unet_factor}x more)"
        ]
    native = native_image_size_px(model_dir)
    if cfg.model.model == TINY_MODEL and size != native:
        # The tiny VAE was trained at one size only; its UNet never saw other latent sizes.
        return [f"data.image_size_px={size}: the tiny model takes {native} px images only"]
    return []


def _scheduler_problems(cfg: TrainConfig, model_dir: Path) -> list[str]:
    from diffusers import DDPMScheduler

    base = DDPMScheduler.load_config(model_dir / "scheduler").get("prediction_type", "epsilon")
    if cfg.prediction_type not in (None, base) and cfg.method != "dreambooth":
        return [
            f"prediction_type={cfg.prediction_type!r} differs from the base model's {base!r}; only "
            "method=dreambooth saves a scheduler that says so (LoRA and textual inversion run on the base scheduler)"
        ]
    return []


def _token_problems(cfg: TrainConfig, model_dir: Path) -> list[str]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    problems = []
    word = cfg.textual_inversion.initializer_word
    if not tokenizer(word, add_special_tokens=False).input_ids:
        problems.append(f"textual_inversion.initializer_word={word!r} gives no tokens")
    vocab = tokenizer.get_vocab()
    num_vectors = cfg.textual_inversion.num_vectors
    labels = trained_labels(cfg, cfg.data)
    taken = [t for label in labels for t in placeholder_vectors(placeholder_token(label), num_vectors) if t in vocab]
    if taken:
        problems.append(f"labels: placeholder tokens {taken} are already in the tokenizer's vocabulary")
    return problems


def resolve_data(cfg: TrainConfig, out: Path) -> DataConfig:
    """``cfg.data``, with the phantom written to ``<out>/phantom`` when data.csv is None."""
    if cfg.data.csv is not None:
        return cfg.data
    summary = write_phantom(out / PHANTOM_FOLDER, cfg.phantom)
    logger.info("%s", summary)
    return cfg.data.model_copy(update={"csv": str(summary.out / "train.csv"), "root": None})


def preflight(cfg: TrainConfig, data: DataConfig) -> None:
    """Labels exist, selections are not empty and one step's batch fits the data: ValueError naming the field."""
    labels = trained_labels(cfg, data)
    check_labels_in_data(labels, data, cfg)
    if cfg.conditioning == "labels":
        n_samples = len(load_dataset(data).frame)
    else:
        (label,) = labels
        try:
            n_samples = len(load_dataset(data, positive_for=[label]).frame)
        except ValueError as error:
            raise ValueError(f"labels: no instance images for {label!r}: {error}") from None
        if uses_class_set(cfg) and cfg.dreambooth.class_source == "no_finding":
            schema_data = data.model_copy(update={"observations": None})
            n_no_finding = len(load_dataset(schema_data, positive_for=[NO_FINDING]).frame)
            n_samples += min(n_no_finding, cfg.dreambooth.num_class_images)
        elif uses_class_set(cfg):
            n_samples += cfg.dreambooth.num_class_images
    workers = max(1, cfg.scaling.num_workers)
    if n_samples < cfg.batch_size * workers:
        raise ValueError(
            f"batch_size: {n_samples} training images in {data.csv} cannot fill one step of "
            f"batch_size={cfg.batch_size} x {workers} workers; lower batch_size or select more data"
        )


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def prepare_run(cfg: TrainConfig, data: DataConfig, model_dir: Path):
    """Driver work of one run: class images, training set, caches -> (RunPlan, the Ray Dataset workers read)."""
    import ray.data

    from medsd.train.batches import SAMPLE_ID
    from medsd.train.cache import IMAGE, build_latent_cache, build_prompt_cache, cached_sample_ids, can_cache_prompts
    from medsd.train.class_images import generate_class_images
    from medsd.train.conditioning import LOSS_WEIGHT, PROMPT_INDEX
    from medsd.train.loop import RunPlan

    out = Path(cfg.out)
    class_csv = None
    if uses_class_set(cfg) and cfg.dreambooth.class_source == "generated":
        class_csv = generate_class_images(cfg, data, cfg.labels[0], model_dir, out / CLASS_IMAGES_FOLDER)
    training_set = build_training_set(cfg, data, class_csv)
    frame = training_set.images.frame
    if cfg.cache_latents:
        latents = build_latent_cache(training_set.images, model_dir, cfg, out / CACHE_FOLDER)
        dataset = ray.data.read_parquet(str(latents))
        sample_ids = cached_sample_ids(latents).tolist()  # fewer than the table if data.skip_bad skipped images
    else:
        dataset = training_set.images.to_ray_dataset().select_columns([SAMPLE_ID, IMAGE])
        sample_ids = frame[SAMPLE_ID].tolist()
    prompt_cache = None
    if can_cache_prompts(cfg):
        prompt_cache = str(build_prompt_cache(training_set.prompts, model_dir, cfg, out / CACHE_FOLDER))
    plan = RunPlan(
        model_dir=str(model_dir),
        prompts=training_set.prompts,
        sample_ids=tuple(sample_ids),
        prompt_index=tuple(frame[PROMPT_INDEX].tolist()),
        loss_weight=tuple(frame[LOSS_WEIGHT].tolist()),
        latents_cached=cfg.cache_latents,
        prompt_cache=prompt_cache,
        placeholder_tokens=training_set.placeholder_tokens,
        validation_rows=tuple(validation_rows(cfg, training_set)),
        facts=_facts(cfg, data, model_dir, training_set),
    )
    return plan, dataset


def train_one(cfg: TrainConfig, data: DataConfig, model_dir: Path, label: str | None) -> RunResult:
    """Prepare one model or adapter's data and caches, then run its TorchTrainer."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from medsd.train.loop import MODEL_FOLDER, train_loop_per_worker

    out = Path(cfg.out)
    write_resolved_config(cfg, out)
    plan, dataset = prepare_run(cfg, data, model_dir)
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.checkpoint.run_name,  # fixed, so that rerunning the same command resumes
            storage_path=_storage_path(cfg, out),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        datasets={"train": dataset},
        # Every worker sees the whole dataset and keeps its own rows (batches.py), so resume is exact.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    if scaling.num_workers == 0:
        logger.warning("scaling.num_workers=0: training in the driver; Ray keeps no checkpoints, so it cannot resume")
    result = trainer.fit()
    metrics = result.metrics or {}
    logger.info("run %s finished: %s", label or cfg.checkpoint.run_name, metrics)
    return RunResult(
        label=label,
        out=out,
        model_dir=out / MODEL_FOLDER,
        steps=int(metrics.get("step", cfg.max_steps)),
        final_loss=metrics.get("loss"),
        samples_per_second=metrics.get("samples_per_second"),
    )


def _with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local paths absolute: Ray Train workers run in their own working directory, where a
    relative ``out`` or ``data.csv`` would land in (or read from) Ray's session folder."""

    def absolute(path: str | None) -> str | None:
        return None if path is None or "://" in path else str(Path(path).expanduser().resolve())

    data = cfg.data.model_copy(update={"csv": absolute(cfg.data.csv), "root": absolute(cfg.data.root)})
    return cfg.model_copy(update={"out": absolute(cfg.out), "data": data})


def _storage_path(cfg: TrainConfig, out: Path) -> str:
    """Ray Train storage: a URI (s3://, gs://, ...) as given, a local path made absolute (Ray requires it)."""
    storage = cfg.checkpoint.storage_path
    if storage is not None and "://" in storage:
        return storage
    return str(Path(storage or out / CHECKPOINTS_FOLDER).expanduser().resolve())


def _facts(cfg: TrainConfig, data: DataConfig, model_dir: Path, training_set: TrainingSet) -> RunFacts:
    return RunFacts(
        base_model=cfg.model.model if cfg.model.model != TINY_MODEL else f"tiny ({model_dir.name})",
        base_model_hash=model_hash(model_dir),
        data_csv=str(data.csv),
        labels=training_set.labels,
        n_instance=training_set.n_instance,
        n_class=training_set.n_class,
        n_prompts=len(training_set.prompts),
        steps=0,
        final_loss=None,
        placeholder_tokens=training_set.placeholder_tokens,
    )
