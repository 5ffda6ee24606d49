import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.imageio import decode_image, resize_square
from training.storystream import SCHEMA, chunk_windows, convert, read_dataset, read_table, write_shards


def test_windows_follow_the_official_chunker():
    assert chunk_windows(30, 10) == [(0, 10), (10, 20), (20, 30)]
    assert chunk_windows(25, 10) == [(0, 10), (10, 20)]  # the short tail is dropped
    assert chunk_windows(9, 10) == []
    assert chunk_windows(7, 3) == [(0, 3), (3, 6)]


@pytest.fixture
def planted(storyworld, tmp_path):
    """The session StoryWorld, copied, with faults planted in stories 1-4 (story 0 and 5 stay clean)."""
    root = tmp_path / "release"
    shutil.copytree(storyworld, root)
    lines = [json.loads(x) for x in (root / "storyworld.jsonl").read_text().splitlines()]
    (root / "images" / lines[1]["images"][12]).unlink()  # missing: story 1, window 1
    (root / "images" / lines[2]["images"][3]).write_bytes(b"not a jpeg")  # corrupt: story 2, window 0
    lines[3]["captions"] = lines[3]["captions"][:-1]  # 29 captions, 30 images
    lines[4]["images"], lines[4]["captions"] = lines[4]["images"][:25], lines[4]["captions"][:25]  # 2 windows
    (root / "storyworld.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, lines


def test_converter_skips_bad_windows_and_keeps_captions_with_their_pictures(planted, tmp_path):
    root, lines = planted
    summary = convert(
        root / "storyworld.jsonl", root / "images", tmp_path / "out", window=10, image_size=32, progress=False
    )
    assert summary.stories == 6
    assert summary.windows_written == 3 + 2 + 2 + 0 + 2 + 3
    assert dict(summary.skipped) == {
        "windows_missing_image": 1,
        "windows_corrupt_image": 1,
        "stories_count_mismatch": 1,
    }
    assert dict(summary.bad_images) == {"missing_image": 1, "corrupt_image": 1}

    table = read_table(tmp_path / "out")
    assert table.schema.equals(SCHEMA) and table.num_rows == 12
    kept = sorted((r["story_id"], r["window"]) for r in table.select(["story_id", "window"]).to_pylist())
    assert kept == [
        ("0", 0),
        ("0", 1),
        ("0", 2),
        ("1", 0),
        ("1", 2),
        ("2", 1),
        ("2", 2),
        ("4", 0),
        ("4", 1),
        ("5", 0),
        ("5", 1),
        ("5", 2),
    ]
    for row in table.to_pylist():
        story, lo = lines[int(row["story_id"])], row["window"] * 10
        assert row["captions"] == story["captions"][lo : lo + 10] and row["subset"] == "storyworld"
        assert row["image_size"] == 32 and len(row["images"]) == 10
        # Each picture is the resized source picture of the same segment, never a neighbour's.
        for k in (0, 9):
            want = resize_square(decode_image((root / "images" / story["images"][lo + k]).read_bytes()), 32)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["images"][k]))), np.asarray(want))


def test_rerun_into_the_same_output_neither_duplicates_nor_loses(planted, tmp_path):
    root, _ = planted
    for _ in range(2):
        convert(root / "storyworld.jsonl", root / "images", tmp_path / "out", image_size=32, progress=False)
    first = read_table(tmp_path / "out")
    assert first.num_rows == 12
    # A second subset beside it stays separate, and a third run leaves both intact.
    convert(
        root / "storyworld.jsonl",
        root / "images",
        tmp_path / "out",
        image_size=32,
        subset="other",
        progress=False,
    )
    convert(root / "storyworld.jsonl", root / "images", tmp_path / "out", image_size=32, progress=False)
    both = read_table(tmp_path / "out")
    assert both.num_rows == 24 and sorted(set(both.column("subset").to_pylist())) == ["other", "storyworld"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp folders left


def _rows(n):
    return [
        {
            "story_id": f"s{i}",
            "subset": "t",
            "window": i % 3,
            "captions": [f"cap {i}", "b"],
            "images": [bytes([i]) * 5, b""],
            "image_size": 8,
        }
        for i in range(n)
    ]


def test_parquet_round_trip_across_shards(tmp_path):
    assert write_shards(iter(_rows(7)), tmp_path, "t", rows_per_shard=3) == 7
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "t-00000.parquet",
        "t-00001.parquet",
        "t-00002.parquet",
    ]
    assert pq.read_metadata(tmp_path / "t-00002.parquet").num_rows == 1
    assert read_table(tmp_path).to_pylist() == _rows(7)
    # Fewer rows on a re-run: the stale third shard is gone.
    write_shards(iter(_rows(4)), tmp_path, "t", rows_per_shard=3)
    assert read_table(tmp_path).to_pylist() == _rows(4)


def test_reader_returns_a_ray_dataset(tmp_path, ray_cluster):
    write_shards(iter(_rows(7)), tmp_path, "t", rows_per_shard=3)
    ds = read_dataset(tmp_path)
    assert ds.count() == 7
    rows = sorted(ds.take_all(), key=lambda r: r["story_id"])
    assert [r["story_id"] for r in rows] == [f"s{i}" for i in range(7)]
    assert list(rows[3]["images"]) == [bytes([3]) * 5, b""]


def test_cli_writes_a_world_and_converts_it(tmp_path):
    cli = [sys.executable, "-m", "cluster.cli", "data"]
    subprocess.run(
        cli
        + [
            "storyworld",
            "--stories",
            "2",
            "--segments",
            "12",
            "--seed",
            "1",
            "--size",
            "64",
            "--out",
            str(tmp_path / "w"),
        ],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        cli
        + [
            "convert",
            "--jsonl",
            str(tmp_path / "w" / "storyworld.jsonl"),
            "--images",
            str(tmp_path / "w" / "images"),
            "--out",
            str(tmp_path / "pq"),
            "--window",
            "5",
            "--image-size",
            "32",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "windows written: 4" in done.stdout and "stories read: 2" in done.stdout
    assert "convert storyworld" in done.stderr  # the progress bar
    assert read_table(tmp_path / "pq").num_rows == 4
