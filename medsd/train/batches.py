"""Which samples each worker trains on at each micro-batch: a pure function of (seed, epoch, rank).

Ray Data's streaming split hands blocks to workers dynamically, so a rerun would not give a rank the
same samples; exact resume (no sample repeated or skipped mid-epoch) needs an order that can be
recomputed. Each epoch has one global permutation of the sample ids, seeded by (seed, epoch); global
micro-batch b is positions [b*B*W, (b+1)*B*W) of it, and rank r takes every W-th of those. Each worker
reads the whole (cached, small) dataset once per epoch and keeps only its own rows, so memory per worker
is 1/W of the data; a dataset of at most ``hold_bytes`` is instead held after the first read (re-reading
it through Ray Data costs about 2 s per epoch, 12% of the tiny model's training on 2 cores). The last
partial global batch of an epoch is dropped so every rank makes the same number of steps; the next
epoch's permutation puts those samples elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

SAMPLE_ID = "sample_id"  # column every training row carries: its index in the training table


@dataclass(frozen=True)
class DataPosition:
    """Micro-batches consumed so far: ``batch`` of epoch ``epoch`` is the next one to train on."""

    epoch: int
    batch: int

    @classmethod
    def after(cls, micro_batches: int, batches_per_epoch: int) -> DataPosition:
        """The position after ``micro_batches`` micro-batches in total."""
        return cls(micro_batches // batches_per_epoch, micro_batches % batches_per_epoch)


def epoch_order(sample_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``sample_ids`` (sorted, unique) in the training order of epoch ``epoch``."""
    return sample_ids[np.random.default_rng([seed, epoch]).permutation(len(sample_ids))]


@dataclass(frozen=True)
class Batch:
    """One micro-batch of one worker: its rows, and the ids the whole step (all ranks) trains on."""

    rows: dict[str, np.ndarray]  # this rank's rows, each column (B, ...)
    global_sample_ids: np.ndarray  # (B * W,) in rank-interleaved order
    position: DataPosition  # where this batch sits; the next batch is one further


class BatchStream:
    """Resumable iterator of this rank's micro-batches, starting at ``start``.

    ``read_rows()`` yields the full dataset as numpy column batches (any order, any block sizes) with a
    ``sample_id`` column holding exactly ``sample_ids``; it is called once per epoch, or only once when the
    dataset comes to at most ``hold_bytes``. Ids need not be contiguous (images skipped while caching leave gaps).
    """

    def __init__(
        self,
        read_rows: Callable[[], Iterable[dict[str, np.ndarray]]],
        *,
        sample_ids: np.ndarray,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hold_bytes: int = 0,
    ) -> None:
        self.sample_ids = np.unique(np.asarray(sample_ids, dtype=np.int64))
        if len(self.sample_ids) != len(sample_ids):
            raise ValueError("sample_ids: expected unique ids")
        if len(self.sample_ids) < batch_size * world_size:
            raise ValueError(
                f"{len(self.sample_ids)} training samples cannot fill one step of batch_size={batch_size} x "
                f"{world_size} workers; lower batch_size or scaling.num_workers, or select more data"
            )
        self.read_rows = read_rows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.hold_bytes = hold_bytes
        self._held: list[dict[str, np.ndarray]] | None = None  # the whole dataset, once read, if small enough

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sample_ids) // self.global_batch_size

    def iterate(self, start: DataPosition) -> Iterator[Batch]:
        """This rank's batches from ``start`` on, forever (epoch after epoch)."""
        epoch, first = start.epoch, start.batch
        while True:
            order = epoch_order(self.sample_ids, self.seed, epoch)
            rows = self._rows_of_rank(order)
            for batch in range(first, self.batches_per_epoch):
                local = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
                global_ids = order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]
                yield Batch({k: v[local] for k, v in rows.items()}, global_ids, DataPosition(epoch, batch))
            epoch, first = epoch + 1, 0

    def _rows_of_rank(self, order: np.ndarray) -> dict[str, np.ndarray]:
        """Read every row once; keep this rank's, sorted by their place in ``order``."""
        position_of = dict(zip(order.tolist(), range(len(order)), strict=True))
        kept: dict[str, list[np.ndarray]] = {}
        positions: list[np.ndarray] = []
        seen = 0
        for block in self._blocks():
            ids = np.asarray(block[SAMPLE_ID], dtype=np.int64)
            seen += len(ids)
            try:
                block_positions = np.fromiter((position_of[i] for i in ids.tolist()), np.int64, len(ids))
            except KeyError as error:
                raise RuntimeError(f"the training dataset holds sample id {error} that the plan does not") from None
            mine = block_positions % self.world_size == self.rank
            positions.append(block_positions[mine])
            for column, values in block.items():
                kept.setdefault(column, []).append(np.asarray(values)[mine])
        if seen != len(order):
            raise RuntimeError(f"the training dataset yielded {seen} rows; expected {len(order)}")
        by_position = np.argsort(np.concatenate(positions), kind="stable")
        return {column: np.concatenate(parts)[by_position] for column, parts in kept.items()}

    def _blocks(self) -> Iterator[dict[str, np.ndarray]]:
        """The dataset's blocks: from memory once held, else read (and held if it fits ``hold_bytes``)."""
        if self._held is not None:
            yield from self._held
            return
        blocks: list[dict[str, np.ndarray]] = []
        size = 0
        for block in self.read_rows():
            block = {column: np.asarray(values) for column, values in block.items()}
            size += sum(values.nbytes for values in block.values())
            if size <= self.hold_bytes:  # the running size only grows: once over, no later block is kept
                blocks.append(block)
            yield block
        if size <= self.hold_bytes:
            self._held = blocks
