"""Typed configs for the three models and the presets that combine them.

Plain dataclasses, checked once in ``__post_init__`` and saved as JSON next to the
weights (``manifest.json`` in a checkpoint directory). No torch here: the scheduling,
policy and API code import this module too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The de-tokenizer's samplers (diffusers schedulers on the checkpoint's noise schedule), by the
# names a Serve config gives; actors/detokenizer/model.py maps them to their classes.
SAMPLERS = ("euler", "dpm++", "unipc")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class MLLMConfig:
    """A Llama-architecture causal LM; the vocabulary comes from the tokenizer."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "mllm.hidden_size must divide by num_heads")
        _require(self.num_heads % self.num_kv_heads == 0, "mllm.num_heads must divide by num_kv_heads")
        _require(
            min(self.num_layers, self.intermediate_size, self.max_position_embeddings) > 0,
            "mllm sizes must be positive",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VisualTokenizerConfig:
    """Encoder (ViT) -> resampler (Q learnable queries) -> Q continuous unit vectors of D features."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    resampler_depth: int
    decoder_depth: int
    num_queries: int  # Q: feature rows per picture
    feature_dim: int  # D

    def __post_init__(self) -> None:
        _require(self.image_size % self.patch_size == 0, "visual.image_size must divide by patch_size")
        _require(self.width % self.heads == 0, "visual.width must divide by heads")
        _require(min(self.num_queries, self.feature_dim) > 0, "visual Q and D must be positive")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class DetokenizerConfig:
    """SDXL UNet + VAE conditioned on a picture's Q feature rows through an adapter (no text encoders)."""

    image_size: int
    feature_dim: int
    num_queries: int
    cross_attention_dim: int
    pooled_dim: int
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    transformer_layers_per_block: tuple[int, ...]  # 0: a level without attention
    attention_head_dim: tuple[int, ...]
    addition_time_embed_dim: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    latent_channels: int = 4
    vae_scaling_factor: float = 1.0
    # Zero terminal SNR + v-prediction + trailing spacing: without it the model learns flat
    # backgrounds from the noise instead of from the tokens: hence zero terminal SNR.
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    timestep_spacing: str = "trailing"
    adapter_layers: int = 1

    def __post_init__(self) -> None:
        levels = len(self.unet_block_out_channels)
        _require(
            len(self.transformer_layers_per_block) == levels and len(self.attention_head_dim) == levels,
            "detokenizer: one transformer_layers/attention_head_dim entry per UNet block",
        )
        _require(
            self.image_size % self.vae_scale_factor == 0,
            "detokenizer.image_size must divide by the VAE scale",
        )
        _require(self.prediction_type in ("epsilon", "v_prediction"), "detokenizer.prediction_type unknown")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    @property
    def projection_class_embeddings_input_dim(self) -> int:
        # SDXL's text_time conditioning: six time ids, each embedded, plus the pooled vector.
        return self.addition_time_embed_dim * 6 + self.pooled_dim


@dataclass(frozen=True)
class PictureHeadsConfig:
    """The MLLM's two picture heads, kept outside its Llama weights (so vLLM and transformers load
    ``mllm/`` as a plain Llama): ``output`` maps the final-norm hidden rows at a picture's Q query
    positions to its Q feature rows; ``input`` maps a given picture's Q feature rows to the
    embedding rows that stand at those positions."""

    hidden_size: int
    num_queries: int
    feature_dim: int
    width: int
    layers: int  # bidirectional transformer layers over the Q rows, in each head

    def __post_init__(self) -> None:
        _require(min(self.hidden_size, self.num_queries, self.feature_dim, self.width) > 0, "heads sizes")


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int
    text_vocab_size: int  # BPE target size, before special and visual tokens
    mllm: MLLMConfig
    visual: VisualTokenizerConfig
    detokenizer: DetokenizerConfig
    heads: PictureHeadsConfig
    max_caption_tokens: int = 48

    def __post_init__(self) -> None:
        visual, detok = self.visual, self.detokenizer
        _require(visual.image_size == self.image_size == detok.image_size, "preset: image sizes disagree")
        shapes = {(part.num_queries, part.feature_dim) for part in (visual, detok, self.heads)}
        _require(len(shapes) == 1, "preset: visual tokenizer, de-tokenizer and heads disagree on Q or D")
        _require(self.heads.hidden_size == self.mllm.hidden_size, "preset: heads.hidden_size != mllm's")

    @property
    def num_queries(self) -> int:
        return self.visual.num_queries

    @property
    def feature_dim(self) -> int:
        return self.visual.feature_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        return cls(
            **{k: v for k, v in data.items() if k not in ("mllm", "visual", "detokenizer", "heads")},
            mllm=from_dict(MLLMConfig, data["mllm"]),
            visual=from_dict(VisualTokenizerConfig, data["visual"]),
            detokenizer=from_dict(DetokenizerConfig, data["detokenizer"]),
            heads=from_dict(PictureHeadsConfig, data["heads"]),
        )


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a flat config dataclass from JSON, turning lists back into tuples."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    _require(not unknown, f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def save_json(obj: Any, path: Path) -> None:
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


TINY = Preset(
    name="tiny",
    image_size=64,
    text_vocab_size=1024,
    mllm=MLLMConfig(
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=2048,
    ),
    visual=VisualTokenizerConfig(
        image_size=64,
        patch_size=8,
        width=128,
        depth=2,
        heads=4,
        resampler_depth=1,
        decoder_depth=1,
        num_queries=16,
        feature_dim=64,
    ),
    detokenizer=DetokenizerConfig(
        image_size=64,
        feature_dim=64,
        num_queries=16,
        cross_attention_dim=64,
        pooled_dim=64,
        unet_block_out_channels=(64, 128),
        unet_layers_per_block=1,
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(4, 4),
        addition_time_embed_dim=32,
        vae_block_out_channels=(32, 64, 64),
        vae_layers_per_block=1,
        vae_scaling_factor=2.0,
        adapter_layers=2,
    ),
    heads=PictureHeadsConfig(hidden_size=256, num_queries=16, feature_dim=64, width=256, layers=1),
)

# SEED-Story size: a Llama-2-7B-shaped MLLM, Q=64 visual tokens, a 1024^2 SDXL de-tokenizer.
# Validated by parameter count in tests; meant for GPU clusters, never built here.
FULL = Preset(
    name="full",
    image_size=1024,
    text_vocab_size=32000,
    mllm=MLLMConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        max_position_embeddings=4096,
    ),
    visual=VisualTokenizerConfig(
        image_size=1024,
        patch_size=32,
        width=1024,
        depth=24,
        heads=16,
        resampler_depth=6,
        decoder_depth=6,
        num_queries=64,
        feature_dim=256,
    ),
    detokenizer=DetokenizerConfig(
        image_size=1024,
        feature_dim=256,
        num_queries=64,
        cross_attention_dim=2048,
        pooled_dim=1280,
        unet_block_out_channels=(320, 640, 1280),
        unet_layers_per_block=2,
        transformer_layers_per_block=(0, 2, 10),
        attention_head_dim=(5, 10, 20),
        addition_time_embed_dim=256,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_scaling_factor=0.13025,
        adapter_layers=4,
    ),
    heads=PictureHeadsConfig(hidden_size=4096, num_queries=64, feature_dim=256, width=1024, layers=2),
    max_caption_tokens=128,
)

PRESETS = {p.name: p for p in (TINY, FULL)}


def get_preset(name: str) -> Preset:
    _require(name in PRESETS, f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
