"""vLLM plugin entry point (``vllm.general_plugins``): registers our model and KV-cache spec.

vLLM calls ``register`` in every process it starts (front end, engine core, workers).
Imports are inside the function so that loading the plugin stays cheap and cycle-free.
"""

from __future__ import annotations

ARCHITECTURE = "SeedStoryForCausalLM"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from actors.mllm.vllm_kv import SeedStorySinkSpec, SinkKVManager

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "actors.mllm.vllm_model:SeedStoryForCausalLM")
    KVCacheSpecRegistry.register(SeedStorySinkSpec, manager_class=SinkKVManager)
