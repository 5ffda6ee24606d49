"""Reading a held-out StoryWorld folder for the eval: each story's opening, hero, cast, real
pictures and ground-truth segments (``read_heldout``), and how the folder was made
(``heldout_source``, for the table's first line)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.evaluation.judge import CAST_CHECKS, CHECKS
from training.storyworld import CHARACTERS, Character, Segment, cast_from_looks, segment_of


@dataclass
class HeldOut:
    """The held-out stories the eval writes from (their openings) and judges against (the rest)."""

    captions: list[list[str]]  # per story, every caption (the opening first), cut to the segments asked
    heroes: list[str]
    pictures: list[list[bytes]]  # real pictures per story, per segment (PNG/JPEG bytes)
    worlds: list[str]  # per story: "classic" or "returning" (one world a set)
    casts: list[tuple[Character, ...]]  # per story, hero first (classic: CHARACTERS)
    truth: list[list[Segment]]  # per story, per segment: what the real picture shows

    @property
    def openings(self) -> list[str]:
        """Each story's opening caption: what the eval writes on from."""
        return [captions[0] for captions in self.captions]

    @property
    def world(self) -> str:
        return self.worlds[0]

    @property
    def checks(self) -> tuple[str, ...]:
        """The checks this set's world gets (the returning world adds the look judge's)."""
        return CAST_CHECKS if self.world == "returning" else CHECKS


def _cast(truth_record: dict) -> tuple[Character, ...]:
    """A story's characters from its truth record, hero first."""
    if truth_record.get("world", "classic") == "classic":
        return CHARACTERS
    return cast_from_looks(truth_record["looks"])  # hero first, as the world writes the looks


def read_heldout(folder: Path, stories: int, segments: int) -> HeldOut:
    """The first ``stories`` stories of ``folder``, cut to ``segments`` segments; an error if it has
    fewer or shorter ones, or mixes worlds (the table reports one world's checks)."""
    story_lines = (folder / "storyworld.jsonl").read_text().splitlines()
    truth_lines = (folder / "truth.jsonl").read_text().splitlines()
    if min(len(story_lines), len(truth_lines)) < stories:
        raise ValueError(
            f"{folder} has {min(len(story_lines), len(truth_lines))} stories; the eval asks for {stories}"
        )
    story_records = [json.loads(line) for line in story_lines[:stories]]
    truth_records = [json.loads(line) for line in truth_lines[:stories]]
    shortest = min(
        min(len(story_record["captions"]), len(story_record["images"]), len(truth_record["segments"]))
        for story_record, truth_record in zip(story_records, truth_records)
    )
    if shortest < segments:
        raise ValueError(f"{folder}: held-out stories are shorter than {segments} segments")
    worlds = [truth_record.get("world", "classic") for truth_record in truth_records]
    if len(set(worlds)) > 1:
        raise ValueError(
            f"{folder} mixes StoryWorld worlds {sorted(set(worlds))}; the eval judges one at a time"
        )
    return HeldOut(
        captions=[story_record["captions"][:segments] for story_record in story_records],
        heroes=[truth_record["hero"] for truth_record in truth_records],
        pictures=[
            [(folder / "images" / image).read_bytes() for image in story_record["images"][:segments]]
            for story_record in story_records
        ],
        worlds=worlds,
        casts=[_cast(truth_record) for truth_record in truth_records],
        truth=[
            [segment_of(segment_record) for segment_record in truth_record["segments"][:segments]]
            for truth_record in truth_records
        ],
    )


def heldout_source(folder: Path) -> str:
    """How the held-out stories were made, from the provenance ``seedstory data storyworld`` writes."""
    path = folder / "storyworld.json"
    if not path.is_file():
        return f"held-out stories from {folder}"
    provenance = json.loads(path.read_text())
    return f"held-out StoryWorld stories, data seed {provenance['seed']}: `{provenance['command']}`"
