"""The model card (``README.md`` in a checkpoint folder), composed from what the pipeline recorded:
``training.json`` (written by ``seedstory train``) and ``eval.md`` (written by ``seedstory eval --card``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from actors.checkpoint import read_manifest
from training.loop import STAGES


def write_card(ckpt: str | Path) -> Path:
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    training = json.loads((ckpt / "training.json").read_text()) if (ckpt / "training.json").is_file() else {}
    evaluation = (ckpt / "eval.md").read_text() if (ckpt / "eval.md").is_file() else "Not evaluated yet.\n"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != "README.md")
    lines = [f"# seedstory `{manifest.preset.name}` checkpoint", "",
             f"Q={manifest.num_queries} visual tokens per {manifest.image_size}x{manifest.image_size} picture, "
             f"K={manifest.codebook_size} codes, vocabulary {manifest.tokens.vocab_size}, weights in {manifest.dtype}, "
             f"{size / 1e6:.1f} MB on disk.", ""]
    lines += _training_lines(training)
    lines += ["## Evaluation", "", evaluation.rstrip(), ""]
    path = ckpt / "README.md"
    path.write_text(portable("\n".join(lines)) + "\n")
    return path


def portable(text: str) -> str:
    """Paths as a reader of the card would type them, never the training machine's: an absolute
    path to a ``data/`` or ``checkpoints/`` folder is shown from that folder on."""
    return re.sub(r"/[^\s`'\"]*?/((?:data|checkpoints)/[^\s`'\"]+)", r"\1", text)


def _training_lines(t: dict) -> list[str]:
    if not t:
        return ["## Training", "", "Random initialisation (`seedstory init`); not trained.", ""]
    world = (t.get("provenance") or {}).get("storyworld") or {}
    stages = t.get("stages", {})
    total = sum(s["seconds"] for s in stages.values())
    out = ["## Training", "", "Data:", ""]
    if world:
        out += [f"- StoryWorld, {world['stories']} stories of {world['segments']} segments, data seed "
                f"**{world['seed']}**, pictures at {world['size']} px: `{world['command']}`"]
    out += [f"- converted to StoryStream windows: `{t['data']}`", "", "Command:", "", f"    {t['command']}", "",
            f"Training time on this machine: **{total / 60:.1f} min** in all.", "",
            "| stage | steps | batch/worker | time (min) | final losses |", "| --- | --- | --- | --- | --- |"]
    for name, s in sorted(stages.items(), key=lambda kv: STAGES.index(kv[0])):
        losses = ", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items() if k != "step")
        out.append(f"| {name} | {s['steps']} | {s['spec']['batch_size']} | {s['seconds'] / 60:.1f} | {losses} |")
    return out + [""]
