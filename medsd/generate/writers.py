"""Dataset writers: rows -> parquet shards under ``data/`` (hive-partitioned by label), and ``train.csv``.

A shard's parquet file appears, atomically, only once every one of its images exists, so "shard file
present and its PNGs verified" is exactly "these rows are done" for a resumed run. Rows are written in
plan order with a fixed schema, so an interrupted-then-resumed run writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medsd.generate.plan import (
    ADAPTER,
    GUIDANCE_SCALE,
    ID,
    MODEL_HASH,
    NEGATIVE_PROMPT,
    PLAN_INDEX,
    PNG_BYTES,
    PROMPT,
    SAMPLER,
    SEED,
    SHA256,
    SHARD,
    STEPS,
    SYNTHETIC,
    GenerationPlan,
    Shard,
)
from medsd.generate.storage import OutputFolder
from medsd.labels import (
    AGE_COLUMN,
    CHEXPERT,
    CHEXPERT_OBSERVATIONS,
    PATH_COLUMN,
    PROJECTION_COLUMN,
    SEX_COLUMN,
    VIEW_COLUMN,
)

logger = logging.getLogger(__name__)

TRAIN_CSV = "train.csv"
IMAGE = "image"  # {bytes, path}: the struct Hugging Face `datasets` and Ray Data read as an image
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
BLANKABLE_TEXT = (SEX_COLUMN, PROJECTION_COLUMN, ADAPTER)  # "" in a plan row means a blank cell
BLANKABLE_NUMBERS = (AGE_COLUMN, *CHEXPERT_OBSERVATIONS)  # and so does NaN

# One row per image; the label column is the hive partition (data/label=<slug>/), not stored in the files.
DATASET_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (PATH_COLUMN, pa.string()),
        (SEX_COLUMN, pa.string()),
        (AGE_COLUMN, pa.int32()),
        (VIEW_COLUMN, pa.string()),
        (PROJECTION_COLUMN, pa.string()),
        *[(observation, pa.float32()) for observation in CHEXPERT_OBSERVATIONS],
        (PROMPT, pa.string()),
        (NEGATIVE_PROMPT, pa.string()),
        (SEED, pa.int64()),
        (GUIDANCE_SCALE, pa.float64()),
        (STEPS, pa.int32()),
        (SAMPLER, pa.string()),
        (MODEL_HASH, pa.string()),
        (ADAPTER, pa.string()),
        (SYNTHETIC, pa.bool_()),
        (SHA256, pa.string()),
        (IMAGE, IMAGE_TYPE),
    ]
)


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: its rows, PNG bytes, parquet checksum and a digest of its ids and image checksums."""

    shard: Shard
    image_bytes: int
    file_sha256: str
    images_digest: str


class ShardWriter:
    """Collects actor output rows per shard and writes each shard's parquet file once it is complete.

    Rows may arrive in any order; only incomplete shards stay in memory.
    """

    def __init__(self, folder: OutputFolder, shards: Iterable[Shard]) -> None:
        self._folder = folder
        self._pending = {shard.name: shard for shard in shards}
        self._parts: dict[str, list[pa.Table]] = {}
        self._counts: dict[str, int] = {}

    @property
    def open_shards(self) -> int:
        return len(self._parts)

    def add(self, rows: pa.Table) -> list[ShardRecord]:
        """Take a batch of actor output; returns the shards this batch completed (now written)."""
        finished = []
        for name in pc.unique(rows[SHARD]).to_pylist():
            part = rows.filter(pc.equal(rows[SHARD], name))
            self._parts.setdefault(name, []).append(part)
            self._counts[name] = self._counts.get(name, 0) + part.num_rows
            shard = self._pending[name]
            if self._counts[name] == shard.n_rows:
                rows_of_shard = pa.concat_tables(self._parts.pop(name), promote_options="permissive")
                finished.append(self._write(shard, rows_of_shard))
                del self._pending[name], self._counts[name]
        return finished

    def check_all_written(self) -> None:
        """RuntimeError naming the shards whose rows never all arrived (a bug or a lost batch)."""
        if self._pending:
            missing = {name: shard.n_rows - self._counts.get(name, 0) for name, shard in self._pending.items()}
            raise RuntimeError(f"generation ended with rows missing from shards {missing}")

    def _write(self, shard: Shard, rows: pa.Table) -> ShardRecord:
        table = dataset_table(rows.sort_by(PLAN_INDEX))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        self._folder.write_atomic(shard.parquet_path, data)
        return record_of(shard, table, hashlib.sha256(data).hexdigest())


def dataset_table(rows: pa.Table) -> pa.Table:
    """Actor output rows -> the dataset's columns and types (DATASET_SCHEMA), blanks as nulls."""
    columns = {}
    for field in DATASET_SCHEMA:
        if field.name == IMAGE:
            png_bytes = rows[PNG_BYTES].combine_chunks().cast(pa.binary())
            paths = rows[PATH_COLUMN].combine_chunks().cast(pa.string())
            columns[IMAGE] = pa.StructArray.from_arrays([png_bytes, paths], fields=list(IMAGE_TYPE))
            continue
        column = rows[field.name]
        if field.name in BLANKABLE_TEXT:
            column = pc.if_else(pc.equal(column.cast(pa.string()), ""), None, column.cast(pa.string()))
        if field.name in BLANKABLE_NUMBERS:
            column = pc.if_else(pc.is_nan(column), None, column)  # NaN in a plan row is a blank cell
        columns[field.name] = column.cast(field.type)
    return pa.table(columns, schema=DATASET_SCHEMA)


def record_of(shard: Shard, table: pa.Table, file_sha256: str) -> ShardRecord:
    """The ShardRecord of a shard whose dataset ``table`` has been written with checksum ``file_sha256``."""
    images_digest = hashlib.sha256()
    for identifier, checksum in zip(table[ID].to_pylist(), table[SHA256].to_pylist(), strict=True):
        images_digest.update(f"{identifier} {checksum}\n".encode())
    image_bytes = pc.sum(pc.binary_length(pc.struct_field(table[IMAGE], "bytes"))).as_py() or 0
    return ShardRecord(shard, int(image_bytes), file_sha256, images_digest.hexdigest())


def verify_shard(folder: OutputFolder, plan: GenerationPlan, shard: Shard) -> ShardRecord | None:
    """The record of a shard an earlier run finished: parquet present and readable with the planned ids in
    order, and every PNG present with the bytes its row's checksum names. None when any of that fails."""
    data = folder.read(shard.parquet_path)
    if data is None:
        return None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError):
        logger.warning("%s: unreadable parquet; its shard will be finished again", shard.parquet_path)
        return None
    planned_ids = [row[ID] for row in plan.rows[shard.start : shard.stop]]
    if table.schema != DATASET_SCHEMA or table[ID].to_pylist() != planned_ids:
        logger.warning("%s: not the planned rows; its shard will be finished again", shard.parquet_path)
        return None
    for path, checksum in zip(table[PATH_COLUMN].to_pylist(), table[SHA256].to_pylist(), strict=True):
        png = folder.read(path)
        if png is None or hashlib.sha256(png).hexdigest() != checksum:
            logger.warning("%s: missing or changed; its shard will be finished again", path)
            return None
    return record_of(shard, table, hashlib.sha256(data).hexdigest())


def write_train_csv(folder: OutputFolder, plan: GenerationPlan) -> str:
    """``train.csv`` in CheXpert format (Path relative to the folder), rows in plan order, streamed shard by
    shard from the parquet files. Returns its sha256."""
    digest = hashlib.sha256()
    with folder.open_atomic(TRAIN_CSV) as stream:
        for number, shard in enumerate(plan.shards):
            data = folder.read(shard.parquet_path)
            table = pq.read_table(io.BytesIO(data), columns=list(CHEXPERT.columns))
            frame = table.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)  # ages stay whole: 68, not 68.0
            text = frame.to_csv(index=False, header=number == 0, lineterminator="\n").encode()
            stream.write(text)
            digest.update(text)
    return digest.hexdigest()
