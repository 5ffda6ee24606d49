"""What a story request may ask for, checked once at the ingress.

``check_request`` turns a ``StoryRequest`` message into a plain ``StorySpec`` or raises
``InputError`` naming the field. Caption token counts and image decoding are checked
where the ids and features are made, in the TokenizerPool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from actors.errors import InputError


@dataclass(frozen=True)
class StoryLimits:
    max_segments: int = 25  # segments one request may ask for (the paper's 25)
    default_segments: int = 10
    max_caption_chars: int = 400
    max_story_so_far: int = 24  # earlier segments a request may carry
    max_image_bytes: int = 8 << 20
    max_steps: int = 100
    default_steps: int = 6  # with the default sampler (dpm++): judged as good as 20 Euler steps
    default_guidance: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.default_segments <= self.max_segments:
            raise ValueError("limits: need 1 <= default_segments <= max_segments")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError("limits: need 1 <= default_steps <= max_steps")


@dataclass(frozen=True)
class StorySpec:
    caption: str  # "" with no caption_ids: continuing a story, the MLLM writes the next caption
    start_image: bytes | None
    segments: int
    sampling: dict  # engine Sampling fields
    steps: int
    guidance: float
    render_seed: int | None
    # Earlier segments: [{"caption", "caption_ids", "image"}], "image" None for a picture the service
    # wrote (its ids recompute it), else the picture the client gave, as PNG/JPEG bytes.
    story_so_far: list[dict] = field(default_factory=list)
    caption_ids: list[int] = field(default_factory=list)  # the opening caption as exact ids, if given


def check_request(req, limits: StoryLimits) -> StorySpec:
    """StoryRequest message -> StorySpec, or InputError for the first bad field."""
    story_so_far = _story_so_far(req.story_so_far, limits)
    start_image = _image(req.start_image, limits, "start_image")
    return StorySpec(
        caption=_opening(req, limits, continuing=bool(story_so_far) and start_image is None),
        caption_ids=list(req.caption_ids),
        start_image=start_image,
        segments=_segments(req.segments, limits),
        sampling=_sampling(req.sampling),
        steps=_int_or_default(
            req.rendering.steps, limits.default_steps, 1, limits.max_steps, "rendering.steps"
        ),
        guidance=_guidance(req.rendering.guidance, limits),
        render_seed=req.rendering.seed if req.rendering.HasField("seed") else None,
        story_so_far=story_so_far,
    )


def _opening(req, limits: StoryLimits, continuing: bool) -> str:
    """The opening caption's text. Exact ids (``caption_ids``) stand in for it, and a story that is
    continued without a start image may leave both empty: the MLLM writes the next caption."""
    return _caption(req.caption, "caption", limits, optional=bool(req.caption_ids) or continuing)


def _caption(text: str, name: str, limits: StoryLimits, optional: bool = False) -> str:
    text = text.strip()
    if not text and not optional:
        raise InputError(name, "is empty")
    if len(text) > limits.max_caption_chars:
        raise InputError(name, f"is {len(text)} characters, more than {limits.max_caption_chars}")
    return text


def _image(data: bytes, limits: StoryLimits, name: str) -> bytes | None:
    if len(data) > limits.max_image_bytes:
        raise InputError(name, f"is {len(data)} bytes, more than {limits.max_image_bytes}")
    return bytes(data) or None


def _segments(n: int, limits: StoryLimits) -> int:
    if n == 0:
        return limits.default_segments
    if not 1 <= n <= limits.max_segments:
        raise InputError("segments", f"must be between 1 and {limits.max_segments}, got {n}")
    return n


def _int_or_default(value: int, default: int, low: int, high: int, name: str) -> int:
    if value == 0:
        return default
    if not low <= value <= high:
        raise InputError(name, f"must be between {low} and {high}, got {value}")
    return value


def _guidance(value: float, limits: StoryLimits) -> float:
    if value == 0:
        return limits.default_guidance
    if not math.isfinite(value) or not 0 < value <= 30:
        raise InputError("rendering.guidance", f"must be in (0, 30], got {value}")
    return value


def _sampling(sampling) -> dict:
    if not math.isfinite(sampling.temperature) or not 0 <= sampling.temperature <= 5:
        raise InputError("sampling.temperature", f"must be in [0, 5], got {sampling.temperature}")
    top_p = sampling.top_p or 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InputError("sampling.top_p", f"must be in (0, 1], got {sampling.top_p}")
    seed = sampling.seed if sampling.HasField("seed") else None
    return {"temperature": sampling.temperature, "top_p": top_p, "seed": seed}


def _story_so_far(segments, limits: StoryLimits) -> list[dict]:
    if len(segments) > limits.max_story_so_far:
        raise InputError("story_so_far", f"has {len(segments)} segments, more than {limits.max_story_so_far}")
    out = []
    for i, seg in enumerate(segments):
        ids = list(seg.caption_ids)  # exact ids stand in for the text (checked by the tokenizer)
        text = _caption(seg.caption, f"story_so_far[{i}].caption", limits, optional=bool(ids))
        out.append({"caption": text, "caption_ids": ids, "image": _picture(seg, i, limits)})
    return out


def _picture(seg, i: int, limits: StoryLimits) -> bytes | None:
    """None for a picture the service wrote (``written: true``), else the given picture's bytes (the
    TokenizerPool decodes and encodes them)."""
    kind = seg.WhichOneof("picture")
    if kind == "image":
        image = _image(seg.image, limits, f"story_so_far[{i}].image")
        if image is None:
            raise InputError(f"story_so_far[{i}].image", "is empty")
        return image
    if kind == "written" and seg.written:
        return None
    raise InputError(
        f"story_so_far[{i}].picture",
        "is missing: set written (the service wrote this picture) or give it as image bytes",
    )
