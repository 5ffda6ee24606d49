"""benchmarks/returning_probe.py reads a story as the engine does: its teacher-forced
log-probabilities and final-norm hidden rows (what the output head reads at the query rows) equal
the sink reference's, token by token, under every mode; and it measures written features against
the true pictures'."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sink_reference import SinkReference

from actors.checkpoint import part_dir, read_manifest
from actors.mllm.model import load_mllm
from actors.mllm.sink import SinkSettings
from actors.tokenizer.text import segment_ids

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import returning_probe  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_mllm(part_dir(tiny_ckpt, "mllm"))


@pytest.mark.parametrize("mode", ["dense", "window", "streaming", "multimodal"])
def test_teacher_forcing_matches_the_sink_reference(tiny_ckpt, model, mode):
    t = read_manifest(tiny_ckpt).tokens
    lo, hi = t.text_range
    ids = [t.bos]
    for k in range(5):  # five segments, a window of 1: four evictions, with keys moved each time
        ids += segment_ids(t, [lo + (3 * k + j) % (hi - lo) for j in range(2 + k % 2)], picture=True)
    p = SinkSettings(mode=mode, window_segments=1).for_pictures(16).with_ids(t.boi, t.eoi)
    logp, _, hidden = returning_probe.SinkForcer(model, p).run(ids, watch=set())
    ref, cache = SinkReference(model, p, t), [([], []) for _ in model.model.layers]
    rows = torch.cat([ref._hidden(ids[: n + 1], cache) for n in range(len(ids))])
    torch.testing.assert_close(hidden, rows, atol=1e-4, rtol=1e-4)  # the query rows among them
    want = torch.log_softmax(model.lm_head(rows[:-1]), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(logp[1:]), want.double(), atol=1e-4)
    if mode != "dense":  # not vacuous: eviction changed what the tokens saw
        dense, _, _ = returning_probe.SinkForcer(model, replace(p, mode="dense")).run(ids, set())
        assert abs(dense - logp).max() > 1e-3


def test_a_story_is_probed_for_its_written_features_and_attention(tiny_ckpt, model, tmp_path):
    """A small returning world read as the probe reads it: written pictures are the query ids, the
    true pictures' features are the targets; the cosine and the attention shares come out per picture."""
    from actors.mllm.heads import PictureHeads
    from actors.tokenizer.prompts import PromptBuilder
    from training.storyworld_writer import write_storyworld

    write_storyworld(tmp_path, stories=2, segments=14, seed=3, size=64, world="returning")
    builder = PromptBuilder(str(tiny_ckpt))
    t, q, d = builder.manifest.tokens, builder.manifest.num_queries, builder.manifest.feature_dim
    stories = returning_probe.read_stories(tmp_path, builder, 2, 14)
    story = stories[0]
    assert story.features.shape == (14, q, d) and story.ids.count(t.boi) == 14
    assert all(story.ids[i] == t.boi for i in story.boi)
    assert all(
        [story.ids[i] for i in returning_probe.query_positions(story, k)] == t.query_ids for k in range(14)
    )
    heads = PictureHeads.from_pretrained(part_dir(tiny_ckpt, "heads")).eval()
    sink = SinkSettings(mode="multimodal", window_segments=2).for_pictures(q).with_ids(t.boi, t.eoi)
    story = replace(story, returning=[[] for _ in range(13)] + [[story.present[13][0]]])  # one return, at 13
    run = returning_probe.probe_mode(model, heads, story, sink)
    assert run["back"] == [13] and sorted(run["cosine"]) == list(range(14))
    assert all(-1 <= c <= 1 for c in run["cosine"].values())
    assert len(run["attention"]) == len(returning_probe.REGIONS) and sum(run["attention"]) == pytest.approx(
        1, abs=1e-4
    )
    summary = returning_probe.summarise([run, {**run, "back": []}])["summary"]
    assert (
        summary["cosine_returning"] == pytest.approx(run["cosine"][13]) and summary["returning_pictures"] == 1
    )
    slots = returning_probe.slot_probe(stories, q)
    assert set(slots) == {"colour", "shape", "pattern"} and all(len(v) == q for v in slots.values())
    assert all(np.isnan(x) or 0 <= x <= 1 for v in slots.values() for x in v)
