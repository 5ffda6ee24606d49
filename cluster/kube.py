"""KubeRay manifests for the story cluster, generated from ``ray_config.yaml``.

``seedstory k8s`` writes ``cluster/k8s/``: a RayService (the online service; its ``serveConfigV2``
is ray_config.yaml with the in-pod checkpoint path and each pool pinned to its worker group) and
RayJobs for bulk generation and for training. A test regenerates them and fails on drift.

The bearer token never appears in a manifest: serveConfigV2 names an environment variable
(``auth_token_env``), and every pod of the RayService sets it from a Kubernetes Secret.

``seedstory k8s`` also writes ``grafana-dashboard.json``, a Grafana dashboard over the metrics the
pools and Serve export (see ``dashboard``).

Each pool gets its own worker group, steered by a custom Ray resource that the group's pods
advertise and the pool's replicas request, so that platform teams size and scale the GPU-heavy
pools independently.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.app import ROOT
from cluster.serving import load_config

K8S_DIR = ROOT / "cluster" / "k8s"
DASHBOARD = "grafana-dashboard.json"


@dataclass(frozen=True)
class Group:
    """One worker group: the pods of one pool (or of the light pools together)."""
    name: str
    pools: tuple[str, ...]
    cpu: int
    memory: str
    gpus: int = 0
    gpu_product: str = ""        # node selector value for nvidia.com/gpu.product
    min_replicas: int = 1
    max_replicas: int = 4

    @property
    def resource(self) -> str:
        return f"seedstory-{self.name}"  # the custom resource this group's pods advertise


@dataclass(frozen=True)
class KubeSettings:
    name: str = "seedstory"
    image: str = "seedstory:latest"          # built from this repo; the README says how
    ray_version: str = "2.60.0"
    checkpoint: str = "/models/full"         # in-pod path, mounted read-only from the claim below
    models_claim: str = "seedstory-models"
    data_claim: str = "seedstory-data"
    auth_secret: str = "seedstory-auth"      # the Secret that holds the bearer token...
    auth_secret_key: str = "token"           # ...under this key...
    auth_env: str = "SEEDSTORY_AUTH_TOKEN"   # ...set as this variable in every RayService pod
    head_cpu: int = 2
    head_memory: str = "8Gi"
    groups: tuple[Group, ...] = field(default_factory=lambda: (
        Group("cpu", ("StoryIngress", "TokenizerPool"), cpu=4, memory="16Gi", max_replicas=8),
        # full MLLM: 7B in bf16 (~13.5 GB) + the KV pool: one 80 GB card per replica.
        Group("mllm", ("MLLMPool",), cpu=8, memory="64Gi", gpus=1, gpu_product="NVIDIA-H100-80GB-HBM3"),
        # full de-tokenizer: SDXL at 1024^2 in fp16 needs ~10 GB; a 24 GB card renders batches of 4.
        Group("detok", ("DetokenizerPool",), cpu=8, memory="32Gi", gpus=1, gpu_product="NVIDIA-L4"),
    ))


def serve_config(s: KubeSettings, config: dict | None = None) -> dict:
    """ray_config.yaml as the cluster runs it: in-pod checkpoint, each pool on its group's GPUs."""
    config = copy.deepcopy(config or load_config())
    app = config["applications"][0]
    app["args"]["checkpoint"] = s.checkpoint
    # serveConfigV2 is readable by anyone who can read the RayService: the replicas take the token
    # from their environment (AppSettings.token()), which the pods fill from the Secret.
    app["args"]["auth_token"] = ""
    app["args"]["auth_token_env"] = s.auth_env
    by_pool = {pool: g for g in s.groups for pool in g.pools}
    for dep in app["deployments"]:
        g = by_pool[dep["name"]]
        opts = dep.setdefault("ray_actor_options", {})
        opts["num_gpus"] = g.gpus
        opts["resources"] = {g.resource: 0.01}  # a marker, not a limit: replicas land in the group
        if g.gpus:  # a GPU pool scales to the GPUs its group can bring up
            dep["autoscaling_config"]["max_replicas"] = g.max_replicas * g.gpus
    return config


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, so the manifest reads like the config;
    a value shared by several pods (the token's env) written out in each, not as a YAML alias."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def _container(s: KubeSettings, name: str, cpu: int, memory: str, gpus: int, ports: list[dict],
               env: list[dict]) -> dict:
    limits = {"cpu": str(cpu), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {"name": name, "image": s.image, "imagePullPolicy": "IfNotPresent", "ports": ports,
            **({"env": env} if env else {}),
            "resources": {"requests": dict(limits), "limits": limits},
            "volumeMounts": [{"name": "models", "mountPath": str(Path(s.checkpoint).parent), "readOnly": True},
                             {"name": "data", "mountPath": "/data"}],
            # Ray stops the node cleanly before the pod goes, so Serve drains its replicas first.
            "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}}


def _pod(s: KubeSettings, container: dict, gpu_product: str = "") -> dict:
    spec = {"containers": [container], "volumes": [
        {"name": "models", "persistentVolumeClaim": {"claimName": s.models_claim, "readOnly": True}},
        {"name": "data", "persistentVolumeClaim": {"claimName": s.data_claim}}]}
    if gpu_product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": gpu_product}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _auth_env(s: KubeSettings) -> list[dict]:
    """The bearer token from the Secret, in every pod: the ingress replica may land on any node.
    Not optional: without the Secret the pods do not start (fail closed), rather than serve unauthenticated."""
    ref = {"name": s.auth_secret, "key": s.auth_secret_key, "optional": False}
    return [{"name": s.auth_env, "valueFrom": {"secretKeyRef": ref}}]


def ray_cluster(s: KubeSettings, env: list[dict] | None = None) -> dict:
    """``env``: variables for every Ray container (the service's token; jobs serve nothing and need none)."""
    env = env or []
    ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
             {"containerPort": 9000, "name": "grpc"}, {"containerPort": 8080, "name": "metrics"}]
    head = _container(s, "ray-head", s.head_cpu, s.head_memory, 0, ports, env)
    return {
        "rayVersion": s.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 120,
                              "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                            "limits": {"cpu": "500m", "memory": "512Mi"}}},
        # The head schedules no replicas (num-cpus 0): losing a worker never takes the GCS with it.
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": _pod(s, head)},
        "workerGroupSpecs": [_worker_group(s, g, env) for g in s.groups],
    }


def _worker_group(s: KubeSettings, g: Group, env: list[dict]) -> dict:
    ports = [{"containerPort": 8080, "name": "metrics"}]
    container = _container(s, "ray-worker", g.cpu, g.memory, g.gpus, ports, env)
    return {"groupName": g.name, "replicas": g.min_replicas, "minReplicas": g.min_replicas,
            "maxReplicas": g.max_replicas,
            "rayStartParams": {}, "resources": {g.resource: "1000"},  # KubeRay passes these to `ray start`
            "template": _pod(s, container, g.gpu_product)}


def ray_service(s: KubeSettings, config: dict | None = None) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": s.name, "labels": {"app.kubernetes.io/name": s.name}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(s, config), sort_keys=False),
            # Zero-downtime upgrades: a changed rayClusterConfig brings up a new cluster, shifts traffic
            # once its app is healthy, then retires the old one. serveConfigV2-only changes update in place.
            "upgradeStrategy": {"type": "NewCluster"},
            # The serve service carries gRPC (9000) beside HTTP (8000, KubeRay's readiness probe).
            "serveService": {"metadata": {"name": f"{s.name}-serve"},
                             "spec": {"ports": [{"name": "serve", "port": 8000, "targetPort": 8000},
                                                {"name": "grpc", "port": 9000, "targetPort": 9000}]}},
            "rayClusterConfig": ray_cluster(s, _auth_env(s)),
        },
    }


def ray_job(s: KubeSettings, name: str, entrypoint: str) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"{s.name}-{name}", "labels": {"app.kubernetes.io/name": s.name}},
        "spec": {"entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
                 "submissionMode": "K8sJobMode", "backoffLimit": 2,  # a retried bulk job resumes (exactly once)
                 "rayClusterSpec": ray_cluster(s)},
    }


def manifests(s: KubeSettings = KubeSettings(), config: dict | None = None) -> dict[str, dict]:
    return {
        "rayservice.yaml": ray_service(s, config),
        "rayjob-bulk.yaml": ray_job(s, "bulk", "python -m cluster.bulk --prompts /data/prompts.parquet "
                                              f"--out /data/stories --ckpt {s.checkpoint} --segments 25"),
        "rayjob-train.yaml": ray_job(s, "train", "seedstory train --preset full --data /data/storystream "
                                                "--out /models/full-new --workers 8 --gpu"),
    }


# -- the Grafana dashboard -------------------------------------------------------------------
# Ray exports a ray.util.metrics metric "x" as ray_x: counters as ray_x_total (the only name under
# OpenTelemetry, Ray's default exporter; the deprecated ray_x gauge exists only under OpenCensus),
# histograms as ray_x_bucket/_sum/_count. Serve's own metrics are ray_serve_*.
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}  # chosen at import, not fixed to one Prometheus
Query = tuple[str, str]               # (PromQL, legend)
Panel = tuple[str, str, list[Query]]  # (title, Grafana unit, queries)


def _rate(metric: str, by: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({metric}[$__rate_interval]))"


def _quantile(q: float, histogram: str, by: str) -> str:
    return f"histogram_quantile({q}, {_rate(histogram + '_bucket', 'le, ' + by)})"


def _dashboard_rows(app: str) -> list[tuple[str, list[Panel]]]:
    """The rows and their panels. Per replica is ``by (instance)``: one scrape target is one pod,
    and a GPU pod holds one replica of its pool."""
    def by_pool(metric: str) -> str:
        return f'sum by (deployment) ({metric}{{application="{app}"}})'

    return [
        ("Stories (StoryIngress)", [
            ("Stories by outcome", "reqps", [(_rate("ray_seedstory_stories_total", "outcome"), "{{outcome}}")]),
            ("Stage latency p50 / p95", "s", [(_quantile(q, "ray_seedstory_stage_seconds", "stage"),
                                               f"p{round(q * 100)} {{{{stage}}}}") for q in (0.5, 0.95)]),
            ("Resumes by stage", "reqps", [(_rate("ray_seedstory_resumes_total", "stage"), "{{stage}}")]),
            ("Stories in flight", "short", [("sum (ray_seedstory_stories_active)", "at the ingress"),
                                            ("sum (ray_seedstory_mllm_stories)", "in the MLLM engines")]),
        ]),
        ("MLLMPool", [
            ("MLLM tokens/s", "short", [(_rate("ray_seedstory_mllm_output_tokens_total", "instance"), "{{instance}}"),
                                        (_rate("ray_seedstory_mllm_output_tokens_total"), "all replicas")]),
            ("KV blocks in use", "short", [("sum by (instance) (ray_seedstory_kv_blocks_in_use)", "{{instance}}")]),
        ]),
        ("DetokenizerPool", [
            ("Render queue", "short", [("sum (ray_seedstory_render_queue)", "pictures awaited by the ingress")]),
            ("Render call p95", "s", [(_quantile(0.95, "ray_seedstory_render_seconds", "instance"), "{{instance}}")]),
            ("Pictures per render call", "short", [(f"{_rate('ray_seedstory_render_batch_size_sum')} / "
                                                    f"{_rate('ray_seedstory_render_batch_size_count')}", "mean")]),
        ]),
        ("Serve", [
            ("Replicas per pool", "short", [(by_pool("ray_serve_deployment_replica_healthy"), "{{deployment}} healthy"),
                                            (by_pool("ray_serve_autoscaling_target_replicas"), "{{deployment}} target")]),
            ("Requests at replicas", "short", [(by_pool("ray_serve_num_ongoing_requests_at_replicas"), "{{deployment}}")]),
        ]),
    ]


def _panel(pid: int, title: str, unit: str, queries: list[Query], grid: dict) -> dict:
    return {"id": pid, "type": "timeseries", "title": title, "datasource": _DATASOURCE, "gridPos": grid,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                        for i, (expr, legend) in enumerate(queries)]}


def dashboard(config: dict | None = None) -> dict:
    """The Grafana dashboard (JSON model): one row per part of the pipeline, its panels side by side."""
    config = config or load_config()
    panels, y = [], 0
    for row, row_panels in _dashboard_rows(config["applications"][0]["name"]):
        panels.append({"id": len(panels) + 1, "type": "row", "title": row, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        width = 24 // len(row_panels)
        for i, (title, unit, queries) in enumerate(row_panels):
            grid = {"h": 8, "w": width, "x": i * width, "y": y + 1}
            panels.append(_panel(len(panels) + 1, title, unit, queries, grid))
        y += 9
    return {
        "title": "SEED-Story", "uid": "seedstory", "tags": ["seedstory", "ray-serve"],
        "description": "Generated by `seedstory k8s` from cluster/kube.py: edit that, not this.",
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "",
        "annotations": {"list": []},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
                                 "options": [], "regex": ""}]},
        "panels": panels,
    }


def write_manifests(out: Path = K8S_DIR, s: KubeSettings = KubeSettings()) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = "# Generated by `seedstory k8s` from ray_config.yaml and cluster/kube.py: edit those, not this.\n"
    paths = []
    for name, doc in manifests(s).items():
        (out / name).write_text(header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False))
        paths.append(out / name)
    (out / DASHBOARD).write_text(json.dumps(dashboard(), indent=2) + "\n")
    return paths + [out / DASHBOARD]


# -- the command: `seedstory k8s` --------------------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory k8s``, registered on the ``seedstory`` parser's subcommands."""
    k = commands.add_parser("k8s", help="write the KubeRay RayService/RayJob manifests from ray_config.yaml")
    k.add_argument("--out", default=str(K8S_DIR))
    k.set_defaults(func=run_command)
    return k


def run_command(a: argparse.Namespace) -> None:
    for path in write_manifests(Path(a.out)):
        print(f"wrote {path}")
