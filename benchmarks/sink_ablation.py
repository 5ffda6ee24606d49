"""The multimodal sink's kept neighbourhoods, ablated: which part of an old segment breaks captions.

    python benchmarks/sink_ablation.py --ckpt checkpoints/tiny --heldout data/rw-heldout \\
        --work data/ablation --out benchmarks/results/sink_ablation

For every arm, two ``seedstory eval`` runs in the multimodal mode only (50 held-out stories of
25 segments, the sink's other settings from ray_config.yaml): the model writes the captions
(caption validity, by segment range, and looks), and every caption is given (the held-out
story's own, so every arm draws the same returns: returning fidelity). An arm is the four counts
``--neighbourhoods`` takes, kept of every segment that has left the window: tokens before/after
its ``<img>``, before/after its ``</img>``. The markers themselves are always kept, so
``0,0,0,0`` is the StreamingLLM sink plus two tokens per old segment.

The four-mode evals of the same checkpoint (``--base``, ``--base-given``) give the other modes'
rows and the per-story values the arms are paired with (same stories, same seeds). Evals already
in ``--work`` are read, not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from actors.mllm.sink import NEIGHBOURHOODS
from training.evaluation.report import paired, standard_error

# B,A,B,A: kept before/after each old <img>, before/after each old </img>
ARMS = {
    "markers only": (0, 0, 0, 0),
    "caption tail before <img>, 1": (1, 0, 0, 0),
    "caption tail before <img>, 2": (2, 0, 0, 0),
    "caption tail before <img>, 4": (4, 0, 0, 0),
    "after </img>, 1": (0, 0, 0, 1),
    "after </img>, 2": (0, 0, 0, 2),
    "after </img>, 4": (0, 0, 0, 4),
    "query rows, 1 each end": (0, 1, 1, 0),
    "query rows, 2 each end": (0, 2, 2, 0),
    "query rows, 4 each end": (0, 4, 4, 0),
}
RANGES = ((1, 10), (11, 18), (19, 25))  # segments, 1-based: before any eviction, the first ones, the rest


def folder(work: Path, counts: tuple[int, ...], captions: str) -> Path:
    return work / f"nb-{'-'.join(map(str, counts))}-{captions}"


def run_arm(args: argparse.Namespace, counts: tuple[int, ...], captions: str) -> Path:
    out = folder(args.work, counts, captions)
    if not (out / "results.json").is_file():
        subprocess.run(
            ["seedstory", "eval", "--ckpt", args.ckpt, "--heldout", args.heldout, "--out", str(out)]
            + ["--modes", "multimodal", "--neighbourhoods", ",".join(map(str, counts))]
            + ["--captions", captions, "--no-ceiling", "--stories", str(args.stories)],
            check=True,
        )
    return out


def modes_of(path: Path) -> dict[str, dict]:
    """An eval folder's results, by mode."""
    return {m["mode"]: m for m in json.loads((path / "results.json").read_text())["modes"]}


def by_range(per_segment: list[float]) -> list[float]:
    return [float(np.mean(per_segment[lo - 1 : hi])) for lo, hi in RANGES if hi <= len(per_segment)]


def difference(first: list, second: list) -> dict:
    d = paired(first, second)
    return {"mean": float(d.mean()) if len(d) else None, "se": standard_error(d), "stories": len(d)}


def row(name: str, counts, written: dict, given: dict, bases: dict) -> dict:
    """One arm (or one mode of the base evals): its figures and its story-paired differences."""
    w, g = written["summary"], given["summary"]
    returning, looks = given["per_story"]["returning"], written["per_story"]["look"]  # story means
    return {
        "arm": name,
        "neighbourhoods": list(counts) if counts else None,
        "validity": w["valid"],
        "validity_by_range": by_range(written["per_segment"]["valid"]),
        "place": w["place"],
        "look": w["look"],
        "look_given": g["look"],
        "returning": g["returning"],
        "returning_se": g["se"]["returning"],
        "returns": g["returns"],
        "peak_kv_mib": w["peak_kv_mib"],
        "returning_minus_window": difference(returning, bases["window"]["returning"]),
        "returning_minus_streaming": difference(returning, bases["streaming"]["returning"]),
        "look_minus_streaming": difference(looks, bases["streaming"]["look"]),
    }


def collect(args: argparse.Namespace) -> dict:
    written, given = modes_of(args.base), modes_of(args.base_given)
    bases = {
        mode: {"returning": given[mode]["per_story"]["returning"], "look": written[mode]["per_story"]["look"]}
        for mode in ("window", "streaming")
    }
    rows = [row(mode, None, written[mode], given[mode], bases) for mode in ("dense", "window", "streaming")]
    counts = [written["multimodal"]["sink"][n] for n in NEIGHBOURHOODS]  # as the eval resolved them
    rows.append(
        row("multimodal, SEED-Story's scaled", counts, written["multimodal"], given["multimodal"], bases)
    )
    for name, counts in ARMS.items():
        if args.read_only and not all(
            (folder(args.work, counts, c) / "results.json").is_file() for c in ("written", "given")
        ):
            continue
        arm_written = modes_of(run_arm(args, counts, "written"))["multimodal"]
        arm_given = modes_of(run_arm(args, counts, "given"))["multimodal"]
        rows.append(row(name, counts, arm_written, arm_given, bases))
    return {"stories": args.stories, "ranges": RANGES, "rows": rows}


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def diff_cell(d: dict) -> str:
    return "–" if d["mean"] is None else f"{d['mean']:+.3f} ± {fmt(d['se'])}"


def table(result: dict) -> str:
    ranges = " / ".join(f"{lo}–{hi}" for lo, hi in RANGES)
    lines = [
        "| kept of each old segment | B/A/B/A | tokens per old segment | validity "
        f"| validity, segments {ranges} | place | looks "
        "| returning (returns) | returning − window | returning − streaming | looks − streaming "
        "| peak KV (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        counts = "/".join(map(str, r["neighbourhoods"])) if r["neighbourhoods"] else "–"
        # the counts plus the <img> and </img> themselves (the neighbourhoods never overlap at Q=16)
        per_segment = sum(r["neighbourhoods"]) + 2 if r["neighbourhoods"] else "–"
        lines.append(
            f"| {r['arm']} | {counts} | {per_segment} | {fmt(r['validity'])} | "
            + " / ".join(fmt(v) for v in r["validity_by_range"])
            + f" | {fmt(r['place'])} | {fmt(r['look'])} | {fmt(r['returning'])} ± {fmt(r['returning_se'])} "
            f"({r['returns']}) | {diff_cell(r['returning_minus_window'])} | "
            f"{diff_cell(r['returning_minus_streaming'])} | {diff_cell(r['look_minus_streaming'])} | "
            f"{r['peak_kv_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/tiny")
    ap.add_argument("--heldout", default="data/rw-heldout")
    ap.add_argument("--stories", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("data/ablation"), help="the arms' eval folders")
    ap.add_argument("--base", type=Path, default=Path("benchmarks/results/eval_opening_stage"))
    ap.add_argument("--base-given", type=Path, default=Path("benchmarks/results/eval_opening_stage_given"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sink_ablation"))
    ap.add_argument("--read-only", action="store_true", help="tabulate the arms already run; run none")
    return ap.parse_args()


def write_results(out: Path, result: dict, markdown: str) -> None:
    """``results.json`` and ``table.md`` into ``out``; the table printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(markdown)
    print(markdown)


def main() -> None:
    args = parse_args()
    result = collect(args)
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
