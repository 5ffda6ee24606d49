"""``seedstory``: the command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from seedstory_client.cli import add_generate_arguments


def _data_convert(a: argparse.Namespace) -> None:
    from training.storystream import convert

    summary = convert(a.jsonl, a.images, a.out, window=a.window, image_size=a.image_size, subset=a.subset)
    print("\n".join(summary.lines()))


def _data_storyworld(a: argparse.Namespace) -> None:
    from training.storyworld import write_storyworld

    t0 = time.time()
    path = write_storyworld(a.out, a.stories, a.segments, a.seed, a.size, world=a.world)
    print(f"wrote {a.stories} stories to {path} in {time.time() - t0:.1f}s")


def _init(a: argparse.Namespace) -> None:
    from actors.config import get_preset
    from training.init_checkpoint import init_checkpoint

    t0 = time.time()
    m = init_checkpoint(get_preset(a.preset), a.out, seed=a.seed, dtype=a.dtype)
    size = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file())
    print(f"{a.preset} checkpoint at {a.out}: Q={m.num_queries} K={m.codebook_size} vocab={m.tokens.vocab_size} "
          f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s")


def _serve(a: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from cluster.demo import ensure_checkpoint
    from cluster.serving import deploy, grpc_target, load_config, with_args

    config = load_config(a.config)
    if a.ckpt:
        config = with_args(config, checkpoint=str(Path(a.ckpt).resolve()))
    ray.init(address=a.address, include_dashboard=False)
    t0 = time.time()
    deploy(config)
    print(f"serving {a.config} in {time.time() - t0:.1f}s: gRPC {grpc_target(config)}, "
          f"HTTP :{config['http_options']['port']} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def _generate(a: argparse.Namespace) -> None:
    from seedstory_client.cli import run_generate

    print(f"story written: {run_generate(a)}")


def _k8s(a: argparse.Namespace) -> None:
    from cluster.kube import write_manifests

    for path in write_manifests(Path(a.out)):
        print(f"wrote {path}")


def _demo(a: argparse.Namespace) -> None:
    from cluster.demo import run_demo

    page = run_demo(Path(a.out), a.prompt, Path(a.ckpt) if a.ckpt else None, a.segments, a.seed,
                    a.grpc_port, a.http_port)
    print(f"story written: {page}")


def _train(a: argparse.Namespace) -> None:
    import shlex

    import ray

    from training.train import train

    ray.init(address=a.address, include_dashboard=False)
    t0 = time.time()
    summary = train(a.preset, a.data, a.out, stages=a.stages.split(","), workers=a.workers, gpu=a.gpu,
                    cpus_per_worker=a.cpus_per_worker, threads=a.threads, steps=a.steps, batch_size=a.batch_size,
                    seed=a.seed, command=shlex.join(["seedstory", *sys.argv[1:]]))
    print(f"trained {a.out} in {time.time() - t0:.0f}s; per stage: "
          + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in summary["stages"].items()))


def eval_settings(a: argparse.Namespace):
    """The eval's settings: what the command line gives, else EvalSettings' own defaults (one place)."""
    from training.evaluate import EvalSettings

    given = {k: getattr(a, k) for k in ("stories", "segments", "steps", "guidance", "seed")
             if getattr(a, k) is not None}
    if a.modes is not None:
        given["modes"] = tuple(a.modes.split(","))
    return EvalSettings(**given)


def _eval(a: argparse.Namespace) -> None:
    from training.evaluate import run_eval

    table = run_eval(Path(a.ckpt), Path(a.heldout), Path(a.out), eval_settings(a), card=a.card)
    print(table)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seedstory", description="Long multimodal story generation.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="StoryStream data").add_subparsers(dest="data_command", required=True)
    c = data.add_parser("convert", help="official StoryStream JSONL + images -> Parquet windows")
    c.add_argument("--jsonl", required=True)
    c.add_argument("--images", required=True, help="image root the JSONL paths are relative to")
    c.add_argument("--out", required=True)
    c.add_argument("--window", type=int, default=10)
    c.add_argument("--image-size", type=int, default=64)
    c.add_argument("--subset", help="subset name (default: the JSONL file name)")
    c.set_defaults(func=_data_convert)
    w = data.add_parser("storyworld", help="write a procedural StoryWorld in the official layout")
    w.add_argument("--stories", type=int, required=True)
    w.add_argument("--segments", type=int, default=30)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--size", type=int, default=128, help="picture size in pixels")
    w.add_argument("--world", choices=("classic", "returning"), default="classic",
                   help="classic: fixed looks, the hero in every caption; returning: random looks said only "
                        "in the opening, friends who leave and come back after 10+ segments")
    w.add_argument("--out", required=True)
    w.set_defaults(func=_data_storyworld)

    i = sub.add_parser("init", help="build a complete random-init checkpoint")
    i.add_argument("--preset", default="tiny")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    i.set_defaults(func=_init)

    sv = sub.add_parser("serve", help="start Ray (or join --address) and deploy the story cluster")
    sv.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "ray_config.yaml"))
    sv.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    sv.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    sv.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="write a story with a running service")
    add_generate_arguments(g)  # the client package's `seedstory-client generate`, option for option
    g.set_defaults(func=_generate)

    from cluster.bulk import parser as bulk_parser, run_cli as bulk_run

    b = sub.add_parser("bulk", parents=[bulk_parser(add_help=False)], help="Parquet of prompts -> Parquet of "
                       "stories, as a Ray Data job (also: python -m cluster.bulk under `ray job submit`)")
    b.set_defaults(func=bulk_run)

    k = sub.add_parser("k8s", help="write the KubeRay RayService/RayJob manifests from ray_config.yaml")
    k.add_argument("--out", default=str(Path(__file__).resolve().parent / "k8s"))
    k.set_defaults(func=_k8s)

    d = sub.add_parser("demo", help="start a local cluster and write a story with the embedded tiny model")
    d.add_argument("--segments", type=int, default=4)
    d.add_argument("--out", default="story_out")
    d.add_argument("--prompt", default="Once upon a time, Milo the red circle walks in the park.")
    d.add_argument("--ckpt", help="checkpoint folder (default: the embedded tiny model)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--grpc-port", type=int, help="default: ray_config.yaml's (9000)")
    d.add_argument("--http-port", type=int, help="default: ray_config.yaml's (8000)")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train a checkpoint with Ray Train (visual tokenizer, VAE, de-tokenizer, MLLM)")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--data", required=True, help="StoryStream Parquet windows (seedstory data convert)")
    t.add_argument("--out", required=True, help="checkpoint folder; run state goes to OUT.runs/")
    t.add_argument("--stages", default="visual,vae,detokenizer,mllm")
    t.add_argument("--workers", type=int, default=1, help="Ray Train workers per stage")
    t.add_argument("--gpu", action="store_true", help="one GPU per worker")
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument("--threads", type=int, help="torch threads per worker (default: its whole CPUs)")
    t.add_argument("--steps", type=int, help="override every stage's steps (short runs)")
    t.add_argument("--batch-size", type=int, help="override every stage's per-worker batch size")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a new local one)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="long stories under each sink mode: the paper's Table 2 on StoryWorld")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--heldout", required=True, help="a StoryWorld folder the model never saw (seedstory data storyworld)")
    e.add_argument("--out", required=True, help="folder for table.md, results.json and the plot")
    # Defaults live in training.evaluate.EvalSettings (50 stories, 25 segments, every mode, 10 steps,
    # guidance 5, seed 0); the parser stays free of the eval's imports.
    e.add_argument("--stories", type=int)
    e.add_argument("--segments", type=int)
    e.add_argument("--modes", help="comma-separated, among dense,window,streaming,multimodal (default: all)")
    e.add_argument("--steps", type=int, help="denoising steps per picture")
    e.add_argument("--guidance", type=float, help="classifier-free guidance of the renders")
    e.add_argument("--seed", type=int)
    e.add_argument("--card", action="store_true", help="also write the table into the checkpoint's model card")
    e.set_defaults(func=_eval)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"seedstory: error: {e}", file=sys.stderr)
        sys.exit(2)
    except grpc.RpcError as e:
        print(f"seedstory: the service answered {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
