"""The worker's per-step plan, literally: which keys each query sees, and the rank corrections
(keys are cached rotated to their rank; an eviction shifts ranks once)."""

from actors.mllm.sink import SinkParams
from actors.mllm.vllm_model import RequestState, plan_request

T, B, V, E = 9, 1, 5, 2  # caption token, <img>, visual token, </img>
IDS = [T, B, V, V, E, T, B, V, V, E, T, T]
WINDOW = SinkParams(boi_id=B, eoi_id=E, mode="window", window_segments=1)


def step(st, first, end, policy=WINDOW):
    st.history[first:end] = IDS[first:end]
    return plan_request(st, first, end, policy, row0=0)


def test_decoding_without_eviction_needs_no_rank_corrections():
    st = RequestState()
    plan = step(st, 0, 4)  # prefill
    assert [(list(g.rows), g.keys, g.key_delta) for g in plan.groups] == [([0, 1, 2, 3], [0, 1, 2, 3], None)]
    assert plan.write_ranks == [0, 1, 2, 3] and plan.fixups == []
    for pos in range(4, 9):
        plan = step(st, pos, pos + 1)
        assert plan.groups[0].key_delta is None and plan.write_ranks == [pos]
    assert st.kept == [(0, 9)]


def test_an_eviction_shifts_ranks_once():
    st = RequestState()
    step(st, 0, 9)
    # Position 9 closes the second picture: with a window of one segment, segment 1 (0-4) goes.
    plan = step(st, 9, 10)
    g = plan.groups[0]
    assert g.keys == [5, 6, 7, 8, 9] and plan.write_ranks == [4]
    assert g.key_delta == [-5, -5, -5, -5, 0]        # cached at ranks 5-8, seen at 0-3
    assert plan.fixups == [(5, -5), (6, -5), (7, -5), (8, -5)]  # so rotate them once, for good
    assert st.kept == [(5, 10)]
    plan = step(st, 10, 11)
    assert plan.groups[0].keys == [5, 6, 7, 8, 9, 10] and plan.groups[0].key_delta is None
    assert plan.write_ranks == [5]


def test_a_chunk_that_crosses_a_picture_end_splits_into_groups():
    st = RequestState()
    step(st, 0, 7)
    plan = step(st, 7, 12)  # positions 7-11, with </img> at 9
    assert [(list(g.rows), g.keys) for g in plan.groups] == [([0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]),
                                                            ([2, 3, 4], [5, 6, 7, 8, 9, 10, 11])]
    assert plan.write_ranks == [7, 8, 4, 5, 6]
    assert plan.groups[0].key_delta == [0] * 9
    assert plan.groups[1].key_delta == [-5, -5, -5, -5, 0, 0, 0]
    assert plan.fixups == [(5, -5), (6, -5), (7, -5), (8, -5)]
