"""The sink stage reads a whole story as the engine writes it: ``attention_groups`` against the
test's own kept set (``kept_mask``), and ``sink_forward``'s log-probabilities against the
plain-torch sink reference, which reads the story token by token with a real KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sink_reference import SinkReference, kept_mask

from actors.checkpoint import part_dir, read_manifest
from actors.mllm.model import load_mllm
from actors.mllm.sink import SinkSettings
from actors.tokenizer.text import segment_ids
from training.data import join_windows
from training.stages.sink import attention_groups, sink_forward

SEGMENTS, WINDOW = 7, 2
CASES = [("dense", 0), ("window", 0), ("streaming", 0), ("multimodal", 0), ("multimodal", 1)]


def a_story(t) -> list[int]:
    """Seven segments with captions of 2-5 tokens: with a window of 2, up to four evictions."""
    lo, hi = t.text_range
    ids = [t.bos]
    for k in range(SEGMENTS):
        ids += segment_ids(
            t,
            [lo + (5 * k + j) % (hi - lo) for j in range(2 + k % 4)],
            [(13 * k + j) % 256 for j in range(16)],
        )
    return ids


def policy(t, mode, opening):
    return (
        SinkSettings(mode=mode, window_segments=WINDOW, sink_segments=opening)
        .for_pictures(16)
        .with_ids(t.boi, t.eoi)
    )


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_mllm(part_dir(tiny_ckpt, "mllm"))


@pytest.mark.parametrize("mode, opening", CASES)
def test_every_query_reads_what_the_policy_keeps(tiny_ckpt, mode, opening):
    t = read_manifest(tiny_ckpt).tokens
    ids, p = a_story(t), policy(t, mode, opening)
    groups = attention_groups(ids, p)
    assert groups[0][1] == 0 and groups[-1][2] == len(ids)
    assert all(a[2] == b[1] for a, b in zip(groups, groups[1:]))  # the queries tile the story
    for context, lo, hi in groups:
        for i in range(lo, hi):
            want = [j for j, keep in enumerate(kept_mask(ids[: i + 1], p)) if keep]
            assert context + list(range(lo, i + 1)) == want, (mode, i)
    assert len(groups) == SEGMENTS + 1  # one per </img>, and the opening's


@pytest.mark.parametrize("mode, opening", CASES)
def test_the_story_reads_as_the_engine_writes_it(tiny_ckpt, model, mode, opening):
    """Every next-token log-probability of one pass equals the reference's, whose KV cache holds
    each token's keys and values as computed when it was written."""
    t = read_manifest(tiny_ckpt).tokens
    ids, p = a_story(t), policy(t, mode, opening)
    ref, cache, want = SinkReference(model, p, t), [([], []) for _ in model.model.layers], []
    for n in range(1, len(ids)):
        want.append(torch.log_softmax(ref._token(ids[:n], cache), -1)[ids[n]])
    with torch.no_grad():
        logp = torch.log_softmax(sink_forward(model, ids, p), -1)[:-1]
    got = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(got, torch.stack(want), atol=1e-4), (got - torch.stack(want)).abs().max()
    if mode != "dense":  # not vacuous: the sink changed what later tokens read
        with torch.no_grad():
            dense = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)[:-1]
        assert (dense.gather(1, torch.tensor(ids[1:])[:, None])[:, 0] - got).abs().max() > 1e-3


def test_windows_join_into_whole_stories_and_stop_at_a_gap():
    win = lambda *xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
    group = {
        "story_id": np.array(["s", "s", "s"]),
        "window": np.array([1, 0, 3]),
        "input_ids": [win(0, 7, 8), win(0, 5, 6), win(0, 9)],
    }  # window 2 is missing
    joined = join_windows(group)
    assert list(joined["story_id"]) == ["s"] and list(joined["input_ids"][0]) == [0, 5, 6, 7, 8]
