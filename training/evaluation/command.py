"""``seedstory eval``: the command line of the eval. ``add_command`` registers its own options on the
``seedstory`` parser (cluster/cli.py adds --config and the sink flags, as for every command that
runs the MLLM); ``run_command`` runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from actors.mllm.sink import SinkSettings
from training.evaluation.run import run_eval
from training.evaluation.settings import EvalSettings


def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory eval``'s own options, registered on the ``seedstory`` parser's subcommands.
    Their defaults live in EvalSettings (None: not given), so the parser needs none of the eval's imports."""
    parser = commands.add_parser(
        "eval", help="long stories under each sink mode: the paper's Table 2 on StoryWorld"
    )
    parser.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    parser.add_argument(
        "--heldout", required=True, help="a StoryWorld folder the model never saw (seedstory data storyworld)"
    )
    parser.add_argument("--out", required=True, help="folder for table.md, results.json and the plot")
    parser.add_argument("--stories", type=int)
    parser.add_argument("--segments", type=int)
    parser.add_argument(
        "--modes", help="comma-separated, among dense,window,streaming,multimodal (default: all)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps per picture")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance of the renders")
    parser.add_argument("--sampler", help="the renders' sampler: euler, dpm++ or unipc")
    parser.add_argument("--guidance-until", type=float, help="the fraction of the steps that run guidance")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--captions",
        choices=("written", "given"),
        help="written (default): the model writes the captions after the opening; given: each "
        "held-out story's own captions, so every mode draws the same returns",
    )
    parser.add_argument(
        "--card", action="store_true", help="also write the table into the checkpoint's model card"
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        default=None,
        help="skip the ceilings (a render of every real held-out picture's features)",
    )
    return parser


def eval_settings(
    args: argparse.Namespace,
    sink: SinkSettings = SinkSettings(),  # noqa: B008 (frozen: one shared default is safe)
) -> EvalSettings:
    """The eval's settings: what the command line gives, else EvalSettings' own defaults (one place)."""
    given = {
        key: getattr(args, key)
        for key in (
            "stories",
            "segments",
            "steps",
            "guidance",
            "sampler",
            "guidance_until",
            "seed",
            "ceiling",
            "captions",
        )
        if getattr(args, key) is not None
    }
    if args.modes is not None:
        given["modes"] = tuple(args.modes.split(","))
    return EvalSettings(sink=sink, **given)


def run_command(args: argparse.Namespace, ckpt: Path, sink: SinkSettings) -> None:
    """Runs the eval the command line asks for and prints its table."""
    print(run_eval(ckpt, Path(args.heldout), Path(args.out), eval_settings(args, sink), card=args.card))
