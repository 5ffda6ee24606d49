"""Stage 4: MLLM supervised fine-tuning on pre-tokenized StoryStream windows.

A window is ``<s> cap0 <img> v.. </img> cap1 <img> v.. </img> ... capN <img> v.. </img>``
(the embedded model: 15 segments). The loss (next-token cross-entropy) covers every token after
the opening caption: every picture with its markers and every later caption. The opening
caption carries none, because at generation it is always the user's. SEED-Story puts the loss
on the last segment only; here every segment is a target, so one window gives a picture's worth
of signal per segment instead of one, and the causal mask still lets each target see only
earlier segments, as at generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.checkpoint import part_dir, read_manifest, write_atomically
from actors.mllm.model import load_mllm
from training.data import token_batches


def init(spec) -> dict:
    return {"mllm": load_mllm(part_dir(spec.ckpt, "mllm")).train()}


def batches(shard, spec):
    return token_batches(shard, spec.batch_size, spec.seed, read_manifest(spec.ckpt).tokens.pad)


def loss(models: dict, batch: dict, spec, step: int) -> tuple[torch.Tensor, dict]:
    logits = models["mllm"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_loss(logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool(), spec)


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, spec
) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over the targets under ``mask``, and its picture and caption parts."""
    per_token = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)
    visual = mask & _is_visual(targets, spec)
    caption = mask & ~visual
    return per_token[mask].mean(), {
        "visual_ce": float(per_token[visual].mean()),
        "caption_ce": float(per_token[caption].mean()),
    }


_LAYOUTS: dict = {}


def _is_visual(ids: torch.Tensor, spec) -> torch.Tensor:
    """Visual tokens and the <img>/</img> markers count as the picture's loss."""
    if spec.ckpt not in _LAYOUTS:
        _LAYOUTS[spec.ckpt] = read_manifest(spec.ckpt).tokens
    layout = _LAYOUTS[spec.ckpt]
    codes = (ids >= layout.visual_base) & (ids < layout.visual_base + layout.num_codes)
    return codes | (ids == layout.boi) | (ids == layout.eoi)


def export(parts: dict, spec, metrics: dict) -> None:
    dtype = read_manifest(spec.ckpt).dtype
    with write_atomically(part_dir(spec.ckpt, "mllm")) as tmp:
        parts["mllm"].eval().to(getattr(torch, dtype)).save_pretrained(tmp)
