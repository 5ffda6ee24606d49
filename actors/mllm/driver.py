"""The one loop that drives a ``StoryEngine``: step it, and keep the books its callers read.

The MLLMPool (Serve), the bulk job, the eval, the benchmarks and ``StoryEngine.run``/``drain`` all
step the engine through a ``StoryDriver``. Per step it reports the events, the output tokens
written, the seconds the engine step took and the KV blocks in use after it; per story it keeps
the most KV blocks the story held at once and writes that (with the bytes per block) into the
story's ``StoryEnd``, so every caller sees the same footprint.

The driver is not thread-safe: like the engine, it belongs to the thread that steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.mllm.events import Event, PictureWritten, StoryEnd

if TYPE_CHECKING:
    from actors.mllm.engine import StoryEngine


@dataclass
class Step:
    """What one engine step did."""
    events: list[Event]
    tokens: int          # output tokens written in the step, over every story
    seconds: float       # wall time of the engine step alone
    blocks_in_use: int   # KV blocks held by running stories after the step
    running: int         # stories still running after the step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Drained:
    """Every story run to its end: what ``StoryDriver.drain`` returns."""
    pictures: dict[str, list[PictureWritten]]  # per story, in segment order
    ends: dict[str, StoryEnd] = field(default_factory=dict)
    tokens: int = 0               # output tokens written while draining
    seconds: float = 0.0          # wall time from the first step to the last
    peak_blocks_in_use: int = 0   # most KV blocks of the pool in use after any step

    def add(self, step: Step) -> None:
        for ev in step.events:
            if isinstance(ev, PictureWritten):
                self.pictures.setdefault(ev.story_id, []).append(ev)
            elif isinstance(ev, StoryEnd):
                self.ends[ev.story_id] = ev
        self.tokens += step.tokens
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, step.blocks_in_use)


class StoryDriver:
    def __init__(self, engine: StoryEngine):
        self.engine = engine
        self.block_bytes = engine.block_bytes()  # fixed by the KV spec for the engine's life
        self.peak: dict[str, int] = {}          # running story -> most blocks it has held

    def step(self) -> Step:
        engine = self.engine
        seen = {sid: story.seen for sid, story in engine.stories.items()}
        t0 = time.perf_counter()
        events = engine.step()
        seconds = time.perf_counter() - t0
        for sid in engine.stories:
            self.peak[sid] = max(self.peak.get(sid, 0), engine.story_blocks(sid))
        for ev in events:
            if isinstance(ev, StoryEnd):
                self._close(ev)
        return Step(events, self._written(seen, events), seconds, engine.blocks_in_use(), len(engine.stories))

    def steps(self) -> Iterator[Step]:
        """Step while any story runs."""
        while self.engine.has_work():
            yield self.step()

    def drain(self) -> Drained:
        """Step until every submitted story has ended."""
        result = Drained({sid: [] for sid in self.engine.stories})
        t0 = time.perf_counter()
        for step in self.steps():
            result.add(step)
        result.seconds = time.perf_counter() - t0
        return result

    def abort(self, story_id: str) -> StoryEnd | None:
        """End a story now (its KV blocks return at once)."""
        end = self.engine.abort(story_id)
        if end is None:
            self.peak.pop(story_id, None)
        else:
            self._close(end)
        return end

    def _written(self, seen: dict[str, int], events: list[Event]) -> int:
        """Output tokens the step wrote: what each running story's output grew by, plus the last
        tokens of the stories that ended in it (they have left ``engine.stories``)."""
        running = sum(story.seen - seen.get(sid, 0) for sid, story in self.engine.stories.items())
        ended = sum(ev.output_tokens - seen.get(ev.story_id, 0) for ev in events if isinstance(ev, StoryEnd))
        return running + ended

    def _close(self, end: StoryEnd) -> None:
        end.peak_blocks, end.block_bytes = self.peak.pop(end.story_id, 0), self.block_bytes
