"""Bulk generation as a Ray Data job on the session's local cluster: every prompt's story exactly
once, bad rows in the errors table, and a job killed midway that a rerun completes."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.bulk import BulkConfig, run_bulk, triage
from cluster.bulk_output import read_errors, read_stories, write_gallery
from cluster.settings import ROOT

GOOD, SEGMENTS = 20, 3


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """20 good prompts (one with a start image) and two bad rows: no caption, an unreadable image."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, format="PNG")
    captions = [f"Once upon a time, Milo the red circle walks in the park, day {i}." for i in range(GOOD)]
    images = [buf.getvalue()] + [None] * (GOOD - 1)
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(
        pa.table(
            {
                "caption": captions + [None, "Kip jumps."],
                "image": pa.array(images + [None, b"\x89PNG broken"], pa.binary()),
            }
        ),
        path,
    )
    return path


def assert_exactly_once(out) -> set[str]:
    table = read_stories(out)
    keys = Counter(zip(table.column("story_id").to_pylist(), table.column("segment").to_pylist()))
    assert max(keys.values()) == 1, "a segment row is duplicated"
    stories = {sid for sid, _ in keys}
    assert len(stories) == GOOD
    for sid in stories:
        assert sorted(k for s, k in keys if s == sid) == list(range(SEGMENTS)), sid
    return stories


def assert_bad_rows(out) -> None:
    reasons = sorted(read_errors(out).column("reason").to_pylist())
    assert len(reasons) == 2
    assert reasons[0].startswith("caption:") and reasons[1].startswith("start_image:")


def test_bulk_writes_every_story_once_and_bad_rows_to_the_errors_table(
    ray_cluster, tiny_ckpt, prompts, tmp_path
):
    out = tmp_path / "out"
    config = BulkConfig(
        str(prompts), str(out), str(tiny_ckpt), segments=SEGMENTS, steps=2, stories_per_batch=8
    )
    summary = run_bulk(config)
    assert (summary["stories"], summary["errors"], summary["skipped"]) == (GOOD, 2, 0)
    assert_exactly_once(out)
    assert_bad_rows(out)
    assert read_stories(out).schema.field("features").type == pa.list_(pa.list_(pa.float32()))
    rows = read_stories(out).to_pylist()
    for row in rows:
        assert row["caption"] and Image.open(io.BytesIO(row["png"])).size == (64, 64)
        features = np.asarray(row["features"], np.float32)  # Q rows of D: it renders again
        assert features.shape == (16, 64) and np.isfinite(features).all()
    for row in (r for r in rows if r["segment"] == 0):
        if row["opening"].endswith("day 0."):  # its picture was given: every caption is the model's
            assert row["caption"] != row["opening"]
        else:  # the opening caption gets the first picture
            assert row["caption"] == row["opening"]
    # Re-running into the same folder skips everything already there and adds nothing.
    again = run_bulk(config)
    assert (again["stories"], again["errors"], again["skipped"]) == (0, 0, GOOD + 2)
    assert read_stories(out).num_rows == GOOD * SEGMENTS
    page = write_gallery(out)
    assert page.read_text().count("<li>") == GOOD
    saved = json.loads(next((out / "gallery").glob("*/story.json")).read_text())
    for seg in saved["segments"]:  # the gallery's stories carry their pictures' features too
        assert (seg["feature_rows"], seg["feature_dim"]) == (16, 64)
        assert len(base64.b64decode(seg["features"])) == 16 * 64 * 4


def test_a_killed_bulk_job_rerun_ends_with_every_story_exactly_once(
    ray_cluster, tiny_ckpt, prompts, tmp_path
):
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [
        sys.executable,
        "-m",
        "cluster.bulk",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--ckpt",
        str(tiny_ckpt),
        "--segments",
        str(SEGMENTS),
        "--steps",
        "2",
        "--stories-per-batch",
        "2",
    ]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not list((out / "segments").glob("part-*.parquet")):
            assert job.poll() is None and time.time() < deadline, "the job ended before its first commit"
            time.sleep(0.1)
    finally:
        job.kill()  # SIGKILL: no cleanup runs in the driver
        job.wait()
    committed = len(set(read_stories(out).column("story_id").to_pylist()))
    assert 0 < committed < GOOD, f"{committed} stories committed: the kill was not midway"
    subprocess.run(
        cmd, cwd=ROOT, env=env, check=True, timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert_exactly_once(out)
    assert_bad_rows(out)


def test_a_repeated_story_id_gets_one_story_and_the_repeats_go_to_the_errors_table(
    ray_cluster, tiny_ckpt, tmp_path
):
    caption = [f"Once upon a time, Milo the red circle walks in the park, day {i}." for i in range(4)]
    rows = [
        ("s1", caption[0]),
        ("s2", caption[1]),
        ("s3", caption[2]),
        ("s3", caption[3]),
        ("s1", caption[0]),
    ]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"story_id": [i for i, _ in rows], "caption": [c for _, c in rows]}), prompts)
    out = tmp_path / "out"
    config = BulkConfig(
        str(prompts), str(out), str(tiny_ckpt), segments=SEGMENTS, steps=2, stories_per_batch=2
    )
    assert counts(run_bulk(config)) == (3, 2, 0)
    stories = read_stories(out)
    keys = Counter(zip(stories.column("story_id").to_pylist(), stories.column("segment").to_pylist()))
    assert sorted(keys) == [(sid, k) for sid in ("s1", "s2", "s3") for k in range(SEGMENTS)]
    assert max(keys.values()) == 1
    # The first row of an id wins.
    assert {r["story_id"]: r["opening"] for r in stories.to_pylist()} == {
        "s1": caption[0],
        "s2": caption[1],
        "s3": caption[2],
    }
    assert error_rows(out) == [
        ("s1", caption[0], "story_id: repeated (first at row 0)"),
        ("s3", caption[3], "story_id: repeated (first at row 2)"),
    ]
    assert counts(run_bulk(config)) == (0, 0, 5)  # a rerun adds nothing
    # A later run that gives a committed id another caption: a bad row, never a second story.
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"story_id": ["s2"], "caption": ["Kip jumps."]}), other)
    assert counts(run_bulk(replace(config, prompts=str(other)))) == (0, 1, 0)
    assert read_stories(out).equals(stories)
    assert ("s2", "Kip jumps.", "story_id: already committed with another caption") in error_rows(out)
    assert counts(run_bulk(replace(config, prompts=str(other)))) == (0, 0, 1)
    assert counts(run_bulk(config)) == (0, 0, 5) and len(error_rows(out)) == 3


def test_a_repeat_of_the_first_rows_caption_never_hides_that_row_from_a_resumed_run():
    ids, captions = ["s1", "s1"], ["Milo walks.", "Milo walks."]
    repeat = {"story_id": "s1", "caption": "Milo walks.", "reason": "story_id: repeated (first at row 0)"}
    assert triage(ids, captions, set(), set()) == ([0], [], [repeat])
    # Killed after the first row's story was committed, before the repeat's error row: reported now.
    assert triage(ids, captions, {("s1", "Milo walks.")}, set()) == ([], [0], [repeat])
    assert triage(ids, captions, {("s1", "Milo walks.")}, {("s1", "Milo walks.")}) == ([], [0, 1], [])


def counts(summary: dict) -> tuple[int, int, int]:
    return summary["stories"], summary["errors"], summary["skipped"]


def error_rows(out) -> list[tuple]:
    return sorted((r["story_id"], r["caption"], r["reason"]) for r in read_errors(out).to_pylist())
