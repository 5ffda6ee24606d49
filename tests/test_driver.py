"""The engine driver's books (actors/mllm/driver.py), over a scripted engine: no vLLM, no model."""

from dataclasses import dataclass

from actors.mllm.driver import Step, StoryDriver
from actors.mllm.events import PictureWritten, StoryEnd

BLOCK_BYTES = 1024


@dataclass
class Scripted:
    script: list[tuple[int, int]]  # per step: (tokens it writes, blocks it holds after)
    seen: int = 0
    steps: int = 0


@dataclass
class ScriptedStep:
    """What StoryEngine.step reports (its EngineStep, which needs vLLM to import)."""

    events: list
    written: dict[str, int]
    held_blocks: dict[str, int]


class ScriptedEngine:
    """The driver's ``Engine``, less ``submit`` (the stories are scripted from the start). Each step,
    every story writes its next tokens and one picture; a story whose script is done ends in that
    step and leaves ``stories``, as in vLLM."""

    def __init__(self, **scripts: list[tuple[int, int]]):
        self.stories = {sid: Scripted(script) for sid, script in scripts.items()}

    def step(self) -> ScriptedStep:
        events, written = [], {}
        for sid, story in list(self.stories.items()):
            written[sid] = story.script[story.steps][0]
            story.seen += written[sid]
            story.steps += 1
            events.append(PictureWritten(sid, story.steps - 1, [], [story.seen]))
            if story.steps == len(story.script):
                del self.stories[sid]
                events.append(StoryEnd(sid, False, prompt_tokens=3, output_tokens=story.seen))
        return ScriptedStep(events, written, {sid: self.story_blocks(sid) for sid in self.stories})

    def story_blocks(self, sid: str) -> int:
        story = self.stories[sid]
        return story.script[story.steps - 1][1]

    def blocks_in_use(self) -> int:
        return sum(self.story_blocks(sid) for sid in self.stories)

    def block_bytes(self) -> int:
        return BLOCK_BYTES

    def has_work(self) -> bool:
        return bool(self.stories)

    def running(self) -> list[str]:
        return list(self.stories)

    def abort(self, sid: str) -> StoryEnd | None:
        story = self.stories.pop(sid, None)
        return None if story is None else StoryEnd(sid, True, prompt_tokens=3, output_tokens=story.seen)


def test_each_step_reports_the_tokens_written_and_the_blocks_in_use():
    driver = StoryDriver(ScriptedEngine(a=[(5, 1), (3, 2), (4, 1)], b=[(2, 1), (2, 3)]))
    steps = list(driver.steps())
    assert [s.tokens for s in steps] == [7, 5, 4]  # b's last tokens count in the step it ends
    assert [s.blocks_in_use for s in steps] == [2, 2, 0]
    assert [s.running for s in steps] == [2, 1, 0]
    assert all(s.seconds >= 0 for s in steps)


def test_a_story_end_carries_the_most_blocks_the_story_held():
    drained = StoryDriver(ScriptedEngine(a=[(5, 1), (3, 2), (4, 1)], b=[(2, 1), (2, 3)])).drain()
    a, b = drained.ends["a"], drained.ends["b"]
    # Blocks are read after each step from the stories still running: a story's ending step adds none.
    assert (a.peak_blocks, b.peak_blocks) == (2, 1)
    assert a.block_bytes == b.block_bytes == BLOCK_BYTES
    assert drained.tokens == a.output_tokens + b.output_tokens == 16
    assert [len(drained.pictures[s]) for s in "ab"] == [3, 2]
    assert drained.peak_blocks_in_use == 2 and drained.seconds >= 0


def test_an_aborted_story_ends_with_its_footprint_and_leaves_no_books():
    engine = ScriptedEngine(a=[(5, 2), (3, 2), (4, 1)])
    driver = StoryDriver(engine)
    driver.step()
    end = driver.abort("a")
    assert end.aborted and (end.output_tokens, end.peak_blocks, end.block_bytes) == (5, 2, BLOCK_BYTES)
    assert driver.peak == {} and not engine.has_work()
    assert driver.abort("a") is None


def test_tokens_per_second_of_an_instant_step_is_zero():
    assert Step([], tokens=10, seconds=0.0, blocks_in_use=0, running=0).tokens_per_s == 0.0
    assert Step([], tokens=10, seconds=2.0, blocks_in_use=0, running=0).tokens_per_s == 5.0
