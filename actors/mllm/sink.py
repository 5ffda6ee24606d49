"""The sink policy: which token positions of a sequence stay in the KV cache.

One pure function of token ids and parameters (no torch). Three users derive the same
answer from it, so they cannot drift apart: the vLLM KV manager (frees blocks), the
attention layer (masks exactly the evicted tokens, positions by rank), and the dense
reference in tests.

A *segment* is a caption followed by one picture: it ends at its ``</img>``. With m complete
segments and a window of W, segments 1..m-W have left the window. Modes:

- ``dense``:      everything.
- ``window``:     the window only: every token after the EoI of segment m-W.
- ``streaming``:  StreamingLLM: the first ``sink_tokens`` plus the window.
- ``multimodal``: SEED-Story's multimodal sink: the first ``sink_tokens``; for every segment
  that left the window, ``boi_before`` tokens before its ``<img>`` through ``boi_after`` after
  it, and ``eoi_before`` before its ``</img>`` through ``eoi_after`` after it; and the window.

SEED-Story released 4/7/8/3 for pictures of 64 visual tokens. Left unset, the neighbourhoods
are those counts scaled to the checkpoint's Q (``for_pictures``): at Q=16 the released counts
would keep 15 of every old picture's 16 codes, i.e. nearly every old picture whole between
fragments of captions, which is no longer a sink of a few tokens (README, "Evaluation",
measures both).

The policy is *monotone*: a token once evicted is never kept again, so the KV manager may
free it at once and the worker (whose block table still names freed blocks) never reads
it. To keep that true, a segment's BoI/EoI neighbourhoods never reach back before the
segment's own first token (an earlier segment may already be gone).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

MODES = ("dense", "window", "streaming", "multimodal")
Ranges = list[tuple[int, int]]  # sorted, disjoint, half-open [lo, hi)
NEIGHBOURHOODS = ("boi_before", "boi_after", "eoi_before", "eoi_after")
RELEASED = {"boi_before": 4, "boi_after": 7, "eoi_before": 8, "eoi_after": 3}  # SEED-Story's, at Q=64
RELEASED_QUERIES = 64


@dataclass(frozen=True)
class SinkSettings:
    """The policy's parameters, without the token ids (those come from the checkpoint).

    A neighbourhood left as None is resolved against the checkpoint by ``for_pictures``.
    """

    mode: str = "multimodal"
    sink_tokens: int = 4
    boi_before: int | None = None
    boi_after: int | None = None
    eoi_before: int | None = None
    eoi_after: int | None = None
    window_segments: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sink mode {self.mode!r} is not one of {MODES}")
        counts = [self.sink_tokens] + [c for c in self.neighbourhoods() if c is not None]
        if min(counts) < 0:
            raise ValueError("sink token counts must be >= 0")
        if self.window_segments < 1:
            raise ValueError(f"window_segments must be >= 1, got {self.window_segments}")

    def neighbourhoods(self) -> list[int | None]:
        return [getattr(self, name) for name in NEIGHBOURHOODS]

    def for_pictures(self, num_queries: int) -> SinkSettings:
        """Every unset neighbourhood set to SEED-Story's released count scaled by Q/64 (at least 1)."""
        scale = num_queries / RELEASED_QUERIES
        unset = {name: max(1, round(RELEASED[name] * scale)) for name in NEIGHBOURHOODS if getattr(self, name) is None}
        return replace(self, **unset)

    def with_ids(self, boi_id: int, eoi_id: int) -> SinkParams:
        return SinkParams(boi_id=boi_id, eoi_id=eoi_id, **asdict(self))


@dataclass(frozen=True, kw_only=True)
class SinkParams(SinkSettings):
    """Settings plus the ids of <img> and </img>: everything ``kept_ranges`` needs."""

    boi_id: int
    eoi_id: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "multimodal" and None in self.neighbourhoods():  # the only mode that reads them
            raise ValueError("sink neighbourhoods are unset: resolve them with for_pictures(Q) first")
        if self.boi_id == self.eoi_id:
            raise ValueError("boi_id and eoi_id must differ")


def segment_marks(ids: Sequence[int], p: SinkParams) -> tuple[list[int | None], list[int]]:
    """For each complete segment j: the position of its <img> (None if absent) and of its </img>."""
    boi, eoi = p.boi_id, p.eoi_id
    marks = [(pos, t) for pos, t in enumerate(ids) if t == boi or t == eoi]  # hot path: one C-speed scan
    bois: list[int | None] = []
    eois: list[int] = []
    last_boi = None
    for pos, t in marks:
        if t == boi:
            last_boi = pos
        else:
            bois.append(last_boi)
            eois.append(pos)
            last_boi = None
    return bois, eois


def merge(ranges: list[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def kept_ranges(ids: Sequence[int], p: SinkParams) -> Ranges:
    """Kept positions of a sequence whose newest token is ``ids[-1]``, as merged ranges."""
    n = len(ids)
    if p.mode == "dense" or n == 0:
        return [(0, n)]
    bois, eois = segment_marks(ids, p)
    gone = len(eois) - p.window_segments  # segments 1..gone have left the window
    window_start = eois[gone - 1] + 1 if gone > 0 else 0
    keep = [(window_start, n)]
    if p.mode in ("streaming", "multimodal"):
        keep.append((0, min(p.sink_tokens, n)))
    if p.mode == "multimodal":
        for j in range(max(gone, 0)):
            start = eois[j - 1] + 1 if j else 0  # neighbourhoods stay inside their own segment (monotone)
            if bois[j] is not None:
                keep.append((max(start, bois[j] - p.boi_before), bois[j] + p.boi_after + 1))
            keep.append((max(start, eois[j] - p.eoi_before), min(n, eois[j] + p.eoi_after + 1)))
    return merge(keep)


def positions(ranges: Ranges) -> list[int]:
    return [i for lo, hi in ranges for i in range(lo, hi)]


def count(ranges: Ranges) -> int:
    return sum(hi - lo for lo, hi in ranges)


def contains(ranges: Ranges, pos: int) -> bool:
    k = bisect_left(ranges, (pos + 1,)) - 1
    return k >= 0 and ranges[k][0] <= pos < ranges[k][1]


def kept_blocks(ranges: Ranges, block_size: int) -> list[int]:
    """Logical block indices that hold at least one kept position."""
    blocks: list[int] = []
    for lo, hi in ranges:
        for b in range(lo // block_size, (hi - 1) // block_size + 1):
            if not blocks or blocks[-1] != b:
                blocks.append(b)
    return blocks


def max_blocks(s: SinkSettings, longest_segment: int, max_segments: int, max_len: int, block_size: int) -> int:
    """Most blocks one request can hold under the policy: at most ``max_segments`` segments of at
    most ``longest_segment`` tokens, and at most ``max_len`` tokens in all.

    Used to admit requests on their bounded footprint instead of on ``max_len``.
    """
    def touched(tokens: int) -> int:  # blocks a run of `tokens` positions can straddle
        return -(-tokens // block_size) + 1

    everything = -(-max_len // block_size)
    if s.mode == "dense":
        return everything
    blocks = touched((s.window_segments + 1) * longest_segment) + 1  # the window, and block 0
    if s.mode == "multimodal":
        gone = max(0, max_segments - s.window_segments)
        blocks += gone * (touched(s.boi_before + s.boi_after + 1) + touched(s.eoi_before + s.eoi_after + 1))
    return min(blocks, everything)
