"""Placeholder Serve application until the story cluster lands: one deployment that answers
with the checkpoint's manifest, so `serve run ray_config.yaml` starts and reports what it would serve."""

from __future__ import annotations

from ray import serve

from actors.checkpoint import read_manifest


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class CheckpointInfo:
    def __init__(self, checkpoint: str):
        self.manifest = read_manifest(checkpoint).to_dict()
        self.manifest.pop("preset")

    async def __call__(self, request) -> dict:
        return self.manifest


def build_app(args: dict):
    return CheckpointInfo.bind(args["checkpoint"])
