"""StoryStream windows in Parquet, and the converter from the official release format.

One row per story window: story id, subset, window index, captions, encoded images
(PNG bytes, resized) and the image size. Shards are named by subset and index and are
replaced as a whole set, so re-running a conversion into the same folder neither
duplicates nor loses rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.imageio import ImageError, decode_image, resize_square, to_png

SCHEMA = pa.schema(
    [
        pa.field("story_id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("image_size", pa.int32(), nullable=False),
    ]
)


def chunk_windows(length: int, window: int) -> list[tuple[int, int]]:
    """Non-overlapping windows of exactly ``window`` segments; a shorter tail is dropped.

    This is the official chunker's rule (SEED-Story ``StoryStream/chunk_data.py``).
    """
    return [(i, i + window) for i in range(0, length - window + 1, window)]


def write_shards(rows: Iterator[dict], out: str | Path, subset: str, rows_per_shard: int = 256) -> int:
    """Write rows as ``{subset}-NNNNN.parquet``, replacing that subset's previous shards at the end.

    Shards go to a temporary folder first, so an interrupted run leaves the old set intact.
    Returns the number of rows written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{subset}-", dir=out))
    try:
        written, shard, batch = 0, 0, []
        for row in rows:
            batch.append(row)
            if len(batch) == rows_per_shard:
                _write_shard(batch, tmp / f"{subset}-{shard:05d}.parquet")
                written, shard, batch = written + len(batch), shard + 1, []
        if batch:
            _write_shard(batch, tmp / f"{subset}-{shard:05d}.parquet")
            written += len(batch)
        for old in out.glob(f"{subset}-*.parquet"):
            old.unlink()
        for new in sorted(tmp.iterdir()):
            os.replace(new, out / new.name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_shard(rows: list[dict], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All windows in a folder (or one file) as one Arrow table, in shard order."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {path}")
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA, columns=columns) for f in files])


def read_dataset(path: str | Path):
    """The windows as a Ray Data dataset (for Ray Train's ``get_dataset_shard``)."""
    import ray.data

    files = sorted(str(f) for f in Path(path).glob("*.parquet")) if Path(path).is_dir() else [str(path)]
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {path}")
    return ray.data.read_parquet(files, schema=SCHEMA)


@dataclass
class ConvertSummary:
    stories: int = 0
    windows_written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count of stories or windows
    bad_images: Counter = field(default_factory=Counter)  # reason -> count of distinct files

    def lines(self) -> list[str]:
        out = [f"stories read: {self.stories}", f"windows written: {self.windows_written}"]
        out += [f"skipped {k}: {v}" for k, v in sorted(self.skipped.items())]
        out += [f"bad image files ({k}): {v}" for k, v in sorted(self.bad_images.items())]
        return out


class _ImageCache:
    """Loads each referenced file once per story; remembers why a file is unusable."""

    def __init__(self, root: Path, size: int, summary: ConvertSummary):
        self.root, self.size, self.summary = root, size, summary
        self.cache: dict[str, bytes | str] = {}

    def get(self, rel: str) -> bytes | str:
        """PNG bytes, or a reason string ('missing_image' / 'corrupt_image')."""
        if rel not in self.cache:
            self.cache[rel] = self._load(rel)
            if isinstance(self.cache[rel], str):
                self.summary.bad_images[self.cache[rel]] += 1
        return self.cache[rel]

    def _load(self, rel: str) -> bytes | str:
        path = self.root / rel
        if not path.is_file():
            return "missing_image"
        try:
            return to_png(resize_square(decode_image(path.read_bytes()), self.size))
        except ImageError:
            return "corrupt_image"


def convert_story(
    story: dict, subset: str, window: int, images: _ImageCache, summary: ConvertSummary
) -> Iterator[dict]:
    """Rows for one official-format story. Windows with an unusable picture are skipped whole,
    so captions never shift against pictures."""
    if not isinstance(story, dict) or "id" not in story:
        summary.skipped["stories_without_id"] += 1
        return
    caps, paths = story.get("captions"), story.get("images")
    if not isinstance(caps, list) or not isinstance(paths, list) or len(caps) != len(paths):
        summary.skipped["stories_count_mismatch"] += 1
        return
    for window_index, (lo, hi) in enumerate(chunk_windows(len(caps), window)):
        loaded = [images.get(p) for p in paths[lo:hi]]
        reason = next((x for x in loaded if isinstance(x, str)), None)
        if reason:
            summary.skipped[f"windows_{reason}"] += 1
            continue
        summary.windows_written += 1
        yield {
            "story_id": str(story["id"]),
            "subset": subset,
            "window": window_index,
            "captions": caps[lo:hi],
            "images": loaded,
            "image_size": images.size,
        }


def convert(
    jsonl: str | Path,
    images: str | Path,
    out: str | Path,
    window: int = 10,
    image_size: int = 64,
    subset: str | None = None,
    progress: bool = True,
) -> ConvertSummary:
    """Official StoryStream (JSONL + image folder) -> Parquet windows in ``out``."""
    from tqdm import tqdm

    if window < 1 or image_size < 8:
        raise ValueError("window must be >= 1 and image_size >= 8")
    jsonl, summary = Path(jsonl), ConvertSummary()
    subset = subset or jsonl.stem
    lines = jsonl.read_text().splitlines()

    def rows() -> Iterator[dict]:
        for line in tqdm(lines, desc=f"convert {subset}", unit="story", disable=not progress):
            if not line.strip():
                continue
            summary.stories += 1
            try:
                story = json.loads(line)
            except json.JSONDecodeError:
                summary.skipped["stories_bad_json"] += 1
                continue
            yield from convert_story(
                story, subset, window, _ImageCache(Path(images), image_size, summary), summary
            )

    write_shards(rows(), out, subset)
    write_provenance(out, jsonl, images, window, image_size, summary)
    return summary


def write_provenance(
    out: Path, jsonl: Path, images, window: int, image_size: int, summary: ConvertSummary
) -> None:
    """Where the windows came from (and, for StoryWorld, its seed): model cards cite this."""
    meta = jsonl.with_name("storyworld.json")
    record = {
        "jsonl": str(jsonl.resolve()),
        "images": str(Path(images).resolve()),
        "window": window,
        "image_size": image_size,
        "summary": summary.lines(),
        "storyworld": json.loads(meta.read_text()) if meta.is_file() else None,
    }
    (Path(out) / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")


# -- the command: `seedstory data convert` -----------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory data convert``, registered on ``seedstory data``'s subcommands."""
    convert_parser = commands.add_parser(
        "convert", help="official StoryStream JSONL + images -> Parquet windows"
    )
    convert_parser.add_argument("--jsonl", required=True)
    convert_parser.add_argument("--images", required=True, help="image root the JSONL paths are relative to")
    convert_parser.add_argument("--out", required=True)
    convert_parser.add_argument("--window", type=int, default=10)
    convert_parser.add_argument("--image-size", type=int, default=64)
    convert_parser.add_argument("--subset", help="subset name (default: the JSONL file name)")
    convert_parser.set_defaults(func=run_command)
    return convert_parser


def run_command(args: argparse.Namespace) -> None:
    summary = convert(
        args.jsonl, args.images, args.out, window=args.window, image_size=args.image_size, subset=args.subset
    )
    print("\n".join(summary.lines()))
