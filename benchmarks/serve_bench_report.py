"""The figures and the report of ``benchmarks/serve_bench.py``: the overlap ratio of one story's
two stages, the served-over-bare overhead, the machine, the timeline plot and the tables. Pure
functions of the runs that ``serve_bench.py`` records, served or bare alike.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

OVERLAP_GOAL, OVERHEAD_GOAL = 0.75, 10.0  # ratio; percent of the bare per-segment time


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
    return {
        "e2e_s": run["e2e_s"],
        "mllm_busy_s": run["mllm_s"],
        "render_busy_s": render_busy,
        "ratio": run["e2e_s"] / busy if busy > 0 else float("nan"),
    }


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["e2e_s"])[(len(runs) - 1) // 2]


# -- report --------------------------------------------------------------------------------
def machine(ckpt: Path) -> dict:
    import ray
    import torch
    import vllm

    from cluster.demo import EMBEDDED_CHECKPOINT

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg_at_start": os.getloadavg(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "ray": ray.__version__,
        "checkpoint": str(ckpt.resolve()),
        "random_init": ckpt.resolve() != EMBEDDED_CHECKPOINT.resolve(),
    }


def compare(served_runs: list[dict], bare_runs: list[dict], segments: int) -> dict:
    served_run, bare_run = median_run(served_runs), median_run(bare_runs)
    per_segment = (served_run["e2e_s"] - bare_run["e2e_s"]) / segments
    bare_per_segment = bare_run["e2e_s"] / segments
    pct = 100 * per_segment / bare_per_segment
    return {
        "segments": segments,
        "served_e2e_s": served_run["e2e_s"],
        "bare_e2e_s": bare_run["e2e_s"],
        "served_e2e_all_s": [r["e2e_s"] for r in served_runs],
        "bare_e2e_all_s": [r["e2e_s"] for r in bare_runs],
        "overhead_per_segment_s": per_segment,
        "bare_per_segment_s": bare_per_segment,
        "overhead_pct": pct,
        "goal_pct": OVERHEAD_GOAL,
        "goal_met": pct <= OVERHEAD_GOAL,
        # Where the time goes: the writing stage alone, served (MLLM replica) vs in-process.
        "served_mllm_s": served_run["mllm_s"],
        "bare_mllm_s": bare_run["mllm_s"],
        "served_tokens_per_s": served_run["output_tokens"] / served_run["mllm_s"],
        "bare_tokens_per_s": bare_run["output_tokens"] / bare_run["mllm_s"],
        # The same seeds should give the same story both ways: else the two do different work.
        "same_features": served_run["features"] == bare_run["features"],
        "features_max_diff": features_max_diff(served_run["features"], bare_run["features"]),
        # Per event, stage done (server) -> client: the served path's own latency, GIL effects aside.
        "served_delivery_ms": {k: served_run[f"delivery_ms_{k}"] for k in ("mean", "p50", "max")},
    }


def features_max_diff(first: list[bytes], second: list[bytes]) -> float:
    """The largest difference of one feature value between two runs' pictures (their wire bytes,
    little-endian float32: actors/features.py); inf when they hold different numbers of values."""
    import numpy as np

    if len(first) != len(second) or any(len(a) != len(b) for a, b in zip(first, second)):
        return float("inf")
    if not first:
        return 0.0
    values = [np.frombuffer(b"".join(run), dtype="<f4") for run in (first, second)]
    return float(np.abs(values[0] - values[1]).max())


def plot_timeline(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        t0, prev = run["sent"], run["mllm_start"]
        for k, seg in enumerate(run["segments"]):
            # A segment is written from the previous picture's features to its own.
            ax.broken_barh(
                [(prev - t0, seg["features_at"] - prev)],
                (k - 0.4, 0.38),
                color="tab:blue",
                label="MLLM writing" if k == 0 else None,
            )
            ax.broken_barh(
                [(seg["render_start"] - t0, seg["render_end"] - seg["render_start"])],
                (k + 0.02, 0.38),
                color="tab:orange",
                label="de-tokenizer rendering" if k == 0 else None,
            )
            ax.plot(
                [seg["written_at"] - t0] * 2,
                [k - 0.4, k - 0.02],
                color="k",
                lw=1,
                label="caption written" if k == 0 else None,
            )
            prev = seg["features_at"]
        ax.axvline(run["e2e_s"], color="grey", ls="--", label="done")
        ratio = overlap(run)["ratio"]
        ax.set(xlabel="seconds since send", title=f"{name}: {run['e2e_s']:.1f}s, overlap ratio {ratio:.2f}")
    axes[0][0].set(
        ylabel="segment",
        yticks=range(len(run["segments"])),
        yticklabels=[str(k + 1) for k in range(len(run["segments"]))],
    )
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def table(levels: list[dict], pipe: dict, cmp: dict) -> str:
    lines = [
        "| concurrency | stories/min | first caption mean / p50 s | first image mean / p50 s "
        "| story mean s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for level in levels:
        lines.append(
            f"| {level['concurrency']} | {level['stories_per_min']:.2f} "
            f"| {level['first_caption_mean_s']:.2f} / {level['first_caption_p50_s']:.2f} "
            f"| {level['first_image_mean_s']:.2f} / {level['first_image_p50_s']:.2f} "
            f"| {level['story_total_mean_s']:.1f} |"
        )
    return "\n".join(lines + ["", overlap_line(pipe, cmp["segments"]), overhead_lines(cmp)])


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def overlap_line(pipe: dict, segments: int) -> str:
    served = pipe["served"]
    return (
        f"pipeline overlap ({segments} segments, concurrency 1): e2e {served['e2e_s']:.2f}s / (MLLM "
        f"{served['mllm_busy_s']:.2f}s + de-tokenizer {served['render_busy_s']:.2f}s) "
        f"= {served['ratio']:.2f} "
        f"(goal <= {OVERLAP_GOAL}: {verdict(pipe['goal_met'])}); in-process: {pipe['bare']['ratio']:.2f}"
    )


def overhead_lines(cmp: dict) -> str:
    return (
        f"serve + gRPC overhead: served {cmp['served_e2e_s']:.2f}s vs bare {cmp['bare_e2e_s']:.2f}s "
        f"(medians of {len(cmp['served_e2e_all_s'])} / {len(cmp['bare_e2e_all_s'])} runs) -> "
        f"{1000 * cmp['overhead_per_segment_s']:.0f} ms per segment = {cmp['overhead_pct']:.1f}% of the bare "
        f"{cmp['bare_per_segment_s']:.2f}s per segment "
        f"(goal <= {OVERHEAD_GOAL:.0f}%: {verdict(cmp['goal_met'])}); "
        f"same features both ways: {cmp['same_features']} "
        f"(largest difference {cmp['features_max_diff']:.2g})\n"
        f"MLLM writing alone: served {cmp['served_mllm_s']:.2f}s ({cmp['served_tokens_per_s']:.0f} tok/s) vs "
        f"bare {cmp['bare_mllm_s']:.2f}s ({cmp['bare_tokens_per_s']:.0f} tok/s)\n"
        f"served event delivery (stage done on the server -> client): mean "
        f"{cmp['served_delivery_ms']['mean']:.1f} ms, p50 {cmp['served_delivery_ms']['p50']:.1f} ms, "
        f"max {cmp['served_delivery_ms']['max']:.1f} ms"
    )
