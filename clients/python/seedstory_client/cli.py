"""``seedstory-client generate``: one story from a running service, with progress, written to a
folder; ``--continue DIR`` finishes a story written there that was cut short. The server's
``seedstory generate`` is this same command (its options come from ``add_generate_arguments``)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TextIO

import grpc

from seedstory_client import API_VERSION, __version__
from seedstory_client.client import (
    CannotContinue,
    Story,
    StoryClient,
    StoryStreamError,
    build_request,
    continuation_request,
)
from seedstory_client.output import read_story, write_story
from seedstory_client.v1.story_pb2 import StoryEvent


class Progress:
    """A one-line progress bar on stderr, without a dependency for it: redrawn in place on a
    terminal; elsewhere (logs, pipes) one line per picture, so logs stay readable. It counts what the
    story holds, so a continued story starts where it stopped and a re-sent caption is not counted twice."""

    def __init__(self, story: Story, stream: TextIO | None = None):
        self.story, self.segments = story, story.request.segments
        self.stream = stream or sys.stderr
        self.tty, self.drawn = self.stream.isatty(), False

    def __call__(self, event: StoryEvent) -> None:
        kind = event.WhichOneof("event")
        if kind not in ("caption", "image"):  # an error's status comes after an event with the story id only
            return
        done = len(self.story.segments) + self.story.pictures
        total = max(2 * self.segments, done)  # segments=0 asks for the server's default length
        filled = 20 * done // total
        line = (
            f"segment {getattr(event, kind).index + 1}/{self.segments or '?'}: {kind:7} "
            f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total}"
        )
        self.drawn = True
        if self.tty:
            self.stream.write("\r" + line)
        elif kind == "image":
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")


def generate_story(
    target: str,
    prompt: str,
    segments: int,
    out: Path,
    image: Path | None = None,
    token: str | None = None,
    seed: int | None = None,
    steps: int = 0,
    temperature: float = 0.8,
    source: str = "",
    resume: bool = True,
) -> Path:
    """Write one story from the service at ``target`` into ``out``; returns the page. A stream lost
    with ``UNAVAILABLE`` is continued (``resume``). A story that still fails midway writes the
    segments that arrived, prints the command that continues it, then raises ``StoryStreamError``."""
    request = build_request(
        prompt,
        segments,
        image.read_bytes() if image else None,
        seed=seed,
        render_seed=seed,
        steps=steps,
        temperature=temperature,
    )
    return _finish(target, Story(request=request), Path(out), token, resume, source)


def continue_written_story(
    target: str, folder: Path, out: Path | None = None, token: str | None = None, resume: bool = True
) -> Path:
    """Finish the story ``write_story`` left in ``folder`` (into ``out``, by default the same folder):
    only the segments still missing are asked for, with the story's own options."""
    folder = Path(folder)
    story = read_story(folder)
    continuation_request(story)  # CannotContinue (bad input) before anything is sent
    source = json.loads((folder / "story.json").read_text()).get("source", "")
    return _finish(target, story, Path(out or folder), token, resume, source)


def _finish(target: str, story: Story, out: Path, token: str | None, resume: bool, source: str) -> Path:
    progress = Progress(story)
    try:
        with StoryClient(target, token) as client:
            client.continue_story(story, on_event=progress, resume=resume)
    except StoryStreamError as error:
        progress.close()
        partial = error.story
        if partial.segments:  # keep what the service wrote before it failed
            write_story(out, partial, source)
            print(
                f"the story stopped after {partial.pictures} of {story.request.segments or '?'} segments; "
                f"what arrived is in {out}{_how_to_continue(partial, out, target, token)}",
                file=sys.stderr,
            )
        raise
    progress.close()
    page = write_story(out, story, source)
    stats = story.stats
    resumed = f"; resumed {story.resumes}x" if story.resumes else ""
    print(
        f"{len(story.segments)} segments in {stats.get('total_s', 0):.1f}s "
        f"(MLLM {stats.get('mllm_s', 0):.1f}s, {stats.get('tokens_per_s', 0):.0f} tok/s; "
        f"render {stats.get('render_s', 0):.1f}s; "
        f"peak KV blocks {stats.get('peak_kv_blocks', 0)}{resumed})"
    )
    return page


def _how_to_continue(story: Story, out: Path, target: str, token: str | None) -> str:
    try:
        continuation_request(story)
    except CannotContinue as e:
        return f" ({e})"
    # The token is a secret: the command names the option, never its value.
    command = (
        f"seedstory-client generate --continue {shlex.quote(str(out))} --target {shlex.quote(target)}"
        + (" --token TOKEN" if token else "")
    )
    return f"; continue it with: {command}"


def add_generate_arguments(command: argparse.ArgumentParser) -> None:
    """The options of ``generate``, shared with the server's ``seedstory generate``."""
    what = command.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the opening caption")
    what.add_argument(
        "--continue",
        dest="continue_from",
        metavar="DIR",
        help="finish the story written in DIR; it keeps its own image, segments, seed, steps and temperature",
    )
    command.add_argument("--image", help="start image (PNG or JPEG) for the opening caption")
    command.add_argument("--segments", type=int, default=10)
    command.add_argument("--out", help="folder to write (default: story_out; with --continue, DIR)")
    command.add_argument("--target", default="localhost:9000", help="the service's gRPC address")
    command.add_argument("--token", help="bearer token, if the service asks for one")
    command.add_argument("--seed", type=int)
    command.add_argument("--steps", type=int, default=0, help="denoising steps (0: the server's default)")
    command.add_argument("--temperature", type=float, default=0.8)
    command.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the story when the service loses it (UNAVAILABLE); default: on",
    )


def run_generate(args: argparse.Namespace) -> Path:
    if args.continue_from:
        return continue_written_story(
            args.target, Path(args.continue_from), args.out and Path(args.out), args.token, args.resume
        )
    return generate_story(
        args.target,
        args.prompt,
        args.segments,
        Path(args.out or "story_out"),
        Path(args.image) if args.image else None,
        args.token,
        args.seed,
        args.steps,
        args.temperature,
        resume=args.resume,
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="seedstory-client", description=f"Client for the seedstory story service (API {API_VERSION})."
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__} (API {API_VERSION})")
    sub = top.add_subparsers(dest="command", required=True)
    add_generate_arguments(sub.add_parser("generate", help="write a story with a running service"))
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        page = run_generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"seedstory-client: error: {e}", file=sys.stderr)
        sys.exit(2)
    except grpc.RpcError as e:
        print(f"seedstory-client: the service answered {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
    print(f"story written: {page}")
