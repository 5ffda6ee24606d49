"""The de-tokenizer: SDXL (UNet with text_time conditioning + VAE) conditioned on picture features.

An adapter turns the Q feature rows of a picture into SDXL's ``prompt_embeds`` (B, Q,
cross_dim) and ``pooled_prompt_embeds`` (B, pooled_dim), so diffusers'
``StableDiffusionXLPipeline`` renders with no text encoders. Classifier-free guidance uses
the adapter's learned null condition as the negative embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actors.checkpoint import load_module, save_diffusers, save_module
from actors.config import SAMPLERS, DetokenizerConfig


class FeatureAdapter(nn.Module):
    """Features (B, Q, D) -> (prompt_embeds (B, Q, cross), pooled (B, pooled))."""

    def __init__(self, config: DetokenizerConfig):
        super().__init__()
        c = self.config = config
        self.pos = nn.Parameter(torch.randn(1, c.num_queries, c.feature_dim) * 0.02)
        self.proj_in = nn.Linear(c.feature_dim, c.cross_attention_dim)
        heads = max(1, c.cross_attention_dim // 64)
        layer = nn.TransformerEncoderLayer(
            c.cross_attention_dim,
            heads,
            4 * c.cross_attention_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, c.adapter_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.cross_attention_dim)
        self.to_pooled = nn.Linear(c.cross_attention_dim, c.pooled_dim)
        # Learned null condition for classifier-free guidance.
        self.null_prompt = nn.Parameter(torch.zeros(1, c.num_queries, c.cross_attention_dim))
        self.null_pooled = nn.Parameter(torch.zeros(1, c.pooled_dim))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Unit rows, as the visual tokenizer gives them: a regressed picture's rows are brought to
        # the length the adapter was trained on.
        x = F.normalize(features, dim=-1) + self.pos  # (B, Q, D)
        x = self.norm(self.blocks(self.proj_in(x)))  # (B, Q, cross)
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
        sample_size=c.latent_size,
        in_channels=c.latent_channels,
        out_channels=c.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=c.unet_block_out_channels,
        layers_per_block=c.unet_layers_per_block,
        transformer_layers_per_block=tuple(max(1, n) for n in c.transformer_layers_per_block),
        attention_head_dim=c.attention_head_dim,
        cross_attention_dim=c.cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=c.addition_time_embed_dim,
        projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
        use_linear_projection=True,
        norm_num_groups=min(32, c.unet_block_out_channels[0]),
    )


def build_vae(c: DetokenizerConfig):
    from diffusers import AutoencoderKL

    n = len(c.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=c.latent_channels,
        sample_size=c.image_size,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c.vae_block_out_channels,
        layers_per_block=c.vae_layers_per_block,
        norm_num_groups=min(32, c.vae_block_out_channels[0]),
        scaling_factor=c.vae_scaling_factor,
    )


def scheduler_kwargs(c: DetokenizerConfig) -> dict:
    """Shared by the sampling scheduler here and the DDPM training scheduler (training/)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=c.prediction_type,
        rescale_betas_zero_snr=c.rescale_betas_zero_snr,
        timestep_spacing=c.timestep_spacing,
    )


def build_scheduler(c: DetokenizerConfig):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**scheduler_kwargs(c))


def sampler_class(name: str):
    """The diffusers scheduler class of a sampler name."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = {
        "euler": EulerDiscreteScheduler,
        "dpm++": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return classes[name]


def add_time_ids(c: DetokenizerConfig, batch: int) -> torch.Tensor:
    """SDXL's six size/crop conditioning values, the same the pipeline computes: (B, 6)."""
    s = c.image_size
    return torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32).expand(batch, -1)


SELF_TEST_GUIDANCE = 5.0  # any value > 1: the self-test must run the guided (doubled) shapes


class GuidanceCutoff:
    """diffusers' SDXL CFG cut-off for a batch: after the first ``guided_steps`` steps only the
    conditional half of the guided rows is evaluated (diffusers' own ``SDXLCFGCutoffCallback`` keeps
    the last row, which is right for one picture only)."""

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]

    def __init__(self, guided_steps: int):
        self.guided_steps = guided_steps

    def __call__(self, pipeline, step_index: int, timestep, tensors: dict) -> dict:
        if step_index + 1 != self.guided_steps:  # it runs after each step: cut once the guided ones are done
            return tensors
        pipeline._guidance_scale = 0.0  # diffusers' own switch: its loop stops doubling the latents
        return {
            name: tensors[name].chunk(2)[1] for name in self.tensor_inputs
        }  # (2B, ...) -> conditional (B, ...)


class Detokenizer:
    """The four diffusers/torch parts and the pipeline that renders them."""

    def __init__(self, config: DetokenizerConfig, unet, vae, scheduler, adapter: FeatureAdapter):
        from diffusers import StableDiffusionXLPipeline

        self.config, self.unet, self.vae, self.scheduler, self.adapter = config, unet, vae, scheduler, adapter
        self.pipeline = StableDiffusionXLPipeline(
            vae=vae,
            unet=unet,
            scheduler=scheduler,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            add_watermarker=False,
        )
        self.pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def build(cls, config: DetokenizerConfig) -> Detokenizer:
        """Random init (seed torch before calling for a reproducible init)."""
        return cls(
            config,
            build_unet(config).eval(),
            build_vae(config).eval(),
            build_scheduler(config),
            FeatureAdapter(config).eval(),
        )

    def use_sampler(self, sampler: str) -> None:
        """Sample with another diffusers scheduler on the checkpoint's noise schedule (v-prediction,
        zero terminal SNR, trailing spacing: every class in ``SAMPLERS`` takes those arguments)."""
        scheduler = sampler_class(sampler).from_config(self.scheduler.config)
        self.scheduler = self.pipeline.scheduler = scheduler

    @torch.no_grad()
    def render(
        self,
        features: torch.Tensor,
        steps: int = 20,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        guidance_until: float = 1.0,
    ) -> list:
        """Features (B, Q, D) -> B PIL images of image_size x image_size. Classifier-free guidance
        runs on the first ``guidance_until`` of the steps only (the later steps refine detail, which
        the condition alone steers: half the UNet rows for the rest)."""
        # The models may sit on a GPU, in half precision.
        prompt, pooled = self.adapter(features.to(self.unet.device, self.unet.dtype))
        neg_prompt, neg_pooled = self.adapter.null(len(features))
        guided_steps = max(1, round(steps * guidance_until))
        cutoff = (
            {}
            if guidance <= 1 or guided_steps >= steps
            else {
                "callback_on_step_end": GuidanceCutoff(guided_steps),
                "callback_on_step_end_tensor_inputs": GuidanceCutoff.tensor_inputs,
            }
        )
        out = self.pipeline(
            prompt=None,
            prompt_embeds=prompt,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=neg_prompt,
            negative_pooled_prompt_embeds=neg_pooled,
            height=self.config.image_size,
            width=self.config.image_size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            latents=latents,
            output_type="pil",
            **cutoff,
        )
        return out.images

    def render_seeded(
        self,
        features: list,
        seeds: list[int],
        steps: int = 20,
        guidance: float = 1.0,
        guidance_until: float = 1.0,
    ) -> list:
        """One picture per feature array (Q, D), each from its own seed, so a picture doesn't depend
        on its batch."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return self.render(
            torch.as_tensor(np.stack(features), dtype=torch.float32),
            steps=steps,
            guidance=guidance,
            generator=generators,
            guidance_until=guidance_until,
        )

    def render_in_slots(
        self,
        features: list,
        seeds: list[int],
        slots: int,
        steps: int = 20,
        guidance: float = 1.0,
        guidance_until: float = 1.0,
    ) -> list:
        """Up to ``slots`` pictures in one pipeline call of exactly ``slots`` rows, the unused rows
        padded. At one fixed shape no kernel mixes rows, so a picture cannot depend on the values of
        its companions; whether it depends on its slot is what ``slot_self_test`` checks."""
        if not 0 < len(features) <= slots:
            raise ValueError(f"{len(features)} pictures do not fit {slots} slots")
        padding = slots - len(features)
        images = self.render_seeded(
            list(features) + [features[0]] * padding, seeds + [0] * padding, steps, guidance, guidance_until
        )
        return images[: len(features)]

    def slot_self_test(self, slots: int, guidance_until: float = 1.0, steps: int = 3) -> str | None:
        """None if a canary picture is byte-identical in every slot beside other companions, else why
        not. Runs at the service's shapes (guidance > 1, the cut-off if any), with few steps: every
        step runs the same kernels at the same shapes."""
        from actors.imageio import to_png

        shape = (self.config.num_queries, self.config.feature_dim)
        draw = np.random.default_rng(0)
        canary, canary_seed = draw.standard_normal(shape, dtype=np.float32), 1234
        drawn = []
        for slot in range(slots):
            companions = [draw.standard_normal(shape, dtype=np.float32) for _ in range(slots)]
            seeds = [100 * slot + row for row in range(slots)]
            companions[slot], seeds[slot] = canary, canary_seed
            images = self.render_in_slots(companions, seeds, slots, steps, SELF_TEST_GUIDANCE, guidance_until)
            drawn.append(to_png(images[slot]))
        differing = [slot for slot, png in enumerate(drawn) if png != drawn[0]]
        return f"the canary differs in slots {differing} from slot 0" if differing else None

    def save_pretrained(self, directory: str | Path, dtype: str = "float32") -> None:
        directory = Path(directory)
        for name in ("unet", "vae"):
            save_diffusers(getattr(self, name), directory / name, dtype)
        self.scheduler.save_pretrained(directory / "scheduler")
        save_module(self.adapter, self.config, directory / "adapter", dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str = "float32") -> Detokenizer:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

        directory, torch_dtype = Path(directory), getattr(torch, dtype)
        adapter = load_module(FeatureAdapter, DetokenizerConfig, directory / "adapter", dtype)
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch_dtype).eval()
        vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=torch_dtype).eval()
        scheduler = EulerDiscreteScheduler.from_pretrained(directory / "scheduler")
        return cls(adapter.config, unet, vae, scheduler, adapter)
