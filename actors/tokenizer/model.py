"""The visual tokenizer: encoder -> resampler (Q learnable queries) -> Q feature rows of D.

Images are float tensors (B, 3, H, W) in [-1, 1]. ``encode`` gives a picture's features: Q
continuous unit vectors (B, Q, D), what the MLLM regresses and the de-tokenizer conditions on.
There is no codebook: codes lost the characters' looks whatever their size
(docs/results.md#which-tokenizer-would-carry-the-looks). A small decoder reconstructs pixels
from the features: it is what the reconstruction objective trains through (training/), and the
evaluation's ceiling; it is never used when serving.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from actors.checkpoint import load_module, save_module
from actors.config import VisualTokenizerConfig


def _encoder_stack(width: int, heads: int, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def _cross_stack(width: int, heads: int, depth: int) -> nn.TransformerDecoder:
    layer = nn.TransformerDecoderLayer(
        width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerDecoder(layer, depth)


class VisualTokenizer(nn.Module):
    def __init__(self, config: VisualTokenizerConfig):
        super().__init__()
        self.config = config
        patch, width = config.patch_size, config.width
        # 1. Encoder: a small ViT over patches.
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches, width) * 0.02)
        self.encoder = _encoder_stack(width, config.heads, config.depth)
        # 2. Resampler: Q learnable queries cross-attend to the patches.
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, width) * 0.02)
        self.resampler = _cross_stack(width, config.heads, config.resampler_depth)
        self.to_feature = nn.Linear(width, config.feature_dim)
        # 3. Pixel decoder for the reconstruction objective.
        self.from_feature = nn.Linear(config.feature_dim, width)
        self.patch_queries = nn.Parameter(torch.randn(1, config.num_patches, width) * 0.02)
        self.decoder = _cross_stack(width, config.heads, config.decoder_depth)
        self.to_pixels = nn.Linear(width, 3 * patch * patch)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder outputs per patch: (B, N, w)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, w)
        return self.encoder(x)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """The features with gradients (training): resampler outputs as unit vectors (B, Q, D).
        Unit length fixes their scale, so the MLLM's regression and the de-tokenizer's noise are
        measured in one unit whatever the run."""
        x = self.patches(images)
        q = self.resampler(self.queries.expand(len(images), -1, -1), x)  # (B, Q, w)
        return F.normalize(self.to_feature(q), dim=-1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> features (B, Q, D)."""
        return self.latents(images)

    @torch.no_grad()
    def mean_patch(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per image, the mean encoder output (B, w): the space the evaluation's Fréchet
        distance uses."""
        return self.patches(images).mean(1)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, Q, D) -> reconstructed images (B, 3, H, W)."""
        batch, patch = len(features), self.config.patch_size
        grid = self.config.image_size // patch  # patches per side
        x = self.decoder(self.patch_queries.expand(batch, -1, -1), self.from_feature(features))  # (B, N, w)
        x = self.to_pixels(x).view(batch, grid, grid, 3, patch, patch)  # (B, gh, gw, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, 3, grid * patch, grid * patch)

    def save_pretrained(self, directory: str | Path, dtype: str = "float32") -> None:
        save_module(self, self.config, directory, dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str = "float32") -> VisualTokenizer:
        return load_module(cls, VisualTokenizerConfig, directory, dtype)
