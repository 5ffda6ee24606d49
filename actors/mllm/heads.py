"""The MLLM's picture heads, beside its Llama weights (``CKPT/heads/``).

SEED-Story reads a picture off the MLLM's final hidden states at learnable query positions and
maps them with an output resampler into the visual tokenizer's feature space; a given picture
enters through an input adapter. Here both are small bidirectional transformers over a picture's
Q rows:

- ``features``: the Q final-norm hidden rows at ``<img_00000> ..`` (B, Q, H) -> Q unit feature rows
  (B, Q, D), what the de-tokenizer renders;
- ``embeddings``: a given picture's Q feature rows (B, Q, D) -> the Q input embedding rows that
  stand at its query positions (B, Q, H).

Keeping them out of ``mllm/`` lets vLLM and transformers load that folder as a plain Llama.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from actors.checkpoint import load_module, save_module
from actors.config import PictureHeadsConfig


class RowMixer(nn.Module):
    """(B, Q, n_in) -> (B, Q, n_out) through ``layers`` transformer layers of ``width`` over the Q rows."""

    def __init__(self, n_in: int, n_out: int, num_rows: int, width: int, layers: int):
        super().__init__()
        self.proj_in = nn.Linear(n_in, width)
        self.pos = nn.Parameter(torch.randn(1, num_rows, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            max(1, width // 64),
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, n_out)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.norm(self.blocks(self.proj_in(rows) + self.pos)))


class PictureHeads(nn.Module):
    def __init__(self, config: PictureHeadsConfig):
        super().__init__()
        c = self.config = config
        self.output = RowMixer(c.hidden_size, c.feature_dim, c.num_queries, c.width, c.layers)
        self.input = RowMixer(c.feature_dim, c.hidden_size, c.num_queries, c.width, c.layers)

    def features(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden rows at a picture's query positions (B, Q, H) -> unit features (B, Q, D)."""
        return F.normalize(self.output(hidden_rows), dim=-1)

    def embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """A given picture's features (B, Q, D) -> its query positions' input embeddings (B, Q, H)."""
        return self.input(F.normalize(features, dim=-1))

    def save_pretrained(self, directory: str | Path, dtype: str = "float32") -> None:
        save_module(self, self.config, directory, dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str = "float32") -> PictureHeads:
        return load_module(cls, PictureHeadsConfig, directory, dtype)
