"""The one-command demo. For now (before the serving cluster lands) it writes one story
segment: the opening caption, the visual codes the MLLM writes after it, and their picture
rendered by the de-tokenizer, as PNG + story.json + story.html."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import torch

from actors.checkpoint import part_dir, read_manifest
from actors.detokenizer.model import Detokenizer
from actors.imageio import to_png
from actors.mllm.model import load_mllm
from actors.tokenizer.text import encode_segment, load_text_tokenizer

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"


@torch.no_grad()
def write_visual_codes(ckpt: Path, caption: str, seed: int) -> list[int]:
    """Caption -> the Q visual codes the MLLM writes after ``<img>`` (sampling restricted to visual tokens)."""
    m = read_manifest(ckpt)
    tok, model = load_text_tokenizer(part_dir(ckpt, "tokenizer")), load_mllm(part_dir(ckpt, "mllm"))
    t = m.tokens
    prompt = [t.bos] + encode_segment(tok, t, caption, None) + [t.boi]
    visual = list(range(t.visual_base, t.visual_base + t.num_codes))
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=m.num_queries, min_new_tokens=m.num_queries,
                         do_sample=True, top_k=0, prefix_allowed_tokens_fn=lambda _b, _ids: visual,
                         pad_token_id=t.pad)
    return [t.visual_code(i) for i in out[0, len(prompt):].tolist()]


def render_segment(ckpt: Path, codes: list[int], seed: int, steps: int = 20) -> bytes:
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    gen = torch.Generator().manual_seed(seed)
    return to_png(detok.render(torch.tensor([codes]), steps=steps, generator=gen)[0])


def write_story(out: Path, caption: str, codes: list[int], png: bytes, ckpt: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "segment_000.png").write_bytes(png)
    story = {"checkpoint": str(ckpt), "segments": [{"caption": caption, "visual_codes": codes,
                                                     "image": "segment_000.png"}]}
    (out / "story.json").write_text(json.dumps(story, indent=2) + "\n")
    (out / "story.html").write_text(
        "<!doctype html><meta charset=utf-8><title>seedstory</title><body>"
        f"<figure><img src='segment_000.png' width=256 style='image-rendering:pixelated'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure></body>\n")
    return out / "story.html"


def run_demo(out: Path, prompt: str, ckpt: Path | None = None, seed: int = 0) -> Path:
    from actors.config import TINY
    from training.init_checkpoint import init_checkpoint

    if ckpt is None:
        ckpt = EMBEDDED_CHECKPOINT if (EMBEDDED_CHECKPOINT / "manifest.json").is_file() else out / "ckpt-tiny-random"
        if not (ckpt / "manifest.json").is_file():
            t0 = time.time()
            init_checkpoint(TINY, ckpt, seed=seed)
            print(f"built a random-init tiny checkpoint at {ckpt} in {time.time() - t0:.1f}s")
    codes = write_visual_codes(ckpt, prompt, seed)
    png = render_segment(ckpt, codes, seed)
    return write_story(out, prompt, codes, png, ckpt)
