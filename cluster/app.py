"""The Serve application: three pools and the gRPC ingress, wired from ``ray_config.yaml``'s args.

``build_app`` is the ``import_path`` target. Its args are checked once into ``AppSettings``
(``cluster/settings.py``); each pool's replicas, autoscaling and resources live in the config's
``deployments`` section.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from cluster.settings import AppSettings


def build_app(args: dict):
    from actors.detokenizer.deployment import DetokenizerPool
    from actors.mllm.deployment import MLLMPool
    from actors.tokenizer.deployment import TokenizerPool
    from cluster.ingress import StoryIngress

    settings = AppSettings.from_args(args)
    if not (Path(settings.checkpoint) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {settings.checkpoint}: train one (seedstory train) or "
            f"build a random-init one (seedstory init --out {settings.checkpoint})"
        )
    tokenizer = TokenizerPool.bind(settings.checkpoint, settings.torch_threads)
    mllm = MLLMPool.bind(
        settings.checkpoint,
        asdict(settings.sink),
        settings.engine_max_stories,
        settings.max_story_segments,
        settings.kv_blocks,
        settings.health_stall_s,
    )
    detokenizer = DetokenizerPool.bind(
        settings.checkpoint,
        settings.torch_threads,
        settings.health_stall_s,
        settings.exact_renders,
        settings.render_slots,
        settings.sampler,
        settings.guidance_until,
    )
    return StoryIngress.bind(tokenizer, mllm, detokenizer, settings.to_args())
