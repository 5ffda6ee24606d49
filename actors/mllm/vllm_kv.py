"""Scheduler side of the sink: a KV-cache spec, its manager, and the scheduler that wires them.

The manager frees every block that holds no kept token (``actors.mllm.sink``) as soon as
it is fully computed. The worker re-derives the same kept set from the same token ids and
never reads a freed block, because the policy is monotone (see ``sink.py``).

Logical block 0 of every request is pinned: the worker keys its per-request token history
by the physical id of block 0 (attention metadata carries no request ids), so that id must
stay owned by the request for its whole life. In the sink modes block 0 holds the sink
tokens anyway; in ``window`` mode it costs one block per story.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from actors.mllm.sink import SinkParams, SinkSettings, kept_blocks, kept_ranges, max_blocks


class SeedStorySinkSpec(FullAttentionSpec):
    """Same page layout as full attention; a distinct type so vLLM picks our manager."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # Admission on the policy's bounded footprint, not on max_model_len.
        hf = vllm_config.model_config.hf_config
        story = hf.seedstory_story
        blocks = max_blocks(SinkSettings(**hf.seedstory_sink), story["longest_segment"], story["max_segments"],
                            vllm_config.model_config.max_model_len, self.block_size)
        return blocks * self.page_size_bytes


class SinkKVManager(FullAttentionManager):
    # Set by SinkScheduler after construction: vLLM builds managers from the spec alone and
    # hands them no token ids, which the policy needs.
    policy: SinkParams | None = None
    requests: dict | None = None

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        request = self.requests.get(request_id) if self.requests is not None else None
        blocks = self.req_to_blocks.get(request_id)
        if request is None or not blocks or self.policy is None or self.policy.mode == "dense":
            return
        n = processed_computed_tokens
        keep = set(kept_blocks(kept_ranges(request.all_token_ids[:n], self.policy), self.block_size))
        freed = []
        for k in range(1, min(n // self.block_size, len(blocks))):  # only full blocks; block 0 pinned
            if k not in keep and blocks[k] is not self._null_block:
                freed.append(blocks[k])
                blocks[k] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)


def sink_params(hf_config) -> SinkParams:
    """The policy of an engine: sink settings and <img>/</img> ids, both put in the model config
    by the engine wrapper (``hf_overrides``), so every process reads the same values."""
    tokens = hf_config.seedstory_tokens
    return SinkSettings(**hf_config.seedstory_sink).with_ids(tokens["boi"], tokens["eoi"])


class SinkScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        policy = sink_params(self.vllm_config.model_config.hf_config)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, SinkKVManager):
                manager.policy, manager.requests = policy, self.requests
