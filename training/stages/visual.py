"""Stage 1: the visual tokenizer (encoder -> resampler -> VQ codebook), by reconstruction.

Loss: pixel MSE through the straight-through codes, weighted towards the foreground, plus
the VQ-VAE codebook and commitment terms. Plain MSE is dominated by the large flat
backgrounds: a first run learned the place and left the characters (a tenth of the pixels,
but what a story is about) out of the codes, so pixels far from their row's median colour
weigh ``FOREGROUND_WEIGHT`` times more. Dead codes (unused for ``RESTART_EVERY`` steps) are restarted on
encoder outputs of the current batch, so the codebook stays in use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.checkpoint import part_dir, read_manifest, write_atomically
from actors.tokenizer.model import VisualTokenizer
from training.data import image_batches

COMMITMENT = 0.25
FOREGROUND_WEIGHT = 10.0
FOREGROUND_DISTANCE = 0.2  # mean absolute channel difference (images in [-1, 1])
RESTART_EVERY = 50
_usage: dict[str, torch.Tensor] = {}  # per worker process: code counts since the last restart


def init(spec) -> dict:
    return {"visual": VisualTokenizer.from_pretrained(part_dir(spec.ckpt, "visual_tokenizer")).train()}


def batches(shard, spec):
    return image_batches(shard, spec.batch_size, spec.seed)


def loss(models: dict, images: torch.Tensor, spec, step: int) -> tuple[torch.Tensor, dict]:
    visual = models["visual"]
    restart_dead_codes(visual, step)  # between steps: the codebook must not change under autograd
    latents = visual.latents(images)  # (B, Q, D), unit vectors
    book = F.normalize(visual.codebook.weight, dim=-1)  # (K, D)
    codes = (latents @ book.T).argmax(-1)  # (B, Q)
    quantized = book[codes]
    recon = visual.decode(latents + (quantized - latents).detach())  # straight-through
    rec = weighted_mse(recon, images)
    vq = F.mse_loss(quantized, latents.detach()) + COMMITMENT * F.mse_loss(latents, quantized.detach())
    used = count_usage(codes, latents, visual.config.codebook_size)
    return rec + vq, {"recon": float(rec), "vq": float(vq), "codes_used": used}


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


@torch.no_grad()
def count_usage(codes: torch.Tensor, latents: torch.Tensor, codebook_size: int) -> float:
    """Count code use since the last restart; keep this batch's encoder outputs as restart points.
    Returns the fraction of the codebook used since the last restart."""
    counts = _usage.setdefault("counts", torch.zeros(codebook_size, device=codes.device))
    counts += torch.bincount(codes.flatten(), minlength=codebook_size)
    _usage["pool"] = latents.detach().reshape(-1, latents.shape[-1])
    return float((counts > 0).float().mean())


@torch.no_grad()
def restart_dead_codes(visual, step: int) -> None:
    """Every RESTART_EVERY steps, move codes unused since the last restart onto random encoder outputs."""
    if step == 0 or step % RESTART_EVERY or "pool" not in _usage:
        return
    counts, pool = _usage["counts"], _usage["pool"]
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        visual.codebook.weight[dead] = pool[torch.randint(len(pool), (len(dead),), device=pool.device)]
        _sync(visual.codebook.weight)
    counts.zero_()


def _sync(weight: torch.Tensor) -> None:
    """Ranks restart different codes: keep rank 0's codebook so replicas stay identical."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(weight.data, 0)


def export(parts: dict, spec, metrics: dict) -> None:
    dtype = read_manifest(spec.ckpt).dtype
    with write_atomically(part_dir(spec.ckpt, "visual_tokenizer")) as tmp:
        parts["visual"].eval().save_pretrained(tmp, dtype)
