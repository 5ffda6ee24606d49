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
              in-process without Ray or gRPC: a StoryEngine stepped (StoryDriver) on the main thread, each finished
              picture's codes rendered by the Detokenizer on one worker thread, the served pipeline's shape.
              Serve + gRPC overhead per segment = (served - bare) / segments, also as % of the bare
              per-segment time; goal <= 10%. Served and bare run --repeats times each; medians are used.

    python benchmarks/serve_bench.py [--ckpt DIR] [--segments 10] [--concurrency 1 4 8] [--steps 20]
                                     [--grpc-port 9000] [--http-port 8000] [--out benchmarks/results]

The main-module guard matters: vLLM may spawn processes that re-import this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.card import portable

OPENING = "Once upon a time, Milo the red circle walks in the park."
TEMPERATURE, TOP_P = 0.8, 0.95
OVERLAP_GOAL, OVERHEAD_GOAL = 0.75, 10.0  # ratio; percent of the bare per-segment time


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="checkpoint (default: the embedded one, else a random-init tiny one under --scratch)")
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "seedstory-serve-bench")
    ap.add_argument("--segments", type=int, default=10, help="segments per story in the concurrency sweep")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per picture")
    ap.add_argument("--pipeline-segments", type=int, default=10, help="segments of the overlap/overhead story")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the served and of the bare story (median)")
    ap.add_argument("--grpc-port", type=int, default=9000)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args()


# -- figures shared by both paths -----------------------------------------------------------
def union_length(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval (renders of one story may overlap when batched)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def overlap(run: dict) -> dict:
    """End-to-end over the sum of the two stages' busy times; 1.0 = the stages ran one after the other."""
    render_busy = union_length([(s["render_start"], s["render_end"]) for s in run["segments"]])
    busy = run["mllm_s"] + render_busy
    return {"e2e_s": run["e2e_s"], "mllm_busy_s": run["mllm_s"], "render_busy_s": render_busy,
            "ratio": run["e2e_s"] / busy if busy > 0 else float("nan")}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["e2e_s"])[(len(runs) - 1) // 2]


# -- served --------------------------------------------------------------------------------
def start_served(ckpt: Path, a: argparse.Namespace) -> tuple[str, dict]:
    """Local Ray + the app from ray_config.yaml on the benchmark's ports; returns (gRPC target, config)."""
    import ray

    from cluster.serving import deploy, grpc_target, load_config, with_args, with_ports

    config = load_config()
    args = config["applications"][0]["args"]
    # Admission and engine batch must take the largest level whole: excess stories would be refused.
    most = max(a.concurrency)
    config = with_args(config, checkpoint=str(ckpt.resolve()),
                       max_stories_per_replica=max(most, args["max_stories_per_replica"]),
                       engine_max_stories=max(most, args["engine_max_stories"]))
    config = with_ports(config, a.grpc_port, a.http_port)
    session = ray.init(include_dashboard=False, log_to_driver=False).address_info["session_dir"]
    t0 = time.time()
    deploy(config)
    # Replica logs stay off the driver: say where they are.
    print(f"story cluster up in {time.time() - t0:.1f}s; gRPC at {grpc_target(config)}; logs in {session}/logs",
          flush=True)
    config["ray_session_dir"] = session
    return grpc_target(config), config


async def timed_story(client, caption: str, segments: int, steps: int, seed: int) -> dict:
    """One story over gRPC, with the client's clock at send, first caption, first picture and done."""
    from seedstory_client import Story, build_request

    request = build_request(caption, segments, temperature=TEMPERATURE, top_p=TOP_P, seed=seed, steps=steps,
                            render_seed=seed)
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
        raise RuntimeError(f"story {story.story_id} ended incomplete: {len(story.segments)} segments, "
                           f"stats {story.stats}")
    return {"sent": sent, "first_caption_s": seen["caption"] - sent, "first_image_s": seen["image"] - sent,
            "e2e_s": seen["done"] - sent, "mllm_s": story.stats["mllm_s"], "stats": story.stats,
            "output_tokens": story.stats["output_tokens"],
            "mllm_start": sent + story.stats["tokenize_s"],  # server clock = client clock: same machine
            "segments": [{"written_at": s.written_at, "codes_at": s.codes_at, "render_start": s.render_start,
                          "render_end": s.render_end} for s in story.segments],
            "codes": [s.visual_codes for s in story.segments],
            "delivery_ms_mean": 1000 * statistics.mean(delivery), "delivery_ms_p50": 1000 * statistics.median(delivery),
            "delivery_ms_max": 1000 * max(delivery)}


async def served_level(target: str, concurrency: int, segments: int, steps: int) -> dict:
    from seedstory_client import AsyncStoryClient

    async with AsyncStoryClient(target) as client:
        t0 = time.time()
        runs = await asyncio.gather(*(timed_story(client, OPENING, segments, steps, seed=i)
                                      for i in range(concurrency)))
        wall = time.time() - t0
    first_caption = [r["first_caption_s"] for r in runs]
    first_image = [r["first_image_s"] for r in runs]
    return {"concurrency": concurrency, "segments": segments, "wall_s": wall,
            "stories_per_min": concurrency / wall * 60,
            "first_caption_mean_s": statistics.mean(first_caption),
            "first_caption_p50_s": statistics.median(first_caption),
            "first_image_mean_s": statistics.mean(first_image), "first_image_p50_s": statistics.median(first_image),
            "story_total_mean_s": statistics.mean(r["e2e_s"] for r in runs),
            "server_total_mean_s": statistics.mean(r["stats"]["total_s"] for r in runs)}


def served(ckpt: Path, a: argparse.Namespace) -> dict:
    from ray import serve

    target, config = start_served(ckpt, a)
    try:
        t0 = time.time()
        asyncio.run(served_level(target, 1, 1, a.steps))  # warm-up: first calls of every pool
        print(f"warm-up story: {time.time() - t0:.1f}s", flush=True)
        levels = []
        for c in a.concurrency:
            levels.append(asyncio.run(served_level(target, c, a.segments, a.steps)))
            lv = levels[-1]
            print(f"{c} concurrent x {a.segments} segments: {lv['stories_per_min']:.2f} stories/min, first caption "
                  f"{lv['first_caption_mean_s']:.2f}s, first image {lv['first_image_mean_s']:.2f}s, "
                  f"story {lv['story_total_mean_s']:.1f}s", flush=True)
        runs = [asyncio.run(alone(target, a)) for _ in range(a.repeats)]
        deployments = {name: d.status for name, d in serve.status().applications["seedstory"].deployments.items()}
        return {"config_args": config["applications"][0]["args"], "levels": levels, "pipeline_runs": runs,
                "deployment_status": deployments, "ray_session_dir": config["ray_session_dir"]}
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


async def alone(target: str, a: argparse.Namespace) -> dict:
    """The overlap/overhead story: seed 0, nothing else running."""
    from seedstory_client import AsyncStoryClient

    async with AsyncStoryClient(target) as client:
        run = await timed_story(client, OPENING, a.pipeline_segments, a.steps, seed=0)
    print(f"served {a.pipeline_segments}-segment story: {run['e2e_s']:.2f}s "
          f"(overlap ratio {overlap(run)['ratio']:.2f})", flush=True)
    return run


# -- bare: the same pipeline in-process ----------------------------------------------------
def bare(ckpt: Path, config_args: dict, a: argparse.Namespace) -> list[dict]:
    import torch

    from actors.checkpoint import part_dir
    from actors.detokenizer.model import Detokenizer
    from actors.mllm.engine import EngineConfig, StoryEngine
    from actors.tokenizer.text import load_text_tokenizer
    from cluster.app import AppSettings

    # vLLM's CPU worker replaces torch.set_num_threads with a no-op once an engine is built: keep
    # the real one. One thread per stage, as the served pools run (Ray gives a 1-CPU actor 1 thread).
    set_threads = torch.set_num_threads
    set_threads(1)
    s = AppSettings.from_args(config_args)
    # The served MLLM replica's engine, but batching one story: same sink, same longest story, same KV pool.
    engine = StoryEngine(EngineConfig(str(ckpt), sink=s.sink, max_stories=1,
                                      max_story_segments=s.max_story_segments, kv_blocks=s.kv_blocks))
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    tok = load_text_tokenizer(part_dir(ckpt, "tokenizer"))
    pool = ThreadPoolExecutor(1, thread_name_prefix="render", initializer=set_threads, initargs=(1,))
    try:
        bare_story(engine, detok, tok, pool, 1, a.steps, s.limits.default_guidance, seed=1)  # warm-up
        runs = []
        for _ in range(a.repeats):
            runs.append(bare_story(engine, detok, tok, pool, a.pipeline_segments, a.steps,
                                   s.limits.default_guidance, seed=0))
            print(f"bare {a.pipeline_segments}-segment story: {runs[-1]['e2e_s']:.2f}s "
                  f"(overlap ratio {overlap(runs[-1])['ratio']:.2f})", flush=True)
        return runs
    finally:
        pool.shutdown()
        engine.shutdown()


def bare_story(engine, detok, tok, pool, segments: int, steps: int, guidance: float, seed: int) -> dict:
    """Write on this thread, render on the pool's: what the ingress does with two pools, minus Ray and gRPC."""
    from actors.mllm.driver import StoryDriver
    from actors.mllm.engine import Sampling
    from actors.mllm.events import CaptionWritten, PictureWritten, StoryEnd
    from actors.tokenizer.text import encode_segment

    t0 = time.time()
    # The TokenizerPool's prompt for a caption with no picture and no story so far.
    prompt = [engine.tokens.bos] + encode_segment(tok, engine.tokens, OPENING, None)
    mllm_start = time.time()
    engine.submit("bare", prompt, segments, Sampling(TEMPERATURE, TOP_P, seed))
    rows, renders, mllm_end, tokens = [], [], mllm_start, 0
    for step in StoryDriver(engine).steps():
        for ev in step.events:
            now = time.time()
            if isinstance(ev, CaptionWritten):
                rows.append({"written_at": now})
            elif isinstance(ev, PictureWritten):
                rows[ev.index]["codes_at"] = now
                # The ingress's render seed: the request's render_seed + the segment index.
                renders.append(pool.submit(render, detok, ev.codes, steps, guidance, (seed + ev.index) % (1 << 63)))
            elif isinstance(ev, StoryEnd):
                mllm_end, tokens = now, ev.output_tokens
    codes = []
    for row, job in zip(rows, renders):
        row["render_start"], row["render_end"], c = job.result()
        codes.append(c)
    end = time.time()
    return {"sent": t0, "mllm_start": mllm_start, "e2e_s": end - t0, "mllm_s": mllm_end - mllm_start,
            "output_tokens": tokens, "segments": rows, "codes": codes}


def render(detok, codes: list[int], steps: int, guidance: float, seed: int) -> tuple[float, float, list[int]]:
    """The DetokenizerPool's work for one picture, PNG encoding included."""
    from actors.imageio import to_png

    start = time.time()
    image = detok.render_seeded([codes], [seed], steps, guidance)[0]
    to_png(image)
    return start, time.time(), codes


# -- report --------------------------------------------------------------------------------
def machine(ckpt: Path) -> dict:
    import ray
    import torch
    import vllm

    from cluster.demo import EMBEDDED_CHECKPOINT

    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "load_avg_at_start": os.getloadavg(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "ray": ray.__version__, "checkpoint": str(ckpt.resolve()),
            "random_init": ckpt.resolve() != EMBEDDED_CHECKPOINT.resolve()}


def compare(served_runs: list[dict], bare_runs: list[dict], segments: int) -> dict:
    s, b = median_run(served_runs), median_run(bare_runs)
    per_segment = (s["e2e_s"] - b["e2e_s"]) / segments
    bare_per_segment = b["e2e_s"] / segments
    pct = 100 * per_segment / bare_per_segment
    return {"segments": segments, "served_e2e_s": s["e2e_s"], "bare_e2e_s": b["e2e_s"],
            "served_e2e_all_s": [r["e2e_s"] for r in served_runs], "bare_e2e_all_s": [r["e2e_s"] for r in bare_runs],
            "overhead_per_segment_s": per_segment, "bare_per_segment_s": bare_per_segment,
            "overhead_pct": pct, "goal_pct": OVERHEAD_GOAL, "goal_met": pct <= OVERHEAD_GOAL,
            # Where the time goes: the writing stage alone, served (MLLM replica) vs in-process.
            "served_mllm_s": s["mllm_s"], "bare_mllm_s": b["mllm_s"],
            "served_tokens_per_s": s["output_tokens"] / s["mllm_s"],
            "bare_tokens_per_s": b["output_tokens"] / b["mllm_s"],
            # The same seeds should give the same story both ways: else the two do different work.
            "same_codes": s["codes"] == b["codes"],
            # Per event, stage done (server) -> client: the served path's own latency, GIL effects aside.
            "served_delivery_ms": {k: s[f"delivery_ms_{k}"] for k in ("mean", "p50", "max")}}


def plot_timeline(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        t0, prev = run["sent"], run["mllm_start"]
        for k, seg in enumerate(run["segments"]):
            # A segment is written from the previous picture's last code to its own.
            ax.broken_barh([(prev - t0, seg["codes_at"] - prev)], (k - 0.4, 0.38), color="tab:blue",
                           label="MLLM writing" if k == 0 else None)
            ax.broken_barh([(seg["render_start"] - t0, seg["render_end"] - seg["render_start"])], (k + 0.02, 0.38),
                           color="tab:orange", label="de-tokenizer rendering" if k == 0 else None)
            ax.plot([seg["written_at"] - t0] * 2, [k - 0.4, k - 0.02], color="k", lw=1,
                    label="caption written" if k == 0 else None)
            prev = seg["codes_at"]
        ax.axvline(run["e2e_s"], color="grey", ls="--", label="done")
        ratio = overlap(run)["ratio"]
        ax.set(xlabel="seconds since send", title=f"{name}: {run['e2e_s']:.1f}s, overlap ratio {ratio:.2f}")
    axes[0][0].set(ylabel="segment", yticks=range(len(run["segments"])),
                   yticklabels=[str(k + 1) for k in range(len(run["segments"]))])
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def table(levels: list[dict], pipe: dict, cmp: dict) -> str:
    lines = ["| concurrency | stories/min | first caption mean / p50 s | first image mean / p50 s | story mean s |",
             "| --- | --- | --- | --- | --- |"]
    for lv in levels:
        lines.append(f"| {lv['concurrency']} | {lv['stories_per_min']:.2f} "
                     f"| {lv['first_caption_mean_s']:.2f} / {lv['first_caption_p50_s']:.2f} "
                     f"| {lv['first_image_mean_s']:.2f} / {lv['first_image_p50_s']:.2f} "
                     f"| {lv['story_total_mean_s']:.1f} |")
    return "\n".join(lines + ["", overlap_line(pipe, cmp["segments"]), overhead_lines(cmp)])


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def overlap_line(pipe: dict, segments: int) -> str:
    o = pipe["served"]
    return (f"pipeline overlap ({segments} segments, concurrency 1): e2e {o['e2e_s']:.2f}s / (MLLM "
            f"{o['mllm_busy_s']:.2f}s + de-tokenizer {o['render_busy_s']:.2f}s) = {o['ratio']:.2f} "
            f"(goal <= {OVERLAP_GOAL}: {verdict(pipe['goal_met'])}); in-process: {pipe['bare']['ratio']:.2f}")


def overhead_lines(cmp: dict) -> str:
    return (f"serve + gRPC overhead: served {cmp['served_e2e_s']:.2f}s vs bare {cmp['bare_e2e_s']:.2f}s (medians of "
            f"{len(cmp['served_e2e_all_s'])} / {len(cmp['bare_e2e_all_s'])} runs) -> "
            f"{1000 * cmp['overhead_per_segment_s']:.0f} ms per segment = {cmp['overhead_pct']:.1f}% of the bare "
            f"{cmp['bare_per_segment_s']:.2f}s per segment (goal <= {OVERHEAD_GOAL:.0f}%: {verdict(cmp['goal_met'])}); "
            f"same codes both ways: {cmp['same_codes']}\n"
            f"MLLM writing alone: served {cmp['served_mllm_s']:.2f}s ({cmp['served_tokens_per_s']:.0f} tok/s) vs "
            f"bare {cmp['bare_mllm_s']:.2f}s ({cmp['bare_tokens_per_s']:.0f} tok/s)\n"
            f"served event delivery (stage done on the server -> client): mean "
            f"{cmp['served_delivery_ms']['mean']:.1f} ms, p50 {cmp['served_delivery_ms']['p50']:.1f} ms, "
            f"max {cmp['served_delivery_ms']['max']:.1f} ms")


def main() -> None:
    from cluster.demo import ensure_checkpoint

    a = parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.scratch.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    ckpt = ensure_checkpoint(a.ckpt, a.scratch)
    info = machine(ckpt)
    print(f"checkpoint {info['checkpoint']} ({'random-init' if info['random_init'] else 'trained'}), "
          f"{info['cpus_usable']} CPUs, load {info['load_avg_at_start'][0]:.2f}", flush=True)
    srv = served(ckpt, a)
    bare_runs = bare(ckpt, srv["config_args"], a)
    s_run, b_run = median_run(srv["pipeline_runs"]), median_run(bare_runs)
    pipe = {"served": overlap(s_run), "bare": overlap(b_run), "goal": OVERLAP_GOAL}
    pipe["goal_met"] = pipe["served"]["ratio"] <= OVERLAP_GOAL
    cmp = compare(srv["pipeline_runs"], bare_runs, a.pipeline_segments)
    plot_timeline({"served (Ray Serve + gRPC)": s_run, "bare (in-process)": b_run}, a.out / "serve_bench_timeline.png")
    for run in srv["pipeline_runs"] + bare_runs:
        run.pop("codes")  # compared above; not worth the JSON
    result = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "concurrency": srv["levels"], "pipeline_overlap": pipe, "serve_overhead": cmp,
              "served_runs": srv["pipeline_runs"], "bare_runs": bare_runs,
              "deployment_status": srv["deployment_status"],
              "load_avg_at_end": os.getloadavg(), "wall_s": time.time() - t_start}
    (a.out / "serve_bench.json").write_text(portable(json.dumps(result, indent=1)) + "\n")
    print(table(srv["levels"], pipe, cmp))
    print(f"benchmark wall time {result['wall_s']:.0f}s; wrote {a.out / 'serve_bench.json'} and "
          f"{a.out / 'serve_bench_timeline.png'}")


if __name__ == "__main__":
    main()
