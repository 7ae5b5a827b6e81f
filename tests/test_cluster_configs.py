"""cluster/: launcher YAMLs against Ray's own autoscaler schema, KubeRay manifests against
the fields their CRDs require, and the security and version rules every config must keep."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import _get_excludes
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml")
IMAGE = re.compile(r"^campar-ray:(?P<ray>\d+\.\d+\.\d+)-gpu$")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_the_autoscaler_schema(name):
    # What `ray up` does before it touches the cloud: fill in defaults, then validate.
    validate_config(prepare_config(_load(name)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_the_schema_check_would_catch_a_misspelt_key(name):
    config = _load(name)
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8  # typo for max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_secure_and_matches_this_ray(name):
    config = _load(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head  # reached over `ray attach -p 8265` only
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert IMAGE.match(config["docker"]["image"])["ray"] == ray.__version__
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head only schedules
    assert max(t.get("max_workers", 0) for t in types.values()) == config["max_workers"]


def test_dockerfile_builds_on_the_ray_image_of_this_version():
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)[1]
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"


def _require(node: dict, path: str, *keys: str) -> None:
    missing = [key for key in keys if key not in node]
    assert not missing, f"{path} lacks required field(s) {missing}"


def _check_ray_cluster_spec(spec: dict, path: str) -> list[dict]:
    """The fields KubeRay's RayCluster CRD (ray.io/v1) requires; returns every pod spec."""
    _require(spec, path, "headGroupSpec", "rayVersion")
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    _require(head, f"{path}.headGroupSpec", "template", "rayStartParams")
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a public endpoint
    pods = [head["template"]["spec"]]
    for index, group in enumerate(spec.get("workerGroupSpecs", [])):
        where = f"{path}.workerGroupSpecs[{index}]"
        _require(group, where, "groupName", "template", "rayStartParams")
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        pods.append(group["template"]["spec"])
    for pod in pods:
        assert pod["containers"], f"{path}: a pod template without containers"
        for container in pod["containers"]:
            _require(container, f"{path} container", "name", "image")
            assert IMAGE.match(container["image"])["ray"] == ray.__version__
    return pods


def test_kuberay_raycluster_has_the_required_fields():
    manifest = _load("kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    _require(manifest["metadata"], "metadata", "name")
    pods = _check_ray_cluster_spec(manifest["spec"], "spec")
    gpu = pods[1]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_kuberay_rayjob_runs_the_pipeline_on_a_valid_cluster():
    manifest = _load("kuberay/rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    _require(spec, "spec", "entrypoint", "rayClusterSpec")
    assert spec["entrypoint"].startswith("python jobs/pipeline.py --config configs/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("s3://")
    _check_ray_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")


def test_the_manifest_check_would_catch_a_misplaced_template():
    # The mistake this check exists for: `template` indented into rayStartParams.
    spec = copy.deepcopy(_load("kuberay/raycluster.yaml")["spec"])
    spec["headGroupSpec"]["rayStartParams"]["template"] = spec["headGroupSpec"].pop("template")
    with pytest.raises(AssertionError, match="headGroupSpec lacks"):
        _check_ray_cluster_spec(spec, "spec")


def test_runtime_env_ships_the_package_but_not_local_state():
    # Ray's own matcher for working_dir excludes (gitignore semantics).
    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    root = CLUSTER.parent
    excluded = _get_excludes(root, excludes)
    for shipped in ("campar_ray/data/manifest.py", "jobs/pipeline.py", "configs/pa100k.yaml"):
        assert not excluded(root / shipped), shipped
    for local in (".venv/bin/python", "runs/demo/run/config.yaml", "data/manifest.parquet"):
        assert excluded(root / local), local
