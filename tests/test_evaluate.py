"""The eval's judges and bookkeeping for the returning StoryWorld, without a model: the look
judge, returns, the story pairing, and the tables and plot from judged ground truth."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image

from actors.mllm.sink import SinkSettings
from training.evaluation.heldout import read_heldout
from training.evaluation.judge import ATTRIBUTES, judge_look, judge_truth, returns, shown_look, tally
from training.evaluation.report import (
    ceiling_table,
    format_table,
    paired,
    paired_table,
    summarise,
    write_outputs,
)
from training.evaluation.run import judge_story
from training.evaluation.settings import EvalSettings
from training.storyworld import CHARACTERS, COLOURS, WORLDS, Segment, there
from training.storyworld_pictures import draw_segment
from training.storyworld_writer import write_storyworld

SIZE = 64
WINDOW = SinkSettings().window_segments


@pytest.fixture(scope="module")
def returning_heldout(tmp_path_factory):
    """Three 30-segment returning-world stories at 64 px, as a held-out folder."""
    out = tmp_path_factory.mktemp("rw-heldout")
    write_storyworld(out, stories=3, segments=30, seed=11, size=SIZE, world="returning")
    return out


def other_value(look: dict[str, str], attribute: str) -> str:
    return next(v for v in ATTRIBUTES[attribute] if v != look[attribute])


def dressed(cast, name: str, attribute: str, value: str):
    """The cast with one attribute of one character's look changed."""
    change = {"colour_name": value, "colour": COLOURS[value]} if attribute == "colour" else {attribute: value}
    return tuple(replace(c, **change) if c.name == name else c for c in cast)


def test_the_look_judge_says_right_for_every_character_of_the_ground_truth(returning_heldout):
    held = read_heldout(returning_heldout, 3, 30)
    judged = 0
    for i in range(3):
        for k in (0, 1, 12, 29):
            seg, cast = held.truth[i][k], held.casts[i]
            jpeg = np.asarray(
                Image.open(returning_heldout / "images" / f"{i:06d}" / f"{i:06d}_keyframe_{k}.jpg")
            )
            for picture in (
                np.asarray(draw_segment(seg, SIZE, cast)),
                jpeg,
            ):  # the render, and the file as written
                for name in there(seg):
                    assert judge_look(seg, cast, name, picture) == {
                        "right": 1.0,
                        "colour": 1.0,
                        "shape": 1.0,
                        "pattern": 1.0,
                    }, (i, k, name)
                    judged += 1
    assert judged >= 3 * 4 * 2 * 2  # the openings alone have all four there


def test_the_look_judge_names_the_one_attribute_that_is_wrong():
    for sid in range(2):
        story = WORLDS["returning"](random.Random(f"3:{sid}"), 2)  # the first segments have all four there
        seg, cast = story.plan[sid], story.cast
        assert len(there(seg)) == 4
        for name in there(seg):
            look = next(c for c in cast if c.name == name).look_record()
            for attribute in ATTRIBUTES:
                value = other_value(look, attribute)
                picture = np.asarray(draw_segment(seg, SIZE, dressed(cast, name, attribute, value)))
                verdict = judge_look(seg, cast, name, picture)
                assert verdict["right"] == 0.0 and verdict[attribute] == 0.0, (name, attribute, verdict)
                assert all(verdict[a] == 1.0 for a in ATTRIBUTES if a != attribute), (
                    name,
                    attribute,
                    verdict,
                )
                assert shown_look(seg, cast, name, picture)[attribute] == value  # what it drew instead
                for friend in there(seg):  # everyone else is still drawn right
                    if friend != name:
                        assert judge_look(seg, cast, friend, picture)["right"] == 1.0, (
                            name,
                            attribute,
                            friend,
                        )


def test_a_return_is_after_at_least_window_segments_away_the_opening_counting_as_everyone():
    cast = ["Hero", "Ava", "Bo", "Cy"]
    story = [["Hero"] for _ in range(12)]
    story[0] = []  # whatever its caption says, the opening counts as everyone there
    story[WINDOW + 1] += ["Ava"]  # away segments 1..WINDOW: back
    story[WINDOW] += ["Bo"]  # away WINDOW - 1 segments: not back
    story[WINDOW + 2] += ["Bo"]  # away only one segment since: not back
    story[3] += ["Cy"]  # away two segments after the opening: not back
    back = returns(story, cast, WINDOW)
    assert len(back) == len(story) and back[0] == []
    assert [(k, n) for k, names in enumerate(back) for n in names] == [(WINDOW + 1, "Ava")]
    assert returns(story, cast, WINDOW - 1)[WINDOW] == ["Bo"]  # a shorter window: Bo's WINDOW - 1 are enough
    assert not any(returns([cast] * 12, cast, 1))  # nobody away, nobody back


def test_story_pairing_keeps_the_stories_with_a_value_in_both_modes():
    assert list(paired([0.5, None, 1.0, 0.25], [0.0, 0.5, None, 0.5])) == [0.5, -0.25]
    assert len(paired([None, None], [1.0, 1.0])) == 0
    window = {
        "hero": [1.0, 0.5, 0.0],
        "place": [1.0, 1.0, 1.0],
        "look": [0.5, 0.5, 0.5],
        "returning": [1.0, None, 0.0],
    }
    multimodal = {
        "hero": [1.0, 1.0, 1.0],
        "place": [1.0, 1.0, 1.0],
        "look": [1.0, 1.0, 1.0],
        "returning": [1.0, 1.0, None],
    }
    lines = paired_table(
        [{"mode": "window", "per_story": window}, {"mode": "multimodal", "per_story": multimodal}]
    )
    [row] = [line for line in lines if line.startswith("| multimodal")]
    cells = dict(zip(*([c.strip() for c in line.strip("|").split("|")] for line in (lines[3], row))))
    assert (
        cells["returning − window"].startswith("+0.000 ± ") and "(1 stories)" in cells["returning − window"]
    )
    assert cells["hero − window"].startswith(
        f"{np.mean(np.subtract(multimodal['hero'], window['hero'])):+.3f} ± "
    )
    assert "(" not in cells["hero − window"]  # the other checks pair every story


def test_judge_story_finds_the_worlds_returns_and_the_tables_report_them(returning_heldout, tmp_path):
    """The ground truth as 'generated' stories: every check right and every return of truth.jsonl
    found; a mode that draws every look wrong from segment 5 on loses hero, look and returning."""
    held = read_heldout(returning_heldout, 3, 30)
    truths = [json.loads(x) for x in (returning_heldout / "truth.jsonl").read_text().splitlines()]
    captions = [
        json.loads(x)["captions"] for x in (returning_heldout / "storyworld.jsonl").read_text().splitlines()
    ]
    s = EvalSettings(stories=3, segments=30, modes=("window", "multimodal"))
    results = []
    for mode in s.modes:
        r = {
            "mode": mode,
            "sink": asdict(SinkSettings().for_pictures(16)),
            "per_segment": {k: {n: [] for n in held.checks} for k in range(30)},
            "per_story": {i: {n: [] for n in held.checks} for i in range(3)},
            "fd": 0.0,
            "fd_se": 0.0,
            "fd_by_bin": [0.0] * 6,
            "seconds": 1.0,
            "render_seconds": 1.0,
            "tokens": 1,
            "peak_kv_bytes": 1 << 20,
            "complete": 3,
        }
        for i in range(3):
            cast = held.casts[i]
            wrong = tuple(
                replace(
                    c,
                    colour_name=other_value(c.look_record(), "colour"),
                    colour=COLOURS[other_value(c.look_record(), "colour")],
                )
                for c in cast
            )
            segments = [
                (
                    k,
                    captions[i][k],
                    np.asarray(draw_segment(seg, SIZE, wrong if mode == "multimodal" and k >= 5 else cast)),
                )
                for k, seg in enumerate(held.truth[i])
            ]
            verdicts = judge_story(held, i, segments, WINDOW)
            if mode == "window":
                found = sorted((k, n) for k, n, _ in verdicts if n == "returning")
                assert [k for k, _ in found] == sorted(
                    k for k, seg in enumerate(truths[i]["segments"]) for _ in seg["returning"]
                )
                assert all(v == 1.0 for _, _, v in verdicts)
            for k, name, v in verdicts:
                r["per_segment"][k][name].append(v)
                r["per_story"][i][name].append(v)
        results.append(summarise(r, s))
    window, multimodal = (m["summary"] for m in results)
    assert window["returns"] == sum(len(seg["returning"]) for t in truths for seg in t["segments"]) >= 3
    assert window["stories_with_returns"] == 3
    assert (window["hero"], window["look"], window["returning"]) == (1.0, 1.0, 1.0)
    assert multimodal["returning"] == 0.0 and multimodal["look"] == pytest.approx(5 / 30)
    table = format_table(results, s, "test stories")
    assert "| look fidelity ↑ | returning fidelity ↑ (returns) |" in table
    assert f"| 1.000 ± 0.000 | 1.000 ± 0.000 ({window['returns']} in 3 stories) |" in table
    assert "returning − window" in table and "-1.000 ± 0.000 (3 stories)" in table
    write_outputs(tmp_path, results, s, "test stories", world="returning", window=None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["world"] == "returning" and saved["training_window"] is None and saved["ceiling"] is None
    segs = saved["modes"][0]["per_segment"]["returning"]
    assert segs[0] is None and {k for k, v in enumerate(segs) if v is not None} == {
        k for t in truths for k, seg in enumerate(t["segments"]) if seg["returning"]
    }
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_ceiling_tally_per_character_role_and_attribute(returning_heldout):
    held = read_heldout(returning_heldout, 2, 3)
    rows = []
    for i in range(2):
        cast, friend = held.casts[i], held.casts[i][1].name
        for seg in held.truth[i]:
            picture = draw_segment(
                seg, SIZE, dressed(cast, friend, "shape", other_value(cast[1].look_record(), "shape"))
            )  # one friend always drawn with the wrong shape
            rows += judge_truth("returning", cast, seg, picture)
    c = tally(rows)
    drawn_right: dict[str, list[bool]] = {}  # a name may be in both stories, the wrong friend in one only
    for i in range(2):
        for seg in held.truth[i]:
            for name in there(seg):
                drawn_right.setdefault(name, []).append(name != held.casts[i][1].name)
    assert {n: (v["right"], v["n"]) for n, v in c["per_character"].items()} == {
        n: (np.mean(v), len(v)) for n, v in drawn_right.items()
    }
    assert c["per_role"]["hero"] == {"right": 1.0, "colour": 1.0, "shape": 1.0, "pattern": 1.0, "n": 6}
    assert c["per_attribute"]["colour"] == c["per_attribute"]["pattern"] == 1.0 > c["per_attribute"]["shape"]
    assert c["min"] == 0.0 and c["judged"] == len(rows) == sum(len(there(s)) for t in held.truth for s in t)
    classic = tally(
        judge_truth(
            "classic",
            CHARACTERS,
            Segment("Kip", ("Bea",), "park", "run"),
            draw_segment(Segment("Kip", ("Bea",), "park", "run"), SIZE),
        )
    )
    assert classic["per_character"] == {"Kip": {"right": 1.0, "n": 1}} and classic["per_attribute"] == {}


def test_the_ceilings_render_and_decode_the_real_pictures_features(tiny_ckpt, returning_heldout):
    """Both ceilings from ``VisualTokenizer.encode`` of the real pictures: the de-tokenizer's render
    and the tokenizer's own decoder, each judged per character by the look judge; both in the table."""
    from actors.checkpoint import part_dir
    from actors.detokenizer.model import Detokenizer
    from actors.tokenizer.prompts import PromptBuilder
    from training.evaluation.run import ceiling, decode_all

    held = read_heldout(returning_heldout, 2, 2)
    builder = PromptBuilder(str(tiny_ckpt))
    features = builder.image_features(held.pictures[0])
    decoded, _ = decode_all(builder.visual, features)
    assert [(np.asarray(p).shape, np.asarray(p).dtype) for p in decoded] == [((SIZE, SIZE, 3), np.uint8)] * 2
    detok = Detokenizer.from_pretrained(part_dir(tiny_ckpt, "detokenizer"))
    s = EvalSettings(stories=2, segments=2, steps=1, guidance=1.0)
    c = ceiling(held, builder, detok, s)
    there_count = sum(len(there(seg)) for t in held.truth for seg in t)
    assert c["world"] == "returning" and c["pictures"] == 4 and c["judged"] == there_count
    assert c["decoder"]["judged"] == there_count and set(c["decoder"]["per_character"]) == set(
        c["per_character"]
    )
    assert set(c["decoder"]["per_attribute"]) == {"colour", "shape", "pattern"}
    lines = ceiling_table(c)
    assert any(line.startswith("De-tokenizer ceiling") and "made features" in line for line in lines)
    assert any(line.startswith("Visual tokenizer's own decoder") for line in lines)
    assert sum(line.startswith("| look (all three) |") for line in lines) == 2
    # A results file written before the decoder's ceiling still formats: its one table.
    old = {k: v for k, v in c.items() if k != "decoder"}
    assert sum(line.startswith("| look (all three) |") for line in ceiling_table(old)) == 1
