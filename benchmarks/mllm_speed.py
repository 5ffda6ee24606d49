"""Benchmark: the MLLM alone, its output tokens per second and the KV blocks a story holds.

Eight greedy stories of ``--segments`` segments at once, in one engine under the service's sink
(``ray_config.yaml``), through the ``StoryDriver`` every caller uses. Prints and writes output
tokens per second of engine time (medians over ``--repeats`` runs), and per story its peak KV
blocks and bytes. The engine API is the same before and after the switch to continuous features,
so the same file runs against a checkpoint of either format with its own code.

    python benchmarks/mllm_speed.py --ckpt checkpoints/tiny --out benchmarks/results --name mllm_speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OPENINGS = [
    "Once upon a time, Milo the red circle, Bea the striped blue square and Kip the green triangle "
    "walk in the park.",
    "Once upon a time, Zara the yellow diamond and Oti the dotted purple cross sit by the lake.",
    "Once upon a time, Rux the orange circle and Bea the striped blue square play in the snow.",
    "Once upon a time, Kip the green triangle and Milo the red circle run in the town.",
]


def run(engine, prompts: dict[str, list[int]], segments: int) -> dict:
    from actors.mllm.driver import StoryDriver

    for sid, prompt in prompts.items():
        engine.submit(sid, prompt, segments)
    started = time.perf_counter()
    result = StoryDriver(engine).drain()
    seconds = time.perf_counter() - started
    peaks = [end.peak_blocks for end in result.ends.values()]
    return {
        "tokens": result.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(result.tokens / seconds, 1),
        "peak_blocks_per_story": statistics.median(peaks),
        "block_bytes": engine.block_bytes(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="mllm_speed")
    ap.add_argument("--stories", type=int, default=8)
    ap.add_argument("--segments", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from actors.checkpoint import part_dir
    from actors.mllm.engine import EngineConfig, StoryEngine
    from actors.tokenizer.text import load_text_tokenizer
    from cluster.mllm_config import app_settings

    torch.set_num_threads(args.threads)
    sink = app_settings().sink
    engine = StoryEngine(
        EngineConfig(args.ckpt, sink=sink, max_stories=args.stories, max_story_segments=args.segments + 1)
    )
    text = load_text_tokenizer(part_dir(args.ckpt, "tokenizer"))
    bos = engine.tokens.bos
    prompts = {
        f"s{k}": [bos] + text.encode(OPENINGS[k % len(OPENINGS)], add_special_tokens=False)
        for k in range(args.stories)
    }
    runs = []
    try:
        for repeat in range(args.repeats):
            runs.append(run(engine, {f"{sid}-{repeat}": p for sid, p in prompts.items()}, args.segments))
            print(runs[-1], flush=True)
    finally:
        engine.shutdown()
    summary = {
        "ckpt": args.ckpt,
        "sink": sink.mode,
        "stories": args.stories,
        "segments": args.segments,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
        "peak_kv_mib_per_story": runs[0]["peak_blocks_per_story"] * runs[0]["block_bytes"] / 2**20,
        "runs": runs,
    }
    out = Path(args.out) / f"{args.name}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
