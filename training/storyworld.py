"""StoryWorld: a procedural story world written in the official StoryStream layout.

Characters have fixed looks (colour + shape), places have distinct backgrounds, actions
set where the hero stands. Captions come from a small grammar and always name the hero.
Pictures are drawn with PIL from the ground truth, so ``draw_segment`` doubles as the
ground-truth renderer that evaluation uses to judge consistency.

Output (``OUT/``):
    storyworld.jsonl      one story a line: {"id", "images", "captions", "orders"}
    images/SSSSSS/SSSSSS_keyframe_K.jpg
    truth.jsonl           sidecar: {"id", "hero", "segments": [{"hero", "others", "place", "action"}]}
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Character:
    name: str
    colour: tuple[int, int, int]
    colour_name: str
    shape: str


@dataclass(frozen=True)
class Place:
    name: str
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]


CHARACTERS = (
    Character("Milo", (220, 40, 40), "red", "circle"),
    Character("Bea", (40, 90, 220), "blue", "square"),
    Character("Kip", (40, 170, 60), "green", "triangle"),
    Character("Zara", (240, 200, 30), "yellow", "diamond"),
    Character("Oti", (150, 60, 190), "purple", "pentagon"),
    Character("Rux", (250, 130, 20), "orange", "cross"),
)
PLACES = (
    Place("park", (150, 210, 250), (90, 180, 80)),
    Place("beach", (120, 190, 240), (235, 215, 150)),
    Place("forest", (70, 110, 70), (40, 70, 35)),
    Place("city", (180, 180, 190), (100, 100, 105)),
    Place("desert", (250, 220, 170), (220, 160, 90)),
    Place("snowfield", (215, 225, 240), (250, 250, 250)),
    Place("night garden", (20, 25, 70), (30, 60, 40)),
)
# action -> (verb for one, verb for several, hero centre as fractions of the picture, scale)
ACTIONS = {
    "walk": ("walks", "walk", (0.35, 0.68), 1.0),
    "run": ("runs", "run", (0.75, 0.68), 1.0),
    "jump": ("jumps", "jump", (0.5, 0.35), 1.0),
    "sit": ("sits down", "sit down", (0.3, 0.75), 0.8),
    "wave": ("waves", "wave", (0.5, 0.68), 1.1),
    "rest": ("takes a rest", "take a rest", (0.2, 0.78), 0.7),
}
OPENERS = ("", "Then ", "Later, ", "Soon ", "After that, ", "Suddenly ")
_BY_NAME = {c.name: c for c in CHARACTERS}
_PLACE_BY_NAME = {p.name: p for p in PLACES}


@dataclass(frozen=True)
class Segment:
    hero: str
    others: tuple[str, ...]
    place: str
    action: str


def caption(seg: Segment, index: int, rng: random.Random) -> str:
    hero = _BY_NAME[seg.hero]
    verb = ACTIONS[seg.action][1 if seg.others else 0]
    who = " and ".join((f"{seg.hero} the {hero.colour_name} {hero.shape}",) + seg.others)
    if index == 0:
        return f"Once upon a time, {who} {verb} in the {seg.place}."
    opener = rng.choice(OPENERS)
    text = f"{opener}{who} {verb} in the {seg.place}."
    return text[0].upper() + text[1:]


_CAPTION = re.compile(
    r"^(?:Once upon a time, |Then |Later, |Soon |After that, |Suddenly )?"
    r"(?P<hero>[A-Z][a-z]+) the (?P<colour>[a-z]+) (?P<shape>[a-z]+)(?: and (?P<other>[A-Z][a-z]+))? "
    r"(?P<verb>[a-z ]+?) in the (?P<place>[a-z ]+)\.$")


def parse_caption(text: str) -> Segment | None:
    """The segment a caption describes, if the caption is a sentence of the StoryWorld grammar
    (the hero's colour and shape as the world has them, a verb agreeing with the number of
    characters, a known place); otherwise None. The inverse of ``caption``."""
    m = _CAPTION.match(text.strip())
    if not m or m["hero"] not in _BY_NAME or m["place"] not in _PLACE_BY_NAME:
        return None
    hero = _BY_NAME[m["hero"]]
    if (m["colour"], m["shape"]) != (hero.colour_name, hero.shape):
        return None
    others = (m["other"],) if m["other"] else ()
    if others and (others[0] not in _BY_NAME or others[0] == hero.name):
        return None
    action = next((a for a, v in ACTIONS.items() if v[1 if others else 0] == m["verb"]), None)
    return Segment(hero.name, others, m["place"], action) if action else None


def plan_story(rng: random.Random, segments: int) -> list[Segment]:
    hero = rng.choice(CHARACTERS).name
    friends = [c.name for c in CHARACTERS if c.name != hero]
    place = rng.choice(PLACES).name
    story = []
    for _ in range(segments):
        if rng.random() < 0.3:
            place = rng.choice([p.name for p in PLACES if p.name != place])
        others = (rng.choice(friends),) if rng.random() < 0.4 else ()
        story.append(Segment(hero, others, place, rng.choice(list(ACTIONS))))
    return story


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "pentagon":
        return [(cx + r * math.sin(2 * math.pi * k / 5), cy - r * math.cos(2 * math.pi * k / 5)) for k in range(5)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def draw_character(draw: ImageDraw.ImageDraw, ch: Character, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if ch.shape == "circle":
        draw.ellipse(box, fill=ch.colour, outline=(0, 0, 0))
    elif ch.shape == "square":
        draw.rectangle(box, fill=ch.colour, outline=(0, 0, 0))
    else:
        draw.polygon(_shape_points(ch.shape, cx, cy, r), fill=ch.colour, outline=(0, 0, 0))


def draw_segment(seg: Segment, size: int = 128) -> Image.Image:
    """The ground-truth picture of a segment: background of the place, hero posed by the action."""
    place = _PLACE_BY_NAME[seg.place]
    img = Image.new("RGB", (size, size), place.sky)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, int(size * 0.6), size, size), fill=place.ground)
    _, _, (fx, fy), scale = ACTIONS[seg.action]
    draw_character(draw, _BY_NAME[seg.hero], fx * size, fy * size, 0.16 * size * scale)
    for k, other in enumerate(seg.others):  # friends stand on the other side, smaller
        ox = 0.2 if fx > 0.5 else 0.8
        draw_character(draw, _BY_NAME[other], ox * size, 0.72 * size - k * 0.1 * size, 0.1 * size)
    return img


def write_storyworld(out: str | Path, stories: int, segments: int = 30, seed: int = 0, size: int = 128) -> Path:
    """Write ``stories`` stories; deterministic for a given seed. Returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl, truth = out / "storyworld.jsonl", out / "truth.jsonl"
    with jsonl.open("w") as fj, truth.open("w") as ft:
        for sid in range(stories):
            rng = random.Random(f"{seed}:{sid}")  # per story, so a story does not depend on the others
            plan = plan_story(rng, segments)
            rel = [f"{sid:06d}/{sid:06d}_keyframe_{k}.jpg" for k in range(segments)]
            (out / "images" / f"{sid:06d}").mkdir(exist_ok=True)
            for seg, path in zip(plan, rel):
                draw_segment(seg, size).save(out / "images" / path, quality=95)
            caps = [caption(seg, k, rng) for k, seg in enumerate(plan)]
            fj.write(json.dumps({"id": sid, "images": rel, "captions": caps, "orders": list(range(segments))}) + "\n")
            ft.write(json.dumps({"id": sid, "hero": plan[0].hero, "segments": [asdict(s) for s in plan]}) + "\n")
    meta = {"stories": stories, "segments": segments, "seed": seed, "size": size,
            "command": f"seedstory data storyworld --stories {stories} --segments {segments} --seed {seed} "
                       f"--size {size} --out {out}"}
    (out / "storyworld.json").write_text(json.dumps(meta, indent=2) + "\n")
    return jsonl


def sample_captions(stories: int, segments: int = 30, seed: int = 0) -> list[str]:
    """Captions only (no pictures), e.g. to train the BPE for a fresh checkpoint."""
    caps = []
    for sid in range(stories):
        rng = random.Random(f"{seed}:{sid}")
        caps += [caption(seg, k, rng) for k, seg in enumerate(plan_story(rng, segments))]
    return caps
