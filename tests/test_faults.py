"""A story survives the loss of a pool replica (cluster/recovery.py, cluster/ingress.py).

Real Serve, real gRPC, real replicas killed with ``ray.kill`` while a story streams. Stories are
greedy with fixed render seeds, so a disturbed story must equal an undisturbed one event for
event, each segment once and in order. A lost de-tokenizer costs nothing: the renders are sent
again, and a picture depends only on its features and seed (``exact_renders``), so every PNG is
the same. A lost MLLM replica: the story resumes from its own tokens (and the given pictures'
features), so its token ids are the same; the features of the pictures written after the resume
are the same to float rounding only (``assert_resumed``). The session's service allows one resume
per story and pool (conftest.story_service).
"""

from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
from PIL import Image
from statuses import leaks

from seedstory_client import StoryClient, build_request
from seedstory_client.v1.story_pb2 import Segment

OPENING = "Once upon a time, Bea the blue square runs in the forest."
SEGMENTS = 8


@pytest.fixture(scope="module")
def client(story_service):
    with StoryClient(story_service.target, story_service.token) as c:
        yield c
    wait_healthy()  # leave the session's service whole for the modules after this one


def request(segments: int = SEGMENTS, **options):
    return build_request(OPENING, segments, temperature=0.0, render_seed=11, steps=8, **options)


@pytest.fixture(scope="module")
def undisturbed(client):
    events, error = run(client, request())
    assert error is None
    return segments(events)


def run(client, req, on_event=lambda ev: None) -> tuple[list, grpc.RpcError | None]:
    """All events of one story, and the error that ended it (None: it completed)."""
    events = []
    try:
        for ev in client.stream(req, timeout=600):
            events.append(ev)
            on_event(ev)
    except grpc.RpcError as e:
        return events, e
    return events, None


def segments(events) -> list[tuple]:
    """(index, caption ids, features, png) per segment, checking each caption and picture came once, in
    order, with finite features."""
    captions = [ev.caption for ev in events if ev.WhichOneof("event") == "caption"]
    images = [ev.image for ev in events if ev.WhichOneof("event") == "image"]
    assert [c.index for c in captions] == list(range(len(captions)))
    assert [i.index for i in images] == list(range(len(images)))
    assert all(np.isfinite(np.frombuffer(i.features, "<f4")).all() and i.features for i in images)
    return [(c.index, list(c.caption_ids), i.features, i.png) for c, i in zip(captions, images)]


FEATURE_ATOL = 1e-5  # measured: at most 3e-7 apart after a resume on the tiny checkpoint (CPU)


def assert_resumed(got: list[tuple], want: list[tuple], exact: int = 0) -> None:
    """A story the MLLM resumed on another replica against the undisturbed one. The same segments
    and token ids, exactly; the same features to float rounding: the new replica recomputes the
    story so far in one prefill, whose kernels do not round as the decode steps that first wrote it
    did, and the pictures written after that read its KV cache. Where the features are the same to
    the bit (the first ``exact`` pictures were written before the loss: always), so is the PNG."""
    assert [s[:2] for s in got] == [s[:2] for s in want]
    for (index, _, features, png), (_, _, features0, png0) in zip(got, want):
        np.testing.assert_allclose(
            np.frombuffer(features, "<f4"),
            np.frombuffer(features0, "<f4"),
            rtol=0,
            atol=FEATURE_ATOL,
            err_msg=f"segment {index}",
        )
        assert features == features0 or index >= exact, f"segment {index} was written before the loss"
        assert png == png0 or features != features0, f"segment {index}: the same features, another PNG"


def stats(events):
    [done] = [ev.done for ev in events if ev.WhichOneof("event") == "done"]
    return done


def replica(deployment: str) -> str:
    """The name of the pool's one live replica actor (Serve names them app#deployment#suffix)."""
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"seedstory#{deployment}#" in a["name"]
    ]
    assert len(names) == 1, names
    return names[0]


def kill(deployment: str) -> None:
    import ray

    ray.kill(ray.get_actor(replica(deployment), namespace="serve"), no_restart=True)


def wait_healthy(timeout: float = 300) -> None:
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        deployments = serve.status().applications["seedstory"].deployments
        if all(d.status == "HEALTHY" for d in deployments.values()):
            return
        time.sleep(1)
    raise TimeoutError(f"the service is not healthy after {timeout}s")


def kill_when(deployment: str, kind: str, index: int):
    """An on_event hook: kill the pool's replica once event `kind` number `index` has arrived."""
    killed = []

    def hook(ev) -> None:
        if not killed and ev.WhichOneof("event") == kind and getattr(ev, kind).index == index:
            kill(deployment)
            killed.append(time.time())

    return hook, killed


def kv_blocks_in_use() -> int:
    from ray import serve

    return serve.get_deployment_handle("MLLMPool", "seedstory").kv_stats.remote().result()["blocks_in_use"]


# -- the tests ------------------------------------------------------------------------------------
def test_a_story_goes_on_when_its_mllm_replica_is_killed(client, undisturbed):
    old = replica("MLLMPool")
    hook, killed = kill_when("MLLMPool", "caption", 1)  # the MLLM is writing picture 1
    events, error = run(client, request(), hook)
    assert killed and error is None, error
    assert_resumed(segments(events), undisturbed, exact=1)  # the resume continued from the story's tokens
    assert stats(events).resumes == 1
    assert replica("MLLMPool") != old  # a new replica wrote the rest
    assert kv_blocks_in_use() == 0  # ... and holds nothing once the story ended


def test_a_story_from_a_given_picture_resumes_with_that_pictures_features(client):
    """The resume sends the given picture's features again, at the same positions, with the prompt
    plus the tokens written: the story equals the undisturbed one."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (30, 60, 200)).save(buf, format="PNG")
    start = request(4, image=buf.getvalue())
    alone, error = run(client, start)
    assert error is None, error
    hook, killed = kill_when("MLLMPool", "caption", 1)
    events, error = run(client, start, hook)
    assert killed and error is None, error
    assert_resumed(segments(events), segments(alone), exact=1)
    assert stats(events).resumes == 1
    assert kv_blocks_in_use() == 0


def test_a_story_goes_on_when_its_detokenizer_replica_is_killed(client, undisturbed):
    hook, killed = kill_when("DetokenizerPool", "caption", 2)
    events, error = run(client, request(), hook)
    assert killed and error is None, error
    assert segments(events) == undisturbed  # PNG bytes equal: a picture depends on its features and seed only


def test_a_broken_engine_fails_its_health_check_and_the_story_resumes(client, undisturbed):
    from ray import serve

    old = replica("MLLMPool")
    serve.get_deployment_handle("MLLMPool", "seedstory").arm_fault.remote(40).result()  # the 40th step raises
    events, error = run(client, request())
    assert error is None, error
    assert_resumed(segments(events), undisturbed)
    assert stats(events).resumes == 1
    assert replica("MLLMPool") != old  # Serve replaced the broken replica


def test_past_max_resumes_the_story_ends_unavailable_and_continues_from_what_arrived(client, undisturbed):
    kills = []

    def hook(ev) -> None:  # kill the MLLM replica after caption 1, and the new one after caption 4
        if ev.WhichOneof("event") == "caption" and ev.caption.index in (1, 4) and len(kills) < 2:
            kill("MLLMPool")
            kills.append(ev.caption.index)

    events, error = run(client, request(), hook)
    assert kills == [1, 4]
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("mllm: replica lost 2 times"), error.details()
    assert not leaks(error.details()), error.details()
    got = segments(events)
    assert 3 <= len(got) < SEGMENTS
    assert_resumed(got, undisturbed[: len(got)], exact=1)
    # Everything that arrived is exact: continue with it (ids, not text) and get the rest.
    wait_healthy()
    so_far = [Segment(caption_ids=ids, written=True) for _, ids, _, _ in got]  # recomputed from the ids
    rest_req = request(SEGMENTS - len(got))
    rest_req.caption, rest_req.rendering.seed = "", 11 + len(got)
    del rest_req.story_so_far[:]
    rest_req.story_so_far.extend(so_far)
    rest, error = run(client, rest_req)
    assert error is None, error
    renumbered = [(index + len(got), *s) for index, *s in segments(rest)]
    assert_resumed(renumbered, undisturbed[len(got) :])


def test_a_failed_render_ends_the_story_at_once_with_a_clean_internal_status(client):
    from ray import serve

    serve.get_deployment_handle("DetokenizerPool", "seedstory").arm_fault.remote(1).result()
    events, error = run(client, request(SEGMENTS * 3))  # long enough that the writing is far from done
    assert error is not None and error.code() == grpc.StatusCode.INTERNAL
    assert "failed inside the service" in error.details() and not leaks(error.details()), error.details()
    captions = [ev for ev in events if ev.WhichOneof("event") == "caption"]
    assert len(captions) < SEGMENTS * 3  # it ended when the render failed, not after the writing
    deadline = time.time() + 30
    while kv_blocks_in_use() and time.time() < deadline:  # the MLLM stream was cancelled: blocks return
        time.sleep(0.2)
    assert kv_blocks_in_use() == 0


def test_a_client_with_resume_continues_a_story_whose_ingress_replica_died(story_service, undisturbed):
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("seedstory_client").addHandler(handler)
    killed = []

    def on_event(ev) -> None:
        if not killed and ev.WhichOneof("event") == "caption" and ev.caption.index == 2:
            kill("StoryIngress")
            killed.append(ev.caption.index)

    try:
        with StoryClient(story_service.target, story_service.token) as c:
            story = c.generate(
                OPENING,
                SEGMENTS,
                temperature=0.0,
                render_seed=11,
                steps=8,
                on_event=on_event,
                resume=True,
                timeout=600,
            )
    finally:
        logging.getLogger("seedstory_client").removeHandler(handler)
    assert killed and story.complete and story.resumes == 1, seen
    got = [(s.index, s.caption_ids, s.features, s.png) for s in story.segments]
    assert_resumed(got, undisturbed)  # the continuation carried exact ids: the same story
    assert seen and not any(leaks(m) for m in seen), seen  # what the client was told when the ingress died
