"""The MLLM: an ordinary Llama-architecture causal LM over text + <img>/</img> + Q query tokens.

Its picture heads live beside it (``actors/mllm/heads.py``), so ``mllm/`` stays a plain Llama that
vLLM hosts natively and transformers loads as is; the transformers module here is what training
writes and what equivalence tests compare to.
"""

from __future__ import annotations

from pathlib import Path

from actors.config import MLLMConfig
from actors.tokenizer.text import TokenLayout


def llama_config(cfg: MLLMConfig, tokens: TokenLayout):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokens.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
        head_dim=cfg.head_dim,
    )


def build_mllm(cfg: MLLMConfig, tokens: TokenLayout):
    """A randomly initialised MLLM (seed torch before calling for a reproducible init)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(cfg, tokens)).eval()


def load_mllm(directory: str | Path, dtype: str = "float32"):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype)).eval()


def parameter_count(cfg: MLLMConfig, vocab_size: int) -> int:
    """Parameters of the Llama model the config describes, computed from the config alone."""
    hidden, kv_width = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attention = hidden * hidden * 2 + hidden * kv_width * 2  # q, o and k, v projections (no biases)
    mlp = 3 * hidden * cfg.intermediate_size  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # + two RMSNorms
    embeddings = vocab_size * hidden * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embeddings + hidden  # + final norm
