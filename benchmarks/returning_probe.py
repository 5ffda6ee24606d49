"""What a returning character's picture can draw on, under each sink mode.

    seedstory data storyworld --world returning --stories 64 --segments 60 --seed 1 --size 64 \\
        --out data/rw-heldout                                                     # if missing
    python benchmarks/returning_probe.py --ckpt checkpoints/tiny --heldout data/rw-heldout \\
        --stories 32 --segments 30 --out benchmarks/results/returning_probe.json

The sampled eval (``seedstory eval``) says whether the pictures come out right; this says why.
Held-out returning-world stories are teacher-forced, token by token, through the transformers
MLLM under each mode's kept set: the true captions, and every picture as the service writes it,
``<img>`` and the Q query ids ``</img>`` (a written picture is a function of the story's ids: its
features are read off the final-norm hidden rows at the query positions). It follows the
engine's semantics: every token's keys and values are computed once, when the token is read; the
kept ones (``actors.mllm.sink.kept_ranges``, the policy the engine runs) are re-ranked from 0 and
rotated to their ranks. Three measurements:

1. **Feature cosine**: each picture's features as the MLLM writes them (the output head on its Q
   query rows) against the visual tokenizer's features of the true picture (the mllm stage's
   regression target), the mean cosine over the Q rows; on pictures where a friend returns
   (``truth.jsonl``'s ``returning``: back after 10+ segments away, beyond the window of 8) and on
   the others; per mode, with story-paired differences against the window. If the kept
   ``<img>``/``</img>`` neighbourhoods carry a returning friend's look, the multimodal sink's
   cosine on those pictures is higher than the window's.
2. **Attention**: at the query rows of those pictures, the share of attention (mean over layers,
   heads and query rows) on each region of the context: the current segment, the window, the
   sink tokens, the opening caption (the only caption that says the looks), the opening picture,
   the returning friend's last picture before it left, the old tokens the multimodal sink keeps
   (its neighbourhoods), and the rest of the old segments.
3. **What each feature row carries**: over the held-out pictures, how well row q (1..16) of the
   visual tokenizer's features alone tells a friend's colour, shape and pattern (nearest class
   mean, fitted on half the stories and scored on the other half; chance is about 1/6, 1/6, 1/2).
   The multimodal sink keeps query rows 1..boi_after and 17-eoi_before..16 of every old picture.

Results before the switch to features (``nll_*`` keys, code slots) are kept in
benchmarks/results as history.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from actors.mllm.sink import MODES, kept_ranges, positions

REGIONS = (
    "current",
    "window",
    "sink",
    "opening caption",
    "opening picture",
    "last seen picture",
    "kept neighbourhoods",
    "other old",
)


@dataclass
class Story:
    ids: list[int]  # the whole teacher-forced sequence, <s> first
    spans: list[tuple[int, int]]  # per segment: [first token, one past its </img>)
    boi: list[int]  # per segment: the position of its <img>
    returning: list[list[str]]  # per segment: the friends back after 10+ segments away
    present: list[list[str]]  # per segment: who is there
    looks: dict[str, dict[str, str]]
    features: np.ndarray  # per segment: the visual tokenizer's features of its true picture (Q, D)


# -- the stories, as token ids --------------------------------------------------------------------


def read_stories(folder: Path, builder, stories: int, segments: int) -> list[Story]:
    from actors.tokenizer.text import segment_ids

    layout = builder.manifest.tokens
    rows = [json.loads(x) for x in (folder / "storyworld.jsonl").read_text().splitlines()[:stories]]
    truths = [json.loads(x) for x in (folder / "truth.jsonl").read_text().splitlines()[:stories]]
    if any(t.get("world") != "returning" for t in truths):
        raise ValueError(
            f"{folder} is not a returning-world StoryWorld (seedstory data storyworld --world returning)"
        )
    out = []
    for row, truth in zip(rows, truths):
        caps = builder.caption_ids(row["captions"][:segments])
        features = builder.image_features(
            [(folder / "images" / p).read_bytes() for p in row["images"][:segments]]
        )
        bad = [f for f in features if not isinstance(f, np.ndarray)]
        if bad:
            raise ValueError(f"{folder}: a picture does not encode: {bad[0]}")
        ids, spans, bois = [layout.bos], [], []
        for cap in caps:
            start = len(ids)
            ids += segment_ids(layout, cap, picture=True)
            spans.append((start, len(ids)))
            bois.append(start + len(cap))
        segs = truth["segments"][:segments]
        out.append(
            Story(
                ids,
                spans,
                bois,
                [s["returning"] for s in segs],
                [s["present"] for s in segs],
                truth["looks"],
                np.stack(features),
            )
        )
    return out


# -- teacher forcing under a sink mode ---------------------------------------------------------------


class SinkForcer:
    """The transformers MLLM read token by token with the engine's kept set and rank positions."""

    def __init__(self, model, sink):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model, self.sink, self.rope = model.eval(), sink, apply_rotary_pos_emb
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim

    def _rotate(self, x: torch.Tensor, pos: list[int]) -> torch.Tensor:
        cos, sin = self.model.model.rotary_emb(x, torch.tensor([pos]))
        return self.rope(x[None], x[None], cos, sin)[0][0]

    @torch.no_grad()
    def run(
        self, ids: list[int], watch: set[int]
    ) -> tuple[np.ndarray, dict[int, tuple[list[int], np.ndarray]], torch.Tensor]:
        """Log-probabilities of every next token; for each position in ``watch`` the kept
        positions it attended to with their attention (mean over layers and heads); and every
        position's final-norm hidden state (n, hidden), what the output head reads at query rows."""
        n_layers = len(self.model.model.layers)
        keys = [torch.empty(self.kv_heads, 0, self.head_dim) for _ in range(n_layers)]
        values = [torch.empty(self.kv_heads, 0, self.head_dim) for _ in range(n_layers)]
        # The kept keys, rotated to their ranks.
        rotated = [torch.empty(self.kv_heads, 0, self.head_dim) for _ in range(n_layers)]
        logp, seen, before, rows = np.zeros(len(ids)), {}, [], []
        for position in range(len(ids)):
            kept = positions(kept_ranges(ids[: position + 1], self.sink))
            ranks, grew = list(range(len(kept))), kept[:-1] == before
            before = kept
            hidden = self.model.model.embed_tokens(torch.tensor([ids[position]]))
            weights = torch.zeros(len(kept))
            for li, layer in enumerate(self.model.model.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(hidden)
                q = attn.q_proj(h).view(self.heads, 1, self.head_dim)
                # Keys are kept before RoPE: a kept key is rotated again whenever its rank moves.
                keys[li] = torch.cat([keys[li], attn.k_proj(h).view(self.kv_heads, 1, self.head_dim)], 1)
                values[li] = torch.cat([values[li], attn.v_proj(h).view(self.kv_heads, 1, self.head_dim)], 1)
                if grew:  # only the new token joined: rotate it alone (the others keep their ranks)
                    rotated[li] = torch.cat([rotated[li], self._rotate(keys[li][:, -1:], ranks[-1:])], 1)
                else:  # something left: every kept key moves to its new rank
                    rotated[li] = self._rotate(keys[li][:, kept], ranks)
                k = rotated[li].repeat_interleave(self.heads // self.kv_heads, 0)
                v = values[li][:, kept].repeat_interleave(self.heads // self.kv_heads, 0)
                # (heads, 1, kept)
                att = torch.softmax((self._rotate(q, ranks[-1:]) @ k.transpose(1, 2)) * attn.scaling, -1)
                weights += att.mean((0, 1)) / n_layers
                hidden = hidden + attn.o_proj((att @ v).transpose(0, 1).reshape(1, -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            rows.append(self.model.model.norm(hidden))
            if position + 1 < len(ids):
                logits = self.model.lm_head(rows[-1])[0]
                logp[position + 1] = float(torch.log_softmax(logits, -1)[ids[position + 1]])
            if position in watch:
                seen[position] = (kept, weights.numpy())
        return logp, seen, torch.cat(rows)


def query_positions(story: Story, k: int) -> list[int]:
    """Segment k's picture's Q query rows: after its ``<img>``, before its ``</img>``."""
    return list(range(story.boi[k] + 1, story.spans[k][1] - 1))


def last_seen(story: Story, k: int, name: str) -> int | None:
    """The last segment before k that showed ``name``."""
    return next((j for j in range(k - 1, -1, -1) if name in story.present[j]), None)


def regions(story: Story, k: int, sink) -> dict[int, str]:
    """Every position before segment k's end, labelled with the first region it falls in."""
    end = story.spans[k][1]
    window_from = story.spans[max(0, k - sink.window_segments)][0]
    kept_mm = set(positions(kept_ranges(story.ids[: story.spans[k][0]], replace(sink, mode="multimodal"))))
    seen_pics = {j for name in story.returning[k] for j in [last_seen(story, k, name)] if j is not None}
    label = {}
    for i in range(end):
        seg = next(j for j, (lo, hi) in enumerate(story.spans) if i < hi) if i else 0
        if seg == k:
            label[i] = "current"
        elif i >= window_from:
            label[i] = "window"
        elif i < sink.sink_tokens:
            label[i] = "sink"
        elif seg == 0 and i < story.boi[0]:
            label[i] = "opening caption"
        elif seg == 0:
            label[i] = "opening picture"
        elif seg in seen_pics and story.boi[seg] <= i:
            label[i] = "last seen picture"
        elif i in kept_mm:
            label[i] = "kept neighbourhoods"
        else:
            label[i] = "other old"
    return label


@torch.no_grad()
def written_cosines(heads, story: Story, hidden: torch.Tensor) -> dict[int, float]:
    """Per segment: the mean cosine over its Q rows between the features the MLLM writes there (the
    output head on the final-norm query rows) and the true picture's."""
    rows = torch.stack([hidden[query_positions(story, k)] for k in range(len(story.spans))])  # (S, Q, H)
    written = heads.features(rows.to(next(heads.parameters()).dtype)).float()
    truth = torch.from_numpy(story.features).float()
    cosine = torch.nn.functional.cosine_similarity(written, truth, dim=-1).mean(-1)  # (S,)
    return {k: float(c) for k, c in enumerate(cosine)}


def probe_mode(model, heads, story: Story, sink) -> dict:
    back = [k for k, names in enumerate(story.returning) if names]
    watch = {i for k in back for i in query_positions(story, k)}
    _, seen, hidden = SinkForcer(model, sink).run(story.ids, watch)
    cosine = written_cosines(heads, story, hidden)
    shares = []
    for k in back:
        label = regions(story, k, sink)
        for i in query_positions(story, k):
            kept, w = seen[i]
            share = Counter()
            for pos, wt in zip(kept, w):
                share[label[pos]] += float(wt)
            shares.append([share[r] for r in REGIONS])
    return {"cosine": cosine, "back": back, "attention": np.mean(shares, 0).tolist() if shares else None}


# -- what the feature rows carry -------------------------------------------------------------------


def slot_probe(stories: list[Story], num_queries: int) -> dict:
    """Per feature row and attribute: held-out accuracy of the nearest class mean (the row's mean
    per friend look, fitted on half the stories, scored on the other half)."""
    half = len(stories) // 2
    out = {}
    for attr in ("colour", "shape", "pattern"):
        acc = []
        for slot in range(num_queries):
            rows = defaultdict(list)
            for story in stories[:half]:
                for row, friend in _friend_rows(story, slot):
                    rows[story.looks[friend][attr]].append(row)
            classes = sorted(rows)
            if not classes:
                acc.append(float("nan"))
                continue
            means = np.stack([np.mean(rows[c], 0) for c in classes])
            hits = [
                classes[int(np.argmin(((means - row) ** 2).sum(-1)))] == story.looks[friend][attr]
                for story in stories[half:]
                for row, friend in _friend_rows(story, slot)
            ]
            acc.append(float(np.mean(hits)) if hits else float("nan"))
        out[attr] = acc
    return out


def _friend_rows(story: Story, slot: int):
    """(feature row ``slot`` of the true picture, the friend) for every picture with exactly one
    friend (so the look is unambiguous)."""
    hero = next(iter(story.looks))
    for k in range(len(story.spans)):
        friends = [n for n in story.present[k] if n != hero]
        if len(friends) == 1:
            yield story.features[k][slot], friends[0]


# -- the run --------------------------------------------------------------------------------------


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = np.subtract(a, b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def run(args: argparse.Namespace) -> dict:
    from actors.checkpoint import part_dir
    from actors.mllm.heads import PictureHeads
    from actors.mllm.model import load_mllm
    from actors.tokenizer.prompts import PromptBuilder
    from cluster.mllm_config import resolve

    torch.set_num_threads(args.threads)
    ckpt, sink = resolve(args)  # the checkpoint and sink settings `seedstory eval` would use
    builder = PromptBuilder(str(ckpt))
    layout, num_queries = builder.manifest.tokens, builder.manifest.num_queries
    model = load_mllm(part_dir(ckpt, "mllm"))
    heads = PictureHeads.from_pretrained(part_dir(ckpt, "heads")).eval()
    sink = sink.for_pictures(num_queries)
    stories = read_stories(args.heldout, builder, args.stories, args.segments)
    result = {
        "settings": {"stories": len(stories), "segments": args.segments, "sink": asdict(sink)},
        "regions": list(REGIONS),
        "modes": {},
    }
    for mode in args.modes:
        started, mode_sink = time.time(), replace(sink, mode=mode).with_ids(layout.boi, layout.eoi)
        runs = [probe_mode(model, heads, story, mode_sink) for story in stories]
        result["modes"][mode] = summarise(runs)
        print(
            f"[{mode}] {time.time() - started:.0f}s {json.dumps(result['modes'][mode]['summary'])}",
            flush=True,
        )
    result["paired_vs_window"] = paired_table(result["modes"])
    result["slots"] = slot_probe(stories, num_queries)
    result["kept_slots"] = {
        "after <img>": list(range(1, sink.boi_after + 1)),
        "before </img>": list(range(num_queries - sink.eoi_before + 1, num_queries + 1)),
    }
    return result


def summarise(runs: list[dict]) -> dict:
    back = [float(np.mean([r["cosine"][k] for k in r["back"]])) if r["back"] else None for r in runs]
    other = [float(np.mean([v for k, v in r["cosine"].items() if k not in r["back"]])) for r in runs]
    att = [r["attention"] for r in runs if r["attention"] is not None]
    kept = [b for b in back if b is not None]
    return {
        "per_story": {"returning": back, "other": other},
        "summary": {
            "cosine_returning": float(np.mean(kept)) if kept else None,
            "cosine_other": float(np.mean(other)),
            "returning_pictures": sum(len(r["back"]) for r in runs),
            "attention": dict(zip(REGIONS, np.mean(att, 0).round(4).tolist())) if att else None,
        },
    }


def paired_table(modes: dict) -> dict:
    if "window" not in modes:
        return {}
    base = modes["window"]["per_story"]
    out = {}
    for mode, r in modes.items():
        if mode == "window":
            continue
        rows = [
            i for i, (x, y) in enumerate(zip(r["per_story"]["returning"], base["returning"])) if x is not None
        ]
        out[mode] = {
            "cosine_returning": paired(
                [r["per_story"]["returning"][i] for i in rows], [base["returning"][i] for i in rows]
            ),
            "cosine_other": paired(r["per_story"]["other"], base["other"]),
            "stories": len(rows),
        }
    return out


def parse_args() -> argparse.Namespace:
    from cluster.mllm_config import add_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    ap.add_argument("--heldout", type=Path, default=Path("data/rw-heldout"))
    ap.add_argument("--stories", type=int, default=32)
    ap.add_argument("--segments", type=int, default=30)
    ap.add_argument("--modes", type=lambda v: v.split(","), default=list(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/returning_probe.json"))
    add_arguments(ap, sink_mode=False)  # --config and the sink flags, as `seedstory eval` takes them
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.time()
    result = run(args)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for mode, r in result["modes"].items():
        print(mode, r["summary"])
    print("paired vs window:", json.dumps(result["paired_vs_window"]))
    print("slots:", json.dumps({k: [round(x, 2) for x in v] for k, v in result["slots"].items()}))


if __name__ == "__main__":
    main()
