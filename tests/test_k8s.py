"""The KubeRay manifests: generated from ray_config.yaml without drift, and valid against the
KubeRay v1.7 CRD schemas (the CRDs shipped beside the project, see below), checked strictly:
unknown fields fail. The bearer token reaches the service only through a Secret; the Grafana
dashboard queries only metrics that exist."""

from __future__ import annotations

import ast
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from cluster.grafana import dashboard
from cluster.kube import DASHBOARD, K8S_DIR, KubeSettings, manifests, serve_config
from cluster.serving import load_config
from cluster.settings import ROOT

CRDS = Path(os.environ.get("SEEDSTORY_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def strict(schema):
    """Kubernetes prunes unknown fields of a structural schema; here they are errors instead."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
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
    assert committed() == {name: yaml.safe_load(yaml.safe_dump(doc)) for name, doc in manifests().items()}, (
        "cluster/k8s/ drifted from ray_config.yaml: run `seedstory k8s`"
    )


def test_serve_config_v2_is_ray_config_yaml_with_only_the_cluster_overrides():
    from ray.serve.schema import ServeDeploySchema

    served = yaml.safe_load(committed()["rayservice.yaml"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    local, s = load_config(), KubeSettings()
    assert served == serve_config(s, local)
    # Undo the overrides: what remains is the local config, so every other setting flows through.
    for arg in ("checkpoint", "auth_token", "auth_token_env", "render_slots"):
        served["applications"][0]["args"][arg] = local["applications"][0]["args"][arg]
    for dep, mine in zip(served["applications"][0]["deployments"], local["applications"][0]["deployments"]):
        dep["ray_actor_options"] = mine["ray_actor_options"]
        dep["autoscaling_config"]["max_replicas"] = mine["autoscaling_config"]["max_replicas"]
    assert served == local


def test_the_service_shape_platform_teams_rely_on():
    svc = committed()["rayservice.yaml"]["spec"]
    cluster = svc["rayClusterConfig"]
    assert (
        cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    )
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
        assert float(dep["ray_actor_options"]["num_cpus"]).is_integer(), dep["name"]  # whole cores in pods


def ray_containers(cluster: dict) -> list[dict]:
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_the_token_comes_from_the_secret_and_never_sits_in_a_manifest():
    s, config = KubeSettings(), load_config()
    config["applications"][0]["args"]["auth_token"] = "plain-text-token-that-must-not-leak"
    assert "plain-text-token-that-must-not-leak" not in yaml.safe_dump(manifests(s, config))
    svc = committed()["rayservice.yaml"]["spec"]
    args = yaml.safe_load(svc["serveConfigV2"])["applications"][0]["args"]
    assert args["auth_token"] == "" and args["auth_token_env"] == s.auth_env
    # The ingress replica may land on any node, so every Ray container carries the variable;
    # optional: false keeps the pods from starting (fail closed) while the Secret is missing.
    ref = {"secretKeyRef": {"name": s.auth_secret, "key": s.auth_secret_key, "optional": False}}
    for c in ray_containers(svc["rayClusterConfig"]):
        assert [e for e in c["env"] if e["name"] == s.auth_env] == [{"name": s.auth_env, "valueFrom": ref}], (
            c["name"]
        )
    # The jobs serve nothing: they must not wait on a Secret they do not use.
    for name in ("rayjob-bulk.yaml", "rayjob-train.yaml"):
        assert s.auth_secret not in yaml.safe_dump(committed()[name]), name


# -- the Grafana dashboard ---------------------------------------------------------------------
# Ray's Prometheus names for a metrics.<Kind>("x"): counters only as ray_x_total under its default
# OpenTelemetry exporter (a name that already ends in _total keeps one), histograms as their three series.
EXPORTED = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}


def exported_metrics(files) -> set[str]:
    """The Prometheus names of every metrics.Counter/Gauge/Histogram("name", ...) call in ``files``."""
    names = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in EXPORTED
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                kind, name = node.func.attr, node.args[0].value
                base = name.removesuffix("_total") if kind == "Counter" else name
                names |= {f"ray_{base}{suffix}" for suffix in EXPORTED[kind]}
    return names


def committed_dashboard() -> dict:
    return json.loads((K8S_DIR / DASHBOARD).read_text())


def graphs(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_the_committed_dashboard_is_what_kube_py_generates():
    assert committed_dashboard() == dashboard(), f"cluster/k8s/{DASHBOARD} drifted: run `seedstory k8s`"


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable():
    board = committed_dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    [var] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in board["panels"]:
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    for p in graphs(board):
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for source in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert source == {"type": "prometheus", "uid": f"${{{var['name']}}}"}, p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_every_metric_the_dashboard_queries_is_defined_in_the_project_or_in_serve():
    import ray.serve

    used = {
        m
        for p in graphs(committed_dashboard())
        for t in p["targets"]
        for m in re.findall(r"\bray_\w+", t["expr"])
    }
    ours = exported_metrics(
        f for pkg in ("actors", "cluster", "training") for f in (ROOT / pkg).rglob("*.py")
    )
    serves = exported_metrics(Path(ray.serve.__file__).parent.rglob("*.py"))
    assert {m for m in used if m.startswith("ray_serve_")}, "the dashboard shows Serve's replicas"
    assert sorted(m for m in used if m.startswith("ray_seedstory_") and m not in ours) == []
    assert sorted(m for m in used if not m.startswith("ray_seedstory_") and m not in serves) == []
