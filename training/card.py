"""The model card (``README.md`` in a checkpoint folder), composed from what the pipeline recorded:
``training.json`` (written by ``seedstory train``) and ``eval.md`` (written by
``seedstory eval --card``)."""

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
    lines = [
        f"# seedstory `{manifest.preset.name}` checkpoint",
        "",
        f"A {manifest.image_size}x{manifest.image_size} picture is Q={manifest.num_queries} query tokens, "
        f"whose hidden rows the picture heads map to Q continuous features of D={manifest.feature_dim}; "
        f"vocabulary {manifest.tokens.vocab_size}, weights in {manifest.dtype}, {size / 1e6:.1f} MB on disk.",
        "",
    ]
    lines += _training_lines(training)
    lines += ["## Evaluation", "", evaluation.rstrip(), ""]
    path = ckpt / "README.md"
    path.write_text(portable("\n".join(lines)) + "\n")
    return path


def add_evaluation(ckpt: str | Path, title: str, table: str) -> Path:
    """Put one eval's table into ``eval.md`` under ``### title``, replacing an earlier one of that
    title and keeping the others (e.g. 25 and 50 segments), then rewrite the card."""
    path = Path(ckpt) / "eval.md"
    sections = _sections(path.read_text()) if path.is_file() else {}
    sections[title] = table.strip()
    path.write_text("\n\n".join(f"### {t}\n\n{body}" for t, body in sections.items()) + "\n")
    return write_card(ckpt)


def _sections(text: str) -> dict[str, str]:
    """``### title`` sections of eval.md, in order; text before the first one (an older card's
    single table) is dropped: it is replaced by the titled ones."""
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    return {title.strip(): body.strip() for title, body in zip(parts[1::2], parts[2::2])}


def portable(text: str) -> str:
    """Paths as a reader of the card would type them, never the training machine's: an absolute
    path to a ``data/`` or ``checkpoints/`` folder is shown from that folder on."""
    return re.sub(r"/[^\s`'\"]*?/((?:data|checkpoints)/[^\s`'\"]+)", r"\1", text)


def _windows_line(training: dict) -> str:
    """How the pictures and captions became training windows: the convert command, when recorded."""
    provenance = training.get("provenance") or {}
    if "window" not in provenance:
        return f"- converted to StoryStream windows: `{training['data']}`"
    return (
        f"- converted to StoryStream windows of {provenance['window']} segments: `seedstory data convert "
        f"--jsonl {provenance['jsonl']} --images {provenance['images']} --out {training['data']} "
        f"--window {provenance['window']}`"
    )


def _training_lines(training: dict) -> list[str]:
    if not training:
        return ["## Training", "", "Random initialisation (`seedstory init`); not trained.", ""]
    world = (training.get("provenance") or {}).get("storyworld") or {}
    stages = training.get("stages", {})
    total = sum(s["seconds"] for s in stages.values())
    out = ["## Training", "", "Data:", ""]
    if world:
        out += [
            f"- StoryWorld (the `{world.get('world', 'classic')}` world), {world['stories']} stories of "
            f"{world['segments']} segments, data seed **{world['seed']}**, pictures at {world['size']} px: "
            f"`{world['command']}`"
        ]
    out += [
        _windows_line(training),
        "",
        "Command:",
        "",
        f"    {training['command']}",
        "",
        f"Training time on this machine: **{total / 60:.1f} min** in all.",
        "",
        "| stage | steps | batch/worker | time (min) | final losses |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for name, stage in sorted(stages.items(), key=lambda kv: STAGES.index(kv[0])):
        losses = ", ".join(f"{k} {v:.4g}" for k, v in stage["metrics"].items() if k != "step")
        out.append(
            f"| {name} | {stage['steps']} | {stage['spec']['batch_size']} | {stage['seconds'] / 60:.1f} "
            f"| {losses} |"
        )
        if stage.get("extended_from"):
            notes.append(
                f"- {name}: trained to {stage['extended_from']} steps, then resumed to {stage['steps']}."
            )
        if stage.get("carried_from"):
            notes.append(f"- {name}: carried over from {stage['carried_from']}.")
        if stage.get("note"):  # how the stage started, where a card reader would not guess it
            notes.append(f"- {name}: {stage['note']}.")
    return out + [""] + (notes + [""] if notes else [])
