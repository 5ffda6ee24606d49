"""benchmarks/visual_variants.py trains a variant and judges it, once at the end and every
``--judge-every`` steps, on a small returning world written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.storyworld_writer import write_storyworld

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("rw")
    write_storyworld(out, stories=3, segments=4, seed=5, size=64, world="returning")
    return out


def test_a_variant_is_judged_along_the_way(world, tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [
        sys.executable,
        "benchmarks/visual_variants.py",
        "--name",
        "t",
        "--data",
        str(world),
        "--heldout",
        str(world),
        "--stories",
        "2",
        "--segments",
        "2",
        "--pictures",
        "12",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--judge-every",
        "2",
        "--threads",
        "1",
        "--num-queries",
        "4",
        "--feature-dim",
        "8",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["steps"], r["of_steps"]) for r in rows] == [(2, 3), (3, 3)]
    for r in rows:
        assert r["continuous"] is True and (r["visual"]["num_queries"], r["visual"]["feature_dim"]) == (4, 8)
        assert "codebook_size" not in r["visual"] and set(r["final"]) == {"recon"}  # the stage's own loss
        assert 0.0 <= r["mean"] <= 1.0 and 0.0 <= r["place"] <= 1.0
        assert set(r["per_attribute"]) == {"colour", "shape", "pattern"}


def test_the_codebook_options_are_gone(world, tmp_path):
    """The model class has no codebook: asking for one is an argument error, not a silent no-op."""
    for option in (["--codebook-size", "64"], ["--continuous"]):
        done = subprocess.run(
            [sys.executable, "benchmarks/visual_variants.py", "--name", "t", *option],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and "unrecognized arguments" in done.stderr
