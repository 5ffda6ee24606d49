"""The sink stage, searched: a few learning rates, lengths and dense shares, each judged by the eval.

    python benchmarks/sink_search.py --ckpt checkpoints/tiny --data data/rw-stream-train \\
        --heldout data/rw-heldout --work data --out benchmarks/results/sink_search

Every arm copies ``--ckpt`` to ``WORK/sink-NAME`` and runs ``seedstory train --stages sink`` on it
under the multimodal sink (the service's other sink settings) with the arm's ``--lr``,
``--steps`` and ``--dense-share``, on whole 30-segment stories (``--tokens``: an earlier run's
token windows of the same data and tokenizers, to skip pre-tokenizing). Then the multimodal mode
alone is evaluated as in ``benchmarks/sink_ablation.py`` (captions written, and given), and each
row is paired story by story with the starting checkpoint's multimodal row (``--base``,
``--base-given``). The stage's rule for adoption (docs/training.md#the-sink-stage): the multimodal
rows move up and no row moves down by more than one paired standard error. Runs already in
``--work`` are read, not run again. Training an arm of 100 steps takes about 7 min on 2 cores
with nothing else running (torch's threads crawl when the cores are shared: run nothing beside).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from sink_ablation import by_range, difference, fmt, modes_of, write_results  # same eval, same pairing

ARMS = {  # name: learning rate, steps, share of the steps read densely
    "A": (5e-4, 100, 0.0),
    "B": (1e-4, 100, 0.0),
    "C": (1e-4, 100, 0.5),
    "D": (5e-4, 200, 0.0),
    "E": (5e-4, 100, 0.5),
}
CHECKS = ("valid", "place", "look")  # judged on written captions; returning on given ones


def train_arm(args: argparse.Namespace, name: str) -> Path:
    lr, steps, dense_share = ARMS[name]
    out = args.work / f"sink-{name}"
    if (out.with_name(out.name + ".runs") / "summary.json").is_file():
        return out
    shutil.copytree(args.ckpt, out, dirs_exist_ok=True)
    if args.tokens:
        shutil.copytree(args.tokens, out.with_name(out.name + ".runs") / "tokens", dirs_exist_ok=True)
    subprocess.run(
        ["seedstory", "train", "--preset", "tiny", "--data", str(args.data), "--out", str(out)]
        + ["--stages", "sink", "--sink-mode", "multimodal", "--threads", "2"]
        + ["--lr", str(lr), "--steps", str(steps), "--dense-share", str(dense_share)],
        check=True,
    )
    return out


def eval_arm(args: argparse.Namespace, ckpt: Path, name: str, captions: str) -> Path:
    out = args.work / "sink-evals" / f"{name}-{captions}"
    if not (out / "results.json").is_file():
        subprocess.run(
            ["seedstory", "eval", "--ckpt", str(ckpt), "--heldout", str(args.heldout), "--out", str(out)]
            + ["--modes", "multimodal", "--captions", captions, "--no-ceiling"],
            check=True,
        )
    return out


def training_record(ckpt: Path) -> dict:
    stage = json.loads((ckpt.with_name(ckpt.name + ".runs") / "summary.json").read_text())["stages"]["sink"]
    return {"seconds": stage["seconds"], **{k: stage["metrics"].get(k) for k in ("caption_ce", "cosine")}}


def row(name: str, written: dict, given: dict, base: dict, base_given: dict) -> dict:
    w = written["summary"]
    return {
        "arm": name,
        **{check: w[check] for check in CHECKS},
        "validity_by_range": by_range(written["per_segment"]["valid"]),
        "look_given": given["summary"]["look"],
        "returning": given["summary"]["returning"],
        "returning_se": given["summary"]["se"]["returning"],
        "returns": given["summary"]["returns"],
        "peak_kv_mib": w["peak_kv_mib"],
        "minus_start": {
            **{c: difference(written["per_story"][c], base["per_story"][c]) for c in CHECKS},
            "returning": difference(given["per_story"]["returning"], base_given["per_story"]["returning"]),
            # the same names drawn in every arm: looks without the captions' own changes
            "look_given": difference(given["per_story"]["look"], base_given["per_story"]["look"]),
        },
    }


def collect(args: argparse.Namespace) -> dict:
    base, base_given = modes_of(args.base)["multimodal"], modes_of(args.base_given)["multimodal"]
    rows = [row("start (the embedded model)", base, base_given, base, base_given)]
    for name, (lr, steps, dense_share) in ARMS.items():
        ckpt = train_arm(args, name)
        written = modes_of(eval_arm(args, ckpt, name, "written"))["multimodal"]
        given = modes_of(eval_arm(args, ckpt, name, "given"))["multimodal"]
        settings = {"lr": lr, "steps": steps, "dense_share": dense_share, **training_record(ckpt)}
        rows.append({**row(name, written, given, base, base_given), "training": settings})
    return {"arms": {k: dict(zip(("lr", "steps", "dense_share"), v)) for k, v in ARMS.items()}, "rows": rows}


def cell(d: dict) -> str:
    return "–" if d["mean"] is None else f"{d['mean']:+.3f} ± {fmt(d['se'])}"


def table(result: dict) -> str:
    lines = [
        "| arm | lr / steps / dense share | training (min) | validity "
        "| validity, segments 1–10 / 11–18 / 19–25 | place | looks | returning (returns) "
        "| validity − start | place − start | looks − start | looks, captions given − start "
        "| returning − start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        t = r.get("training")
        setting = f"{t['lr']:g} / {t['steps']} / {t['dense_share']:g}" if t else "–"
        minutes = f"{t['seconds'] / 60:.1f}" if t else "–"
        d = r["minus_start"]
        lines.append(
            f"| {r['arm']} | {setting} | {minutes} | {fmt(r['valid'])} | "
            + " / ".join(fmt(v) for v in r["validity_by_range"])
            + f" | {fmt(r['place'])} | {fmt(r['look'])} | {fmt(r['returning'])} ± {fmt(r['returning_se'])} "
            f"({r['returns']}) | {cell(d['valid'])} | {cell(d['place'])} | {cell(d['look'])} | "
            f"{cell(d['look_given'])} | {cell(d['returning'])} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny"))
    ap.add_argument("--data", type=Path, default=Path("data/rw-stream-train"))
    ap.add_argument("--tokens", type=Path, help="token windows of --data by the same tokenizers (optional)")
    ap.add_argument("--heldout", type=Path, default=Path("data/rw-heldout"))
    ap.add_argument(
        "--work", type=Path, default=Path("data"), help="where the arms' checkpoints and evals go"
    )
    ap.add_argument("--base", type=Path, default=Path("benchmarks/results/eval_opening_stage"))
    ap.add_argument("--base-given", type=Path, default=Path("benchmarks/results/eval_opening_stage_given"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sink_search"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    result = collect(args)
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
