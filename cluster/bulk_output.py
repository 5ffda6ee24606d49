"""What a bulk job (``cluster/bulk.py``) leaves in OUT, and reading it back.

    OUT/segments/part-*.parquet   one row per segment of every committed story (``SEGMENTS``)
    OUT/errors/part-*.parquet     one row per bad prompt (``ERRORS``)
    OUT/gallery.html              with --gallery: a page per story

A commit writes one Parquet file under a temporary name and renames it into place, so a file is
whole or absent; a rerun reads what is committed and skips it (docs/bulk.md#exactly-once).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.features import to_bytes

SEGMENTS = pa.schema(
    [
        ("story_id", pa.string()),
        ("segment", pa.int32()),
        ("caption", pa.string()),
        ("png", pa.binary()),
        # The picture's features: Q rows of D float32 values, as the MLLM wrote them and the
        # de-tokenizer drew them; they render the picture again without the MLLM.
        ("features", pa.list_(pa.list_(pa.float32()))),
        ("opening", pa.string()),
    ]
)
ERRORS = pa.schema([("story_id", pa.string()), ("caption", pa.string()), ("reason", pa.string())])


def cell_text(value) -> str:
    """A Parquet string cell as text ("" for a missing one)."""
    return value if isinstance(value, str) else ""


def cell_caption(value) -> str:
    """A caption cell as the job compares and commits it: its text, stripped."""
    return cell_text(value).strip()


# -- what is already done -------------------------------------------------------------------------
def committed(out: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(story id, caption) pairs in committed files: the stories (with their opening) and the error rows."""
    return _committed_pairs(out / "segments", "opening"), _committed_pairs(out / "errors", "caption")


def _committed_pairs(folder: Path, caption: str) -> set[tuple[str, str]]:
    """Half-written temporaries are removed (one job writes into a folder at a time)."""
    for tmp in folder.glob(".tmp-*"):
        tmp.unlink()  # a commit that never reached its rename
    pairs: set[tuple[str, str]] = set()
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["story_id", caption])
        pairs.update(
            zip(table.column("story_id").to_pylist(), map(cell_caption, table.column(caption).to_pylist()))
        )
    return pairs


# -- commit ---------------------------------------------------------------------------------------
def commit(batch, out: str, segments: int):
    """Whole stories -> one segments file; bad rows -> one errors file. Returns what it wrote."""
    ok = batch[batch["error"] == ""]
    bad = batch[batch["error"] != ""]
    short = ok[[len(c) != segments for c in ok["captions"]]]
    if len(short):  # the engine ended a story early: a bug, never a silent partial story
        raise RuntimeError(f"stories {list(short['story_id'])} have fewer than {segments} segments")
    rows = [
        {
            "story_id": sid,
            "segment": k,
            "caption": cap,
            "png": png,
            "features": features,
            "opening": opening,
        }
        for sid, opening, caps, pngs, all_features in zip(
            ok["story_id"], ok["caption"], ok["captions"], ok["pngs"], ok["features"]
        )
        for k, (cap, png, features) in enumerate(zip(caps, pngs, all_features))
    ]
    atomic_write(Path(out) / "segments", pa.Table.from_pylist(rows, schema=SEGMENTS))
    errors = [
        {"story_id": s, "caption": c, "reason": r}
        for s, c, r in zip(bad["story_id"], bad["caption"], bad["error"])
    ]
    atomic_write(Path(out) / "errors", pa.Table.from_pylist(errors, schema=ERRORS))
    import pandas as pd

    return pd.DataFrame({"stories": [len(ok)], "errors": [len(bad)]})


def atomic_write(folder: Path, table: pa.Table) -> None:
    """``table`` as a new part file in ``folder`` (nothing for an empty table)."""
    if table.num_rows == 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = folder / f".tmp-{name}"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / name)  # atomic on one filesystem: readers see the whole file or none


# -- reading it back ------------------------------------------------------------------------------
def read_stories(out: str | Path) -> pa.Table:
    """Every committed segment row, sorted by story and segment."""
    parts = sorted((Path(out) / "segments").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SEGMENTS.empty_table()
    return table.sort_by([("story_id", "ascending"), ("segment", "ascending")])


def read_errors(out: str | Path) -> pa.Table:
    parts = sorted((Path(out) / "errors").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else ERRORS.empty_table()


def write_gallery(out: Path, limit: int = 50) -> Path:
    """gallery/<story_id>/story.html for up to ``limit`` stories, and gallery.html linking them."""
    import html

    from seedstory_client import Story, StorySegment, write_story

    stories: dict[str, Story] = {}
    for row in read_stories(out).to_pylist():
        story = stories.setdefault(row["story_id"], Story(story_id=row["story_id"]))
        features = np.asarray(row["features"], dtype=np.float32)  # (Q, D)
        story.segments.append(
            StorySegment(
                row["segment"],
                row["caption"],
                row["png"],
                features=to_bytes(features),
                feature_rows=features.shape[0],
                feature_dim=features.shape[1],
            )
        )
    links = []
    for sid, story in list(stories.items())[:limit]:
        write_story(out / "gallery" / sid, story)
        links.append(
            f"<li><a href='gallery/{sid}/story.html'>{html.escape(story.segments[0].caption)}</a></li>"
        )
    page = out / "gallery.html"
    page.write_text(
        f"<!doctype html><meta charset=utf-8><title>seedstory bulk</title><h1>{len(stories)} stories"
        f"</h1><ul>{''.join(links)}</ul>\n"
    )
    return page
