"""``seedstory eval``: long stories under each sink mode, judged against StoryWorld's ground truth.

For each mode (dense, window, streaming, multimodal) the same held-out openings are written
to ``segments`` pictures by the vLLM story engine, with the same sampling seeds, and every
picture is rendered by the de-tokenizer with the same seed. Each segment is judged:

- caption validity: the caption parses under the StoryWorld grammar (``parse_caption``, with the
  story's cast in the returning world);
- hero consistency: the caption names the story's hero, and the picture shows the hero. Classic
  world: among pictures drawn by the ground-truth renderer with every character as the hero (the
  caption's place, action and friends fixed), the nearest to the generated one has the story's
  hero, so colour and shape both count. Returning world: the look judge below says the hero is
  drawn right;
- place agreement: likewise, the nearest ground-truth picture over every place has the
  caption's place;
- Fréchet distance between generated and real held-out pictures, in the visual tokenizer's
  feature space (mean encoder output);

and, in the returning world (a random cast of 4 whose looks only the opening says):

- look fidelity: the fraction of the characters a caption names that are drawn right. The look
  judge renders the caption's segment with one attribute of one character's look varied (every
  colour, every shape, both patterns; everyone else at their true looks): the character is drawn
  right when, for each attribute, the true value's render is the nearest to the picture. Which
  attributes a wrong one got wrong is kept too, for diagnosis (``shown_look``). An unparsed
  caption scores 0, as for the hero and the place;
- returning fidelity: a character the caption names after it was away from at least the sink's
  window (``window_segments``) of the story's segments before, drawn right; per story the mean
  over its returns (a story without one has no value).

plus generation time and peak KV bytes, story-paired differences between modes, and the
de-tokenizer's ceiling: the real held-out pictures, encoded to codes by the visual tokenizer and
rendered as the eval renders, judged against their ground truth. Outputs: ``results.json``,
``table.md`` (the shape of the paper's Table 2) and ``metrics.png`` (each metric against the
segment index, per mode).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from actors.mllm.sink import MODES, NEIGHBOURHOODS, SinkSettings
from actors.tokenizer.text import caption_text
from training.storyworld import (CHARACTERS, COLOURS, NAMES, PATTERNS, PLACES, SHAPES, Character, Segment,
                                 cast_from_looks, draw_segment, parse_caption, segment_of, there)

FD_BIN = 5  # segments per bin of the per-segment Fréchet distance (50 pictures per index is too few)
FD_RESAMPLES = 200  # story bootstrap for the Fréchet distance's standard error
CHECKS = ("valid", "hero", "place")
CAST_CHECKS = (*CHECKS, "look", "returning")  # the returning world's
OPTIONAL = ("returning",)  # checks a story may have no value for (no character came back in it)
PAIRED = ("hero", "place", "look", "returning")  # what the story-paired differences compare
# What the look judge varies, one attribute at a time: every value the returning world draws from.
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS}
TITLES = {"valid": "caption validity", "hero": "hero consistency", "place": "place agreement",
          "look": "look fidelity", "returning": "returning fidelity"}


@dataclass(frozen=True)
class EvalSettings:
    stories: int = 50
    segments: int = 25
    modes: tuple[str, ...] = MODES
    steps: int = 10             # denoising steps per picture
    guidance: float = 5.0       # classifier-free guidance: the tiny de-tokenizer draws its characters with it
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    kv_cache_bytes: int = 1 << 30
    # Every mode's sink tokens, window and neighbourhoods (`seedstory eval` takes them from the
    # Serve config, as serve does); its mode is unused: the eval runs each of ``modes``. Its
    # window also says when a character counts as returning.
    sink: SinkSettings = field(default_factory=SinkSettings)
    ceiling: bool = True        # also judge the de-tokenizer on the real pictures' codes (one more render pass)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or self.stories < 2 or self.segments < 1:
            raise ValueError(f"eval: modes must be among {MODES}, stories >= 2, segments >= 1 (got {bad})")


# -- judging one segment (plain numpy + the ground-truth renderer) ----------------------------------

@lru_cache(maxsize=16384)
def _render(seg: Segment, cast: tuple[Character, ...], size: int) -> np.ndarray:
    """A ground-truth picture, kept as uint8 (a quarter of float32's memory: the look judge draws
    about a dozen per character, and the detokenizer benchmark judges the same segments per stage)."""
    return np.asarray(draw_segment(seg, size, cast))


def _error(seg: Segment, cast: tuple[Character, ...], picture: np.ndarray) -> float:
    """Pixel MSE between ``picture`` (float32) and the ground truth of ``seg`` drawn with ``cast``."""
    return float(((_render(seg, cast, picture.shape[0]) - picture) ** 2).mean())


def nearest(picture: np.ndarray, candidates: list[Segment], cast: tuple[Character, ...] = CHARACTERS) -> Segment:
    """The candidate whose ground-truth picture is nearest (pixel MSE) to ``picture`` (H, W, 3)."""
    picture = np.asarray(picture, dtype=np.float32)
    return candidates[int(np.argmin([_error(c, cast, picture) for c in candidates]))]


def judge(caption: str, picture: np.ndarray, hero: str) -> dict:
    """The three per-segment checks for one classic caption and its picture (H, W, 3 uint8/float)."""
    seg = parse_caption(caption)
    if seg is None:
        return {"valid": 0.0, "hero": 0.0, "place": 0.0}
    picture = np.asarray(picture, dtype=np.float32)
    return {"valid": 1.0, "hero": float(seg.hero == hero and _shown_hero(seg, picture) == hero),
            "place": place_right(seg, picture)}


def place_right(seg: Segment, picture: np.ndarray, cast: tuple[Character, ...] = CHARACTERS) -> float:
    """1.0 if, over every place, the nearest ground-truth picture has the segment's own."""
    return float(nearest(picture, [replace(seg, place=p.name) for p in PLACES], cast).place == seg.place)


def shown_hero(caption: str, picture: np.ndarray) -> str | None:
    """Whom ``judge``'s hero check sees as the hero of ``picture`` (None: the caption does not
    parse). ``judge`` says only right or wrong; this says which character a wrong picture drew."""
    seg = parse_caption(caption)
    return None if seg is None else _shown_hero(seg, np.asarray(picture, dtype=np.float32))


def _shown_hero(seg: Segment, picture: np.ndarray) -> str:
    """The hero among every character not already in the scene, by the nearest ground-truth picture."""
    heroes = [Segment(c.name, seg.others, seg.place, seg.action) for c in CHARACTERS if c.name not in seg.others]
    return nearest(picture, heroes).hero


# -- the look judge (any cast; the returning world's random looks) ------------------------------------

def look_of(cast: tuple[Character, ...], name: str) -> dict[str, str]:
    return next(c for c in cast if c.name == name).look_record()


def _dressed(cast: tuple[Character, ...], name: str, look: dict[str, str]) -> tuple[Character, ...]:
    """``cast`` with ``name`` given ``look`` (equal to ``cast`` for its true look, so that render
    is drawn once and cached for every attribute and character)."""
    return tuple(replace(c, colour=COLOURS[look["colour"]], colour_name=look["colour"], shape=look["shape"],
                         pattern=look["pattern"]) if c.name == name else c for c in cast)


def shown_look(seg: Segment, cast: tuple[Character, ...], name: str, picture: np.ndarray) -> dict[str, str]:
    """The look ``picture`` gives ``name`` (who is in ``seg``), by ground-truth renders of ``seg``
    with everyone else at their true looks: from ``name``'s true look, each attribute in turn is
    set to the value whose render is nearest, the others as they stand, until none changes.

    The first pass tries every look one attribute away from the true one, so the search stays at
    the true look exactly when that is the nearest of them. Later passes serve the diagnosis:
    with the others held at their true values a wrong pattern can pass for a wrong colour (a
    striped render is darker), so they are held at what the picture shows. A value is replaced
    only by a strictly nearer one, so the search ends; on 312 random wrong looks, half with
    noise, it found the nearest of all 72 looks every time with a quarter of the renders."""
    picture, look = np.asarray(picture, dtype=np.float32), look_of(cast, name)
    changed = True
    while changed:
        changed = False
        for attribute, values in ATTRIBUTES.items():
            tried = [look[attribute], *(v for v in values if v != look[attribute])]
            errors = [_error(seg, _dressed(cast, name, {**look, attribute: v}), picture) for v in tried]
            best = tried[int(np.argmin(errors))]  # the first of equals: the current value wins a tie
            changed |= best != look[attribute]
            look[attribute] = best
    return look


def judge_look(seg: Segment, cast: tuple[Character, ...], name: str, picture: np.ndarray) -> dict[str, float]:
    """Whether ``picture`` draws ``name`` right: "right", its true look's render is the nearest of
    every look that differs from it in one attribute; and per attribute, whether the look the
    picture shows (``shown_look``) has it right."""
    true, shown = look_of(cast, name), shown_look(seg, cast, name, picture)
    each = {a: float(shown[a] == true[a]) for a in ATTRIBUTES}
    return {"right": float(shown == true), **each}


def judge_cast(seg: Segment | None, picture: np.ndarray, hero: str, cast: tuple[Character, ...],
               drawn: dict[str, dict[str, float]]) -> dict[str, float]:
    """A returning-world segment's checks, ``drawn`` being ``judge_look`` for each name it has.
    A caption that does not parse fails them all, as in the classic ``judge``."""
    if seg is None:
        return dict.fromkeys(("valid", "hero", "place", "look"), 0.0)
    return {"valid": 1.0, "hero": float(seg.hero == hero and drawn[hero]["right"] == 1.0),
            "place": place_right(seg, np.asarray(picture, dtype=np.float32), cast),
            "look": float(np.mean([d["right"] for d in drawn.values()]))}


def returns(present: list[list[str]], cast: Collection[str], window: int) -> list[list[str]]:
    """Per segment, the names in it that were absent from at least the ``window`` segments just
    before it: those a sliding window of ``window`` segments no longer holds. The opening
    (segment 0) counts as every cast member present: its caption names them all, with their looks."""
    last = dict.fromkeys(cast, 0)  # the last segment each name was in
    back: list[list[str]] = [[]]
    for k in range(1, len(present)):
        back.append([n for n in present[k] if k - last[n] - 1 >= window])
        last.update(dict.fromkeys(present[k], k))
    return back


def judge_truth(world: str, cast: tuple[Character, ...], seg: Segment, picture) -> list[tuple[str, str, dict]]:
    """The characters of a ground-truth segment, judged in ``picture``: (name, role, verdict). The
    classic world: the hero, by the classic judge ({"right"}); the returning world: everyone
    there, by the look judge ({"right", colour, shape, pattern})."""
    picture = np.asarray(picture, dtype=np.float32)
    if world == "classic":
        return [(seg.hero, "hero", {"right": float(_shown_hero(seg, picture) == seg.hero)})]
    return [(n, "hero" if n == seg.hero else "friend", judge_look(seg, cast, n, picture)) for n in there(seg)]


def tally(rows: list[tuple[str, str, dict]]) -> dict:
    """``judge_truth`` rows summed up: per character name and per role, each verdict's mean and
    the count; per attribute the mean; "right" as the mean over all and the min over characters."""
    def group(at: int) -> dict:
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row[at], []).append(row[2])
        return {g: {k: float(np.mean([v[k] for v in vs])) for k in vs[0]} | {"n": len(vs)} for g, vs in groups.items()}

    per = group(0)
    per = {n: per[n] for n in sorted(per, key=lambda n: NAMES.index(n) if n in NAMES else len(NAMES))}
    return {"per_character": per, "per_role": group(1),
            "per_attribute": {a: float(np.mean([r[2][a] for r in rows]))
                              for a in ATTRIBUTES if rows and a in rows[0][2]},
            "mean": float(np.mean([r[2]["right"] for r in rows])) if rows else float("nan"),
            "min": min((v["right"] for v in per.values()), default=float("nan")), "judged": len(rows)}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, d) and b (M, d)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s1 = _sqrt_psd(c1)
    cross = np.linalg.eigvalsh(s1 @ c2 @ s1).clip(min=0)  # tr sqrt(C1 C2) = tr sqrt(C1^½ C2 C1^½)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(cross).sum())


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


# -- the held-out set ----------------------------------------------------------------------------

@dataclass
class HeldOut:
    openings: list[str]
    heroes: list[str]
    pictures: list[list[bytes]]  # real pictures per story, per segment (PNG/JPEG bytes)
    worlds: list[str]            # per story: "classic" or "returning" (one world a set)
    casts: list[tuple[Character, ...]]  # per story, hero first (classic: CHARACTERS)
    truth: list[list[Segment]]   # per story, per segment: what the real picture shows

    @property
    def world(self) -> str:
        return self.worlds[0]

    @property
    def checks(self) -> tuple[str, ...]:
        return CAST_CHECKS if self.world == "returning" else CHECKS


def _cast(record: dict) -> tuple[Character, ...]:
    """A story's characters from its truth record, hero first."""
    if record.get("world", "classic") == "classic":
        return CHARACTERS
    return cast_from_looks(record["looks"])  # hero first, as the world writes the looks


def read_heldout(folder: Path, stories: int, segments: int) -> HeldOut:
    lines = (folder / "storyworld.jsonl").read_text().splitlines()
    truth = (folder / "truth.jsonl").read_text().splitlines()
    if min(len(lines), len(truth)) < stories:
        raise ValueError(f"{folder} has {min(len(lines), len(truth))} stories; the eval asks for {stories}")
    rows, gts = [json.loads(x) for x in lines[:stories]], [json.loads(t) for t in truth[:stories]]
    if min(min(len(r["captions"]), len(r["images"]), len(gt["segments"])) for r, gt in zip(rows, gts)) < segments:
        raise ValueError(f"{folder}: held-out stories are shorter than {segments} segments")
    worlds = [gt.get("world", "classic") for gt in gts]
    if len(set(worlds)) > 1:
        raise ValueError(f"{folder} mixes StoryWorld worlds {sorted(set(worlds))}; the eval judges one at a time")
    return HeldOut(openings=[r["captions"][0] for r in rows], heroes=[gt["hero"] for gt in gts],
                   pictures=[[(folder / "images" / p).read_bytes() for p in r["images"][:segments]] for r in rows],
                   worlds=worlds, casts=[_cast(gt) for gt in gts],
                   truth=[[segment_of(x) for x in gt["segments"][:segments]] for gt in gts])


# -- generating ----------------------------------------------------------------------------------

def write_stories(ckpt: Path, mode: str, prompts: list[list[int]], s: EvalSettings) -> dict:
    """All stories under one sink mode, batched in one engine: codes, caption ids, time, peak KV."""
    from actors.mllm.driver import StoryDriver
    from actors.mllm.engine import EngineConfig, Sampling, StoryEngine

    engine = StoryEngine(EngineConfig(checkpoint=str(ckpt), sink=replace(s.sink, mode=mode),
                                      max_stories=len(prompts), kv_cache_bytes=s.kv_cache_bytes,
                                      max_story_segments=s.segments + 1))
    try:
        for i, prompt in enumerate(prompts):
            engine.submit(str(i), prompt, s.segments, Sampling(s.temperature, s.top_p, seed=s.seed + i))
        run = StoryDriver(engine).drain()
        return {"segments": {int(sid): pictures for sid, pictures in run.pictures.items()}, "seconds": run.seconds,
                "tokens": run.tokens, "sink": asdict(engine.config.sink),
                "peak_kv_bytes": run.peak_blocks_in_use * engine.block_bytes()}
    finally:
        engine.shutdown()


def picture_seed(s: EvalSettings, story: int, segment: int) -> int:
    """The same picture seed for the same (story, segment) in every mode, and in the ceiling."""
    return s.seed * 100_003 + story * 1000 + segment


def render_all(detok, codes: list[list[int]], seeds: list[int], s: EvalSettings, batch: int = 16) -> tuple[list, float]:
    t0, pictures = time.perf_counter(), []
    for i in range(0, len(codes), batch):
        pictures += detok.render_seeded(codes[i:i + batch], seeds[i:i + batch], steps=s.steps, guidance=s.guidance)
    return pictures, time.perf_counter() - t0


# -- one mode, then the whole table ----------------------------------------------------------------

def judge_story(held: HeldOut, i: int, segments: list[tuple[int, str, np.ndarray]], window: int) -> list[tuple]:
    """Every verdict on story ``i`` as written, from its (segment index, caption, picture) in order
    from the opening: (segment index, check, value). Each check once a segment, but "returning":
    once per character that comes back (after ``window`` segments away) in that segment."""
    if held.worlds[i] == "classic":
        return [(k, name, v) for k, text, pic in segments for name, v in judge(text, pic, held.heroes[i]).items()]
    cast, hero, out = held.casts[i], held.heroes[i], []
    parsed = [parse_caption(text, cast) for _, text, _ in segments]
    drawn = [{} if seg is None else {n: judge_look(seg, cast, n, pic) for n in there(seg)}
             for seg, (_, _, pic) in zip(parsed, segments)]
    for (k, _, pic), seg, looks in zip(segments, parsed, drawn):
        out += [(k, name, v) for name, v in judge_cast(seg, pic, hero, cast, looks).items()]
    # A caption that does not parse names nobody we can judge: it counts as everyone away.
    back = returns([list(looks) for looks in drawn], [c.name for c in cast], window)
    out += [(k, "returning", drawn[at][name]["right"]) for at, (k, _, _) in enumerate(segments) for name in back[at]]
    return out


def evaluate_mode(ckpt: Path, mode: str, held: HeldOut, builder, detok, s: EvalSettings) -> dict:
    prompts = [builder.prompt(ids, None) for ids in builder.caption_ids(held.openings)]
    run = write_stories(ckpt, mode, prompts, s)
    keys = [(i, ev.index) for i, evs in run["segments"].items() for ev in evs]
    codes = [ev.codes for evs in run["segments"].values() for ev in evs]
    pictures, render_s = render_all(detok, codes, [picture_seed(s, i, k) for i, k in keys], s)
    written: dict[int, list] = {}
    for (i, k), pic in zip(keys, pictures):
        ev = run["segments"][i][k]
        written.setdefault(i, []).append((k, caption_text(builder.text, ev.caption_ids, held.openings[i]),
                                          np.asarray(pic)))
    per_seg = {k: {name: [] for name in held.checks} for k in range(s.segments)}
    per_story = {i: {name: [] for name in held.checks} for i in range(len(prompts))}
    for i, segments in written.items():
        for k, name, v in judge_story(held, i, segments, s.sink.window_segments):
            per_seg[k][name].append(v)
            per_story[i][name].append(v)
    # The verdicts' own "valid" values (one a segment, in order), not a second parse.
    captions = {i: {"captions": [text for _, text, _ in segments], "valid": [bool(v) for v in per_story[i]["valid"]]}
                for i, segments in written.items()}
    return {"mode": mode, "sink": run["sink"], "pictures": pictures, "keys": keys, "per_segment": per_seg, "per_story": per_story,
            "captions": captions,
            "seconds": run["seconds"], "render_seconds": render_s, "tokens": run["tokens"],
            "peak_kv_bytes": run["peak_kv_bytes"], "complete": sum(len(v) == s.segments
                                                                   for v in run["segments"].values())}


def ceiling(held: HeldOut, builder, detok, s: EvalSettings) -> dict:
    """The de-tokenizer's ceiling: the real held-out pictures of the eval's stories and segments,
    made codes as the TokenizerPool makes a start picture's, rendered as the eval renders (steps,
    guidance, seeds), judged against their ground-truth segments. A mode cannot do better than
    this with codes the visual tokenizer would give."""
    keys = [(i, k) for i, story in enumerate(held.pictures) for k in range(len(story))]
    codes = [c for story in held.pictures for c in builder.image_codes(story)]  # one batch a story
    pictures, seconds = render_all(detok, codes, [picture_seed(s, i, k) for i, k in keys], s)
    rows = [row for (i, k), pic in zip(keys, pictures)
            for row in judge_truth(held.worlds[i], held.casts[i], held.truth[i][k], pic)]
    return {"world": held.world, **tally(rows), "pictures": len(pictures), "render_seconds": round(seconds, 1)}


def image_features(visual, pictures: list) -> np.ndarray:
    import torch

    from actors.imageio import to_tensor

    out = []
    with torch.no_grad():
        for i in range(0, len(pictures), 64):
            out.append(visual.features(to_tensor(pictures[i:i + 64])).numpy())
    return np.concatenate(out)


def training_window(ckpt: Path) -> int | None:
    """The segments per training window, if the checkpoint's training.json records its data's conversion."""
    path = ckpt / "training.json"
    return (json.loads(path.read_text()).get("provenance") or {}).get("window") if path.is_file() else None


def run_eval(ckpt: Path, heldout: Path, out: Path, s: EvalSettings = EvalSettings(), card: bool = False) -> str:
    from actors.checkpoint import part_dir, read_manifest
    from actors.detokenizer.model import Detokenizer
    from actors.imageio import decode_image, resize_square
    from actors.tokenizer.prompts import PromptBuilder

    out.mkdir(parents=True, exist_ok=True)
    size = read_manifest(ckpt).image_size
    held = read_heldout(heldout, s.stories, s.segments)
    builder = PromptBuilder(str(ckpt))
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    real = [[resize_square(decode_image(b), size) for b in story] for story in held.pictures]
    real_feats = image_features(builder.visual, [p for story in real for p in story])  # story-major, like keys
    results, written = [], {}
    for mode in s.modes:
        print(f"[eval] {mode}: {s.stories} stories x {s.segments} segments", flush=True)
        r = evaluate_mode(ckpt, mode, held, builder, detok, s)
        r["fd"], r["fd_se"], r["fd_by_bin"] = fd_scores(builder.visual, r, real_feats, s)
        results.append(summarise(r, s))
        written[mode] = r["captions"]
        print(f"[eval] {mode}: {json.dumps(results[-1]['summary'])}", flush=True)
    top = None
    if s.ceiling:
        print(f"[eval] de-tokenizer ceiling: {s.stories * s.segments} real pictures' codes", flush=True)
        top = ceiling(held, builder, detok, s)
        print(f"[eval] ceiling: mean {top['mean']:.3f}, min {top['min']:.3f}", flush=True)
    table = write_outputs(out, results, s, heldout_source(heldout), world=held.world, ceiling=top,
                          window=training_window(ckpt))
    write_captions(out / "stories.jsonl", written)
    if card:  # one section per story length, so the 25- and 50-segment evals stand side by side
        from training.card import add_evaluation

        add_evaluation(ckpt, f"{s.segments} segments", table)
    return table


def fd_scores(visual, r: dict, real_feats: np.ndarray, s: EvalSettings) -> tuple[float, float, list[float]]:
    """The Fréchet distance over all pictures, its standard error over stories, and per bin of segments."""
    feats = image_features(visual, r["pictures"])
    real = real_feats[[i * s.segments + k for i, k in r["keys"]]]  # the real picture at each generated key
    by_bin = []
    for lo in range(0, s.segments, FD_BIN):
        rows = [n for n, (_, k) in enumerate(r["keys"]) if lo <= k < lo + FD_BIN]
        by_bin.append(frechet(feats[rows], real[rows]) if len(rows) > 2 else float("nan"))
    return frechet(feats, real), fd_standard_error(feats, real, [i for i, _ in r["keys"]], s.seed), by_bin


def fd_standard_error(feats: np.ndarray, real: np.ndarray, story_of: list[int], seed: int) -> float:
    """Bootstrap over whole stories (a story's pictures are not independent of each other)."""
    rows: dict[int, list[int]] = {}
    for n, i in enumerate(story_of):
        rows.setdefault(i, []).append(n)
    stories = list(rows)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(FD_RESAMPLES):
        pick = np.concatenate([rows[stories[j]] for j in rng.integers(0, len(stories), len(stories))])
        draws.append(frechet(feats[pick], real[pick]))
    return float(np.std(draws, ddof=1))


def _mean(values: list[float], name: str) -> float | None:
    """The mean of one check's values; with none, 0.0 (a segment or story not written fails), but
    None for an OPTIONAL check (no character came back: nothing to judge)."""
    return float(np.mean(values)) if values else (None if name in OPTIONAL else 0.0)


def story_means(r: dict) -> dict[str, list[float | None]]:
    """Each check averaged over each story's segments: the unit the standard errors count."""
    names = next(iter(r["per_story"].values()))
    return {name: [_mean(v[name], name) for v in r["per_story"].values()] for name in names}


def standard_error(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def summarise(r: dict, s: EvalSettings) -> dict:
    names = list(next(iter(r["per_story"].values())))
    per = {name: [_mean(r["per_segment"][k][name], name) for k in range(s.segments)] for name in names}
    by_story = story_means(r)
    # Every segment counts alike, as every story has as many; but a story's returns are its own
    # unit (stories have few and unequal numbers of them): their mean is over the stories with one.
    total = {name: float(np.mean([v for k in range(s.segments) for v in r["per_segment"][k][name]] or [0.0]))
             for name in names if name not in OPTIONAL}
    kept = {name: [v for v in by_story[name] if v is not None] for name in names}
    total |= {name: float(np.mean(kept[name])) if kept[name] else None for name in names if name in OPTIONAL}
    se = {name: standard_error(kept[name]) for name in names} | {"fd": r["fd_se"]}
    extra = {}
    if "returning" in names:
        extra = {"returns": sum(len(v["returning"]) for v in r["per_story"].values()),
                 "stories_with_returns": len(kept["returning"])}
    return {"mode": r["mode"], "sink": r["sink"], "per_segment": per, "per_story": by_story,
            "fd_by_bin": r["fd_by_bin"],
            "summary": {**total, **extra, "fd": r["fd"], "se": se, "mllm_seconds": round(r["seconds"], 1),
                        "render_seconds": round(r["render_seconds"], 1), "output_tokens": r["tokens"],
                        "peak_kv_mib": round(r["peak_kv_bytes"] / 2**20, 2), "complete_stories": r["complete"]}}


def write_outputs(out: Path, results: list[dict], s: EvalSettings, source: str = "", world: str = "classic",
                  ceiling: dict | None = None, window: int | None = None) -> str:
    (out / "results.json").write_text(json.dumps({"settings": asdict(s), "heldout": source, "world": world,
                                                  "training_window": window, "modes": results, "ceiling": ceiling},
                                                 indent=2) + "\n")
    table = format_table(results, s, source, ceiling)
    (out / "table.md").write_text(table + "\n")
    plot(results, s, out / "metrics.png", window)
    return table


def write_captions(path: Path, written: dict[str, dict[int, dict]]) -> None:
    """Every caption each mode wrote, one line per (mode, story), each marked valid or not: what
    a reader needs to see why a mode's caption validity falls."""
    with path.open("w") as f:
        for mode, stories in written.items():
            for i, story in sorted(stories.items()):
                f.write(json.dumps({"mode": mode, "story": i, **story}) + "\n")


def heldout_source(folder: Path) -> str:
    """How the held-out stories were made, from the provenance ``seedstory data storyworld`` writes."""
    path = folder / "storyworld.json"
    if not path.is_file():
        return f"held-out stories from {folder}"
    world = json.loads(path.read_text())
    return f"held-out StoryWorld stories, data seed {world['seed']}: `{world['command']}`"


def format_table(results: list[dict], s: EvalSettings, source: str = "", ceiling: dict | None = None) -> str:
    cast = "look" in results[0]["per_story"]  # the returning world's columns
    head = (f"{s.stories} held-out openings x {s.segments} segments, {s.steps} denoising steps at guidance "
            f"{s.guidance:g}; quality metrics averaged over all segments, ± one standard error over stories\n\n"
            "| attention | FD (visual features) ↓ | caption validity ↑ | hero consistency ↑ | place agreement ↑ "
            + ("| look fidelity ↑ | returning fidelity ↑ (returns) " if cast else "")
            + "| MLLM time (s) | render time (s) | peak KV (MiB) |\n| --- | --- | --- | --- | --- | "
            + ("--- | --- | " if cast else "") + "--- | --- | --- |")
    rows = [f"| {r['mode']} | {m['fd']:.2f} ± {e['fd']:.2f} | {m['valid']:.3f} | {m['hero']:.3f} ± {e['hero']:.3f} "
            f"| {m['place']:.3f} ± {e['place']:.3f} | " + (cast_cells(m) if cast else "")
            + f"{m['mllm_seconds']:.1f} | {m['render_seconds']:.1f} | {m['peak_kv_mib']:.1f} |"
            for r in results for m in [r["summary"]] for e in [m["se"]]]
    intro = [f"Data: {source}.", ""] if source else []
    notes = ["", cast_note(s)] if cast else []
    return "\n".join([*intro, head, *rows, *notes, "", sink_line(results[-1]["sink"]), *paired_table(results),
                      *ceiling_table(ceiling)])


def cast_cells(m: dict) -> str:
    e = m["se"]
    back = "–" if m["returning"] is None else f"{m['returning']:.3f} ± {e['returning']:.3f}"
    return f"{m['look']:.3f} ± {e['look']:.3f} | {back} ({m['returns']} in {m['stories_with_returns']} stories) | "


def cast_note(s: EvalSettings) -> str:
    return ("Hero consistency: the hero named first and drawn with its own look. Look fidelity: the characters "
            "a caption names, drawn with their own looks (colour, shape and pattern each nearest among the "
            "world's, the caption's scene fixed). Returning fidelity: a character a caption names after "
            f"{s.sink.window_segments} or more segments away (the sink's window; the opening counts as everyone "
            "there), drawn with its own look; per story the mean over its returns, averaged over the stories "
            "with one.")


def sink_line(sink: dict) -> str:
    """The settings every mode ran with (the modes use the parts that apply to them)."""
    marks = "/".join(str(sink[k]) for k in NEIGHBOURHOODS)
    opening = sink["sink_segments"]
    whole = f" and the first {opening} segment{'s' * (opening > 1)} whole" if opening else ""
    return (f"Sink settings: {sink['sink_tokens']} sink tokens{whole}, `<img>`/`</img>` neighbourhoods {marks} "
            f"(before/after `<img>`, before/after `</img>`), a window of {sink['window_segments']} segments.")


def paired(a: list[float | None], b: list[float | None]) -> np.ndarray:
    """Story by story a − b, over the stories with a value in both (a story without a return has
    none for "returning"; the other checks always have one)."""
    return np.array([x - y for x, y in zip(a, b) if x is not None and y is not None], dtype=float)


def paired_table(results: list[dict]) -> list[str]:
    """Each mode minus dense and minus window, story by story: the same openings and seeds in every
    mode make these differences far less noisy than the standard errors of the means above."""
    by_mode = {r["mode"]: r["per_story"] for r in results}
    bases = [b for b in ("dense", "window") if b in by_mode]
    others = [m for m in by_mode if m not in bases[:1]]
    if not bases or len(by_mode) < 2:
        return []
    names = [name for name in PAIRED if name in results[0]["per_story"]]
    cols = [(name, b) for name in names for b in bases]
    lines = ["", "Story-paired differences (mean ± standard error over stories):", "",
             "| attention | " + " | ".join(f"{name} − {b}" for name, b in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for mode in others:
        cells = []
        for name, b in cols:
            d = paired(by_mode[mode][name], by_mode[b][name])
            count = f" ({len(d)} stories)" if name in OPTIONAL else ""
            cells.append("" if mode == b else "no story paired" if not len(d) else
                         f"{d.mean():+.3f} ± {standard_error(list(d)):.3f}{count}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if any(name in OPTIONAL for name in names):
        lines += ["", "Returning differences pair only the stories with a return in both modes (their count in "
                      "brackets)."]
    return lines


def ceiling_table(c: dict | None) -> list[str]:
    """The de-tokenizer's ceiling, per character and role: what the real pictures' codes render to."""
    if not c:
        return []
    names, roles = list(c["per_character"]), list(c["per_role"])
    rows = [("right", "hero drawn right" if c["world"] == "classic" else "look (all three)"),
            *((a, a) for a in c["per_attribute"])]
    judge_by = ("the classic judge, the nearest of every character drawn as the hero" if c["world"] == "classic"
                else "the look judge, every character there")
    lines = ["", f"De-tokenizer ceiling: the {c['pictures']} real pictures of these stories and segments, made codes "
                 f"by the visual tokenizer and rendered at the same steps, guidance and seeds, judged against their "
                 f"ground truth by {judge_by} (fraction right, count):", "",
             "| | " + " | ".join([*names, *roles]) + " | all | min over characters |",
             "| --- |" + " --- |" * (len(names) + len(roles) + 2)]
    for key, label in rows:
        cells = [f"{g[key]:.2f} ({g['n']})" for g in [*(c["per_character"][n] for n in names),
                                                      *(c["per_role"][r] for r in roles)]]
        total = c["mean"] if key == "right" else c["per_attribute"][key]
        low = min(c["per_character"][n][key] for n in names)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total:.3f} | {low:.2f} |")
    return lines


def plot(results: list[dict], s: EvalSettings, path: Path, window: int | None = None) -> None:
    """Each check against the segment index, per mode, then the binned Fréchet distance. ``window``:
    the training windows' length, marked where the model starts writing past what it was trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0]["per_segment"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.5 * (len(names) + 1), 4))
    x = np.arange(1, s.segments + 1)
    for ax, name in zip(axes, names):
        for r in results:
            y = [np.nan if v is None else v for v in r["per_segment"][name]]  # no return at that segment
            ax.plot(x, y, label=r["mode"], marker=".")
        ax.set(title=TITLES[name], xlabel="segment", xlim=(0.5, s.segments + 0.5), ylim=(-0.02, 1.02))
    bins = np.arange(len(results[0]["fd_by_bin"])) * FD_BIN + (FD_BIN + 1) / 2
    for r in results:
        axes[-1].plot(bins, r["fd_by_bin"], label=r["mode"], marker="o")
    axes[-1].set(title=f"Fréchet distance ({FD_BIN}-segment bins) ↓", xlabel="segment")
    if window is not None:
        for ax in axes:
            ax.axvline(window + 0.5, color="grey", ls=":", lw=1)  # past it, longer than any training window
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- the command: `seedstory eval` (cluster/cli.py adds --config and the sink flags) -----------------

def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory eval``'s own options, registered on the ``seedstory`` parser's subcommands.
    Their defaults live in EvalSettings (None: not given), so the parser needs none of the eval's imports."""
    e = commands.add_parser("eval", help="long stories under each sink mode: the paper's Table 2 on StoryWorld")
    e.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    e.add_argument("--heldout", required=True,
                   help="a StoryWorld folder the model never saw (seedstory data storyworld)")
    e.add_argument("--out", required=True, help="folder for table.md, results.json and the plot")
    e.add_argument("--stories", type=int)
    e.add_argument("--segments", type=int)
    e.add_argument("--modes", help="comma-separated, among dense,window,streaming,multimodal (default: all)")
    e.add_argument("--steps", type=int, help="denoising steps per picture")
    e.add_argument("--guidance", type=float, help="classifier-free guidance of the renders")
    e.add_argument("--seed", type=int)
    e.add_argument("--card", action="store_true", help="also write the table into the checkpoint's model card")
    e.add_argument("--no-ceiling", dest="ceiling", action="store_false", default=None,
                   help="skip the de-tokenizer's ceiling (a render of every real held-out picture's codes)")
    return e


def eval_settings(a: argparse.Namespace, sink: SinkSettings = SinkSettings()) -> EvalSettings:
    """The eval's settings: what the command line gives, else EvalSettings' own defaults (one place)."""
    given = {k: getattr(a, k) for k in ("stories", "segments", "steps", "guidance", "seed", "ceiling")
             if getattr(a, k) is not None}
    if a.modes is not None:
        given["modes"] = tuple(a.modes.split(","))
    return EvalSettings(sink=sink, **given)


def run_command(a: argparse.Namespace, ckpt: Path, sink: SinkSettings) -> None:
    print(run_eval(ckpt, Path(a.heldout), Path(a.out), eval_settings(a, sink), card=a.card))
