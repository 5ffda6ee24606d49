"""Stage 5: the MLLM fine-tuned to read stories the way the served attention sink lets it.

The mllm stage trains on whole windows: every token sees every earlier token of its window, at
positions 0, 1, 2, ... Under the sink, a token written after the window has moved on sees only
what the policy kept (the sink, each old picture's ``<img>``/``</img>`` neighbourhoods, the
window), at positions by rank in that kept set, and the keys and values it reads are those each
kept token got when *it* was written, under its own kept set. The eval found the multimodal
sink's captions failing after segment 18 (README, "Evaluation"): the model never saw that.

This stage trains on whole stories under exactly those rules, so every token of a story is a
target with the context generation gives it. ``attention_groups`` (plain data) cuts a story at
its ``</img>`` marks, the only tokens at which the kept set changes shape: a group's queries all
read one kept context and then each other, causally. ``sink_forward`` runs the model layer by
layer; at each layer every group attends over its kept keys rotated to their ranks, and the
next layer's keys come from those outputs, as the KV cache's do. ``tests/test_sink_stage.py``
checks the log-probabilities against the plain-torch sink reference, token by token.

The policy is the one the service runs (``seedstory train`` passes ``ray_config.yaml``'s sink,
``--config`` and the sink flags override it), resolved against the checkpoint's pictures.
"""

from __future__ import annotations

from functools import cache

from actors.checkpoint import read_manifest
from actors.mllm.sink import SinkParams, SinkSettings, SinkTracker, positions
from training.data import endless_batches
from training.stages.mllm import export, init, token_loss  # noqa: F401  (the mllm stage's model and export)

Group = tuple[list[int], int, int]  # (kept positions read before the queries, first query, end of queries)


def policy(spec) -> SinkParams:
    """The stage's sink settings, resolved against the checkpoint's pictures and marker ids (once:
    ``loss`` asks every step)."""
    return _policy(spec.ckpt, tuple(sorted((spec.sink or {}).items())))


@cache
def _policy(ckpt: str, sink: tuple) -> SinkParams:
    m = read_manifest(ckpt)
    return SinkSettings(**dict(sink)).for_pictures(m.num_queries).with_ids(m.tokens.boi, m.tokens.eoi)


def attention_groups(ids: list[int], p: SinkParams) -> list[Group]:
    """Queries [lo, hi) that share one kept context: query i reads ``context + [lo, i]``.

    The kept set of a token changes shape only at a ``</img>`` (it closes a segment, and the one
    leaving the window goes with it, already for the ``</img>``'s own query), so a group starts at
    each ``</img>`` and runs to the next: one segment's worth of queries each. (Groups that lose
    nothing could be joined, but ``sink_forward`` pads every group to the longest, so short ones
    are what keep it cheap.)
    """
    starts = [0] + [i for i, x in enumerate(ids) if x == p.eoi_id and i > 0]
    tracker, groups = SinkTracker(p), []  # the engine's own incremental form of the policy
    for lo, hi in zip(starts, starts[1:] + [len(ids)]):
        tracker.extend(ids[tracker.n:lo + 1])
        groups.append((positions(tracker.kept())[:-1], lo, hi))  # lo itself is the group's first query
    return groups


def sink_forward(model, ids: list[int], p: SinkParams):
    """Logits (n, vocab) of a whole story read under the sink, every token as generation reads it.
    Each layer runs every group at once: the groups' kept keys gathered and padded side by side."""
    import torch

    m, cfg = model.model, model.config
    hd, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    g = padded_groups(attention_groups(ids, p), model.device)
    x = m.embed_tokens(torch.tensor(ids, device=model.device))  # (n, d)
    cos, sin = (t[0] for t in m.rotary_emb(x, g["ranks"][None]))  # (L, hd): ranks 0..L-1
    for layer in m.layers:
        a, h = layer.self_attn, layer.input_layernorm(x)
        q, k, v = (proj(h).view(len(ids), -1, hd).transpose(0, 1) for proj in (a.q_proj, a.k_proj, a.v_proj))
        o = group_attention(q, k, v, g, cos, sin, a.scaling, rep)  # (n, heads * hd)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(m.norm(x))


def padded_groups(groups: list[Group], device) -> dict:
    """The groups as index tensors: each group's keys (its context, then its queries) and queries,
    padded to the longest; the causal mask by rank; which padded queries are real."""
    import torch

    keys = [c + list(range(lo, hi)) for c, lo, hi in groups]
    L, M = max(map(len, keys)), max(hi - lo for _, lo, hi in groups)
    key_idx = torch.tensor([k + [0] * (L - len(k)) for k in keys])
    first = torch.tensor([len(c) for c, _, _ in groups])  # the rank of each group's first query
    real = torch.arange(M)[None] < torch.tensor([hi - lo for _, lo, hi in groups])[:, None]  # (G, M)
    q_rank = (first[:, None] + torch.arange(M)[None]).clamp(max=L - 1)
    q_idx = key_idx.gather(1, q_rank)
    mask = torch.arange(L)[None, None] <= q_rank[:, :, None]  # (G, M, L): causal by rank
    return {"keys": key_idx.to(device), "q_idx": q_idx.to(device), "q_rank": q_rank.to(device),
            "mask": mask[:, None].to(device), "real": real.to(device), "ranks": torch.arange(L, device=device)}


def group_attention(q, k, v, g: dict, cos, sin, scale: float, rep: int):
    """All groups at once: queries (heads, n, hd), keys and values (kv_heads, n, hd) of the whole
    story, each group's keys rotated to their ranks in its kept set. Returns (n, heads * hd)."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import rotate_half

    qg, kg, vg = (gather(t, g[i]) for t, i in ((q, "q_idx"), (k, "keys"), (v, "keys")))  # (heads, G, M|L, hd)
    qc, qs = cos[g["q_rank"]], sin[g["q_rank"]]             # (G, M, hd)
    qg = qg * qc + rotate_half(qg) * qs
    kg = kg * cos + rotate_half(kg) * sin
    o = F.scaled_dot_product_attention(qg.transpose(0, 1), kg.transpose(0, 1).repeat_interleave(rep, 1),
                                       vg.transpose(0, 1).repeat_interleave(rep, 1), attn_mask=g["mask"],
                                       scale=scale)         # (G, heads, M, hd)
    o = o.permute(0, 2, 1, 3)[g["real"]]                    # (n, heads, hd): groups tile the story in order
    return o.reshape(o.shape[0], -1)


def gather(x, idx):
    """x[:, idx] for x (heads, n, hd) and idx (G, L), through index_select: its backward adds
    rows (index_add) where advanced indexing's accumulates element by element, far slower on CPU."""
    return x.index_select(1, idx.flatten()).view(x.shape[0], *idx.shape, x.shape[-1])


def batches(shard, spec):
    """Batches of whole stories: their ids and where each one's loss starts (its first ``<img>``:
    the opening caption is the user's)."""
    boi = read_manifest(spec.ckpt).tokens.boi
    for batch in endless_batches(shard, spec.batch_size, spec.seed):
        stories = [[int(x) for x in ids] for ids in batch["input_ids"]]
        yield {"stories": stories, "loss_from": [s.index(boi) for s in stories]}


def loss(models: dict, batch: dict, spec, step: int):
    import torch

    p, model = policy(spec), models["mllm"]
    logits = [sink_forward(model, ids, p)[:-1] for ids in batch["stories"]]
    targets = [torch.tensor(ids[1:], device=model.device) for ids in batch["stories"]]
    from_ = [torch.arange(len(ids) - 1, device=model.device) >= start - 1
             for ids, start in zip(batch["stories"], batch["loss_from"])]
    return token_loss(torch.cat(logits), torch.cat(targets), torch.cat(from_), spec)
