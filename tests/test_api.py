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
        build_request("  Milo walks.  ", story_so_far=[("Milo sits.", True), ("Bea runs.", b"\x89PNG")]),
        limits,
    )
    assert spec.caption == "Milo walks." and spec.segments == limits.default_segments
    assert spec.steps == limits.default_steps and spec.guidance == limits.default_guidance
    assert spec.sampling == {"temperature": pytest.approx(0.8), "top_p": pytest.approx(0.95), "seed": None}
    assert spec.start_image is None and spec.caption_ids == []
    # A picture the service wrote carries nothing (its ids recompute it); a given one, its bytes.
    assert spec.story_so_far == [
        {"caption": "Milo sits.", "caption_ids": [], "image": None},
        {"caption": "Bea runs.", "caption_ids": [], "image": b"\x89PNG"},
    ]


def test_a_segment_says_where_its_picture_comes_from():
    from seedstory_client.v1.story_pb2 import Segment

    assert Segment(written=True).WhichOneof("picture") == "written"
    assert Segment(image=b"x").WhichOneof("picture") == "image"
    both = Segment(written=True)
    both.image = b"x"  # a oneof: the last one set wins
    assert both.WhichOneof("picture") == "image" and not both.written
    assert Segment().WhichOneof("picture") is None
    assert set(Segment.DESCRIPTOR.fields_by_name) == {"caption", "caption_ids", "written", "image"}


@pytest.mark.parametrize(
    "request_kwargs,field",
    [
        (dict(caption=""), "caption"),
        (dict(caption="x", segments=26), "segments"),
        (dict(caption="x", temperature=-1), "sampling.temperature"),
        (dict(caption="x", guidance=float("nan")), "rendering.guidance"),
        (dict(caption="x", story_so_far=[("", True)]), "story_so_far[0].caption"),
        (dict(caption="x", story_so_far=[("a", True), ("b", False)]), "story_so_far[1].picture"),
        (dict(caption="x", story_so_far=[("a", b"")]), "story_so_far[0].image"),
        (dict(caption="x", story_so_far=[("a", b"x" * ((8 << 20) + 1))]), "story_so_far[0].image"),
        (dict(caption="x", image=b"x" * ((8 << 20) + 1)), "start_image"),
    ],
)
def test_each_bad_field_is_named(request_kwargs, field):
    with pytest.raises(InputError) as err:
        check_request(build_request(**request_kwargs), StoryLimits())
    assert err.value.field == field and str(err.value).startswith(field + ":")


def test_written_false_is_no_picture():
    from seedstory_client.v1.story_pb2 import Segment, StoryRequest

    with pytest.raises(InputError) as err:
        check_request(
            StoryRequest(caption="x", story_so_far=[Segment(caption="a", written=False)]), StoryLimits()
        )
    assert err.value.field == "story_so_far[0].picture"


def test_a_continued_story_may_leave_its_next_caption_to_the_mllm():
    from seedstory_client.v1.story_pb2 import Segment, StoryRequest

    earlier = Segment(caption_ids=[300, 301], written=True)  # exact ids stand in for the text
    spec = check_request(StoryRequest(story_so_far=[earlier]), StoryLimits())
    assert spec.caption == "" and spec.caption_ids == []
    assert spec.story_so_far == [{"caption": "", "caption_ids": [300, 301], "image": None}]
    with pytest.raises(InputError) as err:  # a start image is the opening caption's picture: it needs one
        check_request(StoryRequest(story_so_far=[earlier], start_image=b"\x89PNG"), StoryLimits())
    assert err.value.field == "caption"


def test_the_image_event_carries_the_features_in_the_wire_layout():
    import numpy as np

    from actors.features import from_bytes, to_bytes
    from seedstory_client.v1.story_pb2 import ImageEvent

    features = np.random.default_rng(0).standard_normal((16, 64), dtype=np.float32)
    event = ImageEvent.FromString(
        ImageEvent(index=0, features=to_bytes(features), feature_rows=16, feature_dim=64).SerializeToString()
    )
    assert len(event.features) == 16 * 64 * 4
    np.testing.assert_array_equal(from_bytes(event.features, event.feature_rows, event.feature_dim), features)
    assert {f.name: f.number for f in ImageEvent.DESCRIPTOR.fields} == {
        "index": 1,
        "png": 2,
        "width": 4,
        "height": 5,
        "features_at": 6,
        "render_start": 7,
        "render_end": 8,
        "features": 9,
        "feature_rows": 10,
        "feature_dim": 11,
    }
