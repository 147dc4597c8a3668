"""cluster.yaml through Ray's own cluster-launcher validation (the JSON schema ray ships, after the defaults
`ray up` fills in; no cloud call), plus what medsd needs of it: a head that schedules nothing, GPU worker types
with declared resources, a Ray 2.60 image, medsd installed from the synced checkout, and the shared storage the
example configs write to."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from medsd.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_MOUNT = "/mnt/shared"
CHECKOUT = "/home/ray/medsd"
LARGEST_TRAINING = REPO / "configs" / "train-chexpert-dreambooth-sd15.yaml"


def _cluster() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it calls the cloud: defaults merged in, then the schema and node-type rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}


def test_ray_accepts_the_cluster_config() -> None:
    prepared = _validated(_cluster())
    assert prepared["cluster_name"] == "medsd"
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        (("docker", "imgae"), "rayproject/ray:2.60.0-py311-gpu", "'imgae' was unexpected"),
        (("available_node_types", "gpu_1x_a10g", "resources", "GPU"), 0.5, "is not of type 'integer'"),
        (("head_node_type",), "gpu_head", "must be one of `available_node_types`"),
    ],
    ids=["unknown-key", "fractional-gpu", "unknown-head-type"],
)
def test_ray_validation_rejects_a_broken_copy(path: tuple[str, ...], value: Any, complaint: str) -> None:
    """The validation above is real: one wrong field in a copy of cluster.yaml fails it."""
    broken = _cluster()
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(complaint)):
        _validated(broken)


def test_the_head_schedules_nothing_and_workers_declare_gpus() -> None:
    prepared = _validated(_cluster())
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    workers = _worker_types(prepared)
    assert workers, "no worker node type"
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, f"{name}: declare its GPUs (the autoscaler plans with them)"
        assert node["resources"].get("CPU", 0) >= 1, f"{name}: declare its CPUs"
        assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"], name
    assert sum(node["max_workers"] for node in workers.values()) <= prepared["max_workers"]


def test_the_image_runs_the_installed_ray_version_on_gpus() -> None:
    image = _cluster()["docker"]["image"]
    repository, tag = image.rsplit(":", 1)
    assert repository == "rayproject/ray"
    assert tag.startswith(f"{ray.__version__}-"), f"{image} does not run Ray {ray.__version__}"
    assert tag.endswith("-gpu")


def test_setup_installs_medsd_from_the_synced_checkout() -> None:
    config = _cluster()
    assert Path(config["file_mounts"][CHECKOUT]) == Path("."), "cluster.yaml syncs the repository root"
    assert ".gitignore" in config["rsync_filter"], "outputs and .venv stay out of the sync"
    assert any(re.fullmatch(rf"pip install .*{re.escape(CHECKOUT)}", cmd) for cmd in config["setup_commands"])
    assert f"--env=PYTHONPATH={CHECKOUT}" in config["docker"]["run_options"], "serve.app must be importable"


def test_shared_storage_is_mounted_in_every_container() -> None:
    config = _cluster()
    assert f"--volume={SHARED_MOUNT}:{SHARED_MOUNT}" in config["docker"]["run_options"]
    mount_commands = " ".join(config["initialization_commands"])
    assert "mount -t nfs4" in mount_commands and mount_commands.rstrip().endswith(SHARED_MOUNT)


def _absolute_paths(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [path for value in node.values() for path in _absolute_paths(value)]
    if isinstance(node, list):
        return [path for value in node for path in _absolute_paths(value)]
    return [node] if isinstance(node, str) and node.startswith("/") else []


CONFIG_FILES = sorted(path.name for path in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "name",
    CONFIG_FILES,
)
def test_config_paths_are_on_the_shared_mount(name: str) -> None:
    """An absolute path in an example config is on the storage every node mounts (relative ones are local demos)."""
    paths = _absolute_paths(yaml.safe_load((REPO / "configs" / name).read_text()))
    outside = [path for path in paths if not path.startswith(f"{SHARED_MOUNT}/")]
    assert not outside, f"configs/{name}: {outside} are not on the shared mount {SHARED_MOUNT}"


def test_the_largest_training_config_fits_the_gpu_workers() -> None:
    prepared = _validated(_cluster())
    scaling = load_config(TrainConfig, LARGEST_TRAINING).scaling
    assert scaling.use_gpu
    workers = _worker_types(prepared).values()
    # One Train worker is one bundle {CPU, GPU}: it must fit on a node, and all of them on the cluster at most.
    fitting = [
        node
        for node in workers
        if node["resources"]["CPU"] >= scaling.cpus_per_worker and node["resources"]["GPU"] >= scaling.gpus_per_worker
    ]
    assert fitting, f"no node type holds a worker of {scaling.cpus_per_worker} CPUs and {scaling.gpus_per_worker} GPU"
    slots = sum(
        node["max_workers"]
        * min(node["resources"]["GPU"] // scaling.gpus_per_worker, node["resources"]["CPU"] // scaling.cpus_per_worker)
        for node in fitting
    )
    assert slots >= scaling.num_workers, f"{LARGEST_TRAINING.name} asks {scaling.num_workers} workers; room for {slots}"
