"""The story cluster end to end: a real local Ray, the real Serve app from ray_config.yaml, and
real gRPC over loopback (one app for the whole session, see conftest.story_service)."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from statuses import leaks

from actors.checkpoint import read_manifest
from seedstory_client import AsyncStoryClient, Story, StoryClient, build_request, write_story

OPENING = "Once upon a time, Milo the red circle walks in the park."


@pytest.fixture(scope="module")
def client(story_service):
    with StoryClient(story_service.target, story_service.token) as c:
        yield c


@pytest.fixture(scope="module")
def twelve(client):
    """One 12-segment story, shared by the tests that look at it from different sides."""
    return client.generate(OPENING, 12, seed=3, steps=10)


def kv_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("MLLMPool", "seedstory").kv_stats.remote().result()


def wait_idle(timeout: float = 60) -> dict:
    """KV stats once no story runs in the engine (cancellations land asynchronously)."""
    deadline = time.time() + timeout
    while True:
        stats = kv_stats()
        if stats["running_stories"] == 0 or time.time() > deadline:
            return stats
        time.sleep(0.2)


def png_bytes(size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format="PNG")
    return buf.getvalue()


# -- the story -------------------------------------------------------------------------------
def test_a_twelve_segment_story_arrives_complete_and_in_order(twelve, tiny_ckpt):
    manifest = read_manifest(tiny_ckpt)
    assert twelve.complete  # Story.add raised if any event came out of order
    assert [s.index for s in twelve.segments] == list(range(12))
    assert twelve.segments[0].caption == OPENING
    assert all(s.caption for s in twelve.segments[1:])
    for seg in twelve.segments:
        img = Image.open(io.BytesIO(seg.png))
        assert img.format == "PNG" and img.size == (manifest.preset.image_size,) * 2
        q, d = manifest.num_queries, manifest.feature_dim
        assert (seg.feature_rows, seg.feature_dim, len(seg.features)) == (q, d, q * d * 4)
        assert np.isfinite(np.frombuffer(seg.features, "<f4")).all()
    s = twelve.stats
    assert s["prompt_tokens"] > 0 and s["output_tokens"] > 12 * manifest.num_queries
    assert 0 < s["peak_kv_blocks"] and s["kv_block_bytes"] > 0
    assert s["total_s"] >= s["mllm_s"] > 0 and s["render_s"] > 0


def test_pictures_render_while_the_next_caption_is_written(twelve):
    """Picture k's render starts once its features exist, and before caption k+1 is final unless
    the renderer was still drawing an earlier picture then: a backlog when rendering is slower
    than writing, never a wait for the story."""
    segs = twelve.segments
    for k in range(len(segs) - 1):
        after = segs[k + 1].written_at
        backlog = any(s.render_end > after for s in segs[:k])
        assert segs[k].features_at <= segs[k].render_start, f"segment {k}"
        assert segs[k].render_start < after or backlog, f"segment {k}"
    # So the story takes less than its stages would one after the other.
    busy = twelve.stats["mllm_s"] + sum(s.render_end - s.render_start for s in segs)
    assert twelve.stats["total_s"] < busy


def test_the_story_page_loads_every_image_in_headless_chromium(twelve, tmp_path):
    from playwright.sync_api import sync_playwright

    page_path = write_story(tmp_path / "story", twelve)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        captions = page.evaluate("[...document.querySelectorAll('figcaption')].map(f => f.textContent)")
        browser.close()
    assert len(images) == 12 and all(ok and w > 0 and h > 0 for ok, w, h in images)
    assert captions[0].endswith(OPENING)


def test_story_json_names_the_model_never_its_path(story_service, tiny_ckpt, tmp_path):
    from actors.checkpoint import checkpoint_name
    from cluster.demo import EMBEDDED_CHECKPOINT
    from seedstory_client.cli import generate_story

    # As the demo writes it: the checkpoint's name, from its card, else its folder.
    assert checkpoint_name(EMBEDDED_CHECKPOINT) == "seedstory tiny checkpoint"
    generate_story(
        story_service.target,
        OPENING,
        1,
        tmp_path,
        token=story_service.token,
        steps=2,
        source=checkpoint_name(tiny_ckpt),
    )
    story = json.loads((tmp_path / "story.json").read_text())
    assert story["source"] == "tiny"  # the session's random-init checkpoint has no card
    strings = [v for v in _leaves(story) if isinstance(v, str)]
    assert not [v for v in strings if v.startswith("/") or str(tiny_ckpt.parent) in v], strings


def _leaves(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_a_story_continues_from_the_story_so_far_and_a_start_image(client, tiny_ckpt):
    # Pictures the service wrote (their ids recompute them) beside one given as image bytes; the
    # captions are a person's (a random-init model's captions need not re-encode within the budget).
    so_far = [
        ("Milo walks in the park 0.", True),
        ("Milo walks in the park 1.", png_bytes((48, 40))),
        ("Milo walks in the park 2.", True),
    ]
    story = client.generate("Milo rests.", 2, png_bytes(), story_so_far=so_far, seed=1, steps=4)
    assert story.complete and len(story.segments) == 2
    # With the opening's picture given, every caption in the answer is the model's own.
    assert story.segments[0].caption != "Milo rests."
    assert story.stats["prompt_tokens"] > 4 * read_manifest(tiny_ckpt).num_queries


def test_a_given_picture_is_part_of_the_prompt(client):
    """The same story so far with a given picture in place of a written one is another prompt: the
    picture's features enter at its query rows (greedy, so only the prompt differs)."""

    def story(picture):
        so_far = [("Milo walks in the park.", picture)]
        return client.generate("Milo rests.", 1, story_so_far=so_far, temperature=0.0, render_seed=2, steps=2)

    written, given, again = story(True), story(png_bytes()), story(png_bytes())
    assert [s.features for s in given.segments] == [s.features for s in again.segments]
    assert given.stats["prompt_tokens"] == written.stats["prompt_tokens"]  # the same ids
    assert [s.features for s in given.segments] != [s.features for s in written.segments]


def test_the_async_client_gets_the_same_story_for_the_same_seeds(story_service, client):
    import asyncio

    async def run():
        async with AsyncStoryClient(story_service.target, story_service.token) as c:
            return await c.generate(OPENING, 2, seed=5, render_seed=5, steps=4)

    a = asyncio.run(run())
    b = client.generate(OPENING, 2, seed=5, render_seed=5, steps=4)
    assert [s.caption for s in a.segments] == [s.caption for s in b.segments]
    assert [s.features for s in a.segments] == [s.features for s in b.segments]
    assert [s.png for s in a.segments] == [s.png for s in b.segments]


# -- renders that do not depend on their batch -----------------------------------------------------
def test_a_picture_renders_the_same_alone_and_in_a_batch_beside_others(story_service, tiny_ckpt):
    """The DetokenizerPool batches concurrent pictures into fixed-shape calls (render_slots): a
    picture sent again after a lost replica, or beside other stories, must be the same PNG."""
    from ray import serve

    manifest = read_manifest(tiny_ckpt)
    shape, draw = (manifest.num_queries, manifest.feature_dim), np.random.default_rng(3)
    pool = serve.get_deployment_handle("DetokenizerPool", "seedstory")
    canary = {
        "features": draw.standard_normal(shape, dtype=np.float32),
        "steps": 4,
        "guidance": 5.0,
        "seed": 21,
    }
    alone = pool.render.remote(canary).result()
    others = [
        {**canary, "features": draw.standard_normal(shape, dtype=np.float32), "seed": i} for i in range(4)
    ]
    crowd = [pool.render.remote(job) for pair in zip([canary] * 4, others) for job in pair]
    canaries = [response.result() for response in crowd[::2]]
    assert max(result["batch"] for result in canaries) > 1  # some canary shared a pipeline call
    assert all(result["png"] == alone["png"] for result in canaries)
    assert len({response.result()["png"] for response in crowd[1::2]}) == 4


def test_a_story_draws_the_same_pngs_alone_and_beside_another_story(client):
    from concurrent.futures import ThreadPoolExecutor

    def story(seed: int):
        return client.generate(OPENING, 3, seed=seed, render_seed=seed, steps=4)

    alone = story(11)
    with ThreadPoolExecutor(2) as pool:
        crowded, other = pool.submit(story, 11), pool.submit(story, 12)
        crowded, other = crowded.result(), other.result()
    assert [s.caption for s in crowded.segments] == [s.caption for s in alone.segments]
    for a, c in zip(alone.segments, crowded.segments):
        # The MLLM's batch moves features by float rounding only (docs/serving.md#when-a-replica-is-lost)...
        np.testing.assert_allclose(*(np.frombuffer(s.features, "<f4") for s in (c, a)), atol=1e-5)
        if a.features == c.features:  # ... and a picture depends on its features and seed alone
            assert a.png == c.png
    assert [s.png for s in other.segments] != [s.png for s in alone.segments]


# -- bad input -------------------------------------------------------------------------------
def _bomb() -> bytes:
    return png_bytes((5000, 5000), "L")  # 25 M pixels of zeros in a few KB of PNG


BAD = [
    ("empty caption", dict(caption="  "), "caption"),
    ("long caption", dict(caption="Milo " * 100), "caption"),
    ("caption past the model's token budget", dict(caption="Milo walks. " * 30), "caption"),
    ("too many segments", dict(segments=26), "segments"),
    ("negative segments", dict(segments=-1), "segments"),
    ("not an image", dict(image=b"this is not a picture"), "start_image"),
    ("truncated image", dict(image=png_bytes()[:40]), "start_image"),
    ("decompression bomb", dict(image=_bomb()), "start_image"),
    ("top_p", dict(top_p=1.5), "sampling.top_p"),
    ("steps", dict(steps=1000), "rendering.steps"),
    (
        "no picture",
        dict(story_so_far=[("Milo walks.", True), ("Milo sits.", False)]),
        "story_so_far[1].picture",
    ),
    (
        "given picture not an image",
        dict(story_so_far=[("Milo walks.", b"not a picture")]),
        "story_so_far[0].image",
    ),
    (
        "given picture a bomb",
        dict(story_so_far=[("Milo walks.", True), ("Milo sits.", _bomb())]),
        "story_so_far[1].image",
    ),
]


def _bad_request(tiny_ckpt, caption=OPENING, segments=2, image=None, story_so_far=(), **options):
    return build_request(caption, segments, image, story_so_far=story_so_far, **options)


@pytest.mark.parametrize("case,fields,field", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_invalid_argument_naming_the_field(client, tiny_ckpt, case, fields, field):
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream(_bad_request(tiny_ckpt, **fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert not leaks(err.value.details()), err.value.details()


def test_after_a_burst_of_bad_input_nothing_leaked_and_the_service_still_serves(client, tiny_ckpt):
    baseline = wait_idle()
    threads = [
        threading.Thread(target=lambda f=f: _swallow(client, _bad_request(tiny_ckpt, **f)))
        for _, f, _ in BAD * 2
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = wait_idle()
    assert after["blocks_in_use"] == baseline["blocks_in_use"]
    assert after["running_stories"] == 0
    assert client.generate(OPENING, 1, steps=2).complete


def test_a_bad_request_logs_one_line_and_no_traceback(client, tiny_ckpt):
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream(_bad_request(tiny_ckpt, caption="  ")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "caption: is empty"
    replica, proxy = _serve_log_records(dict(err.value.trailing_metadata())["request_id"])
    assert not [r for r in replica + proxy if "Traceback" in r or r.startswith("ERROR")], replica + proxy
    [line] = [r for r in replica if "INVALID_ARGUMENT" in r]  # one line: story id, code and reason
    assert re.search(r"story [0-9a-f]{16}: INVALID_ARGUMENT: caption: is empty$", line), line


def _serve_log_records(request_id: str, timeout: float = 30) -> tuple[list[str], list[str]]:
    """The records (a line, and any traceback under it) that the ingress replica and the proxy
    logged for one request, once both have written their access line for it."""
    import ray

    ctx = ray.get_runtime_context()
    logs = Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs" / "serve"
    deadline = time.time() + timeout
    while True:
        found = [
            [r for f in sorted(logs.glob(pattern)) for r in _records(f.read_text()) if request_id in r]
            for pattern in ("replica_seedstory_StoryIngress_*.log", "proxy_*.log")
        ]
        if (
            all(any("GenerateStory" in r or " CALL " in r for r in rs) for rs in found)
            or time.time() > deadline
        ):
            return found[0], found[1]
        time.sleep(0.2)


def _records(text: str) -> list[str]:
    """Serve's log text, one string per record: a record starts with its level."""
    return [
        r.rstrip() for r in re.split(r"\n(?=(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-)", text) if r.strip()
    ]


def _swallow(client, request) -> None:
    try:
        list(client.stream(request))
    except grpc.RpcError:
        pass


def test_a_missing_token_is_unauthenticated(story_service):
    with StoryClient(story_service.target) as anonymous, pytest.raises(grpc.RpcError) as err:
        list(anonymous.stream(build_request(OPENING, 1)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- cancellation, deadlines, admission ----------------------------------------------------------
def _first_events(call, n: int) -> list:
    it = iter(call)
    return [next(it) for _ in range(n)]


def test_a_cancelled_story_frees_its_kv_blocks(client):
    baseline = wait_idle()
    call = client.stream(build_request(OPENING, 25, steps=2))
    _first_events(call, 3)
    assert kv_stats()["blocks_in_use"] > baseline["blocks_in_use"]  # the story holds blocks now
    call.cancel()
    after = wait_idle(30)
    assert after["running_stories"] == 0 and after["blocks_in_use"] == baseline["blocks_in_use"]


def test_a_deadline_gives_deadline_exceeded_and_frees_the_blocks(client):
    baseline = wait_idle()
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream(build_request(OPENING, 25, steps=2), timeout=2.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = wait_idle(30)
    assert after["running_stories"] == 0 and after["blocks_in_use"] == baseline["blocks_in_use"]


def test_admission_refuses_stories_beyond_the_replica_limit(client, story_service):
    limit = story_service.config["applications"][0]["args"]["max_stories_per_replica"]
    calls = [client.stream(build_request(OPENING, 25, steps=2)) for _ in range(limit)]
    try:
        for call in calls:
            _first_events(call, 1)  # admitted and running
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream(build_request(OPENING, 1)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 2" in err.value.details()
    finally:
        for call in calls:
            call.cancel()
    assert wait_idle(30)["running_stories"] == 0
    assert client.generate(OPENING, 1, steps=2).complete  # admitted again once they are gone


def test_a_story_object_rejects_events_out_of_order():
    from seedstory_client.v1.story_pb2 import CaptionEvent, ImageEvent, StoryEvent

    story = Story()
    story.add(StoryEvent(caption=CaptionEvent(index=0, caption="a")))
    with pytest.raises(ValueError):
        story.add(StoryEvent(image=ImageEvent(index=1, png=b"x")))
    with pytest.raises(ValueError):
        story.add(StoryEvent(caption=CaptionEvent(index=2, caption="c")))
