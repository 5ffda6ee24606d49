"""benchmarks/returning_probe.py reads a story as the engine does: its teacher-forced
log-probabilities equal the sink reference's, token by token, under every mode."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

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
        ids += segment_ids(
            t,
            [lo + (3 * k + j) % (hi - lo) for j in range(2 + k % 2)],
            [(7 * k + j) % 256 for j in range(16)],
        )
    p = SinkSettings(mode=mode, window_segments=1).for_pictures(16).with_ids(t.boi, t.eoi)
    logp, _ = returning_probe.SinkForcer(model, p).run(ids, watch=set())
    ref, cache, want = SinkReference(model, p, t), [([], []) for _ in model.model.layers], []
    for n in range(1, len(ids)):
        logits = ref._token(ids[:n], cache)
        want.append(float(torch.log_softmax(logits, -1)[ids[n]]))
    assert torch.allclose(torch.tensor(logp[1:]), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    if mode != "dense":  # not vacuous: eviction changed what the tokens saw
        dense, _ = returning_probe.SinkForcer(model, replace(p, mode="dense")).run(ids, set())
        assert abs(dense - logp).max() > 1e-3
