"""Where the training loop runs: a Ray Train worker, or the calling process (benchmarks and tests).

Both give the loop the same five things: its rank and world size, the device, the rows of the dataset,
how to wrap a trained module (DDP across Ray Train workers), and where checkpoints come from and go.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

READ_BATCH_ROWS = 1024  # rows per block when a worker reads the dataset (any size works; see batches.py)


class RayTrainContext:
    """Rank, data, device placement, checkpoints and reports of a Ray Train worker."""

    def __init__(self) -> None:
        import ray.data
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        # The per-epoch read of the (small) training table would draw progress bars over the step logs.
        ray.data.DataContext.get_current().enable_progress_bars = False

    def device(self, requested: torch.device) -> torch.device:
        import ray.train.torch

        # Ray assigns each worker its GPU; models.select_device only says whether it is a GPU run.
        return ray.train.torch.get_device() if requested.type == "cuda" else requested

    def read_rows(self) -> Iterable[dict[str, np.ndarray]]:
        import ray.train

        shard = ray.train.get_dataset_shard("train")  # the whole dataset: batches.py picks this rank's rows
        return shard.iter_batches(batch_size=READ_BATCH_ROWS, batch_format="numpy")

    def prepare(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=device, parallel_strategy="ddp")

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        saved = None if checkpoint is None else ray.train.Checkpoint.from_directory(str(checkpoint))
        name = None if checkpoint is None else checkpoint.name
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=name)


@dataclass
class InProcessContext:
    """The loop in the calling process with no Ray Train (benchmarks, tests): one rank, rows from a Ray Dataset;
    checkpoints are kept under ``checkpoint_root`` when given, and the newest one is resumed from."""

    dataset: Any  # ray.data.Dataset
    checkpoint_root: Path | None = None
    rank: int = 0
    world_size: int = 1
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def device(self, requested: torch.device) -> torch.device:
        return requested

    def read_rows(self) -> Iterable[dict[str, np.ndarray]]:
        return self.dataset.iter_batches(batch_size=READ_BATCH_ROWS, batch_format="numpy")

    def prepare(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return module.to(device)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        saved = sorted(self.checkpoint_root.glob("step-*")) if self.checkpoint_root else []
        yield saved[-1] if saved else None

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self.last_metrics = metrics
        if checkpoint is not None and self.checkpoint_root is not None:
            shutil.copytree(checkpoint, self.checkpoint_root / checkpoint.name)
