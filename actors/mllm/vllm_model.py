"""Worker side of the sink: ``SeedStoryForCausalLM``, a vLLM Llama whose attention reads
exactly the kept tokens of each request, at their positions inside the kept cache.

Data flow of one forward step:
  1. ``SeedStoryForCausalLM.forward`` appends this step's token ids to each request's
     history and asks the sink policy which positions every query may see (``plan_step``).
  2. Each ``SinkAttention`` writes this step's K (before RoPE) and V into its cache through
     ``slot_mapping``, gathers the kept K/V of each request, rotates keys and queries by their
     rank in the kept set, and attends.

K and V are stored in our own layout inside vLLM's CPU cache tensor
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: K in the first half of the last
dimension, V in the second. vLLM's own cache write is never called (DESIGN.md §7).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from actors.mllm.sink import SinkParams, kept_ranges, merge, positions
from actors.mllm.vllm_kv import SeedStorySinkSpec, sink_params


@dataclass
class QueryGroup:
    """Queries of one request that see the same kept set (it changes only at a </img>)."""

    rows: slice                # rows of this step's flattened tokens
    slots: torch.Tensor        # cache slots of the visible keys, in position order
    query_ranks: torch.Tensor  # rank (= RoPE position) of each query among the visible keys


def plan_request(history: list[int], first: int, end: int, policy: SinkParams, row0: int,
                 slot_of) -> list[QueryGroup]:
    """Groups for the queries at positions [first, end) of one request.

    Query i sees kept_ranges(history[:i+1]). That set only changes when history[i] is
    </img>, so queries between two </img> share one key set (with causal masking by rank).
    """
    cuts = [first] + [i for i in range(first + 1, end) if history[i] == policy.eoi_id] + [end]
    groups = []
    for s, t in zip(cuts, cuts[1:]):
        keys = positions(merge(kept_ranges(history[:s + 1], policy) + [(s, t)]))
        n = len(keys)
        groups.append(QueryGroup(rows=slice(row0 + s - first, row0 + t - first), slots=slot_of(keys),
                                 query_ranks=torch.arange(n - (t - s), n)))
    return groups


class SinkAttention(Attention):
    """vLLM's Attention with our forward; its constructor still sets up the cache binding.

    Instances are made by swapping the class of the layer ``LlamaAttention`` builds
    (it hard-codes ``Attention``), so registration under the layer name stays vLLM's.
    """

    rotary = None      # the layer's rotary embedding, applied here by rank
    step = None        # the model's StepState, shared by all layers

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        return SeedStorySinkSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)})

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output_shape=None,
                output_dtype=None) -> torch.Tensor:
        out = torch.zeros_like(query)
        groups = self.step.groups
        if groups is None:  # profiling run: no metadata, no cache
            return out
        hd, kvh = self.head_size, self.num_kv_heads
        cache = self.kv_cache  # (num_blocks, kv_heads, block_size, 2 * hd)
        bs = cache.shape[2]
        slots = self.step.slot_mapping
        n = slots.shape[0]
        ok = slots >= 0
        blk, off = slots[ok] // bs, slots[ok] % bs
        cache[blk, :, off, :hd] = key[:n][ok].view(-1, kvh, hd)
        cache[blk, :, off, hd:] = value[:n][ok].view(-1, kvh, hd)
        for g in groups:
            out[g.rows] = self._attend(query[g.rows], cache, g, bs)
        return out

    def _attend(self, q: torch.Tensor, cache: torch.Tensor, g: QueryGroup, bs: int) -> torch.Tensor:
        hd, h, kvh = self.head_size, self.num_heads, self.num_kv_heads
        kv = cache[g.slots // bs, :, g.slots % bs]                      # (n, kv_heads, 2 * hd)
        k, v = kv[..., :hd].reshape(len(g.slots), -1), kv[..., hd:]
        key_ranks = torch.arange(len(g.slots))
        k = self.rotary.forward_native(key_ranks, k)[0].view(-1, kvh, hd)  # keys rotated by rank
        q = self.rotary.forward_native(g.query_ranks, q)[0].view(-1, h, hd)
        k, v = (x.repeat_interleave(h // kvh, dim=1).transpose(0, 1) for x in (k, v))  # (h, n, hd)
        mask = key_ranks[None, :] <= g.query_ranks[:, None]              # causal, by rank
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=self.impl.scale)
        return o.transpose(0, 1).reshape(len(q), h * hd)


class SinkLlamaAttention(LlamaAttention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn.__class__ = SinkAttention
        # Plain attributes (not submodules): the rotary has no weights and must not be loaded.
        object.__setattr__(self.attn, "rotary", self.rotary_emb)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # No RoPE here: keys are cached before it and rotated by rank at read time.
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


@dataclass
class StepState:
    groups: list[QueryGroup] | None = None
    slot_mapping: torch.Tensor | None = None


class SeedStoryForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        layer = functools.partial(LlamaDecoderLayer, attn_layer_type=SinkLlamaAttention)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)
        self.policy = sink_params(vllm_config.model_config.hf_config)
        self.step = StepState()
        self.layer_names = []
        for decoder in self.model.layers:
            attn = decoder.self_attn.attn
            object.__setattr__(attn, "step", self.step)
            self.layer_names.append(attn.layer_name)
        # Token history per request, keyed by the physical id of its (pinned) first block.
        self.history: dict[int, list[int]] = {}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self._plan(input_ids)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def _plan(self, input_ids: torch.Tensor) -> None:
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if meta is None:
            self.step.groups = None
            return
        m = meta[self.layer_names[0]] if isinstance(meta, dict) else meta
        self.step.slot_mapping = m.slot_mapping
        qsl, seq_lens, table = m.query_start_loc.tolist(), m.seq_lens.tolist(), m.block_table
        bs = self.step_block_size(ctx)
        ids = input_ids.tolist()
        groups: list[QueryGroup] = []
        for r in range(len(seq_lens)):
            q0, q1 = qsl[r], qsl[r + 1]
            end = seq_lens[r]
            first = end - (q1 - q0)
            row = table[r]
            history = self._history(int(row[0]), first)
            history[first:end] = ids[q0:q1]

            def slot_of(keys, row=row):
                pos = torch.tensor(keys)
                return row[pos // bs].long() * bs + pos % bs

            groups += plan_request(history, first, end, self.policy, q0, slot_of)
        self.step.groups = groups

    def _history(self, first_block: int, first: int) -> list[int]:
        if first == 0:  # a new request (or a recomputed one) owns this first block now
            self.history[first_block] = []
        history = self.history[first_block]
        if len(history) != first:
            raise RuntimeError(f"token history of block {first_block} has {len(history)} tokens, "
                               f"the step starts at {first}")
        return history

    def step_block_size(self, ctx) -> int:
        layer = ctx.no_compile_layers[self.layer_names[0]]
        return layer.kv_cache.shape[2]
