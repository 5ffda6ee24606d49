"""Scheduler side of the sink: a KV-cache spec, its manager, and the scheduler that wires them.

Compaction. The worker keeps each story's kept tokens densely, by rank, in the blocks the story
still holds (``sink.HeldBlocks``); the manager releases every other block. Both sides replay
the same rule from the same numbers (tokens computed before the step, tokens scheduled in it,
and the policy's kept count, from ``sink.SinkTracker``), so nothing is sent to the worker.

When the release happens, and why then:
- vLLM calls ``remove_skipped_blocks`` inside ``allocate_slots``, *before* it knows whether the
  request fits this step. A request could then lose blocks in a step in which it is not run,
  and the blocks could be handed to another story and overwritten while they still hold rows
  waiting to be moved. So ``remove_skipped_blocks`` does nothing here.
- Instead ``SinkScheduler.schedule`` releases blocks *after* scheduling, only for the stories
  scheduled in that step. The worker moves those stories' rows in that same step, before it
  writes anything; the released blocks can go to other stories only from the next step on.
- This needs the synchronous scheduler: with async scheduling the next step is scheduled while
  this one runs. ``SinkScheduler`` is synchronous, and the engine asks for it explicitly.

Admission. vLLM admits a waiting request when the blocks for its first prompt chunk are free
(``KVCacheManager.allocate_slots``); ``KVCacheSpec.max_memory_usage_bytes`` only sizes the pool
at start-up. It reserves nothing for growth, so stories admitted together later preempt each
other. ``SinkScheduler`` admits a story only while every running story's worst-case footprint
under the policy (``sink.max_blocks``, compacted) still fits next to it, so a story, once
admitted, runs to the end without preemption, and a fixed pool runs as many stories at once as
their compacted footprints allow.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from actors.mllm.sink import HeldBlocks, SinkParams, SinkSettings, SinkTracker, max_blocks


def footprint_blocks(vllm_config, block_size: int) -> int:
    """Most blocks one story holds under the engine's policy (compacted), a full prefill chunk included."""
    hf = vllm_config.model_config.hf_config
    story = hf.seedstory_story
    return max_blocks(
        SinkSettings(**hf.seedstory_sink),
        story["longest_segment"],
        story["max_story_segments"],
        vllm_config.model_config.max_model_len,
        block_size,
        step_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
    )


class SeedStorySinkSpec(FullAttentionSpec):
    """Same page layout as full attention; a distinct type so vLLM picks our manager."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # Used by vLLM only to size the pool at start-up (and to check one story fits it).
        return footprint_blocks(vllm_config, self.block_size) * self.page_size_bytes


@dataclass
class StoryKV:
    """The scheduler's view of one story's cache: its policy marks and its held entries."""

    tracker: SinkTracker
    held: HeldBlocks


class SinkKVManager(FullAttentionManager):
    # Set by SinkScheduler after construction: vLLM builds managers from the spec alone.
    policy: SinkParams | None = None
    stories: dict[str, StoryKV]

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        """Nothing: blocks are released in ``compact``, only for stories that run this step."""

    def compact(self, request_id: str, token_ids, first: int, scheduled: int) -> None:
        """Apply ``HeldBlocks`` for a story scheduled with ``first`` tokens computed before the step."""
        stories = self.stories
        if first == 0 or request_id not in stories:  # a new story, or one recomputed after preemption
            stories[request_id] = StoryKV(SinkTracker(self.policy), HeldBlocks(self.block_size))
        story = stories[request_id]
        story.tracker.extend(token_ids[story.tracker.seen : first])  # only the tokens new since last time
        visible = story.held.step(first, scheduled, story.tracker.kept_count())
        released = visible[len(story.held.entries) :]
        blocks = self.req_to_blocks[request_id]
        freed = [blocks[k] for k in released if not blocks[k].is_null]
        for k in released:
            blocks[k] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)

    def held_blocks(self, request_id: str) -> int:
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))

    def free(self, request_id: str) -> None:
        self.stories.pop(request_id, None)
        super().free(request_id)


def sink_params(hf_config) -> SinkParams:
    """The policy of an engine: sink settings and <img>/</img> ids, both put in the model config
    by the engine wrapper (``hf_overrides``), so every process reads the same values."""
    tokens = hf_config.seedstory_tokens
    return SinkSettings(**hf_config.seedstory_sink).with_ids(tokens["boi"], tokens["eoi"])


def query_ids(hf_config) -> range:
    """The ids whose final-norm hidden rows the model keeps per story: a picture's Q query ids."""
    tokens = hf_config.seedstory_tokens
    return range(tokens["query_base"], tokens["query_base"] + tokens["num_queries"])


class SinkScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        policy = sink_params(self.vllm_config.model_config.hf_config)
        self.sink_managers = [
            m for m in self.kv_cache_manager.coordinator.single_type_managers if isinstance(m, SinkKVManager)
        ]
        for manager in self.sink_managers:
            manager.policy, manager.stories = policy, {}
        self.max_stories = self.max_num_active_reqs
        hf = self.vllm_config.model_config.hf_config
        self.settings, self.story = SinkSettings(**hf.seedstory_sink), hf.seedstory_story
        self.chunk = self.scheduler_config.max_num_batched_tokens
        self.step_hooks: list = []  # called as hook(scheduler, output) after every schedule (tests)

    def schedule(self, *args, **kwargs):
        self.max_num_active_reqs = self._admissible()
        output = super().schedule(*args, **kwargs)
        for rid, scheduled in output.num_scheduled_tokens.items():
            request = self.requests[rid]
            first = request.num_computed_tokens - scheduled  # already advanced by schedule()
            for manager in self.sink_managers:
                manager.compact(rid, request.all_token_ids, first, scheduled)
        for hook in self.step_hooks:
            hook(self, output)
        return output

    def _admissible(self) -> int:
        """How many stories may run: the running ones, plus waiting ones while the pool still
        holds every story's worst case (what it may still grow to), the new ones' included."""
        if not self.sink_managers or not self.story["admit_on_footprint"]:
            return self.max_stories
        manager = self.sink_managers[0]
        growth = sum(max(0, self._worst_case(r) - manager.held_blocks(r.request_id)) for r in self.running)
        room = self.kv_cache_manager.block_pool.get_num_free_blocks() - growth
        admit = 0
        for request in self.waiting:
            need = self._worst_case(request)
            if need > room and (admit or self.running):  # an empty engine always takes the next story
                break
            room, admit = room - need, admit + 1
        return min(self.max_stories, len(self.running) + admit)

    def _worst_case(self, request) -> int:
        """Most blocks this story can hold (``sink.max_blocks`` over its own length); its biggest
        step is its first prompt chunk."""
        return max_blocks(
            self.settings,
            self.story["longest_segment"],
            self.story["max_story_segments"],
            request.num_prompt_tokens + request.max_tokens,
            self.block_size,
            step_tokens=min(request.num_tokens, self.chunk),
        )
