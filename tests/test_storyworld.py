import hashlib
import io
import json
import random
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from actors.mllm.sink import SinkSettings
from training.storyworld import (
    ACTIONS,
    AWAY,
    CAST,
    CHARACTERS,
    COLOURS,
    PATTERNS,
    PLACES,
    SHAPES,
    WORLDS,
    Character,
    Segment,
    cast_from_looks,
    parse_caption,
    read_caption,
    sample_captions,
    segment_of,
)
from training.storyworld_pictures import STRIPE, draw_segment, layout
from training.storyworld_writer import write_storyworld


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


segment = segment_of  # a truth.jsonl segment record as its Segment


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a, b, c = (
        write_storyworld(tmp_path / n, stories=3, segments=12, seed=s, size=64)
        for n, s in (("a", 5), ("b", 5), ("c", 6))
    )
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "truth.jsonl").read_bytes() == (b.parent / "truth.jsonl").read_bytes()
    rel = read_jsonl(a)[1]["images"][4]
    assert (a.parent / "images" / rel).read_bytes() == (b.parent / "images" / rel).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_official_layout_and_ground_truth(storyworld):
    stories, truth = read_jsonl(storyworld / "storyworld.jsonl"), read_jsonl(storyworld / "truth.jsonl")
    assert len(stories) == len(truth) == 6
    for story, gt in zip(stories, truth):
        assert set(story) == {"id", "images", "captions", "orders"}
        assert len(story["images"]) == len(story["captions"]) == len(gt["segments"]) == 30
        assert all((storyworld / "images" / p).is_file() for p in story["images"])
        for cap, seg in zip(story["captions"], gt["segments"]):
            assert seg["hero"] == gt["hero"] and gt["hero"] in cap  # the hero is named every segment
            assert seg["place"] in cap and all(o in cap for o in seg["others"])
    # Several characters and places actually occur.
    assert len({gt["hero"] for gt in truth}) > 1
    assert len({s["place"] for gt in truth for s in gt["segments"]}) > 3


def test_pictures_show_the_place_and_the_heros_colour(storyworld):
    story, gt = read_jsonl(storyworld / "storyworld.jsonl")[0], read_jsonl(storyworld / "truth.jsonl")[0]
    colour = {c.name: c.colour for c in CHARACTERS}
    sky = {p.name: p.sky for p in PLACES}
    for rel, seg in zip(story["images"][:10], gt["segments"]):
        img = np.asarray(Image.open(storyworld / "images" / rel).convert("RGB"), dtype=int)
        assert np.abs(img[1, 1] - sky[seg["place"]]).max() < 12  # JPEG tolerance
        near_hero = np.abs(img - colour[seg["hero"]]).max(-1) < 30
        assert near_hero.sum() > 40


def test_characters_and_places_look_distinct():
    seg = Segment("Milo", (), "park", "walk")
    pics = {p.name: np.asarray(draw_segment(Segment("Milo", (), p.name, "walk"), 64)) for p in PLACES}
    assert len({pic[1, 1].tobytes() for pic in pics.values()}) == len(PLACES)
    heroes = {c.name: np.asarray(draw_segment(Segment(c.name, (), "park", "walk"), 64)) for c in CHARACTERS}
    assert len({h.tobytes() for h in heroes.values()}) == len(CHARACTERS)
    assert np.asarray(draw_segment(seg, 64)).shape == (64, 64, 3)


# -- the classic world is pinned ------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_classic_world_output_is_pinned(tmp_path):
    """Pins the classic world's output: these digests were computed from the classic code path
    before the returning world was added. Old seeds must keep giving the same stories."""
    out = write_storyworld(tmp_path, stories=2, segments=12, seed=3, size=64).parent
    assert (
        sha((out / "storyworld.jsonl").read_bytes())
        == "d135321cd86f6fba77625ab966ba4122f09b235ed944e931e28f30e46c4d1110"
    )
    assert (
        sha((out / "truth.jsonl").read_bytes())
        == "7173afdc56cc2fe78e9e45b9c7b1ccc559e8d6c56e42cb5f809f9948ff5b2113"
    )
    pixels = hashlib.sha256()
    for story, gt in zip(read_jsonl(out / "storyworld.jsonl"), read_jsonl(out / "truth.jsonl")):
        for rel, seg in zip(story["images"], gt["segments"]):
            picture = draw_segment(segment(seg), 64)
            pixels.update(picture.tobytes())
            # The pixels are pinned, not the JPEG bytes (those belong to the installed libjpeg);
            # each file is exactly the encoding of its pinned pixels.
            encoded = io.BytesIO()
            picture.save(encoded, format="JPEG", quality=95)
            assert (out / "images" / rel).read_bytes() == encoded.getvalue()
    assert pixels.hexdigest() == "c46c3f93d40b07150539379757aeac3f059bf9efc44e0d739479518b1a082967"
    assert (
        sha("\n".join(sample_captions(2, 12, seed=3)).encode())
        == "4b1a5c15c37dbe6a7f54c7fc1b35e3506835358de984a2dc6b7ac52bd941d9b1"
    )
    assert (
        json.loads((out / "storyworld.json").read_text())["command"]
        == f"seedstory data storyworld --stories 2 --segments 12 --seed 3 --size 64 --out {out}"
    )


def test_classic_renderer_is_pinned():
    """Pins the classic renderer (evaluation's ground truth) for every hero, place and action,
    alone and with a friend: digest computed from the classic code path before the returning world."""
    digest, names = hashlib.sha256(), [c.name for c in CHARACTERS]
    for i, hero in enumerate(names):
        for place in PLACES:
            for action in ACTIONS:
                for others in ((), (names[(i + 1) % 6],)):
                    digest.update(draw_segment(Segment(hero, others, place.name, action), 64).tobytes())
    assert digest.hexdigest() == "a1f64afd3aac141ea048acdb6f99dc63c9ddf5086003535e43160931f9d39c0f"


# What the classic parse_caption answered before the returning world (None: not a caption).
CLASSIC_PARSES = {
    "Once upon a time, Milo the red circle walks in the park.": Segment("Milo", (), "park", "walk"),
    "Then Bea the blue square and Kip sit down in the beach.": Segment("Bea", ("Kip",), "beach", "sit"),
    "Later, Zara the yellow diamond and Oti take a rest in the night garden.": Segment(
        "Zara", ("Oti",), "night garden", "rest"
    ),
    "Soon Rux the orange cross waves in the snowfield.": Segment("Rux", (), "snowfield", "wave"),
    "  After that, Oti the purple pentagon runs in the city.  ": Segment("Oti", (), "city", "run"),
    "Suddenly Kip the green triangle and Kip jump in the forest.": None,
    "Milo the blue circle walks in the park.": None,
    "Milo the red circle walk in the park.": None,
    "Milo the red circle and Bea walks in the park.": None,
    "Milo the red circle and Bea the blue square walk in the park.": None,
    "Milo walks in the park.": None,
    "Milo the red circle walks in the moon.": None,
    "Milo the red circle and Bob walk in the park.": None,
    "Milo the red circle, Bea and Kip walk in the park.": None,
    "Milo the striped red circle walks in the park.": None,
    "Milo the red circle dances in the park.": None,
    "then Milo the red circle walks in the park.": None,
    "Once upon a time, Milo the red circle walks in the park": None,
}


def test_classic_captions_parse_as_before(storyworld):
    for text, seg in CLASSIC_PARSES.items():
        assert parse_caption(text) == seg, text
    for story, gt in zip(read_jsonl(storyworld / "storyworld.jsonl"), read_jsonl(storyworld / "truth.jsonl")):
        assert [parse_caption(c) for c in story["captions"]] == [segment(s) for s in gt["segments"]]


def test_an_unknown_world_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown StoryWorld world"):
        write_storyworld(tmp_path, stories=1, segments=3, world="sideways")


# -- the returning world --------------------------------------------------------------------------

LOOK_WORDS = re.compile(rf"\b({'|'.join([*COLOURS, *SHAPES, *PATTERNS])})\b")


@pytest.fixture(scope="module")
def returning_world(tmp_path_factory):
    """Six 30-segment returning-world stories at 64 px: (folder, stories, truths)."""
    out = write_storyworld(
        tmp_path_factory.mktemp("returning"), stories=6, segments=30, seed=7, size=64, world="returning"
    ).parent
    return out, read_jsonl(out / "storyworld.jsonl"), read_jsonl(out / "truth.jsonl")


def presence(gt) -> dict[str, list[bool]]:
    return {name: [name in s["present"] for s in gt["segments"]] for name in gt["looks"]}


def test_away_is_longer_than_the_sink_window():
    assert AWAY >= 10 and AWAY > SinkSettings().window_segments


def test_returning_looks_are_random_and_tell_the_cast_apart(returning_world):
    _, _, truths = returning_world
    looks = [gt["looks"] for gt in truths]
    assert len({json.dumps(lk, sort_keys=True) for lk in looks}) == len(looks)  # no two stories alike
    for gt, lk in zip(truths, looks):
        assert len(lk) == CAST and list(lk)[0] == gt["hero"]
        assert len({a["colour"] for a in lk.values()}) == len({a["shape"] for a in lk.values()}) == CAST
    by_name = {}
    for lk in looks:
        for name, a in lk.items():
            by_name.setdefault(name, set()).add((a["colour"], a["shape"]))
    assert any(len(seen) > 1 for seen in by_name.values())  # a name does not fix a look
    assert {a["pattern"] for lk in looks for a in lk.values()} == set(PATTERNS)


def test_the_opening_says_the_looks_and_later_captions_only_names(returning_world):
    _, stories, truths = returning_world
    for story, gt in zip(stories, truths):
        cast = cast_from_looks(gt["looks"])
        opening, *later = story["captions"]
        assert all(f"{c.name} the {c.look}" in opening for c in cast)
        assert read_caption(opening)[1] == {c.name: c.look for c in cast}
        assert not [c for c in later if LOOK_WORDS.search(c)]
        assert all(read_caption(c)[1] == {} for c in later)


def test_friends_come_back_after_at_least_away_segments(returning_world):
    _, _, truths = returning_world
    for gt in truths:
        assert all(
            gt["segments"][k]["present"] == list(gt["looks"]) for k in (0, 1)
        )  # the first pictures show all
        assert all(s["present"][0] == gt["hero"] for s in gt["segments"])  # the hero never leaves
        returns = []
        for name, here in presence(gt).items():
            for k in range(1, len(here)):
                if here[k] and not here[k - 1]:
                    last = max(j for j in range(k) if here[j])
                    assert k - last - 1 >= AWAY, (gt["id"], name, k)
                    returns.append((k, name))
        assert sorted(returns) == sorted((k, n) for k, s in enumerate(gt["segments"]) for n in s["returning"])
        assert len(returns) >= 3  # several returns a story


@pytest.mark.parametrize("segments", [25, 50])
def test_several_returns_whatever_the_length(segments):
    for sid in range(20):
        story = WORLDS["returning"](random.Random(f"9:{sid}"), segments)
        assert len(story.plan) == segments
        assert sum(len(s["returning"]) for s in story.truth["segments"]) >= 3


def test_truth_records_agree_with_the_captions(returning_world):
    _, stories, truths = returning_world
    for story, gt in zip(stories, truths):
        assert set(gt) == {"id", "world", "hero", "looks", "segments"} and gt["world"] == "returning"
        cast = cast_from_looks(gt["looks"])
        for cap, seg in zip(story["captions"], gt["segments"]):
            assert seg["present"] == [seg["hero"], *seg["others"]]
            assert parse_caption(cap, cast) == segment(seg)
            assert set(seg["returning"]) <= set(seg["others"])


def test_returning_captions_must_say_the_storys_own_looks():
    cast = cast_from_looks(
        {
            "Bea": {"colour": "red", "shape": "circle", "pattern": "striped"},
            "Kip": {"colour": "blue", "shape": "cross", "pattern": "plain"},
        }
    )
    said = "Once upon a time, Bea the striped red circle and Kip the blue cross walk in the park."
    assert parse_caption(said, cast) == Segment("Bea", ("Kip",), "park", "walk")
    assert parse_caption("Then Kip and Bea run in the city.", cast) == Segment("Kip", ("Bea",), "city", "run")
    assert parse_caption("Bea the red circle and Kip walk in the park.", cast) is None  # not striped
    assert parse_caption("Bea and Milo walk in the park.", cast) is None  # not in the story
    assert parse_caption(said) is None  # not a classic caption


def dark(pixels: np.ndarray) -> np.ndarray:
    return np.abs(pixels - STRIPE).max(-1) < 30


def palette_colours(pixels: np.ndarray) -> list[str]:
    """The nearest palette colour of each pixel that is neither dark nor outline."""
    pixels = pixels[pixels.max(-1) > 100]
    names, rgb = list(COLOURS), np.array(list(COLOURS.values()))
    return [names[i] for i in ((pixels[:, None] - rgb[None]) ** 2).sum(-1).argmin(1)]


def test_pictures_draw_every_character_with_its_look(returning_world):
    """Down each character's middle: mostly its colour, and dark stripes if and only if striped."""
    out, stories, truths = returning_world
    for story, gt in zip(stories, truths):
        cast = {c.name: c for c in cast_from_looks(gt["looks"])}
        for rel, seg in zip(story["images"], gt["segments"]):
            img = np.asarray(Image.open(out / "images" / rel).convert("RGB"), dtype=int)
            for name, (cx, cy, r) in layout(segment(seg), 64).items():
                column = img[round(cy - r / 2) : round(cy + r / 2) + 1, round(cx)]
                shown = Counter(palette_colours(column)).most_common()
                assert shown and shown[0][0] == cast[name].colour_name and shown[0][1] >= 2, (
                    rel,
                    name,
                    shown,
                )
                assert dark(column).any() == (cast[name].pattern == "striped"), (rel, name)


def altered(ch: Character) -> list[Character]:
    """The character with one attribute of its look changed."""
    other_colour = next(c for c in COLOURS if c != ch.colour_name)
    return [
        replace(ch, colour_name=other_colour, colour=COLOURS[other_colour]),
        replace(ch, shape=next(s for s in SHAPES if s != ch.shape)),
        replace(ch, pattern=next(p for p in PATTERNS if p != ch.pattern)),
    ]


def test_pictures_are_nearest_to_the_true_looks(returning_world):
    """Colour, shape and pattern all show: changing any one of them takes the ground-truth
    drawing further from the written picture."""
    out, stories, truths = returning_world
    for story, gt in list(zip(stories, truths))[:2]:
        cast = cast_from_looks(gt["looks"])
        for rel, seg in list(zip(story["images"], gt["segments"]))[:12]:
            img = np.asarray(Image.open(out / "images" / rel).convert("RGB"), dtype=float)
            seg = segment(seg)

            def error(c, seg=seg, img=img):
                return ((np.asarray(draw_segment(seg, 64, c), dtype=float) - img) ** 2).mean()

            true = error(cast)
            for i, ch in enumerate(cast):
                if ch.name in (seg.hero, *seg.others):
                    assert all(true < error(cast[:i] + (alt,) + cast[i + 1 :]) for alt in altered(ch)), (
                        rel,
                        ch,
                    )


def test_friends_stand_apart_from_each_other_and_the_hero():
    for action in ACTIONS:
        spots = list(layout(Segment("Milo", ("Bea", "Kip", "Zara"), "park", action), 64).values())
        for i, (x1, y1, r1) in enumerate(spots):
            for x2, y2, r2 in spots[i + 1 :]:
                assert max(abs(x1 - x2), abs(y1 - y2)) >= r1 + r2, action  # bounding boxes do not overlap


def test_returning_world_is_seeded(tmp_path):
    a, b, c = (
        write_storyworld(tmp_path / n, stories=2, segments=15, seed=s, size=64, world="returning")
        for n, s in (("a", 5), ("b", 5), ("c", 6))
    )
    classic = write_storyworld(tmp_path / "classic", stories=2, segments=15, seed=5, size=64)
    for name in ("storyworld.jsonl", "truth.jsonl", "images/000001/000001_keyframe_13.jpg"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    assert (a.parent / "truth.jsonl").read_bytes() != (c.parent / "truth.jsonl").read_bytes()
    assert a.read_bytes() != classic.read_bytes()
    assert sample_captions(2, 15, seed=5, world="returning") == sum(
        (s["captions"] for s in read_jsonl(a)), []
    )


def test_the_cli_writes_the_returning_world_and_says_so(tmp_path):
    from cluster.cli import main, parser

    main(
        [
            "data",
            "storyworld",
            "--stories",
            "1",
            "--segments",
            "12",
            "--seed",
            "1",
            "--size",
            "32",
            "--world",
            "returning",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    meta = json.loads((tmp_path / "r" / "storyworld.json").read_text())
    assert meta["world"] == "returning" and "--world returning" in meta["command"]
    assert "looks" in read_jsonl(tmp_path / "r" / "truth.jsonl")[0]
    given = ["data", "storyworld", "--stories", "1", "--out", "x"]
    assert parser().parse_args(given).world == "classic"
    assert all(parser().parse_args(given + ["--world", w]).world == w for w in WORLDS)
    with pytest.raises(SystemExit):
        parser().parse_args(given + ["--world", "sideways"])
