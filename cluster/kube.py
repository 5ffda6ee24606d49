"""KubeRay manifests for the story cluster, generated from ``ray_config.yaml``.

``seedstory k8s`` writes ``cluster/k8s/``: a RayService (the online service; its ``serveConfigV2``
is ray_config.yaml with the in-pod checkpoint path and each pool pinned to its worker group) and
RayJobs for bulk generation and for training. A test regenerates them and fails on drift.

Each pool gets its own worker group, steered by a custom Ray resource that the group's pods
advertise and the pool's replicas request, so that platform teams size and scale the GPU-heavy
pools independently.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.app import ROOT
from cluster.serving import load_config

K8S_DIR = ROOT / "cluster" / "k8s"


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
    """Multi-line strings (serveConfigV2) as literal blocks, so the manifest reads like the config."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def _container(s: KubeSettings, name: str, cpu: int, memory: str, gpus: int, ports: list[dict]) -> dict:
    limits = {"cpu": str(cpu), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {"name": name, "image": s.image, "imagePullPolicy": "IfNotPresent", "ports": ports,
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


def ray_cluster(s: KubeSettings) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
             {"containerPort": 9000, "name": "grpc"}, {"containerPort": 8080, "name": "metrics"}]
    head = _container(s, "ray-head", s.head_cpu, s.head_memory, 0, ports)
    return {
        "rayVersion": s.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 120,
                              "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                            "limits": {"cpu": "500m", "memory": "512Mi"}}},
        # The head schedules no replicas (num-cpus 0): losing a worker never takes the GCS with it.
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": _pod(s, head)},
        "workerGroupSpecs": [_worker_group(s, g) for g in s.groups],
    }


def _worker_group(s: KubeSettings, g: Group) -> dict:
    container = _container(s, "ray-worker", g.cpu, g.memory, g.gpus, [{"containerPort": 8080, "name": "metrics"}])
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
            "rayClusterConfig": ray_cluster(s),
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


def write_manifests(out: Path = K8S_DIR, s: KubeSettings = KubeSettings()) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = "# Generated by `seedstory k8s` from ray_config.yaml and cluster/kube.py: edit those, not this.\n"
    paths = []
    for name, doc in manifests(s).items():
        (out / name).write_text(header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False))
        paths.append(out / name)
    return paths
