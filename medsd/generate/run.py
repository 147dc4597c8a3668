"""`medsd generate` end to end: check inputs, plan, resume, render on a Ray Data actor pool, write the dataset.

The driver never holds more than the plan and the shards still being filled: images stream from the
actors (which write the PNGs) to the shard writer (which writes parquet) as they are made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow.compute as pc
import ray

from medsd.config import GenerateConfig
from medsd.generate.actor import ROWS, GeneratorActor
from medsd.generate.checks import check_cluster_fits, check_inputs
from medsd.generate.manifest import check_resumable, complete_manifest, new_manifest, read_manifest, write_manifest
from medsd.generate.plan import REUSED, GenerationPlan, Shard, build_plan
from medsd.generate.storage import OutputFolder
from medsd.generate.writers import ShardRecord, ShardWriter, verify_shard, write_train_csv
from medsd.ray_session import ensure_ray

logger = logging.getLogger(__name__)

# Ray Data blocks of the plan: one plan batch each, so work spreads over actors and streams, but capped
# so a million-image plan does not become a million tiny objects.
MAX_PLAN_BLOCKS = 1000
BYTES_PER_MB = 1e6


@dataclass(frozen=True)
class GenerateResult:
    """What a run left in the output folder and how fast it went."""

    out: str
    n_images: int
    n_rendered: int
    n_kept: int  # images an earlier, interrupted run had already finished
    image_bytes: int
    seconds: float
    manifest_path: str

    @property
    def images_per_second(self) -> float:
        return self.n_rendered / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"generate: {self.n_images} images ({self.n_rendered} rendered, {self.n_kept} kept from an earlier run) "
            f"in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s, "
            f"{self.image_bytes / BYTES_PER_MB:.1f} MB -> {self.out}"
        )


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    """Write (or finish) the synthetic dataset ``cfg`` describes in ``cfg.out``; see DESIGN.md "Data contracts".

    Every input is checked before any actor starts. Rerunning after a crash keeps the shards already
    finished and renders the rest; a folder made with another config or model is refused.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. Check every input, then plan.
    inputs = check_inputs(cfg)
    plan = build_plan(cfg, inputs.model_hash, inputs.adapter_hashes, inputs.placeholder_tokens)
    timings["check_and_plan_s"] = time.perf_counter() - started

    # 2. Resume: refuse a foreign folder, keep the shards an earlier run finished, sweep its temporaries.
    mark = time.perf_counter()
    folder = inputs.folder
    previous = read_manifest(folder)
    check_resumable(folder, previous, cfg, plan, inputs.model_hash)
    swept = folder.remove_temporaries()
    finished = {shard.name: record for shard in plan.shards if (record := verify_shard(folder, plan, shard))}
    remaining = [shard for shard in plan.shards if shard.name not in finished]
    if previous is not None:
        logger.info(
            "resuming %s: %d of %d shards finished earlier, %d temporary files removed",
            folder.describe(),
            len(finished),
            len(plan.shards),
            swept,
        )
    if remaining:
        ensure_ray()
        check_cluster_fits(cfg)
    manifest = new_manifest(cfg, plan, inputs.model_dir, inputs.model_hash, previous)
    write_manifest(folder, manifest)
    timings["resume_check_s"] = time.perf_counter() - mark

    # 3. Render what is left on the actor pool; shards are written as they fill.
    mark = time.perf_counter()
    n_kept_images = sum(record.shard.n_rows for record in finished.values())
    if remaining:
        new_records, n_reused = render_shards(cfg, plan, remaining, folder)
        finished.update((record.shard.name, record) for record in new_records)
        n_kept_images += n_reused
    timings["generate_s"] = time.perf_counter() - mark

    # 4. train.csv and the complete manifest.
    mark = time.perf_counter()
    records = [finished[shard.name] for shard in plan.shards]
    csv_sha256 = write_train_csv(folder, plan)
    timings["finalize_s"] = time.perf_counter() - mark
    seconds = time.perf_counter() - started
    timings["total_s"] = seconds
    result = GenerateResult(
        out=folder.describe(),
        n_images=len(plan.rows),
        n_rendered=len(plan.rows) - n_kept_images,
        n_kept=n_kept_images,
        image_bytes=sum(record.image_bytes for record in records),
        seconds=seconds,
        manifest_path=folder.path("manifest.json"),
    )
    run_summary = {
        "rendered": result.n_rendered,
        "kept": result.n_kept,
        "image_bytes": result.image_bytes,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
    }
    write_manifest(folder, complete_manifest(manifest, plan, records, csv_sha256, timings, run_summary))
    logger.info(result.summary_line())
    return result


# ---------------------------------------------------------------------------------------------------------------
# Rendering on the actor pool
# ---------------------------------------------------------------------------------------------------------------


def render_shards(
    cfg: GenerateConfig, plan: GenerationPlan, shards: list[Shard], folder: OutputFolder
) -> tuple[list[ShardRecord], int]:
    """Render every row of ``shards`` on ``cfg.num_actors`` GeneratorActors; write each shard as it fills.

    Returns the shard records and how many PNGs were found already made (verified) and kept.
    """
    # One Ray item per plan batch, one item per actor call: the plan, not Ray's bundling, decides which
    # images share a pipeline call (see medsd.generate.plan).
    items = [{ROWS: batch} for shard in shards for batch in plan.batches(shard)]
    n_rows = sum(shard.n_rows for shard in shards)
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_PLAN_BLOCKS)).map_batches(
        GeneratorActor,
        fn_constructor_kwargs={"config": cfg.model_dump(mode="json")},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        batch_size=1,
        batch_format="pyarrow",
        runtime_env=actor_runtime_env(cfg),
    )
    # In plan order, shards fill one after another, so the writer holds about one shard at a time.
    dataset.context.execution_options.preserve_order = True
    writer = ShardWriter(folder, shards)
    records: list[ShardRecord] = []
    n_done, n_reused, started = 0, 0, time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        n_done += batch.num_rows
        n_reused += pc.sum(batch[REUSED]).as_py() or 0
        for record in writer.add(batch):
            records.append(record)
            rate = n_done / (time.perf_counter() - started)
            logger.info(
                "%s written: %d/%d shards, %d/%d images, %.2f images/s",
                record.shard.parquet_path,
                len(records),
                len(shards),
                n_done,
                n_rows,
                rate,
            )
    writer.check_all_written()
    return records, n_reused


def actor_runtime_env(cfg: GenerateConfig) -> dict:
    """Environment of CPU actors: OpenMP threads that sleep instead of spinning while they wait.

    Spinning OpenMP threads collapse when anything else wants the cores: on a 2-core machine with
    background load, 2-thread torch sampling of the tiny model ran at 0.3 images/s spinning and 3.1 sleeping
    (1 thread: 3.3). It must be set before torch starts in the worker, hence the runtime env.
    """
    if cfg.num_gpus_per_actor > 0:
        return {}
    return {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
