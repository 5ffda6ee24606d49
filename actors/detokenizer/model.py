"""The de-tokenizer: SDXL (UNet with text_time conditioning + VAE) conditioned on visual codes.

An adapter turns the Q code embeddings of a picture into SDXL's ``prompt_embeds`` (B, Q,
cross_dim) and ``pooled_prompt_embeds`` (B, pooled_dim), so diffusers'
``StableDiffusionXLPipeline`` renders with no text encoders. Classifier-free guidance uses
the adapter's learned null condition as the negative embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from actors.checkpoint import load_module, save_diffusers, save_module
from actors.config import DetokenizerConfig


class CodeAdapter(nn.Module):
    """Codes (B, Q) -> (prompt_embeds (B, Q, cross), pooled (B, pooled)); owns a copy of the codebook."""

    def __init__(self, config: DetokenizerConfig):
        super().__init__()
        c = self.config = config
        # The codebook is copied from the visual tokenizer when the de-tokenizer is trained, so
        # the pool needs only codes (plain ints) and this directory.
        self.codebook = nn.Embedding(c.codebook_size, c.code_dim)
        self.codebook.weight.requires_grad_(False)
        self.pos = nn.Parameter(torch.randn(1, c.num_queries, c.code_dim) * 0.02)
        self.proj_in = nn.Linear(c.code_dim, c.cross_attention_dim)
        heads = max(1, c.cross_attention_dim // 64)
        layer = nn.TransformerEncoderLayer(c.cross_attention_dim, heads, 4 * c.cross_attention_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.adapter_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.cross_attention_dim)
        self.to_pooled = nn.Linear(c.cross_attention_dim, c.pooled_dim)
        # Learned null condition for classifier-free guidance.
        self.null_prompt = nn.Parameter(torch.zeros(1, c.num_queries, c.cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(1, c.pooled_dim))

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.normalize(self.codebook(codes), dim=-1) + self.pos  # (B, Q, D)
        x = self.norm(self.blocks(self.proj_in(x)))               # (B, Q, cross)
        return x, self.to_pooled(x.mean(1))

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.null_prompt.expand(batch, -1, -1), self.null_pooled.expand(batch, -1)


def build_unet(c: DetokenizerConfig):
    from diffusers import UNet2DConditionModel

    # A level with no transformer layers is a plain ResNet level (SDXL: none at full resolution).
    # tiny attends at full resolution too: at 16x16 latents the 8x8 level alone lost the small
    # characters' looks (benchmarks/detok_stages.py).
    attends = [layers > 0 for layers in c.transformer_layers_per_block]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return UNet2DConditionModel(
        sample_size=c.latent_size, in_channels=c.latent_channels, out_channels=c.latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=c.unet_block_out_channels,
        layers_per_block=c.unet_layers_per_block,
        transformer_layers_per_block=tuple(max(1, n) for n in c.transformer_layers_per_block),
        attention_head_dim=c.attention_head_dim, cross_attention_dim=c.cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=c.addition_time_embed_dim,
        projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim, use_linear_projection=True,
        norm_num_groups=min(32, c.unet_block_out_channels[0]),
    )


def build_vae(c: DetokenizerConfig):
    from diffusers import AutoencoderKL

    n = len(c.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=c.latent_channels, sample_size=c.image_size,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c.vae_block_out_channels, layers_per_block=c.vae_layers_per_block,
        norm_num_groups=min(32, c.vae_block_out_channels[0]), scaling_factor=c.vae_scaling_factor,
    )


def scheduler_kwargs(c: DetokenizerConfig) -> dict:
    """Shared by the sampling scheduler here and the DDPM training scheduler (training/)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=c.prediction_type, rescale_betas_zero_snr=c.rescale_betas_zero_snr,
                timestep_spacing=c.timestep_spacing)


def build_scheduler(c: DetokenizerConfig):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**scheduler_kwargs(c))


def add_time_ids(c: DetokenizerConfig, batch: int) -> torch.Tensor:
    """SDXL's six size/crop conditioning values, the same the pipeline computes: (B, 6)."""
    s = c.image_size
    return torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32).expand(batch, -1)


class Detokenizer:
    """The four diffusers/torch parts and the pipeline that renders them."""

    def __init__(self, config: DetokenizerConfig, unet, vae, scheduler, adapter: CodeAdapter):
        from diffusers import StableDiffusionXLPipeline

        self.config, self.unet, self.vae, self.scheduler, self.adapter = config, unet, vae, scheduler, adapter
        self.pipeline = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, text_encoder_2=None, tokenizer=None,
            tokenizer_2=None, add_watermarker=False)
        self.pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def build(cls, config: DetokenizerConfig) -> "Detokenizer":
        """Random init (seed torch before calling for a reproducible init)."""
        return cls(config, build_unet(config).eval(), build_vae(config).eval(), build_scheduler(config),
                   CodeAdapter(config).eval())

    @torch.no_grad()
    def render(self, codes: torch.Tensor, steps: int = 20, guidance: float = 1.0,
               generator: torch.Generator | None = None, latents: torch.Tensor | None = None) -> list:
        """Visual codes (B, Q) -> B PIL images of image_size x image_size."""
        prompt, pooled = self.adapter(codes)
        neg_prompt, neg_pooled = self.adapter.null(len(codes))
        out = self.pipeline(
            prompt=None, prompt_embeds=prompt, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_prompt,
            negative_pooled_prompt_embeds=neg_pooled, height=self.config.image_size, width=self.config.image_size,
            num_inference_steps=steps, guidance_scale=guidance, generator=generator, latents=latents,
            output_type="pil")
        return out.images

    def render_seeded(self, codes: list[list[int]], seeds: list[int], steps: int = 20,
                      guidance: float = 1.0) -> list:
        """One picture per codes list, each from its own seed, so a picture doesn't depend on its batch."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return self.render(torch.tensor(codes), steps=steps, guidance=guidance, generator=generators)

    def save_pretrained(self, directory: str | Path, dtype: str = "float32") -> None:
        directory = Path(directory)
        for name in ("unet", "vae"):
            save_diffusers(getattr(self, name), directory / name, dtype)
        self.scheduler.save_pretrained(directory / "scheduler")
        save_module(self.adapter, self.config, directory / "adapter", dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str = "float32") -> "Detokenizer":
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

        directory, torch_dtype = Path(directory), getattr(torch, dtype)
        adapter = load_module(CodeAdapter, DetokenizerConfig, directory / "adapter", dtype)
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch_dtype).eval()
        vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=torch_dtype).eval()
        scheduler = EulerDiscreteScheduler.from_pretrained(directory / "scheduler")
        return cls(adapter.config, unet, vae, scheduler, adapter)
