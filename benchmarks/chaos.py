"""Chaos benchmark: stories keep flowing while pool replicas die and a node goes away.

What is run:
  A local Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``: two raylets),
  the app from ray_config.yaml with two replicas of every deployment (Serve spreads them over the
  nodes) and the gRPC proxy on the head. --clients threads keep one story each in flight for
  --minutes (8 stories at any time), each with ``StoryClient.generate(resume=True)``.
  Every --kill-every seconds a random pool (tokenizer, MLLM, de-tokenizer) loses a random replica to
  ``ray.kill``; once, at --node-at seconds, the second node is removed (as when Kubernetes evicts a
  pod) and a fresh node joins --node-back seconds later.

What is reported (benchmarks/results/chaos.json, and a table on stdout):
  stories      started, completed, failed (an error reached the caller)
  integrity    over every story: captions or pictures received twice for one index (duplicates), and
               indexes missing from a story that ended (gaps)
  kill cost    for each fault and each story in flight at that moment: the gap between the story's
               last event before the fault and its first event after it, p50 and p95, beside the
               same for all other event gaps (the undisturbed baseline)
  recovery     for each fault: seconds until each deployment that lost a replica has a new one for
               each lost and all RUNNING (for the node removal: every deployment it hit)

    python benchmarks/chaos.py [--ckpt checkpoints/tiny] [--minutes 5] [--clients 8] [--segments 10]

The main-module guard matters: vLLM may spawn processes that re-import this file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

POOLS = ("TokenizerPool", "MLLMPool", "DetokenizerPool")
APP = "seedstory"
OPENINGS = (
    "Once upon a time, Milo the red circle walks in the park.",
    "Once upon a time, Bea the blue square runs in the forest.",
    "Once upon a time, Kip the green triangle sits on the beach.",
    "Once upon a time, Zara the yellow diamond jumps in the city.",
)


@dataclass
class StoryLog:
    """What one client saw of one story."""

    started: float
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (time, caption|image, index)
    ended: float = 0.0
    error: str = ""
    resumes: int = 0
    segments: int = 0

    def on_event(self, ev) -> None:
        kind = ev.WhichOneof("event")
        if kind in ("caption", "image"):
            self.events.append((time.time(), kind, getattr(ev, kind).index))

    def duplicates(self) -> int:
        counts = Counter((kind, index) for _, kind, index in self.events)
        return sum(n - 1 for n in counts.values())

    def gaps(self) -> int:
        """Indexes a story that ended without an error lacks a caption or a picture for."""
        if self.error:
            return 0
        have = {(kind, index) for _, kind, index in self.events}
        return sum((kind, i) not in have for kind in ("caption", "image") for i in range(self.segments))


# -- the cluster -------------------------------------------------------------------------------
def start_cluster():
    from ray.cluster_utils import Cluster

    # Each node's 2 CPUs fit one replica of every deployment (their num_cpus in ray_config.yaml).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 << 20})
    second = cluster.add_node(num_cpus=2, object_store_memory=300 << 20)
    return cluster, second


def serve_config(ckpt: str, max_resumes: int) -> dict:
    from cluster.serving import load_config, with_args, with_deployment

    config = with_args(load_config(), checkpoint=ckpt, max_resumes=max_resumes)
    config["proxy_location"] = "HeadOnly"  # two proxies on one machine would want the same port
    for name in ("StoryIngress", *POOLS):
        config = with_deployment(config, name, num_replicas=2)
    return config


def replicas(deployment: str) -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"{APP}#{deployment}#" in a["name"]
    ]


def running(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def wait_back(deployments, before: dict[str, set], since: float, timeout: float = 300) -> float | None:
    """Seconds from ``since`` until each deployment that lost replicas (named in ``before``, alive
    then) has as many new ones and all its replicas RUNNING; None if not within ``timeout``."""
    time.sleep(5)  # the dead leave the actor list within moments; look then at who is missing
    lost = {d for d in deployments if before[d] - set(replicas(d))}
    while time.time() - since < timeout:
        try:
            if lost and all(back(d, before[d]) for d in lost):
                return time.time() - since
        except Exception:  # the controller may be busy moving replicas; ask again
            pass
        time.sleep(0.5)
    return None


def back(deployment: str, before: set) -> bool:
    alive = set(replicas(deployment))
    return len(alive - before) >= len(before - alive) and running(deployment) >= len(before)


# -- faults ------------------------------------------------------------------------------------
def chaos(cluster, second, args, faults: list[dict]) -> None:
    """Faults on the clock until --minutes are up: a kill every --kill-every seconds, except that the
    one due first after --node-at removes the second node; a fresh node joins --node-back later.
    Runs on the main thread: Ray adds nodes only from there (recovery is timed on the side)."""
    rng = random.Random(args.seed)
    start, end = time.time(), time.time() + args.minutes * 60
    plan = [start + k * args.kill_every for k in range(1, int(args.minutes * 60 // args.kill_every) + 1)]
    node_at = min((t for t in plan if t - start >= args.node_at), default=None)
    for t in plan:
        time.sleep(max(t - time.time(), 0))
        if t == node_at:
            fault(faults, "node removed", ("StoryIngress", *POOLS), lambda: cluster.remove_node(second))
            time.sleep(args.node_back)
            cluster.add_node(num_cpus=2, object_store_memory=300 << 20)  # the pod comes back elsewhere
            continue
        pool = rng.choice(POOLS)
        names = replicas(pool)
        if names:  # the victim is drawn now: fault() calls the kill at once, after noting who is alive
            fault(faults, f"{pool} replica killed", (pool,), functools.partial(kill, rng.choice(names)))
    time.sleep(max(end - time.time(), 0))


def fault(faults: list[dict], kind: str, deployments, act) -> None:
    before = {d: set(replicas(d)) for d in deployments}
    record = {"kind": kind, "at": time.time(), "back_s": None}
    act()
    faults.append(record)
    threading.Thread(
        target=lambda: record.update(back_s=wait_back(deployments, before, record["at"])), daemon=True
    ).start()


def kill(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


# -- stories -----------------------------------------------------------------------------------
def client_loop(target: str, args, stop: threading.Event, logs: list[StoryLog], client_index: int) -> None:
    from seedstory_client import StoryClient

    written = 0  # stories this client has started
    with StoryClient(target) as client:
        while not stop.is_set():
            log = StoryLog(started=time.time(), segments=args.segments)
            logs.append(log)
            try:
                story = client.generate(
                    OPENINGS[(client_index + written) % len(OPENINGS)],
                    args.segments,
                    seed=1000 * client_index + written,
                    render_seed=1000 * client_index + written,
                    steps=args.steps,
                    on_event=log.on_event,
                    resume=True,
                    max_resumes=3,
                    timeout=900,
                )
                log.resumes = story.resumes + int(story.stats.get("resumes", 0))
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                # A gRPC error's message is its details(); any other error's is its text.
                details = e.details() if callable(getattr(e, "details", None)) else str(e)
                log.error = f"{type(e).__name__}: {details}"
            log.ended = time.time()
            written += 1


# -- figures -----------------------------------------------------------------------------------
def kill_gaps(logs: list[StoryLog], faults: list[dict]) -> tuple[list[float], list[float]]:
    """Event gaps that span a fault, and all the others."""
    at = sorted(f["at"] for f in faults)
    spanning, other = [], []
    for log in logs:
        times = [log.started] + [t for t, _, _ in log.events] + ([log.ended] if log.error else [])
        for before, after in zip(times, times[1:]):
            (spanning if any(before <= f < after for f in at) else other).append(after - before)
    return spanning, other


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {
        "n": len(xs),
        "p50": round(statistics.median(xs), 2),
        "p95": round(xs[int(0.95 * (len(xs) - 1))], 2),
    }


def summarize(logs: list[StoryLog], faults: list[dict], seconds: float, args) -> dict:
    ended = [log for log in logs if log.ended]
    spanning, other = kill_gaps(ended, faults)
    return {
        "stories": {
            "started": len(logs),
            "ended": len(ended),
            "completed": sum(not log.error for log in ended),
            "failed": sum(bool(log.error) for log in ended),
            "resumed": sum(log.resumes > 0 for log in ended),
            "errors": sorted({log.error for log in ended if log.error}),
            "still_running_at_stop": len(logs) - len(ended),
        },
        "integrity": {
            "duplicates": sum(log.duplicates() for log in logs),
            "gaps": sum(log.gaps() for log in ended),
        },
        "kill_gap_s": quantiles(spanning),
        "other_gap_s": quantiles(other),
        "faults": [
            {
                "kind": f["kind"],
                "t_s": round(f["at"] - logs[0].started, 1) if logs else 0,
                "back_s": None if f["back_s"] is None else round(f["back_s"], 1),
            }
            for f in faults
        ],
        "run_s": round(seconds, 1),
        "settings": vars(args) | {"machine": f"{platform.machine()}, {os.cpu_count()} cores"},
    }


def table(result: dict) -> str:
    stories, integrity = result["stories"], result["integrity"]
    kill_gap, other_gap = result["kill_gap_s"], result["other_gap_s"]
    rows = [
        (
            "stories started / completed / failed",
            f"{stories['started']} / {stories['completed']} / {stories['failed']}",
        ),
        ("stories resumed at least once", str(stories["resumed"])),
        ("duplicated / missing segments", f"{integrity['duplicates']} / {integrity['gaps']}"),
        ("gap across a fault, p50 / p95 (s)", f"{kill_gap.get('p50')} / {kill_gap.get('p95')}"),
        ("other event gaps, p50 / p95 (s)", f"{other_gap.get('p50')} / {other_gap.get('p95')}"),
    ]
    rows += [(f"{f['kind']} at {f['t_s']} s: back after (s)", str(f["back_s"])) for f in result["faults"]]
    return "\n".join(f"| {name} | {value} |" for name, value in [("measure", "value"), ("---", "---"), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/tiny")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kill-every", type=float, default=45.0)
    parser.add_argument(
        "--node-at", type=float, default=150.0, help="seconds into the run to remove the second node"
    )
    parser.add_argument("--node-back", type=float, default=20.0, help="seconds until a fresh node joins")
    parser.add_argument("--max-resumes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.serving import deploy, grpc_target

    cluster, second = start_cluster()
    ray.init(address=cluster.address, log_to_driver=False)
    config = serve_config(str(Path(args.ckpt).resolve()), args.max_resumes)
    deploy(config, timeout_s=600)
    stop, logs, faults = threading.Event(), [], []
    clients = [
        threading.Thread(target=client_loop, args=(grpc_target(config), args, stop, logs, k), daemon=True)
        for k in range(args.clients)
    ]
    t0 = time.time()
    for thread in clients:
        thread.start()
    chaos(cluster, second, args, faults)
    stop.set()  # no new stories; those in flight finish
    for thread in clients:
        thread.join(timeout=600)
    time.sleep(60 if any(f["back_s"] is None for f in faults) else 0)  # let the last recovery be timed
    result = summarize(logs, faults, time.time() - t0, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
