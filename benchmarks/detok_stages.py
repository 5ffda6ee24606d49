"""Where the picture path loses the hero: every stage judged on held-out StoryWorld pictures.

    seedstory data storyworld --stories 64 --seed 1 --size 64 --out data/sw-heldout   # if missing
    python benchmarks/detok_stages.py --ckpt checkpoints/tiny --heldout data/sw-heldout \\
        --stories 64 --segments 3 --sweep-segments 1 --out benchmarks/results/detok_stages.json

On a returning-world held-out set (``seedstory data storyworld --world returning``: random
looks, a cast of 4) every character there is judged instead, by the eval's look judge
(``training.evaluation.judge.judge_look``: colour, shape and pattern each nearest among the world's,
the segment's scene fixed).

Each stage turns the held-out pictures into pictures again, and the eval's own judge
(``training.evaluation.judge.judge``: the nearest ground-truth render among every character drawn as
the hero, the caption's place, action and friends fixed) says whether the story's hero is shown:

  truth      the ground-truth render of the caption (the judge's own candidate: ~1.0 by design)
  blur R     that render blurred (Gaussian, radius R px): how much the pixel judge punishes blur
             alone, to read the other stages against (a soft picture loses to a sharp wrong one)
  loaded     the JPEG file as the data pipeline loads it (decode, centre-crop, resize)
  vae        the de-tokenizer's VAE alone: encode -> decode (posterior mode)
  decoder    the visual tokenizer's pixel decoder from the picture's features (a small decoder,
             trained only as the tokenizer's reconstruction loss: a lower bound on what the
             features carry; results before the switch to features call it vq_decoder)
  render     the full de-tokenizer from the ground-truth features, at the served steps/guidance
  img2img    the UNet and the feature conditioning starting halfway (strength 0.5) from the VAE
             latent of the true picture: does the UNet keep the hero when it starts near it?
  sweep      render at steps x guidance, on the first --sweep-segments pictures of each story

Per character (the story's hero): the fraction of pictures judged right, the count, and whom
the wrong pictures showed instead (``training.evaluation.judge.shown_hero``); the mean over pictures,
the min over characters, and the seconds each stage took (on one thread, so that the stages' times
compare). In the returning world: per character name (each one wherever it is there) and per role
(hero, friend), the fraction drawn right and the count; the mean over every character judged, the
min over names, and each attribute's mean. Results: docs/results.md#where-the-picture-path-loses-a-character.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFilter

from training.evaluation.heldout import read_heldout
from training.evaluation.judge import ATTRIBUTES, judge, judge_truth, place_right, shown_hero, tally
from training.evaluation.run import render_all
from training.evaluation.settings import EvalSettings
from training.storyworld import CHARACTERS, NAMES, Character, Segment, parse_caption
from training.storyworld_pictures import draw_segment

SWEEP_STEPS = (10, 20, 50)
SWEEP_GUIDANCE = (1.0, 3.0, 5.0, 8.0)
IMG2IMG_STRENGTH = 0.5
BLUR_RADII = (0.5, 1.0, 1.5)


@dataclass
class HeldSet:
    """The held-out pictures of one run, flattened story-major: one entry per (story, segment)."""

    keys: list[tuple[int, int]]
    captions: list[str]
    heroes: list[str]
    loaded: list  # PIL pictures as the data pipeline loads them
    segs: list[Segment]  # what each picture shows (its truth record)
    casts: list[tuple[Character, ...]]  # its story's characters (classic: CHARACTERS)
    world: str = "classic"


PER_PICTURE = ("keys", "captions", "heroes", "loaded", "segs", "casts")


def read_set(folder: Path, stories: int, segments: int, size: int) -> HeldSet:
    from actors.imageio import decode_image, resize_square

    held = read_heldout(folder, stories, segments)
    # read_heldout keeps only the openings; the judge needs every segment's caption.
    rows = [json.loads(x) for x in (folder / "storyworld.jsonl").read_text().splitlines()[:stories]]
    keys = [(i, k) for i in range(stories) for k in range(segments)]
    return HeldSet(
        keys=keys,
        captions=[rows[i]["captions"][k] for i, k in keys],
        heroes=[held.heroes[i] for i, _ in keys],
        loaded=[resize_square(decode_image(held.pictures[i][k]), size) for i, k in keys],
        segs=[held.truth[i][k] for i, k in keys],
        casts=[held.casts[i] for i, _ in keys],
        world=held.world,
    )


def subset(held: HeldSet, segments: int) -> HeldSet:
    """The first ``segments`` pictures of every story (for the costly sweep)."""
    rows = [n for n, (_, k) in enumerate(held.keys) if k < segments]
    return replace(held, **{f: [getattr(held, f)[n] for n in rows] for f in PER_PICTURE})


# -- scoring ---------------------------------------------------------------------------------------


def score(held: HeldSet, pictures: list, seconds: float) -> dict:
    """Hero (and place) judged per picture, summarised per character of the story's hero."""
    if held.world != "classic":
        return score_looks(held, pictures, seconds)
    checks = [judge(c, np.asarray(p), h) for c, p, h in zip(held.captions, pictures, held.heroes)]
    shown = [shown_hero(c, p) for c, p in zip(held.captions, pictures)]
    per = {}
    for ch in CHARACTERS:
        rows = [n for n, h in enumerate(held.heroes) if h == ch.name]
        if rows:
            wrong = Counter(shown[n] for n in rows if not checks[n]["hero"])
            per[ch.name] = {
                "hero": float(np.mean([checks[n]["hero"] for n in rows])),
                "n": len(rows),
                "drawn_as": dict(wrong.most_common()),
            }
    return {
        "per_character": per,
        "mean": float(np.mean([c["hero"] for c in checks])),
        "min": min(v["hero"] for v in per.values()),
        "place": float(np.mean([c["place"] for c in checks])),
        "pictures": len(pictures),
        "seconds": round(seconds, 1),
    }


def score_looks(held: HeldSet, pictures: list, seconds: float) -> dict:
    """Every character there judged per picture by the look judge against the truth segment;
    summed per character name and per role ("right": all three attributes), with the place."""
    pictures = [np.asarray(p, dtype=np.float32) for p in pictures]
    rows = [
        row
        for seg, cast, p in zip(held.segs, held.casts, pictures)
        for row in judge_truth(held.world, cast, seg, p)
    ]
    place = [place_right(seg, p, cast) for seg, cast, p in zip(held.segs, held.casts, pictures)]
    return {
        **tally(rows),
        "place": float(np.mean(place)),
        "pictures": len(pictures),
        "seconds": round(seconds, 1),
    }


def timed(stage, *args) -> tuple[list, float]:
    t0 = time.perf_counter()
    out = stage(*args)
    return out, time.perf_counter() - t0


# -- the stages: each returns one picture per held-out entry ----------------------------------------


def truth(held: HeldSet, size: int) -> list:
    if held.world != "classic":
        return [draw_segment(seg, size, cast) for seg, cast in zip(held.segs, held.casts)]
    return [draw_segment(parse_caption(c), size) for c in held.captions]


def batched(fn, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def vae_roundtrip(detok, pixels: torch.Tensor) -> list:
    # The posterior mode: the VAE's best reconstruction, without its sampling noise.
    decoded = batched(lambda b: detok.vae.decode(detok.vae.encode(b).latent_dist.mode()).sample, pixels)
    return detok.pipeline.image_processor.postprocess(decoded, output_type="pil")


def decoder(visual, detok, pixels: torch.Tensor) -> list:
    def decode(b):
        return visual.decode(visual.encode(b))  # what the reconstruction loss trained

    decoded = batched(decode, pixels).clamp(-1, 1)
    return detok.pipeline.image_processor.postprocess(decoded, output_type="pil")


def seeds(held: HeldSet) -> list[int]:
    """The eval's picture seeds for (story, segment), so a stage's renders match the eval's."""
    return [i * 1000 + k for i, k in held.keys]


def render(detok, features: list[np.ndarray], held: HeldSet, steps: int, guidance: float) -> list:
    return render_all(detok, features, seeds(held), EvalSettings(steps=steps, guidance=guidance))[0]


def img2img(
    detok, features: list[np.ndarray], held: HeldSet, steps: int, guidance: float, batch: int = 16
) -> list:
    """Half-noised VAE latents of the true pictures, denoised by the UNet under the features' conditioning."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(detok.pipeline)  # shares the modules, no copy
    pipe.set_progress_bar_config(disable=True)
    out, gens = [], [torch.Generator().manual_seed(x) for x in seeds(held)]
    with torch.no_grad():
        for i in range(0, len(features), batch):
            prompt, pooled = detok.adapter(torch.as_tensor(np.stack(features[i : i + batch])))
            neg, neg_pooled = detok.adapter.null(len(prompt))
            out += pipe(
                image=held.loaded[i : i + batch],
                strength=IMG2IMG_STRENGTH,
                prompt_embeds=prompt,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens[i : i + batch],
            ).images
    return out


# -- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from actors.checkpoint import part_dir, read_manifest
    from actors.detokenizer.model import Detokenizer
    from actors.imageio import to_tensor
    from actors.tokenizer.model import VisualTokenizer
    from cluster.requests import StoryLimits

    size = read_manifest(args.ckpt).image_size
    served = StoryLimits()  # the steps and guidance a story gets when its request names none
    detok = Detokenizer.from_pretrained(part_dir(args.ckpt, "detokenizer"))
    visual = VisualTokenizer.from_pretrained(part_dir(args.ckpt, "visual_tokenizer")).eval()
    held = read_set(args.heldout, args.stories, args.segments, size)
    pixels = to_tensor(held.loaded)
    # The ground-truth features, (Q, D) a picture, as the TokenizerPool makes them.
    features = list(batched(visual.encode, pixels).numpy())
    stages = {
        "truth": lambda: truth(held, size),
        **{
            f"blur {r:g}": (lambda r=r: [im.filter(ImageFilter.GaussianBlur(r)) for im in truth(held, size)])
            for r in BLUR_RADII
        },
        "loaded": lambda: held.loaded,
        "vae": lambda: vae_roundtrip(detok, pixels),
        "decoder": lambda: decoder(visual, detok, pixels),
        "render": lambda: render(detok, features, held, served.default_steps, served.default_guidance),
        "img2img": lambda: img2img(detok, features, held, served.default_steps, served.default_guidance),
    }
    results = {}
    for name, stage in stages.items():
        results[name] = score(held, *timed(stage))
        report(name, results[name])
    return {
        "settings": settings(args, served, size),
        "stages": results,
        "sweep": sweep(detok, features, held, args),
    }


def sweep(detok, features: list[np.ndarray], held: HeldSet, args: argparse.Namespace) -> list[dict]:
    if args.sweep_segments == 0:
        return []
    sub = subset(held, args.sweep_segments)
    sub_features = [features[n] for n, (_, k) in enumerate(held.keys) if k < args.sweep_segments]
    rows = []
    for steps in SWEEP_STEPS:
        for guidance in SWEEP_GUIDANCE:
            scores = score(sub, *timed(render, detok, sub_features, sub, steps, guidance))
            rows.append({"steps": steps, "guidance": guidance, **scores})
            report(f"steps {steps} guidance {guidance:g}", scores)
    return rows


def settings(args: argparse.Namespace, served, size: int) -> dict:
    source = args.heldout / "storyworld.json"
    return {
        "ckpt": str(args.ckpt),
        "heldout": str(args.heldout),
        "stories": args.stories,
        "segments": args.segments,
        "sweep_segments": args.sweep_segments,
        "image_size": size,
        "steps": served.default_steps,
        "guidance": served.default_guidance,
        "img2img_strength": IMG2IMG_STRENGTH,
        "threads": 1,
        "data": json.loads(source.read_text())["command"] if source.is_file() else None,
    }


# -- output ----------------------------------------------------------------------------------------


def report(name: str, scores: dict) -> None:
    print(
        f"[detok_stages] {name}: mean {scores['mean']:.3f}, min {scores['min']:.3f} "
        f"({scores['pictures']} pictures, {scores['seconds']:.1f} s)",
        flush=True,
    )


def table(result: dict) -> str:
    if "per_role" in result["stages"]["truth"]:
        return look_table(result)
    names = [c.name for c in CHARACTERS]
    head = (
        "| stage | " + " | ".join(names) + " | mean | min | place | pictures | s |\n"
        "| --- |" + " --- |" * (len(names) + 5)
    )
    rows = [row(name, r, names) for name, r in result["stages"].items()]
    rows += [
        row(f"render, {r['steps']} steps, guidance {r['guidance']:g}", r, names) for r in result["sweep"]
    ]
    wrong = [
        f"| {name} | "
        + "; ".join(
            f"{n} as {', '.join(f'{k} {v}' for k, v in c['drawn_as'].items())}"
            for n, c in r["per_character"].items()
            if c["drawn_as"]
        )
        + " |"
        for name, r in result["stages"].items()
    ]
    return "\n".join(
        [head, *rows, "", "| stage | wrong pictures: the hero drawn as |", "| --- | --- |", *wrong]
    )


def row(label: str, scores: dict, names: list[str]) -> str:
    per = scores["per_character"]
    cells = [f"{per[n]['hero']:.2f} ({per[n]['n']})" if n in per else "" for n in names]
    return (
        f"| {label} | "
        + " | ".join(cells)
        + f" | {scores['mean']:.3f} | {scores['min']:.2f} | {scores['place']:.3f} "
        f"| {scores['pictures']} | {scores['seconds']:.0f} |"
    )


def look_table(result: dict) -> str:
    """The returning world's table: each stage's fraction drawn right per character name and role."""
    every = [*result["stages"].values(), *result["sweep"]]
    names = [n for n in NAMES if any(n in r["per_character"] for r in every)]
    roles = ("hero", "friend")
    head = (
        "| stage | "
        + " | ".join([*names, *roles])
        + " | mean | min | "
        + " | ".join(ATTRIBUTES)
        + " | place | pictures | s |\n| --- |"
        + " --- |" * (len(names) + len(roles) + len(ATTRIBUTES) + 5)
    )
    rows = [look_row(name, r, names, roles) for name, r in result["stages"].items()]
    rows += [
        look_row(f"render, {r['steps']} steps, guidance {r['guidance']:g}", r, names, roles)
        for r in result["sweep"]
    ]
    return "\n".join([head, *rows])


def look_row(label: str, scores: dict, names: list[str], roles: tuple[str, ...]) -> str:
    groups = [scores["per_character"].get(n) for n in names] + [
        scores["per_role"].get(role) for role in roles
    ]
    cells = [f"{g['right']:.2f} ({g['n']})" if g else "" for g in groups]
    return (
        f"| {label} | "
        + " | ".join(cells)
        + f" | {scores['mean']:.3f} | {scores['min']:.2f} | "
        + " | ".join(f"{scores['per_attribute'][a]:.3f}" for a in ATTRIBUTES)
        + f" | {scores['place']:.3f} | {scores['pictures']} | {scores['seconds']:.0f} |"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny"))
    ap.add_argument(
        "--heldout",
        type=Path,
        default=Path("data/sw-heldout"),
        help="a StoryWorld folder the model never saw (seedstory data storyworld --seed 1), "
        "classic or returning",
    )
    ap.add_argument(
        "--stories", type=int, default=64, help="held-out stories (all 64: every hero gets pictures)"
    )
    ap.add_argument(
        "--segments", type=int, default=3, help="pictures per story for every stage but the sweep"
    )
    ap.add_argument(
        "--sweep-segments",
        type=int,
        default=1,
        help="pictures per story in the steps x guidance sweep (0: no sweep)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detok_stages.json"))
    args = ap.parse_args()
    if not 0 <= args.sweep_segments <= args.segments:
        ap.error("need 0 <= --sweep-segments <= --segments")
    return args


def main() -> None:
    torch.set_num_threads(1)  # a shared 2-core machine; also makes the stage times comparable
    args = parse_args()
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
