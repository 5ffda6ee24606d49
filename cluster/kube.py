"""KubeRay manifests for the story cluster, generated from ``ray_config.yaml``.

``seedstory k8s`` writes ``cluster/k8s/``: a RayService (the online service; its ``serveConfigV2``
is ray_config.yaml with the in-pod checkpoint path and each pool pinned to its worker group) and
RayJobs for bulk generation and for training. A test regenerates them and fails on drift.

The bearer token never appears in a manifest: serveConfigV2 names an environment variable
(``auth_token_env``), and every pod of the RayService sets it from a Kubernetes Secret.

``seedstory k8s`` also writes ``grafana-dashboard.json``, a Grafana dashboard over the metrics the
pools and Serve export (built in ``cluster/grafana.py``).

Each pool gets its own worker group, steered by a custom Ray resource that the group's pods
advertise and the pool's replicas request, so that platform teams size and scale the GPU-heavy
pools independently.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.grafana import dashboard
from cluster.serving import load_config
from cluster.settings import ROOT

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
    gpu_product: str = ""  # node selector value for nvidia.com/gpu.product
    min_replicas: int = 1
    max_replicas: int = 4

    @property
    def resource(self) -> str:
        return f"seedstory-{self.name}"  # the custom resource this group's pods advertise


@dataclass(frozen=True)
class KubeSettings:
    name: str = "seedstory"
    image: str = "seedstory:latest"  # built from this repo; docs/kubernetes.md#deploy says how
    ray_version: str = "2.60.0"
    checkpoint: str = "/models/full"  # in-pod path, mounted read-only from the claim below
    models_claim: str = "seedstory-models"
    data_claim: str = "seedstory-data"
    auth_secret: str = "seedstory-auth"  # the Secret that holds the bearer token...
    auth_secret_key: str = "token"  # ...under this key...
    auth_env: str = "SEEDSTORY_AUTH_TOKEN"  # ...set as this variable in every RayService pod
    # On a GPU a small-latent UNet is expected to be launch-bound, so fixed-shape calls of 4 should
    # cost little more than one (not measured yet; ray_config.yaml's 1 is this CPU's measured choice:
    # docs/architecture.md#5-decisions-and-why).
    render_slots: int = 4
    head_cpu: int = 2
    head_memory: str = "8Gi"
    groups: tuple[Group, ...] = field(
        default_factory=lambda: (
            Group("cpu", ("StoryIngress", "TokenizerPool"), cpu=4, memory="16Gi", max_replicas=8),
            # full MLLM: 7B in bf16 (~13.5 GB) + the KV pool: one 80 GB card per replica.
            Group("mllm", ("MLLMPool",), cpu=8, memory="64Gi", gpus=1, gpu_product="NVIDIA-H100-80GB-HBM3"),
            # full de-tokenizer: SDXL at 1024^2 in fp16 needs ~10 GB; a 24 GB card renders batches of 4.
            Group("detok", ("DetokenizerPool",), cpu=8, memory="32Gi", gpus=1, gpu_product="NVIDIA-L4"),
        )
    )


def serve_config(settings: KubeSettings, config: dict | None = None) -> dict:
    """ray_config.yaml as the cluster runs it: in-pod checkpoint, each pool on its group's GPUs."""
    config = copy.deepcopy(config or load_config())
    app = config["applications"][0]
    app["args"]["checkpoint"] = settings.checkpoint
    # serveConfigV2 is readable by anyone who can read the RayService: the replicas take the token
    # from their environment (AppSettings.token()), which the pods fill from the Secret.
    app["args"]["auth_token"] = ""
    app["args"]["auth_token_env"] = settings.auth_env
    app["args"]["render_slots"] = settings.render_slots
    by_pool = {pool: group for group in settings.groups for pool in group.pools}
    for dep in app["deployments"]:
        group = by_pool[dep["name"]]
        opts = dep.setdefault("ray_actor_options", {})
        opts["num_gpus"] = group.gpus
        # ray_config.yaml's fractions are sized for one 2-core machine; a pod's replicas get whole cores.
        opts["num_cpus"] = max(1, math.ceil(opts.get("num_cpus", 1)))
        opts["resources"] = {group.resource: 0.01}  # a marker, not a limit: replicas land in the group
        if group.gpus:  # a GPU pool scales to the GPUs its group can bring up
            dep["autoscaling_config"]["max_replicas"] = group.max_replicas * group.gpus
    return config


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, so the manifest reads like the config;
    a value shared by several pods (the token's env) written out in each, not as a YAML alias."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def _container(
    settings: KubeSettings, name: str, cpu: int, memory: str, gpus: int, ports: list[dict], env: list[dict]
) -> dict:
    limits = {"cpu": str(cpu), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {
        "name": name,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        **({"env": env} if env else {}),
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": [
            {"name": "models", "mountPath": str(Path(settings.checkpoint).parent), "readOnly": True},
            {"name": "data", "mountPath": "/data"},
        ],
        # Ray stops the node cleanly before the pod goes, so Serve drains its replicas first.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }


def _pod(settings: KubeSettings, container: dict, gpu_product: str = "") -> dict:
    spec = {
        "containers": [container],
        "volumes": [
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": settings.models_claim, "readOnly": True},
            },
            {"name": "data", "persistentVolumeClaim": {"claimName": settings.data_claim}},
        ],
    }
    if gpu_product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": gpu_product}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _auth_env(settings: KubeSettings) -> list[dict]:
    """The bearer token from the Secret, in every pod: the ingress replica may land on any node.
    Not optional: without the Secret the pods do not start (fail closed), rather than serve
    unauthenticated."""
    ref = {"name": settings.auth_secret, "key": settings.auth_secret_key, "optional": False}
    return [{"name": settings.auth_env, "valueFrom": {"secretKeyRef": ref}}]


def ray_cluster(settings: KubeSettings, env: list[dict] | None = None) -> dict:
    """``env``: variables for every Ray container (the service's token; jobs serve nothing and need none)."""
    env = env or []
    ports = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8000, "name": "serve"},
        {"containerPort": 9000, "name": "grpc"},
        {"containerPort": 8080, "name": "metrics"},
    ]
    head = _container(settings, "ray-head", settings.head_cpu, settings.head_memory, 0, ports, env)
    return {
        "rayVersion": settings.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 120,
            "resources": {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": {"cpu": "500m", "memory": "512Mi"},
            },
        },
        # The head schedules no replicas (num-cpus 0): losing a worker never takes the GCS with it.
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(settings, head),
        },
        "workerGroupSpecs": [_worker_group(settings, group, env) for group in settings.groups],
    }


def _worker_group(settings: KubeSettings, group: Group, env: list[dict]) -> dict:
    ports = [{"containerPort": 8080, "name": "metrics"}]
    container = _container(settings, "ray-worker", group.cpu, group.memory, group.gpus, ports, env)
    return {
        "groupName": group.name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "resources": {group.resource: "1000"},  # KubeRay passes these to `ray start`
        "template": _pod(settings, container, group.gpu_product),
    }


def ray_service(settings: KubeSettings, config: dict | None = None) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": settings.name, "labels": {"app.kubernetes.io/name": settings.name}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(settings, config), sort_keys=False),
            # Zero-downtime upgrades: a changed rayClusterConfig brings up a new cluster, shifts traffic
            # once its app is healthy, then retires the old one. serveConfigV2-only changes update in place.
            "upgradeStrategy": {"type": "NewCluster"},
            # The serve service carries gRPC (9000) beside HTTP (8000, KubeRay's readiness probe).
            "serveService": {
                "metadata": {"name": f"{settings.name}-serve"},
                "spec": {
                    "ports": [
                        {"name": "serve", "port": 8000, "targetPort": 8000},
                        {"name": "grpc", "port": 9000, "targetPort": 9000},
                    ]
                },
            },
            "rayClusterConfig": ray_cluster(settings, _auth_env(settings)),
        },
    }


def ray_job(settings: KubeSettings, name: str, entrypoint: str) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"{settings.name}-{name}", "labels": {"app.kubernetes.io/name": settings.name}},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "submissionMode": "K8sJobMode",
            "backoffLimit": 2,  # a retried bulk job resumes (exactly once)
            "rayClusterSpec": ray_cluster(settings),
        },
    }


def manifests(settings: KubeSettings = KubeSettings(), config: dict | None = None) -> dict[str, dict]:
    return {
        "rayservice.yaml": ray_service(settings, config),
        "rayjob-bulk.yaml": ray_job(
            settings,
            "bulk",
            "python -m cluster.bulk --prompts /data/prompts.parquet "
            f"--out /data/stories --ckpt {settings.checkpoint} --segments 25",
        ),
        "rayjob-train.yaml": ray_job(
            settings,
            "train",
            "seedstory train --preset full --data /data/storystream --out /models/full-new --workers 8 --gpu",
        ),
    }


def write_manifests(out: Path = K8S_DIR, settings: KubeSettings = KubeSettings()) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "# Generated by `seedstory k8s` from ray_config.yaml and cluster/kube.py: edit those, not this.\n"
    )
    paths = []
    for name, doc in manifests(settings).items():
        (out / name).write_text(header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False))
        paths.append(out / name)
    (out / DASHBOARD).write_text(json.dumps(dashboard(), indent=2) + "\n")
    return paths + [out / DASHBOARD]


# -- the command: `seedstory k8s` --------------------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory k8s``, registered on the ``seedstory`` parser's subcommands."""
    k8s_parser = commands.add_parser(
        "k8s", help="write the KubeRay RayService/RayJob manifests from ray_config.yaml"
    )
    k8s_parser.add_argument("--out", default=str(K8S_DIR))
    k8s_parser.set_defaults(func=run_command)
    return k8s_parser


def run_command(args: argparse.Namespace) -> None:
    for path in write_manifests(Path(args.out)):
        print(f"wrote {path}")
