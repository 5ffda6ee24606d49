"""Where the MLLM looks when it writes a character's name under the multimodal sink: a name
outside the story's cast (the caption is judged invalid) against a name of the cast.

    python benchmarks/outsider_probe.py --stories data/eval-emb-25/stories.jsonl --heldout data/rw-heldout \\
        --out benchmarks/results/outsider_probe.json [--ckpt checkpoints/tiny] [--limit N] [--threads 1] \\
        [--neighbourhoods B,A,B,A] [--sink-tokens N] [--sink-segments N] [--window-segments N]

The eval's multimodal stories (``stories.jsonl``: the captions the model wrote, with the judge's
``valid`` flags) are teacher-forced, token by token, through the transformers MLLM under the
config's sink forced to mode multimodal (``returning_probe.SinkForcer``: the engine's kept set,
re-ranked and rotated). Each story's ids are rebuilt as the engine writes them: ``<s>``, then per
segment the caption's ids, ``<img>``, the Q query ids and ``</img>``. The captions are re-encoded
from their decoded text, which may differ slightly from the token ids the model sampled (a name
sampled as two pieces re-encodes as one); ``settings.reencoding`` counts the captions whose
re-encoding does not even decode back to the same text.

For every character name in a caption written after the window has moved on (caption k >=
window_segments + 1, counting the opening as 0: the opening has left the window, though the sink
may keep it whole), the position whose next token is the name's first token is watched; the name
is an ``outsider`` if it is not in the story's cast (``truth.jsonl``'s looks), else ``cast``. At
that position the attention (mean over layers and heads) is summed per region of the kept
context: the current caption, the window's earlier segments, the sink tokens, the opening caption
and picture, and, of every old segment, the four parts the multimodal sink keeps: the caption's
tail before ``<img>``, ``<img>`` and the first query rows (what the ``<img>`` neighbourhood keeps
of the picture), the last query rows and ``</img>``, and the token(s) after ``</img>`` (the next
caption's first). Anything else kept (e.g. a second sink segment) is ``other``.

Output, per class: each region's share, the mean over the name positions of a story, then the mean
and standard error over the stories that have one; the same per range of segments (0-based); and
how the per-name classes agree with the captions' ``valid`` flags (a cast name may sit in an
invalid caption beside an outsider; a caption can be invalid with no outsider at all). Outsiders
are never a caption's first name and come late in a story, so the classes are also compared like
with like (``like_with_like``: later names from segment 15 on), and within each story that has both.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from returning_probe import SinkForcer  # its sibling: run as python benchmarks/outsider_probe.py

from actors.mllm.sink import neighbourhood_ranges, segment_marks
from training.card import portable
from training.storyworld import NAMES

CLASSES = ("outsider", "cast")
AFTER_EOI = "after </img>"
REGIONS = (
    "current caption",
    "window",
    "sink tokens",
    "opening caption",
    "opening picture",
    "caption tail before <img>",
    "<img> and first query rows",
    "last query rows and </img>",
    AFTER_EOI,
    "other",
)
# 0-based caption indexes; 9 is the first caption written after the default window of 8 moved on.
SEGMENT_BINS = ((9, 14), (15, 19), (20, 24))
_NAME = re.compile(rf"\b(?:{'|'.join(NAMES)})\b")


@dataclass
class Written:
    """One story as the eval wrote it, in ids, with the names of its captions located."""

    ids: list[int]  # <s> first, every segment with its picture
    spans: list[tuple[int, int]]  # per segment: [first token, one past its </img>)
    valid: list[bool]  # per caption: the eval's verdict
    cast: frozenset[str]
    names: list[list[tuple[str, int]]]  # per caption: (name, position of its first token)
    reencoded: int  # captions whose re-encoded ids do not decode back to their text


# -- the stories, as token ids --------------------------------------------------------------------


def read_multimodal(path: Path, limit: int | None) -> list[dict]:
    """The eval's multimodal stories, by story index, the first ``limit`` of them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if r["mode"] == "multimodal"), key=lambda r: r["story"])
    if not rows:
        raise ValueError(f"{path} has no multimodal stories")
    return rows[:limit]


def name_starts(caption: str, offsets: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """Every name in ``caption`` and the index of its first token: the first token whose character
    span reaches into the name (a token's span may start with the space before the word)."""
    return [
        (match[0], next(t for t, (_, hi) in enumerate(offsets) if hi > match.start()))
        for match in _NAME.finditer(caption)
    ]


def build_story(row: dict, builder, cast: frozenset[str]) -> Written:
    """``row``'s captions as the engine writes them, every picture as ``<img>`` Q ``</img>``."""
    from actors.tokenizer.text import segment_ids

    layout, captions = builder.manifest.tokens, row["captions"]
    caps = builder.caption_ids(captions)
    encoded = builder.text(captions, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == caps  # the offsets belong to the ids the engine reads
    ids, spans, names = [layout.bos], [], []
    for cap, text, offsets in zip(caps, captions, encoded["offset_mapping"]):
        start = len(ids)
        names.append([(name, start + t) for name, t in name_starts(text, offsets)])
        ids += segment_ids(layout, cap, picture=True)
        spans.append((start, len(ids)))
    reencoded = sum(builder.text.decode(cap).strip() != text for cap, text in zip(caps, captions))
    return Written(ids, spans, row["valid"], cast, names, reencoded)


def read_stories(path: Path, heldout: Path, builder, limit: int | None) -> list[Written]:
    """The eval's multimodal stories with their casts, read as the eval reads its held-out set
    (story i of the eval is line i of the held-out folder; its opening must match)."""
    from training.evaluation.heldout import read_heldout

    rows = read_multimodal(path, limit)
    held = read_heldout(heldout, rows[-1]["story"] + 1, max(len(r["captions"]) for r in rows))
    stories = []
    for row in rows:
        if row["captions"][0] != held.openings[row["story"]]:
            raise ValueError(f"story {row['story']}: its opening is not held-out story {row['story']}'s")
        cast = frozenset(c.name for c in held.casts[row["story"]])
        stories.append(build_story(row, builder, cast))
    return stories


# -- the regions of the kept context ---------------------------------------------------------------


def first_probed(sink) -> int:
    """The first caption written after the window moved on: segments 0..window-1 fill it. Only the
    opening has left it there, which ``sink_segments`` >= 1 keeps whole: the old segments'
    neighbourhoods appear from the next caption on."""
    return sink.window_segments + 1


def old_parts(bois: list[int | None], eois: list[int], position: int, sink) -> dict[int, str]:
    """What the multimodal sink keeps of each segment that left the window by ``position`` (its
    ``segment_marks``), labelled by part. Query rows the ``<img>`` neighbourhood keeps are its
    "first rows"."""
    part = {}
    for j in range(max(len(eois) - sink.window_segments, 0)):  # as kept_ranges counts them
        start = eois[j - 1] + 1 if j else 0
        for n, (lo, hi) in enumerate(neighbourhood_ranges(start, bois[j], eois[j], sink)):
            around_boi = bois[j] is not None and n == 0
            for i in range(lo, min(hi, position + 1)):
                if i > eois[j]:
                    part.setdefault(i, AFTER_EOI)
                elif bois[j] is not None and i < bois[j]:
                    part.setdefault(i, "caption tail before <img>")
                else:
                    part.setdefault(
                        i, "<img> and first query rows" if around_boi else "last query rows and </img>"
                    )
    return part


def region_labels(story: Written, position: int, sink) -> dict[int, str]:
    """Every position up to ``position`` (one that predicts a name) with its region; the first
    rule that applies wins."""
    bois, eois = segment_marks(story.ids[: position + 1], sink)
    gone = len(eois) - sink.window_segments  # segments 0..gone-1 have left the window
    window_start = eois[gone - 1] + 1 if gone > 0 else 0
    current = story.spans[len(eois)][0] if len(eois) < len(story.spans) else position + 1
    opening_boi, opening_end = bois[0] if eois else None, story.spans[0][1]
    old = old_parts(bois, eois, position, sink)
    label = {}
    for i in range(position + 1):
        if i >= current:
            label[i] = "current caption"
        elif i >= window_start:
            label[i] = "window"
        elif i < sink.sink_tokens:
            label[i] = "sink tokens"
        elif i < opening_end:
            label[i] = "opening caption" if opening_boi is None or i < opening_boi else "opening picture"
        else:
            label[i] = old.get(i, "other")
    return label


def region_shares(kept: list[int], weights: np.ndarray, label: dict[int, str]) -> list[float]:
    share = dict.fromkeys(REGIONS, 0.0)
    for pos, weight in zip(kept, weights):
        share[label[pos]] += float(weight)
    return [share[r] for r in REGIONS]


# -- probing -----------------------------------------------------------------------------------------


def name_positions(story: Written, sink) -> list[dict]:
    """Each name of each probed caption: its segment, class, caption verdict and the position that
    predicts its first token."""
    return [
        {
            "segment": k,
            "name": name,
            "class": "cast" if name in story.cast else "outsider",
            "valid": story.valid[k],
            "position": first - 1,
            "order": order,  # 0: the caption's first name (mostly the hero)
        }
        for k in range(first_probed(sink), len(story.spans))
        for order, (name, first) in enumerate(story.names[k])
    ]


def probe_story(model, story: Written, sink) -> list[dict]:
    """``name_positions`` with each one's attention share per region."""
    names = name_positions(story, sink)
    if not names:
        return []
    watch = {n["position"] for n in names}
    _, seen, _ = SinkForcer(model, sink).run(story.ids[: max(watch) + 1], watch)
    for n in names:
        kept, weights = seen[n["position"]]
        n["share"] = region_shares(kept, weights, region_labels(story, n["position"], sink))
    return names


# -- summaries -------------------------------------------------------------------------------------


def mean_se(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows)
    se = rows.std(0, ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else np.full(rows.shape[1], np.nan)
    return rows.mean(0), se


def class_summary(runs: list[list[dict]], keep) -> dict:
    """The region shares of the names ``keep`` selects: per story their mean, then the mean and
    standard error over the stories with one."""
    per_story = [[n["share"] for n in names if keep(n)] for names in runs]
    per_story = [np.mean(s, 0) for s in per_story if s]
    out = {"positions": sum(keep(n) for names in runs for n in names), "stories": len(per_story)}
    if not per_story:
        return {**out, "share": None}
    mean, se = mean_se(per_story)
    return {**out, "share": {r: {"mean": float(m), "se": float(s)} for r, m, s in zip(REGIONS, mean, se)}}


def bin_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


LATE = 15  # outsiders are named from segment 15 on only: the like-with-like comparison starts there


def like_with_like(n: dict) -> bool:
    """A name in the slots outsiders take: not its caption's first, from segment ``LATE`` on. (A
    caption's first name is mostly the hero, predicted from its opening words: it reads the window
    more and its own caption less than any later name does, whichever its class.)"""
    return n["order"] > 0 and n["segment"] >= LATE


def paired_by_story(runs: list[list[dict]]) -> dict:
    """Outsider − cast shares among ``like_with_like`` names, within each story that has both."""
    diffs = []
    for names in runs:
        same = [n for n in names if like_with_like(n)]
        by_class = {c: [n["share"] for n in same if n["class"] == c] for c in CLASSES}
        if all(by_class.values()):
            diffs.append(np.mean(by_class["outsider"], 0) - np.mean(by_class["cast"], 0))
    if not diffs:
        return {"stories": 0, "share": None}
    mean, se = mean_se(diffs)
    return {
        "stories": len(diffs),
        "share": {r: {"mean": float(m), "se": float(e)} for r, m, e in zip(REGIONS, mean, se)},
    }


def summarise(runs: list[list[dict]]) -> dict:
    out = {}
    for cls in CLASSES:
        out[cls] = class_summary(runs, lambda n, cls=cls: n["class"] == cls)
        out[cls]["by_segments"] = {
            bin_name(lo, hi): class_summary(
                runs, lambda n, cls=cls, lo=lo, hi=hi: n["class"] == cls and lo <= n["segment"] <= hi
            )
            for lo, hi in SEGMENT_BINS
        }
        out[cls]["like_with_like"] = class_summary(
            runs, lambda n, cls=cls: n["class"] == cls and like_with_like(n)
        )
    out["outsider_minus_cast_like_with_like"] = paired_by_story(runs)
    return out


def agreement(runs: list[list[dict]], stories: list[Written], sink) -> dict:
    """The per-name classes against the captions' ``valid`` flags, by name and by caption."""
    by_name = {cls: {"valid": 0, "invalid": 0} for cls in CLASSES}
    for names in runs:
        for n in names:
            by_name[n["class"]]["valid" if n["valid"] else "invalid"] += 1
    by_caption = {kind: {"valid": 0, "invalid": 0} for kind in ("with an outsider", "cast only", "no name")}
    for story in stories:
        for k in range(first_probed(sink), len(story.spans)):
            said = {name for name, _ in story.names[k]}
            kind = "no name" if not said else "cast only" if said <= story.cast else "with an outsider"
            by_caption[kind]["valid" if story.valid[k] else "invalid"] += 1
    return {"names": by_name, "captions": by_caption}


def cell(share: dict | None, region: str) -> str:
    if share is None:
        return "–"
    return f"{share[region]['mean']:.3f} ± {share[region]['se']:.3f}"


def markdown(classes: dict) -> str:
    """Two tables: each class's shares over all probed captions, then per range of segments."""
    bins = [bin_name(lo, hi) for lo, hi in SEGMENT_BINS]
    head = "| region | " + " | ".join(CLASSES) + " |\n|---|" + "---|" * len(CLASSES)
    rows = [f"| {r} | " + " | ".join(cell(classes[c]["share"], r) for c in CLASSES) + " |" for r in REGIONS]
    rows.append("| name positions (stories) | " + " | ".join(counts(classes[c]) for c in CLASSES) + " |")
    columns = [(c, b) for c in CLASSES for b in bins]
    head2 = "| region | " + " | ".join(f"{c} {b}" for c, b in columns) + " |\n|---|" + "---|" * len(columns)
    rows2 = [
        f"| {r} | " + " | ".join(cell(classes[c]["by_segments"][b]["share"], r) for c, b in columns) + " |"
        for r in REGIONS
    ]
    rows2.append(
        "| name positions (stories) | "
        + " | ".join(counts(classes[c]["by_segments"][b]) for c, b in columns)
        + " |"
    )
    paired = classes["outsider_minus_cast_like_with_like"]
    head3 = (
        f"| region, later names from segment {LATE} on | outsider | cast | outsider − cast, same story |"
        "\n|---|---|---|---|"
    )
    rows3 = [
        f"| {r} | {cell(classes['outsider']['like_with_like']['share'], r)} | "
        f"{cell(classes['cast']['like_with_like']['share'], r)} | {cell(paired['share'], r)} |"
        for r in REGIONS
    ]
    rows3.append(
        f"| name positions (stories) | {counts(classes['outsider']['like_with_like'])} | "
        f"{counts(classes['cast']['like_with_like'])} | ({paired['stories']}) |"
    )
    return "\n".join([head, *rows, "", head2, *rows2, "", head3, *rows3])


def counts(summary: dict) -> str:
    return f"{summary['positions']} ({summary['stories']})"


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from actors.checkpoint import part_dir
    from actors.mllm.model import load_mllm
    from actors.tokenizer.prompts import PromptBuilder
    from cluster.mllm_config import resolve

    torch.set_num_threads(args.threads)
    ckpt, sink = resolve(args)  # the checkpoint and sink settings `seedstory eval` would use
    builder = PromptBuilder(str(ckpt))
    layout = builder.manifest.tokens
    sink = replace(sink, mode="multimodal").for_pictures(builder.manifest.num_queries)
    params = sink.with_ids(layout.boi, layout.eoi)
    model = load_mllm(part_dir(ckpt, "mllm"))
    stories = read_stories(args.stories, args.heldout, builder, args.limit)
    started, runs = time.time(), []
    for n, story in enumerate(stories, 1):
        runs.append(probe_story(model, story, params))
        if n % 10 == 0 or n == len(stories):
            print(f"[outsider] {n}/{len(stories)} stories, {time.time() - started:.0f}s", flush=True)
    return {
        "settings": {
            "ckpt": str(ckpt),
            "stories_file": str(args.stories),
            "heldout": str(args.heldout),
            "stories": len(stories),
            "sink": asdict(sink),
            "first_probed_segment": first_probed(sink),
            "segment_bins": [bin_name(lo, hi) for lo, hi in SEGMENT_BINS],
            "reencoding": {
                "captions": sum(len(s.spans) for s in stories),
                "not_decoding_back": sum(s.reencoded for s in stories),
            },
            "seconds_probing": round(time.time() - started, 1),
        },
        "regions": list(REGIONS),
        "classes": summarise(runs),
        "agreement": agreement(runs, stories, sink),
    }


def parse_args() -> argparse.Namespace:
    from cluster.mllm_config import add_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    ap.add_argument("--stories", type=Path, default=Path("data/eval-emb-25/stories.jsonl"))
    ap.add_argument("--heldout", type=Path, default=Path("data/rw-heldout"))
    ap.add_argument("--limit", type=int, help="probe only the first N stories")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/outsider_probe.json"))
    add_arguments(ap, sink_mode=False)  # --config and the sink flags; the mode is always multimodal
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.time()
    result = run(args)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(portable(json.dumps(result, indent=1)) + "\n")  # no machine's own paths
    print(markdown(result["classes"]))
    print("agreement:", json.dumps(result["agreement"]))
    print("re-encoding:", json.dumps(result["settings"]["reencoding"]), f"{result['seconds']}s")


if __name__ == "__main__":
    main()
