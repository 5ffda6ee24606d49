"""MLLMPool: the Serve deployment that hosts the story engine (vLLM + our sink plugin).

One vLLM request per story. ``generate`` streams the engine's events (``actors/mllm/events.py``:
caption written, picture written, story ended) as the engine produces them; many stories share
one engine through continuous batching. A single background task steps the engine whenever a
story is running.

If an engine step raises, the engine's state is unknown: every running story fails with
``PoolFailure`` (the ingress resumes it on another replica), new stories are refused at once,
and ``check_health`` fails so that Serve replaces the replica (``actors/health.py``).

vLLM's ``AsyncLLM`` runs its engine core in another process (the only mode the CPU build
offers), where the scheduler's block pool cannot be read. We drive the in-process engine
from one worker thread instead: every engine call (submit, step, abort, stats) goes through
that thread, so they never interleave, and the asyncio loop stays free to stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.util import metrics

from actors.checkpoint import part_dir
from actors.health import Faults, Liveness
from actors.mllm.driver import StoryDriver
from actors.mllm.engine import EngineConfig, Sampling, StoryEngine
from actors.mllm.events import CaptionWritten, Event, StoryEnd
from actors.mllm.sink import SinkSettings
from actors.tokenizer.text import caption_text, load_text_tokenizer

log = logging.getLogger("ray.serve")


# Replicas, resources, autoscaling, max_ongoing_requests and health checks: ray_config.yaml.
@serve.deployment(name="MLLMPool")
class MLLMPool:
    def __init__(
        self,
        checkpoint: str,
        sink: dict,
        max_stories: int = 8,
        max_story_segments: int = 32,
        kv_blocks: int | None = None,
        stall_s: float = 120.0,
    ):
        config = EngineConfig(
            checkpoint,
            SinkSettings(**sink),
            max_stories=max_stories,
            max_story_segments=max_story_segments,
            kv_blocks=kv_blocks,
        )
        self.engine = StoryEngine(config)
        self.driver = StoryDriver(self.engine)  # steps it and fills each StoryEnd's KV footprint
        self.text = load_text_tokenizer(part_dir(checkpoint, "tokenizer"))
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self.queues: dict[str, asyncio.Queue] = {}
        self.stepping: asyncio.Task | None = None  # the background task that steps while stories run
        self.liveness = Liveness("mllm", stall_s, ray.get_runtime_context().get_actor_id() or "")
        self.faults = Faults()
        self.m_blocks = metrics.Gauge("seedstory_kv_blocks_in_use", "KV blocks held by running stories")
        self.m_stories = metrics.Gauge("seedstory_mllm_stories", "stories running in the engine")
        self.m_tokens = metrics.Counter("seedstory_mllm_output_tokens", "tokens written by the MLLM")
        self.m_tps = metrics.Gauge("seedstory_mllm_tokens_per_s", "output tokens per second, last step")

    # -- the API ---------------------------------------------------------------------------
    async def generate(
        self,
        story_id: str,
        prompt_ids: list[int],
        segments: int,
        sampling: dict,
        given: dict[int, np.ndarray] | None = None,
    ) -> AsyncIterator[Event]:
        """Stream one story's events (CaptionWritten, PictureWritten, then StoryEnd), in order.
        ``given``: the prompt's given pictures (position of the first query row -> features).
        Raises ``PoolFailure`` if the engine breaks (``refused`` if it was broken already)."""
        self.liveness.refuse_if_broken()
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[story_id] = queue  # before submit: the stepping task may step before we return
        ended = False
        try:
            self.liveness.work_arrived(was_idle=not self.engine.has_work())
            await self._call(self.engine.submit, story_id, prompt_ids, segments, Sampling(**sampling), given)
            self._drive()
            while not ended:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                ended = isinstance(event, StoryEnd)
                yield event
        finally:
            self.queues.pop(story_id, None)
            if not ended and not self.liveness.broken:
                # Cancelled (client gone) or failed: free the story's KV blocks. Not awaited, so
                # it runs even while this task is being cancelled; the engine thread orders it.
                self.thread.submit(self._abort, story_id)

    async def kv_stats(self) -> dict:
        """Block accounting, read on the engine thread."""
        return await self._call(self._stats)

    async def check_health(self) -> None:
        """Serve replaces this replica if its engine broke or stopped stepping with stories waiting."""
        self.liveness.check(pending=bool(self.queues))

    def arm_fault(self, steps: int = 1) -> None:
        """Test-only (SEEDSTORY_TEST_FAULTS=1): the steps-th next engine step raises."""
        self.faults.arm(steps)

    # -- the engine thread -----------------------------------------------------------------
    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def _drive(self) -> None:
        if self.stepping is None or self.stepping.done():
            self.stepping = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self.engine.has_work():
            try:
                events = await self._call(self._step)
            except Exception as e:
                self._break(e)
                return
            self.liveness.progressed()
            for event in events:
                queue = self.queues.get(event.story_id)
                if queue is not None:
                    queue.put_nowait(event)

    def _break(self, error: Exception) -> None:
        """The engine raised: its state is unknown, so this replica takes no more stories. Every
        running story fails with PoolFailure (the ingress resumes it elsewhere), and the next
        health check asks Serve for a fresh replica."""
        log.error(f"MLLM engine step failed; replica out of service: {error!r}")
        failure = self.liveness.fail(f"engine step failed: {type(error).__name__}")
        for queue in self.queues.values():
            queue.put_nowait(failure)

    def _step(self) -> list[Event]:
        self.faults.tick()
        step = self.driver.step()
        self.m_blocks.set(step.blocks_in_use)
        self.m_stories.set(step.running)
        self.m_tps.set(step.tokens_per_s)
        if step.tokens > 0:
            self.m_tokens.inc(step.tokens)
        for ev in step.events:
            if isinstance(ev, CaptionWritten):  # its text: the engine knows ids only
                ev.caption = caption_text(self.text, ev.caption_ids)
        return step.events

    def _abort(self, story_id: str) -> None:
        self.driver.abort(story_id)
        self.m_blocks.set(self.engine.blocks_in_use())
        self.m_stories.set(len(self.engine.running()))

    def _stats(self) -> dict:
        return {
            "blocks_in_use": self.engine.blocks_in_use(),
            "total_blocks": self.engine.total_blocks(),
            "running_stories": len(self.engine.running()),
            "block_bytes": self.engine.block_bytes(),
        }

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
