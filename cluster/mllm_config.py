"""The MLLM settings every command that runs it shares with ``seedstory serve``.

``serve`` deploys a Serve config (``ray_config.yaml``); ``bulk`` and ``eval`` read the same file
(``--config``) for the attention sink and the default checkpoint, so a story is written under the
same policy whichever command writes it. A flag overrides one setting of the file.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from actors.mllm.sink import MODES, NEIGHBOURHOODS, SinkSettings
from cluster.serving import CONFIG, load_config
from cluster.settings import AppSettings


def app_settings(config: str | Path = CONFIG) -> AppSettings:
    """The story app's settings in a Serve config: its (single) application's args, checked."""
    return AppSettings.from_args(load_config(config)["applications"][0]["args"])


def add_arguments(parser: argparse.ArgumentParser, sink_mode: bool = True) -> None:
    """--config and the sink flags. ``sink_mode=False`` for a command that picks modes itself (eval)."""
    parser.add_argument(
        "--config",
        default=str(CONFIG),
        help="Serve config to take the sink settings and the default checkpoint from "
        "(default: the project's ray_config.yaml)",
    )
    if sink_mode:
        parser.add_argument("--sink-mode", choices=MODES, help="attention sink mode (default: the config's)")
    parser.add_argument(
        "--sink-tokens", type=int, help="first tokens every story keeps (default: the config's)"
    )
    parser.add_argument(
        "--sink-segments",
        type=int,
        help="opening segments every story keeps whole, whatever their length (default: the config's)",
    )
    parser.add_argument("--window-segments", type=int, help="segments in the window (default: the config's)")
    parser.add_argument(
        "--neighbourhoods",
        type=neighbourhoods,
        metavar="B,A,B,A",
        help="multimodal sink: tokens kept before/after each old <img> and before/after each old "
        "</img>, e.g. 4,7,8,3; 'scaled': SEED-Story's scaled to the checkpoint's Q "
        "(default: the config's)",
    )


def neighbourhoods(text: str) -> dict[str, int | None]:
    """'B,A,B,A' (four counts) or 'scaled' (all unset: resolved against the checkpoint)."""
    if text == "scaled":
        return dict.fromkeys(NEIGHBOURHOODS)
    counts = text.split(",")
    if len(counts) != len(NEIGHBOURHOODS) or not all(c.strip().isdigit() for c in counts):
        raise argparse.ArgumentTypeError(f"expected four counts like 4,7,8,3 or 'scaled', got {text!r}")
    return dict(zip(NEIGHBOURHOODS, map(int, counts)))


def sink(args: argparse.Namespace, settings: AppSettings) -> SinkSettings:
    """The config's sink, with the flags given on top."""
    given = {
        "mode": getattr(args, "sink_mode", None),
        "sink_tokens": args.sink_tokens,
        "sink_segments": args.sink_segments,
        "window_segments": args.window_segments,
    }
    flagged = replace(settings.sink, **{k: v for k, v in given.items() if v is not None})
    return replace(flagged, **args.neighbourhoods) if args.neighbourhoods is not None else flagged


def resolve(args: argparse.Namespace) -> tuple[Path, SinkSettings]:
    """The checkpoint (--ckpt, else the config's) and the sink settings a command runs the MLLM with."""
    settings = app_settings(args.config)
    return Path(args.ckpt) if args.ckpt else Path(settings.checkpoint), sink(args, settings)
