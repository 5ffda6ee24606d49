"""MLLMPool: the Serve deployment that hosts the story engine (vLLM + our sink plugin).

One vLLM request per story. ``generate`` streams plain-data events (caption written, picture
written, story ended) as the engine produces them; many stories share one engine through
continuous batching. A single background task steps the engine whenever a story is running.

vLLM's ``AsyncLLM`` runs its engine core in another process (the only mode the CPU build
offers), where the scheduler's block pool cannot be read. We drive the in-process engine
from one worker thread instead: every engine call (submit, step, abort, stats) goes through
that thread, so they never interleave, and the asyncio loop stays free to stream.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from ray import serve
from ray.util import metrics

from actors.checkpoint import part_dir
from actors.mllm.engine import CaptionEvent, EngineConfig, Sampling, SegmentEvent, StoryEnd, StoryEngine
from actors.mllm.sink import SinkSettings
from actors.tokenizer.text import load_text_tokenizer


# Replicas, resources, autoscaling and max_ongoing_requests: ray_config.yaml.
@serve.deployment(name="MLLMPool")
class MLLMPool:
    def __init__(self, checkpoint: str, sink: dict, max_stories: int = 8, max_segments: int = 32,
                 kv_blocks: int | None = None):
        config = EngineConfig(checkpoint, SinkSettings(**sink), max_stories=max_stories,
                              max_segments=max_segments, kv_blocks=kv_blocks)
        self.engine = StoryEngine(config)
        self.text = load_text_tokenizer(part_dir(checkpoint, "tokenizer"))
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self.queues: dict[str, asyncio.Queue] = {}
        self.peak: dict[str, int] = {}
        self.driver: asyncio.Task | None = None
        self.m_blocks = metrics.Gauge("seedstory_kv_blocks_in_use", "KV blocks held by running stories")
        self.m_stories = metrics.Gauge("seedstory_mllm_stories", "stories running in the engine")
        self.m_tokens = metrics.Counter("seedstory_mllm_output_tokens", "tokens written by the MLLM")
        self.m_tps = metrics.Gauge("seedstory_mllm_tokens_per_s", "output tokens per second, last step")

    # -- the API ---------------------------------------------------------------------------
    async def generate(self, story_id: str, prompt_ids: list[int], segments: int,
                       sampling: dict) -> AsyncIterator[dict]:
        """Stream one story: {"kind": "caption" | "segment" | "end", ...} dicts, in order."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[story_id] = queue  # before submit: the driver may step before we return
        ended = False
        try:
            await self._call(self.engine.submit, story_id, prompt_ids, segments, Sampling(**sampling))
            self._drive()
            while not ended:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                ended = event["kind"] == "end"
                yield event
        finally:
            self.queues.pop(story_id, None)
            if not ended:
                # Cancelled (client gone) or failed: free the story's KV blocks. Not awaited, so
                # it runs even while this task is being cancelled; the engine thread orders it.
                self.thread.submit(self._abort, story_id)

    async def kv_stats(self) -> dict:
        """Block accounting, read on the engine thread."""
        return await self._call(self._stats)

    # -- the engine thread -----------------------------------------------------------------
    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def _drive(self) -> None:
        if self.driver is None or self.driver.done():
            self.driver = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self.engine.has_work():
            try:
                events = await self._call(self._step)
            except Exception as e:  # the engine broke: every waiting story fails with the cause
                for queue in self.queues.values():
                    queue.put_nowait(RuntimeError(f"MLLM engine step failed: {e!r}"))
                self.thread.submit(self.engine.abort_all)
                return
            for event in events:
                queue = self.queues.get(event["story_id"])
                if queue is not None:
                    queue.put_nowait(event)

    def _step(self) -> list[dict]:
        seen = {sid: story.seen for sid, story in self.engine.stories.items()}
        t0 = time.perf_counter()
        events = self.engine.step()
        now, seconds = time.time(), time.perf_counter() - t0
        written = sum(story.seen - seen.get(sid, 0) for sid, story in self.engine.stories.items())
        written += sum(ev.output_tokens - seen.get(ev.story_id, 0) for ev in events if isinstance(ev, StoryEnd))
        for sid in self.engine.stories:
            self.peak[sid] = max(self.peak.get(sid, 0), self.engine.story_blocks(sid))
        self.m_blocks.set(self.engine.blocks_in_use())
        self.m_stories.set(len(self.engine.stories))
        self.m_tps.set(written / seconds if seconds > 0 else 0.0)
        if written > 0:
            self.m_tokens.inc(written)
        return [self._as_dict(ev, now) for ev in events]

    def _as_dict(self, ev: CaptionEvent | SegmentEvent | StoryEnd, now: float) -> dict:
        if isinstance(ev, CaptionEvent):
            return {"kind": "caption", "story_id": ev.story_id, "index": ev.index, "at": now,
                    "caption_ids": ev.caption_ids, "caption": self.text.decode(ev.caption_ids).strip()}
        if isinstance(ev, SegmentEvent):
            return {"kind": "segment", "story_id": ev.story_id, "index": ev.index, "at": now,
                    "codes": ev.codes}
        return {"kind": "end", "story_id": ev.story_id, "at": now, "aborted": ev.aborted,
                "prompt_tokens": ev.prompt_tokens, "output_tokens": ev.output_tokens, "truncated": ev.truncated,
                "peak_blocks": self.peak.pop(ev.story_id, 0), "block_bytes": self.engine.block_bytes()}

    def _abort(self, story_id: str) -> None:
        self.engine.abort(story_id)
        self.peak.pop(story_id, None)
        self.m_blocks.set(self.engine.blocks_in_use())
        self.m_stories.set(len(self.engine.stories))

    def _stats(self) -> dict:
        return {"blocks_in_use": self.engine.blocks_in_use(), "total_blocks": self.engine.total_blocks(),
                "running_stories": len(self.engine.stories), "block_bytes": self.engine.block_bytes()}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
