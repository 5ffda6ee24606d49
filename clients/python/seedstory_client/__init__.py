"""Client for the seedstory story service: the gRPC stubs, sync and asyncio clients, and the story
page writer. Needs only grpcio and protobuf.

    from seedstory_client import StoryClient, write_story

    with StoryClient("localhost:9000") as client:
        story = client.generate("Once upon a time, Milo the red circle walks in the park.", segments=4,
                                resume=True)  # a stream the service loses is continued, not lost
    write_story(Path("out"), story)

A story cut short (``StoryStreamError.story``, or ``read_story`` of a folder) is finished with
``client.continue_story(story)``; ``continuation_request(story)`` is the request it sends.

Versioning: this package speaks the API ``API_VERSION`` (the proto package of
``proto/seedstory/v1/story.proto``), so it works with every server that serves ``seedstory.v1``.
Its major version is the API's: 1.x speaks ``seedstory.v1``; a ``seedstory.v2`` would come with 2.0.
"""

from __future__ import annotations

API_VERSION = "seedstory.v1"
__version__ = "1.0.0"  # the single source of the version: clients/python/pyproject.toml reads it

from seedstory_client.client import (  # noqa: E402 (after the version, which the build reads alone)
    AsyncStoryClient,
    CannotContinue,
    Story,
    StoryClient,
    StorySegment,
    StoryStreamError,
    build_request,
    continuation_request,
)
from seedstory_client.output import read_story, write_story  # noqa: E402

__all__ = [
    "API_VERSION",
    "AsyncStoryClient",
    "CannotContinue",
    "Story",
    "StoryClient",
    "StorySegment",
    "StoryStreamError",
    "build_request",
    "continuation_request",
    "read_story",
    "write_story",
]
