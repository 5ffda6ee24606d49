"""``seedstory``: the command line. Each command registers its own options beside its code, through
``add_command(subparsers)`` in the module that implements it; this file lists them, in the order
``seedstory --help`` shows, and turns their errors into exit codes."""

from __future__ import annotations

import argparse
import sys

import grpc
from seedstory_client.cli import add_generate_arguments

from cluster import bulk, demo, kube, mllm_config, serving
from training import evaluate, init_checkpoint, storystream, storyworld, train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seedstory", description="Long multimodal story generation.")
    commands = p.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="StoryStream data").add_subparsers(dest="data_command", required=True)
    storystream.add_command(data)
    storyworld.add_command(data)
    init_checkpoint.add_command(commands)
    serving.add_command(commands)
    _add_generate(commands)
    bulk.add_command(commands)
    kube.add_command(commands)
    demo.add_command(commands)
    t = train.add_command(commands)  # the sink stage trains under the served sink: --config and its flags
    mllm_config.add_arguments(t)
    t.set_defaults(func=lambda a: train.run_command(a, mllm_config.sink(a, mllm_config.app_settings(a.config))))
    _add_eval(commands)
    return p


def _add_generate(commands) -> None:
    """The client package's ``seedstory-client generate``, option for option (that package knows
    nothing of this one, so it is registered here)."""
    g = commands.add_parser("generate", help="write a story with a running service")
    add_generate_arguments(g)
    g.set_defaults(func=_generate)


def _generate(a: argparse.Namespace) -> None:
    from seedstory_client.cli import run_generate

    print(f"story written: {run_generate(a)}")


def _add_eval(commands) -> None:
    """The eval's own options (training/evaluate.py), then --config and the sink flags that every
    command running the MLLM shares (cluster/mllm_config.py). They meet here because training
    imports no cluster code."""
    e = evaluate.add_command(commands)
    mllm_config.add_arguments(e, sink_mode=False)  # the eval runs every mode in --modes
    e.set_defaults(func=lambda a: evaluate.run_command(a, *mllm_config.resolve(a)))


def eval_settings(a: argparse.Namespace) -> evaluate.EvalSettings:
    """The eval's settings from its command line: the flags, else the config's sink, else EvalSettings'."""
    return evaluate.eval_settings(a, mllm_config.resolve(a)[1])


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
