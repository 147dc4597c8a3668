"""medsd.train.batches: a deterministic, resumable split of each epoch over ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medsd.train.batches import SAMPLE_ID, BatchStream, DataPosition, epoch_order


def _rows(sample_ids: np.ndarray, block: int = 7, reverse: bool = False):
    """A reader yielding the dataset in shuffled-looking blocks, with a payload column."""
    ids = sample_ids[::-1] if reverse else sample_ids

    def read():
        for start in range(0, len(ids), block):
            chunk = ids[start : start + block]
            yield {SAMPLE_ID: chunk, "payload": chunk * 10}

    return read


def _stream(sample_ids, rank=0, world_size=1, batch_size=4, seed=0, reverse=False) -> BatchStream:
    return BatchStream(
        _rows(sample_ids, reverse=reverse),
        sample_ids=sample_ids,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def test_epoch_order_is_a_seeded_permutation() -> None:
    ids = np.arange(50)
    first = epoch_order(ids, seed=3, epoch=0)
    assert sorted(first.tolist()) == ids.tolist()
    np.testing.assert_array_equal(first, epoch_order(ids, seed=3, epoch=0))
    assert not np.array_equal(first, epoch_order(ids, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_order(ids, seed=4, epoch=0))


def test_ranks_split_each_global_batch_and_cover_the_epoch_once() -> None:
    ids = np.arange(42)
    streams = [_stream(ids, rank=r, world_size=3) for r in range(3)]
    assert streams[0].batches_per_epoch == 3  # 42 // (4 x 3): the last partial global batch is dropped
    per_rank = [list(itertools.islice(s.iterate(DataPosition(0, 0)), 3)) for s in streams]
    seen = []
    for step in range(3):
        batches = [per_rank[r][step] for r in range(3)]
        global_ids = batches[0].global_sample_ids
        assert all(np.array_equal(b.global_sample_ids, global_ids) for b in batches)  # every rank agrees
        mine = np.concatenate([b.rows[SAMPLE_ID] for b in batches])
        assert sorted(mine.tolist()) == sorted(global_ids.tolist())
        for b in batches:
            np.testing.assert_array_equal(b.rows["payload"], b.rows[SAMPLE_ID] * 10)  # columns stay aligned
        seen += global_ids.tolist()
    assert len(seen) == len(set(seen)) == 36
    np.testing.assert_array_equal(seen, epoch_order(ids, 0, 0)[:36])


def test_resuming_at_a_position_continues_exactly_and_crosses_epochs() -> None:
    ids = np.arange(3, 40, 2)  # ids with gaps, as after skipped images
    uninterrupted = [b.rows[SAMPLE_ID].tolist() for b in itertools.islice(_stream(ids).iterate(DataPosition(0, 0)), 12)]
    per_epoch = _stream(ids).batches_per_epoch
    start = DataPosition.after(7, per_epoch)
    assert start == DataPosition(1, 7 - per_epoch)
    resumed = [b.rows[SAMPLE_ID].tolist() for b in itertools.islice(_stream(ids, reverse=True).iterate(start), 5)]
    assert resumed == uninterrupted[7:]


def test_too_few_samples_and_foreign_ids_are_errors() -> None:
    with pytest.raises(ValueError, match=r"10 training samples cannot fill one step of batch_size=4 x 3 workers"):
        _stream(np.arange(10), world_size=3)
    stream = BatchStream(_rows(np.arange(12)), sample_ids=np.arange(1, 13), batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match="sample id 0 that the plan does not"):
        next(stream.iterate(DataPosition(0, 0)))


@pytest.mark.parametrize(("hold_bytes", "expected_reads"), [(1 << 20, 1), (100, 4), (0, 4)])
def test_a_small_dataset_is_read_once_and_batches_do_not_change(hold_bytes, expected_reads) -> None:
    ids = np.arange(40)  # 40 x 2 int64 columns = 640 bytes: held under 1 MiB, re-read each epoch under 100 bytes
    read = _rows(ids)
    reads = []

    def counting_read():
        reads.append(1)
        return read()

    held = BatchStream(counting_read, sample_ids=ids, batch_size=4, rank=1, world_size=2, seed=0, hold_bytes=hold_bytes)
    plain = _stream(ids, rank=1, world_size=2)
    epochs = 4 * held.batches_per_epoch  # four epochs
    batches = itertools.islice(held.iterate(DataPosition(0, 0)), epochs)
    expected = itertools.islice(plain.iterate(DataPosition(0, 0)), epochs)
    for a, b in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(a.rows[SAMPLE_ID], b.rows[SAMPLE_ID])
        np.testing.assert_array_equal(a.rows["payload"], b.rows[SAMPLE_ID] * 10)
    assert len(reads) == expected_reads
