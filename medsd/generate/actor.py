"""GeneratorActor: a pipeline inside a Ray Data actor turning plan batches into PNG files and dataset rows."""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from medsd.config import GenerateConfig
from medsd.generate.plan import (
    ADAPTER,
    GUIDANCE_SCALE,
    MODEL_HASH,
    NEGATIVE_PROMPT,
    PNG_BYTES,
    PROMPT,
    REUSED,
    SAMPLER,
    SEED,
    SHA256,
    STEPS,
)
from medsd.generate.storage import OutputFolder
from medsd.labels import PATH_COLUMN
from medsd.models import load_pipeline
from medsd.provenance import Provenance, encode_png, read_provenance
from medsd.sampling import PromptEmbeddingCache, sample_images

logger = logging.getLogger(__name__)

ROWS = "rows"  # the one column of a Ray item: the rows of one plan batch


def threads_for(cfg: GenerateConfig) -> int:
    """torch threads of a CPU actor: its reserved CPUs (part of the content: thread count moves the last bits)."""
    return max(1, round(cfg.cpus_per_actor))


class GeneratorActor:
    """Loads the pipeline once; each call renders plan batches (one pipeline call each), writes each PNG
    atomically at its row's Path and returns the rows with PNG bytes, sha256 and whether the file was kept.

    PNGs already at their Paths are kept when they decode and their provenance matches the row, so a retried
    task or a resumed run never keeps a wrong image; a batch with any image missing is rendered whole, since
    an image's last bits depend on the batch it is rendered in.
    """

    def __init__(self, config: dict) -> None:
        cfg = GenerateConfig.model_validate(config)
        if cfg.num_gpus_per_actor == 0:
            # Ray sets OMP_NUM_THREADS to the actor's CPUs, but torch may have read it earlier; say it outright.
            torch.set_num_threads(threads_for(cfg))
        self._pipe = load_pipeline(cfg.model, cfg.sampler)
        self._folder = OutputFolder(cfg.out)
        self._embeddings: dict[str, PromptEmbeddingCache] = {}  # per adapter: its text encoder may differ
        self._uses_adapters = bool(cfg.label_adapters)

    def __call__(self, items: pa.Table) -> pa.Table:
        """(plan batches, column ``rows``) -> one row per image, with PNG_BYTES, SHA256 and REUSED added."""
        batches = items[ROWS]
        return pa.concat_tables(
            [self._render_batch(pa.Table.from_struct_array(batches[i].values)) for i in range(len(batches))]
        )

    def _render_batch(self, rows: pa.Table) -> pa.Table:
        paths = rows[PATH_COLUMN].to_pylist()
        provenances = [_provenance(row) for row in rows.select(_PROVENANCE_COLUMNS).to_pylist()]
        pngs = [self._verified_png(path, provenance) for path, provenance in zip(paths, provenances, strict=True)]
        reused = [png is not None for png in pngs]
        if not all(reused):
            images = self._sample(rows, provenances)  # (N, H, W) uint8
            for i, image in enumerate(images):
                if pngs[i] is None:
                    pngs[i] = encode_png(image, provenances[i])
                    self._folder.write_atomic(paths[i], pngs[i])
        return (
            rows.append_column(PNG_BYTES, pa.array(pngs, pa.binary()))
            .append_column(SHA256, pa.array([hashlib.sha256(png).hexdigest() for png in pngs], pa.string()))
            .append_column(REUSED, pa.array(reused, pa.bool_()))
        )

    def _sample(self, rows: pa.Table, provenances: list[Provenance]) -> np.ndarray:
        # A plan batch lies within one shard: one label (so one adapter) and one guidance scale.
        first = provenances[0]
        adapter = pc.unique(rows[ADAPTER]).to_pylist()
        if len(adapter) != 1 or len({(p.guidance_scale, p.steps, p.negative_prompt) for p in provenances}) != 1:
            raise RuntimeError("a plan batch mixes adapters, guidance scales, steps or negative prompts")
        if self._uses_adapters:
            from medsd.adapters import activate_adapter

            activate_adapter(self._pipe, adapter[0] or None)
        return sample_images(
            self._pipe,
            [p.prompt for p in provenances],
            [p.seed for p in provenances],
            steps=first.steps,
            guidance_scale=first.guidance_scale,
            negative_prompt=first.negative_prompt,
            embeddings=self._embeddings.setdefault(adapter[0], PromptEmbeddingCache()),
        )

    def _verified_png(self, relative: str, expected: Provenance) -> bytes | None:
        """The PNG already at ``relative`` if it decodes fully and carries ``expected``; else None."""
        data = self._folder.read(relative)
        if data is None:
            return None
        try:
            Image.open(io.BytesIO(data)).load()
            if read_provenance(data) == expected:
                return data
        except (OSError, ValueError, SyntaxError):  # PIL raises all three for damaged files
            pass
        logger.warning("%s: existing file is damaged or was made differently; rendering it again", relative)
        return None


_PROVENANCE_COLUMNS = [PROMPT, SEED, GUIDANCE_SCALE, STEPS, SAMPLER, MODEL_HASH, NEGATIVE_PROMPT]


def _provenance(row: dict) -> Provenance:
    return Provenance(
        prompt=row[PROMPT],
        seed=int(row[SEED]),
        guidance_scale=float(row[GUIDANCE_SCALE]),
        steps=int(row[STEPS]),
        sampler=row[SAMPLER],
        model_hash=row[MODEL_HASH],
        negative_prompt=row[NEGATIVE_PROMPT],
    )
