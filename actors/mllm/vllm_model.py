"""Worker side of the sink: ``SeedStoryForCausalLM``, a vLLM Llama whose attention reads
exactly the kept tokens of each request, at their positions inside the kept cache.

Positions are ranks in the kept set (StreamingLLM style). Keys are cached already rotated
to their current rank and re-rotated in place when an eviction shifts ranks (once per
picture, not once per token): RoPE rotations compose, so turning a key from rank r to
rank r' is one rotation by r' - r.

Data flow of one forward step:
  1. ``SeedStoryForCausalLM.forward`` appends this step's token ids to each request's
     history and asks the sink policy which positions every query may see (``plan_request``),
     then pads all groups into one ``StepBatch``.
  2. Each ``SinkAttention`` writes this step's K (rotated to its rank) and V through
     ``slot_mapping``, gathers the visible K/V rows, rotates any whose cached rank differs
     from the rank this group sees, attends, and finally re-rotates the keys whose rank
     the step's evictions changed.

Our cache layout: vLLM's CPU cache tensor ``[num_blocks, kv_heads, block_size, 2 * hd]``
reinterpreted as one row per slot, ``(num_blocks * block_size, kv_heads, 2 * hd)``, K then V.
vLLM's own cache write is never called and its kernels never read it (DESIGN.md §7).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from actors.mllm.sink import Ranges, SinkParams, kept_ranges, merge, positions
from actors.mllm.vllm_kv import SeedStorySinkSpec, sink_params


# -- planning (per step, plain Python lists) -------------------------------------------------
@dataclass
class RequestState:
    """What the worker knows of a request: its tokens, and the kept set its cached keys are
    rotated for (``kept``, as of ``len(history)`` tokens)."""

    history: list[int] = field(default_factory=list)
    kept: Ranges = field(default_factory=list)


@dataclass
class QueryGroup:
    """Queries of one request that see the same kept set (it changes only at a </img>)."""

    rows: range                # rows of this step's flattened tokens
    keys: list[int]            # visible key positions, in order: key k has rank k
    key_delta: list[int] | None  # rank seen here minus rank cached, per key (None: all zero)


@dataclass
class RequestPlan:
    groups: list[QueryGroup]
    write_ranks: list[int]      # rank each new token's key is cached at
    fixups: list[tuple[int, int]]  # (position, rotation) to apply after attention


def plan_request(st: RequestState, first: int, end: int, policy: SinkParams, row0: int) -> RequestPlan:
    """Plan the queries at positions [first, end) of one request (history already appended).

    Query i sees kept_ranges(history[:i+1]). That set changes only when history[i] is </img>,
    so queries between two </img> form one group (causal masking by rank inside it).
    """
    h = st.history
    cuts = [first] + [i for i in range(first + 1, end) if h[i] == policy.eoi_id] + [end]
    epochs = [(s, t, merge(kept_ranges(h[:s + 1], policy) + [(s, t)])) for s, t in zip(cuts, cuts[1:])]
    write_ranks = []
    for s, t, rng in epochs:
        n = sum(hi - lo for lo, hi in rng)
        write_ranks += range(n - (t - s), n)
    end_kept = epochs[-1][2]  # == kept_ranges(h[:end]): no </img> after the last cut
    # Common case (no eviction since the cached assignment, one group): every cached rank is
    # already the rank the queries see.
    if len(epochs) == 1 and merge(st.kept + [(first, end)]) == end_kept:
        st.kept = end_kept
        return RequestPlan([QueryGroup(range(row0, row0 + end - first), positions(end_kept), None)], write_ranks, [])
    cached = {p: r for r, p in enumerate(positions(st.kept))}
    cached.update({first + j: r for j, r in enumerate(write_ranks)})
    groups = []
    for s, t, rng in epochs:
        keys = positions(rng)
        groups.append(QueryGroup(range(row0 + s - first, row0 + t - first), keys,
                                 [r - cached[p] for r, p in enumerate(keys)]))
    fixups = [(p, r - cached[p]) for r, p in enumerate(positions(end_kept)) if cached[p] != r]
    st.kept = end_kept
    return RequestPlan(groups, write_ranks, fixups)


# -- the batched tensors every layer uses ----------------------------------------------------
def rope_of(cos_sin: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for (possibly negative) rotations ``ranks``: (..., 1, hd/2) each."""
    cos, sin = cos_sin[ranks.abs()].chunk(2, -1)
    return cos[..., None, :], (sin * ranks.sign()[..., None])[..., None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style RoPE (as vLLM's and transformers' Llama): x (..., hd), cos/sin (..., hd/2)."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@dataclass
class StepBatch:
    """All query groups of a step, padded into one batch (G groups, N keys, Qm queries)."""

    write_rot: tuple            # cos, sin per step token: (T, 1, hd/2)
    slots: torch.Tensor         # (G, N) visible key slots (padding: slot 0, masked)
    q_rows: torch.Tensor        # (G, Qm) rows of this step's tokens (padding: row 0, dropped)
    q_valid: torch.Tensor       # (G, Qm)
    q_rot: tuple                # cos, sin of query ranks: (G, Qm, 1, hd/2)
    mask: torch.Tensor          # (G, 1, Qm, N) causal by rank, padding masked
    key_rot: tuple | None       # cos, sin of key rank corrections (G, N, 1, hd/2), None if all zero
    fix_slots: torch.Tensor | None  # slots re-rotated after attention, and by how much
    fix_rot: tuple | None


def build_batch(plans: list[RequestPlan], slot_fns: list, num_tokens: int, cos_sin: torch.Tensor) -> StepBatch:
    groups = [(g, fn) for plan, fn in zip(plans, slot_fns) for g in plan.groups]
    n = max(len(g.keys) for g, _ in groups)
    qm = max(len(g.rows) for g, _ in groups)
    dev = cos_sin.device

    def pad(rows: list[list[int]], width: int) -> torch.Tensor:
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=dev)

    write = torch.zeros(num_tokens, dtype=torch.long, device=dev)
    for plan in plans:
        start = plan.groups[0].rows.start
        write[start:start + len(plan.write_ranks)] = torch.tensor(plan.write_ranks, device=dev)
    slots = torch.stack([torch.cat((fn(g.keys), torch.zeros(n - len(g.keys), dtype=torch.long, device=dev)))
                         for g, fn in groups])
    key_len = torch.tensor([len(g.keys) for g, _ in groups], device=dev)
    q_len = torch.tensor([len(g.rows) for g, _ in groups], device=dev)
    q_rows = pad([list(g.rows) for g, _ in groups], qm)
    q_ranks = (key_len - q_len)[:, None] + torch.arange(qm, device=dev)[None, :]  # queries are the last keys
    q_valid = torch.arange(qm, device=dev)[None, :] < q_len[:, None]
    key_idx = torch.arange(n, device=dev)
    mask = (key_idx[None, None, :] <= q_ranks[:, :, None]) & (key_idx[None, None, :] < key_len[:, None, None])
    key_rot = None
    if any(g.key_delta for g, _ in groups):
        key_rot = rope_of(cos_sin, pad([g.key_delta or [0] * len(g.keys) for g, _ in groups], n))
    fixes = [(fn, plan.fixups) for plan, fn in zip(plans, slot_fns) if plan.fixups]
    fix_slots = fix_rot = None
    if fixes:
        fix_slots = torch.cat([fn([p for p, _ in fx]) for fn, fx in fixes])
        fix_rot = rope_of(cos_sin, torch.tensor([d for _, fx in fixes for _, d in fx], device=dev))
    return StepBatch(rope_of(cos_sin, write), slots, q_rows, q_valid,
                     rope_of(cos_sin, q_ranks.clamp(min=0)), mask[:, None], key_rot, fix_slots, fix_rot)


# -- the layers ------------------------------------------------------------------------------
class SinkAttention(Attention):
    """vLLM's Attention with our forward; its constructor still sets up the cache binding.

    Instances are made by swapping the class of the layer ``LlamaAttention`` builds
    (it hard-codes ``Attention``), so registration under the layer name stays vLLM's.
    """

    step = None  # the model's StepState, shared by all layers

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        return SeedStorySinkSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)})

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output_shape=None,
                output_dtype=None) -> torch.Tensor:
        out = torch.zeros_like(query)
        b = self.step.batch
        if b is None:  # profiling run: no metadata, no cache
            return out
        hd, h, kvh = self.head_size, self.num_heads, self.num_kv_heads
        rows = self.kv_cache.view(-1, kvh, 2 * hd)  # (slots, kv_heads, 2 * hd)
        # 1. Write this step's keys, rotated to their rank, and values.
        slots = self.step.slot_mapping
        ok = slots >= 0
        n = slots.shape[0]
        k_new = rotate(key[:n].view(n, kvh, hd), *(x[:n] for x in b.write_rot))
        rows[slots[ok]] = torch.cat((k_new[ok], value[:n].view(n, kvh, hd)[ok]), -1)
        # 2. Gather the visible rows of every group; correct ranks where this group sees others.
        g, nk, qm = b.slots.shape[0], b.slots.shape[1], b.q_rows.shape[1]
        kv = rows.view(rows.shape[0], -1).index_select(0, b.slots.reshape(-1)).view(g, nk, kvh, 2 * hd)
        k, v = kv[..., :hd], kv[..., hd:]
        if b.key_rot is not None:
            k = rotate(k, *b.key_rot)
        q = rotate(query[b.q_rows].view(g, qm, h, hd), *b.q_rot)
        if h != kvh:
            k, v = (x.repeat_interleave(h // kvh, dim=2) for x in (k, v))
        # 3. Attend, causal by rank.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=b.mask, scale=self.impl.scale)  # (G, h, Qm, hd)
        out[b.q_rows[b.q_valid]] = o.transpose(1, 2).reshape(g, qm, h * hd)[b.q_valid]
        # 4. Keys whose rank this step's evictions shifted: rotate them to their new rank.
        if b.fix_slots is not None:
            rows[b.fix_slots, :, :hd] = rotate(rows[b.fix_slots, :, :hd], *b.fix_rot)
        return out


class SinkLlamaAttention(LlamaAttention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn.__class__ = SinkAttention

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # No RoPE here: the attention rotates by rank inside the kept set, not by position.
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


@dataclass
class StepState:
    batch: StepBatch | None = None
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
        rope = self.model.layers[0].self_attn.rotary_emb
        assert rope.rotary_dim == rope.head_size and rope.is_neox_style
        # Attention metadata carries no request ids: requests are known by the physical id of
        # their first block, which the KV manager pins for the request's life.
        self.requests: dict[int, RequestState] = {}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self._plan(input_ids)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def _plan(self, input_ids: torch.Tensor) -> None:
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if meta is None:
            self.step.batch = None
            return
        m = meta[self.layer_names[0]] if isinstance(meta, dict) else meta
        self.step.slot_mapping = m.slot_mapping
        qsl, seq_lens, table = m.query_start_loc.tolist(), m.seq_lens.tolist(), m.block_table
        bs = ctx.no_compile_layers[self.layer_names[0]].kv_cache.shape[2]
        ids = input_ids.tolist()
        plans, slot_fns = [], []
        for r in range(len(seq_lens)):
            q0, q1, end = qsl[r], qsl[r + 1], seq_lens[r]
            first = end - (q1 - q0)
            st = self._request(int(table[r, 0]), first)
            st.history[first:end] = ids[q0:q1]
            plans.append(plan_request(st, first, end, self.policy, q0))
            slot_fns.append(functools.partial(_slots, table[r], bs))
        cos_sin = self.model.layers[0].self_attn.rotary_emb.cos_sin_cache.to(self.lm_head.weight.dtype)
        self.step.batch = build_batch(plans, slot_fns, len(ids), cos_sin)

    def _request(self, first_block: int, first: int) -> RequestState:
        if first == 0:  # a new request (or a recomputed one) owns this first block now
            self.requests[first_block] = RequestState()
        st = self.requests[first_block]
        if len(st.history) != first:
            raise RuntimeError(f"token history of block {first_block} has {len(st.history)} tokens, "
                               f"the step starts at {first}")
        return st


def _slots(row: torch.Tensor, block_size: int, keys: list[int]) -> torch.Tensor:
    pos = torch.tensor(keys, dtype=torch.long, device=row.device)
    return row[pos // block_size].long() * block_size + pos % block_size
