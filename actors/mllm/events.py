"""What the story engine reports, as plain dataclasses (no torch, no vLLM; features are numpy).

``StoryEngine.step`` returns them, in order per story: a ``CaptionWritten`` when a caption is
final, a ``PictureWritten`` when its picture's features are, and a ``StoryEnd``. The same objects
cross Ray from the MLLMPool to the ingress, with the pool's additions filled in; the bulk job,
the eval and the benchmarks read them too. (The gRPC API's ``CaptionEvent``/``ImageEvent`` are
what the ingress makes of them for clients.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CaptionWritten:
    """A caption is final: its picture has begun (an empty caption is the prompt's own)."""

    story_id: str
    index: int  # 0-based index of the segment within this request
    caption_ids: list[int]
    at: float = 0.0  # wall time (unix s) of the engine step that wrote it
    caption: str = ""  # the text (the MLLMPool decodes it)


@dataclass
class PictureWritten:
    """A segment's picture is written: its features, the output head's map of the MLLM's final-norm
    hidden rows at the picture's Q query positions, float32 (Q, D)."""

    story_id: str
    index: int
    caption_ids: list[int]
    features: np.ndarray
    at: float = 0.0


@dataclass
class StoryEnd:
    story_id: str
    aborted: bool
    prompt_tokens: int
    output_tokens: int
    truncated: bool = False  # stopped by the engine's length limit before its last segment
    at: float = 0.0
    peak_blocks: int = 0  # most KV blocks the story held at once, and bytes per block (the pool's)
    block_bytes: int = 0


Event = CaptionWritten | PictureWritten | StoryEnd
