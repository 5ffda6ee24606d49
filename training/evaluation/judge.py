"""Judging generated captions and pictures against StoryWorld's ground truth, one segment at a time
(plain numpy and the ground-truth renderer: no model). The checks:

- caption validity: the caption parses under the StoryWorld grammar (``parse_caption``, with the
  story's cast in the returning world);
- hero consistency: the caption names the story's hero, and the picture shows the hero. Classic
  world: among pictures drawn by the ground-truth renderer with every character as the hero (the
  caption's place, action and friends fixed), the nearest to the generated one has the story's
  hero, so colour and shape both count. Returning world: the look judge below says the hero is
  drawn right;
- place agreement: likewise, the nearest ground-truth picture over every place has the
  caption's place;

and, in the returning world (a random cast of 4 whose looks only the opening says):

- look fidelity: the fraction of the characters a caption names that are drawn right. The look
  judge renders the caption's segment with one attribute of one character's look varied (every
  colour, every shape, both patterns; everyone else at their true looks): the character is drawn
  right when, for each attribute, the true value's render is the nearest to the picture. Which
  attributes a wrong one got wrong is kept too, for diagnosis (``shown_look``). An unparsed
  caption scores 0, as for the hero and the place;
- returning fidelity: a character the caption names after it was away from at least the sink's
  window (``window_segments``) of the story's segments before, drawn right (``returns`` finds them).

``judge_truth`` and ``tally`` judge real pictures the same way: the de-tokenizer's ceiling.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from functools import lru_cache

import numpy as np

from training.storyworld import (
    CHARACTERS,
    COLOURS,
    NAMES,
    PATTERNS,
    PLACES,
    SHAPES,
    Character,
    Segment,
    parse_caption,
    there,
)
from training.storyworld_pictures import draw_segment

CHECKS = ("valid", "hero", "place")
CAST_CHECKS = (*CHECKS, "look", "returning")  # the returning world's
OPTIONAL = ("returning",)  # checks a story may have no value for (no character came back in it)
# What the look judge varies, one attribute at a time: every value the returning world draws from.
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS}


# -- the nearest ground-truth picture ----------------------------------------------------------------


@lru_cache(maxsize=16384)
def _render(seg: Segment, cast: tuple[Character, ...], size: int) -> np.ndarray:
    """A ground-truth picture, kept as uint8 (a quarter of float32's memory: the look judge draws
    about a dozen per character, and the detokenizer benchmark judges the same segments per stage)."""
    return np.asarray(draw_segment(seg, size, cast))


def _error(seg: Segment, cast: tuple[Character, ...], picture: np.ndarray) -> float:
    """Pixel MSE between ``picture`` (float32) and the ground truth of ``seg`` drawn with ``cast``."""
    return float(((_render(seg, cast, picture.shape[0]) - picture) ** 2).mean())


def nearest(
    picture: np.ndarray, candidates: list[Segment], cast: tuple[Character, ...] = CHARACTERS
) -> Segment:
    """The candidate whose ground-truth picture is nearest (pixel MSE) to ``picture`` (H, W, 3)."""
    picture = np.asarray(picture, dtype=np.float32)
    return candidates[int(np.argmin([_error(candidate, cast, picture) for candidate in candidates]))]


# -- the classic checks ------------------------------------------------------------------------------


def judge(caption: str, picture: np.ndarray, hero: str) -> dict:
    """The three per-segment checks for one classic caption and its picture (H, W, 3 uint8/float)."""
    seg = parse_caption(caption)
    if seg is None:
        return {"valid": 0.0, "hero": 0.0, "place": 0.0}
    picture = np.asarray(picture, dtype=np.float32)
    return {
        "valid": 1.0,
        "hero": float(seg.hero == hero and _shown_hero(seg, picture) == hero),
        "place": place_right(seg, picture),
    }


def place_right(seg: Segment, picture: np.ndarray, cast: tuple[Character, ...] = CHARACTERS) -> float:
    """1.0 if, over every place, the nearest ground-truth picture has the segment's own."""
    return float(
        nearest(picture, [replace(seg, place=place.name) for place in PLACES], cast).place == seg.place
    )


def shown_hero(caption: str, picture: np.ndarray) -> str | None:
    """Whom ``judge``'s hero check sees as the hero of ``picture`` (None: the caption does not
    parse). ``judge`` says only right or wrong; this says which character a wrong picture drew."""
    seg = parse_caption(caption)
    return None if seg is None else _shown_hero(seg, np.asarray(picture, dtype=np.float32))


def _shown_hero(seg: Segment, picture: np.ndarray) -> str:
    """The hero among every character not already in the scene, by the nearest ground-truth picture."""
    heroes = [
        Segment(character.name, seg.others, seg.place, seg.action)
        for character in CHARACTERS
        if character.name not in seg.others
    ]
    return nearest(picture, heroes).hero


# -- the look judge (any cast; the returning world's random looks) ------------------------------------


def look_of(cast: tuple[Character, ...], name: str) -> dict[str, str]:
    """``name``'s true look in ``cast``: its colour, shape and pattern by name."""
    return next(character for character in cast if character.name == name).look_record()


def _dressed(cast: tuple[Character, ...], name: str, look: dict[str, str]) -> tuple[Character, ...]:
    """``cast`` with ``name`` given ``look`` (equal to ``cast`` for its true look, so that render
    is drawn once and cached for every attribute and character)."""
    return tuple(
        replace(
            character,
            colour=COLOURS[look["colour"]],
            colour_name=look["colour"],
            shape=look["shape"],
            pattern=look["pattern"],
        )
        if character.name == name
        else character
        for character in cast
    )


def shown_look(seg: Segment, cast: tuple[Character, ...], name: str, picture: np.ndarray) -> dict[str, str]:
    """The look ``picture`` gives ``name`` (who is in ``seg``), by ground-truth renders of ``seg``
    with everyone else at their true looks: from ``name``'s true look, each attribute in turn is
    set to the value whose render is nearest, the others as they stand, until none changes.

    The first pass tries every look one attribute away from the true one, so the search stays at
    the true look exactly when that is the nearest of them. Later passes serve the diagnosis:
    with the others held at their true values a wrong pattern can pass for a wrong colour (a
    striped render is darker), so they are held at what the picture shows. A value is replaced
    only by a strictly nearer one, so the search ends."""
    picture, look = np.asarray(picture, dtype=np.float32), look_of(cast, name)
    changed = True
    while changed:
        changed = False
        for attribute, values in ATTRIBUTES.items():
            tried = [look[attribute], *(value for value in values if value != look[attribute])]
            errors = [
                _error(seg, _dressed(cast, name, {**look, attribute: value}), picture) for value in tried
            ]
            best = tried[int(np.argmin(errors))]  # the first of equals: the current value wins a tie
            changed |= best != look[attribute]
            look[attribute] = best
    return look


def judge_look(seg: Segment, cast: tuple[Character, ...], name: str, picture: np.ndarray) -> dict[str, float]:
    """Whether ``picture`` draws ``name`` right: "right", its true look's render is the nearest of
    every look that differs from it in one attribute; and per attribute, whether the look the
    picture shows (``shown_look``) has it right."""
    true, shown = look_of(cast, name), shown_look(seg, cast, name, picture)
    each = {attribute: float(shown[attribute] == true[attribute]) for attribute in ATTRIBUTES}
    return {"right": float(shown == true), **each}


def judge_cast(
    seg: Segment | None,
    picture: np.ndarray,
    hero: str,
    cast: tuple[Character, ...],
    drawn: dict[str, dict[str, float]],
) -> dict[str, float]:
    """A returning-world segment's checks, ``drawn`` being ``judge_look`` for each name it has.
    A caption that does not parse fails them all, as in the classic ``judge``."""
    if seg is None:
        return dict.fromkeys(("valid", "hero", "place", "look"), 0.0)
    return {
        "valid": 1.0,
        "hero": float(seg.hero == hero and drawn[hero]["right"] == 1.0),
        "place": place_right(seg, np.asarray(picture, dtype=np.float32), cast),
        "look": float(np.mean([verdict["right"] for verdict in drawn.values()])),
    }


def returns(present: list[list[str]], cast_names: Collection[str], window: int) -> list[list[str]]:
    """Per segment, the names in it that were absent from at least the ``window`` segments just
    before it: those a sliding window of ``window`` segments no longer holds. The opening
    (segment 0) counts as every cast member present: its caption names them all, with their looks."""
    last = dict.fromkeys(cast_names, 0)  # the last segment each name was in
    back: list[list[str]] = [[]]
    for index in range(1, len(present)):
        back.append([name for name in present[index] if index - last[name] - 1 >= window])
        last.update(dict.fromkeys(present[index], index))
    return back


# -- real pictures: the de-tokenizer's ceiling --------------------------------------------------------


def judge_truth(
    world: str, cast: tuple[Character, ...], seg: Segment, picture
) -> list[tuple[str, str, dict]]:
    """The characters of a ground-truth segment, judged in ``picture``: (name, role, verdict). The
    classic world: the hero, by the classic judge ({"right"}); the returning world: everyone
    there, by the look judge ({"right", colour, shape, pattern})."""
    picture = np.asarray(picture, dtype=np.float32)
    if world == "classic":
        return [(seg.hero, "hero", {"right": float(_shown_hero(seg, picture) == seg.hero)})]
    return [
        (name, "hero" if name == seg.hero else "friend", judge_look(seg, cast, name, picture))
        for name in there(seg)
    ]


def tally(rows: list[tuple[str, str, dict]]) -> dict:
    """``judge_truth`` rows summed up: per character name and per role, each verdict's mean and
    the count; per attribute the mean; "right" as the mean over all and the min over characters."""

    def group(at: int) -> dict:
        """Each verdict's mean and the count, per value of the rows' field ``at`` (name or role)."""
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row[at], []).append(row[2])
        return {
            key: {check: float(np.mean([verdict[check] for verdict in verdicts])) for check in verdicts[0]}
            | {"n": len(verdicts)}
            for key, verdicts in groups.items()
        }

    by_name = group(0)
    per_character = {
        name: by_name[name]
        for name in sorted(by_name, key=lambda name: NAMES.index(name) if name in NAMES else len(NAMES))
    }
    return {
        "per_character": per_character,
        "per_role": group(1),
        "per_attribute": {
            attribute: float(np.mean([row[2][attribute] for row in rows]))
            for attribute in ATTRIBUTES
            if rows and attribute in rows[0][2]
        },
        "mean": float(np.mean([row[2]["right"] for row in rows])) if rows else float("nan"),
        "min": min((verdict["right"] for verdict in per_character.values()), default=float("nan")),
        "judged": len(rows),
    }
