"""``seedstory train``: the stages as Ray Train runs, each exported into the checkpoint.

    1. visual       visual tokenizer (reconstruction + VQ)      -> CKPT/visual_tokenizer
    2. vae          de-tokenizer VAE (reconstruction)            -> CKPT/detokenizer/vae
    3. detokenizer  de-tokenizer UNet + adapter (diffusion)      -> CKPT/detokenizer
    4. opening      pre-tokenize windows (Ray Data), then the MLLM and its output head on
                    each window's opening picture alone         -> CKPT/mllm, CKPT/heads
    5. mllm         the MLLM and its heads on whole windows      -> CKPT/mllm, CKPT/heads
    6. sink         (asked for by name) the MLLM fine-tuned on whole stories read under the
                    served attention sink                       -> CKPT/mllm

Run state lives beside the checkpoint in ``CKPT.runs/``: one Ray Train run per stage (named
after the stage, so re-running resumes from its last checkpoint), the token Parquet, and
``summary.json`` with each finished stage's steps, time and final losses. A finished stage
is skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from actors.checkpoint import read_manifest
from actors.config import get_preset
from actors.mllm.sink import SinkSettings
from training.loop import DEFAULT_STAGES, STAGES, StageSpec, load_parts, stage_module, train_worker

# Per-preset stage settings. tiny: sized to train on a 2-core CPU machine; its stage times are in
# docs/results.md#measured-2-cores-no-gpu.
PLANS = {
    "tiny": {
        # Continuous features: the decoder's look score rises to ~0.95 by 4000-6000 steps on the
        # returning world (docs/results.md#which-tokenizer-would-carry-the-looks).
        "visual": dict(steps=5000, batch_size=64, lr=1e-3, warmup=50),
        # Enough steps to draw the returning world's small friends, not only its heroes
        # (docs/results.md#where-the-picture-path-loses-a-character).
        "vae": dict(steps=1350, batch_size=16, lr=1e-3, warmup=25),
        # Conditioned on features, the de-tokenizer drew 0.576 of the characters right from true
        # features after 2000 steps (service sampler), short of the 0.6 goal: extended to 4000.
        "detokenizer": dict(steps=4000, batch_size=16, lr=5e-4, warmup=50),
        # The opening picture alone first: on whole windows the MLLM draws the mean look
        # (training/stages/opening.py); 800 steps at 64 openings, from random weights, draw 0.95
        # of the held-out openings' characters right (teacher-forced probe).
        "opening": dict(steps=800, batch_size=64, lr=1e-3, warmup=30, weight_decay=0.01),
        # Then whole windows, the opening weighing half (training/stages/mllm.py:regression_loss):
        # at 2e-3 the opening's looks fell from 0.95 to 0.53 in 100 steps, at 1e-3 to 0.77, while
        # the later pictures' rose from 0.02-0.05 to 0.44 (docs/results.md#the-opening-stage).
        "mllm": dict(steps=1000, batch_size=16, lr=1e-3, warmup=30, weight_decay=0.01),
        "sink": dict(steps=200, batch_size=8, lr=5e-4, warmup=20, weight_decay=0.01),
    },
    "full": {
        "visual": dict(
            steps=50_000, batch_size=64, lr=3e-4, warmup=2000, checkpoint_every=1000, log_every=100
        ),
        "vae": dict(steps=50_000, batch_size=16, lr=1e-4, warmup=1000, checkpoint_every=1000, log_every=100),
        "detokenizer": dict(
            steps=100_000, batch_size=16, lr=1e-4, warmup=2000, checkpoint_every=1000, log_every=100
        ),
        "opening": dict(
            steps=4000,
            batch_size=32,
            lr=1e-4,
            warmup=200,
            weight_decay=0.01,
            checkpoint_every=500,
            log_every=50,
        ),
        "mllm": dict(
            steps=20_000,
            batch_size=8,
            lr=1e-4,
            warmup=500,
            weight_decay=0.01,
            checkpoint_every=500,
            log_every=50,
        ),
        "sink": dict(
            steps=2_000,
            batch_size=8,
            lr=2e-5,
            warmup=100,
            weight_decay=0.01,
            checkpoint_every=500,
            log_every=50,
        ),
    },
}


def runs_dir(out: str | Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(out.name + ".runs")


def stage_specs(
    preset: str,
    out: str | Path,
    stages=STAGES,
    steps: int | None = None,
    batch_size: int | None = None,
    threads: int = 1,
    seed: int = 0,
    sink: SinkSettings | None = None,
    lr: float | None = None,
    dense_share: float = 0.0,
) -> list[StageSpec]:
    specs = []
    for stage in stages:
        spec = StageSpec(
            stage=stage,
            ckpt=str(Path(out).resolve()),
            threads=threads,
            seed=seed,
            sink=asdict(sink or SinkSettings()) if stage == "sink" else None,
            dense_share=dense_share if stage == "sink" else 0.0,
            **PLANS[preset][stage],
        )
        if lr is not None:  # a search over the learning rate (the sink stage's, docs/training.md)
            spec = replace(spec, lr=lr)
        if steps is not None:  # a short run (tests, smoke checks): checkpoint and log more often
            spec = replace(
                spec,
                steps=steps,
                warmup=min(spec.warmup, max(1, steps // 4)),
                checkpoint_every=max(1, min(spec.checkpoint_every, steps // 2)),
                log_every=max(1, min(spec.log_every, steps // 2)),
            )
        if batch_size is not None:
            spec = replace(spec, batch_size=batch_size)
        specs.append(spec)
    return specs


def train(
    preset: str,
    data: str | Path,
    out: str | Path,
    stages=DEFAULT_STAGES,
    workers: int = 1,
    gpu: bool = False,
    cpus_per_worker: float = 1.0,
    threads: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    command: str = "",
    sink: SinkSettings | None = None,
    lr: float | None = None,
    dense_share: float = 0.0,
) -> dict:
    """Run the stages in order; returns the summary (also in CKPT.runs/summary.json). ``sink``: the
    policy whose contexts the sink stage trains on (the CLI passes the served one); ``lr``
    overrides the plan's; ``dense_share``: the sink stage's share of steps read densely."""
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    out, runs = Path(out).resolve(), runs_dir(out)
    runs.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(preset, data, out, seed)
    summary = read_summary(runs)
    summary.update(
        command=command or summary.get("command", ""),
        data=str(data),
        provenance=read_provenance(data),
        seed=seed,
        preset=preset,
    )
    threads = threads or max(1, int(cpus_per_worker))
    made_tokens: set[Path] = set()  # token windows pre-tokenized by this call, shared by its stages
    for spec in stage_specs(
        preset,
        out,
        [s for s in STAGES if s in stages],
        steps,
        batch_size,
        threads,
        seed,
        sink,
        lr,
        dense_share,
    ):
        done = summary["stages"].get(spec.stage)
        if done and done["steps"] == spec.steps:
            print(f"[{spec.stage}] already trained ({spec.steps} steps); skipped", flush=True)
            continue
        record = run_stage(spec, data, runs, workers, gpu, cpus_per_worker, made_tokens)
        # A finished stage given more steps resumes from its run: its time adds to the earlier run's.
        if done:
            record.update(seconds=round(record["seconds"] + done["seconds"], 1), extended_from=done["steps"])
        # Read again before writing: another `seedstory train` may have finished a stage of this
        # checkpoint meanwhile (stages that need only earlier parts can run side by side).
        summary = {**read_summary(runs), **{k: v for k, v in summary.items() if k != "stages"}}
        summary["stages"][spec.stage] = record
        write_summary(runs, summary)
        write_record(out, summary)
    return summary


def token_windows(data: str | Path, spec: StageSpec, runs: Path, made_tokens: set[Path]) -> Path:
    """The opening and mllm stages' token windows, pre-tokenized once per ``seedstory train`` call
    (the data or the checkpoint's tokenizers may have changed since an earlier call) and shared by
    the stages after."""
    from training.data import pretokenize

    tokens = runs / "tokens"
    if tokens not in made_tokens:
        print(f"[{spec.stage}] pre-tokenizing windows with Ray Data map_batches", flush=True)
        pretokenize(data, spec.ckpt, tokens)
        made_tokens.add(tokens)
    return tokens


def run_stage(
    spec: StageSpec,
    data: str | Path,
    runs: Path,
    workers: int,
    gpu: bool,
    cpus: float,
    made_tokens: set[Path],
) -> dict:
    """One TorchTrainer run (resumed if one of this name exists), then export into the checkpoint."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.data import image_dataset, pretokenize, token_dataset, whole_stories

    started = time.time()
    if spec.stage in ("opening", "mllm"):
        dataset = token_dataset(token_windows(data, spec, runs, made_tokens))
    elif spec.stage == "sink":  # the mllm stage's windows (made now if it has not run), joined into stories
        tokens = runs / "tokens"
        if not any(tokens.glob("*.parquet")):
            pretokenize(data, spec.ckpt, tokens)
        dataset = whole_stories(token_dataset(tokens))
    else:
        dataset = image_dataset(data)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.to_dict()},
        datasets={"train": dataset},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=spec.stage, storage_path=str(runs), checkpoint_config=CheckpointConfig(num_to_keep=2)
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        stage_module(spec.stage).export(load_parts(spec.stage, spec, folder), spec, result.metrics)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(
        f"[{spec.stage}] exported into {spec.ckpt} after {time.time() - started:.0f}s: "
        + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
        flush=True,
    )
    return {
        "steps": spec.steps,
        "seconds": round(time.time() - started, 1),
        "metrics": metrics,
        "spec": spec.to_dict(),
    }


def ensure_checkpoint(preset: str, data: str | Path, out: Path, seed: int) -> None:
    """A fresh checkpoint (BPE trained on the data's captions, random weights) unless one exists."""
    from training.init_checkpoint import init_checkpoint
    from training.storystream import read_table

    if (out / "manifest.json").is_file():
        if read_manifest(out).preset.name != preset:
            raise ValueError(f"{out} holds a {read_manifest(out).preset.name} checkpoint, not {preset}")
        return
    captions = [c for caps in read_table(data, ["captions"]).column("captions").to_pylist() for c in caps]
    init_checkpoint(get_preset(preset), out, seed=seed, captions=captions)


def write_record(out: Path, summary: dict) -> None:
    """The checkpoint's own copy of the summary (the model card reads it), in the paths a reader
    types: the checkpoint travels, the machine it was trained on does not."""
    from training.card import portable

    (out / "training.json").write_text(portable(json.dumps(summary, indent=2)) + "\n")


def read_provenance(data: str | Path) -> dict:
    path = Path(data) / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_summary(runs: Path) -> dict:
    path = runs / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def write_summary(runs: Path, summary: dict) -> None:
    tmp = runs / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(runs / "summary.json")


# -- the command: `seedstory train` ------------------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory train``, registered on the ``seedstory`` parser's subcommands."""
    train_parser = commands.add_parser(
        "train",
        help="train a checkpoint with Ray Train (visual tokenizer, VAE, de-tokenizer, "
        "MLLM, and on request the MLLM under the sink)",
    )
    train_parser.add_argument("--preset", default="tiny")
    train_parser.add_argument(
        "--data", required=True, help="StoryStream Parquet windows (seedstory data convert)"
    )
    train_parser.add_argument("--out", required=True, help="checkpoint folder; run state goes to OUT.runs/")
    train_parser.add_argument(
        "--stages", default=",".join(DEFAULT_STAGES), help=f"any of {','.join(STAGES)}, run in that order"
    )
    train_parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per stage")
    train_parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    train_parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    train_parser.add_argument(
        "--threads", type=int, help="torch threads per worker (default: its whole CPUs)"
    )
    train_parser.add_argument("--steps", type=int, help="override every stage's steps (short runs)")
    train_parser.add_argument("--batch-size", type=int, help="override every stage's per-worker batch size")
    train_parser.add_argument("--lr", type=float, help="override every stage's peak learning rate")
    train_parser.add_argument(
        "--dense-share",
        type=float,
        default=0.0,
        help="the sink stage: share of its steps that read whole stories densely (0 to 1)",
    )
    train_parser.add_argument("--seed", type=int, default=0)
    train_parser.add_argument(
        "--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a new local one)"
    )
    train_parser.set_defaults(func=run_command)
    return train_parser


def run_command(args: argparse.Namespace, sink: SinkSettings | None = None) -> None:
    import shlex
    import sys

    import ray

    ray.init(address=args.address, include_dashboard=False)
    started = time.time()
    summary = train(
        args.preset,
        args.data,
        args.out,
        stages=args.stages.split(","),
        workers=args.workers,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        threads=args.threads,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        command=shlex.join(["seedstory", *sys.argv[1:]]),
        sink=sink,
        lr=args.lr,
        dense_share=args.dense_share,
    )
    print(
        f"trained {args.out} in {time.time() - started:.0f}s; per stage: "
        + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in summary["stages"].items())
    )
