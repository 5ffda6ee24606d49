"""The client package (clients/python): what it may depend on, a story cut short midway, a story
continued after the service lost it (in memory and from a folder), and a fresh virtual environment
with only the client in it writing a story from the session's service."""

from __future__ import annotations

import ast
import asyncio
import base64
import importlib.metadata
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from actors.checkpoint import read_manifest
from seedstory_client import (
    AsyncStoryClient,
    CannotContinue,
    Story,
    StoryClient,
    StoryStreamError,
    __version__,
    build_request,
    continuation_request,
    read_story,
)
from seedstory_client import client as client_module
from seedstory_client.v1 import story_pb2, story_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "python"
OPENING = "Once upon a time, Milo the red circle walks in the park."
HEAVY = ("torch", "ray", "vllm", "transformers", "diffusers")


# -- what the package is made of ---------------------------------------------------------------
def test_the_client_imports_only_the_standard_library_grpc_and_protobuf():
    mods = set()
    for f in (CLIENT / "seedstory_client").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
    assert mods - set(sys.stdlib_module_names) == {"grpc", "google", "seedstory_client"}


def test_the_client_declares_grpcio_and_protobuf_and_the_server_depends_on_it():
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert client["name"] == "seedstory-client"
    assert {_name(d) for d in client["dependencies"]} == {"grpcio", "protobuf"}
    # The server names it as a plain requirement, which the installed local package satisfies.
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [req] = [d for d in server["dependencies"] if _name(d) == "seedstory-client"]
    assert req == "seedstory-client>=1.0,<2" and __version__.startswith("1.")
    assert importlib.metadata.version("seedstory-client") == __version__


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()


@pytest.mark.parametrize(
    "argv",
    [
        [
            "generate",
            "--prompt",
            "p",
            "--image",
            "a.png",
            "--segments",
            "3",
            "--out",
            "o",
            "--target",
            "h:1",
            "--token",
            "t",
            "--seed",
            "2",
            "--steps",
            "4",
            "--temperature",
            "0.5",
        ],
        ["generate", "--continue", "d", "--target", "h:1", "--no-resume"],
    ],
)
def test_seedstory_generate_takes_the_client_commands_options(argv):
    from cluster.cli import parser as server_parser
    from seedstory_client.cli import parser as client_parser

    server = vars(server_parser().parse_args(argv))
    server.pop("func")
    assert server == vars(client_parser().parse_args(argv))


# -- a story cut short midway keeps what arrived -----------------------------------------------------
class CutShort(story_pb2_grpc.StoryServiceServicer):
    """Two captions and the first picture, then OUT_OF_RANGE, as the real service ends a story the
    MLLM's length limit truncated (an event with the story id only, then the status)."""

    def GenerateStory(self, request, context):
        yield story_pb2.StoryEvent(
            story_id="s1", caption=story_pb2.CaptionEvent(index=0, caption=request.caption)
        )
        yield story_pb2.StoryEvent(story_id="s1", image=_image_event(0, b"png0", FEATURES0))
        yield story_pb2.StoryEvent(
            story_id="s1", caption=story_pb2.CaptionEvent(index=1, caption="Milo sits.")
        )
        yield story_pb2.StoryEvent(story_id="s1")
        context.abort(grpc.StatusCode.OUT_OF_RANGE, "story: cut short")


FEATURES0 = struct.pack("<4f", 0.5, -0.5, 0.25, 1.0)  # 2 rows of 2 little-endian float32


def _image_event(index: int, png: bytes, features: bytes) -> story_pb2.ImageEvent:
    return story_pb2.ImageEvent(index=index, png=png, features=features, feature_rows=2, feature_dim=2)


def _serve(servicer) -> tuple[grpc.Server, str]:
    """A scripted StoryService on loopback: it tests the client's side of the protocol, not the server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    story_pb2_grpc.add_StoryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cut_short():
    server, target = _serve(CutShort())
    yield target
    server.stop(None)


def _check_partial(err: StoryStreamError) -> None:
    assert isinstance(err, grpc.RpcError)  # callers that caught RpcError still do
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and err.details() == "story: cut short"
    story = err.story
    assert story.story_id == "s1" and not story.complete
    assert [(s.caption, s.png, s.features, s.feature_rows, s.feature_dim) for s in story.segments] == [
        (OPENING, b"png0", FEATURES0, 2, 2),
        ("Milo sits.", b"", b"", 0, 0),
    ]


def test_a_failed_stream_raises_with_the_partial_story(cut_short):
    with StoryClient(cut_short) as client, pytest.raises(StoryStreamError) as err:
        client.generate(OPENING, 4)
    _check_partial(err.value)


def test_the_async_client_raises_with_the_partial_story_too(cut_short):
    async def run():
        async with AsyncStoryClient(cut_short) as client:
            await client.generate(OPENING, 4)

    with pytest.raises(StoryStreamError) as err:
        asyncio.run(run())
    _check_partial(err.value)


def test_the_command_writes_what_arrived_then_fails(cut_short, tmp_path, capsys):
    from seedstory_client.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "generate",
                "--target",
                cut_short,
                "--prompt",
                OPENING,
                "--segments",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
    assert exit_.value.code == 1
    assert "answered OUT_OF_RANGE: story: cut short" in capsys.readouterr().err
    story = json.loads((tmp_path / "story.json").read_text())
    assert [(s["caption"], s["image"]) for s in story["segments"]] == [
        (OPENING, "segment_000.png"),
        ("Milo sits.", None),
    ]  # the second picture never came
    assert (tmp_path / "segment_000.png").read_bytes() == b"png0"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["segment_000.png"]


# -- a story the service loses midway is continued exactly ------------------------------------------
LOST = "mllm: replica lost 3 times"


def _part(j: int) -> tuple[str, list[int], bytes, bytes]:
    """Segment j of the one story the scripted service knows: caption, caption ids, features (2 x 2
    float32), picture."""
    features = struct.pack("<4f", j, j + 0.5, -j, 1.0)
    return (OPENING if j == 0 else f"Part {j}.", [10 + j, 20 + j], features, f"png{j}".encode())


def _caption(story_id: str, index: int, j: int) -> story_pb2.StoryEvent:
    text, ids, _, _ = _part(j)
    return story_pb2.StoryEvent(
        story_id=story_id, caption=story_pb2.CaptionEvent(index=index, caption=text, caption_ids=ids)
    )


def _image(story_id: str, index: int, j: int) -> story_pb2.StoryEvent:
    _, _, features, png = _part(j)
    return story_pb2.StoryEvent(story_id=story_id, image=_image_event(index, png, features))


class Lossy(story_pb2_grpc.StoryServiceServicer):
    """Serves the story of `_part`s from wherever the request's story so far ends, in the real order
    (caption k+1 before picture k). Call n fails as ``failures[n]`` says: (status, events sent before
    it). Records every request."""

    def __init__(self, *failures: tuple[grpc.StatusCode, int]):
        self.failures, self.requests = list(failures), []

    def GenerateStory(self, request, context):
        self.requests.append(request)
        sid, start, n = f"s{len(self.requests)}", len(request.story_so_far), request.segments
        code, cut = self.failures.pop(0) if self.failures else (None, None)
        order = [(_caption, 0)]
        for k in range(n):
            order += [(_caption, k + 1), (_image, k)] if k + 1 < n else [(_image, k)]
        for sent, (event, k) in enumerate(order):
            if sent == cut:
                context.abort(code, LOST if code == grpc.StatusCode.UNAVAILABLE else "story_so_far: too long")
            yield event(sid, k, start + k)
        yield story_pb2.StoryEvent(story_id=sid, done=story_pb2.StoryStats(output_tokens=7))


@pytest.fixture
def lossy(monkeypatch):
    """Starts a `Lossy` service: ``lossy(*failures)`` -> the servicer, with its ``target``."""
    monkeypatch.setattr(client_module, "RESUME_DELAY_S", 0.0)  # no back-off between scripted failures
    servers = []

    def start(*failures):
        service = Lossy(*failures)
        server, service.target = _serve(service)
        servers.append(server)
        return service

    yield start
    for server in servers:
        server.stop(None)


def _generate(target: str, use_async: bool, *args, **kwargs) -> Story:
    if not use_async:
        with StoryClient(target) as client:
            return client.generate(*args, **kwargs)

    async def run():
        async with AsyncStoryClient(target) as client:
            return await client.generate(*args, **kwargs)

    return asyncio.run(run())


def _so_far(*parts: int) -> list[story_pb2.Segment]:
    """Earlier segments as a continuation sends them: exact caption ids (no text), and pictures the
    service wrote (it recomputes them from the ids)."""
    return [story_pb2.Segment(caption_ids=_part(j)[1], written=True) for j in parts]


def _continuation(
    parts_done: int, pending: int | None, segments: int, render_seed: int | None, **options
) -> story_pb2.StoryRequest:
    """The request that continues `_part`s 0..parts_done-1, as the client must send it."""
    request = build_request("", segments, render_seed=render_seed, **options)
    request.caption_ids.extend(_part(pending)[1] if pending is not None else [])
    request.story_so_far.extend(_so_far(*range(parts_done)))
    return request


def _check_story(story: Story, pictures: int, pending: int = 0) -> None:
    """Every segment once, in order, exactly as the service wrote it; the last ``pending``
    without a picture."""
    assert [(s.index, s.caption, s.caption_ids, s.features, s.png) for s in story.segments] == [
        (j, *_part(j)) if j < pictures else (j, *_part(j)[:2], b"", b"") for j in range(pictures + pending)
    ]
    assert all((s.feature_rows, s.feature_dim) == ((2, 2) if s.png else (0, 0)) for s in story.segments)


OPTIONS = dict(temperature=0.5, top_p=0.9, seed=3, steps=4, guidance=2.0)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_lost_stream_is_continued_into_one_story(lossy, use_async):
    # Lost after pictures 0-1 with captions 2 and 3 pending (the continuation starts from caption 2 and
    # writes 3 again), then after picture 2 with caption 3 pending.
    service = lossy((grpc.StatusCode.UNAVAILABLE, 6), (grpc.StatusCode.UNAVAILABLE, 3))
    seen = []
    story = _generate(
        service.target,
        use_async,
        OPENING,
        5,
        resume=True,
        render_seed=100,
        on_event=lambda ev: seen.append((ev.WhichOneof("event"), ev.image.index)),
        **OPTIONS,
    )
    assert service.requests == [
        build_request(OPENING, 5, render_seed=100, **OPTIONS),
        _continuation(2, 2, 3, 102, **OPTIONS),  # picture i is rendered with seed + i
        _continuation(3, 3, 2, 103, **OPTIONS),
    ]
    _check_story(story, 5)
    assert story.complete and story.stats == {"output_tokens": 7}
    assert (story.story_id, story.continuation_ids, story.resumes) == ("s1", ["s2", "s3"], 2)
    # on_event sees each picture at its index in the whole story, once.
    assert [i for kind, i in seen if kind == "image"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_resuming_gives_up_after_max_resumes(lossy, use_async):
    service = lossy(*[(grpc.StatusCode.UNAVAILABLE, 3)] * 4)  # one picture per stream, then lost
    with pytest.raises(StoryStreamError) as err:
        _generate(service.target, use_async, OPENING, 6, resume=True, max_resumes=2)
    assert len(service.requests) == 3
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == LOST
    story = err.value.story
    assert story.resumes == 2 and story.pictures == 3 and not story.complete
    _check_story(story, 3, pending=1)


@pytest.mark.parametrize(
    "code,resume", [(grpc.StatusCode.UNAVAILABLE, False), (grpc.StatusCode.OUT_OF_RANGE, True)]
)
def test_only_a_lost_stream_is_resumed_and_only_when_asked(lossy, code, resume):
    service = lossy((code, 3))
    with pytest.raises(StoryStreamError) as err:
        _generate(service.target, False, OPENING, 4, resume=resume)
    assert len(service.requests) == 1 and err.value.code() == code and err.value.story.pictures == 1


def test_a_refused_continuation_raises_the_original_error_with_the_story(lossy):
    # The continuation would carry more story so far than the server takes: it answers INVALID_ARGUMENT.
    service = lossy((grpc.StatusCode.UNAVAILABLE, 5), (grpc.StatusCode.INVALID_ARGUMENT, 0))
    with pytest.raises(StoryStreamError) as err:
        _generate(service.target, False, OPENING, 5, resume=True)
    assert len(service.requests) == 2
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == LOST
    assert err.value.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT
    _check_story(err.value.story, 2, pending=1)


def _story_of(*events: story_pb2.StoryEvent, **request) -> Story:
    story = Story(request=build_request(OPENING, **request))
    for ev in events:
        story.add(ev)
    return story


def test_the_continuation_request():
    c0, c1, i0, i1 = _caption("s", 0, 0), _caption("s", 1, 1), _image("s", 0, 0), _image("s", 1, 1)
    earlier = [("Milo sits.", True), ("Bea runs.", b"\x89PNG bea")]
    # No caption pending: the MLLM writes the next one; no render seed stays none; the request's own
    # story so far goes first.
    story = _story_of(c0, c1, i0, i1, segments=4, seed=9, story_so_far=earlier)
    expected = build_request("", 2, seed=9, story_so_far=earlier)
    expected.story_so_far.extend(_so_far(0, 1))
    assert continuation_request(story) == expected and not expected.rendering.HasField("seed")
    # Nothing arrived, or no picture yet: the request itself.
    assert continuation_request(_story_of(segments=4)) == build_request(OPENING, 4)
    assert continuation_request(_story_of(c0, segments=4)) == build_request(OPENING, 4)
    # A server that gave no caption ids: the text stands in for them.
    plain = [
        story_pb2.StoryEvent(caption=story_pb2.CaptionEvent(index=k, caption=_part(k)[0])) for k in (0, 1)
    ]
    request = continuation_request(_story_of(plain[0], plain[1], i0, segments=3))
    assert (request.caption, request.caption_ids, request.story_so_far) == (
        "Part 1.",
        [],
        [story_pb2.Segment(caption=OPENING, written=True)],
    )
    # A story begun from a start image: the opening caption goes with it as an earlier segment, the
    # same image bytes (the service encodes them to features again).
    request = continuation_request(_story_of(c0, c1, i0, segments=4, image=b"\x89PNG start"))
    expected = build_request("", 3)
    expected.caption_ids.extend(_part(1)[1])
    expected.story_so_far.extend([story_pb2.Segment(caption=OPENING, image=b"\x89PNG start"), *_so_far(0)])
    assert request == expected
    # Segments 0 asks for the server's default, 10.
    assert continuation_request(_story_of(c0, i0, segments=0)).segments == 9
    with pytest.raises(CannotContinue, match="every one"):
        continuation_request(_story_of(c0, c1, i0, i1, segments=2))
    with pytest.raises(CannotContinue, match="request"):
        continuation_request(Story())


def test_the_command_resumes_by_default_and_writes_what_continues_a_story(lossy, tmp_path):
    from seedstory_client.cli import main

    service = lossy((grpc.StatusCode.UNAVAILABLE, 5))
    main(
        [
            "generate",
            "--target",
            service.target,
            "--prompt",
            OPENING,
            "--segments",
            "3",
            "--seed",
            "7",
            "--out",
            str(tmp_path),
        ]
    )
    assert service.requests[1] == _continuation(2, 2, 1, 9, seed=7)
    saved = json.loads((tmp_path / "story.json").read_text())
    assert [
        (s["caption"], s["caption_ids"], base64.b64decode(s["features"]), s["image"])
        for s in saved["segments"]
    ] == [(*_part(j)[:3], f"segment_{j:03d}.png") for j in range(3)]
    assert all((s["feature_rows"], s["feature_dim"]) == (2, 2) for s in saved["segments"])
    assert (saved["story_id"], saved["continuation_ids"], saved["resumes"]) == ("s1", ["s2"], 1)
    assert read_story(tmp_path).request == build_request(OPENING, 3, seed=7, render_seed=7)


@pytest.mark.parametrize("continue_with", ["seedstory-client", "seedstory"])
def test_continue_finishes_a_story_written_on_disk(lossy, tmp_path, capsys, continue_with):
    from cluster.cli import main as server_main
    from seedstory_client.cli import main

    out, service = tmp_path / "story", lossy((grpc.StatusCode.UNAVAILABLE, 5))
    target = service.target
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "generate",
                "--target",
                target,
                "--prompt",
                OPENING,
                "--segments",
                "4",
                "--seed",
                "7",
                "--out",
                str(out),
                "--no-resume",
            ]
        )
    assert exit_.value.code == 1 and len(service.requests) == 1
    command = f"seedstory-client generate --continue {out} --target {target}"
    assert f"continue it with: {command}\n" in capsys.readouterr().err
    _check_story(read_story(out), 2, pending=1)

    (main if continue_with == "seedstory-client" else server_main)(command.split()[1:])  # the same command
    assert service.requests[1] == _continuation(2, 2, 2, 9, seed=7)
    story = read_story(out)
    _check_story(story, 4)
    assert story.complete and (story.story_id, story.continuation_ids, story.resumes) == ("s1", ["s2"], 1)
    assert sorted(p.name for p in out.glob("*.png")) == [f"segment_{j:03d}.png" for j in range(4)]


def test_continue_says_why_a_folder_cannot_be_continued(tmp_path, capsys):
    from seedstory_client.cli import main

    (tmp_path / "story.json").write_text(
        json.dumps({"story_id": "s", "source": "", "stats": {}, "segments": []})
    )
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--continue", str(tmp_path), "--target", "127.0.0.1:1"])
    assert exit_.value.code == 2 and "does not hold the request" in capsys.readouterr().err


# -- a fresh venv with only the client package ---------------------------------------------------
def _clean_env(venv: Path) -> dict[str, str]:
    """This session's environment minus anything that would reach the project's own venv or tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A new venv (python -m venv) holding the client package and its dependencies, nothing else.
    Installed from a copy of clients/python, so the build leaves nothing in the checkout."""
    work = tmp_path_factory.mktemp("client-venv")
    src = shutil.copytree(
        CLIENT, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        check=True,
        cwd=work,
        env=_clean_env(venv),
        timeout=600,
    )
    return venv


def test_the_client_venv_has_none_of_the_servers_heavy_packages(client_venv):
    probe = (
        "import importlib.util, json, seedstory_client; print(json.dumps("
        f"[seedstory_client.__file__, {{m: importlib.util.find_spec(m) is not None for m in {HEAVY!r}}}]))"
    )
    out = subprocess.run(
        [str(client_venv / "bin" / "python"), "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=client_venv,
        env=_clean_env(client_venv),
        timeout=60,
    ).stdout
    where, found = json.loads(out)
    assert Path(where).is_relative_to(client_venv)  # the installed copy, not the checkout's
    assert found == {m: False for m in HEAVY}


def test_the_client_venv_writes_a_story_from_the_service(client_venv, story_service, tiny_ckpt, tmp_path):
    out = tmp_path / "story"
    run = subprocess.run(
        [
            str(client_venv / "bin" / "seedstory-client"),
            "generate",
            "--target",
            story_service.target,
            "--token",
            story_service.token,
            "--prompt",
            OPENING,
            "--segments",
            "3",
            "--steps",
            "2",
            "--seed",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(client_venv),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"story written: {out / 'story.html'}" in run.stdout
    manifest = read_manifest(tiny_ckpt)
    story = json.loads((out / "story.json").read_text())
    assert story["story_id"] and story["stats"]["output_tokens"] > 0
    assert len(story["segments"]) == 3 and story["segments"][0]["caption"] == OPENING
    page = (out / "story.html").read_text()
    for seg in story["segments"]:
        assert seg["caption"] and seg["image"] in page
        features = np.frombuffer(base64.b64decode(seg["features"]), "<f4")
        assert (seg["feature_rows"], seg["feature_dim"]) == (manifest.num_queries, manifest.feature_dim)
        assert features.size == manifest.num_queries * manifest.feature_dim and np.isfinite(features).all()
        png = Image.open(io.BytesIO((out / seg["image"]).read_bytes()))
        assert png.format == "PNG" and png.size == (manifest.preset.image_size,) * 2
    assert sorted(p.name for p in out.glob("*.png")) == [f"segment_{k:03d}.png" for k in range(3)]
