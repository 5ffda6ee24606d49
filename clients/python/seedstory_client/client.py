"""Python clients for the story service (sync and asyncio).

    client = StoryClient("localhost:9000")
    story = client.generate(
        "Once upon a time, Milo the red circle walks in the park.", segments=4, resume=True
    )

A story cut short can be continued exactly: ``continuation_request(story)`` is what to send for the
segments still missing, and ``continue_story`` sends it and folds the answer into the same ``Story``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from seedstory_client.v1.story_pb2 import (
    CaptionEvent,
    ImageEvent,
    Rendering,
    Sampling,
    Segment,
    StoryEvent,
    StoryRequest,
)
from seedstory_client.v1.story_pb2_grpc import StoryServiceStub

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
DEFAULT_SEGMENTS = 10  # what `segments = 0` asks for (story.proto); a continuation must say how many are left
RESUME_DELAY_S = 0.5  # before the first continuation, doubled for each next: a lost ingress needs a moment

log = logging.getLogger("seedstory_client")


def build_request(
    caption: str,
    segments: int = 0,
    image: bytes | None = None,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    steps: int = 0,
    guidance: float = 0.0,
    render_seed: int | None = None,
    story_so_far: Iterable[tuple[str, bool | bytes]] = (),
) -> StoryRequest:
    """Zero for segments/steps/guidance means the server's default. ``story_so_far``: earlier
    segments as ``(caption, picture)``, the picture ``True`` when the service wrote it (its ids
    recompute it) or given as PNG/JPEG bytes."""
    return StoryRequest(
        caption=caption,
        start_image=image or b"",
        segments=segments,
        sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed),
        rendering=Rendering(steps=steps, guidance=guidance, seed=render_seed),
        story_so_far=[_segment(caption, picture) for caption, picture in story_so_far],
    )


def _segment(caption: str, picture: bool | bytes) -> Segment:
    """An earlier segment: its picture written by the service (``True``) or given as image bytes.
    ``False`` sets neither, which the service refuses (``story_so_far[i].picture``)."""
    if isinstance(picture, bytes | bytearray):
        return Segment(caption=caption, image=bytes(picture))
    return Segment(caption=caption, written=True) if picture else Segment(caption=caption)


@dataclass
class StorySegment:
    index: int
    caption: str = ""
    png: bytes = b""
    # The picture's features as the service sent them: feature_rows x feature_dim little-endian
    # float32 values, row-major (story.proto's ImageEvent); they render the picture again.
    features: bytes = b""
    caption_ids: list[int] = field(default_factory=list)  # the exact ids: a continuation is token for token
    feature_rows: int = 0
    feature_dim: int = 0
    written_at: float = 0.0  # server times (unix s), for the pipeline's timeline
    features_at: float = 0.0
    render_start: float = 0.0
    render_end: float = 0.0


@dataclass
class Story:
    """One story, possibly received over several streams: after a continuation request the server
    counts segments from 0 again, and ``add`` folds them in at the story's own indexes."""

    story_id: str = ""  # the first stream's
    segments: list[StorySegment] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # the last stream's
    request: StoryRequest | None = None  # the request the story answers (its first), to continue it
    resumes: int = 0  # continuation requests sent after a stream failed
    continuation_ids: list[str] = field(default_factory=list)  # their story ids
    _base: int = field(default=0, init=False, repr=False, compare=False)  # story index of this stream's 0
    _captions: int = field(default=0, init=False, repr=False, compare=False)  # captions this stream has sent

    def start_stream(self) -> None:
        """The next events answer a new request: for ``continuation_request(self)``, its segment 0 is
        the first one without a picture here."""
        self._base, self._captions = self.pictures, 0

    def add(self, event: StoryEvent) -> StoryEvent:
        """Fold one event in; returns it with the index counted in the whole story. Raises if the server
        broke the ordering contract."""
        self._note_id(event.story_id)
        kind = event.WhichOneof("event")
        if kind == "caption":
            self._add_caption(event.caption)
        elif kind == "image":
            self._add_image(event.image)
        elif kind == "done":
            self.stats = {f.name: v for f, v in event.done.ListFields()}
        if not self._base or kind not in ("caption", "image"):
            return event
        folded = StoryEvent()
        folded.CopyFrom(event)
        getattr(folded, kind).index += self._base
        return folded

    def _note_id(self, story_id: str) -> None:
        if not self.story_id:
            self.story_id = story_id
        elif story_id and story_id not in (self.story_id, *self.continuation_ids):
            self.continuation_ids.append(story_id)

    def _add_caption(self, event: CaptionEvent) -> None:
        if event.index != self._captions:
            raise ValueError(f"caption {event.index} arrived after {self._captions} captions")
        self._captions += 1
        at = self._base + event.index
        if at == len(self.segments):
            self.segments.append(
                StorySegment(
                    at, event.caption, caption_ids=list(event.caption_ids), written_at=event.written_at
                )
            )
        else:  # a continuation writes again the captions that had arrived without their picture
            seg = self.segments[at]
            seg.caption, seg.caption_ids = event.caption, list(event.caption_ids)
            seg.written_at = event.written_at

    def _add_image(self, event: ImageEvent) -> None:
        at = self._base + event.index
        if event.index >= self._captions or self.segments[at].png or at != self.pictures:
            raise ValueError(f"image {event.index} arrived out of order")
        seg = self.segments[at]
        seg.png, seg.features = event.png, event.features
        seg.feature_rows, seg.feature_dim = event.feature_rows, event.feature_dim
        seg.features_at, seg.render_start, seg.render_end = (
            event.features_at,
            event.render_start,
            event.render_end,
        )

    @property
    def pictures(self) -> int:
        """Segments complete with their picture (pictures arrive in order, so they lead)."""
        return sum(bool(s.png) for s in self.segments)

    @property
    def complete(self) -> bool:
        return bool(self.stats) and all(s.png for s in self.segments)


class CannotContinue(ValueError):
    """``continuation_request`` has nothing to send, or could not make it exact."""


def continuation_request(story: Story) -> StoryRequest:
    """What to send for the segments ``story`` still misses, so that with its answer folded in
    (``Story.start_stream``, ``Story.add``) it is the story its ``request`` asked for:

    - ``story_so_far``: the request's own, then the opening caption with its start image if it had
      one, then every segment whose picture arrived (by caption ids, ``written``: the service
      recomputes those pictures from the ids);
    - the opening: the caption that arrived without its picture, else none (the MLLM writes the next);
    - ``segments``: those still missing; sampling and rendering as asked, the render seed moved on by
      the segments complete, since the server renders picture i with seed ``render_seed + i``.

    Before any picture has arrived it is the request itself. Raises ``CannotContinue``."""
    original, done = story.request, story.pictures
    if original is None:
        raise CannotContinue("the story does not hold the request it answers")
    if not done:
        return _copy(original)
    missing = (original.segments or DEFAULT_SEGMENTS) - done
    if missing <= 0:
        raise CannotContinue(f"every one of the {done} segments asked for has its picture")
    pending = story.segments[done] if done < len(story.segments) else StorySegment(done)
    request = StoryRequest(
        **_caption_of(pending),
        segments=missing,
        sampling=original.sampling,
        rendering=original.rendering,
        story_so_far=[
            *original.story_so_far,
            *_start(original),
            *(Segment(**_caption_of(s), written=True) for s in story.segments[:done]),
        ],
    )
    if original.rendering.HasField("seed"):
        request.rendering.seed = original.rendering.seed + done
    return request


def _start(request: StoryRequest) -> list[Segment]:
    """The request's opening caption and start image as an earlier segment (none without a start
    image: then the opening caption is the story's segment 0). The image goes again as the same
    bytes, which the service encodes to features again."""
    if not request.start_image:
        return []
    return [Segment(caption=request.caption, caption_ids=request.caption_ids, image=request.start_image)]


def _caption_of(segment: StorySegment) -> dict:
    """A caption as a request carries it: its exact ids when the server gave them, else its text. Not
    both: the ids are what counts, and the text would be checked against limits made for people's
    captions (a model may write a longer one)."""
    return {"caption_ids": segment.caption_ids} if segment.caption_ids else {"caption": segment.caption}


def _copy(request: StoryRequest) -> StoryRequest:
    out = StoryRequest()
    out.CopyFrom(request)
    return out


class StoryStreamError(grpc.RpcError):
    """``generate``'s stream ended with an error status. ``story`` holds what arrived before it, so a
    story cut short midway (a deadline, ``OUT_OF_RANGE``, a lost server) keeps its segments. It stays
    a ``grpc.RpcError`` (``code()``, ``details()``, ``trailing_metadata()`` are the call's), so code
    that caught that before still does."""

    def __init__(self, error: grpc.RpcError, story: Story):
        self.error, self.story = error, story
        super().__init__(
            f"{self.code().name}: {self.details()} "
            f"(after {len(story.segments)} segments, {story.pictures} pictures)"
        )

    def code(self) -> grpc.StatusCode:
        return self.error.code()

    def details(self) -> str:
        return self.error.details()

    def trailing_metadata(self):
        return self.error.trailing_metadata()


class _Streams:
    """The requests of one ``continue_story``: the first, then after each stream lost with
    ``UNAVAILABLE`` (with ``resume``) a continuation. The clients only loop over its streams."""

    def __init__(
        self,
        story: Story,
        resume: bool,
        max_resumes: int,
        timeout: float | None,
        on_event: Callable[[StoryEvent], None] | None,
    ):
        self.story, self.on_event = story, on_event
        self.left, self.sent = (max_resumes if resume else 0), 0  # continuations left and sent
        self.deadline = None if timeout is None else time.monotonic() + timeout  # one budget for all streams
        self.cause: grpc.RpcError | None = None  # the failure the current continuation answers
        self.request = continuation_request(story)
        if story.segments:  # continuing a story received before (read from disk) is a resume too
            story.resumes += 1
        story.start_stream()

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def add(self, event: StoryEvent) -> None:
        folded = self.story.add(event)
        if self.on_event:
            self.on_event(folded)

    def failed(self, error: grpc.RpcError) -> float:
        """After a stream failed: the seconds to wait before sending ``self.request``, now the
        continuation; raises ``StoryStreamError`` (with the story so far) when there is none to send."""
        if self.cause is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            # The server refused the continuation (say, more story so far than it takes): what the
            # caller needs to know is why the story stopped.
            raise StoryStreamError(self.cause, self.story) from error
        delay = RESUME_DELAY_S * 2**self.sent
        if (
            error.code() != grpc.StatusCode.UNAVAILABLE
            or not self.left
            or (self.deadline is not None and time.monotonic() + delay >= self.deadline)
        ):
            raise StoryStreamError(error, self.story) from error
        try:
            self.request = continuation_request(self.story)
        except CannotContinue:
            raise StoryStreamError(error, self.story) from error
        self.left, self.sent, self.cause = self.left - 1, self.sent + 1, error
        self.story.resumes += 1
        self.story.start_stream()
        log.warning(
            "story %s: %s: %s after %d pictures; continuing with the %d missing (resume %d)",
            self.story.story_id,
            error.code().name,
            error.details(),
            self.story.pictures,
            self.request.segments,
            self.story.resumes,
        )
        return delay


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


class StoryClient:
    def __init__(self, target: str = "localhost:9000", token: str | None = None):
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = StoryServiceStub(self.channel)
        self.token = token

    def stream(self, request: StoryRequest, timeout: float | None = None):
        """The raw event stream: iterate it; ``.cancel()`` ends the story on the server."""
        return self.stub.GenerateStory(request, timeout=timeout, metadata=_metadata(self.token))

    def generate(
        self,
        caption: str,
        segments: int = 0,
        image: bytes | None = None,
        *,
        timeout: float | None = None,
        on_event: Callable[[StoryEvent], None] | None = None,
        resume: bool = False,
        max_resumes: int = 3,
        **options,
    ) -> Story:
        """The whole story; raises ``StoryStreamError`` (holding the partial story) if the stream fails.
        With ``resume``, a stream lost with ``UNAVAILABLE`` is continued (``continue_story``)."""
        story = Story(request=build_request(caption, segments, image, **options))
        return self.continue_story(
            story, timeout=timeout, on_event=on_event, resume=resume, max_resumes=max_resumes
        )

    def continue_story(
        self,
        story: Story,
        *,
        timeout: float | None = None,
        on_event: Callable[[StoryEvent], None] | None = None,
        resume: bool = False,
        max_resumes: int = 3,
    ) -> Story:
        """Sends ``continuation_request(story)`` and folds the answer into ``story``; with ``resume``,
        up to ``max_resumes`` more after streams lost with ``UNAVAILABLE``. ``timeout`` covers them
        all; ``on_event`` sees each event with its index in the whole story."""
        streams = _Streams(story, resume, max_resumes, timeout, on_event)
        while True:
            try:
                for event in self.stream(streams.request, streams.timeout()):
                    streams.add(event)
                return story
            except grpc.RpcError as error:
                delay = streams.failed(error)
            time.sleep(delay)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncStoryClient:
    def __init__(self, target: str = "localhost:9000", token: str | None = None):
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = StoryServiceStub(self.channel)
        self.token = token

    def stream(self, request: StoryRequest, timeout: float | None = None) -> AsyncIterator[StoryEvent]:
        return self.stub.GenerateStory(request, timeout=timeout, metadata=_metadata(self.token))

    async def generate(
        self,
        caption: str,
        segments: int = 0,
        image: bytes | None = None,
        *,
        timeout: float | None = None,
        on_event: Callable[[StoryEvent], None] | None = None,
        resume: bool = False,
        max_resumes: int = 3,
        **options,
    ) -> Story:
        """As ``StoryClient.generate``: a failed stream raises ``StoryStreamError`` with the partial story."""
        story = Story(request=build_request(caption, segments, image, **options))
        return await self.continue_story(
            story, timeout=timeout, on_event=on_event, resume=resume, max_resumes=max_resumes
        )

    async def continue_story(
        self,
        story: Story,
        *,
        timeout: float | None = None,
        on_event: Callable[[StoryEvent], None] | None = None,
        resume: bool = False,
        max_resumes: int = 3,
    ) -> Story:
        """As ``StoryClient.continue_story``."""
        streams = _Streams(story, resume, max_resumes, timeout, on_event)
        while True:
            try:
                async for event in self.stream(streams.request, streams.timeout()):
                    streams.add(event)
                return story
            except grpc.RpcError as error:  # grpc.aio.AioRpcError is one
                delay = streams.failed(error)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
