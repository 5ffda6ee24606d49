"""StoryIngress: the gRPC servicer (behind Serve's gRPC proxy) that orchestrates one story.

    1. check the request (INVALID_ARGUMENT), the token (UNAUTHENTICATED) and the load (RESOURCE_EXHAUSTED)
    2. TokenizerPool: caption (+ start image, + story so far) -> prompt ids
    3. MLLMPool: stream the story; send each caption on at once, and each finished picture's
       codes to the DetokenizerPool at once, while the MLLM goes on with the next segment
    4. deliver the rendered pictures in order, then the story's stats

If the client cancels, disconnects or runs out of deadline, Serve cancels this generator; the
``finally`` blocks cancel the MLLM stream (whose replica aborts the vLLM request and frees its
KV blocks) and every render still pending.

A client error (bad request, token, load, a truncated story) ends the stream with its status and
one log line, never a traceback: see ``GenerateStory``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
import zlib
from typing import AsyncIterator

import grpc
from ray import serve
from ray.util import metrics
from seedstory_client.v1.story_pb2 import CaptionEvent, ImageEvent, StoryEvent, StoryStats

from actors.checkpoint import read_manifest
from cluster.app import AppSettings
from cluster.requests import InvalidRequest, StorySpec, check_request


log = logging.getLogger("ray.serve")  # Serve writes it to the replica's log, tagged with the request id


class StoryError(Exception):
    """A client error, raised by ``_fail`` once its gRPC status is on the context."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# Replicas, resources, autoscaling and max_ongoing_requests: ray_config.yaml.
@serve.deployment(name="StoryIngress")
class StoryIngress:
    def __init__(self, tokenizer, mllm, detokenizer, settings: dict):
        self.settings = AppSettings.from_args(settings)
        self.token = self.settings.token()
        manifest = read_manifest(self.settings.checkpoint)
        self.shape = (manifest.num_queries, manifest.codebook_size)
        self.tokenizer, self.mllm, self.detokenizer = tokenizer, mllm, detokenizer
        self.active = 0
        self.m_stage = metrics.Histogram("seedstory_stage_seconds", "per-stage latency",
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
                                         tag_keys=("stage",))
        self.m_stories = metrics.Counter("seedstory_stories", "stories by outcome", tag_keys=("outcome",))
        self.m_active = metrics.Gauge("seedstory_stories_active", "stories in flight at this ingress replica")
        self.m_renders = metrics.Gauge("seedstory_render_queue", "pictures sent to the de-tokenizer, not yet back")
        self.pending_renders = 0

    async def GenerateStory(self, request, grpc_context) -> AsyncIterator[StoryEvent]:
        """Client errors end the stream normally: raised out of here, each would be logged with a
        traceback by this replica and by the proxy. The proxy takes the status from the context
        that travels with each event, and one already sent may have left without it, so the stream
        ends with an event that holds only the story id, sent after the status is set; without it
        the client would see OK."""
        story_id = uuid.uuid4().hex[:16]
        try:
            async for event in self._serve(request, story_id, grpc_context):
                yield event
        except StoryError as e:
            log.warning(f"story {story_id}: {e.code.name}: {e}")
            yield _event(story_id)

    async def _serve(self, request, story_id: str, grpc_context) -> AsyncIterator[StoryEvent]:
        received = time.time()
        self._authorize(grpc_context)
        try:
            spec = check_request(request, self.settings.limits, *self.shape)
        except InvalidRequest as e:
            self._fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid")
        if self.active >= self.settings.max_stories_per_replica:
            self._fail(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"{self.active} stories in flight, the limit is {self.settings.max_stories_per_replica}; "
                       "retry later", "refused")
        self.active += 1
        self.m_active.set(self.active)
        outcome = "cancelled"  # stays so if Serve cancels us (client gone, deadline)
        try:
            async for event in self._story(spec, story_id, received, grpc_context):
                yield event
            outcome = "ok"
        except StoryError:
            outcome = ""  # counted by _fail
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            self.active -= 1
            self.m_active.set(self.active)
            if outcome:
                self.m_stories.inc(tags={"outcome": outcome})
            if outcome == "cancelled":
                log.info(f"story {story_id}: CANCELLED: the client cancelled, disconnected or ran out of time")

    # -- checks ----------------------------------------------------------------------------
    def _authorize(self, ctx) -> None:
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        sent = dict(ctx.invocation_metadata()).get("authorization", "")
        if self.token and not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            self._fail(ctx, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token", "unauthenticated")

    def _fail(self, ctx, code: grpc.StatusCode, message: str, outcome: str):
        self.m_stories.inc(tags={"outcome": outcome})
        ctx.set_code(code)
        ctx.set_details(message)
        raise StoryError(code, message)

    # -- one story -------------------------------------------------------------------------
    async def _story(self, spec: StorySpec, story_id: str, received: float, ctx) -> AsyncIterator[StoryEvent]:
        prep = await self.tokenizer.prompt.remote(spec.caption, spec.start_image, spec.story_so_far)
        tokenized = time.time()
        self.m_stage.observe(tokenized - received, tags={"stage": "tokenize"})
        if "error" in prep:
            err = prep["error"]
            self._fail(ctx, grpc.StatusCode.INVALID_ARGUMENT, f"{err['field']}: {err['message']}", "invalid")
        out: asyncio.Queue = asyncio.Queue()
        run = _StoryRun(self, spec, story_id, out)
        writer = asyncio.create_task(run.write(prep["prompt_ids"]))
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            if run.end.get("truncated"):  # every segment written is delivered first, then the error
                self._fail(ctx, grpc.StatusCode.OUT_OF_RANGE,
                           f"segments: the MLLM's length limit ended the story after {len(run.renders)} of "
                           f"{spec.segments} segments (dense attention keeps every token); ask for fewer "
                           "segments or serve a sink mode", "truncated")
            yield run.stats(received, tokenized)
            self.m_stage.observe(time.time() - received, tags={"stage": "story"})
        finally:
            writer.cancel()
            run.cancel()


def _event(story_id: str, **kind) -> StoryEvent:
    return StoryEvent(story_id=story_id, sent_at=time.time(), **kind)


class _StoryRun:
    """The two halves of one story's pipeline: writing (MLLM) and rendering (de-tokenizer)."""

    def __init__(self, ingress: StoryIngress, spec: StorySpec, story_id: str, out: asyncio.Queue):
        self.ingress, self.spec, self.story_id, self.out = ingress, spec, story_id, out
        self.renders: list[tuple] = []  # (index, DeploymentResponse, codes_at, codes), in segment order
        self.sent = 0                   # renders delivered to the client
        self.ready = asyncio.Event()   # set when a render is added or the writing ends
        self.written = False
        self.stream = None
        self.end: dict = {}
        self.render_s = 0.0
        self.last_at = 0.0

    async def write(self, prompt_ids: list[int]) -> None:
        deliver = asyncio.create_task(self.deliver())
        try:
            self.stream = self.ingress.mllm.options(stream=True).generate.remote(
                self.story_id, prompt_ids, self.spec.segments, self.spec.sampling)
            async for ev in self.stream:
                self.on_mllm(ev)
            self.written = True
            self.ready.set()
            await deliver
            self.out.put_nowait(None)
        except asyncio.CancelledError:
            deliver.cancel()
            raise
        except Exception as e:  # a pool failed: the client gets the error, not a hang
            deliver.cancel()
            self.out.put_nowait(e)

    def on_mllm(self, ev: dict) -> None:
        if ev["kind"] == "caption":
            caption = ev["caption"] if ev["caption_ids"] else self.spec.caption  # empty: the client's own
            self.out.put_nowait(_event(self.story_id, caption=CaptionEvent(
                index=ev["index"], caption=caption, caption_ids=ev["caption_ids"], written_at=ev["at"])))
            if self.last_at:
                self.ingress.m_stage.observe(ev["at"] - self.last_at, tags={"stage": "segment"})
            self.last_at = ev["at"]
        elif ev["kind"] == "segment":
            job = {"codes": ev["codes"], "steps": self.spec.steps, "guidance": self.spec.guidance,
                   "seed": self.seed(ev["index"])}
            self.renders.append((ev["index"], self.ingress.detokenizer.render.remote(job), ev["at"], ev["codes"]))
            self.ingress.pending_renders += 1
            self.ingress.m_renders.set(self.ingress.pending_renders)
            self.ready.set()
        else:
            self.end = ev

    async def deliver(self) -> None:
        """Await the renders in segment order and send each picture as it comes back."""
        while not (self.written and self.sent == len(self.renders)):
            if self.sent == len(self.renders):
                self.ready.clear()
                await self.ready.wait()
                continue
            index, response, codes_at, codes = self.renders[self.sent]
            img = await response
            self.ingress.pending_renders -= 1
            self.ingress.m_renders.set(self.ingress.pending_renders)
            self.ingress.m_stage.observe(img["end"] - img["start"], tags={"stage": "render"})
            self.render_s += (img["end"] - img["start"]) / img["batch"]
            self.out.put_nowait(_event(self.story_id, image=ImageEvent(
                index=index, png=img["png"], visual_codes=codes, width=img["width"], height=img["height"],
                codes_at=codes_at, render_start=img["start"], render_end=img["end"])))
            self.sent += 1

    def seed(self, index: int) -> int:
        base = self.spec.render_seed if self.spec.render_seed is not None else zlib.crc32(self.story_id.encode())
        return (base + index) % (1 << 63)

    def stats(self, received: float, tokenized: float) -> StoryEvent:
        end = self.end
        mllm_s = end.get("at", tokenized) - tokenized
        out_tokens = end.get("output_tokens", 0)
        return _event(self.story_id, done=StoryStats(
            prompt_tokens=end.get("prompt_tokens", 0), output_tokens=out_tokens,
            peak_kv_blocks=end.get("peak_blocks", 0), kv_block_bytes=end.get("block_bytes", 0),
            tokenize_s=tokenized - received, mllm_s=mllm_s, render_s=self.render_s,
            total_s=time.time() - received, tokens_per_s=out_tokens / mllm_s if mllm_s > 0 else 0.0))

    def cancel(self) -> None:
        """Drop everything still in flight: the MLLM stream (frees the KV blocks) and pending renders."""
        if self.stream is not None:
            self.stream.cancel()
        for _, response, _, _ in self.renders[self.sent:]:
            response.cancel()
        self.ingress.pending_renders -= len(self.renders) - self.sent
        self.ingress.m_renders.set(self.ingress.pending_renders)
        self.sent = len(self.renders)
