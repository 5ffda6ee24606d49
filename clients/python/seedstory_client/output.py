"""A story on disk: its PNGs, ``story.json`` and ``story.html`` (captions beside pictures), and back."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from google.protobuf import json_format

from seedstory_client.client import Story, StorySegment
from seedstory_client.v1.story_pb2 import StoryRequest


def write_story(out: Path, story: Story, source: str = "") -> Path:
    """PNGs, story.json and story.html (captions beside pictures) in ``out``; returns the page.
    ``source`` names the model (the server's checkpoint name), never its path. A story cut short may
    end on a caption whose picture never came: it gets ``"image": null`` and no picture on the page.
    story.json keeps each segment's exact caption ids, its picture's features (base64 of the
    ImageEvent's bytes, with their rows and dim) and the story's request, so ``read_story`` +
    ``continuation_request`` can finish it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segments, figures = [], []
    for seg in story.segments:
        name = f"segment_{seg.index:03d}.png" if seg.png else None
        picture = ""
        if name:
            (out / name).write_bytes(seg.png)
            picture = (
                f"<img src='{name}' alt='segment {seg.index + 1}' width=192 "
                f"style='image-rendering:pixelated'>"
            )
        segments.append(
            {
                "caption": seg.caption,
                "caption_ids": seg.caption_ids,
                "features": base64.b64encode(seg.features).decode("ascii"),
                "feature_rows": seg.feature_rows,
                "feature_dim": seg.feature_dim,
                "image": name,
            }
        )
        figures.append(
            f"<figure>{picture}<figcaption>{seg.index + 1}. {html.escape(seg.caption)}</figcaption></figure>"
        )
    (out / "story.json").write_text(
        json.dumps(
            {
                "story_id": story.story_id,
                "source": source,
                "stats": story.stats,
                "resumes": story.resumes,
                "continuation_ids": story.continuation_ids,
                "request": _request_json(out, story.request),
                "segments": segments,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "story.html").write_text(
        "<!doctype html><meta charset=utf-8><title>seedstory</title>"
        "<style>body{font-family:sans-serif;display:flex;flex-wrap:wrap}figure{width:200px}</style><body>"
        + "".join(figures)
        + "</body>\n"
    )
    return out / "story.html"


def read_story(folder: Path) -> Story:
    """The story ``write_story`` wrote into ``folder``, pictures included (server timestamps are not kept)."""
    folder = Path(folder)
    saved = json.loads((folder / "story.json").read_text())
    segments = [
        StorySegment(
            k,
            s["caption"],
            png=(folder / s["image"]).read_bytes() if s["image"] else b"",
            features=base64.b64decode(s.get("features", "")),
            caption_ids=s.get("caption_ids", []),
            feature_rows=s.get("feature_rows", 0),
            feature_dim=s.get("feature_dim", 0),
        )
        for k, s in enumerate(saved["segments"])
    ]
    return Story(
        saved["story_id"],
        segments,
        saved["stats"],
        request=_request_from_json(folder, saved.get("request")),
        resumes=saved.get("resumes", 0),
        continuation_ids=saved.get("continuation_ids", []),
    )


def _request_json(out: Path, request: StoryRequest | None) -> dict | None:
    """The request as the proto's JSON mapping, its start image as a file beside it rather than base64."""
    if request is None:
        return None
    plain = StoryRequest()
    plain.CopyFrom(request)
    plain.ClearField("start_image")
    saved = json_format.MessageToDict(plain, preserving_proto_field_name=True)
    if request.start_image:
        saved["start_image"] = (
            "start_image.png" if request.start_image.startswith(b"\x89PNG") else "start_image.jpg"
        )
        (out / saved["start_image"]).write_bytes(request.start_image)
    return saved


def _request_from_json(folder: Path, saved: dict | None) -> StoryRequest | None:
    if saved is None:  # written before story.json kept the request: continuation_request says so
        return None
    saved = dict(saved)
    image = saved.pop("start_image", None)
    request = json_format.ParseDict(saved, StoryRequest())
    if image:
        request.start_image = (folder / image).read_bytes()
    return request
