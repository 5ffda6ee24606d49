"""What a returning character's picture can draw on, under each sink mode.

    seedstory data storyworld --world returning --stories 64 --segments 60 --seed 1 --size 64 \\
        --out data/rw-heldout                                                     # if missing
    python benchmarks/returning_probe.py --ckpt checkpoints/tiny --heldout data/rw-heldout \\
        --stories 32 --segments 30 --out benchmarks/results/returning_probe.json

The sampled eval (``seedstory eval``) says whether the pictures come out right; this says why.
Held-out returning-world stories are teacher-forced, token by token, through the transformers
MLLM under each mode's kept set: the true captions, and the visual tokenizer's codes of the
true pictures. It follows the engine's semantics: every token's keys and values are computed
once, when the token is read; the kept ones (``actors.mllm.sink.kept_ranges``, the policy the
engine runs) are re-ranked from 0 and rotated to their ranks. Three measurements:

1. **Code NLL**: the mean negative log-likelihood of each picture's 16 codes, on pictures where
   a friend returns (``truth.jsonl``'s ``returning``: back after 10+ segments away, beyond the
   window of 8) and on the others; per mode, with story-paired differences against the window.
   If the kept ``<img>``/``</img>`` neighbourhoods carry a returning friend's look, the
   multimodal sink's NLL on those pictures is lower than the window's.
2. **Attention**: at the codes of those pictures, the share of attention (mean over layers,
   heads and code positions) on each region of the context: the current segment, the window, the
   sink tokens, the opening caption (the only caption that says the looks), the opening picture,
   the returning friend's last picture before it left, the old tokens the multimodal sink keeps
   (its neighbourhoods), and the rest of the old segments.
3. **What each code slot carries**: over the held-out pictures, how well the code in slot q
   (1..16) alone tells a friend's colour, shape and pattern (a code -> majority-look table fitted
   on half the stories and scored on the other half; chance is about 1/6, 1/6, 1/2). The
   multimodal sink keeps slots 1..boi_after and 17-eoi_before..16 of every old picture.
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

REGIONS = ("current", "window", "sink", "opening caption", "opening picture", "last seen picture",
           "kept neighbourhoods", "other old")


@dataclass
class Story:
    ids: list[int]                  # the whole teacher-forced sequence, <s> first
    spans: list[tuple[int, int]]    # per segment: [first token, one past its </img>)
    boi: list[int]                  # per segment: the position of its <img>
    returning: list[list[str]]      # per segment: the friends back after 10+ segments away
    present: list[list[str]]        # per segment: who is there
    looks: dict[str, dict[str, str]]


# -- the stories, as token ids --------------------------------------------------------------------

def read_stories(folder: Path, builder, stories: int, segments: int) -> list[Story]:
    from actors.tokenizer.text import segment_ids

    layout = builder.manifest.tokens
    rows = [json.loads(x) for x in (folder / "storyworld.jsonl").read_text().splitlines()[:stories]]
    truths = [json.loads(x) for x in (folder / "truth.jsonl").read_text().splitlines()[:stories]]
    if any(t.get("world") != "returning" for t in truths):
        raise ValueError(f"{folder} is not a returning-world StoryWorld (seedstory data storyworld --world returning)")
    out = []
    for row, truth in zip(rows, truths):
        caps = builder.caption_ids(row["captions"][:segments])
        codes = builder.image_codes([(folder / "images" / p).read_bytes() for p in row["images"][:segments]])
        ids, spans, bois = [layout.bos], [], []
        for cap, code in zip(caps, codes):
            start = len(ids)
            ids += segment_ids(layout, cap, code)
            spans.append((start, len(ids)))
            bois.append(start + len(cap))
        segs = truth["segments"][:segments]
        out.append(Story(ids, spans, bois, [s["returning"] for s in segs], [s["present"] for s in segs],
                         truth["looks"]))
    return out


# -- teacher forcing under a sink mode ---------------------------------------------------------------

class SinkForcer:
    """The transformers MLLM read token by token with the engine's kept set and rank positions."""

    def __init__(self, model, params):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.m, self.p, self.rope = model.eval(), params, apply_rotary_pos_emb
        cfg = model.config
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def _rotate(self, x: torch.Tensor, pos: list[int]) -> torch.Tensor:
        cos, sin = self.m.model.rotary_emb(x, torch.tensor([pos]))
        return self.rope(x[None], x[None], cos, sin)[0][0]

    @torch.no_grad()
    def run(self, ids: list[int], watch: set[int]) -> tuple[np.ndarray, dict[int, tuple[list[int], np.ndarray]]]:
        """Log-probabilities of every next token, and for each position in ``watch`` the kept
        positions it attended to with their attention (mean over layers and heads)."""
        n_layers = len(self.m.model.layers)
        keys = [torch.empty(self.kvh, 0, self.hd) for _ in range(n_layers)]
        values = [torch.empty(self.kvh, 0, self.hd) for _ in range(n_layers)]
        rotated = [torch.empty(self.kvh, 0, self.hd) for _ in range(n_layers)]  # kept keys at their ranks
        logp, seen, before = np.zeros(len(ids)), {}, []
        for t in range(len(ids)):
            kept = positions(kept_ranges(ids[:t + 1], self.p))
            ranks, grew = list(range(len(kept))), kept[:-1] == before
            before = kept
            x = self.m.model.embed_tokens(torch.tensor([ids[t]]))
            weights = torch.zeros(len(kept))
            for li, layer in enumerate(self.m.model.layers):
                a = layer.self_attn
                h = layer.input_layernorm(x)
                q = a.q_proj(h).view(self.h, 1, self.hd)
                keys[li] = torch.cat([keys[li], a.k_proj(h).view(self.kvh, 1, self.hd)], 1)  # before RoPE
                values[li] = torch.cat([values[li], a.v_proj(h).view(self.kvh, 1, self.hd)], 1)
                if grew:  # only the new token joined: rotate it alone (the others keep their ranks)
                    rotated[li] = torch.cat([rotated[li], self._rotate(keys[li][:, -1:], ranks[-1:])], 1)
                else:     # something left: every kept key moves to its new rank
                    rotated[li] = self._rotate(keys[li][:, kept], ranks)
                k = rotated[li].repeat_interleave(self.h // self.kvh, 0)
                v = values[li][:, kept].repeat_interleave(self.h // self.kvh, 0)
                att = torch.softmax((self._rotate(q, ranks[-1:]) @ k.transpose(1, 2)) * a.scaling, -1)  # (h, 1, n)
                weights += att.mean((0, 1)) / n_layers
                x = x + a.o_proj((att @ v).transpose(0, 1).reshape(1, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            if t + 1 < len(ids):
                logp[t + 1] = float(torch.log_softmax(self.m.lm_head(self.m.model.norm(x))[0], -1)[ids[t + 1]])
            if t in watch:
                seen[t] = (kept, weights.numpy())
        return logp, seen


def code_positions(s: Story, k: int) -> list[int]:
    return list(range(s.boi[k] + 1, s.spans[k][1] - 1))


def last_seen(s: Story, k: int, name: str) -> int | None:
    """The last segment before k that showed ``name``."""
    return next((j for j in range(k - 1, -1, -1) if name in s.present[j]), None)


def regions(s: Story, k: int, p) -> dict[int, str]:
    """Every position before segment k's end, labelled with the first region it falls in."""
    end = s.spans[k][1]
    window_from = s.spans[max(0, k - p.window_segments)][0]
    kept_mm = set(positions(kept_ranges(s.ids[:s.spans[k][0]], replace(p, mode="multimodal"))))
    seen_pics = {j for name in s.returning[k] for j in [last_seen(s, k, name)] if j is not None}
    label = {}
    for i in range(end):
        seg = next(j for j, (lo, hi) in enumerate(s.spans) if i < hi) if i else 0
        if seg == k:
            label[i] = "current"
        elif i >= window_from:
            label[i] = "window"
        elif i < p.sink_tokens:
            label[i] = "sink"
        elif seg == 0 and i < s.boi[0]:
            label[i] = "opening caption"
        elif seg == 0:
            label[i] = "opening picture"
        elif seg in seen_pics and s.boi[seg] <= i:
            label[i] = "last seen picture"
        elif i in kept_mm:
            label[i] = "kept neighbourhoods"
        else:
            label[i] = "other old"
    return label


def probe_mode(model, s: Story, p) -> dict:
    back = [k for k, names in enumerate(s.returning) if names]
    watch = {i for k in back for i in code_positions(s, k)}
    logp, seen = SinkForcer(model, p).run(s.ids, watch)
    nll = {k: float(-np.mean(logp[code_positions(s, k)])) for k in range(len(s.spans))}
    shares = []
    for k in back:
        label = regions(s, k, p)
        for i in code_positions(s, k):
            kept, w = seen[i]
            share = Counter()
            for pos, wt in zip(kept, w):
                share[label[pos]] += float(wt)
            shares.append([share[r] for r in REGIONS])
    return {"nll": nll, "back": back, "attention": np.mean(shares, 0).tolist() if shares else None}


# -- what the code slots carry ----------------------------------------------------------------------

def slot_probe(stories: list[Story], layout, q: int) -> dict:
    """Per slot and attribute: held-out accuracy of a code -> majority friend-look table."""
    half = len(stories) // 2
    out = {}
    for attr in ("colour", "shape", "pattern"):
        acc = []
        for slot in range(q):
            table = defaultdict(Counter)
            for s in stories[:half]:
                for code, friend in _friend_codes(s, layout, slot):
                    table[code][s.looks[friend][attr]] += 1
            hits = [table[code].most_common(1)[0][0] == s.looks[friend][attr] if table[code] else False
                    for s in stories[half:] for code, friend in _friend_codes(s, layout, slot)]
            acc.append(float(np.mean(hits)) if hits else float("nan"))
        out[attr] = acc
    return out


def _friend_codes(s: Story, layout, slot: int):
    """(the code in ``slot``, the friend) for every picture with exactly one friend (so the look is unambiguous)."""
    hero = next(iter(s.looks))
    for k in range(len(s.spans)):
        friends = [n for n in s.present[k] if n != hero]
        if len(friends) == 1:
            yield layout.visual_code(s.ids[code_positions(s, k)[slot]]), friends[0]


# -- the run --------------------------------------------------------------------------------------

def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = np.subtract(a, b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def run(a: argparse.Namespace) -> dict:
    from actors.checkpoint import part_dir
    from actors.mllm.model import load_mllm
    from actors.tokenizer.prompts import PromptBuilder
    from cluster.mllm_config import resolve

    torch.set_num_threads(a.threads)
    ckpt, sink = resolve(a)  # the checkpoint and sink settings `seedstory eval` would use
    builder = PromptBuilder(str(ckpt))
    layout, q = builder.manifest.tokens, builder.manifest.num_queries
    model = load_mllm(part_dir(ckpt, "mllm"))
    sink = sink.for_pictures(q)
    stories = read_stories(a.heldout, builder, a.stories, a.segments)
    result = {"settings": {"stories": len(stories), "segments": a.segments, "sink": asdict(sink)},
              "regions": list(REGIONS), "modes": {}}
    for mode in a.modes:
        t0, p = time.time(), replace(sink, mode=mode).with_ids(layout.boi, layout.eoi)
        runs = [probe_mode(model, s, p) for s in stories]
        result["modes"][mode] = summarise(runs)
        print(f"[{mode}] {time.time() - t0:.0f}s {json.dumps(result['modes'][mode]['summary'])}", flush=True)
    result["paired_vs_window"] = paired_table(result["modes"])
    result["slots"] = slot_probe(stories, layout, q)
    result["kept_slots"] = {"after <img>": list(range(1, sink.boi_after + 1)),
                            "before </img>": list(range(q - sink.eoi_before + 1, q + 1))}
    return result


def summarise(runs: list[dict]) -> dict:
    back = [float(np.mean([r["nll"][k] for k in r["back"]])) if r["back"] else None for r in runs]
    other = [float(np.mean([v for k, v in r["nll"].items() if k not in r["back"]])) for r in runs]
    att = [r["attention"] for r in runs if r["attention"] is not None]
    return {"per_story": {"returning": back, "other": other},
            "summary": {"nll_returning": float(np.mean([b for b in back if b is not None])),
                        "nll_other": float(np.mean(other)),
                        "returning_pictures": sum(len(r["back"]) for r in runs),
                        "attention": dict(zip(REGIONS, np.mean(att, 0).round(4).tolist())) if att else None}}


def paired_table(modes: dict) -> dict:
    if "window" not in modes:
        return {}
    base = modes["window"]["per_story"]
    out = {}
    for mode, r in modes.items():
        if mode == "window":
            continue
        rows = [i for i, (x, y) in enumerate(zip(r["per_story"]["returning"], base["returning"])) if x is not None]
        out[mode] = {"nll_returning": paired([r["per_story"]["returning"][i] for i in rows],
                                             [base["returning"][i] for i in rows]),
                     "nll_other": paired(r["per_story"]["other"], base["other"]), "stories": len(rows)}
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
    a = parse_args()
    t0 = time.time()
    result = run(a)
    result["seconds"] = round(time.time() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for mode, r in result["modes"].items():
        print(mode, r["summary"])
    print("paired vs window:", json.dumps(result["paired_vs_window"]))
    print("slots:", json.dumps({k: [round(x, 2) for x in v] for k, v in result["slots"].items()}))


if __name__ == "__main__":
    main()
