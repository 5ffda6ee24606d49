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


def init_checkpoint(preset: Preset, out: str | Path, seed: int = 0, dtype: str = "float16",
                    captions: list[str] | None = None) -> Manifest:
    # The models are imported here, not above: `seedstory` imports this module to build its parser.
    import torch

    from actors.detokenizer.model import Detokenizer
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
    tok = train_text_tokenizer(captions or sample_captions(300, seed=seed), preset.text_vocab_size,
                               preset.codebook_size)
    tok.save_pretrained(part_dir(tmp, "tokenizer"))
    tokens = token_layout(tok, preset.codebook_size)
    # 2. MLLM.
    mllm = build_mllm(preset.mllm, tokens).to(getattr(torch, dtype))
    mllm.save_pretrained(part_dir(tmp, "mllm"))
    # 3. Visual tokenizer, and 4. the de-tokenizer conditioned on its codebook.
    visual = VisualTokenizer(preset.visual).eval()
    visual.save_pretrained(part_dir(tmp, "visual_tokenizer"), dtype)
    detok = Detokenizer.build(preset.detokenizer)
    detok.adapter.codebook.weight.data.copy_(visual.codebook.weight.data)
    detok.save_pretrained(part_dir(tmp, "detokenizer"), dtype)
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
    i = commands.add_parser("init", help="build a complete random-init checkpoint")
    i.add_argument("--preset", default="tiny")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    i.set_defaults(func=run_command)
    return i


def run_command(a: argparse.Namespace) -> None:
    t0 = time.time()
    m = init_checkpoint(get_preset(a.preset), a.out, seed=a.seed, dtype=a.dtype)
    size = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file())
    print(f"{a.preset} checkpoint at {a.out}: Q={m.num_queries} K={m.codebook_size} vocab={m.tokens.vocab_size} "
          f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s")
