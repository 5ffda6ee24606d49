"""StoryIngress: the gRPC servicer (behind Serve's gRPC proxy) that orchestrates one story.

    1. check the request (INVALID_ARGUMENT), the token (UNAUTHENTICATED) and the load (RESOURCE_EXHAUSTED)
    2. TokenizerPool: caption (+ start image, + story so far) -> prompt ids, and the features of
       the pictures the request gave as images (by the position of their first query row)
    3. MLLMPool: stream the story; send each caption on at once, and each finished picture's
       features to the DetokenizerPool at once, while the MLLM goes on with the next segment
    4. deliver the rendered pictures in order, then the story's stats

A lost replica does not end the story (``cluster/recovery.py`` holds the policy). The ingress keeps
the story's exact state, the tokens the MLLM wrote for every event it passed on and the given
pictures' features, so when the MLLMPool replica dies or its engine breaks, it resumes the story
on a live replica from prompt + those tokens, the given rows unchanged (a picture the MLLM wrote
is recomputed from its ids), and the client's stream goes on: every segment once, in order (with
greedy sampling the same ids; the later pictures' features to float rounding, docs/serving.md).
Renders lost with a DetokenizerPool replica are sent again (a picture depends only on its
features and seed), and a lost tokenizer call is retried. Past ``max_resumes`` losses, or with
no replica back within ``resume_deadline_s``, the story ends with UNAVAILABLE naming the stage.

If the client cancels, disconnects or runs out of deadline, Serve cancels this generator; the
``finally`` blocks cancel the MLLM stream (whose replica aborts the vLLM request and frees its
KV blocks) and every render still pending.

Every error ends the stream with a status and a short message, logged once with the story id;
a client never sees a traceback, an address or an actor id (see ``GenerateStory``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
from ray import serve
from ray.util import metrics

from actors.checkpoint import read_manifest
from actors.errors import InputError
from actors.features import to_bytes
from actors.mllm.events import CaptionWritten, Event, PictureWritten, StoryEnd
from cluster.recovery import Recovery, StageUnavailable, within
from cluster.requests import StorySpec, check_request
from cluster.settings import AppSettings
from seedstory_client.v1.story_pb2 import CaptionEvent, ImageEvent, StoryEvent, StoryStats

log = logging.getLogger("ray.serve")  # Serve writes it to the replica's log, tagged with the request id
INGRESS_LOST = (
    "ingress: the replica serving this story was lost; the segments received are final, "
    "continue the story with story_so_far"
)


class StoryError(Exception):
    """Ends a story with a status: raised by ``_fail`` once the status is on the context."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# Replicas, resources, autoscaling and max_ongoing_requests: ray_config.yaml.
@serve.deployment(name="StoryIngress")
class StoryIngress:
    def __init__(self, tokenizer, mllm, detokenizer, settings: dict):
        self.settings = AppSettings.from_args(settings)
        self.token = self.settings.token()
        self.layout = read_manifest(self.settings.checkpoint).tokens
        self.tokenizer, self.mllm, self.detokenizer = tokenizer, mllm, detokenizer
        self.active = 0
        self.m_stage = metrics.Histogram(
            "seedstory_stage_seconds",
            "per-stage latency",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
            tag_keys=("stage",),
        )
        self.m_stories = metrics.Counter("seedstory_stories", "stories by outcome", tag_keys=("outcome",))
        self.m_resumes = metrics.Counter(
            "seedstory_resumes",
            "pool replicas lost under a running story, by stage (each one resumed or retried elsewhere)",
            tag_keys=("stage",),
        )
        self.m_active = metrics.Gauge("seedstory_stories_active", "stories in flight at this ingress replica")
        self.m_renders = metrics.Gauge(
            "seedstory_render_queue", "pictures sent to the de-tokenizer, not yet back"
        )
        self.pending_renders = 0

    async def GenerateStory(self, request, grpc_context) -> AsyncIterator[StoryEvent]:
        """Every error ends the stream normally, with its status on the context: raised out of here,
        it would be logged with a traceback by this replica and by the proxy, and the proxy would
        send the client the exception's text (a traceback, with addresses and actor ids). The
        proxy takes the status from the context that travels with each event, and one already
        sent may have left without it, so the stream ends with an event that holds only the story
        id, sent after the status is set; without it the client would see OK."""
        story_id = uuid.uuid4().hex[:16]
        # If this replica dies mid-story, the proxy ends the stream with the status on the context
        # of the last event it got, if one is set; else INTERNAL with the Ray error's text (actor
        # id, pid, node address). So until the story ends, every event carries UNAVAILABLE with a
        # clean message, on which clients continue the story (seedstory_client's resume=True).
        grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
        grpc_context.set_details(INGRESS_LOST)
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
            spec = check_request(request, self.settings.limits)
        except InputError as e:
            self._fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid")
        if self.active >= self.settings.max_stories_per_replica:
            self._fail(
                grpc_context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.active} stories in flight, the limit is {self.settings.max_stories_per_replica}; "
                "retry later",
                "refused",
            )
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
        except StageUnavailable as e:
            outcome = ""
            self._fail(
                grpc_context,
                grpc.StatusCode.UNAVAILABLE,
                f"{e}; the segments sent so far are final, continue the story with story_so_far",
                "unavailable",
            )
        except Exception as e:
            outcome = ""
            log.error(f"story {story_id}: INTERNAL: {type(e).__name__}", exc_info=e)  # the details stay here
            self._fail(
                grpc_context,
                grpc.StatusCode.INTERNAL,
                f"story {story_id} failed inside the service; its log has the details",
                "error",
            )
        finally:
            self.active -= 1
            self.m_active.set(self.active)
            if outcome:
                self.m_stories.inc(tags={"outcome": outcome})
            if outcome == "cancelled":
                log.info(
                    f"story {story_id}: CANCELLED: the client cancelled, disconnected or ran out of time"
                )

    # -- checks ----------------------------------------------------------------------------
    def _authorize(self, ctx) -> None:
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        sent = dict(ctx.invocation_metadata()).get("authorization", "")
        if self.token and not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            self._fail(
                ctx, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token", "unauthenticated"
            )

    def _lost(self, story_id: str, stage: str) -> None:
        log.warning(f"story {story_id}: {stage}: a replica was lost under it; going on with another")
        self.m_resumes.inc(tags={"stage": stage})

    def _fail(self, ctx, code: grpc.StatusCode, message: str, outcome: str):
        self.m_stories.inc(tags={"outcome": outcome})
        ctx.set_code(code)
        ctx.set_details(message)
        raise StoryError(code, message)

    # -- one story -------------------------------------------------------------------------
    async def _story(self, spec: StorySpec, story_id: str, received: float, ctx) -> AsyncIterator[StoryEvent]:
        recovery = Recovery(
            self.settings.max_resumes,
            self.settings.resume_deadline_s,
            on_loss=lambda stage: self._lost(story_id, stage),
        )
        prep = await recovery.call(
            "tokenizer",
            lambda timeout: within(
                self.tokenizer.prompt.remote(
                    spec.caption, spec.caption_ids, spec.start_image, spec.story_so_far
                ),
                timeout,
            ),
        )
        tokenized = time.time()
        self.m_stage.observe(tokenized - received, tags={"stage": "tokenize"})
        if "error" in prep:
            err = prep["error"]
            self._fail(ctx, grpc.StatusCode.INVALID_ARGUMENT, f"{err['field']}: {err['message']}", "invalid")
        out: asyncio.Queue = asyncio.Queue()
        run = _StoryRun(self, spec, story_id, prep, recovery, out)
        writer = asyncio.create_task(run.write())
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            if run.end is not None and run.end.truncated:  # every segment written is delivered first
                self._fail(
                    ctx,
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"segments: the MLLM's length limit ended the story after {run.pictures} of "
                    f"{spec.segments} segments (dense attention keeps every token); ask for fewer "
                    "segments or serve a sink mode",
                    "truncated",
                )
            _context_ok(ctx)
            yield run.stats(received, tokenized)
            self.m_stage.observe(time.time() - received, tags={"stage": "story"})
        finally:
            writer.cancel()
            run.cancel()


def _context_ok(ctx) -> None:
    """The story is complete: its last event carries OK (and no longer INGRESS_LOST)."""
    ctx.set_code(grpc.StatusCode.OK)
    ctx.set_details("story complete")  # the proxy keeps the last details set: not INGRESS_LOST


def _event(story_id: str, **kind) -> StoryEvent:
    return StoryEvent(story_id=story_id, sent_at=time.time(), **kind)


class _StoryRun:
    """The two halves of one story's pipeline, writing (MLLM) and rendering (de-tokenizer), and
    the story's exact state: the tokens the MLLM wrote for every event passed on, from which (with
    the given pictures' features) a lost MLLM replica's story resumes."""

    def __init__(
        self,
        ingress: StoryIngress,
        spec: StorySpec,
        story_id: str,
        prep: dict,
        recovery: Recovery,
        out: asyncio.Queue,
    ):
        self.ingress, self.spec, self.story_id, self.recovery, self.out = (
            ingress,
            spec,
            story_id,
            recovery,
            out,
        )
        self.prompt_ids: list[int] = prep["prompt_ids"]
        # The given pictures' features by the position of their first query row: a resume sends
        # them again as they are (positions in the prompt, which a resume extends, never shifts).
        self.given: dict[int, np.ndarray] = prep["given"]
        self.opening = (prep["caption_ids"], prep["caption"])  # the request's own caption, for event 0
        self.output: list[int] = []  # tokens written for the events passed on (caption ids, pictures)
        self.captions = 0  # captions sent to the client
        self.renders: list[tuple] = []  # (index, render task, features_at, features), in segment order
        self.sent = 0  # pictures sent to the client
        self.ready = asyncio.Event()  # set when a render is added or the writing ends
        self.written = False
        self.attempts = 0
        self.stream = None
        self.end: StoryEnd | None = None
        self.tokens_before = 0  # output tokens of the attempts before the last
        self.render_s = 0.0
        self.last_at = 0.0

    @property
    def pictures(self) -> int:
        return len(self.renders)

    # -- writing ---------------------------------------------------------------------------
    async def write(self) -> None:
        deliver = asyncio.create_task(self.deliver())
        try:
            ending = None  # None: the story is complete
            try:
                await self.recovery.call("mllm", self.write_attempt)
            except StageUnavailable as e:
                ending = e  # the MLLM is gone, but the pictures it wrote are delivered first
            self.written = True
            self.ready.set()
            await deliver
            self.out.put_nowait(ending)
        except asyncio.CancelledError:
            deliver.cancel()
            raise
        except Exception as e:  # the client gets the error at once, not a hang
            deliver.cancel()
            self.out.put_nowait(e)

    async def write_attempt(self, timeout: float | None) -> None:
        """Stream the rest of the story from one MLLM replica: from the prompt plus every token
        already passed on, with the given pictures' rows, so a resumed story continues exactly where
        the client's stream is."""
        base, left = self.pictures, self.spec.segments - self.pictures
        self.tokens_before = len(self.output)
        if left == 0:  # the replica was lost after the last picture, before the end: nothing to resume
            return
        request_id = self.story_id if not self.attempts else f"{self.story_id}.r{self.attempts}"
        self.attempts += 1
        if self.stream is not None:
            self.stream.cancel()  # the lost attempt's, in case its replica still runs it
        self.stream = self.ingress.mllm.options(stream=True).generate.remote(
            request_id, self.prompt_ids + self.output, left, self.spec.sampling, given=self.given or None
        )
        events = aiter(self.stream)
        self.on_mllm(await within(anext(events), timeout), base)  # a resume waits at most `timeout`
        self.recovery.recovered("mllm")
        async for ev in events:
            self.on_mllm(ev, base)

    def on_mllm(self, ev: Event, base: int) -> None:
        """One engine event of an attempt that began after ``base`` pictures."""
        if isinstance(ev, CaptionWritten):
            self.on_caption(ev, base + ev.index)
        elif isinstance(ev, PictureWritten):
            self.output += self.ingress.layout.picture_ids  # a resume recomputes its rows from its ids
            self.start_render(base + ev.index, ev.features, ev.at)
        elif isinstance(ev, StoryEnd):
            self.end = ev

    def on_caption(self, ev: CaptionWritten, index: int) -> None:
        self.output += ev.caption_ids  # empty for a caption the prompt ended with
        if index < self.captions:  # a resume whose prompt ended with it: the client has it
            return
        ids, text = (ev.caption_ids, ev.caption) if ev.caption_ids else self.opening
        self.out.put_nowait(
            _event(
                self.story_id,
                caption=CaptionEvent(index=index, caption=text, caption_ids=ids, written_at=ev.at),
            )
        )
        self.captions += 1
        if self.last_at:
            self.ingress.m_stage.observe(ev.at - self.last_at, tags={"stage": "segment"})
        self.last_at = ev.at

    # -- rendering -------------------------------------------------------------------------
    def start_render(self, index: int, features: np.ndarray, features_at: float) -> None:
        job = {
            "features": features,
            "steps": self.spec.steps,
            "guidance": self.spec.guidance,
            "seed": self.seed(index),
        }
        task = asyncio.create_task(
            self.recovery.call(
                "detokenizer", lambda timeout: within(self.ingress.detokenizer.render.remote(job), timeout)
            )
        )
        task.add_done_callback(self.render_done)
        self.renders.append((index, task, features_at, features))
        self.ingress.pending_renders += 1
        self.ingress.m_renders.set(self.ingress.pending_renders)
        self.ready.set()

    def render_done(self, task: asyncio.Task) -> None:
        self.ingress.pending_renders -= 1
        self.ingress.m_renders.set(self.ingress.pending_renders)
        if not task.cancelled() and task.exception() is not None:
            self.out.put_nowait(task.exception())  # at once, not when delivery reaches this picture

    async def deliver(self) -> None:
        """Await the renders in segment order and send each picture as it comes back."""
        while not (self.written and self.sent == self.pictures):
            if self.sent == self.pictures:
                self.ready.clear()
                await self.ready.wait()
                continue
            index, task, features_at, features = self.renders[self.sent]
            try:
                rendered = await task
            except Exception:
                return  # render_done has passed the error on
            self.ingress.m_stage.observe(rendered["end"] - rendered["start"], tags={"stage": "render"})
            self.render_s += (rendered["end"] - rendered["start"]) / rendered["batch"]
            self.out.put_nowait(
                _event(
                    self.story_id,
                    image=ImageEvent(
                        index=index,
                        png=rendered["png"],
                        width=rendered["width"],
                        height=rendered["height"],
                        features=to_bytes(features),
                        feature_rows=features.shape[0],
                        feature_dim=features.shape[1],
                        features_at=features_at,
                        render_start=rendered["start"],
                        render_end=rendered["end"],
                    ),
                )
            )
            self.sent += 1

    def seed(self, index: int) -> int:
        base = (
            self.spec.render_seed if self.spec.render_seed is not None else zlib.crc32(self.story_id.encode())
        )
        return (base + index) % (1 << 63)

    def stats(self, received: float, tokenized: float) -> StoryEvent:
        end = self.end or StoryEnd(self.story_id, False, len(self.prompt_ids), 0, at=time.time())
        mllm_s = end.at - tokenized
        out_tokens = self.tokens_before + end.output_tokens
        return _event(
            self.story_id,
            done=StoryStats(
                prompt_tokens=len(self.prompt_ids),
                output_tokens=out_tokens,
                peak_kv_blocks=end.peak_blocks,
                kv_block_bytes=end.block_bytes,
                tokenize_s=tokenized - received,
                mllm_s=mllm_s,
                render_s=self.render_s,
                total_s=time.time() - received,
                tokens_per_s=out_tokens / mllm_s if mllm_s > 0 else 0.0,
                resumes=self.recovery.resumes,
            ),
        )

    def cancel(self) -> None:
        """Drop everything still in flight: the MLLM stream (frees the KV blocks) and pending renders."""
        if self.stream is not None:
            self.stream.cancel()
        for _, task, _, _ in self.renders[self.sent :]:
            task.cancel()
        self.sent = self.pictures
