"""Benchmark: 25-segment stories on the tiny checkpoint, three ways, plus throughput.

Methods (each writes the same 25 segments' worth of tokens, greedy):
  dense             vLLM, one request per story, nothing evicted
  window-recompute  SEED-Story's released inference: per segment a new request whose prompt is
                    the last W segments, so the whole window is prefilled again every segment
  streaming         vLLM with the StreamingLLM policy (first tokens + window), for reference
  sink              vLLM with our multimodal sink, one request per story

Per segment it records the time, the KV blocks the story holds (bytes = blocks x block bytes),
the tokens the policy keeps, and the prefill tokens computed. Then stories per minute for
1, 4 and 8 concurrent sink stories against a sequential transformers ``generate`` loop at
batch size 1 (window-recompute, the released script's way).

    python benchmarks/sink_bench.py --ckpt CKPT --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from actors.checkpoint import part_dir
from actors.mllm.engine import EngineConfig, SegmentEvent, StoryEngine
from actors.mllm.grammar import CHOICES, StoryRules, allowed_ids, start_state
from actors.mllm.sink import SinkSettings, count, kept_ranges
from actors.tokenizer.text import encode_segment, load_text_tokenizer, segment_ids

OPENING = "Once upon a time, Milo the red circle walks in the park."


def one_request_story(engine, prompt, segments, policy) -> dict:
    """dense / sink: one request writes every segment."""
    t0 = time.perf_counter()
    engine.submit("story", prompt, segments)
    ids, rows = list(prompt), []
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, SegmentEvent):
                ids += segment_ids(engine.tokens, ev.caption_ids, ev.codes)
                rows.append({"segment": ev.index + 1, "t": time.perf_counter() - t0,
                             "blocks": engine.story_blocks("story"), "kept_tokens": count(kept_ranges(ids, policy))})
    return {"segments": rows, "prefill_tokens": len(prompt), "total_s": time.perf_counter() - t0}


def window_recompute_story(engine, prompt, segments, window) -> dict:
    """SEED-Story's released loop: each segment re-prefills the last `window` segments."""
    t, t0 = engine.tokens, time.perf_counter()
    history: list[list[int]] = []
    rows, prefill = [], 0
    for k in range(segments):
        context = [t.bos] + sum(history[-window:], []) + (prompt[1:] if k == 0 else [])
        prefill += len(context)
        engine.submit(f"seg{k}", context, 1)
        peak, seg = 0, None
        while engine.has_work():
            for ev in engine.step():
                if isinstance(ev, SegmentEvent):
                    seg = segment_ids(engine.tokens, ev.caption_ids, ev.codes)
            peak = max(peak, engine.blocks_in_use())
        history.append(seg)
        rows.append({"segment": k + 1, "t": time.perf_counter() - t0, "blocks": peak,
                     "kept_tokens": len(context) + len(seg)})
    return {"segments": rows, "prefill_tokens": prefill, "total_s": time.perf_counter() - t0}


def throughput(engine, prompt, segments, concurrency) -> float:
    t0 = time.perf_counter()
    engine.run({f"c{i}": prompt for i in range(concurrency)}, segments)
    return concurrency / ((time.perf_counter() - t0) / 60)


def hf_sequential(ckpt, manifest, prompt, segments, window, stories) -> float:
    """Stories per minute of a transformers generate loop at batch size 1, window-recompute."""
    import torch

    from actors.mllm.model import load_mllm

    model, t = load_mllm(part_dir(ckpt, "mllm")), manifest.tokens
    allowed = {c: allowed_ids(t, c) for c in CHOICES}
    rules = StoryRules(manifest.num_queries, 1, manifest.preset.max_caption_tokens)
    t0 = time.perf_counter()
    for _ in range(stories):
        history: list[list[int]] = []
        for k in range(segments):
            context = [t.bos] + sum(history[-window:], []) + (prompt[1:] if k == 0 else [])

            def next_allowed(_batch, ids, n=len(context)):
                state = start_state(rules, t, context)
                for tok in ids[n:].tolist():
                    state.advance(tok)
                return allowed[state.allowed()]

            out = model.generate(torch.tensor([context]), max_new_tokens=rules.max_caption_tokens + rules.num_queries + 3,
                                 do_sample=False, prefix_allowed_tokens_fn=next_allowed, eos_token_id=t.eos,
                                 pad_token_id=t.pad)
            history.append([x for x in out[0, len(context):].tolist() if x != t.eos])
    return stories / ((time.perf_counter() - t0) / 60)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        seg = [row["segment"] for row in r["segments"]]
        times = [row["t"] for row in r["segments"]]
        a.plot(seg, [t1 - t0 for t0, t1 in zip([0.0] + times, times)], marker=".", label=name)
        b.plot(seg, [row["blocks"] * r["block_bytes"] / 2**20 for row in r["segments"]], marker=".", label=name)
    a.set(xlabel="segment", ylabel="seconds per segment", title="time of each segment")
    b.set(xlabel="segment", ylabel="KV MiB held", title="KV cache in use")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--segments", type=int, default=25)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--hf-stories", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    results, rates = {}, {}
    methods = (("dense", "dense"), ("window-recompute", "dense"), ("streaming", "streaming"), ("sink", "multimodal"))
    for name, mode in methods:
        settings = SinkSettings(mode=mode, window_segments=a.window)
        engine = StoryEngine(EngineConfig(a.ckpt, sink=settings, max_stories=8, max_segments=a.segments + 1,
                                          kv_blocks=1024))
        t = engine.tokens
        tok = load_text_tokenizer(part_dir(a.ckpt, "tokenizer"))
        prompt = [t.bos] + encode_segment(tok, t, OPENING, None)
        policy = engine.config.sink.with_ids(t.boi, t.eoi)  # neighbourhoods scaled to Q
        if name == "window-recompute":
            r = window_recompute_story(engine, prompt, a.segments, a.window)
        else:
            r = one_request_story(engine, prompt, a.segments, policy)
        r["block_bytes"] = engine.block_bytes()
        results[name] = r
        print(f"{name}: {r['total_s']:.1f}s, prefill {r['prefill_tokens']} tokens, "
              f"blocks at 10/{a.segments}: {r['segments'][9]['blocks']}/{r['segments'][-1]['blocks']}", flush=True)
        if name == "sink":
            for c in (1, 4, 8):
                rates[f"sink x{c}"] = throughput(engine, prompt, a.segments, c)
                print(f"sink, {c} concurrent: {rates[f'sink x{c}']:.2f} stories/min", flush=True)
        engine.shutdown()
    from actors.checkpoint import read_manifest

    rates["transformers sequential"] = hf_sequential(a.ckpt, read_manifest(a.ckpt), prompt, a.segments, a.window,
                                                     a.hf_stories)
    print(f"transformers sequential: {rates['transformers sequential']:.2f} stories/min", flush=True)
    (out / "sink_bench.json").write_text(json.dumps({"results": results, "stories_per_minute": rates}, indent=1))
    plot(results, out / "sink_bench.png")
    print(table(results, rates))


def table(results: dict, rates: dict) -> str:
    def seg_time(r, k):
        ts = [row["t"] for row in r["segments"]]
        return ts[k - 1] - (ts[k - 2] if k > 1 else 0.0)

    last = len(next(iter(results.values()))["segments"])
    lines = [f"| method | total s | prefill tokens | KV MiB @10 | KV MiB @{last} | kept tokens @{last} | s/segment @10 "
             f"| s/segment @{last} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        mib = [row["blocks"] * r["block_bytes"] / 2**20 for row in r["segments"]]
        lines.append(f"| {name} | {r['total_s']:.1f} | {r['prefill_tokens']} | {mib[9]:.2f} | {mib[-1]:.2f} | "
                     f"{r['segments'][-1]['kept_tokens']} | {seg_time(r, 10):.3f} | {seg_time(r, len(mib)):.3f} |")
    lines += ["", "| stories per minute | |", "| --- | --- |"] + [f"| {k} | {v:.2f} |" for k, v in rates.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
