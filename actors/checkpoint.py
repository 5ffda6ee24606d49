"""One checkpoint directory holds every part of a model set, plus a manifest.

    CKPT/
      manifest.json          preset, Q, D, image size, special token ids, weight dtype
      tokenizer/             PreTrainedTokenizerFast (BPE + specials + Q query tokens)
      mllm/                  transformers LlamaForCausalLM (save_pretrained), a plain Llama
      heads/                 the MLLM's picture heads: config.json + model.safetensors
      visual_tokenizer/      config.json + model.safetensors
      detokenizer/           unet/, vae/, scheduler/ (diffusers) and adapter/ (config + safetensors)

Each pool loads only its own part; everything loads from the path alone.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actors.config import Preset, from_dict, save_json
from actors.tokenizer.text import TokenLayout

# 2: continuous picture features (Q x D) and query tokens; 1 held K discrete visual codes.
FORMAT_VERSION = 2
PARTS = ("tokenizer", "mllm", "heads", "visual_tokenizer", "detokenizer")


@dataclass(frozen=True)
class Manifest:
    preset: Preset
    tokens: TokenLayout
    dtype: str  # dtype the weights are stored in
    format_version: int = FORMAT_VERSION

    @property
    def num_queries(self) -> int:
        return self.preset.num_queries

    @property
    def feature_dim(self) -> int:
        return self.preset.feature_dim

    @property
    def image_size(self) -> int:
        return self.preset.image_size

    def to_dict(self) -> dict[str, Any]:
        # Q, D and the image size are repeated at top level for people and tools reading the file.
        return {
            "format_version": self.format_version,
            "preset_name": self.preset.name,
            "num_queries": self.num_queries,
            "feature_dim": self.feature_dim,
            "image_size": self.image_size,
            "dtype": self.dtype,
            "tokens": asdict(self.tokens),
            "preset": self.preset.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {data.get('format_version')} is not {FORMAT_VERSION}"
                + (
                    ": it holds discrete visual codes; retrain it with `seedstory train`"
                    if data.get("format_version") == 1
                    else ""
                )
            )
        return cls(
            preset=Preset.from_dict(data["preset"]),
            tokens=from_dict(TokenLayout, data["tokens"]),
            dtype=data["dtype"],
        )


def write_manifest(ckpt: str | Path, manifest: Manifest) -> None:
    save_json(manifest.to_dict(), Path(ckpt) / "manifest.json")


def read_manifest(ckpt: str | Path) -> Manifest:
    path = Path(ckpt) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a seedstory checkpoint (no manifest.json)")
    return Manifest.from_dict(json.loads(path.read_text()))


def checkpoint_name(ckpt: str | Path) -> str:
    """What clients are told a story came from: the model card's title (``README.md``'s first
    heading, Markdown code marks dropped), else the folder's name; never the path, which says
    where the server keeps its files."""
    card = Path(ckpt) / "README.md"
    lines = card.read_text(encoding="utf-8").splitlines() if card.is_file() else []
    title = next((line[2:].replace("`", "").strip() for line in lines if line.startswith("# ")), "")
    return title or Path(ckpt).resolve().name


def part_dir(ckpt: str | Path, part: str) -> Path:
    if part not in PARTS:
        raise ValueError(f"unknown checkpoint part {part!r}")
    return Path(ckpt) / part


def save_module(module, config, directory: str | Path, dtype: str) -> None:
    """A torch module as ``config.json`` (its typed config) + ``model.safetensors``."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_json(config, directory / "config.json")
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


def save_diffusers(model, directory: str | Path, dtype: str) -> None:
    """A diffusers model (UNet, VAE) saved in ``dtype``, leaving ``model`` as it is. diffusers records
    the folder a model was loaded from as ``_name_or_path``: it names a path on the machine that
    saved it, which a checkpoint that travels must not, so it is dropped."""
    import copy

    import torch

    directory = Path(directory)
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("_name_or_path", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_module(module_cls, config_cls, directory: str | Path, dtype: str = "float32"):
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    config = from_dict(config_cls, json.loads((directory / "config.json").read_text()))
    module = module_cls(config)
    state = load_file(str(directory / "model.safetensors"))
    module.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in state.items()})
    return module.to(getattr(torch, dtype)).eval()


@contextmanager
def write_atomically(target: str | Path):
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole,
    so a checkpoint part is either the old one or the new one, never half of each."""
    target = Path(target)
    tmp, old = target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
