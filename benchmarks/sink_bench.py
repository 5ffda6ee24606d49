"""Benchmark: what the sink holds and costs, per segment, and what a fixed KV pool serves.

1. One story of ``--segments`` segments (greedy) in each attention mode (dense, window,
   streaming, multimodal), one vLLM request per story. Per segment: the KV blocks the story
   holds (bytes = blocks x block bytes), the tokens the policy keeps, and the time.
2. A fixed pool: the KV pool is sized so that dense fits exactly 4 stories of 25 segments (their
   worst case, as the engine admits on it). ``--pool-stories`` stories are submitted at once in
   each mode; the engine admits a story only while every admitted story's worst-case compacted
   footprint fits (``actors/mllm/vllm_kv.py``). Reported: the most stories running at once,
   preemptions (0 by construction), and stories per minute.
3. Stories per minute for 1, 4 and 8 concurrent multimodal stories against a sequential
   transformers ``generate`` loop at batch size 1 that re-prefills the window every segment
   (SEED-Story's released inference).

    python benchmarks/sink_bench.py --ckpt CKPT --segments 50 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from actors.checkpoint import part_dir, read_manifest
from actors.mllm.driver import StoryDriver
from actors.mllm.engine import EngineConfig, StoryEngine
from actors.mllm.events import PictureWritten, StoryEnd
from actors.mllm.grammar import StoryRules, allowed_ids, choices, start_state
from actors.mllm.sink import MODES, SinkSettings, SinkTracker, cdiv
from actors.tokenizer.text import encode_segment, load_text_tokenizer, segment_ids

OPENING = "Once upon a time, Milo the red circle walks in the park."


def one_request_story(engine, prompt, segments) -> dict:
    """One request writes every segment. A row per segment: the time its picture ended, the tokens
    the policy keeps then, and the blocks the story holds once that eviction is compacted. The
    scheduler sees a </img> two steps after it is sampled (one to compute it, one to see it
    computed), so the blocks come from the schedule two steps later (the story's last, if it ends)."""
    t0 = time.perf_counter()
    held: list[int] = []
    hook = lambda scheduler, output: held.append(engine.story_blocks("story"))  # noqa: E731
    engine.scheduler.step_hooks.append(hook)
    engine.submit("story", prompt, segments)
    tracker = SinkTracker(engine.config.sink.with_ids(engine.tokens.boi, engine.tokens.eoi))
    tracker.extend(prompt)
    rows, at = [], []
    for step in StoryDriver(engine).steps():
        for ev in step.events:
            if isinstance(ev, PictureWritten):
                # A written picture is its ids, <img> q.. </img>: the same for every picture.
                written = segment_ids(engine.tokens, ev.caption_ids, picture=True)
                tracker.extend(written)
                rows.append(
                    {
                        "segment": ev.index + 1,
                        "t": time.perf_counter() - t0,
                        "tokens": len(written),
                        "kept_tokens": tracker.kept_count(),
                    }
                )
                at.append(len(held) - 1)
    engine.scheduler.step_hooks.remove(hook)
    for row, i in zip(rows, at):
        row["blocks"] = held[min(i + 2, len(held) - 1)]
    return {"segments": rows, "total_s": time.perf_counter() - t0}


def story_prompt(ckpt: str, engine) -> list[int]:
    layout = engine.tokens
    return [layout.bos] + encode_segment(
        load_text_tokenizer(part_dir(ckpt, "tokenizer")), layout, OPENING, picture=False
    )


def dense_pool(ckpt: str, stories: int, segments: int, prompt_len: int) -> int:
    """KV blocks (plus vLLM's null block) in which dense fits exactly ``stories`` stories."""
    manifest = read_manifest(ckpt)
    per_segment = manifest.preset.max_caption_tokens + manifest.num_queries + 2
    return stories * cdiv(prompt_len + segments * per_segment + 1, 32) + 1


def fixed_pool(ckpt: str, mode: str, window: int, blocks: int, stories: int, segments: int) -> dict:
    engine = StoryEngine(
        EngineConfig(
            ckpt,
            sink=SinkSettings(mode=mode, window_segments=window),
            max_stories=stories,
            kv_blocks=blocks,
            max_story_segments=segments + 1,
        )
    )
    try:
        prompt, scheduler, driver = story_prompt(ckpt, engine), engine.scheduler, StoryDriver(engine)
        for i in range(stories):
            engine.submit(f"p{i}", prompt, segments)
        most, done, t0 = 0, 0, time.perf_counter()
        while engine.has_work():
            most = max(most, len(scheduler.running))
            done += sum(isinstance(ev, StoryEnd) and not ev.truncated for ev in driver.step().events)
        seconds = time.perf_counter() - t0
        preempted = sum(r.num_preemptions for r in scheduler.requests.values())
        return {
            "most_running": most,
            "completed": done,
            "preemptions": preempted,
            "stories_per_min": done / (seconds / 60),
            "seconds": seconds,
        }
    finally:
        engine.shutdown()


def throughput(engine, prompt, segments, concurrency) -> float:
    t0 = time.perf_counter()
    StoryDriver(engine).run({f"c{i}": prompt for i in range(concurrency)}, segments)
    return concurrency / ((time.perf_counter() - t0) / 60)


def hf_sequential(ckpt, manifest, prompt, segments, window, stories) -> float:
    """Stories per minute of a transformers generate loop at batch size 1, window-recompute."""
    import torch

    from actors.mllm.model import load_mllm

    model, layout = load_mllm(part_dir(ckpt, "mllm")), manifest.tokens
    allowed = {c: allowed_ids(layout, c) for c in choices(layout)}
    rules = StoryRules(manifest.num_queries, 1, manifest.preset.max_caption_tokens)
    started = time.perf_counter()
    for _ in range(stories):
        history: list[list[int]] = []
        for k in range(segments):
            context = [layout.bos] + sum(history[-window:], []) + (prompt[1:] if k == 0 else [])
            out = model.generate(
                torch.tensor([context]),
                max_new_tokens=rules.max_caption_tokens + rules.num_queries + 3,
                do_sample=False,
                prefix_allowed_tokens_fn=_grammar(rules, layout, context, allowed),
                eos_token_id=layout.eos,
                pad_token_id=layout.pad,
            )
            history.append([x for x in out[0, len(context) :].tolist() if x != layout.eos])
    return stories / ((time.perf_counter() - started) / 60)


def _grammar(rules, layout, context: list[int], allowed: dict):
    """transformers' ``prefix_allowed_tokens_fn`` for one segment written after ``context``: the
    ids the story grammar allows next, given what has been generated so far."""

    def next_allowed(_batch, ids):
        state = start_state(rules, layout, context)
        for tok in ids[len(context) :].tolist():
            state.advance(tok)
        return allowed[state.allowed()]

    return next_allowed


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, kv_ax, kept_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for name, result in results.items():
        rows = result["segments"]
        seg = [row["segment"] for row in rows]
        times = [row["t"] for row in rows]
        time_ax.plot(seg, [t1 - t0 for t0, t1 in zip([0.0] + times, times)], marker=".", label=name)
        kv_ax.plot(
            seg, [row["blocks"] * result["block_bytes"] / 2**20 for row in rows], marker=".", label=name
        )
        kept_ax.plot(seg, [row["kept_tokens"] for row in rows], marker=".", label=name)
    time_ax.set(xlabel="segment", ylabel="seconds per segment", title="time of each segment")
    kv_ax.set(xlabel="segment", ylabel="KV MiB held", title="KV cache the story holds")
    kept_ax.set(xlabel="segment", ylabel="tokens", title="tokens the policy keeps")
    time_ax.legend(), kv_ax.legend(), kept_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="sink_bench", help="result files: NAME.json, NAME.png")
    ap.add_argument("--segments", type=int, default=50)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--pool-stories", type=int, default=16)
    ap.add_argument("--pool-segments", type=int, default=25)
    ap.add_argument("--hf-stories", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results, pools, rates = {}, {}, {}
    for mode in MODES:
        engine = StoryEngine(
            EngineConfig(
                args.ckpt,
                sink=SinkSettings(mode=mode, window_segments=args.window),
                max_stories=8,
                max_story_segments=args.segments + 1,
                kv_blocks=1024,
            )
        )
        prompt = story_prompt(args.ckpt, engine)
        result = one_request_story(engine, prompt, args.segments)
        result["block_bytes"] = engine.block_bytes()
        results[mode] = result
        marks = sorted({10, min(25, args.segments), args.segments})
        print(
            f"{mode}: {result['total_s']:.1f}s, blocks at 10/25/{args.segments}: "
            + "/".join(str(result["segments"][k - 1]["blocks"]) for k in marks),
            flush=True,
        )
        if mode == "multimodal":
            for concurrency in (1, 4, 8):
                rate = rates[f"multimodal x{concurrency}"] = throughput(engine, prompt, 25, concurrency)
                print(f"multimodal, {concurrency} concurrent: {rate:.2f} stories/min", flush=True)
        engine.shutdown()
    blocks = dense_pool(args.ckpt, 4, args.pool_segments, len(prompt))
    for mode in MODES:
        pools[mode] = fixed_pool(args.ckpt, mode, args.window, blocks, args.pool_stories, args.pool_segments)
        print(f"fixed pool of {blocks} blocks, {mode}: {pools[mode]}", flush=True)
    rates["transformers sequential"] = hf_sequential(
        args.ckpt, read_manifest(args.ckpt), prompt, 25, args.window, args.hf_stories
    )
    print(f"transformers sequential: {rates['transformers sequential']:.2f} stories/min", flush=True)
    summary = {
        "results": results,
        "fixed_pool": {
            "blocks": blocks,
            "stories": args.pool_stories,
            "segments": args.pool_segments,
            "modes": pools,
        },
        "stories_per_minute": rates,
    }
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1))
    plot(results, out / f"{args.name}.png")
    print(table(summary))


def table(summary: dict) -> str:
    results = summary["results"]

    def seg_time(result, k):  # mean over the 5 segments ending at k: one segment alone is too noisy
        ts = [0.0] + [row["t"] for row in result["segments"]]
        return (ts[k] - ts[k - 5]) / 5

    def ms_per_token(result, k):  # the same 5 segments, per token written (captions differ in length)
        ts = [0.0] + [row["t"] for row in result["segments"]]
        return 1000 * (ts[k] - ts[k - 5]) / sum(row["tokens"] for row in result["segments"][k - 5 : k])

    last = len(next(iter(results.values()))["segments"])
    marks = sorted({10, min(25, last), last})
    head = " | ".join(f"KV MiB / kept @{k}" for k in marks)
    lines = [
        f"| mode | {head} | s/segment, 6-10 | s/segment, {last - 4}-{last} | ratio "
        f"| ms/token, 6-10 | ms/token, {last - 4}-{last} | ratio |",
        "| --- |" + " --- |" * (len(marks) + 6),
    ]
    for name, result in results.items():
        rows = result["segments"]
        cells = [
            f"{rows[k - 1]['blocks'] * result['block_bytes'] / 2**20:.2f} / {rows[k - 1]['kept_tokens']}"
            for k in marks
        ]
        t10, tl = seg_time(result, 10), seg_time(result, last)
        m10, ml = ms_per_token(result, 10), ms_per_token(result, last)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {t10:.3f} | {tl:.3f} | {tl / t10:.2f} "
            f"| {m10:.2f} | {ml:.2f} | {ml / m10:.2f} |"
        )
    pool = summary["fixed_pool"]
    lines += [
        "",
        f"| fixed pool: {pool['blocks']} blocks, {pool['stories']} stories of {pool['segments']} segments "
        "| most running at once | preemptions | stories/min |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {m} | {p['most_running']} | {p['preemptions']} | {p['stories_per_min']:.2f} |"
        for m, p in pool["modes"].items()
    ]
    lines += ["", "| stories per minute (25 segments) | |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in summary["stories_per_minute"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
