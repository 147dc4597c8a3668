"""The serve app end to end: a real local Ray, real `serve.run`, real HTTP on 127.0.0.1, the tiny model.

Two deployments share one Ray for the whole module (each deploy costs ~12 s): the main app at / with no
API key, and a guarded app at /guarded with an API key, a queue small enough to overflow and a batch
window long enough that requests sent together always meet in one batch, however loaded the machine is.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsd.config import MAX_GUIDANCE_SCALE, MAX_IMAGES_PER_REQUEST, ModelConfig, ServeConfig
from medsd.labels import CHEXPERT_OBSERVATIONS, NO_FINDING, PROJECTIONS, VIEWS
from medsd.prompts import PromptParts, format_prompt
from medsd.provenance import read_provenance
from medsd.service.schema import MAX_SEED

REPO = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = REPO / "serve" / "config.yaml"
GUARD_KEY_ENV = "MEDSD_TEST_SERVE_API_KEY"
GUARD_KEY = "test-key-0f3c"
OPEN_KEY_ENV = "MEDSD_TEST_SERVE_NO_KEY"  # never set: the main app runs without a key
GUARDED_PREFIX = "/guarded"
FAST_STEPS = 2  # every request that omits steps costs two denoising steps
HTTP_TIMEOUT_S = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Guarded app: a replica holds one full batch and a few more requests wait; the rest must be refused. Serve counts
# requests still being assigned as queued, so a queue smaller than a burst refuses some of it even when idle.
GUARDED_BATCH_IMAGES = MAX_IMAGES_PER_REQUEST
GUARDED_QUEUE = 4
GUARDED_RETRY_AFTER_S = 2
GUARDED_BATCH_WAIT_S = 2.0
CLI_START_TIMEOUT_S = 180  # a local Ray plus a deploy: ~25 s on an idle 2-core machine
CLI_STOP_TIMEOUT_S = 60
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@dataclass(frozen=True)
class Served:
    base: str  # the main app
    guarded: str  # the guarded app
    model_hash: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[Served]:
    import ray
    from ray import serve

    from medsd.service.deployments import build_app
    from medsd.service.server import run_server

    # Replicas inherit the environment Ray starts with: set the guarded key before ray.init.
    os.environ[GUARD_KEY_ENV] = GUARD_KEY
    os.environ.pop(OPEN_KEY_ENV, None)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, object_store_memory=150 * 1024**2, include_dashboard=False)
    model = ModelConfig(cache_dir=str(tiny_model_dir.parent), device="cpu")
    main = ServeConfig(model=model, port=_free_port(), api_key_env=OPEN_KEY_ENV, default_steps=FAST_STEPS)
    guarded = main.model_copy(
        update={
            "api_key_env": GUARD_KEY_ENV,
            "max_batch_images": GUARDED_BATCH_IMAGES,
            "max_ongoing_requests": GUARDED_BATCH_IMAGES,
            "max_queued_requests": GUARDED_QUEUE,
            "retry_after_s": GUARDED_RETRY_AFTER_S,
            "batch_wait_timeout_s": GUARDED_BATCH_WAIT_S,
            "num_cpus": 1.0,  # beside the main generator's 2 on the 4 logical CPUs
        }
    )
    try:
        run_server(main, blocking=False)
        serve.run(build_app(guarded), name="medsd-guarded", route_prefix=GUARDED_PREFIX, blocking=False)
        base = f"http://127.0.0.1:{main.port}"
        model_hash = requests.get(f"{base}/v1/models", timeout=HTTP_TIMEOUT_S).json()["model_hash"]
        yield Served(base=base, guarded=base + GUARDED_PREFIX, model_hash=model_hash)
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(GUARD_KEY_ENV, None)


def _generate(url: str, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, headers=headers, timeout=HTTP_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------------
# `medsd serve` as a user runs it (first in the module: its own Ray, before the shared one starts)
# ---------------------------------------------------------------------------------------------------------------


def test_cli_refuses_a_bad_config_naming_the_field():
    from click.testing import CliRunner

    from medsd.cli import main

    result = CliRunner().invoke(main, ["serve", "--set", "max_ongoing_requests=1"])
    assert result.exit_code == 2
    assert "serve.max_ongoing_requests=1 is below serve.max_batch_images" in result.output


def test_cli_names_a_port_that_is_already_taken(tiny_model_dir: Path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "medsd", "serve", "--port", str(port), "--model", "tiny"]
        command += ["--set", f"model.cache_dir={tiny_model_dir.parent}"]
        env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray would start: the port is checked first
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_serves_until_interrupted(tiny_model_dir: Path):
    port = _free_port()
    command = [sys.executable, "-m", "medsd", "serve", "--port", str(port), "--model", "tiny"]
    command += ["--set", f"model.cache_dir={tiny_model_dir.parent}", "--set", f"api_key_env={OPEN_KEY_ENV}"]
    server = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + CLI_START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).ok:
                    break
            except requests.RequestException:  # not listening yet, or still deploying
                pass
            time.sleep(1)
        assert server.poll() is None, server.stderr.read().decode()[-3000:]
        answer = _generate(f"http://127.0.0.1:{port}", {"labels": ["Edema"], "seed": 1, "steps": 2})
        assert answer.status_code == 200 and read_provenance(answer.content).seed == 1
    finally:
        server.send_signal(signal.SIGINT)  # what Ctrl-C sends: Serve and the local Ray shut down
        try:
            server.wait(timeout=CLI_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def test_png_generation_carries_synthetic_provenance(served):
    answer = _generate(served.base, {"labels": ["Cardiomegaly"], "view": "Frontal", "seed": 21, "steps": 3})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert answer.content.startswith(PNG_SIGNATURE)
    provenance = read_provenance(answer.content)
    assert provenance.prompt == "a frontal chest x-ray showing cardiomegaly"
    assert (provenance.seed, provenance.steps, provenance.model_hash) == (21, 3, served.model_hash)
    assert answer.headers["X-Synthetic"] == "true" and answer.headers["X-Seed"] == "21"
    assert "seed21.png" in answer.headers["Content-Disposition"]


def test_json_generation_returns_every_image_with_its_metadata(served):
    body = {"prompt": "a lateral chest x-ray", "num_images": 3, "seed": 40, "guidance_scale": 2.5, "format": "json"}
    answer = _generate(served.base, body)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    assert payload["model"] == "tiny"
    assert [image["seed"] for image in payload["images"]] == [40, 41, 42]
    for image in payload["images"]:
        assert image["synthetic"] is True and image["model_hash"] == served.model_hash
        assert (image["prompt"], image["steps"], image["guidance_scale"]) == ("a lateral chest x-ray", FAST_STEPS, 2.5)
        assert read_provenance(base64.b64decode(image["png_base64"])).seed == image["seed"]


def test_same_request_and_seed_give_the_same_bytes(served):
    body = {"labels": ["Edema"], "seed": 5, "steps": 3}
    first, second = _generate(served.base, body), _generate(served.base, body)
    assert first.content == second.content
    assert _generate(served.base, {**body, "seed": 6}).content != first.content
    # The JSON form carries the very same PNG.
    as_json = _generate(served.base, {**body, "format": "json"}).json()
    assert base64.b64decode(as_json["images"][0]["png_base64"]) == first.content


def test_concurrent_requests_are_served_in_one_batch(served):
    key = {"X-API-Key": GUARD_KEY}
    together = [
        {"labels": ["Edema"], "seed": 1, "steps": 3},
        {"labels": ["Cardiomegaly"], "seed": 2, "steps": 3},
        {"labels": ["Edema"], "seed": 3, "steps": 4},  # another group of the same Serve batch
        {"labels": ["Atelectasis"], "seed": 4, "steps": 4, "num_images": 2, "format": "json"},
    ]
    alone = _generate(served.guarded, together[0], headers=key)
    assert alone.headers["X-Batch-Size"] == "1"
    # Sent at once, they arrive well within the guarded app's batch window and run as one batch.
    with ThreadPoolExecutor(len(together)) as pool:
        answers = list(pool.map(lambda body: _generate(served.guarded, body, headers=key), together))
    assert [answer.status_code for answer in answers] == [200] * len(together)
    assert {answer.headers["X-Batch-Size"] for answer in answers} == {str(len(together))}
    assert {answer.headers["X-Batch-Images"] for answer in answers} == {str(len(together) + 1)}
    assert answers[0].content == alone.content  # batching never changes an image


# ---------------------------------------------------------------------------------------------------------------
# Read-only routes
# ---------------------------------------------------------------------------------------------------------------


def test_labels_models_health_and_docs(served):
    labels = requests.get(f"{served.base}/v1/labels", timeout=HTTP_TIMEOUT_S).json()
    assert labels["observations"] == list(CHEXPERT_OBSERVATIONS) and labels["views"] == list(VIEWS)
    models = requests.get(f"{served.base}/v1/models", timeout=HTTP_TIMEOUT_S).json()
    assert models["model"] == "tiny" and models["sizes"] == [[64, 64]] and models["adapters"] == []
    assert requests.get(f"{served.base}/healthz", timeout=HTTP_TIMEOUT_S).json() == {"status": "ok"}
    openapi = requests.get(f"{served.base}/openapi.json", timeout=HTTP_TIMEOUT_S).json()
    assert {"/v1/generate", "/v1/labels", "/v1/models", "/healthz"} <= set(openapi["paths"])
    assert requests.get(f"{served.base}/docs", timeout=HTTP_TIMEOUT_S).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Malformed input: always 4xx naming the field, never 5xx
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"labels": ["Edema"], "num_images": 9}, 422, "num_images"),
        ({"labels": ["Edema"], "steps": 151}, 422, "steps"),
        ({"labels": ["Edema"], "guidance_scale": 20.5}, 422, "guidance_scale"),
        ({"labels": ["Edema"], "seed": "7"}, 422, "seed"),
        ({"labels": ["Edema", "Bogus"]}, 422, "labels[1]"),
        ({"labels": ["Edema"], "path": "/etc/passwd"}, 422, "path"),
        ({"prompt": "x" * 501}, 422, "prompt"),
        ({"prompt": "x", "num_images": 2}, 422, "format"),
        ({"prompt": "x", "sampler": "plms"}, 422, "sampler"),
        ({"prompt": "x", "height": 512, "width": 512}, 422, "height"),
        ({"prompt": "x", "adapter": "../lora"}, 422, "adapter"),
        ({}, 422, "prompt"),
        (["not", "an", "object"], 422, "body"),
    ],
)
def test_malformed_json_gets_4xx_naming_the_field(served, body, status, field):
    answer = _generate(served.base, body)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert field in [problem["field"] for problem in error["errors"]]
    assert field in error["detail"]


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b'{"labels": ["Edema"', "application/json", 422),
        (b"labels=Edema", "application/x-www-form-urlencoded", 422),
        (b"\xff\xfe\x00garbage", "application/json", 422),
        (b'{"prompt": "' + b"x" * 20_000 + b'"}', "application/json", 413),
    ],
)
def test_malformed_bodies_get_4xx(served, data, content_type, status):
    answer = requests.post(
        f"{served.base}/v1/generate", data=data, headers={"Content-Type": content_type}, timeout=HTTP_TIMEOUT_S
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["errors"][0]["field"] == "body"


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
# Valid values stay cheap (few images, few steps); everything else is fair game.
REQUEST_FIELDS = {
    "prompt": st.text(max_size=520) | ANY_JSON,
    "labels": st.lists(st.sampled_from(CHEXPERT_OBSERVATIONS) | st.text(max_size=12), max_size=4) | ANY_JSON,
    "view": st.sampled_from(VIEWS) | ANY_JSON,
    "projection": st.sampled_from(PROJECTIONS) | ANY_JSON,
    "negative_prompt": st.text(max_size=40) | ANY_JSON,
    "num_images": st.integers(-3, 2) | st.integers(min_value=MAX_IMAGES_PER_REQUEST + 1) | ANY_JSON,
    "steps": st.integers(-3, 2) | st.integers(min_value=151) | ANY_JSON,
    "guidance_scale": st.floats(-1, 25) | st.floats() | ANY_JSON,
    "seed": st.integers(min_value=-(2**70), max_value=2**70) | ANY_JSON,
    "sampler": st.sampled_from(["ddim", "euler", "dpm++"]) | st.text(max_size=12),
    "height": st.sampled_from([64, 0, -64, 10**9]) | ANY_JSON,
    "width": st.sampled_from([64, 1, 4097]) | ANY_JSON,
    "adapter": st.none() | st.text(max_size=12),
    "format": st.sampled_from(["png", "json"]) | st.text(max_size=6),
    "unknown_field": ANY_JSON,
}


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.fixed_dictionaries({}, optional=REQUEST_FIELDS))
def test_fuzzed_requests_never_get_5xx(served, body):
    # allow_nan: NaN and Infinity are what a sloppy client sends; the server must refuse them with 422.
    data = json.dumps(body, allow_nan=True).encode()
    answer = requests.post(
        f"{served.base}/v1/generate", data=data, headers={"Content-Type": "application/json"}, timeout=HTTP_TIMEOUT_S
    )
    assert answer.status_code < 500, (body, answer.status_code, answer.text)
    if answer.status_code == 200:
        png = (
            answer.content
            if body.get("format", "png") == "png"
            else base64.b64decode(answer.json()["images"][0]["png_base64"])
        )
        assert read_provenance(png).model_hash == served.model_hash
    else:
        assert answer.json()["errors"], answer.text


FINDINGS = [observation for observation in CHEXPERT_OBSERVATIONS if observation != NO_FINDING]
VALID_REQUESTS = st.fixed_dictionaries(
    {"labels": st.lists(st.sampled_from(FINDINGS), min_size=1, max_size=3, unique=True)},
    optional={
        "view": st.sampled_from(VIEWS),
        "seed": st.integers(0, MAX_SEED),
        "guidance_scale": st.floats(0, MAX_GUIDANCE_SCALE),
        "sampler": st.sampled_from(["ddim", "euler", "dpm++"]),
        "num_images": st.integers(1, 2),
        "negative_prompt": st.text(st.characters(codec="utf-8", categories=["L", "N", "Zs"]), max_size=20),
    },
).map(lambda body: {**body, "steps": 1, "format": "json"})


@settings(max_examples=15, deadline=None, derandomize=True)
@given(body=VALID_REQUESTS)
def test_valid_requests_always_succeed(served, body):
    answer = _generate(served.base, body)
    assert answer.status_code == 200, (body, answer.text)
    images = answer.json()["images"]
    assert len(images) == body.get("num_images", 1)
    first_seed = images[0]["seed"]
    assert [image["seed"] for image in images] == list(range(first_seed, first_seed + len(images)))
    parts = PromptParts(findings=tuple(f for f in FINDINGS if f in body["labels"]), view=body.get("view"))
    assert images[0]["prompt"] == format_prompt(parts)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzzed_raw_bodies_get_4xx(served, data, content_type):
    answer = requests.post(
        f"{served.base}/v1/generate", data=data, headers={"Content-Type": content_type}, timeout=HTTP_TIMEOUT_S
    )
    assert 400 <= answer.status_code < 500, (data, answer.text)


def test_server_stays_up_after_abuse(served):
    assert requests.get(f"{served.base}/healthz", timeout=HTTP_TIMEOUT_S).status_code == 200
    assert _generate(served.base, {"labels": ["No Finding"], "seed": 1}).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Protection: API key, overload
# ---------------------------------------------------------------------------------------------------------------


def test_api_key_is_required_everywhere_but_healthz(served):
    url = served.guarded
    assert requests.get(f"{url}/healthz", timeout=HTTP_TIMEOUT_S).status_code == 200
    for path in ("/", "/v1/labels", "/v1/models", "/docs", "/openapi.json"):
        answer = requests.get(f"{url}{path}", timeout=HTTP_TIMEOUT_S)
        assert answer.status_code == 401, path
        assert answer.headers["WWW-Authenticate"].startswith("Basic")
    assert _generate(url, {"labels": ["Edema"]}).status_code == 401
    assert _generate(url, {"labels": ["Edema"]}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert requests.get(f"{url}/v1/labels", headers={"X-API-Key": GUARD_KEY}, timeout=HTTP_TIMEOUT_S).ok
    assert requests.get(f"{url}/v1/models", auth=("anyone", GUARD_KEY), timeout=HTTP_TIMEOUT_S).ok
    bearer = {"Authorization": f"Bearer {GUARD_KEY}"}
    answer = _generate(url, {"labels": ["Edema"], "seed": 3}, headers=bearer)
    assert answer.status_code == 200 and read_provenance(answer.content).seed == 3
    # Without a key in its environment, the main app is open.
    assert requests.get(f"{served.base}/v1/labels", timeout=HTTP_TIMEOUT_S).ok


def test_overload_beyond_the_queue_gets_503_then_recovers(served):
    key = {"X-API-Key": GUARD_KEY}
    capacity = GUARDED_BATCH_IMAGES + GUARDED_QUEUE  # requests the guarded generator holds at once
    # Three times what it holds, each slow enough that no batch finishes while the burst is still arriving.
    bodies = [{"prompt": "a chest x-ray", "seed": n, "steps": 30, "guidance_scale": 1.0} for n in range(3 * capacity)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: _generate(served.guarded, body, headers=key), bodies))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {200, 503}, statuses
    refused = next(answer for answer in answers if answer.status_code == 503)
    assert refused.headers["Retry-After"] == str(GUARDED_RETRY_AFTER_S)
    assert "retry" in refused.json()["detail"]
    recovered = _generate(served.guarded, {"labels": ["Edema"], "seed": 8}, headers=key)
    assert recovered.status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# The web page in headless Chromium
# ---------------------------------------------------------------------------------------------------------------


def _chromium(tmp_path: Path):
    from selenium import webdriver

    # A missing browser fails the test: the web page is a feature, not an optional extra.
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing: .ci/run installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The network is closed: without these, Chromium keeps dialling Google services and stalls.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def test_web_page_generate_click_shows_an_image(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium(tmp_path)
    try:
        browser.get(served.base + "/")
        wait = WebDriverWait(browser, HTTP_TIMEOUT_S)
        wait.until(lambda driver: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        browser.find_element(By.CSS_SELECTOR, "input[name=label][value='Pleural Effusion']").click()
        for field, value in (("seed", "77"), ("steps", "3"), ("count", "2")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        loaded = "return [...document.querySelectorAll('#results img')].map(i => i.complete ? i.naturalWidth : 0)"
        wait.until(lambda driver: (widths := driver.execute_script(loaded)) and all(widths))
        assert browser.execute_script(loaded) == [64, 64]
        captions = [element.text for element in browser.find_elements(By.TAG_NAME, "figcaption")]
        assert "77" in captions[0] and "78" in captions[1] and "pleural effusion" in captions[0]
        assert served.model_hash in captions[0] and "true" in captions[0]
        download = browser.find_element(By.LINK_TEXT, "Download PNG")
        assert download.get_attribute("download") == f"medsd-{served.model_hash}-seed77.png"
    finally:
        browser.quit()


# ---------------------------------------------------------------------------------------------------------------
# The deploy config
# ---------------------------------------------------------------------------------------------------------------


def test_deploy_config_validates_against_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(DEPLOY_CONFIG.read_text()))
    assert config.http_options.host == "127.0.0.1"
    [application] = config.applications
    assert application.import_path == "serve.app:app"


def test_deploy_config_matches_a_fresh_serve_build(tmp_path):
    built = tmp_path / "built.yaml"
    serve_cli = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    subprocess.run(
        [serve_cli, "build", "serve.app:app", "-o", str(built)], cwd=REPO, check=True, timeout=120, capture_output=True
    )
    fresh = yaml.safe_load(built.read_text())
    # The two deliberate edits serve/config.yaml's header explains.
    fresh["http_options"]["host"] = "127.0.0.1"
    fresh["applications"][0]["name"] = "medsd"
    assert yaml.safe_load(DEPLOY_CONFIG.read_text()) == fresh


def test_app_builder_takes_a_serve_config():
    import inspect

    from serve.app import app_builder

    assert inspect.signature(app_builder).parameters["args"].annotation is ServeConfig
