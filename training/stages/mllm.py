"""Stage 4: the MLLM and its picture heads on pre-tokenized StoryStream windows.

A window is ``<s> cap0 <img> q.. </img> cap1 <img> q.. </img> ... capN <img> q.. </img>`` (the
embedded model: 15 segments), where ``q..`` are the Q query ids, the same for every picture. The
model writes a picture through its final-norm hidden states at those Q positions, which the
output head maps to the picture's features, as SEED-Story and SEED-X do. Two losses:

- captions: next-token cross-entropy on every caption token after the opening one and on each
  ``<img>`` (when to draw). The query ids and ``</img>`` are forced by the grammar, so they are
  no targets. The opening caption carries none: at generation it is always the user's.
- pictures: ``1 - cosine`` between the head's features and the visual tokenizer's, row by row.
  Cosine, not MSE: the tokenizer's features are unit vectors, the head's are normalised too, so
  the two differ only by a factor of 2 in value, and cosine stays on the scale of one row
  whatever D is, so its weight beside the cross-entropy need not change with the preset.

Given pictures: a window's first picture is given with probability ``GIVEN_FIRST``, a later one
with ``GIVEN_LATER``. A given picture's query positions take the input head's rows of its true
features in place of the query embeddings (a start image or a picture of ``story_so_far`` at
serving), and it carries no regression loss. The causal mask lets each target see only earlier
segments, as at generation; every segment is a target, not only the last (SEED-Story's choice),
so a window gives a picture's worth of signal per segment.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from actors.checkpoint import part_dir, read_manifest, write_atomically
from actors.mllm.heads import PictureHeads
from actors.mllm.model import load_mllm
from training.data import token_batches

REGRESSION_WEIGHT = 1.0
GIVEN_FIRST = 0.5
GIVEN_LATER = 0.05


def init(spec) -> dict:
    return {
        "mllm": load_mllm(part_dir(spec.ckpt, "mllm")).train(),
        "heads": PictureHeads.from_pretrained(part_dir(spec.ckpt, "heads")).train(),
    }


def batches(shard, spec):
    manifest = read_manifest(spec.ckpt)
    shape = (manifest.num_queries, manifest.feature_dim)
    return token_batches(shard, spec.batch_size, spec.seed, manifest.tokens.pad, shape)


def loss(models: dict, batch: dict, spec, step: int) -> tuple[torch.Tensor, dict]:
    mllm, heads, layout = models["mllm"], models["heads"], token_layout(spec.ckpt)
    ids = batch["input_ids"]
    pictures = picture_rows(ids, layout.boi, layout.num_queries)  # (P, Q) window and position indices
    features = torch.cat(batch["features"]).to(ids.device)  # (P, Q, D), the same order
    given = choose_given(pictures[0][:, 0])
    embeds = mllm.get_input_embeddings()(ids)
    if given.any():
        at_given = (pictures[0][given].flatten(), pictures[1][given].flatten())
        embeds = embeds.index_put(at_given, heads.embeddings(features[given]).flatten(0, 1).to(embeds.dtype))
    hidden = mllm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    caption_loss = token_loss(
        mllm.lm_head(hidden[:, :-1]), ids[:, 1:], batch["loss_mask"][:, 1:].bool(), layout
    )
    written = ~given
    predicted = heads.features(hidden[pictures[0][written], pictures[1][written]])  # (Pw, Q, D)
    per_picture = F.cosine_similarity(predicted, features[written], dim=-1).mean(dim=1)  # (Pw,)
    cosine = per_picture.mean()
    total = caption_loss + REGRESSION_WEIGHT * regression_loss(
        per_picture, first_pictures(pictures[0][:, 0])[written]
    )
    return total, {
        "caption_ce": float(caption_loss.detach()),
        "cosine": float(cosine.detach()),
        "given": float(given.float().mean()),
    }


@cache
def token_layout(ckpt: str):
    """The checkpoint's token layout, read once per process (``loss`` asks every step)."""
    return read_manifest(ckpt).tokens


def picture_rows(ids: torch.Tensor, boi: int, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every picture of the batch, window by window in order: its window index and its Q query
    positions, as two (P, Q) index tensors (the rows after each ``<img>``)."""
    windows, starts = (ids == boi).nonzero(as_tuple=True)
    offsets = torch.arange(1, num_queries + 1, device=ids.device)
    return windows[:, None].expand(-1, num_queries), starts[:, None] + offsets


def first_pictures(windows: torch.Tensor) -> torch.Tensor:
    """(P,) window index of each picture, in order -> whether it is its window's first."""
    first = torch.ones_like(windows, dtype=torch.bool)
    first[1:] = windows[1:] != windows[:-1]
    return first


def regression_loss(cosines: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``1 - cosine``, the windows' first pictures weighing as much as all the later ones together.

    A window's first picture is drawn from its own caption, which names every look (the opening,
    in the returning world); a later one must find its looks by name, which the model cannot do
    at first. With every picture weighted alike, the later pictures' pull towards the mean look
    undid in 100 steps what the opening stage taught (teacher-forced probe: the opening's looks
    0.91 right, then 0.02); this keeps the opening's share of the loss at a half.
    """
    loss = (1 - cosines[first]).mean() if first.any() else cosines.new_zeros(())
    return loss + ((1 - cosines[~first]).mean() if (~first).any() else cosines.new_zeros(()))


def choose_given(windows: torch.Tensor) -> torch.Tensor:
    """(P,) which pictures are given: each window's first with GIVEN_FIRST, the others with GIVEN_LATER."""
    first = first_pictures(windows)
    chance = torch.where(first, GIVEN_FIRST, GIVEN_LATER)
    return torch.rand(len(windows), device=windows.device) < chance


def token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, layout) -> torch.Tensor:
    """Next-token cross-entropy over the targets under ``mask`` that the grammar does not force
    (query ids and ``</img>``)."""
    forced = (targets >= layout.query_base) & (targets < layout.query_base + layout.num_queries)
    chosen = mask & ~forced & (targets != layout.eoi)
    return F.cross_entropy(logits[chosen], targets[chosen])


def export(parts: dict, spec, metrics: dict) -> None:
    dtype = read_manifest(spec.ckpt).dtype
    with write_atomically(part_dir(spec.ckpt, "mllm")) as tmp:
        parts["mllm"].eval().to(getattr(torch, dtype)).save_pretrained(tmp)
    with write_atomically(part_dir(spec.ckpt, "heads")) as tmp:
        parts["heads"].eval().save_pretrained(tmp, dtype)
