"""``seedstory``: the command line. Each command registers its own options beside its code, through
``add_command(subparsers)`` in the module that implements it; this file lists them, in the order
``seedstory --help`` shows, and turns their errors into exit codes."""

from __future__ import annotations

import argparse
import sys

import grpc

from cluster import bulk, demo, kube, mllm_config, serving
from seedstory_client.cli import add_generate_arguments
from training import init_checkpoint, storystream, storyworld_writer, train
from training.evaluation import command as eval_command
from training.evaluation.settings import EvalSettings


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="seedstory", description="Long multimodal story generation.")
    commands = cli.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="StoryStream data").add_subparsers(
        dest="data_command", required=True
    )
    storystream.add_command(data)
    storyworld_writer.add_command(data)
    init_checkpoint.add_command(commands)
    serving.add_command(commands)
    _add_generate(commands)
    bulk.add_command(commands)
    kube.add_command(commands)
    demo.add_command(commands)
    # The sink stage trains under the served sink: --config and its flags.
    train_parser = train.add_command(commands)
    mllm_config.add_arguments(train_parser)
    train_parser.set_defaults(
        func=lambda args: train.run_command(
            args, mllm_config.sink(args, mllm_config.app_settings(args.config))
        )
    )
    _add_eval(commands)
    return cli


def _add_generate(commands) -> None:
    """The client package's ``seedstory-client generate``, option for option (that package knows
    nothing of this one, so it is registered here)."""
    generate_parser = commands.add_parser("generate", help="write a story with a running service")
    add_generate_arguments(generate_parser)
    generate_parser.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    from seedstory_client.cli import run_generate

    print(f"story written: {run_generate(args)}")


def _add_eval(commands) -> None:
    """The eval's own options (training/evaluation/command.py), then --config and the sink flags that
    every command running the MLLM shares (cluster/mllm_config.py). They meet here because training
    imports no cluster code."""
    eval_parser = eval_command.add_command(commands)
    mllm_config.add_arguments(eval_parser, sink_mode=False)  # the eval runs every mode in --modes
    eval_parser.set_defaults(func=lambda args: eval_command.run_command(args, *mllm_config.resolve(args)))


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """The eval's settings from its command line: the flags, else the config's sink, else EvalSettings'."""
    return eval_command.eval_settings(args, mllm_config.resolve(args)[1])


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
