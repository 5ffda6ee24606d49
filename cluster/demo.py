"""The one-command demo: start a local Ray, deploy the story cluster from ``ray_config.yaml``,
write a story through the gRPC service, and save it as PNGs + story.json + story.html."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cluster.settings import ROOT

EMBEDDED_CHECKPOINT = ROOT / "checkpoints" / "tiny"
DEMO_PROMPT = (
    "Once upon a time, Milo the red circle, Bea the striped blue square, Kip the green triangle and "
    "Zara the yellow diamond walk in the park."
)


def ensure_checkpoint(ckpt: Path | None, scratch: Path, seed: int = 0) -> Path:
    """The given checkpoint, else the embedded one, else a random-init tiny one under ``scratch``."""
    from actors.config import TINY
    from training.init_checkpoint import init_checkpoint

    if ckpt is not None:
        return ckpt
    if (EMBEDDED_CHECKPOINT / "manifest.json").is_file():
        return EMBEDDED_CHECKPOINT
    ckpt = scratch / "ckpt-tiny-random"
    if not (ckpt / "manifest.json").is_file():
        t0 = time.time()
        init_checkpoint(TINY, ckpt, seed=seed)
        print(
            f"no trained checkpoint at {EMBEDDED_CHECKPOINT}: built a random-init tiny one at {ckpt} "
            f"in {time.time() - t0:.1f}s (its pictures are noise)"
        )
    return ckpt


def start_cluster(ckpt: Path, grpc_port: int | None = None, http_port: int | None = None) -> dict:
    """A new local Ray + the Serve app from ray_config.yaml on this checkpoint; returns the config used."""
    import ray

    from cluster.serving import deploy, load_config, with_args, with_ports

    config = with_ports(with_args(load_config(), checkpoint=str(ckpt.resolve())), grpc_port, http_port)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    deploy(config)
    return config


def run_demo(
    out: Path,
    prompt: str,
    ckpt: Path | None = None,
    segments: int = 4,
    seed: int = 0,
    grpc_port: int | None = None,
    http_port: int | None = None,
) -> Path:
    import ray
    from ray import serve

    from actors.checkpoint import checkpoint_name
    from cluster.serving import grpc_target
    from seedstory_client.cli import generate_story

    ckpt = ensure_checkpoint(ckpt, out, seed)
    t0 = time.time()
    config = start_cluster(ckpt, grpc_port, http_port)
    print(f"story cluster up in {time.time() - t0:.1f}s; gRPC at {grpc_target(config)}")
    try:
        return generate_story(
            grpc_target(config), prompt, segments, out, seed=seed, source=checkpoint_name(ckpt)
        )
    finally:
        serve.shutdown()
        ray.shutdown()


# -- the command: `seedstory demo` -------------------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory demo``, registered on the ``seedstory`` parser's subcommands."""
    demo_parser = commands.add_parser(
        "demo", help="start a local cluster and write a story with the embedded tiny model"
    )
    demo_parser.add_argument("--segments", type=int, default=4)
    demo_parser.add_argument("--out", default="story_out")
    # The embedded model is trained on StoryWorld's returning world: the opening names the whole
    # cast with its looks; later captions name them only, and friends leave and come back.
    demo_parser.add_argument("--prompt", default=DEMO_PROMPT)
    demo_parser.add_argument("--ckpt", help="checkpoint folder (default: the embedded tiny model)")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--grpc-port", type=int, help="default: ray_config.yaml's (9000)")
    demo_parser.add_argument("--http-port", type=int, help="default: ray_config.yaml's (8000)")
    demo_parser.set_defaults(func=run_command)
    return demo_parser


def run_command(args: argparse.Namespace) -> None:
    page = run_demo(
        Path(args.out),
        args.prompt,
        Path(args.ckpt) if args.ckpt else None,
        args.segments,
        args.seed,
        args.grpc_port,
        args.http_port,
    )
    print(f"story written: {page}")
