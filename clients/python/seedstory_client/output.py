"""A story on disk: its PNGs, ``story.json`` and ``story.html`` (captions beside pictures)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from seedstory_client.client import Story


def write_story(out: Path, story: Story, source: str = "") -> Path:
    """PNGs, story.json and story.html (captions beside pictures) in ``out``; returns the page.
    ``source`` names the model (the server's checkpoint name), never its path. A story cut short may
    end on a caption whose picture never came: it gets ``"image": null`` and no picture on the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segments, figures = [], []
    for seg in story.segments:
        name = f"segment_{seg.index:03d}.png" if seg.png else None
        picture = ""
        if name:
            (out / name).write_bytes(seg.png)
            picture = (f"<img src='{name}' alt='segment {seg.index + 1}' width=192 "
                       f"style='image-rendering:pixelated'>")
        segments.append({"caption": seg.caption, "visual_codes": seg.visual_codes, "image": name})
        figures.append(f"<figure>{picture}<figcaption>{seg.index + 1}. "
                       f"{html.escape(seg.caption)}</figcaption></figure>")
    (out / "story.json").write_text(json.dumps({"story_id": story.story_id, "source": source,
                                                "stats": story.stats, "segments": segments}, indent=2) + "\n")
    (out / "story.html").write_text(
        "<!doctype html><meta charset=utf-8><title>seedstory</title>"
        "<style>body{font-family:sans-serif;display:flex;flex-wrap:wrap}figure{width:200px}</style><body>"
        + "".join(figures) + "</body>\n")
    return out / "story.html"
