"""StoryWorld: procedural story worlds, their caption grammar and their story plans.

Both worlds share the places, the actions and the caption grammar. This module holds what a
story is (its cast and its segments) and what its captions say; ``training/storyworld_pictures.py``
draws the segments (the ground-truth renderer that evaluation also uses to judge consistency) and
``training/storyworld_writer.py`` writes a world to disk in the official StoryStream layout.

``classic`` (the default): six characters with fixed looks (colour + shape); places have
distinct backgrounds; actions set where the hero stands. Every caption names the hero with its
look. Its output for a given seed never changes (a test pins it), so old data stays reproducible.

``returning`` exists so that an evaluation can tell SEED-Story's multimodal attention sink
(which keeps the boundary tokens of every old picture) from a plain sliding window of 8
segments. In the classic world it cannot: every caption repeats the hero's look and the hero is
in every picture, so the last few segments always hold all that is needed to draw the next one.
In the returning world:

- each story draws its cast's looks at random (colour, shape, plain or striped), so a look
  cannot be learnt from a name;
- only the opening shows them: the opening caption names each character with its look
  ("Milo the striped red circle"), the first pictures draw them all; later captions name
  characters by name only;
- the hero stays; the friends leave and come back after at least ``AWAY`` (10) segments, several
  times a story, so drawing a returning friend right needs something seen more than 8 segments
  back: the opening, or the last picture that showed it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Character:
    name: str
    colour: tuple[int, int, int]
    colour_name: str
    shape: str
    pattern: str = "plain"  # or "striped": dark bands across the shape (the returning world)

    @property
    def look(self) -> str:
        """The look as captions say it: "red circle", "striped red circle"."""
        return " ".join(w for w in (self.pattern, self.colour_name, self.shape) if w != "plain")

    def look_record(self) -> dict[str, str]:
        return {"colour": self.colour_name, "shape": self.shape, "pattern": self.pattern}


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
OPENING = "Once upon a time, "
OPENERS = ("", "Then ", "Later, ", "Soon ", "After that, ", "Suddenly ")
_CHARACTER_BY_NAME = {c.name: c for c in CHARACTERS}
PLACE_BY_NAME = {p.name: p for p in PLACES}

# The returning world dresses the same six names in the classic palette and shapes, at random.
NAMES = tuple(c.name for c in CHARACTERS)
COLOURS = {c.colour_name: c.colour for c in CHARACTERS}
SHAPES = tuple(c.shape for c in CHARACTERS)
PATTERNS = ("plain", "striped")
CAST = 4  # the hero and three friends
AWAY = 10  # segments a friend stays away: more than the sink's window of 8
STAY = (2, 6)  # segments a friend stays before it leaves; >= 2 so the first pictures show everyone


@dataclass(frozen=True)
class Segment:
    hero: str
    others: tuple[str, ...]
    place: str
    action: str


def there(seg: Segment) -> list[str]:
    """Who is in a segment, hero first."""
    return [seg.hero, *seg.others]


def segment_of(record: dict) -> Segment:
    """A truth.jsonl segment record as the Segment it was drawn from."""
    return Segment(record["hero"], tuple(record["others"]), record["place"], record["action"])


def cast_from_looks(looks: dict[str, dict[str, str]]) -> tuple[Character, ...]:
    """A returning-world story's characters from its truth record's ``looks``, hero first."""
    return tuple(
        Character(name, COLOURS[lk["colour"]], lk["colour"], lk["shape"], lk["pattern"])
        for name, lk in looks.items()
    )


# -- captions ------------------------------------------------------------------------------------


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(
    seg: Segment,
    index: int,
    rng: random.Random,
    cast: tuple[Character, ...] = CHARACTERS,
    described: Collection[str] | None = None,
) -> str:
    """A segment's caption. ``described``: the names said with their look (by default the hero,
    as the classic world says it in every caption)."""
    looks = {c.name: c for c in cast}
    described = (seg.hero,) if described is None else described
    who = _join([f"{n} the {looks[n].look}" if n in described else n for n in there(seg)])
    verb = ACTIONS[seg.action][1 if seg.others else 0]
    if index == 0:
        return f"{OPENING}{who} {verb} in the {seg.place}."
    opener = rng.choice(OPENERS)
    text = f"{opener}{who} {verb} in the {seg.place}."
    return text[0].upper() + text[1:]


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first


_LOOK = rf"(?:(?:{_alternatives(PATTERNS[1:])}) )?(?:{_alternatives(COLOURS)}) (?:{_alternatives(SHAPES)})"
_NAMED = re.compile(rf"(?P<name>[A-Z][a-z]+)(?: the (?P<look>{_LOOK}))?")
_CAPTION = re.compile(
    rf"^(?:{_alternatives([OPENING, *OPENERS[1:]])})?(?P<who>.+?) "
    rf"(?P<verb>{_alternatives(v for a in ACTIONS.values() for v in a[:2])}) "
    rf"in the (?P<place>{_alternatives(PLACE_BY_NAME)})\.$"
)


def read_caption(text: str) -> tuple[Segment, dict[str, str]] | None:
    """What a caption says, at the grammar's level, whatever the world: the segment (the first
    name is the hero) and the look words it gives each name it describes. None if the caption is
    not a sentence of the grammar (names named twice, a verb not agreeing with their number...)."""
    match = _CAPTION.match(text.strip())
    if not match:
        return None
    parts = re.split(r", | and ", match["who"])
    named = [_NAMED.fullmatch(p) for p in parts]
    if not all(named) or _join(parts) != match["who"]:  # "A, B" or "A and B and C" are not the grammar's
        return None
    names = [n["name"] for n in named]
    action = next((a for a, v in ACTIONS.items() if v[1 if len(names) > 1 else 0] == match["verb"]), None)
    if action is None or len(set(names)) < len(names):
        return None
    looks = {n["name"]: n["look"] for n in named if n["look"]}
    return Segment(names[0], tuple(names[1:]), match["place"], action), looks


def parse_caption(text: str, cast: tuple[Character, ...] | None = None) -> Segment | None:
    """The segment a caption describes if it is a caption of the world, otherwise None: the
    inverse of ``caption``. Without ``cast``, the classic world: the hero with its classic look,
    at most one friend, by name. With ``cast`` (a returning-world story's characters, e.g.
    ``cast_from_looks``): any of them, each by name or with its own look."""
    read = read_caption(text)
    if read is None:
        return None
    seg, looks = read
    if cast is None:
        hero_said = seg.hero in _CHARACTER_BY_NAME and looks == {seg.hero: _CHARACTER_BY_NAME[seg.hero].look}
        friend_named = len(seg.others) <= 1 and set(seg.others) <= set(_CHARACTER_BY_NAME)
        return seg if hero_said and friend_named else None
    by_name = {c.name: c for c in cast}
    known = all(n in by_name for n in there(seg))
    return seg if known and all(by_name[n].look == words for n, words in looks.items()) else None


# -- planning stories ----------------------------------------------------------------------------


def _wander(rng: random.Random, place: str) -> str:
    return rng.choice([p.name for p in PLACES if p.name != place]) if rng.random() < 0.3 else place


def plan_story(rng: random.Random, segments: int) -> list[Segment]:
    """A classic story: one hero, now and then one friend."""
    hero = rng.choice(CHARACTERS).name
    friends = [c.name for c in CHARACTERS if c.name != hero]
    place = rng.choice(PLACES).name
    story = []
    for _ in range(segments):
        place = _wander(rng, place)
        others = (rng.choice(friends),) if rng.random() < 0.4 else ()
        story.append(Segment(hero, others, place, rng.choice(list(ACTIONS))))
    return story


def random_cast(rng: random.Random) -> tuple[Character, ...]:
    """``CAST`` characters with random looks, hero first. Colours and shapes differ within a
    story, so either tells two characters apart."""
    names, colours, shapes = (
        rng.sample(NAMES, CAST),
        rng.sample(list(COLOURS), CAST),
        rng.sample(SHAPES, CAST),
    )
    return tuple(
        Character(n, COLOURS[c], c, s, rng.choice(PATTERNS)) for n, c, s in zip(names, colours, shapes)
    )


def _comings_and_goings(rng: random.Random, segments: int) -> list[bool]:
    """Whether a friend is there, segment by segment: there from the opening, then away for
    AWAY..AWAY+3 segments and back for a STAY, over and over."""
    here: list[bool] = []
    while len(here) < segments:
        here += [True] * rng.randint(*STAY) + [False] * rng.randint(AWAY, AWAY + 3)
    return here[:segments]


def plan_returning(rng: random.Random, segments: int) -> tuple[tuple[Character, ...], list[Segment]]:
    """A returning-world story: its cast and its segments (the friends there, in cast order)."""
    cast = random_cast(rng)
    friends = [c.name for c in cast[1:]]
    here = {f: _comings_and_goings(rng, segments) for f in friends}
    place = rng.choice(PLACES).name
    story = []
    for k in range(segments):
        place = _wander(rng, place)
        others = tuple(f for f in friends if here[f][k])
        story.append(Segment(cast[0].name, others, place, rng.choice(list(ACTIONS))))
    return cast, story


def returning_in(plan: list[Segment], k: int) -> list[str]:
    """The names in segment k that were seen before but not in the ``AWAY`` segments before it."""
    long_ago = {n for seg in plan[: max(0, k - AWAY)] for n in there(seg)}
    lately = {n for seg in plan[max(0, k - AWAY) : k] for n in there(seg)}
    return [n for n in there(plan[k]) if n in long_ago - lately]


@dataclass(frozen=True)
class Story:
    cast: tuple[Character, ...]
    plan: list[Segment]
    captions: list[str]
    truth: dict  # the story's truth.jsonl record, less its id


def classic_story(rng: random.Random, segments: int) -> Story:
    plan = plan_story(rng, segments)
    caps = [caption(seg, k, rng) for k, seg in enumerate(plan)]
    return Story(CHARACTERS, plan, caps, {"hero": plan[0].hero, "segments": [asdict(s) for s in plan]})


def returning_story(rng: random.Random, segments: int) -> Story:
    cast, plan = plan_returning(rng, segments)
    everyone = [c.name for c in cast]  # all there in the opening, which alone says their looks
    caps = [caption(seg, k, rng, cast, everyone if k == 0 else ()) for k, seg in enumerate(plan)]
    segs = [
        {**asdict(seg), "present": there(seg), "returning": returning_in(plan, k)}
        for k, seg in enumerate(plan)
    ]
    return Story(
        cast,
        plan,
        caps,
        {
            "world": "returning",
            "hero": cast[0].name,
            "looks": {c.name: c.look_record() for c in cast},
            "segments": segs,
        },
    )


WORLDS: dict[str, Callable[[random.Random, int], Story]] = {
    "classic": classic_story,
    "returning": returning_story,
}


def make_story(world: str, seed: int, story_index: int, segments: int) -> Story:
    """Story ``story_index`` of ``world`` for ``seed``: independent of the other stories."""
    if world not in WORLDS:
        raise ValueError(f"unknown StoryWorld world {world!r}; choose from {sorted(WORLDS)}")
    return WORLDS[world](random.Random(f"{seed}:{story_index}"), segments)


def sample_captions(stories: int, segments: int = 30, seed: int = 0, world: str = "classic") -> list[str]:
    """Captions only (no pictures), e.g. to train the BPE for a fresh checkpoint."""
    return [c for sid in range(stories) for c in make_story(world, seed, sid, segments).captions]
