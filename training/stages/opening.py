"""Stage 4a, before the MLLM stage: the opening picture alone, drawn from its caption.

A returning-world opening caption names every character with its look ("Rux the striped
purple diamond, Zara the orange pentagon, ...") and its picture draws them all. Trained on whole
windows from the start, the MLLM learns the places and where the characters stand, and draws
every character with the mean look: after 400 steps of the mllm stage a teacher-forced probe
(``benchmarks/look_probe.py``) judged colour, shape and pattern at chance, the opening picture
included. Most of a window's pictures cannot be drawn right until the model can find a look by
a name said long before, and their pull towards the mean look drowns the opening's signal.

This stage trains the MLLM and its output head on the opening picture of each window only:
the windows are cut after their first ``</img>`` and the loss is ``1 - cosine`` against the
tokenizer's features, as in the mllm stage. The model then writes the looks that its caption
names; the mllm stage after it teaches it to find them again by name. Nothing is given here:
the opening picture is the one target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.stages.mllm import batches, export, init, token_layout

__all__ = ["init", "batches", "loss", "export"]


def loss(models: dict, batch: dict, spec, step: int) -> tuple[torch.Tensor, dict]:
    mllm, heads, layout = models["mllm"], models["heads"], token_layout(spec.ckpt)
    ids, first_boi = opening_cut(batch["input_ids"], layout)
    # Right padding and the causal mask: a window's rows after its own first </img> change none
    # of its opening's rows, so one cut at the longest opening serves the whole batch.
    mask = batch["attention_mask"][:, : ids.shape[1]]
    hidden = mllm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    positions = first_boi[:, None] + torch.arange(1, layout.num_queries + 1, device=ids.device)
    rows = hidden[torch.arange(len(ids), device=ids.device)[:, None], positions]  # (B, Q, H)
    target = torch.stack([features[0] for features in batch["features"]]).to(rows.device)  # (B, Q, D)
    cosine = F.cosine_similarity(heads.features(rows), target, dim=-1).mean()
    return 1 - cosine, {"cosine": float(cosine.detach())}


def opening_cut(ids: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) windows -> the columns up to the longest opening segment's ``</img>``, and each
    window's first ``<img>`` position (B,)."""
    first_eoi = (ids == layout.eoi).int().argmax(dim=1)
    return ids[:, : int(first_eoi.max()) + 1], (ids == layout.boi).int().argmax(dim=1)
