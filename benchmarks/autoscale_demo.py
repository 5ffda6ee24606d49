"""Autoscaling, shown: the DetokenizerPool scales up from 1 replica under gRPC load, and back down.

    python benchmarks/autoscale_demo.py [--ckpt DIR] [--stories 8] [--load-s 90] [--idle-s 60]

A local Ray with the app from ray_config.yaml; the de-tokenizer's replicas take 0.1 CPU each (so
four fit beside the other pools on 2 cores) and autoscale on 1 ongoing render per replica. The
script keeps --stories stories in flight over gRPC for --load-s seconds, then stops and waits
--idle-s seconds, sampling the replica count every half second. Writes autoscale.json and
autoscale.png (replicas and stories in flight against time) to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

APP, POOL = "seedstory", "DetokenizerPool"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 3,
    "downscale_delay_s": 15,
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--stories", type=int, default=8, help="stories kept in flight during the load phase")
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--load-s", type=float, default=90)
    ap.add_argument("--idle-s", type=float, default=60)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args()


def start(ckpt: Path, stories: int) -> str:
    import ray

    from cluster.serving import deploy, grpc_target, load_config, with_args, with_deployment

    config = with_args(
        load_config(),
        checkpoint=str(ckpt.resolve()),
        max_stories_per_replica=stories,
        engine_max_stories=stories,
    )
    config = with_deployment(
        config, POOL, autoscaling_config=AUTOSCALING, ray_actor_options={"num_cpus": 0.1}
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    deploy(config)
    return grpc_target(config)


def replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments[POOL].replica_states
    return states.get("RUNNING", 0)


def load(target: str, args: argparse.Namespace, stop: threading.Event, in_flight: list[int]) -> None:
    """One thread per story slot: each writes stories back to back until told to stop."""
    from seedstory_client import StoryClient

    def slot(index: int) -> None:
        with StoryClient(target) as client:
            written = 0  # stories this slot has started
            while not stop.is_set():
                in_flight[0] += 1
                try:
                    client.generate(
                        f"Once upon a time, Milo the red circle walks in the park {index}.",
                        args.segments,
                        seed=index * 1000 + written,
                        steps=20,
                    )
                finally:
                    in_flight[0] -= 1
                written += 1

    threads = [threading.Thread(target=slot, args=(k,), daemon=True) for k in range(args.stories)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()


def sample(t0: float, until: float, in_flight: list[int], rows: list[dict]) -> None:
    while time.time() < until:
        rows.append(
            {"t": round(time.time() - t0, 2), "replicas": replicas(), "stories_in_flight": in_flight[0]}
        )
        time.sleep(0.5)


def plot(rows: list[dict], load_end: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    times = [r["t"] for r in rows]
    ax.step(
        times, [r["replicas"] for r in rows], where="post", label="DetokenizerPool replicas (RUNNING)", lw=2
    )
    ax.plot(
        times,
        [r["stories_in_flight"] for r in rows],
        color="grey",
        alpha=0.6,
        label="stories in flight (gRPC)",
    )
    ax.axvspan(0, load_end, color="tab:orange", alpha=0.1, label="load phase")
    ax.set(xlabel="seconds", ylabel="count", title="DetokenizerPool autoscaling on a 2-core machine")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from ray import serve

    from cluster.demo import ensure_checkpoint

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(args.ckpt, Path(tempfile.gettempdir()) / "seedstory-autoscale")
    target = start(ckpt, args.stories)
    stop, in_flight, rows = threading.Event(), [0], []
    driver = threading.Thread(target=load, args=(target, args, stop, in_flight))
    t0 = time.time()
    driver.start()
    try:
        sample(t0, t0 + args.load_s, in_flight, rows)
        stop.set()
        load_end = time.time() - t0
        sample(t0, time.time() + args.idle_s, in_flight, rows)
        driver.join()
    finally:
        stop.set()
        serve.shutdown()
    peak = max(r["replicas"] for r in rows)
    final = rows[-1]["replicas"]
    up = next((r["t"] for r in rows if r["replicas"] > 1), None)
    down = next((r["t"] for r in rows if r["t"] > load_end and r["replicas"] == 1), None)
    result = {
        "autoscaling_config": AUTOSCALING,
        "stories": args.stories,
        "segments": args.segments,
        "load_s": load_end,
        "peak_replicas": peak,
        "final_replicas": final,
        "first_scale_up_t": up,
        "back_to_one_t": down,
        "samples": rows,
    }
    (args.out / "autoscale.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, load_end, args.out / "autoscale.png")
    print(
        f"DetokenizerPool: 1 -> {peak} replicas (first scale-up at {up}s), load stopped at {load_end:.0f}s, "
        f"back to 1 at {down}s; final {final}. Wrote {args.out / 'autoscale.png'}"
    )


if __name__ == "__main__":
    main()
