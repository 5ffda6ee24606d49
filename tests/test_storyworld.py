import json

import numpy as np
from PIL import Image

from training.storyworld import CHARACTERS, PLACES, draw_segment, Segment, write_storyworld


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a, b, c = (write_storyworld(tmp_path / n, stories=3, segments=12, seed=s, size=64)
               for n, s in (("a", 5), ("b", 5), ("c", 6)))
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
