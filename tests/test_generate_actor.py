"""medsd.generate.actor: GeneratorActor called in-process on plan batches (no Ray needed to call it)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from medsd.config import GenerateConfig
from medsd.generate.actor import ROWS, GeneratorActor
from medsd.generate.plan import ID, PNG_BYTES, REUSED, SHA256, build_plan
from medsd.models import load_pipeline, model_hash
from medsd.provenance import read_provenance
from medsd.sampling import PromptEmbeddingCache, sample_images

STEPS = 2


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    cfg = GenerateConfig(
        out=str(tmp_path_factory.mktemp("actor-out")),
        model={"model": "tiny", "cache_dir": str(tiny_model_dir.parent), "device": "cpu"},
        labels=["Cardiomegaly"],
        per_label=3,
        steps=STEPS,
        guidance_scales=[2.0, 6.0],
        batch_size=2,
        cpus_per_actor=1,
    )
    plan = build_plan(cfg, model_hash(tiny_model_dir))
    batches = [batch for shard in plan.shards for batch in plan.batches(shard)]
    return cfg, batches, GeneratorActor(cfg.model_dump(mode="json"))


def _items(batches: list[list[dict]]) -> pa.Table:
    return pa.Table.from_pylist([{ROWS: batch} for batch in batches])


def _file(cfg: GenerateConfig, row: dict):
    return open(f"{cfg.out}/{row['Path']}", "rb")


def test_plan_batches_become_png_files_with_provenance_and_rows(setup):
    cfg, batches, actor = setup
    out = actor(_items(batches))  # several plan batches in one call: each is its own pipeline call
    rows = [row for batch in batches for row in batch]
    assert out[ID].to_pylist() == [row[ID] for row in rows]
    assert not any(out[REUSED].to_pylist())
    for row, png, checksum in zip(rows, out[PNG_BYTES].to_pylist(), out[SHA256].to_pylist(), strict=True):
        with _file(cfg, row) as handle:
            assert handle.read() == png and hashlib.sha256(png).hexdigest() == checksum
        provenance = read_provenance(png)
        assert (provenance.seed, provenance.guidance_scale, provenance.steps) == (row["seed"], row["guidance_scale"], 2)
        assert provenance.model_hash == row["model_hash"] and provenance.prompt == row["prompt"]


def test_a_batch_with_a_missing_image_is_rendered_whole_and_reproduces_its_bytes(setup):
    cfg, batches, actor = setup
    first = actor(_items(batches[:1]))
    first_pngs = first[PNG_BYTES].to_pylist()
    missing = batches[0][1]
    (open(f"{cfg.out}/{missing['Path']}", "wb")).close()  # an empty file: as if the write never happened
    again = actor(_items(batches[:1]))
    assert again[REUSED].to_pylist() == [True, False]
    assert again[PNG_BYTES].to_pylist() == first_pngs
    with _file(cfg, missing) as handle:
        assert handle.read() == first_pngs[1]


def test_damaged_or_foreign_files_are_rendered_again(setup):
    cfg, batches, actor = setup
    first = actor(_items(batches[:2])).to_pylist()
    damaged, foreign = batches[0][0], batches[1][0]
    with open(f"{cfg.out}/{damaged['Path']}", "wb") as handle:
        handle.write(first[0][PNG_BYTES][:40])  # truncated
    with open(f"{cfg.out}/{foreign['Path']}", "wb") as handle:
        handle.write(first[1][PNG_BYTES])  # a valid PNG of another row
    again = actor(_items(batches[:2])).to_pylist()
    assert [row[REUSED] for row in again] == [row[ID] not in (damaged[ID], foreign[ID]) for row in again]
    assert [row[PNG_BYTES] for row in again] == [row[PNG_BYTES] for row in first]


def test_cached_prompt_embeddings_give_the_pipelines_own_pixels(setup):
    """The actor's PromptEmbeddingCache (medsd.sampling) must not change a single pixel."""
    cfg, _batches, _actor = setup
    pipe = load_pipeline(cfg.model, cfg.sampler)
    prompts = ["a frontal PA chest x-ray showing edema", "a lateral chest x-ray with no finding"] * 2
    seeds = [1, 2, 3, 4]
    cache = PromptEmbeddingCache(max_prompts=1)  # evictions on every call must not matter either
    for guidance_scale, negative_prompt in ((4.0, None), (4.0, "lateral"), (1.0, None)):
        direct = sample_images(pipe, prompts, seeds, steps=STEPS, guidance_scale=guidance_scale,
                               negative_prompt=negative_prompt)  # fmt: skip
        cached = sample_images(pipe, prompts, seeds, steps=STEPS, guidance_scale=guidance_scale,
                               negative_prompt=negative_prompt, embeddings=cache)  # fmt: skip
        np.testing.assert_array_equal(direct, cached)
    assert len(cache) == 1
