"""Static checks of cluster/: launcher YAML, KubeRay manifests, runtime_env, cluster run config.

Nothing here starts Ray or calls a cloud API; each check is shown to fail on a broken copy.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import _zip_files
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from urbancross.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
TRAIN_GPU = CLUSTER / "configs" / "train_gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"

# Required fields, from KubeRay's API types (json tags without `omitempty`, which is what
# controller-gen turns into the CRD's `required:` lists in
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml):
#   ray-operator/apis/ray/v1/raycluster_types.go  RayClusterSpec.headGroupSpec;
#     HeadGroupSpec.{rayStartParams, template}; WorkerGroupSpec.{groupName, minReplicas,
#     maxReplicas, rayStartParams, template} (replicas is optional there; we pin it anyway)
#   ray-operator/controllers/ray/utils/validation.go  ValidateRayClusterSpec: head and every
#     worker group need at least one container; ValidateRayJobSpec: one of rayClusterSpec or
#     clusterSelector; ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes;
#     metadata.name must be a DNS-1035 label.
#   k8s core/v1 PodSpec.containers and Container.name are required; KubeRay needs image too.
HEAD_REQUIRED = ("rayStartParams", "template.spec.containers")
WORKER_REQUIRED = ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template.spec.containers")
CONTAINER_REQUIRED = ("name", "image")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def lookup(obj, dotted: str):
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    """Every required RayClusterSpec field that is absent (or an empty container list)."""
    problems = []
    groups = [(f"{where}.headGroupSpec", spec.get("headGroupSpec"), HEAD_REQUIRED)]
    groups += [
        (f"{where}.workerGroupSpecs[{i}]", g, WORKER_REQUIRED) for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]
    for name, group, required in groups:
        if not isinstance(group, dict):
            problems.append(name)
            continue
        problems += [f"{name}.{field}" for field in required if lookup(group, field) in (None, [])]
        for j, container in enumerate(lookup(group, "template.spec.containers") or []):
            problems += [f"{name}.containers[{j}].{f}" for f in CONTAINER_REQUIRED if not container.get(f)]
    return problems


def manifest_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion")
    if not DNS_1035.match(lookup(doc, "metadata.name") or ""):
        problems.append("metadata.name")
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        problems += cluster_spec_problems(spec, "spec")
    elif doc.get("kind") == "RayJob":
        if not spec.get("entrypoint"):
            problems.append("spec.entrypoint")
        if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
            problems.append("spec.rayClusterSpec|clusterSelector")
        if spec.get("rayClusterSpec") is not None:
            problems += cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("spec.shutdownAfterJobFinishes")
    else:
        problems.append("kind")
    return problems


def cluster_spec_of(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(spec: dict):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --------------------------------------------------------------------------- launcher


def validate_launcher(config: dict) -> dict:
    """What `ray up` does before touching AWS: fill defaults, then check against ray's schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_yaml_validates_against_ray_schema():
    prepared = validate_launcher(load(LAUNCHER))
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert {name: t["resources"].get("GPU", 0) for name, t in types.items()} == {"head": 0, "gpu-1x": 1, "gpu-4x": 4}
    assert types["head"]["max_workers"] == 0  # filled by prepare_config: the head never scales
    assert prepared["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "pip install -q ~/urbancross" in prepared["worker_setup_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in (prepared["head_start_ray_commands"][1], prepared["worker_start_ray_commands"][1]))


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c["available_node_types"]["gpu-1x"].update(resource={"GPU": 1}), jsonschema.ValidationError),
        (lambda c: c["available_node_types"]["gpu-1x"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
        (lambda c: c["docker"].update(imagee="x"), jsonschema.ValidationError),
        (lambda c: c.update(head_node_type="ray.head.default"), ValueError),
        (lambda c: c.update(max_workers=1) or c["available_node_types"]["gpu-1x"].update(min_workers=2), ValueError),
    ],
    ids=["unknown-node-key", "fractional-gpu", "unknown-docker-key", "missing-head-type", "min-over-max"],
)
def test_broken_launcher_yaml_fails(break_it, error):
    config = load(LAUNCHER)
    break_it(config)
    with pytest.raises(error):
        validate_launcher(config)


# --------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_has_required_fields(path):
    doc = load(path)
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    assert manifest_problems(doc) == []


def test_kuberay_required_field_check_can_fail():
    doc = load(RAYJOB)
    spec = doc["spec"]["rayClusterSpec"]
    del spec["workerGroupSpecs"][0]["maxReplicas"]
    spec["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")
    doc["spec"]["ttlSecondsAfterFinished"], doc["spec"]["shutdownAfterJobFinishes"] = 60, False
    doc["metadata"]["name"] = "Urbancross_Train"
    assert manifest_problems(doc) == [
        "metadata.name",
        "spec.rayClusterSpec.headGroupSpec.containers[0].image",
        "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas",
        "spec.shutdownAfterJobFinishes",
    ]
    del doc["spec"]["rayClusterSpec"]
    assert "spec.rayClusterSpec|clusterSelector" in manifest_problems(doc)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_ray_version_and_images_match_installed_ray(path):
    spec = cluster_spec_of(load(path))
    assert spec["rayVersion"] == ray.__version__
    assert {c["image"] for c in containers(spec)} == {f"rayproject/ray:{ray.__version__}-py311-gpu"}


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_worker_groups_request_gpus(path):
    spec = cluster_spec_of(load(path))
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]  # k8s: equal
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # the head stays a CPU node


def test_rayjob_entrypoint_runs_an_existing_job_with_a_loadable_config():
    spec = load(RAYJOB)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    assert (REPO / argv[1]).is_file(), f"{argv[1]} (written by the train helper) is missing"
    config = argv[argv.index("--config") + 1]
    assert load_config(REPO / config).train.use_gpu is True
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_runtime_env_is_valid_and_matches_runtime_env_yaml():
    shared = load(RUNTIME_ENV)
    env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert re.match(r"^(https|s3|gs)://.+\.zip$", env["working_dir"])  # the submitter pod has no local checkout
    # pinned: a commit's zip (or a release tag's), never a branch's, which changes under the job
    assert re.search(r"/archive/([0-9a-f]{40}|refs/tags/v[\w.]+)\.zip$", env["working_dir"]), env["working_dir"]
    assert {k: env[k] for k in ("pip", "env_vars", "config")} == {k: shared[k] for k in ("pip", "env_vars", "config")}


def test_pretrained_weights_are_on_a_volume_every_node_mounts():
    pretrained = load_config(TRAIN_GPU).model.pretrained
    for path in (RAYCLUSTER, RAYJOB):
        for c in containers(cluster_spec_of(load(path))):
            assert any(pretrained.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), (path.name, c["name"])
    mounts = [opt.split()[1].split(":")[1] for opt in load(LAUNCHER)["docker"]["run_options"] if opt.startswith("--volume")]
    assert any(pretrained.startswith(m + "/") for m in mounts)


def test_mlflow_credentials_come_from_a_secret_never_from_a_shipped_file():
    """Every Ray container gets MLFLOW_TRACKING_USERNAME/PASSWORD from a Secret; no file sets a value."""
    for path in (RAYCLUSTER, RAYJOB):
        for c in containers(cluster_spec_of(load(path))):
            env = {e["name"]: e for e in c.get("env", [])}
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], (path.name, c["name"], name)
    envs = [load(RUNTIME_ENV)["env_vars"], yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])["env_vars"]]
    for env in envs:
        assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} & set(env)
        assert env["MLFLOW_TRACKING_URI"].startswith("https://")  # credentials travel over TLS only
    assert load_config(TRAIN_GPU).tracking_uri().startswith("https://")


# --------------------------------------------------------------------------- runtime_env


def test_runtime_env_yaml_constructs_and_pins_the_project_dependencies():
    raw = load(RUNTIME_ENV)
    env = RuntimeEnv(**raw)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert env["pip"]["packages"] == [d for d in deps if not d.startswith("ray")]
    assert env["config"]["setup_timeout_seconds"] == 1800


def test_runtime_env_upload_leaves_out_venv_and_runs(tmp_path):
    repo = tmp_path / "repo"
    files = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "runs/default/checkpoint/model.pt",
        "demo_out/mlflow.db",
        "mlflow.db",
        "urbancross/__pycache__/config.cpython-311.pyc",
        "urbancross/config.py",
        "jobs/train.py",
        "cluster/configs/train_gpu.yaml",
        "pyproject.toml",
    ]
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    out = tmp_path / "pkg.zip"
    # the same packer `ray job submit --working-dir` uses; .gitignore off: the excludes alone must do it
    _zip_files(str(repo), load(RUNTIME_ENV)["excludes"], str(out), include_gitignore=False)
    uploaded = sorted(n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/"))
    assert uploaded == ["cluster/configs/train_gpu.yaml", "jobs/train.py", "pyproject.toml", "urbancross/config.py"]


# --------------------------------------------------------------------------- cluster run config


def test_cluster_run_config_loads_with_gpu_settings_and_shared_uris():
    cfg = load_config(TRAIN_GPU)
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.zero_stage) == (4, True, 2)
    assert cfg.model.preset == "ViT-B-32-quickgelu"
    assert cfg.model.pretrained.startswith("/mnt/shared/")
    for uri in (cfg.out_dir, cfg.data.manifest, cfg.preprocess.input, cfg.preprocess.output, cfg.adapt.checkpoint):
        assert uri.startswith("s3://"), uri  # never a path that exists only on the head node
    assert cfg.preprocess.output == cfg.data.manifest  # train reads what preprocess wrote
    assert cfg.tracking_uri().startswith("http")  # a tracking server, not SQLite, on many nodes
    assert cfg.tracking_uri() == load(RUNTIME_ENV)["env_vars"]["MLFLOW_TRACKING_URI"]
