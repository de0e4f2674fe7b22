"""The cluster manifests: the launcher YAML passes Ray's own validator, the KubeRay manifests carry what the
ray.io/v1 CRDs require, and every image, Ray version and pip pin agrees with pyproject.toml."""

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


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray_version() and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and 0 <= g["minReplicas"] <= g["maxReplicas"] for g in groups)
    for c in containers(head["template"]) + [c for g in groups for c in containers(g["template"])]:
        assert c["name"] and c["image"] == f"rayproject/ray:{ray_version()}-{python_tag()}-gpu"
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in containers(g["template"]))


def test_kuberay_raycluster_has_what_the_crd_requires():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_the_pipeline_and_shuts_down():
    manifest = load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
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


def test_cluster_config_loads_and_asks_for_gpus():
    cfg = load_config(str(REPO / "configs" / "cluster_vitb32.yaml"))
    assert cfg.model.name == "ViT-B-32" and cfg.train.use_gpu and cfg.score.use_gpu and cfg.train.num_workers == 8
    assert cfg.defend.data.startswith("s3://") and cfg.model.precision.startswith("amp_")
