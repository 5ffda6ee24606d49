"""The worker's per-step plan, literally: the compaction moves, where new tokens are stored, and
which storage each query group reads: all of [0, extent) at rank = storage index, or, after an
eviction inside the step, runs (storage index, rank seen, length). The key at storage index i is
rotated to rank i."""

from actors.mllm.sink import HeldBlocks, SinkParams, SinkTracker
from actors.mllm.vllm_model import RequestState, plan_request, rank_runs

T, B, V, E = 9, 1, 5, 2  # caption token, <img>, visual token, </img>
IDS = [T, B, V, V, E, T, B, V, V, E, T, T, T]
WINDOW = SinkParams(boi_id=B, eoi_id=E, mode="window", window_segments=1)


def new_state(policy=WINDOW) -> RequestState:
    return RequestState(SinkTracker(policy), HeldBlocks(block_size=4))


def step(st, first, end):
    return plan_request(st, first, IDS[first:end], row0=0)


def groups(plan):
    return [(list(g.rows), g.extent, g.runs) for g in plan.groups]


def test_rank_runs_map_a_subset_to_its_ranks():
    assert rank_runs([(0, 10)], [(5, 10)]) == [(5, 0, 5)]
    assert rank_runs([(0, 2), (4, 12)], [(0, 2), (6, 8), (10, 12)]) == [(0, 0, 2), (4, 2, 2), (8, 4, 2)]


def test_decoding_without_eviction_needs_no_moves_and_no_rank_corrections():
    st = new_state()
    plan = step(st, 0, 4)  # prefill
    assert groups(plan) == [([0, 1, 2, 3], 4, None)]
    assert plan.writes == range(0, 4) and plan.moves == [] and plan.entries == [0]
    for pos in range(4, 9):
        plan = step(st, pos, pos + 1)
        assert groups(plan) == [([0], pos + 1, None)]
        assert plan.writes == range(pos, pos + 1) and plan.moves == []
    assert st.stored == [(0, 9)] and st.held.entries == [0, 1, 2]


def test_an_eviction_is_seen_at_once_and_compacted_by_the_next_step():
    st = new_state()
    step(st, 0, 9)
    # Position 9 closes the second picture: with a window of one segment, segment 1 (0-4) goes.
    plan = step(st, 9, 10)
    assert plan.moves == [] and plan.writes == range(9, 10)  # stored where it would have been
    assert groups(plan) == [([0], 10, [(5, 0, 5)])]  # storage 5-9 seen at ranks 0-4
    plan = step(st, 10, 11)
    assert plan.moves == [(5, 0, 5)]  # positions 5-9 move from storage 5-9 down to 0-4, before any write
    assert plan.writes == range(5, 6) and groups(plan) == [([0], 6, None)]
    assert st.stored == [(5, 11)]
    # 6 kept + 1 new: hold ceil(7 / 4) + 1 = 3 entries of the 3 the 11 positions span.
    assert plan.entries == [0, 1, 2] and st.held.entries == [0, 1, 2]
    plan = step(st, 11, 12)
    assert plan.moves == [] and plan.writes == range(6, 7)


def test_a_chunk_that_crosses_a_picture_end_splits_into_groups():
    st = new_state()
    step(st, 0, 7)
    plan = step(st, 7, 12)  # positions 7-11, with </img> at 9
    assert groups(plan) == [([0, 1], 9, None), ([2, 3, 4], 12, [(5, 0, 7)])]  # storage 5-11 seen at ranks 0-6
    assert plan.writes == range(7, 12) and plan.moves == []
    plan = step(st, 12, 13)  # the next step compacts: positions 5-11 down to ranks 0-6
    assert plan.moves == [(5, 0, 7)] and plan.writes == range(7, 8)
    # 7 kept + 1 new: hold ceil(8 / 4) + 1 = 3 entries; entry 3 (opened for position 12) still
    # addresses this step, entry 2 held, and the tail entry 3 is released after it.
    assert plan.entries == [0, 1, 2, 3] and st.held.entries == [0, 1, 2]
