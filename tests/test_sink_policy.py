"""Literal kept ranges for hand-built sequences, in every mode (DESIGN.md §6: cache tests are literal)."""

import random

import pytest

from actors.mllm.sink import RELEASED, SinkParams, SinkSettings, contains, count, kept_blocks, kept_ranges, positions

BOI, EOI, TEXT, VIS = 1, 2, 9, 5


def story(*segments, tail=0):
    """Segments given as (caption length, visual tokens); ``tail`` caption tokens of an open segment."""
    ids = []
    for cap, q in segments:
        ids += [TEXT] * cap + [BOI] + [VIS] * q + [EOI]
    return ids + [TEXT] * tail


def params(mode, **kw):
    base = dict(boi_id=BOI, eoi_id=EOI, mode=mode, sink_tokens=2, boi_before=1, boi_after=1, eoi_before=1,
                eoi_after=1, window_segments=2)
    return SinkParams(**{**base, **kw})


# Four segments of 11 tokens (caption 5, <img>, 4 codes, </img>) and two caption tokens:
# <img> at 5, 16, 27, 38; </img> at 10, 21, 32, 43; n = 46. With a window of 2, segments 1-2 are gone.
IDS = story((5, 4), (5, 4), (5, 4), (5, 4), tail=2)


def test_dense_keeps_everything():
    assert kept_ranges(IDS, params("dense")) == [(0, 46)]


def test_window_keeps_the_last_two_segments_and_the_open_one():
    assert kept_ranges(IDS, params("window")) == [(22, 46)]


def test_streaming_adds_the_first_tokens():
    assert kept_ranges(IDS, params("streaming")) == [(0, 2), (22, 46)]


def test_multimodal_keeps_the_neighbourhoods_of_evicted_images():
    # seg 1: <img>@5 -> [4, 7), </img>@10 -> [9, 12); seg 2: <img>@16 -> [15, 18), </img>@21 -> [20, 23)
    assert kept_ranges(IDS, params("multimodal")) == [(0, 2), (4, 7), (9, 12), (15, 18), (20, 46)]


def test_released_defaults_on_a_long_story():
    p = SinkSettings().for_pictures(64).with_ids(BOI, EOI)  # sink 4, BoI -4..+7, EoI -8..+3, window 8
    ids = story(*[(20, 64)] * 10, tail=3)  # 86-token segments, like SEED-Story's 64-token pictures
    got = kept_ranges(ids, p)
    # Segments 1 and 2 left the window: <img> at 20 and 106, </img> at 85 and 171.
    assert got == [(0, 4), (16, 28), (77, 89), (102, 114), (163, 863)]
    assert count(got) == 4 + 12 + 12 + 12 + (863 - 163)


def test_window_counts_whole_segments_while_a_picture_is_being_written():
    ids = story((5, 4), (5, 4), (5, 4)) + [TEXT] * 3 + [BOI, VIS]  # segment 4 is mid-picture
    assert kept_ranges(ids, params("window")) == [(11, 38)]


def test_neighbourhoods_never_reach_into_an_earlier_segment():
    # Segment 2 (positions 11-16) has no caption: its <img> at 11 directly follows segment 1's </img>
    # at 10. With boi_before=3 it would reach back to 8, inside segment 1, which is already gone.
    ids = story((5, 4), (0, 4), (5, 4), (5, 4), tail=1)
    p = params("multimodal", window_segments=2, eoi_after=0, boi_before=3)
    assert kept_ranges(ids, p) == [(0, 7), (9, 13), (15, 40)]
    assert not contains(kept_ranges(ids, p), 8)


def test_policy_is_monotone_a_token_once_evicted_is_never_kept_again():
    rng = random.Random(0)
    for mode in ("window", "streaming", "multimodal"):
        for _ in range(30):
            ids = story(*[(rng.randint(0, 6), rng.randint(1, 5)) for _ in range(rng.randint(1, 9))],
                        tail=rng.randint(0, 4))
            p = params(mode, window_segments=rng.randint(1, 3), boi_before=rng.randint(0, 4),
                       eoi_after=rng.randint(0, 4))
            before = kept_ranges(ids[:1], p)
            for n in range(2, len(ids) + 1):
                now = kept_ranges(ids[:n], p)
                assert contains(now, n - 1), "the newest token is always kept"
                assert all(contains(before, i) for i in positions(now) if i < n - 1)
                before = now


def test_kept_blocks_are_the_blocks_touching_kept_positions():
    assert kept_blocks([(0, 2), (22, 46)], 8) == [0, 2, 3, 4, 5]
    assert kept_blocks([(0, 2), (4, 7), (9, 12), (15, 18), (20, 46)], 8) == [0, 1, 2, 3, 4, 5]
    assert kept_blocks([(22, 46)], 4) == [5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("bad, message", [
    (dict(mode="lru"), "not one of"),
    (dict(window_segments=0), "window_segments"),
    (dict(window_segments=-1), "window_segments"),
    (dict(sink_tokens=-2), ">= 0"),
    (dict(eoi_id=BOI), "must differ"),
    (dict(boi_after=None), "for_pictures"),
    (dict(eoi_before=-1), ">= 0"),
])
def test_bad_parameters_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        params(bad.pop("mode", "multimodal"), **bad)


def test_unset_neighbourhoods_scale_with_the_pictures():
    # SEED-Story's released counts are for Q=64; tiny's Q=16 keeps a quarter of each.
    assert SinkSettings().for_pictures(64) == SinkSettings(**RELEASED)
    assert SinkSettings().for_pictures(16).neighbourhoods() == [1, 2, 2, 1]
    assert SinkSettings().for_pictures(2).neighbourhoods() == [1, 1, 1, 1]  # a sink never shrinks to nothing
    # What a user sets stays as set, and resolving twice changes nothing.
    mine = SinkSettings(boi_after=0, eoi_before=5).for_pictures(16)
    assert mine.neighbourhoods() == [1, 0, 5, 1] and mine.for_pictures(64) == mine
