"""The KubeRay manifests: generated from ray_config.yaml without drift, and valid against the
KubeRay v1.7 CRD schemas (the CRDs shipped beside the project, see below), checked strictly: unknown fields fail."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from cluster.app import ROOT
from cluster.kube import K8S_DIR, KubeSettings, manifests, serve_config
from cluster.serving import load_config

CRDS = Path(os.environ.get("SEEDSTORY_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def strict(schema):
    """Kubernetes prunes unknown fields of a structural schema; here they are errors instead."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_schema(kind: str) -> dict:
    path = CRDS / FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (set SEEDSTORY_KUBERAY_CRDS)")
    return _schema(path)


@lru_cache
def _schema(path: Path) -> dict:
    crd = yaml.safe_load(path.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is not in the CRD
    return schema


def committed() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S_DIR.glob("*.yaml"))}


@pytest.mark.parametrize("name", sorted(manifests()))
def test_each_manifest_validates_against_the_kuberay_crd(name):
    import jsonschema

    doc = committed()[name]
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_a_misspelt_field_fails_the_validation():
    import jsonschema

    doc = committed()["rayservice.yaml"]
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema("RayService"))


def test_the_committed_manifests_are_what_ray_config_yaml_generates():
    assert committed() == {name: yaml.safe_load(yaml.safe_dump(doc)) for name, doc in manifests().items()}, \
        "cluster/k8s/ drifted from ray_config.yaml: run `seedstory k8s`"


def test_serve_config_v2_is_ray_config_yaml_with_only_the_cluster_overrides():
    from ray.serve.schema import ServeDeploySchema

    served = yaml.safe_load(committed()["rayservice.yaml"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    local, s = load_config(), KubeSettings()
    assert served == serve_config(s, local)
    # Undo the overrides: what remains is the local config, so every other setting flows through.
    served["applications"][0]["args"]["checkpoint"] = local["applications"][0]["args"]["checkpoint"]
    for dep, mine in zip(served["applications"][0]["deployments"], local["applications"][0]["deployments"]):
        dep["ray_actor_options"] = mine["ray_actor_options"]
        dep["autoscaling_config"]["max_replicas"] = mine["autoscaling_config"]["max_replicas"]
    assert served == local


def test_the_service_shape_platform_teams_rely_on():
    svc = committed()["rayservice.yaml"]["spec"]
    cluster = svc["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert {p["port"] for p in svc["serveService"]["spec"]["ports"]} == {8000, 9000}
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"] == c["resources"]["requests"]
    # Every pool's replicas ask for a resource that some worker group advertises, GPU pools on GPU pods.
    offered = {r: g for g in cluster["workerGroupSpecs"] for r in g["resources"]}
    for dep in yaml.safe_load(svc["serveConfigV2"])["applications"][0]["deployments"]:
        [res] = dep["ray_actor_options"]["resources"]
        group = offered[res]
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", "0")
        assert int(gpus) >= dep["ray_actor_options"]["num_gpus"], dep["name"]
