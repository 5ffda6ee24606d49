"""The gRPC API's stubs and the request checks, without a cluster."""

from __future__ import annotations

import pytest

from cluster.api import STUBS, generate
from cluster.client import build_request
from cluster.requests import InvalidRequest, StoryLimits, check_request


def test_generated_stubs_match_the_proto(tmp_path):
    from cluster.api import ROOT

    fresh = generate(tmp_path)
    for path in fresh:
        committed = ROOT / "cluster" / "api" / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale: run `python -m cluster.api`"
    assert {p.name for p in fresh} == set(STUBS)


def test_a_good_request_becomes_a_plain_spec_with_the_servers_defaults():
    limits = StoryLimits()
    spec = check_request(build_request("  Milo walks.  ", story_so_far=[("Milo sits.", [1] * 16)]), limits, 16, 256)
    assert spec.caption == "Milo walks." and spec.segments == limits.default_segments
    assert spec.steps == limits.default_steps and spec.guidance == limits.default_guidance
    assert spec.sampling == {"temperature": pytest.approx(0.8), "top_p": pytest.approx(0.95), "seed": None}
    assert spec.start_image is None and spec.story_so_far == [{"caption": "Milo sits.", "visual_codes": [1] * 16}]


@pytest.mark.parametrize("request_kwargs,field", [
    (dict(caption=""), "caption"),
    (dict(caption="x", segments=26), "segments"),
    (dict(caption="x", temperature=-1), "sampling.temperature"),
    (dict(caption="x", guidance=float("nan")), "rendering.guidance"),
    (dict(caption="x", story_so_far=[("", [1] * 16)]), "story_so_far[0].caption"),
    (dict(caption="x", story_so_far=[("a", [1] * 15)]), "story_so_far[0].visual_codes"),
    (dict(caption="x", story_so_far=[("a", [256] * 16)]), "story_so_far[0].visual_codes"),
])
def test_each_bad_field_is_named(request_kwargs, field):
    with pytest.raises(InvalidRequest) as err:
        check_request(build_request(**request_kwargs), StoryLimits(), 16, 256)
    assert err.value.field == field and str(err.value).startswith(field + ":")
