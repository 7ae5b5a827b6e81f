"""cluster/: launcher YAMLs against Ray's own autoscaler schema, KubeRay manifests against
the fields their CRDs require, and the security and version rules every config must keep.
Then the shipped pieces against each other: every recipe of configs/ planned by `campar
doctor`'s planner on every shipped cluster (cold, as `ray up` or `kubectl apply` starts it),
the RayJob's entrypoint parsed by the pipeline's own parser and found in the image."""

from __future__ import annotations

import copy
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import _get_excludes
from ray.autoscaler._private.util import prepare_config, validate_config

from campar_ray.config import load_config
from campar_ray.preflight import (
    ClusterShape,
    RunSections,
    doctor_report,
    findings,
    kuberay_shape,
    launcher_shape,
    plan,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RECIPES = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
IMAGE_HOME = "/home/ray/campar-ray"
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
    _check_ray_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")


def test_the_rayjob_runs_what_the_image_carries_without_an_upload():
    spec = _load("kuberay/rayjob.yaml")["spec"]
    python, script, *argv = shlex.split(spec["entrypoint"])
    assert (python, script) == ("python", f"{IMAGE_HOME}/jobs/pipeline.py")
    # Every file the entrypoint names is one the Dockerfile copies into the image.
    copied = re.findall(r"^COPY \S+ (\S+) \./(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert ("jobs", "jobs") in copied and ("configs", "configs") in copied
    assert re.search(rf"^WORKDIR {IMAGE_HOME}$", (CLUSTER / "Dockerfile").read_text(), re.M)
    args = _pipeline_args(argv)
    assert args.config.startswith(f"{IMAGE_HOME}/configs/")
    assert (ROOT / args.config.removeprefix(f"{IMAGE_HOME}/")).is_file()
    assert "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    # The bucket paths of the job: nothing on a node's own disk.
    config = load_config(ROOT / args.config.removeprefix(f"{IMAGE_HOME}/"), args.overrides)
    assert config.data.manifest.startswith("s3://") and config.run.dir.startswith("s3://")
    assert args.root.startswith("s3://") and "--pack" in args.prepare_args


def test_every_ray_pod_reads_the_bucket_as_the_shipped_service_account():
    account = _load("kuberay/serviceaccount.yaml")
    assert (account["apiVersion"], account["kind"]) == ("v1", "ServiceAccount")
    annotations = account["metadata"]["annotations"]
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(annotations)
    for name, spec in _kuberay_specs().items():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod.get("serviceAccountName") == account["metadata"]["name"], name


def _pipeline_args(argv: list[str]):
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import pipeline
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return pipeline.parse_args(argv)


def _kuberay_specs() -> dict[str, dict]:
    return {
        "kuberay/raycluster.yaml": _load("kuberay/raycluster.yaml")["spec"],
        "kuberay/rayjob.yaml": _load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"],
    }


def _shipped_clusters() -> dict[str, ClusterShape]:
    """Every shipped cluster as it starts: the launcher's head alone, KubeRay's replicas."""
    shapes = {name: launcher_shape(_load(name)) for name in LAUNCHER_CONFIGS}
    shapes.update({name: kuberay_shape(spec) for name, spec in _kuberay_specs().items()})
    return shapes


def test_the_shipped_clusters_are_read_as_they_start():
    shapes = _shipped_clusters()
    gpu_node = {"CPU": 8.0, "GPU": 1.0}
    for name in LAUNCHER_CONFIGS:
        assert shapes[name].nodes == ({"CPU": 0.0},)  # the head, no workers yet
        ((kind),) = shapes[name].node_types
        assert (kind.resources, kind.max_count) == (gpu_node, 8)
    assert shapes["kuberay/rayjob.yaml"].nodes == ({"CPU": 0.0}, *[gpu_node] * 4)
    assert shapes["kuberay/raycluster.yaml"].node_types[0].resources == gpu_node


def _recipe(name: str, overrides: list[str] = ()) -> RunSections:
    """A shipped recipe as a job on a cluster runs it: manifest and run directory in a bucket
    (the sections the planner reads)."""
    stem = name.removesuffix(".yaml")
    bucket = [
        f"data.manifest=s3://my-bucket/campar/{stem}/manifest",
        f"run.dir=s3://my-bucket/campar/runs/{stem}",
    ]
    return RunSections.of(load_config(ROOT / "configs" / name, [*bucket, *overrides]))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_names_the_cluster_it_is_for(name):
    comments = [line for line in (ROOT / "configs" / name).read_text().splitlines()]
    assert any(line.startswith("# cluster: ") for line in comments), name


GPU_RUN = ["train.use_gpu=true", "train.num_workers=4", "train.cpus_per_worker=4"]
"""What configs/reference.yaml says to add on the GPU clusters."""


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_fits_every_shipped_cluster_with_cpus_left_for_decoding(name):
    variants = [_recipe(name)] + ([_recipe(name, GPU_RUN)] if name == "reference.yaml" else [])
    for cluster, shape in _shipped_clusters().items():
        for config in variants:
            report, fits = doctor_report(config, shape)
            assert fits and "ok: nothing found" in report, f"{name} on {cluster}:\n{report}"
            placed = plan(config, shape)
            assert placed.data_cpus > 0 and placed.decode_fit == placed.need.decode_tasks
            assert max(placed.add.values(), default=0) <= 8


@pytest.mark.parametrize("name", ["pa100k.yaml", "peta.yaml", "rap1.yaml"])
def test_a_recipes_local_paths_are_refused_on_every_shipped_cluster(name):
    local = RunSections.of(load_config(ROOT / "configs" / name))  # data/<name>.parquet, runs/<name>
    for cluster, shape in _shipped_clusters().items():
        errors = [f.message for f in findings(local, shape) if f.level == "error"]
        assert [e.split(" ", 1)[0] for e in errors] == ["data.manifest", "run.dir"], cluster
        assert all("s3:// or gs://" in e and "storage.shared_mounts" in e for e in errors)


def test_the_readme_job_line_parses_and_plans():
    text = (ROOT / "README.md").read_text()
    # The first pipeline command of the README, its continued lines included.
    line = re.search(r"python jobs/pipeline\.py (?:[^\n]*\\\n)*[^\n]*", text)[0]
    args = _pipeline_args(shlex.split(line.replace("\\\n", " "))[2:])
    assert args.prepare and args.root.startswith("s3://") and args.prepare_args == "--pack"
    config = RunSections.of(load_config(ROOT / args.config, args.overrides))
    shape = launcher_shape(_load("aws.yaml"))
    assert [f for f in findings(config, shape) if f.level == "error"] == []


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
    local_state = (
        ".venv/bin/python",
        "runs/demo/run/config.yaml",
        "data/manifest.parquet",
        "models/peta/weights.pt",  # a bundle (`campar bundle --out models/peta`), tens of MiB
    )
    for local in local_state:
        assert excluded(root / local), local
