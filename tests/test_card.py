"""The model card: composed from what training and the evals recorded, in portable paths."""

from __future__ import annotations

import json
from pathlib import Path

from actors.config import TINY
from training.card import add_evaluation, write_card


def _checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder with a manifest and a training record, and no weights (the card needs none)."""
    from actors.checkpoint import Manifest, write_manifest
    from actors.tokenizer.text import token_layout, train_text_tokenizer

    tok = train_text_tokenizer(
        ["Once upon a time, Milo the red circle walks in the park."] * 4, 300, TINY.num_queries
    )
    write_manifest(
        tmp_path, Manifest(preset=TINY, tokens=token_layout(tok, TINY.num_queries), dtype="float16")
    )
    world = {
        "stories": 20,
        "segments": 30,
        "seed": 3,
        "size": 64,
        "world": "returning",
        "command": "seedstory data storyworld --stories 20 --world returning --out data/rw",
    }
    trained_in = tmp_path / "elsewhere"  # the training machine's own folders, absolute
    record = {
        "command": "seedstory train --preset tiny --data data/rw-stream --out checkpoints/x",
        "data": str(trained_in / "data" / "rw-stream"),
        "provenance": {
            "window": 15,
            "jsonl": str(trained_in / "data" / "rw" / "storyworld.jsonl"),
            "images": str(trained_in / "data" / "rw" / "images"),
            "storyworld": world,
        },
        "stages": {
            "visual": {
                "steps": 7,
                "seconds": 120.0,
                "metrics": {"loss": 0.5, "step": 7},
                "spec": {"batch_size": 64},
            }
        },
    }
    (tmp_path / "training.json").write_text(json.dumps(record))
    return tmp_path


def test_card_names_the_world_the_windows_and_no_machine_path(tmp_path):
    card = write_card(_checkpoint(tmp_path)).read_text()
    assert "the `returning` world" in card and "data seed **3**" in card
    assert (
        "windows of 15 segments: `seedstory data convert --jsonl data/rw/storyworld.jsonl "
        "--images data/rw/images --out data/rw-stream --window 15`"
    ) in card
    assert str(tmp_path) not in card
    assert f"Q={TINY.num_queries} query tokens" in card and f"D={TINY.feature_dim}" in card
    assert "| visual | 7 | 64 | 2.0 | loss 0.5 |" in card


def test_card_says_where_a_stage_was_carried_over_from_and_how_it_started(tmp_path):
    ckpt = _checkpoint(tmp_path)
    record = json.loads((ckpt / "training.json").read_text())
    record["stages"]["visual"] |= {"carried_from": "an earlier run", "note": "from random weights"}
    (ckpt / "training.json").write_text(json.dumps(record))
    card = write_card(ckpt).read_text()
    assert "- visual: carried over from an earlier run." in card and "- visual: from random weights." in card


def test_evaluations_of_different_lengths_stay_side_by_side(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "eval.md").write_text("an older card's single table\n")
    add_evaluation(ckpt, "25 segments", "| table | 25 |")
    add_evaluation(ckpt, "50 segments", "| table | 50 |")
    card = add_evaluation(ckpt, "25 segments", "| table | 25, again |").read_text()
    evaluation = card.split("## Evaluation", 1)[1]
    assert "older card" not in evaluation
    assert (
        evaluation.index("### 25 segments")
        < evaluation.index("| table | 25, again |")
        < evaluation.index("### 50 segments")
        < evaluation.index("| table | 50 |")
    )
    assert "| table | 25 |" not in evaluation
