"""Fewer UNet evaluations at the same quality: render settings judged against today's default.

Every setting renders the same held-out pictures from their ground-truth features (the visual
tokenizer's, as the TokenizerPool makes them) with the same seeds, in the service's fixed
``--slots``-row calls on one thread, and the eval's look judge scores each picture: the mean of
"right" over the characters there (colour, shape and pattern all right) and the place. Each
setting is compared with the baseline (the first) picture by picture: the mean difference and its
paired standard error. A setting qualifies when neither the look nor the place score falls by
more than one paired standard error (the rule of the render-throughput issue).

    python benchmarks/render_settings.py --ckpt checkpoints/tiny --heldout data/rw-heldout \\
        --out benchmarks/results/render_settings.json

A setting is ``sampler:steps:guided`` with ``guided`` the fraction of the steps that run
classifier-free guidance (the rest evaluate the conditional rows only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from detok_stages import read_set, seeds  # its sibling: run as python benchmarks/render_settings.py

from training.evaluation.judge import judge_truth, place_right
from training.evaluation.report import paired, standard_error

DEFAULT_SETTINGS = [
    "euler:20:1",
    "dpm++:10:1",
    "dpm++:8:1",
    "dpm++:8:0.5",
    "dpm++:6:0.5",
    "unipc:8:1",
    "unipc:8:0.5",
    "unipc:6:0.5",
    "dpm++:4:0.5",
]


def parse_setting(text: str) -> dict:
    sampler, steps, guided = text.split(":")
    return {"name": text, "sampler": sampler, "steps": int(steps), "guidance_until": float(guided)}


def render_setting(
    detok, features: list[np.ndarray], picture_seeds: list[int], setting: dict, guidance: float, slots: int
) -> tuple[list, float]:
    """Every picture at one setting, ``slots`` rows per call as the DetokenizerPool renders; and the
    seconds it took."""
    detok.use_sampler(setting["sampler"])
    start, pictures = time.perf_counter(), []
    for at in range(0, len(features), slots):
        pictures += detok.render_in_slots(
            features[at : at + slots],
            picture_seeds[at : at + slots],
            slots,
            setting["steps"],
            guidance,
            setting["guidance_until"],
        )
    return pictures, time.perf_counter() - start


def judge_pictures(held, pictures: list) -> dict:
    """Per picture: the fraction of its characters drawn right, and whether its place is."""
    looks, places = [], []
    for seg, cast, picture in zip(held.segs, held.casts, pictures):
        pixels = np.asarray(picture, dtype=np.float32)
        rows = judge_truth(held.world, cast, seg, pixels)
        looks.append(statistics.fmean(verdict["right"] for _, _, verdict in rows) if rows else None)
        places.append(place_right(seg, pixels, cast))
    return {"look": looks, "place": places}


def versus(values: list[float | None], baseline: list[float | None]) -> dict:
    """Mean of (value - baseline) over the pictures both judged, and its standard error (the eval's
    own paired statistics, pictures in place of stories)."""
    diffs = paired(values, baseline)
    return {"diff": round(float(diffs.mean()), 4), "se": round(standard_error(diffs), 4), "n": len(diffs)}


def summarise(setting: dict, scores: dict, baseline: dict | None, seconds: float, pictures: int) -> dict:
    row = {
        **setting,
        "look": round(statistics.fmean(look for look in scores["look"] if look is not None), 4),
        "place": round(float(np.mean(scores["place"])), 4),
        "s_per_picture": round(seconds / pictures, 4),
    }
    if baseline is not None:
        row["vs_baseline"] = {key: versus(scores[key], baseline[key]) for key in ("look", "place")}
        row["qualifies"] = all(d["diff"] >= -d["se"] for d in row["vs_baseline"].values())
    return row


def run(args: argparse.Namespace) -> dict:
    from actors.checkpoint import part_dir, read_manifest
    from actors.detokenizer.model import Detokenizer
    from actors.imageio import to_tensor
    from actors.tokenizer.model import VisualTokenizer
    from cluster.requests import StoryLimits

    torch.set_num_threads(args.threads)
    guidance = StoryLimits().default_guidance
    detok = Detokenizer.from_pretrained(part_dir(args.ckpt, "detokenizer"))
    visual = VisualTokenizer.from_pretrained(part_dir(args.ckpt, "visual_tokenizer")).eval()
    held = read_set(args.heldout, args.stories, args.segments, read_manifest(args.ckpt).image_size)
    features = list(visual.encode(to_tensor(held.loaded)).numpy())  # (Q, D) a picture
    rows, baseline = [], None
    for setting in map(parse_setting, args.settings):
        pictures, seconds = render_setting(detok, features, seeds(held), setting, guidance, args.slots)
        scores = judge_pictures(held, pictures)
        rows.append(summarise(setting, scores, baseline, seconds, len(pictures)))
        baseline = baseline or scores
        print(json.dumps(rows[-1]), flush=True)
    return {
        "ckpt": str(args.ckpt),
        "heldout": str(args.heldout),
        "pictures": len(held.keys),
        "guidance": guidance,
        "slots": args.slots,
        "threads": args.threads,
        "settings": rows,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny"))
    parser.add_argument("--heldout", type=Path, default=Path("data/rw-heldout"))
    parser.add_argument("--stories", type=int, default=64)
    parser.add_argument("--segments", type=int, default=3, help="pictures per story")
    parser.add_argument(
        "--slots", type=int, default=4, help="rows per pipeline call, as the service's render_slots"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--settings", nargs="+", default=DEFAULT_SETTINGS, help="sampler:steps:guided, the first the baseline"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/render_settings.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
