"""Worker side of the sink: ``SeedStoryForCausalLM``, a vLLM Llama whose attention reads
exactly the kept tokens of each request, at their positions inside the kept cache, from a
compacted cache.

Positions are ranks in the kept set (StreamingLLM style). The cache is compacted: a story's
kept tokens sit densely by rank in the blocks it holds (``sink.HeldBlocks``, the rule the
scheduler replays to free the rest), and the key at storage index i is always rotated to rank i.
RoPE rotations compose, so moving a key from storage index i to j is one rotation by j - i.

Data flow of one forward step:
  1. ``SeedStoryForCausalLM.forward`` feeds each request's new token ids to its ``SinkTracker``
     (incremental: the step costs what it adds) and plans the step (``plan_request``): the moves
     that compact what the last step's evictions left, where the new tokens go, and which keys
     every query sees. It pads all requests into one ``StepBatch``.
  2. Each ``SinkAttention`` layer first moves the kept rows (re-rotating their keys), *then*
     writes this step's K and V, gathers the visible rows, corrects ranks where a query group
     sees a set an eviction inside this step changed, and attends. Moves come before writes
     because rows may still sit in blocks the scheduler released this step, and because a
     story's own new tokens land where its moved rows came from.

Our cache layout: vLLM's CPU cache tensor ``[num_blocks, kv_heads, block_size, 2 * hd]``
reinterpreted as one row per slot, ``(num_blocks * block_size, kv_heads, 2 * hd)``, K then V.
vLLM's own cache write is never called and its kernels never read it (``docs/architecture.md``).
vLLM's ``slot_mapping`` is position-based and is not used: under compaction it points into
blocks the story no longer holds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from actors.mllm.sink import HeldBlocks, Ranges, SinkTracker, merge
from actors.mllm.vllm_kv import SeedStorySinkSpec, sink_params


# -- planning (per step, plain Python lists) -------------------------------------------------
@dataclass
class RequestState:
    """What the worker knows of a request: its policy marks, the block-list entries it holds, and
    the positions its storage holds (storage index i holds the i-th, its key rotated to rank i)."""

    tracker: SinkTracker
    held: HeldBlocks
    stored: Ranges = field(default_factory=list)
    laid_out: int = 0  # tracker.evictions when `stored` was laid out; if it moved on, compact


@dataclass
class QueryGroup:
    """Queries of one request that see the same kept set (it changes only at a </img>).

    The group reads storage indices [0, extent); its queries are the last ``len(rows)`` of them.
    ``runs`` is None when it sees all of them at rank = storage index; after an eviction inside
    the step it sees only some, given as runs (storage index, rank seen here, length).
    """

    rows: range                             # rows of this step's flattened tokens
    extent: int
    runs: list[tuple[int, int, int]] | None
@dataclass
class RequestPlan:
    groups: list[QueryGroup]
    writes: range                      # storage indices of this step's tokens, their keys rotated to them
    moves: list[tuple[int, int, int]]  # (from, to, length) runs of storage indices, done before any write
    entries: list[int]                 # block-list entries that storage index i // block_size lives in


def rank_runs(outer: Ranges, inner: Ranges) -> list[tuple[int, int, int]]:
    """For ``inner`` ⊆ ``outer`` (both merged): runs (rank in outer, rank in inner, length)."""
    runs, i, base, rank = [], 0, 0, 0
    for lo, hi in inner:
        while outer[i][1] <= lo:  # a merged inner range lies inside one outer range
            base += outer[i][1] - outer[i][0]
            i += 1
        runs.append((base + lo - outer[i][0], rank, hi - lo))
        rank += hi - lo
    return runs


def plan_request(st: RequestState, first: int, new_ids: list[int], row0: int) -> RequestPlan:
    """Plan the queries at positions [first, first + len(new_ids)) of one request.

    Query i sees kept_ranges(ids[:i+1]). That set changes only when ids[i] is </img>, so the
    queries between two </img> form one group (causal masking by rank inside it).
    """
    t, s = st.tracker, len(new_ids)
    k, evictions = t.kept_count(), t.evictions  # as of `first`: what the storage must hold now
    kept, moves = st.stored, []
    if evictions != st.laid_out:  # a </img> pushed a segment out since the storage was laid out
        kept = t.kept()
        moves = [r for r in rank_runs(st.stored, kept) if r[0] != r[1]]
    entries = st.held.step(first, s, k)
    layout = merge(kept + [(first, first + s)])  # storage after the moves and writes
    eoi = t.p.eoi_id
    cuts = [0] + [j for j in range(1, s) if new_ids[j] == eoi] + [s]
    groups, seen = [], 0
    for c, e in zip(cuts, cuts[1:]):
        t.extend(new_ids[seen:c + 1])
        seen = c + 1
        rows = range(row0 + c, row0 + e)
        seen_all = t.evictions == evictions  # nothing evicted since `first`: storage order is rank order
        groups.append(QueryGroup(rows, k + e, None if seen_all else
                                 rank_runs(layout, merge(t.kept() + [(first + c, first + e)]))))
    t.extend(new_ids[seen:])
    st.stored, st.laid_out = layout, evictions
    return RequestPlan(groups, range(k, k + s), moves, entries)


# -- the batched tensors every layer uses ----------------------------------------------------
def rope_of(cos_sin: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for (possibly negative) rotations ``ranks``: (..., 1, hd/2) each."""
    cos, sin = cos_sin[ranks.abs()].chunk(2, -1)
    return cos[..., None, :], (sin * ranks.sign()[..., None])[..., None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style RoPE (as vLLM's and transformers' Llama): x (..., hd), cos/sin (..., hd/2)."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def storage_blocks(table_row: torch.Tensor, entries: list[int]) -> torch.Tensor:
    """Physical block of every storage block of one request: storage index i lives in row
    i % block_size of the block at entry ``entries[i // block_size]`` of its block table."""
    return table_row[torch.tensor(entries, dtype=torch.long, device=table_row.device)].long()


@dataclass
class StepBatch:
    """All query groups of a step, padded into one batch (G groups, NB blocks of keys, Qm queries)."""

    move_src: torch.Tensor | None  # slots whose rows move (compaction), before any write
    move_dst: torch.Tensor | None
    move_rot: tuple | None         # cos, sin of each moved key's rank change: (M, 1, hd/2)
    write_rows: torch.Tensor       # rows of this step's tokens, and the slots they are written to
    write_slots: torch.Tensor
    write_rot: tuple               # cos, sin of their ranks: (W, 1, hd/2)
    blocks: torch.Tensor           # (G, NB) the blocks each group reads, in storage order (padding: 0, masked)
    q_rows: torch.Tensor           # (G, Qm) rows of this step's tokens (padding: row 0, dropped)
    q_valid: torch.Tensor          # (G, Qm)
    q_rot: tuple                   # cos, sin of query ranks: (G, Qm, 1, hd/2)
    mask: torch.Tensor             # (G, 1, Qm, NB * block_size) causal by rank, unseen and padding masked
    rot_groups: torch.Tensor | None  # (S,) groups that saw an eviction inside this step, and
    key_rot: tuple | None            # cos, sin of their key rank corrections (S, N, 1, hd/2)


def _runs_index(runs: list[tuple[int, int, int]], col: int, dev) -> torch.Tensor:
    return torch.cat([torch.arange(r[col], r[col] + r[2], dtype=torch.long, device=dev) for r in runs])


def _moves(plans: list[RequestPlan], slot_maps: list[torch.Tensor], cos_sin: torch.Tensor) -> tuple:
    moving = [(plan.moves, sm) for plan, sm in zip(plans, slot_maps) if plan.moves]
    if not moving:
        return None, None, None
    dev = cos_sin.device
    src = [_runs_index(runs, 0, dev) for runs, _ in moving]
    dst = [_runs_index(runs, 1, dev) for runs, _ in moving]
    return (torch.cat([sm[i] for (_, sm), i in zip(moving, src)]), torch.cat([sm[i] for (_, sm), i in zip(moving, dst)]),
            rope_of(cos_sin, torch.cat([d - i for i, d in zip(src, dst)])))


def build_batch(plans: list[RequestPlan], blocks: list[torch.Tensor], block_size: int,
                cos_sin: torch.Tensor) -> StepBatch:
    dev = cos_sin.device
    slot_maps = [(b[:, None] * block_size + torch.arange(block_size, device=dev)).reshape(-1) for b in blocks]
    move_src, move_dst, move_rot = _moves(plans, slot_maps, cos_sin)
    writes = torch.cat([torch.arange(p.writes.start, p.writes.stop, device=dev) for p in plans])
    write_rows = torch.cat([torch.arange(p.groups[0].rows.start, p.groups[0].rows.start + len(p.writes), device=dev)
                            for p in plans])
    write_slots = torch.cat([sm[p.writes.start:p.writes.stop] for p, sm in zip(plans, slot_maps)])
    # Every group reads whole blocks of its story's storage (cheaper than gathering rows one by one).
    groups = [(g, b) for plan, b in zip(plans, blocks) for g in plan.groups]
    nb = max(-(-g.extent // block_size) for g, _ in groups)
    qm = max(len(g.rows) for g, _ in groups)
    read = torch.stack([torch.cat((b[:-(-g.extent // block_size)], b.new_zeros(nb - -(-g.extent // block_size))))
                        for g, b in groups])
    n = nb * block_size
    idx = torch.arange(n, device=dev)
    extent = torch.tensor([g.extent for g, _ in groups], device=dev)
    key_ok = idx[None, :] < extent[:, None]  # (G, N)
    key_rank = idx[None, :].repeat(len(groups), 1)
    for i, (g, _) in enumerate(groups):
        if g.runs is not None:  # an eviction inside this step: this group sees a subset, at new ranks
            key_ok[i] = False
            key_ok[i, _runs_index(g.runs, 0, dev)] = True
            key_rank[i, _runs_index(g.runs, 0, dev)] = _runs_index(g.runs, 1, dev)
    q_len = torch.tensor([len(g.rows) for g, _ in groups], device=dev)
    q_store = (extent - q_len)[:, None] + torch.arange(qm, device=dev)[None, :]  # queries are the last keys
    q_valid = torch.arange(qm, device=dev)[None, :] < q_len[:, None]
    q_rows = torch.stack([torch.arange(g.rows.start, g.rows.start + qm, device=dev) for g, _ in groups]) * q_valid
    q_rank = key_rank.gather(1, q_store.clamp(0, n - 1))
    mask = key_ok[:, None, :] & (idx[None, None, :] <= q_store[:, :, None])
    # Only the groups that saw an eviction inside this step read keys at other ranks (rare: one
    # step per picture per story), so only they pay for the correction.
    rot_groups = key_rot = None
    slow = [i for i, (g, _) in enumerate(groups) if g.runs is not None]
    if slow:
        rot_groups = torch.tensor(slow, dtype=torch.long, device=dev)
        key_rot = rope_of(cos_sin, ((key_rank - idx[None, :]) * key_ok)[rot_groups])
    return StepBatch(move_src, move_dst, move_rot, write_rows, write_slots, rope_of(cos_sin, writes),
                     read, q_rows, q_valid, rope_of(cos_sin, q_rank.clamp(min=0)), mask[:, None], rot_groups, key_rot)


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
        # 0. Compaction: move kept rows down to their rank, re-rotating their keys. Before any
        #    write: the rows may sit in blocks released this step, or where new tokens go.
        if b.move_src is not None:
            moved = rows[b.move_src]  # a copy: sources and destinations may overlap
            moved[..., :hd] = rotate(moved[..., :hd], *b.move_rot)
            rows[b.move_dst] = moved
        # 1. Write this step's keys, rotated to their rank, and values.
        w = b.write_rows
        k_new = rotate(key[w].view(-1, kvh, hd), *b.write_rot)
        rows[b.write_slots] = torch.cat((k_new, value[w].view(-1, kvh, hd)), -1)
        # 2. Gather the visible rows of every group; correct ranks where this group sees others.
        (g, nb), qm, bs = b.blocks.shape, b.q_rows.shape[1], self.kv_cache.shape[2]
        kv = rows.view(-1, bs, kvh, 2 * hd).index_select(0, b.blocks.reshape(-1)).view(g, nb * bs, kvh, 2 * hd)
        k, v = kv[..., :hd], kv[..., hd:]
        if b.key_rot is not None:
            k[b.rot_groups] = rotate(k[b.rot_groups], *b.key_rot)  # in the gathered copy, not the cache
        q = rotate(query[b.q_rows].view(g, qm, h, hd), *b.q_rot)
        if h != kvh:
            k, v = (x.repeat_interleave(h // kvh, dim=2) for x in (k, v))
        # 3. Attend, causal by rank.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=b.mask, scale=self.impl.scale)  # (G, h, Qm, hd)
        out[b.q_rows[b.q_valid]] = o.transpose(1, 2).reshape(g, qm, h * hd)[b.q_valid]
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
        # their first block, which ``HeldBlocks`` never releases while the request lives.
        self.requests: dict[int, RequestState] = {}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self._plan(input_ids)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def retain(self, first_blocks: set[int]) -> int:
        """Forget every request whose first block is not in ``first_blocks`` (the live ones);
        returns how many are left. A finished, aborted or preempted story's first block was
        freed, so its state is garbage: ``SinkWorkerExtension`` relays the live set."""
        for key in set(self.requests) - set(first_blocks):
            del self.requests[key]
        return len(self.requests)

    def _plan(self, input_ids: torch.Tensor) -> None:
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if meta is None:
            self.step.batch = None
            return
        m = meta[self.layer_names[0]] if isinstance(meta, dict) else meta
        qsl, seq_lens, table = m.query_start_loc.tolist(), m.seq_lens.tolist(), m.block_table
        bs = ctx.no_compile_layers[self.layer_names[0]].kv_cache.shape[2]
        ids = input_ids.tolist()
        plans, blocks = [], []
        for r in range(len(seq_lens)):
            q0, q1, end = qsl[r], qsl[r + 1], seq_lens[r]
            first = end - (q1 - q0)
            st = self._request(int(table[r, 0]), first, bs)
            plans.append(plan_request(st, first, ids[q0:q1], q0))
            blocks.append(storage_blocks(table[r], plans[-1].entries))
        cos_sin = self.model.layers[0].self_attn.rotary_emb.cos_sin_cache.to(self.lm_head.weight.dtype)
        self.step.batch = build_batch(plans, blocks, bs, cos_sin)

    def _request(self, first_block: int, first: int, block_size: int) -> RequestState:
        if first == 0:  # a new request (or a recomputed one) owns this first block now
            self.requests[first_block] = RequestState(SinkTracker(self.policy), HeldBlocks(block_size))
        st = self.requests[first_block]
        if st.tracker.n != first:
            raise RuntimeError(f"the request of block {first_block} has seen {st.tracker.n} tokens, "
                               f"the step starts at {first}")
        return st


class SinkWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so the engine can reach the model
    through ``collective_rpc``, vLLM's public route for it."""

    def seedstory_retain(self, first_blocks: list[int]) -> int:
        return self.model_runner.get_model().retain(set(first_blocks))

    def seedstory_states(self) -> int:
        return len(self.model_runner.get_model().requests)
