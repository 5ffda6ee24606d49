"""Benchmark: does the served cluster's throughput grow with load? Variants of the render path on the
same seeds, each on a fresh local cluster with fixed replica counts (no autoscaling lag).

Per variant: a fresh local Ray on this machine's CPUs, the app from ``ray_config.yaml`` with the
variant's settings, every pool at a fixed replica count, a warm-up level that reaches every
replica, then for each concurrency C, ``--repeats`` times: C stories of ``--segments`` segments
sent at once over gRPC (seeds 0..C-1, temperature 0.8). Per level, medians and spreads (min, max)
over the repeats of:
  stories/min        C / wall time x 60
  first picture      send -> first ImageEvent, the median over the level's stories
  render batches     pictures per de-tokenizer call (pictures of one call share their render
                     start and end), as a histogram
  MLLM busy          CPU seconds of the MLLMPool replica process per wall second
  pool CPU           the same for every pool's replica processes
  per-core busy      each core's busy share, from /proc/stat

    python benchmarks/serve_load.py [--variants today two-replicas batched batched-fewer-steps \\
        new-defaults] [--concurrency 1 2 4 8 16] [--matrix-concurrency 1 8] [--repeats 3] [--segments 10]

The last variant runs every ``--concurrency`` level; the others the ``--matrix-concurrency``
levels. Writes ``--out``/serve_load.json and serve_load.png. The main-module guard matters: vLLM
may spawn processes that re-import this file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from serve_bench import OPENING, TEMPERATURE, TOP_P  # its sibling: the same story and sampling

from training.card import portable  # paths as a reader would type them, never this machine's

POOLS = ("StoryIngress", "TokenizerPool", "MLLMPool", "DetokenizerPool")
# The settings before the render-throughput work, with the CPU reservations they had.
TODAY = {"exact_renders": True, "render_slots": 1, "sampler": "euler", "guidance_until": 1.0}
TODAY_CPUS = {"StoryIngress": 0.1, "TokenizerPool": 0.25, "MLLMPool": 1, "DetokenizerPool": 0.5}
VARIANTS = {
    "today": {"args": TODAY, "steps": 20, "detok_replicas": 1, "cpus": TODAY_CPUS},
    "two-replicas": {"args": TODAY, "steps": 20, "detok_replicas": 2, "cpus": None},
    "batched": {"args": {**TODAY, "render_slots": 4}, "steps": 20, "detok_replicas": 2, "cpus": None},
    "batched-fewer-steps": {"args": {"render_slots": 4}, "steps": None, "detok_replicas": 2, "cpus": None},
    "new-defaults": {"args": {}, "steps": None, "detok_replicas": 2, "cpus": None},  # ray_config.yaml as is
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--matrix-concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args()


# -- the machine: per-core and per-process CPU ----------------------------------------------------
def core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            idle = values[3] + values[4]  # idle + iowait
            times[name] = (sum(values) - idle, sum(values))
    return times


def core_busy(before: dict, after: dict) -> dict[str, float]:
    return {
        core: round((after[core][0] - before[core][0]) / max(1, after[core][1] - before[core][1]), 3)
        for core in before
    }


def replica_processes() -> dict[str, list[int]]:
    """Pool name -> pids of its replica processes (Ray titles them after the deployment)."""
    pools: dict[str, list[int]] = {pool: [] for pool in POOLS}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for pool in POOLS:
            if "ServeReplica" in title and pool in title:
                pools[pool].append(int(entry.name))
    return pools


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their threads so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


# -- one story, one level -------------------------------------------------------------------------
async def timed_story(client, segments: int, steps: int | None, seed: int) -> dict:
    from seedstory_client import Story, build_request

    options = {"steps": steps} if steps else {}
    request = build_request(
        OPENING, segments, temperature=TEMPERATURE, top_p=TOP_P, seed=seed, render_seed=seed, **options
    )
    story, sent, first_picture = Story(), time.time(), None
    async for event in client.stream(request, timeout=1800):
        story.add(event)
        if first_picture is None and event.WhichOneof("event") == "image":
            first_picture = time.time() - sent
    if not story.complete:
        raise RuntimeError(f"story {seed} ended incomplete: {len(story.segments)} segments")
    renders = [(s.render_start, s.render_end) for s in story.segments]
    return {
        "first_picture_s": first_picture,
        "renders": renders,
        "mllm_s": story.stats["mllm_s"],
        "pngs": [s.png for s in story.segments],
    }


async def level(target: str, concurrency: int, segments: int, steps: int | None, pools: dict) -> dict:
    from seedstory_client import AsyncStoryClient

    cores, cpu = core_times(), {pool: cpu_seconds(pids) for pool, pids in pools.items()}
    async with AsyncStoryClient(target) as client:
        start = time.time()
        stories = await asyncio.gather(
            *(timed_story(client, segments, steps, seed) for seed in range(concurrency))
        )
        wall = time.time() - start
    calls = Counter(render for story in stories for render in story["renders"])  # a call: its (start, end)
    return {
        "wall_s": round(wall, 2),
        "stories_per_min": round(concurrency / wall * 60, 3),
        "first_picture_s": round(statistics.median(s["first_picture_s"] for s in stories), 3),
        "render_batches": dict(sorted(Counter(calls.values()).items())),
        "pool_cpu": {pool: round((cpu_seconds(pids) - cpu[pool]) / wall, 3) for pool, pids in pools.items()},
        "core_busy": core_busy(cores, core_times()),
        "story0_pngs": [
            hashlib.sha256(png).hexdigest()[:16] for png in stories[0]["pngs"]
        ],  # seed 0's pictures
    }


def spread(runs: list[dict], key: str) -> dict:
    values = [run[key] for run in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(concurrency: int, runs: list[dict]) -> dict:
    pools = {pool: statistics.median(run["pool_cpu"][pool] for run in runs) for pool in POOLS}
    cores = {core: statistics.median(run["core_busy"][core] for run in runs) for core in runs[0]["core_busy"]}
    batches = Counter()
    for run in runs:
        batches.update({int(size): count for size, count in run["render_batches"].items()})
    return {
        "concurrency": concurrency,
        "stories_per_min": spread(runs, "stories_per_min"),
        "first_picture_s": spread(runs, "first_picture_s"),
        "render_batches": dict(sorted(batches.items())),
        "pool_cpu": pools,
        "core_busy": cores,
        "runs": runs,
    }


# -- one variant on a fresh cluster ----------------------------------------------------------------
def variant_config(name: str, args: argparse.Namespace, most: int) -> dict:
    from cluster.serving import load_config, with_args, with_deployment, with_ports

    spec = VARIANTS[name]
    config = load_config()
    app_args = config["applications"][0]["args"]
    config = with_args(
        config,
        checkpoint=str(args.ckpt.resolve()),
        **spec["args"],
        max_stories_per_replica=max(most, app_args["max_stories_per_replica"]),
        engine_max_stories=max(most, app_args["engine_max_stories"]),
    )
    for dep in config["applications"][0]["deployments"]:
        replicas = spec["detok_replicas"] if dep["name"] == "DetokenizerPool" else 1
        options = {"num_replicas": replicas}
        if spec["cpus"]:
            options["ray_actor_options"] = {**dep["ray_actor_options"], "num_cpus": spec["cpus"][dep["name"]]}
        config = with_deployment(config, dep["name"], **options)
    return with_ports(config, args.grpc_port, args.http_port)


def run_variant(name: str, levels: list[int], args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from cluster.serving import deploy, grpc_target

    config = variant_config(name, args, max(levels))
    steps = VARIANTS[name]["steps"]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        started = time.time()
        deploy(config)
        target, pools = grpc_target(config), replica_processes()
        print(f"[{name}] up in {time.time() - started:.0f}s; replica processes {pools}", flush=True)
        asyncio.run(level(target, 4, 2, steps, pools))  # warm-up: four stories reach every replica
        results = []
        for concurrency in levels:
            runs = [
                asyncio.run(level(target, concurrency, args.segments, steps, pools))
                for _ in range(args.repeats)
            ]
            results.append(summarise(concurrency, runs))
            print(
                f"[{name}] {concurrency} concurrent: {results[-1]['stories_per_min']} stories/min, "
                f"batches {results[-1]['render_batches']}, cores {results[-1]['core_busy']}, "
                f"pools {results[-1]['pool_cpu']}",
                flush=True,
            )
        return {
            "name": name,
            "steps": steps,
            "app_args": {
                **config["applications"][0]["args"],
                "checkpoint": portable(str(args.ckpt.resolve())),
            },
            "levels": results,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


# -- output ----------------------------------------------------------------------------------------
def plot(variants: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in variants:
        xs = [lv["concurrency"] for lv in variant["levels"]]
        mid = [lv["stories_per_min"]["median"] for lv in variant["levels"]]
        low = [lv["stories_per_min"]["median"] - lv["stories_per_min"]["min"] for lv in variant["levels"]]
        high = [lv["stories_per_min"]["max"] - lv["stories_per_min"]["median"] for lv in variant["levels"]]
        ax.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, label=variant["name"])
    ax.set(
        xscale="log",
        xlabel="concurrent 10-segment stories",
        ylabel="stories/min",
        title="Served throughput against load (2 cores, embedded tiny)",
    )
    ax.set_xticks(sorted({lv["concurrency"] for v in variants for lv in v["levels"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    variants = []
    for index, name in enumerate(args.variants):
        levels = args.concurrency if index == len(args.variants) - 1 else args.matrix_concurrency
        variants.append(run_variant(name, levels, args))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cpus": os.cpu_count()},
        "segments": args.segments,
        "repeats": args.repeats,
        "variants": variants,
    }
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(variants, args.out / "serve_load.png")
    print(f"wrote {args.out / 'serve_load.json'} and serve_load.png", flush=True)


if __name__ == "__main__":
    main()
