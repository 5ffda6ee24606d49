"""Teacher-forced look probe: does the MLLM's regression carry each character's look?

The four-mode eval asks the MLLM to write whole stories, so a look score there mixes three
things: the captions it writes, the features it regresses and the de-tokenizer's render. This
probe isolates the second, cheaply enough to run on a training run's checkpoints while it trains:

- the first ``--segments`` segments of held-out returning-world stories, their true captions and
  the true pictures' features (the training windows' layout, every picture written, none given);
- one forward pass per batch of windows; the output head's features at each picture's query rows;
- those features drawn by the visual tokenizer's own pixel decoder (what the features carry,
  whatever the de-tokenizer makes of them) and judged by the eval's look judge, every character
  there, against the segment's ground truth;
- per segment range: the opening (its caption says every look), segments 1-4 and 5+ (names only).

The same pictures' true features, decoded alike, give the ceiling. A model that writes the mean
picture scores near 0 on looks (``benchmarks/results/eval_continuous/``). ``--look-share`` also
measures how much of a picture's features the looks are: the cosine between the features of a
segment drawn with its cast and drawn with another story's looks (the same scene), beside the
cosine with the same cast in another place.

    python benchmarks/look_probe.py --ckpt data/tiny-cont --heldout data/rw-heldout \
        [--state RUN/checkpoint_.../] --out benchmarks/results/look_probe/NAME.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.checkpoint import part_dir, read_manifest  # noqa: E402
from actors.mllm.heads import PictureHeads  # noqa: E402
from actors.mllm.model import load_mllm  # noqa: E402
from training.data import Pretokenize, pad_windows, window_features  # noqa: E402
from training.evaluation.heldout import read_heldout  # noqa: E402
from training.evaluation.judge import judge_truth, tally  # noqa: E402
from training.evaluation.run import decode_all  # noqa: E402
from training.loop import load_state  # noqa: E402
from training.stages.mllm import picture_rows  # noqa: E402

RANGES = {"opening": range(0, 1), "1-4": range(1, 5), "5+": range(5, 10_000)}


def load_models(ckpt: str, state: str | None) -> tuple[dict, int | None]:
    """The checkpoint's MLLM and heads, or a training run's (``state``: a reported checkpoint),
    and that run's step."""
    models = {
        "mllm": load_mllm(part_dir(ckpt, "mllm")).float(),
        "heads": PictureHeads.from_pretrained(part_dir(ckpt, "heads")),
    }
    step = int(load_state(state, models)["step"]) if state else None
    return {name: model.eval() for name, model in models.items()}, step


def windows(tokenize: Pretokenize, heldout: Path, stories: int, segments: int) -> tuple[list, object]:
    """Each held-out story's first ``segments`` segments as a training window: (ids, features)."""
    held = read_heldout(heldout, stories, segments)
    shape = tokenize.builder.manifest
    rows = []
    for story_captions, pngs in zip(held.captions, held.pictures):
        row = tokenize.window(story_captions, pngs)
        if row is None:
            raise ValueError("a held-out window does not tokenize; the probe needs every story")
        rows.append((row[0], window_features(row[2], (shape.num_queries, shape.feature_dim))))
    return rows, held


@torch.no_grad()
def predicted_features(models: dict, rows: list, layout, pad: int, batch: int = 16) -> list[np.ndarray]:
    """Per window, its pictures' features as the heads regress them: (pictures, Q, D) float32."""
    out = []
    for at in range(0, len(rows), batch):
        chunk = [ids for ids, _ in rows[at : at + batch]]
        padded = pad_windows([np.asarray(ids) for ids in chunk], [0] * len(chunk), pad, torch)
        hidden = (
            models["mllm"]
            .model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
            .last_hidden_state
        )
        windows_at, positions = picture_rows(padded["input_ids"], layout.boi, layout.num_queries)
        features = models["heads"].features(hidden[windows_at, positions]).numpy()
        counts = [int((torch.as_tensor(ids) == layout.boi).sum()) for ids in chunk]
        out += np.split(features, np.cumsum(counts)[:-1])
    return out


def judged(held, visual, features: list[np.ndarray]) -> dict:
    """The look judge on each window's decoded pictures, tallied per segment range."""
    flat = [picture for window in features for picture in window]
    pictures, _ = decode_all(visual, flat)
    rows: dict[str, list] = {name: [] for name in RANGES}
    at = 0
    for story, window in enumerate(features):
        for segment in range(len(window)):
            verdicts = judge_truth("returning", held.casts[story], held.truth[story][segment], pictures[at])
            at += 1
            for name, span in RANGES.items():
                if segment in span:
                    rows[name] += verdicts
    everything = [row for span_rows in rows.values() for row in span_rows]
    return {name: summary(tally(rows[name])) for name in RANGES} | {"all": summary(tally(everything))}


def summary(tallied: dict) -> dict:
    return {
        "look": round(tallied["mean"], 4),
        "hero": round(tallied["per_role"].get("hero", {}).get("right", float("nan")), 4),
        "friend": round(tallied["per_role"].get("friend", {}).get("right", float("nan")), 4),
        **{k: round(v, 4) for k, v in tallied["per_attribute"].items()},
        "judged": tallied["judged"],
    }


def look_share(held, visual, pictures: int = 64) -> dict:
    """Mean cosine of a segment's features against the same scene with another cast's looks, and
    against the same cast in another place (segment 3 of each story, drawn at the data's size)."""
    from dataclasses import replace

    from actors.imageio import to_tensor
    from training.storyworld import PLACES
    from training.storyworld_pictures import draw_segment

    size, other_looks, other_place = visual.config.image_size, [], []
    for story in range(min(pictures, len(held.casts))):
        cast, other_cast, segment = held.casts[story], held.casts[story - 1], held.truth[story][3]
        elsewhere = next(place.name for place in PLACES if place.name != segment.place)
        redressed = tuple(
            replace(
                mine,
                colour=theirs.colour,
                colour_name=theirs.colour_name,
                shape=theirs.shape,
                pattern=theirs.pattern,
            )
            for mine, theirs in zip(cast, other_cast)
        )
        drawn = [
            draw_segment(segment, size, cast),
            draw_segment(segment, size, redressed),
            draw_segment(replace(segment, place=elsewhere), size, cast),
        ]
        with torch.no_grad():
            rows = visual.encode(to_tensor(drawn))
        other_looks.append(float(F.cosine_similarity(rows[0], rows[1], dim=-1).mean()))
        other_place.append(float(F.cosine_similarity(rows[0], rows[2], dim=-1).mean()))
    return {
        "other_looks": round(float(np.mean(other_looks)), 4),
        "other_place": round(float(np.mean(other_place)), 4),
    }


def cosine(predicted: list[np.ndarray], true: list[np.ndarray]) -> float:
    p, t = torch.as_tensor(np.concatenate(predicted)), torch.as_tensor(np.concatenate(true))
    return float(F.cosine_similarity(p, t, dim=-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint: tokenizers, visual tokenizer, MLLM")
    parser.add_argument("--state", help="a training run's reported checkpoint folder (its MLLM and heads)")
    parser.add_argument("--heldout", required=True, type=Path)
    parser.add_argument("--stories", type=int, default=64)
    parser.add_argument("--segments", type=int, default=15)
    parser.add_argument("--ceiling", action="store_true", help="also judge the true features, decoded alike")
    parser.add_argument(
        "--look-share", action="store_true", help="also: how much of the features the looks are"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    manifest = read_manifest(args.ckpt)
    tokenize = Pretokenize(args.ckpt)  # the training windows' own tokenizers, and the visual tokenizer
    rows, held = windows(tokenize, args.heldout, args.stories, args.segments)
    models, step = load_models(args.ckpt, args.state)
    predicted = predicted_features(models, rows, manifest.tokens, manifest.tokens.pad)
    true = [features for _, features in rows]
    mean = np.concatenate(true).mean(0)  # the mean picture (Q, D): what a model blind to looks writes
    visual = tokenize.builder.visual
    result = {
        "ckpt": args.ckpt,
        "state": args.state,
        "step": step,
        "stories": args.stories,
        "segments": args.segments,
        "cosine": round(cosine(predicted, true), 4),
        "mean_picture_cosine": round(cosine([np.broadcast_to(mean, t.shape) for t in true], true), 4),
        "predicted": judged(held, visual, predicted),
    }
    if args.ceiling:
        result["ceiling"] = judged(held, visual, true)
    if args.look_share:
        result["look_share"] = look_share(held, visual)
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
