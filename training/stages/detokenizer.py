"""Stage 3: the de-tokenizer's UNet + feature adapter, by the diffusion loss.

Conditioned on the frozen visual tokenizer's features of each picture, with noise added
(``FEATURE_NOISE``: each picture's rows get Gaussian noise of a standard deviation drawn up to it,
then are made unit again) so that the de-tokenizer tolerates the MLLM's regression error, with
the frozen VAE's latents as targets. Zero terminal SNR,
v-prediction, and 10% of conditions dropped to the adapter's learned null, which the
pipeline uses as its negative for guidance. The loss is weighted towards the latents under the
characters (the visual tokenizer's foreground weight, pooled to the latent grid): the
backgrounds are most of the picture and easy, the characters are what a story is about. The
same stage adapts a trained de-tokenizer to a new story set's style: run it on that set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.checkpoint import load_module, part_dir, read_manifest, write_atomically
from actors.config import DetokenizerConfig
from actors.detokenizer.model import (
    Detokenizer,
    FeatureAdapter,
    add_time_ids,
    build_scheduler,
    scheduler_kwargs,
)
from actors.tokenizer.model import VisualTokenizer
from training.data import image_batches
from training.stages.visual import foreground_weight

DROP_CONDITION = 0.1
# Per-dimension noise on unit rows of D=64: 0.08 moves a row by ~0.64 (cosine ~0.8), about the
# regression error of a tiny MLLM (docs/results.md#continuous-features).
FEATURE_NOISE = 0.08


def init(spec) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = part_dir(spec.ckpt, "detokenizer")
    visual = VisualTokenizer.from_pretrained(part_dir(spec.ckpt, "visual_tokenizer")).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32).train()
    adapter = load_module(FeatureAdapter, DetokenizerConfig, root / "adapter").train()
    return {"unet": unet, "adapter": adapter, "visual": visual, "vae": vae}


def batches(shard, spec):
    return image_batches(shard, spec.batch_size, spec.seed)


def loss(models: dict, images: torch.Tensor, spec, step: int) -> tuple[torch.Tensor, dict]:
    from diffusers import DDPMScheduler

    unet, adapter, vae = models["unet"], models["adapter"], models["vae"]
    config, count = adapter.config, len(images)
    with torch.no_grad():
        features = noisy_features(models["visual"].encode(images))  # (B, Q, D)
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
    sched = _scheduler(config, DDPMScheduler)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (count,), device=latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    v_prediction = config.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v_prediction else noise
    prompt, pooled = adapter(features)  # (B, Q, cross), (B, pooled)
    null_prompt, null_pooled = adapter.null(count)
    drop = torch.rand(count, device=latents.device) < DROP_CONDITION
    prompt = torch.where(drop[:, None, None], null_prompt, prompt)
    pooled = torch.where(drop[:, None], null_pooled, pooled)
    time_ids = add_time_ids(config, count).to(latents.device)
    pred = unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    weight = F.adaptive_max_pool2d(foreground_weight(images), latents.shape[-2:])  # (B, 1, h, w)
    mse = (weight * (pred - target) ** 2).mean() / weight.mean()
    return mse, {"diffusion": float(mse)}


def noisy_features(features: torch.Tensor) -> torch.Tensor:
    """Unit rows (B, Q, D) with Gaussian noise of a per-picture deviation in [0, FEATURE_NOISE)."""
    scale = torch.rand(len(features), 1, 1, device=features.device) * FEATURE_NOISE
    return F.normalize(features + scale * torch.randn_like(features), dim=-1)


_SCHEDULERS: dict = {}


def _scheduler(config: DetokenizerConfig, cls):
    """The DDPM training scheduler with the sampler's betas (built once per process)."""
    if config not in _SCHEDULERS:
        _SCHEDULERS[config] = cls(**scheduler_kwargs(config))
    return _SCHEDULERS[config]


def export(parts: dict, spec, metrics: dict) -> None:
    dtype = read_manifest(spec.ckpt).dtype
    adapter = parts["adapter"].eval()
    detok = Detokenizer(
        adapter.config, parts["unet"].eval(), parts["vae"], build_scheduler(adapter.config), adapter
    )
    with write_atomically(part_dir(spec.ckpt, "detokenizer")) as tmp:
        detok.save_pretrained(tmp, dtype)
