"""medsd.service as plain functions: request validation, batching, responses, the API-key check, the engine."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from medsd.config import MAX_IMAGES_PER_REQUEST, ModelConfig, ServeConfig, load_config
from medsd.labels import CHEXPERT_OBSERVATIONS
from medsd.provenance import read_provenance
from medsd.service.api import _relative_path, is_authorized
from medsd.service.batching import BatchKey, BatchMerger, GenerationJob, JobResult, count_images, group_jobs, run_batch
from medsd.service.responses import BATCH_SIZE_HEADER, SEED_HEADER, json_body, png_headers
from medsd.service.schema import AdapterInfo, Catalog, GenerateRequest
from medsd.service.validation import InvalidRequest, problems_from_validation_errors, resolve_request

CFG = ServeConfig()
CATALOG = Catalog(
    model="tiny",
    model_hash="0123456789abcdef",
    sizes=[(64, 64)],
    samplers=["ddim", "euler"],
    adapters=[AdapterInfo(name="edema-lora", kind="lora")],
    default_steps=25,
    default_guidance_scale=4.0,
    default_sampler="ddim",
)
KEY = BatchKey(height=64, width=64, steps=3, sampler="ddim", guidance_scale=4.0, negative_prompt="", adapter=None)


def _resolve(**fields) -> GenerationJob:
    return resolve_request(GenerateRequest(**fields), CATALOG, CFG, draw_seed=lambda: 1234)


def _problems(**fields) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as caught:
        _resolve(**fields)
    return {problem.field: problem.message for problem in caught.value.problems}


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def test_labels_become_medsd_prompt_wording_with_defaults():
    job = _resolve(
        labels=["Pleural Effusion", "Cardiomegaly"],
        view="Frontal",
        projection="PA",
        seed=5,
        num_images=3,
        format="json",
    )
    # Findings follow the schema's order, whatever order the request lists them in (prompts.format_prompt).
    assert job.prompt == "a frontal PA chest x-ray showing cardiomegaly and pleural effusion"
    assert job.seeds == (5, 6, 7)
    assert job.key == BatchKey(64, 64, CATALOG.default_steps, "ddim", CATALOG.default_guidance_scale, "", None)


def test_no_finding_and_free_text_prompts():
    assert _resolve(labels=["No Finding"]).prompt == "a chest x-ray with no finding"
    job = _resolve(
        prompt="  a lateral chest x-ray  ",
        negative_prompt=" blurry ",
        sampler="euler",
        steps=7,
        guidance_scale=0.0,
        adapter="edema-lora",
    )
    assert (job.prompt, job.key.negative_prompt, job.key.sampler, job.key.steps) == (
        "a lateral chest x-ray",
        "blurry",
        "euler",
        7,
    )
    assert job.key.guidance_scale == 0.0 and job.key.adapter == "edema-lora"


def test_missing_seed_is_drawn_once_per_request():
    assert _resolve(prompt="a chest x-ray", num_images=2, format="json").seeds == (1234, 1235)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({}, "prompt", "either prompt"),
        ({"prompt": "x", "labels": ["Edema"]}, "prompt", "not both"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * (CFG.max_prompt_chars + 1)}, "prompt", f"at most {CFG.max_prompt_chars}"),
        ({"prompt": "a\x00b"}, "prompt", "U+0000"),
        ({"prompt": "x", "negative_prompt": "y" * (CFG.max_prompt_chars + 1)}, "negative_prompt", "at most"),
        ({"prompt": "x", "view": "Frontal"}, "view", "only applies with labels"),
        ({"labels": ["Edema", "Nonsense"]}, "labels[1]", "unknown observation 'Nonsense'"),
        ({"labels": ["Edema", "Edema"]}, "labels[1]", "given twice"),
        ({"labels": ["No Finding", "Edema"]}, "labels", "cannot be combined"),
        ({"labels": ["Edema"], "view": "Lateral", "projection": "PA"}, "projection", "needs view 'Frontal'"),
        ({"prompt": "x", "num_images": 2}, "format", "use 'json'"),
        ({"prompt": "x", "sampler": "../../etc/passwd"}, "sampler", "not served"),
        ({"prompt": "x", "height": 512}, "height", "expected 64x64"),
        ({"prompt": "x", "width": 32}, "width", "expected 64x64"),
        ({"prompt": "x", "adapter": "/tmp/weights"}, "adapter", "not loaded; expected one of: edema-lora"),
    ],
)
def test_every_problem_names_its_field(fields, field, message):
    problems = _problems(**fields)
    assert field in problems, problems
    assert message in problems[field]


def test_all_problems_are_reported_at_once():
    problems = _problems(prompt="x", view="Frontal", sampler="nope", adapter="nope", width=1)
    assert set(problems) == {"view", "sampler", "adapter", "width"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"num_images": MAX_IMAGES_PER_REQUEST + 1}, "num_images"),
        ({"num_images": "3"}, "num_images"),  # strict: no silent string -> number coercion
        ({"steps": 1.5}, "steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"labels": ["Edema", 3]}, "labels[1]"),
        ({"labels": []}, "labels"),
        ({"view": "Oblique"}, "view"),
        ({"format": "gif"}, "format"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_schema_errors_name_the_field(fields, field):
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate(fields)
    problems = problems_from_validation_errors(caught.value.errors())
    assert [problem.field for problem in problems] == [field]


def test_fastapi_locations_and_bad_json_map_to_fields():
    errors = [
        {"loc": ("body", "labels", 2), "msg": "Input should be a valid string", "type": "string_type", "input": 5},
        {"loc": ("body", 17), "msg": "JSON decode error", "type": "json_invalid", "ctx": {"error": "Expecting ','"}},
        {"loc": ("body",), "msg": "Input should be a valid dictionary", "type": "model_attributes_type"},
    ]
    problems = problems_from_validation_errors(errors)
    assert [str(problem) for problem in problems] == [
        "labels[2]: Input should be a valid string (got 5)",
        "body: not valid JSON (Expecting ',')",
        "body: expected a JSON object (Content-Type: application/json)",
    ]


def test_error_messages_never_echo_huge_inputs():
    problems = _problems(prompt="x", sampler="s" * 60)
    assert len(problems["sampler"]) < 120


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------


def _job(prompt: str, seeds: tuple[int, ...], **key_fields) -> GenerationJob:
    key = BatchKey(**{**KEY.__dict__, **key_fields})
    return GenerationJob(prompt=prompt, seeds=seeds, key=key)


def _fake_sampler(calls: list[tuple[BatchKey, list[str], list[int]]]):
    """Images whose pixels encode their seed and step count, so tests see which went where."""

    def sample_group(key: BatchKey, prompts: list[str], seeds: list[int]) -> np.ndarray:
        calls.append((key, prompts, seeds))
        return np.stack([np.full((key.height, key.width), (seed + key.steps) % 256, np.uint8) for seed in seeds])

    return sample_group


def test_jobs_group_by_shared_settings_in_arrival_order():
    jobs = [_job("a", (1,)), _job("b", (2,), steps=5), _job("c", (3, 4)), _job("d", (5,), negative_prompt="x")]
    assert list(group_jobs(jobs).values()) == [[0, 2], [1], [3]]
    assert count_images(jobs) == 5


def test_run_batch_calls_the_sampler_once_per_group_and_returns_in_job_order():
    jobs = [_job("a", (1,)), _job("b", (2,), steps=5), _job("c", (3, 4))]
    calls: list = []
    results = run_batch(jobs, _fake_sampler(calls), model_hash="feedface")
    assert [(key.steps, prompts, seeds) for key, prompts, seeds in calls] == [
        (3, ["a", "c", "c"], [1, 3, 4]),
        (5, ["b"], [2]),
    ]
    assert [[image.seed for image in result.images] for result in results] == [[1], [2], [3, 4]]
    assert {(result.batch_requests, result.batch_images) for result in results} == {(3, 4)}
    provenance = read_provenance(results[2].images[1].png)
    assert (provenance.prompt, provenance.seed, provenance.steps, provenance.model_hash) == ("c", 4, 3, "feedface")


def test_run_batch_refuses_a_sampler_that_loses_images():
    with pytest.raises(RuntimeError, match="1 images for 2 seeds"):
        run_batch([_job("a", (1, 2))], lambda key, prompts, seeds: np.zeros((1, 64, 64), np.uint8), "h")


# ---------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------


def test_json_body_and_headers_describe_every_image():
    job = _job("a chest x-ray", (9, 10))
    [result] = run_batch([job], _fake_sampler([]), model_hash=CATALOG.model_hash)
    body = json_body(job, result, CATALOG)
    assert [record.seed for record in body.images] == [9, 10]
    record = body.images[1]
    assert record.synthetic is True and record.model_hash == CATALOG.model_hash and record.prompt == "a chest x-ray"
    assert read_provenance(base64.b64decode(record.png_base64)).seed == 10
    headers = png_headers(job, result, CATALOG)
    assert headers[BATCH_SIZE_HEADER] == "1" and headers[SEED_HEADER] == "9"
    assert f"medsd-{CATALOG.model_hash}-seed9.png" in headers["Content-Disposition"]


# ---------------------------------------------------------------------------------------------------------------
# API key, config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, False),
        ({"x-api-key": "s3cret"}, True),
        ({"x-api-key": "s3cre"}, False),
        ({"authorization": "Bearer s3cret"}, True),
        ({"authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}, True),
        ({"authorization": "Basic " + base64.b64encode(b"s3cret:wrong").decode()}, False),
        ({"authorization": "Basic !!!"}, False),
    ],
)
def test_api_key_is_accepted_as_header_bearer_or_basic_password(headers, allowed):
    assert is_authorized(headers, "s3cret") is allowed


def test_health_path_is_found_below_a_route_prefix():
    assert _relative_path({"path": "/guarded/healthz", "root_path": "/guarded"}) == "/healthz"
    assert _relative_path({"path": "/healthz", "root_path": ""}) == "/healthz"


def test_serve_config_rules_name_the_dotted_field():
    cfg = load_config(ServeConfig, None, ["model.model=tiny", "port=9000"])
    assert cfg.host == "127.0.0.1" and cfg.port == 9000
    with pytest.raises(ValueError, match="serve.max_ongoing_requests=4 is below serve.max_batch_images=16"):
        load_config(ServeConfig, None, ["max_ongoing_requests=4"])
    with pytest.raises(ValueError, match="max_batch_images"):
        load_config(ServeConfig, None, [f"max_batch_images={MAX_IMAGES_PER_REQUEST - 1}"])
    with pytest.raises(ValueError, match="did you mean 'api_key_env'"):
        load_config(ServeConfig, None, ["api_key=abc"])


# ---------------------------------------------------------------------------------------------------------------
# Engine on the tiny model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from medsd.service.engine import GenerationEngine

    return GenerationEngine(ServeConfig(model=ModelConfig(cache_dir=str(tiny_model_dir.parent), device="cpu")))


def test_engine_describes_the_tiny_model(engine):
    catalog = engine.describe()
    assert catalog.sizes == [(64, 64)] and "ddim" in catalog.samplers and catalog.adapters == []
    assert len(catalog.model_hash) == 16


def test_an_image_does_not_depend_on_the_batch_it_lands_in(engine):
    alone = _job("a frontal chest x-ray showing edema", (11,))
    crowd = [
        _job("a lateral chest x-ray with no finding", (3, 4)),
        alone,
        _job("a chest x-ray showing cardiomegaly", (5,), sampler="euler"),
    ]
    [by_itself] = engine.run([alone])
    in_a_crowd = engine.run(crowd)
    assert in_a_crowd[1].images == by_itself.images  # same PNG bytes, provenance included
    assert in_a_crowd[0].images[0].png != by_itself.images[0].png


def test_every_label_prompt_is_accepted_by_the_schema():
    for observation in CHEXPERT_OBSERVATIONS:
        assert _resolve(labels=[observation]).prompt.startswith("a chest x-ray")


# ---------------------------------------------------------------------------------------------------------------
# BatchMerger
# ---------------------------------------------------------------------------------------------------------------


def _blocking_run(runs: list[list[str]], release: threading.Event, fail_on: str | None = None):
    """A pipeline stand-in: records each run's prompts; the first run blocks until ``release``."""

    def run(jobs: list[GenerationJob]) -> list[JobResult]:
        runs.append([job.prompt for job in jobs])
        if len(runs) == 1:
            release.wait(timeout=10)
        if fail_on in runs[-1]:
            raise RuntimeError("pipeline failed")
        return [JobResult(images=(), batch_requests=len(jobs), batch_images=count_images(jobs)) for _ in jobs]

    return run


async def _until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition never held")


def test_batch_merger_merges_every_batch_waiting_behind_a_run():
    runs: list[list[str]] = []
    release = threading.Event()

    async def scenario() -> list[list[JobResult]]:
        merger = BatchMerger(_blocking_run(runs, release), max_images=4, linger_s=0.0)
        first = asyncio.create_task(merger.submit([_job("a", (1,))]))
        await _until(lambda: runs)  # "a" holds the pipeline
        waiting = [
            asyncio.create_task(merger.submit(batch))
            for batch in ([_job("b", (2,))], [_job("c", (3,)), _job("d", (4, 5))], [_job("e", (6,))])
        ]
        await asyncio.sleep(0.05)  # the three Serve batches queue behind "a"
        release.set()
        return [await first, *[await task for task in waiting]]

    results = asyncio.run(scenario())
    # b, c and d (4 images) merge into one run; e no longer fits and runs next.
    assert runs == [["a"], ["b", "c", "d"], ["e"]]
    assert [[result.batch_requests for result in batch] for batch in results] == [[1], [3], [3, 3], [1]]


def test_batch_merger_fails_only_the_run_that_failed():
    runs: list[list[str]] = []
    release = threading.Event()

    async def scenario():
        merger = BatchMerger(_blocking_run(runs, release, fail_on="bad"), max_images=1, linger_s=0.0)
        first = asyncio.create_task(merger.submit([_job("a", (1,))]))
        await _until(lambda: runs)
        bad = asyncio.create_task(merger.submit([_job("bad", (2,))]))
        good = asyncio.create_task(merger.submit([_job("good", (3,))]))
        await asyncio.sleep(0.05)
        release.set()
        await first
        with pytest.raises(RuntimeError, match="pipeline failed"):
            await bad
        return await good

    assert asyncio.run(scenario())[0].batch_requests == 1
    assert runs == [["a"], ["bad"], ["good"]]


def test_batch_merger_lingers_for_the_clients_it_just_answered():
    runs: list[list[str]] = []
    release = threading.Event()

    async def scenario() -> None:
        merger = BatchMerger(_blocking_run(runs, release), max_images=3, linger_s=5.0)
        first = asyncio.create_task(merger.submit([_job("a", (1,)), _job("b", (2,))]))
        await _until(lambda: runs)
        left_behind = asyncio.create_task(merger.submit([_job("c", (3,))]))  # would run alone without lingering
        await asyncio.sleep(0.05)
        release.set()
        await first  # a and b are answered; their clients send again at once
        again = asyncio.create_task(merger.submit([_job("a2", (4,)), _job("b2", (5,))]))
        await asyncio.gather(left_behind, again)

    asyncio.run(scenario())
    assert runs == [["a", "b"], ["c", "a2", "b2"]]  # the 5 s linger ends as soon as the run is full


def test_batch_merger_waits_for_a_whole_cohort_even_when_none_is_waiting_yet():
    runs: list[list[str]] = []
    release = threading.Event()
    release.set()

    async def scenario() -> None:
        merger = BatchMerger(_blocking_run(runs, release), max_images=8, linger_s=5.0)
        await merger.submit([_job("a", (1,)), _job("b", (2,))])
        # Both clients send again, the second a moment later: without the linger "a2" would run alone.
        again = asyncio.create_task(merger.submit([_job("a2", (3,))]))
        await asyncio.sleep(0.05)
        await asyncio.gather(again, merger.submit([_job("b2", (4,))]))

    asyncio.run(scenario())
    assert runs == [["a", "b"], ["a2", "b2"]]  # the 5 s linger ends when the two images of the last run are back


def test_a_lone_request_after_idle_does_not_linger():
    runs: list[list[str]] = []
    release = threading.Event()
    release.set()

    async def scenario() -> float:
        merger = BatchMerger(_blocking_run(runs, release), max_images=8, linger_s=30.0)
        started = time.perf_counter()
        await merger.submit([_job("a", (1,))])
        await merger.submit([_job("b", (2,))])
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 5.0
    assert runs == [["a"], ["b"]]
