"""Stage 1: the visual tokenizer (encoder -> resampler -> Q feature rows), by reconstruction.

Loss: pixel MSE of the decoder's reconstruction from the features, weighted towards the
foreground. Plain MSE is dominated by the large flat backgrounds: a first run learned the place
and left the characters (a tenth of the pixels, but what a story is about) out of the
representation, so pixels far from their row's median colour weigh ``FOREGROUND_WEIGHT`` times
more. There is no codebook to keep alive: the features are continuous
(docs/architecture.md#5-decisions-and-why).
"""

from __future__ import annotations

import torch

from actors.checkpoint import part_dir, read_manifest, write_atomically
from actors.tokenizer.model import VisualTokenizer
from training.data import image_batches

FOREGROUND_WEIGHT = 10.0
FOREGROUND_DISTANCE = 0.2  # mean absolute channel difference (images in [-1, 1])


def init(spec) -> dict:
    return {"visual": VisualTokenizer.from_pretrained(part_dir(spec.ckpt, "visual_tokenizer")).train()}


def batches(shard, spec):
    return image_batches(shard, spec.batch_size, spec.seed)


def loss(models: dict, images: torch.Tensor, spec, step: int) -> tuple[torch.Tensor, dict]:
    visual = models["visual"]
    rec = weighted_mse(visual.decode(visual.latents(images)), images)
    return rec, {"recon": float(rec)}


def weighted_mse(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Pixel MSE with the characters weighing ``FOREGROUND_WEIGHT`` times more than the background."""
    weight = foreground_weight(images)
    return (weight * (recon - images) ** 2).mean() / weight.mean()


@torch.no_grad()
def foreground_weight(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): FOREGROUND_WEIGHT where a pixel is far from its row's median colour, else 1.
    Scenes are bands of sky and ground, so the row median is the background."""
    median = images.median(dim=3, keepdim=True).values  # (B, 3, H, 1)
    far = (images - median).abs().mean(1, keepdim=True) > FOREGROUND_DISTANCE
    return 1.0 + (FOREGROUND_WEIGHT - 1.0) * far.float()


def export(parts: dict, spec, metrics: dict) -> None:
    dtype = read_manifest(spec.ckpt).dtype
    with write_atomically(part_dir(spec.ckpt, "visual_tokenizer")) as tmp:
        parts["visual"].eval().save_pretrained(tmp, dtype)
