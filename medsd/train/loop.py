"""One training loop for Ray Train workers (and for an in-process run): setup, resume, ``fit``.

``train_loop_per_worker(loop_config)`` re-validates the config, builds components through
:mod:`medsd.models`, resumes from the latest checkpoint and calls :func:`fit`. Methods differ only through
the strategy object of :mod:`medsd.train.methods`. Rank 0 alone writes checkpoints, grids and outputs;
every rank calls ``report`` the same number of times (it is a barrier).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from medsd.config import TrainConfig
from medsd.models import PipelineComponents, autocast_dtype, load_components, select_device
from medsd.train.batches import BatchStream, DataPosition
from medsd.train.card import RunFacts, write_model_card, write_resolved_config
from medsd.train.checkpoint import CheckpointContents, load_checkpoint, replace_folder, save_checkpoint, staging_folder
from medsd.train.context import RayTrainContext
from medsd.train.inputs import TrainingInputs
from medsd.train.methods import build_method, validation_pipeline
from medsd.train.objective import DiffusionObjective
from medsd.train.validation import plot_loss_curve, render_grid, write_metrics_csv

logger = logging.getLogger(__name__)

# Output layout under cfg.out (tests assert it).
MODEL_FOLDER = "model"
VALIDATION_FOLDER = "validation"
METRICS_FILE = "metrics.csv"
LOSS_CURVE_FILE = "loss_curve.png"
FINAL_GRID_FILE = "final.png"
CHECKPOINT_GRID_FILE = "validation.png"
# A training table up to this size (per worker; e.g. 8k cached SD latents at 512 px) stays in memory after the
# first epoch instead of being re-read through Ray Data every epoch.
HOLD_DATASET_BYTES = 1 << 30


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class RunPlan:
    """What the driver worked out for one run, handed to every worker beside the config."""

    model_dir: str
    prompts: tuple[str, ...]  # prompt_index -> text (index 0: empty)
    sample_ids: tuple[int, ...]  # the ids the training dataset holds
    prompt_index: tuple[int, ...]  # indexed by sample id (the whole training table)
    loss_weight: tuple[float, ...]  # indexed by sample id
    latents_cached: bool
    prompt_cache: str | None
    placeholder_tokens: dict[str, str]
    validation_rows: tuple[tuple[str, str], ...]  # (grid row title, prompt)
    facts: RunFacts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunPlan:
        raw = dict(raw)
        raw["facts"] = RunFacts(**{**raw["facts"], "labels": tuple(raw["facts"]["labels"])})
        raw["validation_rows"] = tuple(tuple(row) for row in raw["validation_rows"])
        return cls(**raw)


# ---------------------------------------------------------------------------------------------------------------
# Worker setup
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything ``fit`` works with, built once per worker."""

    cfg: TrainConfig
    plan: RunPlan
    context: Any  # RayTrainContext | InProcessContext
    parts: PipelineComponents
    method: Any  # a medsd.train.methods strategy
    wrapped: dict[str, torch.nn.Module]  # trained modules as the forward pass uses them (DDP on several ranks)
    inputs: TrainingInputs
    objective: DiffusionObjective
    stream: BatchStream
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_scaler: torch.amp.GradScaler
    ema: EMAModel | None
    generator: torch.Generator
    autocast: torch.dtype | None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_rank_zero(self) -> bool:
        return self.context.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: ``{"config": TrainConfig as JSON, "plan": RunPlan as dict}``."""
    cfg = TrainConfig.model_validate(loop_config["config"])
    _show_progress_logs()
    run = build_run(cfg, RunPlan.from_dict(loop_config["plan"]), RayTrainContext())
    resume(run)
    fit(run)
    finish(run)


def build_run(cfg: TrainConfig, plan: RunPlan, context) -> Run:
    """Components, method, optimizer, schedule, EMA and data stream of one worker."""
    device = context.device(select_device(cfg.model.device))
    autocast = autocast_dtype(device, cfg.model.precision)
    # Same seed on every rank: new weights (LoRA, placeholder rows) start identical (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    parts = load_components(plan.model_dir)
    method = build_method(cfg, parts, plan.placeholder_tokens)
    if autocast is not None:
        method.cast_frozen_weights(autocast)
    if cfg.gradient_checkpointing:
        method.enable_gradient_checkpointing()
    # The VAE too, even with cached latents: validation grids decode with it on the training device.
    for module in (parts.unet, parts.text_encoder, parts.vae):
        module.to(device)
    wrapped = {name: context.prepare(module, device) for name, module in method.trainable_modules().items()}
    method.set_train_mode(True)
    optim = cfg.optim
    optimizer = torch.optim.AdamW(
        method.parameter_groups(),
        betas=(optim.beta1, optim.beta2),
        eps=optim.epsilon,
        weight_decay=optim.weight_decay,
    )
    return Run(
        cfg=cfg,
        plan=plan,
        context=context,
        parts=parts,
        method=method,
        wrapped=wrapped,
        inputs=TrainingInputs(cfg, plan, parts, wrapped.get("text_encoder", parts.text_encoder), device, autocast),
        objective=DiffusionObjective(
            parts.noise_scheduler,
            prediction_type=cfg.prediction_type,
            snr_gamma=cfg.snr_gamma,
            noise_offset=cfg.noise_offset,
        ),
        stream=BatchStream(
            context.read_rows,
            sample_ids=np.array(plan.sample_ids),
            batch_size=cfg.batch_size,
            rank=context.rank,
            world_size=context.world_size,
            seed=cfg.seed,
            hold_bytes=HOLD_DATASET_BYTES,
        ),
        optimizer=optimizer,
        lr_scheduler=get_scheduler(
            optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=cfg.max_steps
        ),
        # Loss scaling only for fp16: bf16 has fp32's exponent range.
        grad_scaler=torch.amp.GradScaler(device.type, enabled=autocast == torch.float16),
        ema=EMAModel(method.trainable_parameters(), decay=cfg.ema_decay) if cfg.ema_decay else None,
        generator=torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + context.rank),
        autocast=autocast,
    )


def resume(run: Run) -> None:
    """Restore the latest checkpoint, if the run has one: weights, optimizer, schedule, EMA, RNG, step, history."""
    with run.context.latest_checkpoint() as folder:
        if folder is None:
            logger.info("no checkpoint: training from step 0")
            return
        saved = load_checkpoint(folder)
    _check_fingerprint(saved.fingerprint, fingerprint(run.cfg, run.context.world_size), folder)
    run.method.load_trained_state(saved.trained)
    run.optimizer.load_state_dict(saved.optimizer)
    run.lr_scheduler.load_state_dict(saved.lr_scheduler)
    # The saved learning rates follow the saved schedule; a rerun with another max_steps follows its own.
    schedule = run.lr_scheduler
    for group, base, factor in zip(run.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group["lr"] = base * factor(schedule.last_epoch)
    if saved.grad_scaler is not None:
        run.grad_scaler.load_state_dict(saved.grad_scaler)
    if run.ema is not None and saved.ema is not None:
        run.ema.load_state_dict(saved.ema)
    run.generator.set_state(saved.rng["generator"])
    torch.set_rng_state(saved.rng["torch"])
    if "cuda" in saved.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved.rng["cuda"])
    run.step, run.history = saved.step, saved.history
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, saved.step, *asdict(saved.position).values())


def fingerprint(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """Settings a resumed run must share with its checkpoint: they fix what a step and a sample id mean."""
    return {
        "method": cfg.method,
        "conditioning": cfg.conditioning,
        "labels": cfg.labels,
        "model.model": cfg.model.model,
        "train_text_encoder": cfg.train_text_encoder,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "optim.gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
        "world_size": world_size,  # a step's global batch is batch_size x world_size
    }


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise ValueError(
            f"checkpoint {folder} was written by a run with other settings ({'; '.join(changed)}); "
            "resume with the same settings, or set checkpoint.run_name (or out) to start a new run"
        )


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def fit(run: Run) -> None:
    """Train from ``run.step`` to ``cfg.max_steps``; checkpoint and report every ``checkpoint.every_n_steps``."""
    cfg, accumulation = run.cfg, run.cfg.optim.gradient_accumulation_steps
    unet = run.wrapped.get("unet", run.parts.unet)
    batches = run.stream.iterate(DataPosition.after(run.step * accumulation, run.stream.batches_per_epoch))
    step_started = time.perf_counter()
    while run.step < cfg.max_steps:
        losses, sample_ids = [], []
        for micro_batch in range(accumulation):
            # Next batch: this rank's rows of the global micro-batch (batches.py).
            batch = next(batches)
            # DDP all-reduces gradients only on the last micro-batch of an optimizer step.
            with _gradient_sync(run.wrapped, is_sync_step=micro_batch == accumulation - 1):
                # Latents (cached or encoded) and the prompt embeddings they are conditioned on.
                latents = run.inputs.latents(batch.rows, run.generator)  # (B, C, h, w)
                text = run.inputs.prompt_embeddings(batch.rows, run.generator)  # (B, L, hidden)
                # Noise and timesteps; the target is the noise or the velocity.
                noisy = run.objective.corrupt(latents, run.generator)
                # Prediction, under autocast on a GPU (fp32 master weights).
                with torch.autocast(latents.device.type, dtype=run.autocast, enabled=run.autocast is not None):
                    prediction = unet(noisy.noisy_latents, noisy.timesteps, encoder_hidden_states=text).sample
                # Loss: the method's, per-sample weighted by min-SNR and by instance/class set.
                weights = run.objective.loss_weights(noisy.timesteps) * run.inputs.loss_weights(batch.rows)
                loss = run.method.loss(prediction, noisy.target, weights)
                run.grad_scaler.scale(loss / accumulation).backward()
            losses.append(loss.detach())
            sample_ids.append(batch.global_sample_ids)

        # Clip, step, schedule; then the method's fix-ups (textual inversion) and the EMA.
        _optimizer_step(run)
        run.step += 1

        # Log: rank 0's loss; samples/s over every rank.
        elapsed = time.perf_counter() - step_started
        _record_step(run, torch.stack(losses).mean().item(), np.concatenate(sample_ids), elapsed, batch.position)

        # Checkpoint (and grid) from rank 0; every rank reports, since report is a barrier.
        if run.step % cfg.checkpoint.every_n_steps == 0 or run.step == cfg.max_steps:
            save_and_report(run)
        elif cfg.validation.every_n_steps and run.step % cfg.validation.every_n_steps == 0 and run.is_rank_zero:
            _validation_grid(run, run.out / VALIDATION_FOLDER / f"{checkpoint_name(run.step)}.png")
        step_started = time.perf_counter()  # samples/s measures training, not checkpoints and grids


def _gradient_sync(wrapped: dict[str, torch.nn.Module], is_sync_step: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if not is_sync_step:
        for module in wrapped.values():
            if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
    return stack


def _optimizer_step(run: Run) -> None:
    parameters = run.method.trainable_parameters()
    run.grad_scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
    if run.cfg.optim.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, run.cfg.optim.max_grad_norm)
    run.grad_scaler.step(run.optimizer)
    run.grad_scaler.update()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.method.after_optimizer_step()
    if run.ema is not None:
        run.ema.step(parameters)


def _record_step(run: Run, loss: float, sample_ids: np.ndarray, seconds: float, position: DataPosition) -> None:
    samples = len(sample_ids)
    previous = run.history[-1]["seconds"] if run.history else 0.0
    row = {
        "step": run.step,
        "epoch": position.epoch,
        "loss": round(loss, 6),
        "learning_rate": run.lr_scheduler.get_last_lr()[0],
        "samples_per_second": round(samples / seconds, 2),
        "seconds": round(previous + seconds, 3),
    }
    if run.cfg.log_sample_ids:
        row["sample_ids"] = " ".join(str(i) for i in sample_ids.tolist())
    run.history.append(row)
    if run.is_rank_zero and (run.step % run.cfg.log_every_n_steps == 0 or run.step == run.cfg.max_steps):
        window = run.history[-run.cfg.log_every_n_steps :]
        window_seconds = sum(samples / r["samples_per_second"] for r in window)
        throughput = samples * len(window) / window_seconds
        logger.info(
            "step %d/%d epoch %d loss %.4f lr %.2e %.1f samples/s",
            run.step,
            run.cfg.max_steps,
            position.epoch,
            sum(r["loss"] for r in window) / len(window),
            row["learning_rate"],
            throughput,
        )


def save_and_report(run: Run) -> None:
    """Rank 0 writes the checkpoint (with a grid when validation is due); all ranks report it."""
    metrics = {k: v for k, v in run.history[-1].items() if k != "sample_ids"}
    with tempfile.TemporaryDirectory(prefix="medsd-checkpoint-") as tmp:
        folder = None
        if run.is_rank_zero:
            extra = {}
            every = run.cfg.validation.every_n_steps
            if every and run.step % every == 0:
                grid = _validation_grid(run, run.out / VALIDATION_FOLDER / f"{checkpoint_name(run.step)}.png")
                extra[CHECKPOINT_GRID_FILE] = grid
            folder = save_checkpoint(Path(tmp) / checkpoint_name(run.step), _contents(run), extra)
        run.context.report(metrics, folder)


def _contents(run: Run) -> CheckpointContents:
    rng = {"generator": run.generator.get_state(), "torch": torch.get_rng_state()}
    if run.generator.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    accumulation = run.cfg.optim.gradient_accumulation_steps
    return CheckpointContents(
        step=run.step,
        position=DataPosition.after(run.step * accumulation, run.stream.batches_per_epoch),
        trained=run.method.trained_state(),
        optimizer=run.optimizer.state_dict(),
        lr_scheduler=run.lr_scheduler.state_dict(),
        rng=rng,
        grad_scaler=run.grad_scaler.state_dict() if run.grad_scaler.is_enabled() else None,
        ema=run.ema.state_dict() if run.ema is not None else None,
        history=run.history,
        fingerprint=fingerprint(run.cfg, run.context.world_size),
    )


@contextlib.contextmanager
def _ema_weights(run: Run) -> Iterator[None]:
    """The EMA weights in place of the trained ones (when EMA is on), for grids and the saved model."""
    if run.ema is None:
        yield
        return
    parameters = run.method.trainable_parameters()
    run.ema.store(parameters)
    run.ema.copy_to(parameters)
    try:
        yield
    finally:
        run.ema.restore(parameters)


def _validation_grid(run: Run, path: Path) -> Path:
    """A grid of the fixed validation prompts and seeds with the current (EMA) weights; rank 0 only."""
    started = time.perf_counter()
    run.method.set_train_mode(False)
    try:
        with _ema_weights(run), torch.no_grad():
            pipe = validation_pipeline(run.parts, run.cfg.validation.sampler)
            render_grid(pipe, run.plan.validation_rows, run.cfg.validation, path, run.autocast)
    finally:
        run.method.set_train_mode(True)
    logger.info("validation grid at step %d in %.1f s -> %s", run.step, time.perf_counter() - started, path)
    return path


def finish(run: Run) -> None:
    """Rank 0: final grid, the model output (atomically), metrics CSV and loss curve."""
    if not run.is_rank_zero:
        return
    out = run.out
    _validation_grid(run, out / VALIDATION_FOLDER / FINAL_GRID_FILE)
    staging = staging_folder(out / MODEL_FOLDER)
    run.method.set_train_mode(False)
    with _ema_weights(run):
        run.method.save(staging, Path(run.plan.model_dir))
    final_loss = run.history[-1]["loss"] if run.history else None
    facts = RunFacts(**{**asdict(run.plan.facts), "steps": run.step, "final_loss": final_loss})
    write_model_card(run.cfg, facts, staging)
    write_resolved_config(run.cfg, staging)
    replace_folder(staging, out / MODEL_FOLDER)
    write_metrics_csv(run.history, out / METRICS_FILE)
    if run.history:
        plot_loss_curve(run.history, out / LOSS_CURVE_FILE, f"{run.cfg.method}, {run.cfg.conditioning} conditioning")
    logger.info("training finished at step %d: model -> %s", run.step, out / MODEL_FOLDER)


def _show_progress_logs() -> None:
    # A Ray worker does not inherit the driver's logging setup; without a handler, progress lines vanish.
    medsd_logger = logging.getLogger("medsd")
    medsd_logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not medsd_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        medsd_logger.addHandler(handler)
