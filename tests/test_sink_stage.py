"""The sink stage reads a whole story as the engine writes it: ``attention_groups`` against the
test's own kept set (``kept_mask``), and ``sink_forward``'s final-norm hidden states (the query
rows the heads read) and log-probabilities against the plain-torch sink reference, which reads the
story token by token with a real KV cache; its loss has both of the mllm stage's terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sink_reference import SinkReference, kept_mask

from actors.checkpoint import part_dir, read_manifest
from actors.mllm.model import load_mllm
from actors.mllm.sink import SinkSettings
from actors.tokenizer.text import segment_ids
from training.data import FEATURE_DTYPE, join_windows
from training.stages.sink import attention_groups, sink_forward

SEGMENTS, WINDOW = 7, 2
CASES = [("dense", 0), ("window", 0), ("streaming", 0), ("multimodal", 0), ("multimodal", 1)]


def a_story(t) -> list[int]:
    """Seven segments with captions of 2-5 tokens: with a window of 2, up to four evictions."""
    lo, hi = t.text_range
    ids = [t.bos]
    for k in range(SEGMENTS):
        ids += segment_ids(t, [lo + (5 * k + j) % (hi - lo) for j in range(2 + k % 4)], picture=True)
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
    """Every final-norm hidden row of one pass, the query rows the heads read among them, and every
    next-token log-probability equal the reference's, whose KV cache holds each token's keys and
    values as computed when it was written."""
    t = read_manifest(tiny_ckpt).tokens
    ids, p = a_story(t), policy(t, mode, opening)
    ref, cache = SinkReference(model, p, t), [([], []) for _ in model.model.layers]
    rows = torch.cat([ref._hidden(ids[: n + 1], cache) for n in range(len(ids))])  # (n, hidden)
    want = torch.log_softmax(model.lm_head(rows[:-1]), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    with torch.no_grad():
        hidden = sink_forward(model, ids, p)
        logp = torch.log_softmax(model.lm_head(hidden), -1)[:-1]
    queries = [i for i, x in enumerate(ids) if t.is_query(x)]
    assert len(queries) == SEGMENTS * t.num_queries
    torch.testing.assert_close(hidden[queries], rows[queries], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, rows, atol=1e-4, rtol=1e-4)
    got = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    if mode != "dense":  # not vacuous: the sink changed what later tokens read
        with torch.no_grad():
            dense = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)[:-1]
        assert (dense.gather(1, torch.tensor(ids[1:])[:, None])[:, 0] - got).abs().max() > 1e-3


def test_the_dense_read_is_the_plain_forward(tiny_ckpt, model):
    """In dense mode every group reads everything before it: the final-norm hidden states are the
    plain forward's, which the mllm stage regresses from."""
    t = read_manifest(tiny_ckpt).tokens
    ids = a_story(t)
    with torch.no_grad():
        hidden = sink_forward(model, ids, policy(t, "dense", 0))
        plain = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(hidden, plain, atol=1e-4, rtol=1e-4)


def test_windows_join_into_whole_stories_and_stop_at_a_gap():
    """Ids and features join in window order; a window's pictures' features follow its ids, and the
    story stops at the first missing window for both."""
    win = lambda *xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
    feats = {w: np.full((w + 1, 2, 3), w, dtype=FEATURE_DTYPE).tobytes() for w in (0, 1, 3)}
    feats[0] = np.zeros((1, 2, 3), dtype=FEATURE_DTYPE).tobytes()  # trailing zero bytes survive
    group = {
        "story_id": np.array(["s", "s", "s"]),
        "window": np.array([1, 0, 3]),
        "input_ids": [win(0, 7, 8), win(0, 5, 6), win(0, 9)],
        "features": np.array([feats[1], feats[0], feats[3]], dtype=object),
    }  # window 2 is missing
    joined = join_windows(group)
    assert list(joined["story_id"]) == ["s"] and list(joined["input_ids"][0]) == [0, 5, 6, 7, 8]
    assert joined["features"][0] == feats[0] + feats[1]
    pictures = np.frombuffer(joined["features"][0], dtype=FEATURE_DTYPE).reshape(-1, 2, 3)
    assert pictures.shape == (3, 2, 3) and pictures[0].max() == 0 and (pictures[1:] == 1).all()


def test_the_stage_loss_trains_captions_and_the_heads_features(tiny_ckpt):
    """One batch of two whole stories: caption cross-entropy and the cosine of the heads' features
    against the story's own, whose gradient reaches the Llama and the heads."""
    from training.stages import sink as stage
    from training.train import stage_specs

    t, manifest = read_manifest(tiny_ckpt).tokens, read_manifest(tiny_ckpt)
    spec = stage_specs("tiny", tiny_ckpt, ["sink"], steps=1, sink=SinkSettings(window_segments=WINDOW))[0]
    models = stage.init(spec)
    stories = [a_story(t), a_story(t)[: -len(t.picture_ids) - 3]]  # the second: one picture less
    draw = torch.Generator().manual_seed(0)
    features = [
        torch.nn.functional.normalize(
            torch.randn(s.count(t.boi), t.num_queries, manifest.feature_dim, generator=draw), dim=-1
        )
        for s in stories
    ]
    batch = {"stories": stories, "loss_from": [s.index(t.boi) for s in stories], "features": features}
    total, metrics = stage.loss(models, batch, spec, 0)
    assert set(metrics) == {"caption_ce", "cosine", "opening_cosine", "dense"} and metrics["dense"] == 0
    assert -1 <= metrics["cosine"] <= 1
    # the two openings weigh as much as the later pictures together (the mllm stage's regression)
    pictures = sum(len(f) for f in features)
    later = (metrics["cosine"] * pictures - 2 * metrics["opening_cosine"]) / (pictures - 2)
    regression = (1 - metrics["opening_cosine"]) + (1 - later)
    assert float(total.detach()) == pytest.approx(metrics["caption_ce"] + regression, rel=1e-4)
    total.backward()
    assert models["heads"].output.proj_out.weight.grad.abs().sum() > 0
    assert models["mllm"].model.embed_tokens.weight.grad.abs().sum() > 0
    # The features must be the story's pictures', one per picture.
    with pytest.raises(ValueError, match="pictures"):
        stage.loss(models, {**batch, "features": [features[0], features[1][:-1]]}, spec, 0)


def test_dense_steps_read_the_story_densely_and_are_spread_evenly(tiny_ckpt):
    """``dense_share`` of the steps read whole stories as the mllm stage does: such a step's loss is
    the dense policy's, the others' the sink's."""
    from dataclasses import replace

    from training.stages import sink as stage
    from training.train import stage_specs

    assert not any(stage.reads_densely(step, 0.0) for step in range(100))
    assert all(stage.reads_densely(step, 1.0) for step in range(100))
    quarter = [stage.reads_densely(step, 0.25) for step in range(100)]
    assert sum(quarter) == 25 and sum(quarter[:4]) == 1 and sum(quarter[40:48]) == 2

    manifest = read_manifest(tiny_ckpt)
    t = manifest.tokens
    sink = SinkSettings(mode="multimodal", window_segments=WINDOW)
    mixed = stage_specs("tiny", tiny_ckpt, ["sink"], steps=1, sink=sink, dense_share=0.5)[0]
    assert mixed.dense_share == 0.5
    assert stage.policy(mixed, 0).mode == "multimodal" and stage.policy(mixed, 1).mode == "dense"
    story = a_story(t)
    features = [
        torch.nn.functional.normalize(
            torch.randn(story.count(t.boi), t.num_queries, manifest.feature_dim), dim=-1
        )
    ]
    models = stage.init(mixed)
    with torch.no_grad():
        losses = {
            name: float(
                stage.loss(
                    models,
                    {"stories": [story], "loss_from": [story.index(t.boi)], "features": features},
                    spec,
                    step,
                )[0]
            )
            for name, spec, step in [
                ("mixed dense step", mixed, 1),
                ("dense", replace(mixed, sink={**mixed.sink, "mode": "dense"}, dense_share=0.0), 0),
                ("sink", mixed, 0),
            ]
        }
    assert losses["mixed dense step"] == pytest.approx(losses["dense"], rel=1e-6)
    assert losses["sink"] != pytest.approx(losses["dense"], rel=1e-4)  # the sink evicts: the loss differs
