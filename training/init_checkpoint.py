"""Build a complete random-init checkpoint for a preset (``seedstory init``).

The BPE is trained on StoryWorld captions (the grammar alone, no pictures), so even a
random-init checkpoint has a real vocabulary. Training stages later overwrite parts of it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from actors.checkpoint import Manifest, part_dir, write_manifest
from actors.config import Preset, get_preset


def init_checkpoint(
    preset: Preset, out: str | Path, seed: int = 0, dtype: str = "float16", captions: list[str] | None = None
) -> Manifest:
    # The models are imported here, not above: `seedstory` imports this module to build its parser.
    import torch

    from actors.detokenizer.model import Detokenizer
    from actors.mllm.heads import PictureHeads
    from actors.mllm.model import build_mllm
    from actors.tokenizer.model import VisualTokenizer
    from actors.tokenizer.text import token_layout, train_text_tokenizer
    from training.storyworld import sample_captions

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    # 1. Text tokenizer and the vocabulary layout.
    tok = train_text_tokenizer(
        captions or sample_captions(300, seed=seed), preset.text_vocab_size, preset.num_queries
    )
    tok.save_pretrained(part_dir(tmp, "tokenizer"))
    tokens = token_layout(tok, preset.num_queries)
    # 2. MLLM and its picture heads.
    mllm = build_mllm(preset.mllm, tokens).to(getattr(torch, dtype))
    mllm.save_pretrained(part_dir(tmp, "mllm"))
    PictureHeads(preset.heads).save_pretrained(part_dir(tmp, "heads"), dtype)
    # 3. Visual tokenizer, and 4. the de-tokenizer conditioned on its features.
    VisualTokenizer(preset.visual).eval().save_pretrained(part_dir(tmp, "visual_tokenizer"), dtype)
    Detokenizer.build(preset.detokenizer).save_pretrained(part_dir(tmp, "detokenizer"), dtype)
    manifest = Manifest(preset=preset, tokens=tokens, dtype=dtype)
    write_manifest(tmp, manifest)
    # Only a finished checkpoint appears at the target path.
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return manifest


# -- the command: `seedstory init` -------------------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory init``, registered on the ``seedstory`` parser's subcommands."""
    init_parser = commands.add_parser("init", help="build a complete random-init checkpoint")
    init_parser.add_argument("--preset", default="tiny")
    init_parser.add_argument("--out", required=True)
    init_parser.add_argument("--seed", type=int, default=0)
    init_parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    init_parser.set_defaults(func=run_command)
    return init_parser


def run_command(args: argparse.Namespace) -> None:
    started = time.time()
    manifest = init_checkpoint(get_preset(args.preset), args.out, seed=args.seed, dtype=args.dtype)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(
        f"{args.preset} checkpoint at {args.out}: Q={manifest.num_queries} D={manifest.feature_dim} "
        f"vocab={manifest.tokens.vocab_size} {size / 1e6:.1f} MB in {time.time() - started:.1f}s"
    )
