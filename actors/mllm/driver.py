"""The one loop that drives a ``StoryEngine``: step it, and keep the books its callers read.

The MLLMPool (Serve), the bulk job, the eval, the benchmarks and the tests all step the engine
through a ``StoryDriver`` (``run``/``drain`` write stories to the end). Per step it reports the
events, the output tokens written, the seconds the engine step took and the KV blocks in use after
it; per story it keeps the most KV blocks the story held at once and writes that (with the bytes
per block) into the story's ``StoryEnd``, so every caller sees the same footprint.

The driver sits above the engine: it needs only the part of it that ``Engine`` names, and keeps its
books from what each engine step reports, so the engine never needs the driver.

The driver is not thread-safe: like the engine, it belongs to the thread that steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from actors.mllm.events import Event, PictureWritten, StoryEnd

if TYPE_CHECKING:
    from actors.mllm.engine import EngineStep, Sampling


class Engine(Protocol):
    """The part of ``StoryEngine`` the driver uses. Anything of this shape can be driven: the
    tests drive a scripted engine, with no vLLM."""

    def submit(self, story_id: str, prompt_ids: list[int], segments: int, sampling: Sampling = ...) -> None:
        """Start a story (``sampling`` left out: the engine's default)."""
        ...

    def step(self) -> EngineStep:
        """One engine step: its events, the tokens each story wrote, the blocks each running story holds."""
        ...

    def abort(self, story_id: str) -> StoryEnd | None: ...

    def has_work(self) -> bool: ...

    def running(self) -> list[str]:
        """The stories running now, in the order they were submitted."""
        ...

    def blocks_in_use(self) -> int: ...

    def block_bytes(self) -> int: ...


@dataclass
class Step:
    """What one engine step did."""

    events: list[Event]
    tokens: int  # output tokens written in the step, over every story
    seconds: float  # wall time of the engine step alone
    blocks_in_use: int  # KV blocks held by running stories after the step
    running: int  # stories still running after the step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Drained:
    """Every story run to its end: what ``StoryDriver.drain`` returns."""

    pictures: dict[str, list[PictureWritten]]  # per story, in segment order
    ends: dict[str, StoryEnd] = field(default_factory=dict)
    tokens: int = 0  # output tokens written while draining
    seconds: float = 0.0  # wall time from the first step to the last
    peak_blocks_in_use: int = 0  # most KV blocks of the pool in use after any step

    def add(self, step: Step) -> None:
        for ev in step.events:
            if isinstance(ev, PictureWritten):
                self.pictures.setdefault(ev.story_id, []).append(ev)
            elif isinstance(ev, StoryEnd):
                self.ends[ev.story_id] = ev
        self.tokens += step.tokens
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, step.blocks_in_use)


class StoryDriver:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.block_bytes = engine.block_bytes()  # fixed by the KV spec for the engine's life
        self.peak: dict[str, int] = {}  # running story -> most blocks it has held

    def step(self) -> Step:
        started = time.perf_counter()
        report = self.engine.step()
        seconds = time.perf_counter() - started
        for story_id, blocks in report.held_blocks.items():
            self.peak[story_id] = max(self.peak.get(story_id, 0), blocks)
        for ev in report.events:
            if isinstance(ev, StoryEnd):
                self._close(ev)
        return Step(
            report.events,
            sum(report.written.values()),
            seconds,
            self.engine.blocks_in_use(),
            len(report.held_blocks),
        )

    def steps(self) -> Iterator[Step]:
        """Step while any story runs."""
        while self.engine.has_work():
            yield self.step()

    def drain(self) -> Drained:
        """Step until every submitted story has ended."""
        result = Drained({story_id: [] for story_id in self.engine.running()})
        started = time.perf_counter()
        for step in self.steps():
            result.add(step)
        result.seconds = time.perf_counter() - started
        return result

    def run(self, stories: dict[str, list[int]], segments: int, sampling: Sampling | None = None) -> Drained:
        """Submit several stories ({story_id: prompt ids}) and write them all to the end."""
        # No sampling given: the engine's own default (greedy).
        options = {} if sampling is None else {"sampling": sampling}
        for story_id, prompt_ids in stories.items():
            self.engine.submit(story_id, prompt_ids, segments, **options)
        return self.drain()

    def abort(self, story_id: str) -> StoryEnd | None:
        """End a story now (its KV blocks return at once)."""
        end = self.engine.abort(story_id)
        if end is None:
            self.peak.pop(story_id, None)
        else:
            self._close(end)
        return end

    def _close(self, end: StoryEnd) -> None:
        end.peak_blocks, end.block_bytes = self.peak.pop(end.story_id, 0), self.block_bytes
