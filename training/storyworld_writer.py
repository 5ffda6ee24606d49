"""Writing a StoryWorld (``training/storyworld.py``) to disk in the official StoryStream layout,
and the ``seedstory data storyworld`` command.

Output (``OUT/``):
    storyworld.jsonl      one story a line: {"id", "images", "captions", "orders"}
    images/SSSSSS/SSSSSS_keyframe_K.jpg
    truth.jsonl           sidecar, one story a line:
        classic:   {"id", "hero", "segments": [{"hero", "others", "place", "action"}]}
        returning: {"id", "world", "hero", "looks": {name: {"colour", "shape", "pattern"}},
                    "segments": [{"hero", "others", "place", "action", "present", "returning"}]}
        where ``present`` is [hero, *others] and ``returning`` the names back in that segment
        after at least ``AWAY`` segments away.
    storyworld.json       provenance: the arguments and the command that wrote the folder
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.storyworld import WORLDS, make_story
from training.storyworld_pictures import draw_segment


def write_storyworld(
    out: str | Path, stories: int, segments: int = 30, seed: int = 0, size: int = 128, world: str = "classic"
) -> Path:
    """Write ``stories`` stories of ``world``; deterministic for a given seed. Returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl, truth = out / "storyworld.jsonl", out / "truth.jsonl"
    with jsonl.open("w") as stories_file, truth.open("w") as truth_file:
        for sid in range(stories):
            story = make_story(world, seed, sid, segments)
            rel = [f"{sid:06d}/{sid:06d}_keyframe_{k}.jpg" for k in range(segments)]
            (out / "images" / f"{sid:06d}").mkdir(exist_ok=True)
            for seg, path in zip(story.plan, rel):
                draw_segment(seg, size, story.cast).save(out / "images" / path, quality=95)
            stories_file.write(
                json.dumps(
                    {"id": sid, "images": rel, "captions": story.captions, "orders": list(range(segments))}
                )
                + "\n"
            )
            truth_file.write(json.dumps({"id": sid, **story.truth}) + "\n")
    flag = "" if world == "classic" else f" --world {world}"  # the classic command reads as it always did
    meta = {
        "stories": stories,
        "segments": segments,
        "seed": seed,
        "size": size,
        "world": world,
        "command": f"seedstory data storyworld --stories {stories} --segments {segments} --seed {seed} "
        f"--size {size}{flag} --out {out}",
    }
    (out / "storyworld.json").write_text(json.dumps(meta, indent=2) + "\n")
    return jsonl


# -- the command: `seedstory data storyworld` --------------------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory data storyworld``, registered on ``seedstory data``'s subcommands."""
    storyworld_parser = commands.add_parser(
        "storyworld", help="write a procedural StoryWorld in the official layout"
    )
    storyworld_parser.add_argument("--stories", type=int, required=True)
    storyworld_parser.add_argument("--segments", type=int, default=30)
    storyworld_parser.add_argument("--seed", type=int, default=0)
    storyworld_parser.add_argument("--size", type=int, default=128, help="picture size in pixels")
    storyworld_parser.add_argument(
        "--world",
        choices=tuple(WORLDS),
        default="classic",
        help="classic: fixed looks, the hero in every caption; returning: random looks said only "
        "in the opening, friends who leave and come back after 10+ segments",
    )
    storyworld_parser.add_argument("--out", required=True)
    storyworld_parser.set_defaults(func=run_command)
    return storyworld_parser


def run_command(args: argparse.Namespace) -> None:
    started = time.time()
    path = write_storyworld(args.out, args.stories, args.segments, args.seed, args.size, world=args.world)
    print(f"wrote {args.stories} stories to {path} in {time.time() - started:.1f}s")
