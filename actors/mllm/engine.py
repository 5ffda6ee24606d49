"""The story engine: vLLM with our plugin, one request per story, streamed segment by segment.

``step`` runs one engine step and reports, as plain data (``EngineStep``), what it wrote: what
finished during it (captions, whole segments of caption ids + the picture's features, and ended stories:
``actors/mllm/events.py``), the output tokens each story wrote, and the KV blocks each story still
running holds. ``abort`` ends a story and returns its KV blocks at once. Callers step it through
``actors/mllm/driver.py``'s ``StoryDriver``, which keeps the per-step books (tokens, seconds, KV
blocks) from those reports; the engine knows nothing of the driver.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from actors.checkpoint import part_dir, read_manifest
from actors.mllm.events import CaptionWritten, Event, PictureWritten, StoryEnd
from actors.mllm.grammar import StoryRules
from actors.mllm.sink import SinkSettings
from actors.mllm.vllm_logits import EXTRA_KEY
from actors.mllm.vllm_plugin import ARCHITECTURE
from actors.tokenizer.text import split_segments, written_captions


@dataclass(frozen=True)
class EngineConfig:
    checkpoint: str
    sink: SinkSettings = field(default_factory=SinkSettings)
    num_queries: int | None = None  # if given, must equal the checkpoint's Q
    max_stories: int = 8  # concurrent stories (vLLM max_num_seqs)
    kv_blocks: int | None = None  # KV blocks in the pool (default: what kv_cache_bytes holds)
    kv_cache_bytes: int = 256 << 20  # memory for the KV pool; explicit, so vLLM doesn't claim 92% of RAM
    block_size: int = 32  # the CPU build needs a multiple of 32
    # Longest story one request may hold, its prompt's earlier segments included (it sizes the
    # engine's length limit and each story's worst-case KV footprint). Not StoryLimits.max_segments,
    # which counts the new segments a client may ask for.
    max_story_segments: int = 32
    max_batched_tokens: int | None = None  # tokens per engine step; long prompts are prefilled in chunks
    dtype: str = "float32"
    # Admit a story only while every running story's worst-case (compacted) footprint still fits,
    # so admitted stories are never preempted (actors/mllm/vllm_kv.py). False: vLLM's own
    # admission, which takes a story whenever its first chunk fits and preempts when the pool runs out.
    admit_on_footprint: bool = True

    def __post_init__(self) -> None:
        if self.max_stories < 1 or self.block_size % 32:
            raise ValueError("max_stories must be >= 1 and block_size a multiple of 32")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class EngineStep:
    """What one engine step wrote, as plain data: whoever steps the engine keeps its books from
    this, without reading the engine's own per-story records."""

    events: list[Event]  # what finished in the step, in order per story
    written: dict[str, int]  # output tokens each story wrote in the step, the stories that ended included
    held_blocks: dict[str, int]  # KV blocks each story still running holds after the step


@dataclass
class _Story:
    prompt_len: int
    request_id: str  # vLLM's internal id (the story id plus a random suffix)
    captioned: int = 0  # captions already streamed
    emitted: int = 0  # segments (caption + picture) already streamed
    seen: int = 0  # output tokens already looked at
    rows_from: int = 0  # output index after the last picture whose rows were handed out


class StoryEngine:
    def __init__(self, config: EngineConfig):
        self.manifest = read_manifest(config.checkpoint)
        # From here on the sink's neighbourhoods are numbers, scaled to this checkpoint's pictures.
        config = replace(config, sink=config.sink.for_pictures(self.manifest.num_queries))
        self.config = config
        self.tokens = self.manifest.tokens
        if config.num_queries is not None and config.num_queries != self.manifest.num_queries:
            raise ValueError(
                f"num_queries={config.num_queries} but the checkpoint has Q={self.manifest.num_queries}"
            )
        self.engine = _build_engine(config, self.manifest)
        self.engine.collective_rpc("seedstory_bind")
        self.heads = load_heads(config.checkpoint, config.dtype)
        self.heads_dtype = next(self.heads.parameters()).dtype
        self.stories: dict[str, _Story] = {}
        self._first_blocks: set[int] = set()  # live stories' first blocks, as the worker last heard
        # vLLM request id -> its first block when last scheduled: the worker's key for its picture
        # rows. Recorded at scheduling, since a story that finishes in a step frees its blocks in it.
        self._first_block_of: dict[str, int] = {}
        self.scheduler.step_hooks.append(self._note_first_blocks)

    # -- requests --------------------------------------------------------------------------
    def submit(
        self,
        story_id: str,
        prompt_ids: list[int],
        segments: int,
        sampling: Sampling = Sampling(),
        given: dict[int, np.ndarray] | None = None,
        script: list[list[int]] = (),
    ) -> None:
        """Start a story. ``given``: the prompt's given pictures, by the position of their first
        query row -> their features (Q, D); they enter as the input head's embedding rows.
        ``script``: captions given for this request's later pictures (``StoryRules.script``)."""
        from vllm import SamplingParams

        if story_id in self.stories:
            raise ValueError(f"story {story_id!r} is already running")
        rules = StoryRules(
            self.manifest.num_queries, segments, self.manifest.preset.max_caption_tokens, tuple(script)
        )
        per_segment = rules.max_caption_tokens + rules.num_queries + 2
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            max_tokens=segments * per_segment + 1,
            stop_token_ids=[self.tokens.eos],
            detokenize=False,
            extra_args={EXTRA_KEY: asdict(rules)},
        )
        prompt = self._prompt(list(prompt_ids), given or {})
        internal = self.engine.add_request(story_id, prompt, params)
        self.stories[story_id] = _Story(prompt_len=len(prompt_ids), request_id=internal)

    def _prompt(self, ids: list[int], given: dict[int, np.ndarray]) -> dict:
        """vLLM's prompt: token ids, and where pictures are given a mixed prompt whose embedding
        rows stand at their query positions (``<img>``/``</img>`` stay ids: the scheduler's sink
        reads them, and it sees 0 at embedding positions: docs/architecture.md#6)."""
        if not given:
            return {"prompt_token_ids": ids}
        import torch

        q = self.manifest.num_queries
        embeds = torch.zeros(len(ids), self.manifest.preset.mllm.hidden_size, dtype=self.heads_dtype)
        is_token = [True] * len(ids)
        for start, features in sorted(given.items()):
            if ids[start : start + q] != self.tokens.query_ids or ids[start - 1] != self.tokens.boi:
                raise ValueError(f"a given picture at {start} does not sit on a picture's query ids")
            with torch.no_grad():
                embeds[start : start + q] = self.heads.embeddings(torch.as_tensor(features)[None])[0]
            is_token[start : start + q] = [False] * q
        return {"prompt_token_ids": ids, "prompt_embeds": embeds, "prompt_is_token_ids": is_token}

    def abort(self, story_id: str) -> StoryEnd | None:
        story = self.stories.pop(story_id, None)
        if story is None:
            return None
        self.engine.abort_request([story_id])
        self._first_block_of.pop(story.request_id, None)
        self._release_worker_state()
        return StoryEnd(
            story_id, aborted=True, prompt_tokens=story.prompt_len, output_tokens=story.seen, at=time.time()
        )

    def step(self) -> EngineStep:
        events: list[Event] = []
        written: dict[str, int] = {}
        pictured: list[tuple[_Story, list[PictureWritten]]] = []  # stories that finished a picture
        ended: list[_Story] = []
        for out in self.engine.step():
            story = self.stories.get(out.request_id)
            if story is None:
                continue
            ids = out.outputs[0].token_ids
            parsed = self._parse(out.request_id, story, ids)
            events += parsed
            pictures = [ev for ev in parsed if isinstance(ev, PictureWritten)]
            if pictures:
                pictured.append((story, pictures))
            written[out.request_id] = len(ids) - story.seen
            story.seen = len(ids)
            if out.finished:
                del self.stories[out.request_id]
                ended.append(story)
                # The grammar ends every complete story with </s> ("stop"); "length" means the
                # engine's max_model_len (or max_tokens) cut it short.
                truncated = out.outputs[0].finish_reason == "length"
                events.append(StoryEnd(out.request_id, False, story.prompt_len, len(ids), truncated))
        if pictured:
            self._attach_features(pictured)  # before the worker forgets the stories that ended
        for story in ended:
            self._first_block_of.pop(story.request_id, None)
        self._release_worker_state()
        now = time.time()
        for ev in events:
            ev.at = now
        return EngineStep(events, written, {sid: self.story_blocks(sid) for sid in self.stories})

    def _release_worker_state(self) -> None:
        """Tell the worker which stories still live, when one has ended, been aborted or been
        preempted since it last heard: it frees their per-story state (known by first block)."""
        live = {blocks[0].block_id for blocks in self._manager.req_to_blocks.values() if blocks}
        if self._first_blocks - live:
            self.engine.collective_rpc("seedstory_retain", args=(sorted(live),))
        self._first_blocks = live

    def _note_first_blocks(self, scheduler, output) -> None:
        """Scheduler hook: each scheduled story's first block (new after a preemption)."""
        blocks = self._manager.req_to_blocks
        for rid in output.num_scheduled_tokens:
            self._first_block_of[rid] = blocks[rid][0].block_id

    def _attach_features(self, pictured: list[tuple[_Story, list[PictureWritten]]]) -> None:
        """Fetch the finished pictures' hidden rows from the worker, one call for the step, and
        give each picture the output head's features of its Q rows (one head call for the step).
        Rows before ``rows_from`` were handed out already (a recompute after a preemption captures
        them again); the worker drops them."""
        import torch

        first_blocks = [self._first_block_of[story.request_id] for story, _ in pictured]
        starts = {key: story.prompt_len + story.rows_from for key, (story, _) in zip(first_blocks, pictured)}
        answer = self.engine.collective_rpc("seedstory_picture_rows", args=(starts,))[0]
        q, rows = self.manifest.num_queries, []
        for key, (story, pictures) in zip(first_blocks, pictured):
            positions, raw, shape, dtype = answer[key]
            if len(positions) != q * len(pictures):
                raise RuntimeError(f"{len(positions)} query rows for {len(pictures)} pictures of Q={q}")
            held = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))
            rows.append(held.view(len(pictures), q, *shape[1:]))
            story.rows_from = positions[-1] + 1 - story.prompt_len
        with torch.no_grad():
            features = self.heads.features(torch.cat(rows).to(self.heads_dtype)).float().numpy()
        done = [picture for _, pictures in pictured for picture in pictures]
        for picture, picture_features in zip(done, features):
            picture.features = picture_features

    def worker_states(self) -> int:
        """Stories the worker keeps state for (tests: 0 once every story has ended)."""
        return self.engine.collective_rpc("seedstory_states")[0]

    def _parse(self, story_id: str, story: _Story, ids: list[int]) -> list[CaptionWritten | PictureWritten]:
        """New captions and pictures among the output ids; parsed only when a marker arrives."""
        events: list[CaptionWritten | PictureWritten] = []
        new = ids[story.seen :]
        if self.tokens.boi in new:
            captions = written_captions(self.tokens, ids)
            events += [
                CaptionWritten(story_id, k, captions[k]) for k in range(story.captioned, len(captions))
            ]
            story.captioned = len(captions)
        if self.tokens.eoi in new:
            done = [s for s in split_segments(self.tokens, ids) if s[1]]  # segments with their picture
            # Features come from the worker's rows after the step (_attach_features).
            events += [PictureWritten(story_id, k, done[k][0], None) for k in range(story.emitted, len(done))]
            story.emitted = len(done)
        return events

    def has_work(self) -> bool:
        return bool(self.stories)

    def running(self) -> list[str]:
        """The stories running now, in the order they were submitted."""
        return list(self.stories)

    # -- KV accounting ---------------------------------------------------------------------
    @property
    def scheduler(self):
        """The live vLLM scheduler (our SinkScheduler, with the SinkKVManager inside): the one
        place that reaches into vLLM's engine core. Safe because ``_build_engine`` runs the core in
        this process (it checks), so this is the object that schedules, not a copy in another
        process; and with synchronous scheduling it is read only between steps, on the thread
        that steps."""
        return self.engine.engine_core.engine_core.scheduler

    @property
    def _pool(self):
        return self.scheduler.kv_cache_manager.block_pool

    @property
    def _manager(self):
        return self.scheduler.kv_cache_manager.coordinator.single_type_managers[0]

    def block_bytes(self) -> int:
        """KV bytes one block holds, over all layers."""
        group = self.scheduler.kv_cache_config.kv_cache_groups[0]
        return group.kv_cache_spec.page_size_bytes * len(group.layer_names)

    def free_blocks(self) -> int:
        return self._pool.get_num_free_blocks()

    def total_blocks(self) -> int:
        return self._pool.num_gpu_blocks - 1  # block 0 is vLLM's null block

    def blocks_in_use(self) -> int:
        return self.total_blocks() - self.free_blocks()

    def story_blocks(self, story_id: str) -> int:
        """Blocks a running story holds now (freed positions excluded)."""
        story = self.stories.get(story_id)
        return self._manager.held_blocks(story.request_id) if story else 0

    def abort_all(self) -> None:
        for sid in list(self.stories):
            self.abort(sid)

    def shutdown(self) -> None:
        self.abort_all()
        core = getattr(self.engine, "engine_core", None)
        if core is not None:
            core.shutdown()


def load_heads(checkpoint: str, dtype: str):
    """The picture heads, in the engine's dtype (its hidden rows come in it)."""
    from actors.mllm.heads import PictureHeads

    return PictureHeads.from_pretrained(part_dir(checkpoint, "heads"), dtype)


def _build_engine(config: EngineConfig, manifest):
    # In-process engine core: the wrapper reads the scheduler's block pool directly.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine

    longest = manifest.preset.max_caption_tokens + manifest.num_queries + 2  # caption <img> q.. </img>
    max_len = (config.max_story_segments + 1) * longest  # + 1: the opening caption and the closing </s>
    if config.sink.mode == "dense":
        max_len = min(max_len, manifest.preset.mllm.max_position_embeddings)
    else:
        # Positions are ranks inside the kept cache, bounded by the policy, so a sequence may be
        # longer than max_position_embeddings (that is the point of the sink).
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    args = EngineArgs(
        model=str(part_dir(config.checkpoint, "mllm")),
        skip_tokenizer_init=True,
        dtype=config.dtype,
        max_model_len=max_len,
        block_size=config.block_size,
        max_num_seqs=config.max_stories,
        num_gpu_blocks_override=config.kv_blocks,
        kv_cache_memory_bytes=config.kv_cache_bytes,
        enable_prefix_caching=False,
        max_num_batched_tokens=config.max_batched_tokens,
        # Our attention is plain torch with per-request Python bookkeeping: run it eagerly.
        enforce_eager=True,
        seed=0,
        # Compaction frees blocks right after scheduling a step, which is safe only if the next
        # step is scheduled after this one ran (actors/mllm/vllm_kv.py).
        scheduler_cls="actors.mllm.vllm_kv.SinkScheduler",
        async_scheduling=False,
        worker_extension_cls="actors.mllm.vllm_worker.SinkWorkerExtension",
        logits_processors=["actors.mllm.vllm_logits:StoryGrammarProcessor"],
        # Given pictures enter as embedding rows of a mixed prompt.
        enable_prompt_embeds=True,
        hf_overrides={
            "architectures": [ARCHITECTURE],
            "seedstory_sink": asdict(config.sink),
            "seedstory_tokens": asdict(manifest.tokens),
            "seedstory_story": {
                "longest_segment": longest,
                "max_story_segments": config.max_story_segments,
                "admit_on_footprint": config.admit_on_footprint,
            },
        },
    )
    engine = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
    if not isinstance(engine.engine_core, InprocClient):  # StoryEngine.scheduler reads the core in place
        raise RuntimeError(f"expected vLLM's in-process engine core, got {type(engine.engine_core).__name__}")
    return engine
