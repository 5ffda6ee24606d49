"""Literal kept ranges for hand-built sequences, in every mode (cache tests are literal)."""

import random

import pytest

from actors.mllm.sink import (
    RELEASED,
    HeldBlocks,
    SinkParams,
    SinkSettings,
    SinkTracker,
    contains,
    count,
    kept_ranges,
    max_blocks,
    positions,
)

BOI, EOI, TEXT, VIS = 1, 2, 9, 5


def story(*segments, tail=0):
    """Segments given as (caption length, visual tokens); ``tail`` caption tokens of an open segment."""
    ids = []
    for cap, q in segments:
        ids += [TEXT] * cap + [BOI] + [VIS] * q + [EOI]
    return ids + [TEXT] * tail


def params(mode, **kw):
    base = dict(
        boi_id=BOI,
        eoi_id=EOI,
        mode=mode,
        sink_tokens=2,
        boi_before=1,
        boi_after=1,
        eoi_before=1,
        eoi_after=1,
        window_segments=2,
    )
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


def test_the_sink_keeps_whole_opening_segments():
    # Segment 1 ends at its </img> (10): kept whole, past the 2 sink tokens, with its neighbourhoods.
    assert kept_ranges(IDS, params("streaming", sink_segments=1)) == [(0, 11), (22, 46)]
    assert kept_ranges(IDS, params("multimodal", sink_segments=1)) == [(0, 12), (15, 18), (20, 46)]
    assert kept_ranges(IDS, params("streaming", sink_segments=1, sink_tokens=15)) == [(0, 15), (22, 46)]
    assert kept_ranges(IDS, params("window", sink_segments=1)) == [(22, 46)]  # the window has no sink
    # More opening segments than have been written: the sink reaches the last </img> written.
    assert kept_ranges(IDS[:33], params("streaming", sink_segments=5, window_segments=1)) == [(0, 33)]


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
            ids = story(
                *[(rng.randint(0, 6), rng.randint(1, 5)) for _ in range(rng.randint(1, 9))],
                tail=rng.randint(0, 4),
            )
            p = params(
                mode,
                window_segments=rng.randint(1, 3),
                boi_before=rng.randint(0, 4),
                eoi_after=rng.randint(0, 4),
            )
            before = kept_ranges(ids[:1], p)
            for n in range(2, len(ids) + 1):
                now = kept_ranges(ids[:n], p)
                assert contains(now, n - 1), "the newest token is always kept"
                assert all(contains(before, i) for i in positions(now) if i < n - 1)
                before = now


def random_story(rng) -> list[int]:
    segments = []
    for _ in range(rng.randint(1, 14)):
        boi = [BOI] if rng.random() < 0.9 else []  # now and then a picture without its <img>
        segments += [TEXT] * rng.randint(0, 6) + boi + [VIS] * rng.randint(1, 6) + [EOI]
    return segments + [TEXT] * rng.randint(0, 4)


@pytest.mark.parametrize("mode", ["dense", "window", "streaming", "multimodal"])
def test_incremental_marks_equal_the_whole_history_policy(mode):
    """SinkTracker, fed in random chunks, agrees with kept_ranges over the whole prefix, always."""
    rng = random.Random(f"tracker-{mode}")
    for _ in range(200):
        ids = random_story(rng)
        p = params(
            mode,
            sink_tokens=rng.randint(0, 6),
            sink_segments=rng.choice([0, 0, 1, 2]),
            window_segments=rng.randint(1, 3),
            boi_before=rng.randint(0, 4),
            boi_after=rng.randint(0, 8),
            eoi_before=rng.randint(0, 4),
            eoi_after=rng.randint(0, 4),
        )
        tracker, n = SinkTracker(p), 0
        while n < len(ids):
            step = ids[n : n + rng.randint(1, 9)]
            tracker.extend(step)
            n += len(step)
            want = kept_ranges(ids[:n], p)
            assert (tracker.kept(), tracker.kept_count()) == (want, count(want)), (ids[:n], p)


def test_the_tracker_counts_evictions_only_at_picture_ends():
    tracker = SinkTracker(params("multimodal"))
    tracker.extend(IDS[:43])  # up to the last </img>, exclusive: segments 1-3 complete, window 2
    assert tracker.evictions == 1 and tracker.kept() == [(0, 2), (4, 7), (9, 43)]
    tracker.extend(IDS[43:44])  # the fourth </img>: segment 2 leaves the window
    assert tracker.evictions == 2 and tracker.kept() == [(0, 2), (4, 7), (9, 12), (15, 18), (20, 44)]
    tracker.extend(IDS[44:])
    assert tracker.evictions == 2 and tracker.kept_count() == 2 + 3 + 3 + 3 + 26


def test_held_blocks_keep_ceil_kept_plus_step_plus_one_and_release_from_the_tail():
    held = HeldBlocks(block_size=4)
    assert held.step(first=0, scheduled=10, kept=0) == [0, 1, 2]  # prefill: 3 entries, all held
    assert held.entries == [0, 1, 2]
    assert held.step(first=10, scheduled=1, kept=10) == [0, 1, 2]  # 11 tokens fit the 3 entries
    # An eviction left 3 of 11 tokens: hold ceil((3 + 1) / 4) + 1 = 2 entries, release entry 2.
    assert held.step(first=11, scheduled=1, kept=3) == [0, 1, 2]
    assert held.entries == [0, 1]
    # Position 12 opens entry 3 (entry 2 stays released): ranks 0-7 live in entries 0, 1; rank 8 in 3.
    assert held.step(first=12, scheduled=1, kept=4) == [0, 1, 3]
    assert held.entries == [0, 1, 3]


def test_held_blocks_always_have_room_for_the_kept_tokens_and_the_step():
    """The + 1 spare covers the gap between positions (how vLLM appends) and ranks (how we store)."""
    rng = random.Random(5)
    for b in (4, 16, 32):
        held, first, kept = HeldBlocks(b), 0, 0
        for _ in range(400):
            s = rng.choice([1, 1, 1, rng.randint(1, 3 * b)])
            visible = held.step(first, s, kept)
            assert len(visible) * b >= kept + s and len(held.entries) * b >= kept + s
            assert len(held.entries) <= -(-(kept + s) // b) + 1
            first, kept = first + s, rng.randint(max(1, (kept + s) // 2), kept + s)  # evictions shrink it


def test_max_blocks_bounds_the_compacted_footprint():
    s = SinkSettings(mode="multimodal", sink_tokens=4, window_segments=8).for_pictures(16)  # 1/2/2/1
    # window + open segment 9 x 34, sink 4, 17 gone segments x 8 kept, one new token: 447 -> 14 + 1 blocks
    assert max_blocks(s, 34, 25, 100_000, 32) == 15
    assert max_blocks(SinkSettings(mode="dense"), 34, 25, 884, 32) == 28
    # the opening segment kept whole adds one longest segment: 447 + 34 = 481 -> 16 + 1 blocks
    assert (
        max_blocks(
            SinkSettings(mode="multimodal", window_segments=8, sink_segments=1).for_pictures(16),
            34,
            25,
            100_000,
            32,
        )
        == 17
    )
    # window + open segment 9 x 34 = 306, plus a 64-token chunk: 370 -> 12 + 1 blocks
    assert max_blocks(SinkSettings(mode="window"), 34, 25, 100_000, 32, step_tokens=64) == 13


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(mode="lru"), "not one of"),
        (dict(window_segments=0), "window_segments"),
        (dict(window_segments=-1), "window_segments"),
        (dict(sink_tokens=-2), ">= 0"),
        (dict(sink_segments=-1), ">= 0"),
        (dict(eoi_id=BOI), "must differ"),
        (dict(boi_after=None), "for_pictures"),
        (dict(eoi_before=-1), ">= 0"),
    ],
)
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
