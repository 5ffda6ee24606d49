"""Python clients for the story service (sync and asyncio).

    client = StoryClient("localhost:9000")
    story = client.generate("Once upon a time, Milo the red circle walks in the park.", segments=4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable

import grpc

from seedstory_client.v1.story_pb2 import Rendering, Sampling, Segment, StoryEvent, StoryRequest
from seedstory_client.v1.story_pb2_grpc import StoryServiceStub

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def build_request(caption: str, segments: int = 0, image: bytes | None = None, *, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = None, steps: int = 0, guidance: float = 0.0,
                  render_seed: int | None = None, story_so_far: Iterable[tuple[str, list[int]]] = ()) -> StoryRequest:
    """Zero for segments/steps/guidance means the server's default."""
    return StoryRequest(
        caption=caption, start_image=image or b"", segments=segments,
        sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed),
        rendering=Rendering(steps=steps, guidance=guidance, seed=render_seed),
        story_so_far=[Segment(caption=c, visual_codes=codes) for c, codes in story_so_far])


@dataclass
class StorySegment:
    index: int
    caption: str = ""
    png: bytes = b""
    visual_codes: list[int] = field(default_factory=list)
    written_at: float = 0.0     # server times (unix s), for the pipeline's timeline
    codes_at: float = 0.0
    render_start: float = 0.0
    render_end: float = 0.0


@dataclass
class Story:
    story_id: str = ""
    segments: list[StorySegment] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def add(self, ev: StoryEvent) -> None:
        """Fold one event in; raises if the server broke the ordering contract."""
        self.story_id = ev.story_id
        kind = ev.WhichOneof("event")
        if kind == "caption":
            c = ev.caption
            if c.index != len(self.segments):
                raise ValueError(f"caption {c.index} arrived after {len(self.segments)} captions")
            self.segments.append(StorySegment(c.index, c.caption, written_at=c.written_at))
        elif kind == "image":
            i = ev.image
            seg = self.segments[i.index] if i.index < len(self.segments) else None
            if seg is None or seg.png or any(not s.png for s in self.segments[:i.index]):
                raise ValueError(f"image {i.index} arrived out of order")
            seg.png, seg.visual_codes = i.png, list(i.visual_codes)
            seg.codes_at, seg.render_start, seg.render_end = i.codes_at, i.render_start, i.render_end
        elif kind == "done":
            self.stats = {f.name: v for f, v in ev.done.ListFields()}

    @property
    def complete(self) -> bool:
        return bool(self.stats) and all(s.png for s in self.segments)


class StoryStreamError(grpc.RpcError):
    """``generate``'s stream ended with an error status. ``story`` holds what arrived before it, so a
    story cut short midway (a deadline, ``OUT_OF_RANGE``, a lost server) keeps its segments. It stays
    a ``grpc.RpcError`` (``code()``, ``details()``, ``trailing_metadata()`` are the call's), so code
    that caught that before still does."""

    def __init__(self, error: grpc.RpcError, story: Story):
        self.error, self.story = error, story
        super().__init__(f"{self.code().name}: {self.details()} "
                         f"(after {len(story.segments)} segments, {sum(bool(s.png) for s in story.segments)} pictures)")

    def code(self) -> grpc.StatusCode:
        return self.error.code()

    def details(self) -> str:
        return self.error.details()

    def trailing_metadata(self):
        return self.error.trailing_metadata()


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

    def generate(self, caption: str, segments: int = 0, image: bytes | None = None, *,
                 timeout: float | None = None, on_event: Callable[[StoryEvent], None] | None = None,
                 **options) -> Story:
        """The whole story; raises ``StoryStreamError`` (holding the partial story) if the stream fails."""
        story = Story()
        try:
            for ev in self.stream(build_request(caption, segments, image, **options), timeout):
                story.add(ev)
                if on_event:
                    on_event(ev)
        except grpc.RpcError as e:
            raise StoryStreamError(e, story) from e
        return story

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

    async def generate(self, caption: str, segments: int = 0, image: bytes | None = None, *,
                       timeout: float | None = None, on_event: Callable[[StoryEvent], None] | None = None,
                       **options) -> Story:
        """As ``StoryClient.generate``: a failed stream raises ``StoryStreamError`` with the partial story."""
        story = Story()
        try:
            async for ev in self.stream(build_request(caption, segments, image, **options), timeout):
                story.add(ev)
                if on_event:
                    on_event(ev)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            raise StoryStreamError(e, story) from e
        return story

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
