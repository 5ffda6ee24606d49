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
vLLM's own cache write is never called and its kernels never read it
(docs/architecture.md#5-decisions-and-why).
vLLM's ``slot_mapping`` is position-based and is not used: under compaction it points into
blocks the story no longer holds.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from actors.mllm.sink import HeldBlocks, Ranges, SinkTracker, cdiv, merge
from actors.mllm.vllm_kv import SeedStorySinkSpec, query_ids, sink_params


# -- planning (per step, plain Python lists) -------------------------------------------------
@dataclass
class RequestState:
    """What the worker knows of a request: its policy marks, the block-list entries it holds, and
    the positions its storage holds (storage index i holds the i-th, its key rotated to rank i)."""

    tracker: SinkTracker
    held: HeldBlocks
    stored: Ranges = field(default_factory=list)
    laid_out: int = 0  # tracker.evictions when `stored` was laid out; if it moved on, compact
    # Final-norm hidden rows at its query positions, (position, row) in order, until handed out.
    picture_rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)


# Query tokens of one request in a step: its state, their positions, their rows in the step.
Capture = tuple[RequestState, list[int], list[int]]


@dataclass
class QueryGroup:
    """Queries of one request that see the same kept set (it changes only at a </img>).

    The group reads storage indices [0, extent); its queries are the last ``len(rows)`` of them.
    ``runs`` is None when it sees all of them at rank = storage index; after an eviction inside
    the step it sees only some, given as runs (storage index, rank seen here, length).
    """

    rows: range  # rows of this step's flattened tokens
    extent: int
    runs: list[tuple[int, int, int]] | None


@dataclass
class RequestPlan:
    groups: list[QueryGroup]
    writes: range  # storage indices of this step's tokens, their keys rotated to them
    moves: list[tuple[int, int, int]]  # (from, to, length) runs of storage indices, done before any write
    entries: list[int]  # block-list entries that storage index i // block_size lives in


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


def plan_request(state: RequestState, first: int, new_ids: list[int], row0: int) -> RequestPlan:
    """Plan the queries at positions [first, first + len(new_ids)) of one request.

    Query i sees kept_ranges(ids[:i+1]). That set changes only when ids[i] is </img>, so the
    queries between two </img> form one group (causal masking by rank inside it).
    """
    tracker, scheduled = state.tracker, len(new_ids)
    # As of `first`: how many tokens the storage must hold now, and the evictions so far.
    num_kept, evictions = tracker.kept_count(), tracker.evictions
    kept, moves = state.stored, []
    if evictions != state.laid_out:  # a </img> pushed a segment out since the storage was laid out
        kept = tracker.kept()
        moves = [run for run in rank_runs(state.stored, kept) if run[0] != run[1]]
    entries = state.held.step(first, scheduled, num_kept)
    layout = merge(kept + [(first, first + scheduled)])  # storage after the moves and writes
    eoi = tracker.params.eoi_id
    cuts = [0] + [j for j in range(1, scheduled) if new_ids[j] == eoi] + [scheduled]
    groups, seen = [], 0
    for start, stop in zip(cuts, cuts[1:]):  # one group of queries per span between two </img>
        tracker.extend(new_ids[seen : start + 1])
        seen = start + 1
        rows = range(row0 + start, row0 + stop)
        runs = None  # nothing evicted since `first`: storage order is rank order
        if tracker.evictions != evictions:
            runs = rank_runs(layout, merge(tracker.kept() + [(first + start, first + stop)]))
        groups.append(QueryGroup(rows, num_kept + stop, runs))
    tracker.extend(new_ids[seen:])
    state.stored, state.laid_out = layout, evictions
    return RequestPlan(groups, range(num_kept, num_kept + scheduled), moves, entries)


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
    move_rot: tuple | None  # cos, sin of each moved key's rank change: (M, 1, hd/2)
    write_rows: torch.Tensor  # rows of this step's tokens, and the slots they are written to
    write_slots: torch.Tensor
    write_rot: tuple  # cos, sin of their ranks: (W, 1, hd/2)
    blocks: torch.Tensor  # (G, NB) the blocks each group reads, in storage order (padding: 0, masked)
    q_rows: torch.Tensor  # (G, Qm) rows of this step's tokens (padding: row 0, dropped)
    q_valid: torch.Tensor  # (G, Qm)
    q_rot: tuple  # cos, sin of query ranks: (G, Qm, 1, hd/2)
    mask: torch.Tensor  # (G, 1, Qm, NB * block_size) causal by rank, unseen and padding masked
    rot_groups: torch.Tensor | None  # (S,) groups that saw an eviction inside this step, and
    key_rot: tuple | None  # cos, sin of their key rank corrections (S, N, 1, hd/2)


def _runs_index(runs: list[tuple[int, int, int]], col: int, dev) -> torch.Tensor:
    return torch.cat([torch.arange(r[col], r[col] + r[2], dtype=torch.long, device=dev) for r in runs])


def _moves(plans: list[RequestPlan], slot_maps: list[torch.Tensor], cos_sin: torch.Tensor) -> tuple:
    moving = [(plan.moves, sm) for plan, sm in zip(plans, slot_maps) if plan.moves]
    if not moving:
        return None, None, None
    dev = cos_sin.device
    src = [_runs_index(runs, 0, dev) for runs, _ in moving]
    dst = [_runs_index(runs, 1, dev) for runs, _ in moving]
    return (
        torch.cat([sm[i] for (_, sm), i in zip(moving, src)]),
        torch.cat([sm[i] for (_, sm), i in zip(moving, dst)]),
        rope_of(cos_sin, torch.cat([d - i for i, d in zip(src, dst)])),
    )


def build_batch(
    plans: list[RequestPlan], blocks: list[torch.Tensor], block_size: int, cos_sin: torch.Tensor
) -> StepBatch:
    dev = cos_sin.device
    slot_maps = [(b[:, None] * block_size + torch.arange(block_size, device=dev)).reshape(-1) for b in blocks]
    move_src, move_dst, move_rot = _moves(plans, slot_maps, cos_sin)
    writes = torch.cat([torch.arange(p.writes.start, p.writes.stop, device=dev) for p in plans])
    write_rows = torch.cat(
        [
            torch.arange(p.groups[0].rows.start, p.groups[0].rows.start + len(p.writes), device=dev)
            for p in plans
        ]
    )
    write_slots = torch.cat([sm[p.writes.start : p.writes.stop] for p, sm in zip(plans, slot_maps)])
    # Every group reads whole blocks of its story's storage (cheaper than gathering rows one by one).
    groups = [(g, b) for plan, b in zip(plans, blocks) for g in plan.groups]
    used = [cdiv(g.extent, block_size) for g, _ in groups]  # blocks each group reads
    blocks_per_group = max(used)
    max_queries = max(len(g.rows) for g, _ in groups)
    read = torch.stack(
        [torch.cat((b[:n], b.new_zeros(blocks_per_group - n))) for (_, b), n in zip(groups, used)]
    )
    num_keys = blocks_per_group * block_size
    idx = torch.arange(num_keys, device=dev)
    extent = torch.tensor([g.extent for g, _ in groups], device=dev)
    key_ok = idx[None, :] < extent[:, None]  # (G, N)
    key_rank = idx[None, :].repeat(len(groups), 1)
    for i, (g, _) in enumerate(groups):
        if g.runs is not None:  # an eviction inside this step: this group sees a subset, at new ranks
            key_ok[i] = False
            key_ok[i, _runs_index(g.runs, 0, dev)] = True
            key_rank[i, _runs_index(g.runs, 0, dev)] = _runs_index(g.runs, 1, dev)
    q_len = torch.tensor([len(g.rows) for g, _ in groups], device=dev)
    query_cols = torch.arange(max_queries, device=dev)[None, :]
    q_store = (extent - q_len)[:, None] + query_cols  # queries are the last keys
    q_valid = query_cols < q_len[:, None]
    q_rows = (
        torch.stack([torch.arange(g.rows.start, g.rows.start + max_queries, device=dev) for g, _ in groups])
        * q_valid
    )
    q_rank = key_rank.gather(1, q_store.clamp(0, num_keys - 1))
    mask = key_ok[:, None, :] & (idx[None, None, :] <= q_store[:, :, None])
    # Only the groups that saw an eviction inside this step read keys at other ranks (rare: one
    # step per picture per story), so only they pay for the correction.
    rot_groups = key_rot = None
    slow = [i for i, (g, _) in enumerate(groups) if g.runs is not None]
    if slow:
        rot_groups = torch.tensor(slow, dtype=torch.long, device=dev)
        key_rot = rope_of(cos_sin, ((key_rank - idx[None, :]) * key_ok)[rot_groups])
    return StepBatch(
        move_src,
        move_dst,
        move_rot,
        write_rows,
        write_slots,
        rope_of(cos_sin, writes),
        read,
        q_rows,
        q_valid,
        rope_of(cos_sin, q_rank.clamp(min=0)),
        mask[:, None],
        rot_groups,
        key_rot,
    )


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

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output_shape=None,
        output_dtype=None,
    ) -> torch.Tensor:
        out = torch.zeros_like(query)
        batch = self.step.batch
        if batch is None:  # profiling run: no metadata, no cache
            return out
        hd, heads, kv_heads = self.head_size, self.num_heads, self.num_kv_heads
        rows = self.kv_cache.view(-1, kv_heads, 2 * hd)  # (slots, kv_heads, 2 * hd)
        # 0. Compaction: move kept rows down to their rank, re-rotating their keys. Before any
        #    write: the rows may sit in blocks released this step, or where new tokens go.
        if batch.move_src is not None:
            moved = rows[batch.move_src]  # a copy: sources and destinations may overlap
            moved[..., :hd] = rotate(moved[..., :hd], *batch.move_rot)
            rows[batch.move_dst] = moved
        # 1. Write this step's keys, rotated to their rank, and values.
        new_rows = batch.write_rows
        k_new = rotate(key[new_rows].view(-1, kv_heads, hd), *batch.write_rot)
        rows[batch.write_slots] = torch.cat((k_new, value[new_rows].view(-1, kv_heads, hd)), -1)
        # 2. Gather the visible rows of every group; correct ranks where this group sees others.
        (num_groups, num_blocks), max_queries = batch.blocks.shape, batch.q_rows.shape[1]
        block_size = self.kv_cache.shape[2]
        gathered = (
            rows.view(-1, block_size, kv_heads, 2 * hd)
            .index_select(0, batch.blocks.reshape(-1))
            .view(num_groups, num_blocks * block_size, kv_heads, 2 * hd)
        )
        keys, values = gathered[..., :hd], gathered[..., hd:]
        if batch.key_rot is not None:  # in the gathered copy, not the cache
            keys[batch.rot_groups] = rotate(keys[batch.rot_groups], *batch.key_rot)
        queries = rotate(query[batch.q_rows].view(num_groups, max_queries, heads, hd), *batch.q_rot)
        if heads != kv_heads:
            keys, values = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (keys, values))
        # 3. Attend, causal by rank.
        attended = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=batch.mask,
            scale=self.impl.scale,
        )  # (G, heads, Qm, hd)
        merged = attended.transpose(1, 2).reshape(num_groups, max_queries, heads * hd)
        out[batch.q_rows[batch.q_valid]] = merged[batch.q_valid]
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
        self.query_ids = query_ids(vllm_config.model_config.hf_config)
        # The runner's persistent input-id buffer, bound by SinkWorkerExtension.seedstory_bind: with
        # prompt embeds enabled, forward gets input_ids=None on every step (docs/architecture.md#6).
        self.input_id_buffer: torch.Tensor | None = None
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
        captures = self._plan(input_ids, len(positions))
        # Post-norm already: vLLM's LlamaModel applies the final norm before returning.
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        if captures:
            self._capture(hidden, captures)
        return hidden

    def _capture(self, hidden: torch.Tensor, captures: list[Capture]) -> None:
        """Keep the rows of this step's query tokens in their request's state: one gather."""
        rows = [row for _, _, request_rows in captures for row in request_rows]
        picked = hidden[torch.tensor(rows, dtype=torch.long, device=hidden.device)].unbind(0)
        start = 0
        for state, positions, request_rows in captures:
            state.picture_rows += zip(positions, picked[start : start + len(request_rows)])
            start += len(request_rows)

    def retain(self, first_blocks: set[int]) -> int:
        """Forget every request whose first block is not in ``first_blocks`` (the live ones);
        returns how many are left. A finished, aborted or preempted story's first block was
        freed, so its state is garbage: ``SinkWorkerExtension`` relays the live set."""
        for key in set(self.requests) - set(first_blocks):
            del self.requests[key]
        return len(self.requests)

    def _plan(self, input_ids: torch.Tensor | None, num_tokens: int) -> list[Capture]:
        """Plan the step's attention; returns the query tokens whose rows to keep."""
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if meta is None:
            self.step.batch = None
            return []
        if input_ids is None:  # a step with embeddings: the ids are in the runner's buffer
            input_ids = self.input_id_buffer[:num_tokens]
        layer_meta = meta[self.layer_names[0]] if isinstance(meta, dict) else meta
        query_starts, seq_lens = layer_meta.query_start_loc.tolist(), layer_meta.seq_lens.tolist()
        table = layer_meta.block_table
        block_size = ctx.no_compile_layers[self.layer_names[0]].kv_cache.shape[2]
        ids = input_ids.tolist()
        # The step's query-token rows, found in one tensor pass (most steps have none).
        is_query = (input_ids >= self.query_ids.start) & (input_ids < self.query_ids.stop)
        query_rows = is_query.nonzero().flatten().tolist()
        plans, blocks, captures = [], [], []
        for req in range(len(seq_lens)):
            q0, q1, end = query_starts[req], query_starts[req + 1], seq_lens[req]
            first = end - (q1 - q0)
            state = self._request(int(table[req, 0]), first, block_size)
            plans.append(plan_request(state, first, ids[q0:q1], q0))
            blocks.append(storage_blocks(table[req], plans[-1].entries))
            rows = query_rows[bisect.bisect_left(query_rows, q0) : bisect.bisect_left(query_rows, q1)]
            if rows:
                captures.append((state, [first + row - q0 for row in rows], rows))
        cos_sin = self.model.layers[0].self_attn.rotary_emb.cos_sin_cache.to(self.lm_head.weight.dtype)
        self.step.batch = build_batch(plans, blocks, block_size, cos_sin)
        return captures

    def _request(self, first_block: int, first: int, block_size: int) -> RequestState:
        if first == 0:  # a new request (or a recomputed one) owns this first block now
            self.requests[first_block] = RequestState(SinkTracker(self.policy), HeldBlocks(block_size))
        state = self.requests[first_block]
        if state.tracker.seen != first:
            raise RuntimeError(
                f"the request of block {first_block} has seen {state.tracker.seen} tokens, "
                f"the step starts at {first}"
            )
        return state
