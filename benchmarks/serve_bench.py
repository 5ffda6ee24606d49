"""Benchmark: the served story cluster (Ray Serve + gRPC, ``ray_config.yaml``) on this machine.

What is measured, and how:
  throughput  For each concurrency C: C stories of --segments segments launched at once over gRPC
              (AsyncStoryClient, fixed seeds, temperature 0.8). Stories per minute = C / wall time x 60;
              per story, client-side, the time from send to the first caption and to the first picture,
              and to the done event.
  overlap     One story of 10 segments alone: end-to-end (client, send -> done) / (MLLM busy + de-tokenizer
              busy), MLLM busy = the server's stats["mllm_s"], de-tokenizer busy = the union of the story's
              [render_start, render_end] intervals. 1.0 means no overlap; goal <= 0.75. Its timeline (writing
              and rendering bars per segment) goes to serve_bench_timeline.png.
  overhead    After Ray is shut down, the same story (prompt, sampling seed, render seeds, steps) written
              in-process without Ray or gRPC: a StoryEngine stepped (StoryDriver) on the main thread,
              each finished picture's features rendered by the Detokenizer on one worker thread, the
              served pipeline's shape.
              Serve + gRPC overhead per segment = (served - bare) / segments, also as % of the bare
              per-segment time; goal <= 10%. Served and bare run --repeats times each; medians are used.

    python benchmarks/serve_bench.py [--ckpt DIR] [--segments 10] [--concurrency 1 4 8] [--steps 20]
                                     [--grpc-port 9000] [--http-port 8000] [--out benchmarks/results]

The figures, the timeline plot and the tables are computed in ``benchmarks/serve_bench_report.py``.
The main-module guard matters: vLLM may spawn processes that re-import this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve_bench_report import (  # its sibling: run as python benchmarks/serve_bench.py
    OVERLAP_GOAL,
    compare,
    machine,
    median_run,
    overlap,
    plot_timeline,
    table,
)

from training.card import portable

OPENING = "Once upon a time, Milo the red circle walks in the park."
TEMPERATURE, TOP_P = 0.8, 0.95


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ckpt",
        type=Path,
        default=None,
        help="checkpoint (default: the embedded one, else a random-init tiny one under --scratch)",
    )
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "seedstory-serve-bench")
    ap.add_argument("--segments", type=int, default=10, help="segments per story in the concurrency sweep")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per picture")
    ap.add_argument(
        "--pipeline-segments", type=int, default=10, help="segments of the overlap/overhead story"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs of the served and of the bare story (median)"
    )
    ap.add_argument("--grpc-port", type=int, default=9000)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args()


# -- served --------------------------------------------------------------------------------
def start_served(ckpt: Path, args: argparse.Namespace) -> tuple[str, dict]:
    """Local Ray + the app from ray_config.yaml on the benchmark's ports; returns (gRPC target, config)."""
    import ray

    from cluster.serving import deploy, grpc_target, load_config, with_args, with_ports

    config = load_config()
    app_args = config["applications"][0]["args"]
    # Admission and engine batch must take the largest level whole: excess stories would be refused.
    most = max(args.concurrency)
    config = with_args(
        config,
        checkpoint=str(ckpt.resolve()),
        max_stories_per_replica=max(most, app_args["max_stories_per_replica"]),
        engine_max_stories=max(most, app_args["engine_max_stories"]),
    )
    config = with_ports(config, args.grpc_port, args.http_port)
    session = ray.init(include_dashboard=False, log_to_driver=False).address_info["session_dir"]
    t0 = time.time()
    deploy(config)
    # Replica logs stay off the driver: say where they are.
    print(
        f"story cluster up in {time.time() - t0:.1f}s; gRPC at {grpc_target(config)}; logs in {session}/logs",
        flush=True,
    )
    config["ray_session_dir"] = session
    return grpc_target(config), config


async def timed_story(client, caption: str, segments: int, steps: int, seed: int) -> dict:
    """One story over gRPC, with the client's clock at send, first caption, first picture and done."""
    from seedstory_client import Story, build_request

    request = build_request(
        caption, segments, temperature=TEMPERATURE, top_p=TOP_P, seed=seed, steps=steps, render_seed=seed
    )
    story, seen, delivery = Story(), {}, []
    sent = time.time()
    async for ev in client.stream(request, timeout=900):
        now, kind = time.time(), ev.WhichOneof("event")
        story.add(ev)
        seen.setdefault(kind, now)
        # What Serve + gRPC add to each event: from the stage finishing (server clock) to the client.
        if kind in ("caption", "image"):
            delivery.append(now - (ev.caption.written_at if kind == "caption" else ev.image.render_end))
    if not story.complete:
        raise RuntimeError(
            f"story {story.story_id} ended incomplete: {len(story.segments)} segments, stats {story.stats}"
        )
    return {
        "sent": sent,
        "first_caption_s": seen["caption"] - sent,
        "first_image_s": seen["image"] - sent,
        "e2e_s": seen["done"] - sent,
        "mllm_s": story.stats["mllm_s"],
        "stats": story.stats,
        "output_tokens": story.stats["output_tokens"],
        "mllm_start": sent + story.stats["tokenize_s"],  # server clock = client clock: same machine
        "segments": [
            {
                "written_at": s.written_at,
                "features_at": s.features_at,
                "render_start": s.render_start,
                "render_end": s.render_end,
            }
            for s in story.segments
        ],
        "features": [s.features for s in story.segments],  # the wire bytes (actors/features.py)
        "delivery_ms_mean": 1000 * statistics.mean(delivery),
        "delivery_ms_p50": 1000 * statistics.median(delivery),
        "delivery_ms_max": 1000 * max(delivery),
    }


async def served_level(target: str, concurrency: int, segments: int, steps: int) -> dict:
    from seedstory_client import AsyncStoryClient

    async with AsyncStoryClient(target) as client:
        t0 = time.time()
        runs = await asyncio.gather(
            *(timed_story(client, OPENING, segments, steps, seed=i) for i in range(concurrency))
        )
        wall = time.time() - t0
    first_caption = [r["first_caption_s"] for r in runs]
    first_image = [r["first_image_s"] for r in runs]
    return {
        "concurrency": concurrency,
        "segments": segments,
        "wall_s": wall,
        "stories_per_min": concurrency / wall * 60,
        "first_caption_mean_s": statistics.mean(first_caption),
        "first_caption_p50_s": statistics.median(first_caption),
        "first_image_mean_s": statistics.mean(first_image),
        "first_image_p50_s": statistics.median(first_image),
        "story_total_mean_s": statistics.mean(r["e2e_s"] for r in runs),
        "server_total_mean_s": statistics.mean(r["stats"]["total_s"] for r in runs),
    }


def served(ckpt: Path, args: argparse.Namespace) -> dict:
    from ray import serve

    target, config = start_served(ckpt, args)
    try:
        t0 = time.time()
        asyncio.run(served_level(target, 1, 1, args.steps))  # warm-up: first calls of every pool
        print(f"warm-up story: {time.time() - t0:.1f}s", flush=True)
        levels = []
        for concurrency in args.concurrency:
            levels.append(asyncio.run(served_level(target, concurrency, args.segments, args.steps)))
            level = levels[-1]
            print(
                f"{concurrency} concurrent x {args.segments} segments: {level['stories_per_min']:.2f} "
                f"stories/min, first caption {level['first_caption_mean_s']:.2f}s, first image "
                f"{level['first_image_mean_s']:.2f}s, story {level['story_total_mean_s']:.1f}s",
                flush=True,
            )
        runs = [asyncio.run(alone(target, args)) for _ in range(args.repeats)]
        deployments = {
            name: d.status for name, d in serve.status().applications["seedstory"].deployments.items()
        }
        return {
            "config_args": config["applications"][0]["args"],
            "levels": levels,
            "pipeline_runs": runs,
            "deployment_status": deployments,
            "ray_session_dir": config["ray_session_dir"],
        }
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


async def alone(target: str, args: argparse.Namespace) -> dict:
    """The overlap/overhead story: seed 0, nothing else running."""
    from seedstory_client import AsyncStoryClient

    async with AsyncStoryClient(target) as client:
        run = await timed_story(client, OPENING, args.pipeline_segments, args.steps, seed=0)
    print(
        f"served {args.pipeline_segments}-segment story: {run['e2e_s']:.2f}s "
        f"(overlap ratio {overlap(run)['ratio']:.2f})",
        flush=True,
    )
    return run


# -- bare: the same pipeline in-process ----------------------------------------------------
def bare(ckpt: Path, config_args: dict, args: argparse.Namespace) -> list[dict]:
    import torch

    from actors.checkpoint import part_dir
    from actors.detokenizer.model import Detokenizer
    from actors.mllm.engine import EngineConfig, StoryEngine
    from actors.tokenizer.text import load_text_tokenizer
    from cluster.settings import AppSettings

    # vLLM's CPU worker replaces torch.set_num_threads with a no-op once an engine is built: keep
    # the real one. One thread per stage, as the served pools run (Ray gives a 1-CPU actor 1 thread).
    set_threads = torch.set_num_threads
    set_threads(1)
    settings = AppSettings.from_args(config_args)
    # The served MLLM replica's engine, but batching one story: same sink, same longest story, same
    # KV pool.
    engine = StoryEngine(
        EngineConfig(
            str(ckpt),
            sink=settings.sink,
            max_stories=1,
            max_story_segments=settings.max_story_segments,
            kv_blocks=settings.kv_blocks,
        )
    )
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    text_tokenizer = load_text_tokenizer(part_dir(ckpt, "tokenizer"))
    pool = ThreadPoolExecutor(1, thread_name_prefix="render", initializer=set_threads, initargs=(1,))
    try:
        guidance = settings.limits.default_guidance
        bare_story(engine, detok, text_tokenizer, pool, 1, args.steps, guidance, seed=1)  # warm-up
        runs = []
        for _ in range(args.repeats):
            runs.append(
                bare_story(
                    engine, detok, text_tokenizer, pool, args.pipeline_segments, args.steps, guidance, seed=0
                )
            )
            print(
                f"bare {args.pipeline_segments}-segment story: {runs[-1]['e2e_s']:.2f}s "
                f"(overlap ratio {overlap(runs[-1])['ratio']:.2f})",
                flush=True,
            )
        return runs
    finally:
        pool.shutdown()
        engine.shutdown()


def bare_story(
    engine, detok, text_tokenizer, pool, segments: int, steps: int, guidance: float, seed: int
) -> dict:
    """Write on this thread, render on the pool's: what the ingress does with two pools, minus Ray
    and gRPC."""
    from actors.features import to_bytes
    from actors.mllm.driver import StoryDriver
    from actors.mllm.engine import Sampling
    from actors.mllm.events import CaptionWritten, PictureWritten, StoryEnd
    from actors.tokenizer.text import encode_segment

    t0 = time.time()
    # The TokenizerPool's prompt for a caption with no picture and no story so far.
    prompt = [engine.tokens.bos] + encode_segment(text_tokenizer, engine.tokens, OPENING, picture=False)
    mllm_start = time.time()
    engine.submit("bare", prompt, segments, Sampling(TEMPERATURE, TOP_P, seed))
    rows, renders, mllm_end, tokens = [], [], mllm_start, 0
    for step in StoryDriver(engine).steps():
        for ev in step.events:
            now = time.time()
            if isinstance(ev, CaptionWritten):
                rows.append({"written_at": now})
            elif isinstance(ev, PictureWritten):
                rows[ev.index]["features_at"] = now
                # The ingress's render seed: the request's render_seed + the segment index.
                renders.append(
                    pool.submit(render, detok, ev.features, steps, guidance, (seed + ev.index) % (1 << 63))
                )
            elif isinstance(ev, StoryEnd):
                mllm_end, tokens = now, ev.output_tokens
    features = []
    for row, job in zip(rows, renders):
        row["render_start"], row["render_end"], picture_features = job.result()
        features.append(to_bytes(picture_features))  # as the service sends them, to compare
    end = time.time()
    return {
        "sent": t0,
        "mllm_start": mllm_start,
        "e2e_s": end - t0,
        "mllm_s": mllm_end - mllm_start,
        "output_tokens": tokens,
        "segments": rows,
        "features": features,
    }


def render(detok, features, steps: int, guidance: float, seed: int) -> tuple[float, float, object]:
    """The DetokenizerPool's work for one picture (features (Q, D)), PNG encoding included."""
    from actors.imageio import to_png

    start = time.time()
    image = detok.render_seeded([features], [seed], steps, guidance)[0]
    to_png(image)
    return start, time.time(), features


def main() -> None:
    from cluster.demo import ensure_checkpoint

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    ckpt = ensure_checkpoint(args.ckpt, args.scratch)
    info = machine(ckpt)
    print(
        f"checkpoint {info['checkpoint']} ({'random-init' if info['random_init'] else 'trained'}), "
        f"{info['cpus_usable']} CPUs, load {info['load_avg_at_start'][0]:.2f}",
        flush=True,
    )
    served_result = served(ckpt, args)
    bare_runs = bare(ckpt, served_result["config_args"], args)
    served_run, bare_run = median_run(served_result["pipeline_runs"]), median_run(bare_runs)
    pipe = {"served": overlap(served_run), "bare": overlap(bare_run), "goal": OVERLAP_GOAL}
    pipe["goal_met"] = pipe["served"]["ratio"] <= OVERLAP_GOAL
    cmp = compare(served_result["pipeline_runs"], bare_runs, args.pipeline_segments)
    plot_timeline(
        {"served (Ray Serve + gRPC)": served_run, "bare (in-process)": bare_run},
        args.out / "serve_bench_timeline.png",
    )
    for run in served_result["pipeline_runs"] + bare_runs:
        run.pop("features")  # compared above; not worth the JSON
    result = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "concurrency": served_result["levels"],
        "pipeline_overlap": pipe,
        "serve_overhead": cmp,
        "served_runs": served_result["pipeline_runs"],
        "bare_runs": bare_runs,
        "deployment_status": served_result["deployment_status"],
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.time() - t_start,
    }
    (args.out / "serve_bench.json").write_text(portable(json.dumps(result, indent=1)) + "\n")
    print(table(served_result["levels"], pipe, cmp))
    print(
        f"benchmark wall time {result['wall_s']:.0f}s; wrote {args.out / 'serve_bench.json'} and "
        f"{args.out / 'serve_bench_timeline.png'}"
    )


if __name__ == "__main__":
    main()
