"""Stage 2: the de-tokenizer's VAE (diffusers ``AutoencoderKL``), by reconstruction.

The preset's VAE is small and trained from scratch on the story set's pictures. At export
the latent scale is set from the measured latent std (1/std), so the UNet stage
sees unit-variance latents.

The reconstruction is weighted towards the foreground, as the visual tokenizer's is: with plain
MSE the VAE drew the places well and lost thin shapes (the cross) and colours of the small
characters (docs/results.md#results-the-previous-embedded-model-on-the-classic-world).
"""

from __future__ import annotations

import dataclasses

import torch

from actors.checkpoint import part_dir, read_manifest, save_diffusers, write_atomically, write_manifest
from training.data import image_batches
from training.stages.visual import weighted_mse

KL_WEIGHT = 1e-6


def init(spec) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(part_dir(spec.ckpt, "detokenizer") / "vae", torch_dtype=torch.float32)
    return {"vae": vae.train()}


def batches(shard, spec):
    return image_batches(shard, spec.batch_size, spec.seed)


def loss(models: dict, images: torch.Tensor, spec, step: int) -> tuple[torch.Tensor, dict]:
    vae = models["vae"]
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample()  # (B, C, h, w)
    recon = vae.decode(latents).sample
    rec = weighted_mse(recon, images)
    kl = posterior.kl().mean()
    return rec + KL_WEIGHT * kl, {"recon": float(rec), "kl": float(kl), "latent_std": float(latents.std())}


def export(parts: dict, spec, metrics: dict) -> None:
    manifest = read_manifest(spec.ckpt)
    scale = round(1.0 / max(1e-3, metrics["latent_std"]), 5)
    vae = parts["vae"].eval()
    vae.register_to_config(scaling_factor=scale)
    with write_atomically(part_dir(spec.ckpt, "detokenizer") / "vae") as tmp:
        save_diffusers(vae, tmp, manifest.dtype)
    # The manifest's preset records the scale too, so the config saved with the weights stays true.
    detok = dataclasses.replace(manifest.preset.detokenizer, vae_scaling_factor=scale)
    write_manifest(
        spec.ckpt,
        dataclasses.replace(manifest, preset=dataclasses.replace(manifest.preset, detokenizer=detok)),
    )
