"""benchmarks/outsider_probe.py labels every kept position of a multimodal kept set with the region
its place in the story implies, finds the names a caption says, and sums a name position's
attention over the regions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from actors.checkpoint import part_dir, read_manifest
from actors.mllm.sink import SinkSettings, kept_ranges, positions
from actors.tokenizer.text import segment_ids

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import outsider_probe  # noqa: E402

NEIGHBOURHOOD_PARTS = outsider_probe.REGIONS[5:9]


@pytest.fixture
def one_thread():
    """Token-by-token forcing of a tiny model is all small ops: on a busy machine a second thread
    makes it about a hundred times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_story(layout, segments: int = 6, caption: int = 5) -> outsider_probe.Written:
    lo, hi = layout.text_range
    ids, spans = [layout.bos], []
    for k in range(segments):
        start = len(ids)
        ids += segment_ids(layout, [lo + (7 * k + j) % (hi - lo) for j in range(caption)], picture=True)
        spans.append((start, len(ids)))
    return outsider_probe.Written(ids, spans, [True] * segments, frozenset(), [[]] * segments, 0)


def expected_region(story, i: int, position: int, window: int, p) -> str:
    """The region of kept position ``i`` from its place alone: its segment and its offset there."""
    j = next(j for j, (_, hi) in enumerate(story.spans) if i < hi) if i else 0
    start, end = story.spans[j]
    boi, eoi = start + 5, end - 1  # every caption is 5 tokens
    current = next(k for k, (s, e) in enumerate(story.spans) if s <= position < e)
    if i < p.sink_tokens:
        return "sink tokens"
    if j == 0:
        return "opening caption" if i < boi else "opening picture"
    if j == current:
        return "current caption"
    if j >= current - window:
        return "window"
    if i < start + p.eoi_after:
        return "after </img>"
    if i < boi:
        return "caption tail before <img>"
    if i <= boi + p.boi_after:
        return "<img> and first query rows"
    assert eoi - p.eoi_before <= i <= eoi  # nothing else of an old segment is kept
    return "last query rows and </img>"


@pytest.mark.parametrize("counts", [(1, 2, 2, 1), (0, 0, 0, 0)])
def test_every_kept_position_gets_the_region_its_place_implies(tiny_ckpt, counts):
    layout = read_manifest(tiny_ckpt).tokens
    story = synthetic_story(layout)
    p = SinkSettings("multimodal", 4, 1, *counts, window_segments=2).with_ids(layout.boi, layout.eoi)
    position = story.spans[5][0] + 2  # in caption 5: segments 0..2 have left a window of 2
    label = outsider_probe.region_labels(story, position, p)
    kept = positions(kept_ranges(story.ids[: position + 1], p))
    got = {i: label[i] for i in kept}
    assert got == {i: expected_region(story, i, position, 2, p) for i in kept}
    parts = {part: sum(r == part for r in got.values()) for part in NEIGHBOURHOOD_PARTS}
    if counts == (1, 2, 2, 1):  # segments 1 and 2 each keep 1 + 3 + 3 + 1; segment 1's first token
        # is the opening's "after </img>" (kept_ranges keeps the opening's neighbourhoods too)
        assert parts == {
            "caption tail before <img>": 2,
            "<img> and first query rows": 6,
            "last query rows and </img>": 6,
            "after </img>": 2,
        }
    else:  # only the old <img> and </img> themselves
        assert parts == dict(zip(NEIGHBOURHOOD_PARTS, (0, 2, 2, 0)))
    assert "other" not in got.values()


def test_a_story_is_probed_at_the_positions_predicting_its_names(tiny_ckpt, one_thread):
    from actors.mllm.model import load_mllm
    from actors.tokenizer.prompts import PromptBuilder

    builder = PromptBuilder(str(tiny_ckpt))
    layout = builder.manifest.tokens
    captions = [
        "Once upon a time, Milo the red circle walks in the park.",
        "Milo and Bea walk in the park.",
        "Then Milo runs in the park.",
        "Soon Milo and Kip jump in the beach.",
        "Later, Zara and Milo wave in the city.",
    ]
    valid = [True, True, True, True, False]
    row = {"story": 3, "captions": captions, "valid": valid}
    story = outsider_probe.build_story(row, builder, frozenset({"Milo", "Bea", "Kip"}))
    for caption, names in zip(captions, story.names):
        assert [builder.text.decode([story.ids[at]]).strip() for _, at in names] == [
            name for name, _ in names
        ]
        assert [name for name, _ in names] == outsider_probe._NAME.findall(caption)
    p = SinkSettings("multimodal", 4, 1, window_segments=2).for_pictures(16).with_ids(layout.boi, layout.eoi)
    assert outsider_probe.first_probed(p) == 3
    model = load_mllm(part_dir(tiny_ckpt, "mllm"))
    names = outsider_probe.probe_story(model, story, p)
    assert [(n["segment"], n["name"], n["class"]) for n in names] == [
        (3, "Milo", "cast"),
        (3, "Kip", "cast"),
        (4, "Zara", "outsider"),
        (4, "Milo", "cast"),
    ]
    assert all(sum(n["share"]) == pytest.approx(1, abs=1e-4) for n in names)
    summary = outsider_probe.summarise([names])
    assert summary["outsider"]["positions"] == 1 and summary["cast"]["positions"] == 3
    assert summary["outsider"]["by_segments"]["9-14"]["share"] is None  # segments 3 and 4 only
    agree = outsider_probe.agreement([names], [story], p)
    assert agree["names"] == {"outsider": {"valid": 0, "invalid": 1}, "cast": {"valid": 2, "invalid": 1}}
    assert agree["captions"]["with an outsider"] == {"valid": 0, "invalid": 1}
    assert "outsider" in outsider_probe.markdown(summary)


def test_like_with_like_compares_later_names_from_segment_15_within_each_story():
    """Only names that are not their caption's first, from segment ``LATE`` on, are compared; the
    paired difference is outsider − cast within a story that has both."""
    regions = len(outsider_probe.REGIONS)

    def name(cls, segment, order, value):
        return {"class": cls, "segment": segment, "order": order, "share": [value] * regions}

    both = [
        name("outsider", 16, 1, 0.3),
        name("cast", 16, 2, 0.1),
        name("cast", 16, 0, 0.9),  # a caption's first name: left out
        name("cast", 10, 1, 0.9),  # before segment 15: left out
    ]
    cast_only = [name("cast", 20, 1, 0.5)]
    summary = outsider_probe.summarise([both, cast_only])
    assert summary["outsider"]["like_with_like"]["positions"] == 1
    assert summary["cast"]["like_with_like"]["positions"] == 2
    cast_share = summary["cast"]["like_with_like"]["share"]["window"]["mean"]
    assert cast_share == pytest.approx((0.1 + 0.5) / 2)  # per story, then over stories
    paired = summary["outsider_minus_cast_like_with_like"]
    assert paired["stories"] == 1 and paired["share"]["window"]["mean"] == pytest.approx(0.3 - 0.1)
