"""The one-command demo (until the serving cluster lands): a short story written by the MLLM
in vLLM with the multimodal sink, each picture rendered by the SDXL de-tokenizer, written as
PNGs + story.json + story.html."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import torch

from actors.checkpoint import part_dir
from actors.detokenizer.model import Detokenizer
from actors.imageio import to_png
from actors.mllm.engine import EngineConfig, Sampling, StoryEngine
from actors.tokenizer.text import encode_segment, load_text_tokenizer

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"


def write_segments(ckpt: Path, caption: str, segments: int, seed: int) -> list[tuple[str, list[int]]]:
    """Opening caption -> [(caption, Q visual codes)] per segment, written by the engine."""
    tok = load_text_tokenizer(part_dir(ckpt, "tokenizer"))
    engine = StoryEngine(EngineConfig(str(ckpt), max_stories=1, max_segments=segments + 1))
    try:
        t = engine.tokens
        prompt = [t.bos] + encode_segment(tok, t, caption, None)
        events = engine.run({"demo": prompt}, segments, Sampling(temperature=0.8, top_p=0.95, seed=seed))["demo"]
    finally:
        engine.shutdown()
    # The first picture belongs to the client's caption; later captions are the model's.
    return [(caption if ev.index == 0 else tok.decode(ev.caption_ids).strip(), ev.codes) for ev in events]


def render(ckpt: Path, codes: list[list[int]], seed: int, steps: int = 20) -> list[bytes]:
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    gen = torch.Generator().manual_seed(seed)
    return [to_png(img) for img in detok.render(torch.tensor(codes), steps=steps, generator=gen)]


def write_story(out: Path, story: list[tuple[str, list[int]]], pngs: list[bytes], ckpt: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    segments, figures = [], []
    for k, ((caption, codes), png) in enumerate(zip(story, pngs)):
        name = f"segment_{k:03d}.png"
        (out / name).write_bytes(png)
        segments.append({"caption": caption, "visual_codes": codes, "image": name})
        figures.append(f"<figure><img src='{name}' width=192 style='image-rendering:pixelated'>"
                       f"<figcaption>{k + 1}. {html.escape(caption)}</figcaption></figure>")
    (out / "story.json").write_text(json.dumps({"checkpoint": str(ckpt), "segments": segments}, indent=2) + "\n")
    (out / "story.html").write_text(
        "<!doctype html><meta charset=utf-8><title>seedstory</title>"
        "<style>body{font-family:sans-serif;display:flex;flex-wrap:wrap}figure{width:200px}</style><body>"
        + "".join(figures) + "</body>\n")
    return out / "story.html"


def run_demo(out: Path, prompt: str, ckpt: Path | None = None, segments: int = 4, seed: int = 0) -> Path:
    from actors.config import TINY
    from training.init_checkpoint import init_checkpoint

    if ckpt is None:
        ckpt = EMBEDDED_CHECKPOINT if (EMBEDDED_CHECKPOINT / "manifest.json").is_file() else out / "ckpt-tiny-random"
        if not (ckpt / "manifest.json").is_file():
            t0 = time.time()
            init_checkpoint(TINY, ckpt, seed=seed)
            print(f"built a random-init tiny checkpoint at {ckpt} in {time.time() - t0:.1f}s")
    story = write_segments(ckpt, prompt, segments, seed)
    return write_story(out, story, render(ckpt, [codes for _, codes in story], seed), ckpt)
