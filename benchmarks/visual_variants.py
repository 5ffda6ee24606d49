"""Visual tokenizer variants, trained briefly and judged by their own pixel decoder.

Why: the de-tokenizer cannot draw what the features do not carry (``detok_stages.py``;
docs/results.md#where-the-picture-path-loses-a-character). Training the whole pipeline to try a
tokenizer is slow; this script trains one variant of the visual stage alone, in one process, with
the stage's own loss and learning-rate schedule, and judges its decoder's reconstructions of
held-out pictures from their features (``decode(encode(x))``) with the eval's look judge (every
character, colour, shape and pattern). Results: docs/results.md#which-tokenizer-would-carry-the-looks.

The tokenizer is continuous: Q unit feature rows of D, no codebook. The codebook variants this
script once compared (codebook size, code dimension, code restarts; rows with ``"continuous":
false`` in benchmarks/results/visual_variants.jsonl) are history: the model class has none.

    python benchmarks/visual_variants.py --name q16 --steps 2400
    python benchmarks/visual_variants.py --name q32 --num-queries 32 --steps 2400
    python benchmarks/visual_variants.py --name d32 --feature-dim 32 --steps 2400

Each run appends one JSON line to ``--out`` (and one more every ``--judge-every`` steps, with
``steps`` of ``of_steps``): the variant, its train time and last loss, and the judge's mean,
min per character name, per role and per attribute, and the place.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from detok_stages import batched, read_set, score  # its sibling: run as python benchmarks/visual_variants.py

from actors.config import TINY
from actors.imageio import to_tensor
from actors.tokenizer.model import VisualTokenizer
from training.loop import StageSpec, lr_at
from training.stages import visual as stage


def training_pictures(folder: Path, count: int, seed: int) -> torch.Tensor:
    """``count`` pictures of a StoryWorld folder, drawn at random, as one tensor in [-1, 1]."""
    from PIL import Image

    files = sorted((folder / "images").glob("*/*.jpg"))
    files = random.Random(seed).sample(files, min(count, len(files)))
    return to_tensor([Image.open(f).convert("RGB") for f in files])


def variant(args: argparse.Namespace):
    return replace(
        TINY.visual,
        num_queries=args.num_queries,
        feature_dim=args.feature_dim,
        width=args.width,
        depth=args.depth,
        resampler_depth=args.resampler_depth,
        decoder_depth=args.decoder_depth,
    )


def reconstruct(visual: VisualTokenizer, images: torch.Tensor) -> torch.Tensor:
    """The tokenizer's own decoder from the pictures' features: ``decode(encode(x))``."""
    return visual.decode(visual.encode(images)).clamp(-1, 1)


def train(visual: VisualTokenizer, pictures: torch.Tensor, args: argparse.Namespace, on_judge=None) -> dict:
    """The stage's loop; every ``--judge-every`` steps (and at the end) ``on_judge(step, metrics)``."""
    spec = StageSpec(
        "visual", ckpt="", steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    opt = torch.optim.AdamW(visual.parameters(), lr=args.lr, weight_decay=spec.weight_decay)
    draw = torch.Generator().manual_seed(args.seed)
    metrics: dict = {}
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, step)
        images = pictures[torch.randint(len(pictures), (args.batch_size,), generator=draw)]
        loss, metrics = stage.loss({"visual": visual}, images, spec, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        done = step + 1
        if on_judge and (done == args.steps or (args.judge_every and done % args.judge_every == 0)):
            on_judge(done, metrics)
    return metrics


def judge(visual: VisualTokenizer, args: argparse.Namespace) -> dict:
    """The look judge on the decoder's reconstructions of the held-out pictures, turned into
    pictures as ``detok_stages.py`` turns its decoder row (diffusers' image processor)."""
    from diffusers.image_processor import VaeImageProcessor

    held = read_set(args.heldout, args.stories, args.segments, visual.config.image_size)
    reconstructions = batched(lambda b: reconstruct(visual, b), to_tensor(held.loaded))
    return score(held, VaeImageProcessor().postprocess(reconstructions, output_type="pil"), 0.0)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="the variant's name in the results")
    ap.add_argument(
        "--data", type=Path, default=Path("data/rw-train"), help="a StoryWorld folder to train on"
    )
    ap.add_argument(
        "--heldout", type=Path, default=Path("data/rw-heldout"), help="a StoryWorld folder to judge on"
    )
    ap.add_argument("--stories", type=int, default=64)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--pictures", type=int, default=12000, help="training pictures held in memory")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--judge-every",
        type=int,
        default=0,
        help="also judge (and write a row) every N steps: the score against training time",
    )
    tiny = TINY.visual
    ap.add_argument("--num-queries", type=int, default=tiny.num_queries)
    ap.add_argument("--feature-dim", type=int, default=tiny.feature_dim)
    ap.add_argument("--width", type=int, default=tiny.width)
    ap.add_argument("--depth", type=int, default=tiny.depth)
    ap.add_argument("--resampler-depth", type=int, default=tiny.resampler_depth)
    ap.add_argument("--decoder-depth", type=int, default=tiny.decoder_depth)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/visual_variants.jsonl"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = variant(args)
    visual = VisualTokenizer(config).train()
    pictures = training_pictures(args.data, args.pictures, args.seed)
    started = time.perf_counter()
    spent = {"judging": 0.0}

    def on_judge(step: int, final: dict) -> None:
        start = time.perf_counter()
        scores = judge(visual.eval(), args)
        visual.train()
        row = {
            "name": args.name,
            "continuous": True,  # the history's codebook rows say false
            "steps": step,
            "of_steps": args.steps,
            "visual": asdict(config),
            "train_s": round(start - started - spent["judging"]),
            "final": {k: round(v, 4) for k, v in final.items()},
            "mean": round(scores["mean"], 3),
            "min": round(scores["min"], 3),
            "per_role": {k: round(v["right"], 3) for k, v in scores["per_role"].items()},
            "per_attribute": {k: round(v, 3) for k, v in scores["per_attribute"].items()},
            "place": round(scores["place"], 3),
        }
        spent["judging"] += time.perf_counter() - start
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as jsonl:
            jsonl.write(json.dumps(row) + "\n")

    train(visual, pictures, args, on_judge)


if __name__ == "__main__":
    main()
