"""``seedstory-client generate``: one story from a running service, with progress, written to a folder.
The server's ``seedstory generate`` is this same command (its options come from ``add_generate_arguments``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import grpc

from seedstory_client import API_VERSION, __version__
from seedstory_client.client import StoryClient, StoryStreamError
from seedstory_client.output import write_story
from seedstory_client.v1.story_pb2 import StoryEvent


class Progress:
    """A one-line progress bar on stderr, without a dependency for it: redrawn in place on a
    terminal; elsewhere (logs, pipes) one line per picture, so logs stay readable."""

    def __init__(self, segments: int, stream: TextIO | None = None):
        self.segments, self.done = segments, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, ev: StoryEvent) -> None:
        kind = ev.WhichOneof("event")
        if kind not in ("caption", "image"):  # an error's status comes after an event with the story id only
            return
        self.done += 1
        total = max(2 * self.segments, self.done)  # segments=0 asks for the server's default length
        filled = 20 * self.done // total
        line = (f"segment {getattr(ev, kind).index + 1}/{self.segments or '?'}: {kind:7} "
                f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{total}")
        if self.tty:
            self.stream.write("\r" + line)
        elif kind == "image":
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")


def generate_story(target: str, prompt: str, segments: int, out: Path, image: Path | None = None,
                   token: str | None = None, seed: int | None = None, steps: int = 0,
                   temperature: float = 0.8, source: str = "") -> Path:
    """Write one story from the service at ``target`` into ``out``; returns the page. A stream that
    fails midway still writes the segments that arrived, then raises ``StoryStreamError``."""
    progress = Progress(segments)
    try:
        with StoryClient(target, token) as client:
            story = client.generate(prompt, segments, image.read_bytes() if image else None, seed=seed,
                                    render_seed=seed, steps=steps, temperature=temperature, on_event=progress)
    except StoryStreamError as e:
        progress.close()
        if e.story.segments:  # keep what the service wrote before it failed
            write_story(out, e.story, source)
            print(f"the story stopped after {len(e.story.segments)} of {segments} segments; "
                  f"what arrived is in {out}", file=sys.stderr)
        raise
    progress.close()
    page = write_story(out, story, source)
    s = story.stats
    print(f"{len(story.segments)} segments in {s.get('total_s', 0):.1f}s "
          f"(MLLM {s.get('mllm_s', 0):.1f}s, {s.get('tokens_per_s', 0):.0f} tok/s; render {s.get('render_s', 0):.1f}s; "
          f"peak KV blocks {s.get('peak_kv_blocks', 0)})")
    return page


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    """The options of ``generate``, shared with the server's ``seedstory generate``."""
    g.add_argument("--prompt", required=True, help="the opening caption")
    g.add_argument("--image", help="start image (PNG or JPEG) for the opening caption")
    g.add_argument("--segments", type=int, default=10)
    g.add_argument("--out", default="story_out")
    g.add_argument("--target", default="localhost:9000", help="the service's gRPC address")
    g.add_argument("--token", help="bearer token, if the service asks for one")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int, default=0, help="denoising steps (0: the server's default)")
    g.add_argument("--temperature", type=float, default=0.8)


def run_generate(a: argparse.Namespace) -> Path:
    return generate_story(a.target, a.prompt, a.segments, Path(a.out), Path(a.image) if a.image else None,
                          a.token, a.seed, a.steps, a.temperature)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seedstory-client",
                                description=f"Client for the seedstory story service (API {API_VERSION}).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (API {API_VERSION})")
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_arguments(sub.add_parser("generate", help="write a story with a running service"))
    return p


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
