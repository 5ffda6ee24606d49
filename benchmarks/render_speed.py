"""CPU layout and compilation for the de-tokenizer: is channels-last or ``torch.compile`` faster,
and does the picture stay reproducible?

One fixed-shape call (``--slots`` pictures, the service's default sampler, steps and guidance
cut-off) is timed ``--calls`` times after a warm-up, for each variant: plain float32, the UNet
and VAE in channels-last memory format, and the UNet under ``torch.compile``. Per variant: the
median and min seconds per call, whether two calls give the same PNG bytes (reproducible), and
whether they equal the plain variant's (the same pictures a replica without it would draw).

    python benchmarks/render_speed.py --out benchmarks/results/render_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("plain", "channels_last", "compile")


def build(ckpt: Path, variant: str):
    from actors.checkpoint import part_dir
    from actors.detokenizer.model import Detokenizer

    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    if variant == "channels_last":
        detok.unet.to(memory_format=torch.channels_last)
        detok.vae.to(memory_format=torch.channels_last)
    if variant == "compile":
        detok.pipeline.unet = torch.compile(detok.unet)
    return detok


def timed_calls(detok, args: argparse.Namespace, settings) -> tuple[list[float], list[bytes]]:
    from actors.imageio import to_png

    shape = (detok.config.num_queries, detok.config.feature_dim)
    draw = np.random.default_rng(0)  # fixed pictures' features, the same for every variant
    features = [draw.standard_normal(shape, dtype=np.float32) for _ in range(args.slots)]
    seeds = list(range(args.slots))
    seconds, drawn = [], []
    for call in range(args.calls + 1):  # call 0 warms up (and compiles)
        start = time.perf_counter()
        images = detok.render_in_slots(
            features,
            seeds,
            args.slots,
            settings.limits.default_steps,
            settings.limits.default_guidance,
            settings.guidance_until,
        )
        if call:
            seconds.append(time.perf_counter() - start)
        drawn.append(b"".join(to_png(image) for image in images))
    return seconds, drawn


def run(args: argparse.Namespace) -> dict:
    from cluster.serving import load_config
    from cluster.settings import AppSettings

    torch.set_num_threads(args.threads)
    settings = AppSettings.from_args(load_config()["applications"][0]["args"])
    rows, plain = [], None
    for variant in VARIANTS:
        detok = build(args.ckpt, variant)
        detok.use_sampler(settings.sampler)
        seconds, drawn = timed_calls(detok, args, settings)
        plain = plain or drawn[-1]
        rows.append(
            {
                "variant": variant,
                "median_s": round(statistics.median(seconds), 4),
                "min_s": round(min(seconds), 4),
                "reproducible": len(set(drawn)) == 1,
                "same_as_plain": drawn[-1] == plain,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "slots": args.slots,
        "steps": settings.limits.default_steps,
        "sampler": settings.sampler,
        "guidance_until": settings.guidance_until,
        "threads": args.threads,
        "calls": args.calls,
        "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny"))
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/render_speed.json"))
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
