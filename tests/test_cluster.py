"""The cluster manifests: the launcher YAML passes Ray's own validator, the KubeRay manifests carry what the
ray.io/v1 CRDs require (and no field KubeRay 1.6 does not know), token auth through `authOptions` as the KubeRay
operator reads it, and every image, Ray version and pip pin agrees with pyproject.toml."""

import ast
import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from ubt_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=]", d, maxsplit=1)[0]: d for d in deps}


def ray_version() -> str:
    return pyproject_pins()["ray"].split("==")[1]


def python_tag() -> str:
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.search(r">=(\d+)\.(\d+)", spec).groups()
    return f"py{major}{minor}"


def load(path: str) -> dict:
    return yaml.safe_load((CLUSTER / path).read_text())


def test_launcher_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = load("aws.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = prepare_config(copy.deepcopy(config))
    broken["available_node_types"]["worker.gpu"]["min_workrs"] = 1  # a typo the validator must catch
    with pytest.raises(Exception):
        validate_config(broken)
    assert config["docker"]["image"] == f"rayproject/ray:{ray_version()}-{python_tag()}-gpu"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# The fields of KubeRay 1.6's ray.io/v1 types (ray-operator/apis/ray/v1 at v1.6.0), by their JSON names: a key
# outside them (a typo such as `authOption`) would be dropped by the API server, silently.
RAY_CLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                    "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams",
                   "serviceType"}
WORKER_GROUP_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTH_OPTIONS = {"enableK8sTokenAuth", "secretName", "mode"}
RAY_JOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
                "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend"}
# Token auth as the operator reads it (KubeRay >= 1.6.0): it sets RAY_AUTH_MODE and RAY_AUTH_TOKEN (from the
# Secret's key auth_token) in the Ray containers, the autoscaler sidecar and a RayJob's submitter, and reads the
# token itself for the dashboard's API; env vars in the pod templates reach none of the latter three.
AUTH = {"mode": "token", "secretName": "ubt-ray-auth"}


def check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAY_CLUSTER_SPEC, set(spec) - RAY_CLUSTER_SPEC
    assert spec["rayVersion"] == ray_version() and spec["enableInTreeAutoscaling"] is True
    assert set(spec["authOptions"]) <= AUTH_OPTIONS and spec["authOptions"] == AUTH
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_SPEC and head["template"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups and all(set(g) <= WORKER_GROUP_SPEC for g in groups)
    assert all(g["groupName"] and 0 <= g["minReplicas"] <= g["maxReplicas"] and g["template"] for g in groups)
    templates = [head["template"]] + [g["template"] for g in groups]
    for c in [c for t in templates for c in containers(t) + t["spec"].get("initContainers", [])]:
        assert c["name"] and c["image"] == f"rayproject/ray:{ray_version()}-{python_tag()}-gpu"
        names = {e["name"] for e in c.get("env", [])}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, (c["name"], names)
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in containers(g["template"]))


def test_the_readme_makes_the_secret_the_manifests_name():
    readme = (REPO / "README.md").read_text()
    assert f'kubectl create secret generic {AUTH["secretName"]} --from-literal=auth_token=' in readme
    for path in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert f'kubectl create secret generic {AUTH["secretName"]} --from-literal=auth_token=' in (
            CLUSTER / path).read_text()


def test_kuberay_raycluster_has_what_the_crd_requires():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_the_pipeline_and_shuts_down():
    manifest = load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert set(spec) <= RAY_JOB_SPEC, set(spec) - RAY_JOB_SPEC
    assert "jobs/pipeline.py" in spec["entrypoint"] and "--config" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"])
    config = spec["entrypoint"].split("--config ")[1].split()[0].replace("/home/ray/ubt-ray/", "")
    assert (REPO / config).is_file()
    assert sorted(yaml.safe_load(spec["runtimeEnvYAML"])["pip"]["packages"]) == expected_pip()


def expected_pip() -> list[str]:
    return sorted(v for k, v in pyproject_pins().items() if k != "ray")


def test_runtime_env_pins_agree_with_pyproject():
    env = load("runtime_env.yaml")
    assert sorted(env["pip"]["packages"]) == expected_pip()
    assert env["working_dir"] == "."


def imported_modules(paths: list[Path]) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_runtime_dependencies_are_ones_the_code_imports():
    """A runtime dependency nothing imports is weight on every cluster node (boto3 was one: S3 goes through
    pyarrow; the tests' moto buckets and `ray up` on AWS use it, from the dev extra)."""
    code = sorted((REPO / "ubt_ray").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py"))
    imported = imported_modules(code)
    module_of = {"open_clip_torch": "open_clip", "pyyaml": "yaml", "pillow": "PIL"}
    unused = [p for p in pyproject_pins() if module_of.get(p.lower(), p.lower()) not in imported]
    assert not unused, f"runtime dependencies that ubt_ray/ and jobs/ never import: {unused}"
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("boto3") for d in dev) and "boto3" not in pyproject_pins()


def test_cluster_config_loads_and_asks_for_gpus():
    cfg = load_config(str(REPO / "configs" / "cluster_vitb32.yaml"))
    assert cfg.model.name == "ViT-B-32" and cfg.trainer.use_gpu and cfg.score.use_gpu and cfg.trainer.num_workers == 8
    assert cfg.defend.data.startswith("s3://") and cfg.model.precision.startswith("amp_")
