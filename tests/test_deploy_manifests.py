"""deploy/: the KubeRay manifests parsed and checked offline (no cluster, no KubeRay CRD schema here), for what
would break them on a real cluster: the v1 API and the fields KubeRay requires, rayVersion equal to the Ray
medsd runs, one image built from deploy/Dockerfile, entrypoints that name jobs, flags and configs that exist
and validate, the shared volume mounted where the configs write, clusters big enough for the work they are
given, and a RayService whose serveConfigV2 is serve/config.yaml."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from pydantic import BaseModel

from medsd.config import EvaluateConfig, GenerateConfig, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAY_VERSION = "2.60.0"
IMAGE_ROOT = "/home/ray/medsd"  # where deploy/Dockerfile puts the checkout (its WORKDIR)
SHARED_MOUNT = "/mnt/shared"
JOB_CONFIGS: dict[str, type[BaseModel]] = {
    "jobs/train.py": TrainConfig,
    "jobs/generate.py": GenerateConfig,
    "jobs/evaluate.py": EvaluateConfig,
}
RAY_JOBS = {"train": "rayjob-train.yaml", "generate": "rayjob-generate.yaml", "evaluate": "rayjob-evaluate.yaml"}
RAY_SERVICE = "rayservice.yaml"
SHARED_STORAGE = "shared-storage.yaml"
QUANTITY = re.compile(r"^(\d+(\.\d+)?)(m|[KMGTPE]i?)?$")


def _manifest(name: str) -> dict[str, Any]:
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]
    assert len(documents) == 1, f"deploy/{name}: expected one document, got {len(documents)}"
    return documents[0]


def _ray_manifests() -> dict[str, dict[str, Any]]:
    return {name: _manifest(name) for name in [*RAY_JOBS.values(), RAY_SERVICE]}


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """Head group first, then the worker groups."""
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for group in _groups(_cluster_spec(manifest)) for c in group["template"]["spec"]["containers"]]


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _worker_capacity(manifest: dict[str, Any]) -> list[tuple[float, float]]:
    """(CPUs, GPUs) Ray sees on each worker pod at the groups' maxReplicas (KubeRay derives them from limits)."""
    pods = []
    for group in _cluster_spec(manifest).get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group["rayStartParams"]
        cpus = _cpus(params.get("num-cpus", limits["cpu"]))
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        pods += [(cpus, gpus)] * group["maxReplicas"]
    return pods


def _fits(bundles: list[tuple[float, float]], pods: list[tuple[float, float]]) -> bool:
    """First-fit decreasing of (CPU, GPU) bundles onto pods, as Ray's placement would at best."""
    free = [list(pod) for pod in pods]
    for cpus, gpus in sorted(bundles, key=lambda bundle: (bundle[1], bundle[0]), reverse=True):
        pod = next((p for p in free if p[0] >= cpus and p[1] >= gpus), None)
        if pod is None:
            return False
        pod[0] -= cpus
        pod[1] -= gpus
    return True


def _job(name: str) -> tuple[str, str | None, list[str], BaseModel]:
    """A RayJob's (script in the repo, config in the repo, overrides, resolved config)."""
    argv = shlex.split(_manifest(RAY_JOBS[name])["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(f"{IMAGE_ROOT}/"), argv[:2]
    script = argv[1].removeprefix(f"{IMAGE_ROOT}/")
    config, overrides, rest = None, [], argv[2:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--config":
            assert value.startswith(f"{IMAGE_ROOT}/"), f"{name}: --config {value} is not in the image"
            config = value.removeprefix(f"{IMAGE_ROOT}/")
        else:
            assert flag == "--set", f"{name}: unexpected argument {flag}"
            overrides.append(value)
    resolved = load_config(JOB_CONFIGS[script], REPO / config if config else None, overrides)
    return script, config, overrides, resolved


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


# ---------------------------------------------------------------------------------------------------------------
# Structure: what the KubeRay v1 CRDs require
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*RAY_JOBS.values(), RAY_SERVICE])
def test_kuberay_v1_structure(name: str) -> None:
    manifest = _manifest(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == ("RayService" if name == RAY_SERVICE else "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    spec = manifest["spec"]
    if manifest["kind"] == "RayJob":
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
        assert spec["shutdownAfterJobFinishes"] is True, "a finished job must not keep its GPU nodes"
    else:
        assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    cluster = _cluster_spec(manifest)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head schedules nothing, as in cluster.yaml"
    group_names = [group["groupName"] for group in cluster["workerGroupSpecs"]]
    assert group_names and len(set(group_names)) == len(group_names)
    for group in _groups(cluster):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        pod = group["template"]["spec"]
        assert pod["containers"], "a group without containers"
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["name"] and container["image"]
            resources = container["resources"]
            assert resources["limits"] == resources["requests"], f"{container['name']}: Ray sizes itself by limits"
            for quantity in resources["limits"].values():
                assert QUANTITY.match(str(quantity)), f"{container['name']}: bad quantity {quantity!r}"
            unresolved = {m["name"] for m in container.get("volumeMounts", [])} - volumes
            assert not unresolved, f"{container['name']}: volumeMounts without a volume: {unresolved}"
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_ray_version_everywhere_is_the_installed_one() -> None:
    installed = ray.__version__.split(".")[:2]
    for name, manifest in _ray_manifests().items():
        version = _cluster_spec(manifest)["rayVersion"]
        assert version == RAY_VERSION, f"deploy/{name}: rayVersion {version!r}"
        assert version.split(".")[:2] == installed, f"deploy/{name}: Ray {version} but medsd runs {ray.__version__}"
    base = re.search(r"^FROM (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert base and base.group(1) == f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def test_every_pod_runs_the_one_medsd_image() -> None:
    images = {c["image"] for manifest in _ray_manifests().values() for c in _containers(manifest)}
    assert len(images) == 1, f"manifests disagree on the image: {images}"
    (image,) = images
    assert f"-ray{RAY_VERSION}-" in image.rsplit(":", 1)[1], f"{image}: its tag names another Ray"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {image} " in dockerfile, "deploy/Dockerfile's build command tags another image"
    assert re.search(rf"^WORKDIR {re.escape(IMAGE_ROOT)}$", dockerfile, re.MULTILINE)
    copied = set(re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.MULTILINE))
    for folder in ("medsd", "jobs", "serve", "configs"):
        assert folder in copied, f"deploy/Dockerfile does not copy {folder}/ into the image"
    assert re.search(rf"^ENV PYTHONPATH={re.escape(IMAGE_ROOT)}\b", dockerfile, re.MULTILINE), "serve.app importable"


def test_every_pod_mounts_the_shared_volume() -> None:
    claim = _manifest(SHARED_STORAGE)
    assert (claim["apiVersion"], claim["kind"]) == ("v1", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on many nodes write to it at once"
    for name, manifest in _ray_manifests().items():
        for group in _groups(_cluster_spec(manifest)):
            pod = group["template"]["spec"]
            shared = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")}
            assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] in shared} == {
                claim["metadata"]["name"]
            }, name
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts.get(SHARED_MOUNT) in shared, f"deploy/{name}: {container['name']} lacks {SHARED_MOUNT}"
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("MEDSD_CACHE_DIR", "").startswith(f"{SHARED_MOUNT}/"), "tiny model built once, shared"


# ---------------------------------------------------------------------------------------------------------------
# RayJobs: entrypoints that run, on clusters that hold them, chained train -> generate -> evaluate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RAY_JOBS))
def test_rayjob_entrypoint_names_a_job_its_flags_and_a_valid_config(name: str) -> None:
    script, config, _, resolved = _job(name)
    assert script == f"jobs/{name}.py"
    assert (REPO / script).is_file(), f"{script} does not exist"
    # The flags the script really takes: ask it, as a user would.
    help_text = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    declared = set(re.findall(r"(--[a-z][a-z-]*)", help_text))
    used = {arg for arg in shlex.split(_manifest(RAY_JOBS[name])["spec"]["entrypoint"]) if arg.startswith("--")}
    assert used <= declared, f"{script} does not take {used - declared}"
    if config is not None:
        assert (REPO / config).is_file(), f"{config} does not exist"
    # Data, weights and outputs are on the shared volume; nothing points into a pod's own disk.
    paths = [s for s in _strings(resolved.model_dump(mode="json")) if s.startswith("/")]
    assert paths, f"{name}: no absolute path at all: where do its outputs go?"
    outside = [path for path in paths if not path.startswith(f"{SHARED_MOUNT}/")]
    assert not outside, f"deploy/{RAY_JOBS[name]}: {outside} are not on the shared volume {SHARED_MOUNT}"


def test_the_jobs_chain_train_generate_evaluate() -> None:
    *_, train = _job("train")
    *_, generate = _job("generate")
    *_, evaluate = _job("evaluate")
    assert generate.model.model == f"{train.out}/model", "generate does not use the model the train job writes"
    assert evaluate.synthetic[0] == generate.out, "evaluate does not score the set the generate job writes"
    assert set(evaluate.labels) <= set(generate.labels) <= set(train.labels)


def test_each_rayjob_cluster_holds_its_work() -> None:
    *_, train = _job("train")
    *_, generate = _job("generate")
    *_, evaluate = _job("evaluate")
    scaling = train.scaling
    work = {
        "train": [(scaling.cpus_per_worker, scaling.gpus_per_worker if scaling.use_gpu else 0.0)] * scaling.num_workers,
        "generate": [(generate.cpus_per_actor, generate.num_gpus_per_actor)] * generate.num_actors,
        "evaluate": [(evaluate.cpus_per_arm, evaluate.gpus_per_arm)] * len(evaluate.arms),
    }
    for name, bundles in work.items():
        pods = _worker_capacity(_manifest(RAY_JOBS[name]))
        assert _fits(bundles, pods), f"deploy/{RAY_JOBS[name]}: {bundles} do not fit the worker pods {pods}"
        assert any(gpus > 0 for _, gpus in bundles), f"{name}: runs on CPU on a GPU cluster"


def test_fit_check_rejects_work_larger_than_the_cluster() -> None:
    assert _fits([(8, 1)] * 8, [(44, 4), (44, 4)])
    assert not _fits([(8, 1)] * 9, [(44, 4), (44, 4)])
    assert not _fits([(48, 1)], [(44, 4)])


# ---------------------------------------------------------------------------------------------------------------
# RayService: serveConfigV2 is serve/config.yaml
# ---------------------------------------------------------------------------------------------------------------


def test_serve_config_v2_is_serve_config_yaml() -> None:
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    manifest = _manifest(RAY_SERVICE)
    cluster = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert cluster["applications"] == local["applications"]
    # The one intended difference: proxies take traffic from KubeRay's Service, not only from loopback.
    assert local["http_options"]["host"] == "127.0.0.1"
    assert cluster["http_options"] == {**local["http_options"], "host": "0.0.0.0"}
    assert {k: v for k, v in cluster.items() if k != "http_options"} == {
        k: v for k, v in local.items() if k != "http_options"
    }
    port = cluster["http_options"]["port"]
    for group in _groups(_cluster_spec(manifest)):
        for container in group["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert ports.get("serve") == port, f"{container['name']}: KubeRay's serve Service targets port 'serve'"


def test_rayservice_workers_hold_every_replica() -> None:
    manifest = _manifest(RAY_SERVICE)
    applications = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    bundles = []
    for application in applications:
        for deployment in application["deployments"]:
            options = deployment.get("ray_actor_options", {})
            replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
            bundles += [(options.get("num_cpus", 1.0), options.get("num_gpus", 0.0))] * replicas
    pods = _worker_capacity(manifest)
    assert _fits(bundles, pods), f"deploy/{RAY_SERVICE}: replicas {bundles} do not fit the worker pods {pods}"
