"""Stage 5: the MLLM fine-tuned to read stories the way the served attention sink lets it.

The mllm stage trains on whole windows: every token sees every earlier token of its window, at
positions 0, 1, 2, ... Under the sink, a token written after the window has moved on sees only
what the policy kept (the sink, each old picture's ``<img>``/``</img>`` neighbourhoods, the
window), at positions by rank in that kept set, and the keys and values it reads are those each
kept token got when *it* was written, under its own kept set: a context the mllm stage never
shows the model, and on which the eval's long multimodal-sink stories fail
(docs/results.md#the-four-mode-eval).

This stage trains on whole stories under exactly those rules, so every token of a story is a
target with the context generation gives it, with the mllm stage's two losses: caption
cross-entropy (``token_loss``) and the cosine regression of the heads' features, read off the
final-norm hidden rows at each picture's query positions, against the story's features (every
picture is written here: the mllm stage teaches given ones; the opening weighs as much as the
later pictures together, as there). ``dense_share`` of the steps read their stories densely
instead, the mllm stage's context, so that the new contexts need not erase the old.

``attention_groups`` (plain data) cuts a story at its ``</img>`` marks, the only tokens at which
the kept set changes shape: a group's queries all read one kept context and then each other,
causally. ``sink_forward`` runs the model layer by layer; at each layer every group attends over
its kept keys rotated to their ranks, and the next layer's keys come from those outputs, as the
KV cache's do. ``tests/test_sink_stage.py`` checks the final-norm hidden states (the query rows
among them) and the log-probabilities against the plain-torch sink reference, token by token.

The policy is the one the service runs (``seedstory train`` passes ``ray_config.yaml``'s sink,
``--config`` and the sink flags override it), resolved against the checkpoint's pictures.
"""

from __future__ import annotations

from functools import cache

from actors.checkpoint import read_manifest
from actors.mllm.sink import SinkParams, SinkSettings, SinkTracker, positions
from training.data import endless_batches, window_features
from training.stages.mllm import (  # noqa: F401  (the mllm stage's model, losses and export)
    REGRESSION_WEIGHT,
    export,
    first_pictures,
    init,
    picture_rows,
    regression_loss,
    token_layout,
    token_loss,
)

Group = tuple[list[int], int, int]  # (kept positions read before the queries, first query, end of queries)


def policy(spec, step: int = 0) -> SinkParams:
    """The sink settings a step reads its stories under, resolved against the checkpoint's pictures
    and marker ids (once: ``loss`` asks every step): the stage's sink, or dense on the steps that
    ``reads_densely`` picks."""
    sink = dict(spec.sink or {})
    if reads_densely(step, spec.dense_share):
        sink["mode"] = "dense"
    return _policy(spec.ckpt, tuple(sorted(sink.items())))


def reads_densely(step: int, share: float) -> bool:
    """Whether ``step`` is one of the dense ones: spread evenly, ``share`` of any run of steps."""
    return int((step + 1) * share) > int(step * share)


@cache
def _policy(ckpt: str, sink: tuple) -> SinkParams:
    manifest = read_manifest(ckpt)
    settings = SinkSettings(**dict(sink)).for_pictures(manifest.num_queries)
    return settings.with_ids(manifest.tokens.boi, manifest.tokens.eoi)


def attention_groups(ids: list[int], sink: SinkParams) -> list[Group]:
    """Queries [lo, hi) that share one kept context: query i reads ``context + [lo, i]``.

    The kept set of a token changes shape only at a ``</img>`` (it closes a segment, and the one
    leaving the window goes with it, already for the ``</img>``'s own query), so a group starts at
    each ``</img>`` and runs to the next: one segment's worth of queries each. (Groups that lose
    nothing could be joined, but ``sink_forward`` pads every group to the longest, so short ones
    are what keep it cheap.)
    """
    starts = [0] + [i for i, x in enumerate(ids) if x == sink.eoi_id and i > 0]
    tracker, groups = SinkTracker(sink), []  # the engine's own incremental form of the policy
    for lo, hi in zip(starts, starts[1:] + [len(ids)]):
        tracker.extend(ids[tracker.seen : lo + 1])
        groups.append((positions(tracker.kept())[:-1], lo, hi))  # lo itself is the group's first query
    return groups


def sink_forward(model, ids: list[int], sink: SinkParams):
    """Final-norm hidden states (n, hidden) of a whole story read under the sink, every token as
    generation reads it (its logits: ``model.lm_head`` of them). Each layer runs every group at
    once: the groups' kept keys gathered and padded side by side."""
    import torch

    llama, config = model.model, model.config
    head_dim, repeats = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    groups = padded_groups(attention_groups(ids, sink), model.device)
    hidden = llama.embed_tokens(torch.tensor(ids, device=model.device))  # (n, d)
    cos, sin = (t[0] for t in llama.rotary_emb(hidden, groups["ranks"][None]))  # (L, hd): ranks 0..L-1
    for layer in llama.layers:
        attn, h = layer.self_attn, layer.input_layernorm(hidden)
        q, k, v = (
            proj(h).view(len(ids), -1, head_dim).transpose(0, 1)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        out = group_attention(q, k, v, groups, cos, sin, attn.scaling, repeats)  # (n, heads * hd)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return llama.norm(hidden)


def padded_groups(groups: list[Group], device) -> dict:
    """The groups as index tensors: each group's keys (its context, then its queries) and queries,
    padded to the longest; the causal mask by rank; which padded queries are real."""
    import torch

    keys = [c + list(range(lo, hi)) for c, lo, hi in groups]
    # L: the most keys of a group, M: the most queries (the shapes below are in G groups, M, L)
    most_keys, most_queries = max(map(len, keys)), max(hi - lo for _, lo, hi in groups)
    key_idx = torch.tensor([k + [0] * (most_keys - len(k)) for k in keys])
    first = torch.tensor([len(c) for c, _, _ in groups])  # the rank of each group's first query
    queries = torch.tensor([hi - lo for _, lo, hi in groups])
    real = torch.arange(most_queries)[None] < queries[:, None]  # (G, M)
    q_rank = (first[:, None] + torch.arange(most_queries)[None]).clamp(max=most_keys - 1)
    q_idx = key_idx.gather(1, q_rank)
    mask = torch.arange(most_keys)[None, None] <= q_rank[:, :, None]  # (G, M, L): causal by rank
    return {
        "keys": key_idx.to(device),
        "q_idx": q_idx.to(device),
        "q_rank": q_rank.to(device),
        "mask": mask[:, None].to(device),
        "real": real.to(device),
        "ranks": torch.arange(most_keys, device=device),
    }


def group_attention(q, k, v, groups: dict, cos, sin, scale: float, repeats: int):
    """All groups at once: queries (heads, n, hd), keys and values (kv_heads, n, hd) of the whole
    story, each group's keys rotated to their ranks in its kept set; ``repeats``: query heads per
    key-value head. Returns (n, heads * hd)."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import rotate_half

    # (heads, G, M|L, hd)
    qg, kg, vg = (gather(t, groups[i]) for t, i in ((q, "q_idx"), (k, "keys"), (v, "keys")))
    qc, qs = cos[groups["q_rank"]], sin[groups["q_rank"]]  # (G, M, hd)
    qg = qg * qc + rotate_half(qg) * qs
    kg = kg * cos + rotate_half(kg) * sin
    out = F.scaled_dot_product_attention(
        qg.transpose(0, 1),
        kg.transpose(0, 1).repeat_interleave(repeats, 1),
        vg.transpose(0, 1).repeat_interleave(repeats, 1),
        attn_mask=groups["mask"],
        scale=scale,
    )  # (G, heads, M, hd)
    out = out.permute(0, 2, 1, 3)[groups["real"]]  # (n, heads, hd): groups tile the story in order
    return out.reshape(out.shape[0], -1)


def gather(x, idx):
    """x[:, idx] for x (heads, n, hd) and idx (G, L), through index_select: its backward adds
    rows (index_add) where advanced indexing's accumulates element by element, far slower on CPU."""
    return x.index_select(1, idx.flatten()).view(x.shape[0], *idx.shape, x.shape[-1])


def batches(shard, spec):
    """Batches of whole stories: their ids, where each one's loss starts (its first ``<img>``: the
    opening caption is the user's), and each one's pictures' features (pictures, Q, D) float32."""
    import torch

    manifest = read_manifest(spec.ckpt)
    boi, shape = manifest.tokens.boi, (manifest.num_queries, manifest.feature_dim)
    for batch in endless_batches(shard, spec.batch_size, spec.seed):
        stories = [[int(x) for x in ids] for ids in batch["input_ids"]]
        yield {
            "stories": stories,
            "loss_from": [s.index(boi) for s in stories],
            "features": [torch.from_numpy(window_features(data, shape)) for data in batch["features"]],
        }


def loss(models: dict, batch: dict, spec, step: int):
    import torch
    import torch.nn.functional as F

    sink, model, heads = policy(spec, step), models["mllm"], models["heads"]
    layout = token_layout(spec.ckpt)
    hidden = [sink_forward(model, ids, sink) for ids in batch["stories"]]
    targets = [torch.tensor(ids[1:], device=model.device) for ids in batch["stories"]]
    in_loss = [
        torch.arange(len(ids) - 1, device=model.device) >= start - 1
        for ids, start in zip(batch["stories"], batch["loss_from"])
    ]
    logits = model.lm_head(torch.cat([h[:-1] for h in hidden]))
    caption_loss = token_loss(logits, torch.cat(targets), torch.cat(in_loss), layout)
    rows, features, story_of = [], [], []
    for story, (h, ids, story_features) in enumerate(zip(hidden, batch["stories"], batch["features"])):
        _, at = picture_rows(torch.tensor([ids], device=model.device), layout.boi, layout.num_queries)
        if len(at) != len(story_features):
            raise ValueError(
                f"a story has {len(at)} pictures in its ids but {len(story_features)} in its features"
            )
        rows.append(h[at])  # (P, Q, hidden): every picture of the story, in order
        features.append(story_features.to(model.device))
        story_of += [story] * len(at)
    rows, features = torch.cat(rows), torch.cat(features)
    per_picture = F.cosine_similarity(heads.features(rows), features, dim=-1).mean(-1)  # (P,)
    # as in the mllm stage, the opening weighs as much as all later pictures together: it is the
    # one picture drawn from a caption that names every look
    openings = first_pictures(torch.tensor(story_of, device=model.device))
    total = caption_loss + REGRESSION_WEIGHT * regression_loss(per_picture, openings)
    return total, {
        "caption_ce": float(caption_loss.detach()),
        "cosine": float(per_picture.detach().mean()),
        "opening_cosine": float(per_picture.detach()[openings].mean()),
        "dense": float(sink.mode == "dense"),
    }
