"""The sink policy: which token positions of a sequence stay in the KV cache.

One pure function of token ids and parameters (no torch). Three users derive the same
answer from it, so they cannot drift apart: the vLLM KV manager (frees blocks), the
attention layer (masks exactly the evicted tokens, positions by rank), and the dense
reference in tests.

A *segment* is a caption followed by one picture: it ends at its ``</img>``. With m complete
segments and a window of W, segments 1..m-W have left the window. Modes:

- ``dense``:      everything.
- ``window``:     the window only: every token after the EoI of segment m-W.
- ``streaming``:  StreamingLLM: the sink plus the window.
- ``multimodal``: SEED-Story's multimodal sink: the sink; for every segment that left the
  window, ``boi_before`` tokens before its ``<img>`` through ``boi_after`` after it, and
  ``eoi_before`` before its ``</img>`` through ``eoi_after`` after it; and the window.

The *sink* of both sink modes is the first ``sink_tokens`` of the story, and with
``sink_segments`` = k also its first k segments whole, however long they are. Why a count of
segments: the opening caption is the only one that names the whole cast and its looks; later
captions name a character only. A token count that keeps it must be sized to the longest
opening, and a shorter one cuts the cast list (docs/results.md#a-sink-that-keeps-the-whole-opening).

SEED-Story released 4/7/8/3 for pictures of 64 visual tokens. Left unset, the neighbourhoods
are those counts scaled to the checkpoint's Q (``for_pictures``): at Q=16 the released counts
would keep 15 of every old picture's 16 codes, i.e. nearly every old picture whole between
fragments of captions, which is no longer a sink of a few tokens (docs/results.md#the-four-mode-eval
measures both).

The policy is *monotone*: a token once evicted is never kept again, so the KV manager may
free it at once and the worker (whose block table still names freed blocks) never reads
it. To keep that true, a segment's BoI/EoI neighbourhoods never reach back before the
segment's own first token (an earlier segment may already be gone).

Two forms of the same policy live here: ``kept_ranges`` reads a whole sequence (the
definition, and what tests compare against), and ``SinkTracker`` keeps a story's marks and
updates them from new tokens only (what the engine runs every step). ``HeldBlocks`` is the
compaction rule both sides of the engine replay to agree on which KV blocks a story holds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

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
    sink_segments: int = 0  # opening segments kept whole (the sink modes), on top of sink_tokens
    boi_before: int | None = None
    boi_after: int | None = None
    eoi_before: int | None = None
    eoi_after: int | None = None
    window_segments: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sink mode {self.mode!r} is not one of {MODES}")
        counts = [self.sink_tokens, self.sink_segments] + [c for c in self.neighbourhoods() if c is not None]
        if min(counts) < 0:
            raise ValueError("sink token counts must be >= 0")
        if self.window_segments < 1:
            raise ValueError(f"window_segments must be >= 1, got {self.window_segments}")

    def neighbourhoods(self) -> list[int | None]:
        return [getattr(self, name) for name in NEIGHBOURHOODS]

    def for_pictures(self, num_queries: int) -> SinkSettings:
        """Every unset neighbourhood set to SEED-Story's released count scaled by Q/64 (at least 1)."""
        scale = num_queries / RELEASED_QUERIES
        unset = {
            name: max(1, round(RELEASED[name] * scale))
            for name in NEIGHBOURHOODS
            if getattr(self, name) is None
        }
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


def segment_marks(ids: Sequence[int], params: SinkParams) -> tuple[list[int | None], list[int]]:
    """For each complete segment j: the position of its <img> (None if absent) and of its </img>."""
    boi, eoi = params.boi_id, params.eoi_id
    marks = [(pos, t) for pos, t in enumerate(ids) if t == boi or t == eoi]  # hot path: one C-speed scan
    bois: list[int | None] = []
    eois: list[int] = []
    last_boi = None
    for pos, token in marks:
        if token == boi:
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


def kept_ranges(ids: Sequence[int], params: SinkParams) -> Ranges:
    """Kept positions of a sequence whose newest token is ``ids[-1]``, as merged ranges."""
    length = len(ids)
    if params.mode == "dense" or length == 0:
        return [(0, length)]
    bois, eois = segment_marks(ids, params)
    gone = len(eois) - params.window_segments  # segments 1..gone have left the window
    window_start = eois[gone - 1] + 1 if gone > 0 else 0
    keep = [(window_start, length)]
    if params.mode in ("streaming", "multimodal"):
        keep.append((0, min(sink_end(eois, params), length)))
    if params.mode == "multimodal":
        for j in range(max(gone, 0)):
            start = eois[j - 1] + 1 if j else 0  # neighbourhoods stay inside their own segment (monotone)
            if bois[j] is not None:
                boi_lo, boi_hi = bois[j] - params.boi_before, bois[j] + params.boi_after + 1
                keep.append((max(start, boi_lo), min(length, boi_hi)))
            eoi_lo, eoi_hi = eois[j] - params.eoi_before, eois[j] + params.eoi_after + 1
            keep.append((max(start, eoi_lo), min(length, eoi_hi)))
    return merge(keep)


def sink_end(eois: Sequence[int], settings: SinkSettings) -> int:
    """End of the sink: the first ``sink_tokens``, or through the ``sink_segments``-th segment's
    </img> (as far as the segments written so far reach), whichever is longer."""
    whole = min(settings.sink_segments, len(eois))  # opening segments written so far
    return max(settings.sink_tokens, eois[whole - 1] + 1 if whole else 0)


def positions(ranges: Ranges) -> list[int]:
    return [i for lo, hi in ranges for i in range(lo, hi)]


def count(ranges: Ranges) -> int:
    return sum(hi - lo for lo, hi in ranges)


def contains(ranges: Ranges, pos: int) -> bool:
    k = bisect_left(ranges, (pos + 1,)) - 1
    return k >= 0 and ranges[k][0] <= pos < ranges[k][1]


def neighbourhood_ranges(start: int, boi: int | None, eoi: int, params: SinkParams) -> Ranges:
    """What the multimodal sink keeps of one segment [start, eoi] once it has left the window."""
    out = [(max(start, eoi - params.eoi_before), eoi + params.eoi_after + 1)]
    if boi is not None:
        out.insert(0, (max(start, boi - params.boi_before), boi + params.boi_after + 1))
    return out


def clip(ranges: Ranges, end: int) -> Ranges:
    return [(lo, min(hi, end)) for lo, hi in ranges if lo < end]


@dataclass
class SinkTracker:
    """``kept_ranges`` in incremental form: one story's marks, updated from its new tokens only.

    After ``extend`` has seen tokens 0..seen-1, ``kept()`` equals ``kept_ranges(ids[:seen], params)`` and
    ``kept_count()`` its size. The kept set changes shape only when a ``</img>`` pushes a segment
    out of the window; every other token just extends the window by one. So a step costs what it
    adds, plus O(segments gone) once per picture, never a pass over the story's history.
    """

    params: SinkParams
    seen: int = 0  # tokens seen
    evictions: int = 0  # segments that have left the window so far
    segment_start: int = 0  # first position of the open segment
    open_boi: int | None = None  # <img> of the open segment, if written
    # (start, <img>, </img>) of each segment in the window
    window: list[tuple[int, int | None, int]] = field(default_factory=list)
    # kept ranges of what left the window (and the sink), unclipped
    gone: Ranges = field(default_factory=list)
    window_start: int = 0
    opening: list[int] = field(default_factory=list)  # </img> of the first sink_segments segments
    below: Ranges = field(default_factory=list)  # ``gone`` clipped to the window start
    below_count: int = 0

    def extend(self, ids: Sequence[int]) -> None:
        params, base = self.params, self.seen
        boi, eoi = params.boi_id, params.eoi_id
        marks = [(i, t) for i, t in enumerate(ids) if t == boi or t == eoi]  # C-speed scan
        self.seen += len(ids)
        if params.mode == "dense":
            return
        for offset, token in marks:
            if token == boi:
                self.open_boi = base + offset
            else:
                self._close_segment(base + offset)

    def _close_segment(self, eoi: int) -> None:
        params = self.params
        if len(self.opening) < params.sink_segments:
            self.opening.append(eoi)
        self.window.append((self.segment_start, self.open_boi, eoi))
        self.segment_start, self.open_boi = eoi + 1, None
        if len(self.window) <= params.window_segments:
            return
        start, boi, last = self.window.pop(0)  # this segment leaves the window
        self.evictions += 1
        if params.mode in ("streaming", "multimodal"):  # segments of the sink close before they leave
            self.gone = merge(self.gone + [(0, sink_end(self.opening, params))])
        if params.mode == "multimodal":
            self.gone = merge(self.gone + neighbourhood_ranges(start, boi, last, params))
        self.window_start = last + 1
        self.below = clip(self.gone, self.window_start)
        self.below_count = count(self.below)

    def kept(self) -> Ranges:
        return merge(self.below + [(self.window_start, self.seen)])

    def kept_count(self) -> int:
        return self.below_count + self.seen - self.window_start


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class HeldBlocks:
    """The compaction rule: which entries of a story's vLLM block list hold its KV.

    vLLM's block list is positional: it always has ceil(tokens / block_size) entries, and new
    blocks are appended at the end. Entries may be nulled (their block freed) but never removed.
    Under compaction a story's kept tokens live densely *by rank* in the entries it still holds,
    in list order: rank r is row r % block_size of entry ``entries[r // block_size]``.

    The invariant both sides keep, without telling each other anything:
      in every step in which a story is scheduled, with ``first`` tokens computed before the step,
      ``scheduled`` tokens in it, and ``kept`` = |kept_ranges(ids[:first])|, the story holds the
      first ceil((kept + scheduled) / block_size) + 1 entries of its held list, after appending
      the entries vLLM allocated for this step. The rest are released.
    The scheduler releases them (frees the blocks) right after scheduling the step; the worker
    replays the same rule from the same numbers to know where each rank lives. Entry 0 is
    never released, so a story is known in the worker by the block of its first entry.

    Why the + 1 spare: vLLM appends blocks by position (ceil((first + s) / B) entries in all),
    while the story needs room by rank (kept + s). With one spare held block the appended
    blocks always cover the difference; without it, e.g. B=32 with 60 tokens of which 30 kept
    and 3 new, they do not.
    """

    block_size: int
    entries: list[int] = field(default_factory=list)

    def step(self, first: int, scheduled: int, kept: int) -> list[int]:
        """Apply one step; returns the entries to address this step's K/V by (this step's moves
        still read rows of the entries released now, so they are included, at the end)."""
        size = self.block_size
        self.entries += range(cdiv(first, size), cdiv(first + scheduled, size))
        visible = list(self.entries)
        del self.entries[cdiv(kept + scheduled, size) + 1 :]
        return visible


def max_kept(settings: SinkSettings, longest_segment: int, max_story_segments: int, max_len: int) -> int:
    """Most tokens the policy keeps of one request: at most ``max_story_segments`` segments (its
    prompt's included) of at most ``longest_segment`` tokens, and at most ``max_len`` tokens in all."""
    if settings.mode == "dense":
        return max_len
    kept = (settings.window_segments + 1) * longest_segment  # the window and the open segment
    if settings.mode in ("streaming", "multimodal"):
        kept += settings.sink_tokens + settings.sink_segments * longest_segment
    if settings.mode == "multimodal":
        gone = max(0, max_story_segments - settings.window_segments)
        per_segment = (
            settings.boi_before + settings.boi_after + 1 + settings.eoi_before + settings.eoi_after + 1
        )
        kept += gone * per_segment
    return min(kept, max_len)


def max_blocks(
    settings: SinkSettings,
    longest_segment: int,
    max_story_segments: int,
    max_len: int,
    block_size: int,
    step_tokens: int = 1,
) -> int:
    """Most blocks one request holds under compaction (``HeldBlocks``): its most kept tokens plus
    one step's tokens, and the spare block. Dense holds its whole length."""
    if settings.mode == "dense":
        return cdiv(max_len, block_size)
    return min(
        cdiv(max_kept(settings, longest_segment, max_story_segments, max_len) + step_tokens, block_size) + 1,
        cdiv(max_len, block_size),
    )
