"""The gRPC API's stubs (in the client package) and the request checks, without a cluster."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from actors.errors import InputError
from cluster.requests import StoryLimits, check_request
from seedstory_client import API_VERSION, __version__, build_request

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "python"


def test_the_client_packages_stubs_match_the_proto(tmp_path):
    """The only stubs in the project are the client package's; the server imports them from there."""
    generator = runpy.run_path(
        str(CLIENT / "generate_stubs.py")
    )  # a checkout's tool, not an installed module
    fresh = generator["generate"](tmp_path)
    for path in fresh:
        committed = CLIENT / "seedstory_client" / "v1" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{path.name} is stale: run `python clients/python/generate_stubs.py`"
        )
    assert {p.name for p in fresh} == set(generator["STUBS"])
    assert not [p for p in ROOT.glob("[!.]*/**/*_pb2*.py") if CLIENT not in p.parents], (
        "a second copy of the stubs"
    )


def test_the_api_version_is_the_proto_package_and_the_client_major_version():
    from seedstory_client.v1 import story_pb2

    assert story_pb2.DESCRIPTOR.package == API_VERSION == "seedstory.v1"
    assert f"v{__version__.split('.')[0]}" == API_VERSION.rsplit(".", 1)[1]


def test_a_good_request_becomes_a_plain_spec_with_the_servers_defaults():
    limits = StoryLimits()
    spec = check_request(
        build_request("  Milo walks.  ", story_so_far=[("Milo sits.", [1] * 16)]), limits, 16, 256
    )
    assert spec.caption == "Milo walks." and spec.segments == limits.default_segments
    assert spec.steps == limits.default_steps and spec.guidance == limits.default_guidance
    assert spec.sampling == {"temperature": pytest.approx(0.8), "top_p": pytest.approx(0.95), "seed": None}
    assert spec.start_image is None and spec.caption_ids == []
    assert spec.story_so_far == [{"caption": "Milo sits.", "caption_ids": [], "visual_codes": [1] * 16}]


@pytest.mark.parametrize(
    "request_kwargs,field",
    [
        (dict(caption=""), "caption"),
        (dict(caption="x", segments=26), "segments"),
        (dict(caption="x", temperature=-1), "sampling.temperature"),
        (dict(caption="x", guidance=float("nan")), "rendering.guidance"),
        (dict(caption="x", story_so_far=[("", [1] * 16)]), "story_so_far[0].caption"),
        (dict(caption="x", story_so_far=[("a", [1] * 15)]), "story_so_far[0].visual_codes"),
        (dict(caption="x", story_so_far=[("a", [256] * 16)]), "story_so_far[0].visual_codes"),
    ],
)
def test_each_bad_field_is_named(request_kwargs, field):
    with pytest.raises(InputError) as err:
        check_request(build_request(**request_kwargs), StoryLimits(), 16, 256)
    assert err.value.field == field and str(err.value).startswith(field + ":")


def test_a_continued_story_may_leave_its_next_caption_to_the_mllm():
    from seedstory_client.v1.story_pb2 import Segment, StoryRequest

    earlier = Segment(caption_ids=[300, 301], visual_codes=[1] * 16)  # exact ids stand in for the text
    spec = check_request(StoryRequest(story_so_far=[earlier]), StoryLimits(), 16, 256)
    assert spec.caption == "" and spec.caption_ids == []
    assert spec.story_so_far == [{"caption": "", "caption_ids": [300, 301], "visual_codes": [1] * 16}]
    with pytest.raises(InputError) as err:  # a start image is the opening caption's picture: it needs one
        check_request(StoryRequest(story_so_far=[earlier], start_image=b"\x89PNG"), StoryLimits(), 16, 256)
    assert err.value.field == "caption"
