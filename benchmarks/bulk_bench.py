"""Bulk (Ray Data job) against online (gRPC service) stories per minute, on one machine, in one run.

    python benchmarks/bulk_bench.py [--ckpt DIR] [--prompts 32] [--segments 10] [--steps 20]

The same prompts, segments and denoising steps both ways, on one local Ray: first the bulk job
(`cluster.bulk.run_bulk`, batches of 8 stories, one actor per stage), then the Serve app from
ray_config.yaml driven over gRPC with 8 stories in flight (the MLLM replica batches 8). Writes
bulk_bench.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from training.card import portable

IN_FLIGHT = 8


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "seedstory-bulk-bench")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args()


def captions(n: int) -> list[str]:
    return [f"Once upon a time, Milo the red circle walks in the park, day {i}." for i in range(n)]


def bulk(ckpt: Path, args: argparse.Namespace) -> dict:
    import shutil

    from cluster.bulk import BulkConfig, run_bulk
    from cluster.bulk_output import read_stories

    prompts, out = args.scratch / "prompts.parquet", args.scratch / "bulk-out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing to skip
    pq.write_table(pa.table({"caption": captions(args.prompts)}), prompts)
    summary = run_bulk(
        BulkConfig(str(prompts), str(out), str(ckpt), args.segments, args.steps, stories_per_batch=IN_FLIGHT)
    )
    assert read_stories(out).num_rows == args.prompts * args.segments
    return {
        "stories": summary["stories"],
        "seconds": summary["seconds"],
        "stories_per_min": summary["stories"] / summary["seconds"] * 60,
    }


async def online_stories(target: str, args: argparse.Namespace) -> int:
    from seedstory_client import AsyncStoryClient

    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(client, caption: str, seed: int) -> bool:
        async with gate:
            story = await client.generate(caption, args.segments, seed=seed, steps=args.steps)
            return story.complete and len(story.segments) == args.segments

    async with AsyncStoryClient(target) as client:
        done = await asyncio.gather(*(one(client, c, i) for i, c in enumerate(captions(args.prompts))))
    return sum(done)


def online(ckpt: Path, args: argparse.Namespace) -> dict:
    from ray import serve

    from cluster.serving import deploy, grpc_target, load_config, with_args

    config = with_args(
        load_config(), checkpoint=str(ckpt), max_stories_per_replica=IN_FLIGHT, engine_max_stories=IN_FLIGHT
    )
    deploy(config)
    try:
        t0 = time.time()
        stories = asyncio.run(online_stories(grpc_target(config), args))
        seconds = time.time() - t0
    finally:
        serve.shutdown()
    return {"stories": stories, "seconds": seconds, "stories_per_min": stories / seconds * 60}


def main() -> None:
    import ray

    from cluster.demo import ensure_checkpoint

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(args.ckpt, args.scratch).resolve()
    ray.init(include_dashboard=False, log_to_driver=False)
    result = {
        "prompts": args.prompts,
        "segments": args.segments,
        "steps": args.steps,
        "in_flight": IN_FLIGHT,
        "checkpoint": str(ckpt),
        "bulk": bulk(ckpt, args),
        "online": online(ckpt, args),
    }
    ray.shutdown()
    (args.out / "bulk_bench.json").write_text(portable(json.dumps(result, indent=1)) + "\n")
    for path in ("bulk", "online"):
        measured = result[path]
        print(
            f"{path}: {measured['stories']} stories x {args.segments} segments in "
            f"{measured['seconds']:.1f}s = {measured['stories_per_min']:.2f} stories/min"
        )


if __name__ == "__main__":
    main()
