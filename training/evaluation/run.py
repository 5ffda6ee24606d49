"""Running the eval: every held-out opening written on under each sink mode by the vLLM story
engine, the pictures rendered by the de-tokenizer, every story judged (``judge_story``), the
Fréchet distance against the real pictures, and the ceilings (the de-tokenizer and the visual
tokenizer's own decoder, from the real pictures' features); ``run_eval`` does it all and writes
the results. Each mode uses the same sampling seeds and picture seeds, so the modes
differ only in their attention."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from actors.tokenizer.text import caption_text
from training.evaluation.heldout import HeldOut, heldout_source, read_heldout
from training.evaluation.judge import judge, judge_cast, judge_look, judge_truth, returns, tally
from training.evaluation.report import (
    FD_BIN,
    fd_standard_error,
    frechet,
    summarise,
    write_captions,
    write_outputs,
)
from training.evaluation.settings import EvalSettings
from training.storyworld import parse_caption, there

# -- generating and rendering ------------------------------------------------------------------------


def write_stories(
    ckpt: Path, mode: str, prompts: list[list[int]], settings: EvalSettings, scripts: list[list[list[int]]]
) -> dict:
    """All stories under one sink mode, batched in one engine: each picture's features and caption
    ids (``PictureWritten``), time, peak KV. ``scripts``: per story, the captions given for its
    later pictures (empty lists: the model writes them)."""
    from actors.mllm.driver import StoryDriver
    from actors.mllm.engine import EngineConfig, Sampling, StoryEngine

    engine = StoryEngine(
        EngineConfig(
            checkpoint=str(ckpt),
            sink=replace(settings.sink, mode=mode),
            max_stories=len(prompts),
            kv_cache_bytes=settings.kv_cache_bytes,
            max_story_segments=settings.segments + 1,
        )
    )
    try:
        for story, prompt in enumerate(prompts):
            engine.submit(
                str(story),
                prompt,
                settings.segments,
                Sampling(settings.temperature, settings.top_p, seed=settings.seed + story),
                script=scripts[story],
            )
        drained = StoryDriver(engine).drain()
        return {
            "segments": {int(sid): events for sid, events in drained.pictures.items()},
            "seconds": drained.seconds,
            "tokens": drained.tokens,
            "sink": asdict(engine.config.sink),
            "peak_kv_bytes": drained.peak_blocks_in_use * engine.block_bytes(),
        }
    finally:
        engine.shutdown()


def picture_seed(settings: EvalSettings, story: int, segment: int) -> int:
    """The same picture seed for the same (story, segment) in every mode, and in the ceiling."""
    return settings.seed * 100_003 + story * 1000 + segment


def render_all(
    detok, features: list[np.ndarray], seeds: list[int], settings: EvalSettings, batch: int = 16
) -> tuple[list, float]:
    """Every picture's features (Q, D) rendered at the eval's steps and guidance, ``batch`` at a
    time; the pictures and the seconds it took."""
    start, pictures = time.perf_counter(), []
    for at in range(0, len(features), batch):
        pictures += detok.render_seeded(
            features[at : at + batch],
            seeds[at : at + batch],
            steps=settings.steps,
            guidance=settings.guidance,
            guidance_until=settings.guidance_until,
        )
    return pictures, time.perf_counter() - start


def decode_all(visual, features: list[np.ndarray], batch: int = 64) -> tuple[list, float]:
    """Every picture's features drawn by the visual tokenizer's own pixel decoder, as PIL images
    (as ``render_all`` gives them), ``batch`` at a time; the pictures and the seconds it took."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    start, pictures, dtype = time.perf_counter(), [], next(visual.parameters()).dtype
    with torch.no_grad():
        for at in range(0, len(features), batch):
            rows = torch.as_tensor(np.stack(features[at : at + batch])).to(dtype)
            images = visual.decode(rows).float().clamp(-1, 1)  # (B, 3, H, W) in [-1, 1]
            pictures += VaeImageProcessor().postprocess(images, output_type="pil")
    return pictures, time.perf_counter() - start


def image_features(visual, pictures: list) -> np.ndarray:
    """The visual tokenizer's features of each picture (its mean encoder output): the space the
    Fréchet distance is measured in."""
    import torch

    from actors.imageio import to_tensor

    features = []
    with torch.no_grad():
        for at in range(0, len(pictures), 64):
            features.append(visual.mean_patch(to_tensor(pictures[at : at + 64])).numpy())
    return np.concatenate(features)


# -- judging a mode --------------------------------------------------------------------------------


def judge_story(
    held: HeldOut, story: int, written: list[tuple[int, str, np.ndarray]], window: int
) -> list[tuple]:
    """Every verdict on story ``story`` as written, from its (segment index, caption, picture) in
    order from the opening: (segment index, check, value). Each check once a segment, but
    "returning": once per character that comes back (after ``window`` segments away) in that segment."""
    if held.worlds[story] == "classic":
        return [
            (index, name, value)
            for index, text, picture in written
            for name, value in judge(text, picture, held.heroes[story]).items()
        ]
    cast, hero, verdicts = held.casts[story], held.heroes[story], []
    parsed = [parse_caption(text, cast) for _, text, _ in written]
    drawn = [
        {} if seg is None else {name: judge_look(seg, cast, name, picture) for name in there(seg)}
        for seg, (_, _, picture) in zip(parsed, written)
    ]
    for (index, _, picture), seg, looks in zip(written, parsed, drawn):
        verdicts += [
            (index, name, value) for name, value in judge_cast(seg, picture, hero, cast, looks).items()
        ]
    # A caption that does not parse names nobody we can judge: it counts as everyone away.
    back = returns([list(looks) for looks in drawn], [character.name for character in cast], window)
    verdicts += [
        (index, "returning", drawn[at][name]["right"])
        for at, (index, _, _) in enumerate(written)
        for name in back[at]
    ]
    return verdicts


def evaluate_mode(ckpt: Path, mode: str, held: HeldOut, builder, detok, settings: EvalSettings) -> dict:
    """One sink mode's outcome: every story written and rendered, each verdict per segment and per
    story, the captions, the pictures (for the Fréchet distance) and what the mode cost."""
    prompts = [builder.prompt(ids, None).ids for ids in builder.caption_ids(held.openings)]
    scripts = [
        builder.caption_ids(captions[1:]) if settings.captions == "given" and len(captions) > 1 else []
        for captions in held.captions
    ]
    generated = write_stories(ckpt, mode, prompts, settings, scripts)
    keys = [(story, event.index) for story, events in generated["segments"].items() for event in events]
    features = [event.features for events in generated["segments"].values() for event in events]
    pictures, render_seconds = render_all(
        detok, features, [picture_seed(settings, story, index) for story, index in keys], settings
    )
    by_story: dict[int, list] = {}
    for (story, index), picture in zip(keys, pictures):
        event = generated["segments"][story][index]
        by_story.setdefault(story, []).append(
            (index, caption_text(builder.text, event.caption_ids, held.openings[story]), np.asarray(picture))
        )
    per_segment = {index: {name: [] for name in held.checks} for index in range(settings.segments)}
    per_story = {story: {name: [] for name in held.checks} for story in range(len(prompts))}
    for story, written in by_story.items():
        for index, name, value in judge_story(held, story, written, settings.sink.window_segments):
            per_segment[index][name].append(value)
            per_story[story][name].append(value)
    # The verdicts' own "valid" values (one a segment, in order), not a second parse.
    captions = {
        story: {
            "captions": [text for _, text, _ in written],
            "valid": [bool(value) for value in per_story[story]["valid"]],
        }
        for story, written in by_story.items()
    }
    return {
        "mode": mode,
        "sink": generated["sink"],
        "pictures": pictures,
        "keys": keys,
        "per_segment": per_segment,
        "per_story": per_story,
        "captions": captions,
        "seconds": generated["seconds"],
        "render_seconds": render_seconds,
        "tokens": generated["tokens"],
        "peak_kv_bytes": generated["peak_kv_bytes"],
        "complete": sum(len(events) == settings.segments for events in generated["segments"].values()),
    }


def fd_scores(
    visual, outcome: dict, real_feats: np.ndarray, settings: EvalSettings
) -> tuple[float, float, list[float]]:
    """The Fréchet distance over all pictures, its standard error over stories, and per bin of segments."""
    feats = image_features(visual, outcome["pictures"])
    # the real picture at each generated key
    real = real_feats[[story * settings.segments + index for story, index in outcome["keys"]]]
    by_bin = []
    for first in range(0, settings.segments, FD_BIN):
        rows = [row for row, (_, index) in enumerate(outcome["keys"]) if first <= index < first + FD_BIN]
        by_bin.append(frechet(feats[rows], real[rows]) if len(rows) > 2 else float("nan"))
    story_of = [story for story, _ in outcome["keys"]]
    return frechet(feats, real), fd_standard_error(feats, real, story_of, settings.seed), by_bin


def ceiling(held: HeldOut, builder, detok, settings: EvalSettings) -> dict:
    """The ceilings from ground-truth features: the real held-out pictures of the eval's stories
    and segments, made features by the visual tokenizer (``VisualTokenizer.encode``, as the
    TokenizerPool makes a start picture's), then

    - rendered by the de-tokenizer as the eval renders (steps, guidance, seeds): a mode cannot do
      better than this with features as good as the visual tokenizer's;
    - drawn by the visual tokenizer's own pixel decoder (``decode(encode(x))``, under
      ``"decoder"``): what the features themselves carry, whatever the de-tokenizer makes of them;

    each judged against its ground-truth segment by the same judge."""
    keys = [(story, index) for story, pictures in enumerate(held.pictures) for index in range(len(pictures))]
    features = [
        row for pictures in held.pictures for row in builder.image_features(pictures)
    ]  # one batch a story
    bad = [f for f in features if not isinstance(f, np.ndarray)]
    if bad:
        raise ValueError(f"a held-out picture does not encode: {bad[0]}")
    pictures, seconds = render_all(
        detok, features, [picture_seed(settings, story, index) for story, index in keys], settings
    )
    decoded, decode_seconds = decode_all(builder.visual, features)
    return {
        "world": held.world,
        **tally(judge_pictures(held, keys, pictures)),
        "pictures": len(pictures),
        "render_seconds": round(seconds, 1),
        "decoder": {**tally(judge_pictures(held, keys, decoded)), "seconds": round(decode_seconds, 1)},
    }


def judge_pictures(held: HeldOut, keys: list[tuple[int, int]], pictures: list) -> list[tuple]:
    """``judge_truth`` rows of the real segments at ``keys`` (story, segment), drawn as ``pictures``."""
    return [
        row
        for (story, index), picture in zip(keys, pictures)
        for row in judge_truth(held.worlds[story], held.casts[story], held.truth[story][index], picture)
    ]


# -- the whole eval --------------------------------------------------------------------------------


def training_window(ckpt: Path) -> int | None:
    """The segments per training window, if the checkpoint's training.json records its data's conversion."""
    path = ckpt / "training.json"
    return (json.loads(path.read_text()).get("provenance") or {}).get("window") if path.is_file() else None


def run_eval(
    ckpt: Path,
    heldout: Path,
    out: Path,
    settings: EvalSettings = EvalSettings(),  # noqa: B008 (frozen: one shared default is safe)
    card: bool = False,
) -> str:
    """Every mode of ``settings`` on the held-out stories of ``heldout``, then the ceiling; writes
    the results into ``out`` (and the table into the model card with ``card``); returns the table."""
    from actors.checkpoint import part_dir, read_manifest
    from actors.detokenizer.model import Detokenizer
    from actors.imageio import decode_image, resize_square
    from actors.tokenizer.prompts import PromptBuilder

    out.mkdir(parents=True, exist_ok=True)
    size = read_manifest(ckpt).image_size
    held = read_heldout(heldout, settings.stories, settings.segments)
    builder = PromptBuilder(str(ckpt))
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    detok.use_sampler(settings.sampler)
    real = [[resize_square(decode_image(data), size) for data in pictures] for pictures in held.pictures]
    real_feats = image_features(
        builder.visual, [picture for pictures in real for picture in pictures]
    )  # story-major
    results, captions = [], {}
    for mode in settings.modes:
        print(f"[eval] {mode}: {settings.stories} stories x {settings.segments} segments", flush=True)
        outcome = evaluate_mode(ckpt, mode, held, builder, detok, settings)
        outcome["fd"], outcome["fd_se"], outcome["fd_by_bin"] = fd_scores(
            builder.visual, outcome, real_feats, settings
        )
        results.append(summarise(outcome, settings))
        captions[mode] = outcome["captions"]
        print(f"[eval] {mode}: {json.dumps(results[-1]['summary'])}", flush=True)
    ceiling_tally = None
    if settings.ceiling:
        print(
            f"[eval] ceilings: {settings.stories * settings.segments} real pictures' features",
            flush=True,
        )
        ceiling_tally = ceiling(held, builder, detok, settings)
        decoder = ceiling_tally["decoder"]
        print(
            f"[eval] ceiling: de-tokenizer mean {ceiling_tally['mean']:.3f}, min {ceiling_tally['min']:.3f}; "
            f"tokenizer's decoder mean {decoder['mean']:.3f}, min {decoder['min']:.3f}",
            flush=True,
        )
    table = write_outputs(
        out,
        results,
        settings,
        heldout_source(heldout),
        world=held.world,
        ceiling=ceiling_tally,
        window=training_window(ckpt),
    )
    write_captions(out / "stories.jsonl", captions)
    if card:  # one section per story length, so the 25- and 50-segment evals stand side by side
        from training.card import add_evaluation

        add_evaluation(ckpt, f"{settings.segments} segments", table)
    return table
