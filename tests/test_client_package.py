"""The client package (clients/python): what it may depend on, a story cut short midway, and a
fresh virtual environment with only the client in it writing a story from the session's service."""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image
from seedstory_client import AsyncStoryClient, StoryClient, StoryStreamError, __version__
from seedstory_client.v1 import story_pb2, story_pb2_grpc

from actors.checkpoint import read_manifest

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


def test_seedstory_generate_takes_the_client_commands_options():
    from seedstory_client.cli import parser as client_parser

    from cluster.cli import parser as server_parser

    argv = ["generate", "--prompt", "p", "--image", "a.png", "--segments", "3", "--out", "o", "--target", "h:1",
            "--token", "t", "--seed", "2", "--steps", "4", "--temperature", "0.5"]
    server = vars(server_parser().parse_args(argv))
    server.pop("func")
    assert server == vars(client_parser().parse_args(argv))


# -- a story cut short midway keeps what arrived -----------------------------------------------------
class CutShort(story_pb2_grpc.StoryServiceServicer):
    """Two captions and the first picture, then OUT_OF_RANGE, as the real service ends a story the
    MLLM's length limit truncated (an event with the story id only, then the status)."""

    def GenerateStory(self, request, context):
        yield story_pb2.StoryEvent(story_id="s1", caption=story_pb2.CaptionEvent(index=0, caption=request.caption))
        yield story_pb2.StoryEvent(story_id="s1", image=story_pb2.ImageEvent(index=0, png=b"png0", visual_codes=[1, 2]))
        yield story_pb2.StoryEvent(story_id="s1", caption=story_pb2.CaptionEvent(index=1, caption="Milo sits."))
        yield story_pb2.StoryEvent(story_id="s1")
        context.abort(grpc.StatusCode.OUT_OF_RANGE, "story: cut short")


@pytest.fixture(scope="module")
def cut_short():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    story_pb2_grpc.add_StoryServiceServicer_to_server(CutShort(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _check_partial(err: StoryStreamError) -> None:
    assert isinstance(err, grpc.RpcError)  # callers that caught RpcError still do
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and err.details() == "story: cut short"
    story = err.story
    assert story.story_id == "s1" and not story.complete
    assert [(s.caption, s.png, s.visual_codes) for s in story.segments] == [
        (OPENING, b"png0", [1, 2]), ("Milo sits.", b"", [])]


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
        main(["generate", "--target", cut_short, "--prompt", OPENING, "--segments", "4", "--out", str(tmp_path)])
    assert exit_.value.code == 1
    assert "answered OUT_OF_RANGE: story: cut short" in capsys.readouterr().err
    story = json.loads((tmp_path / "story.json").read_text())
    assert [(s["caption"], s["image"]) for s in story["segments"]] == [
        (OPENING, "segment_000.png"), ("Milo sits.", None)]  # the second picture never came
    assert (tmp_path / "segment_000.png").read_bytes() == b"png0"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["segment_000.png"]


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
    src = shutil.copytree(CLIENT, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)], check=True, cwd=work,
                   env=_clean_env(venv), timeout=600)
    return venv


def test_the_client_venv_has_none_of_the_servers_heavy_packages(client_venv):
    probe = ("import importlib.util, json, seedstory_client; print(json.dumps("
             "[seedstory_client.__file__, {m: importlib.util.find_spec(m) is not None for m in %r}]))" % (HEAVY,))
    out = subprocess.run([str(client_venv / "bin" / "python"), "-c", probe], check=True, capture_output=True,
                         text=True, cwd=client_venv, env=_clean_env(client_venv), timeout=60).stdout
    where, found = json.loads(out)
    assert Path(where).is_relative_to(client_venv)  # the installed copy, not the checkout's
    assert found == {m: False for m in HEAVY}


def test_the_client_venv_writes_a_story_from_the_service(client_venv, story_service, tiny_ckpt, tmp_path):
    out = tmp_path / "story"
    run = subprocess.run([str(client_venv / "bin" / "seedstory-client"), "generate", "--target", story_service.target,
                          "--token", story_service.token, "--prompt", OPENING, "--segments", "3", "--steps", "2",
                          "--seed", "4", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, env=_clean_env(client_venv), timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"story written: {out / 'story.html'}" in run.stdout
    manifest = read_manifest(tiny_ckpt)
    story = json.loads((out / "story.json").read_text())
    assert story["story_id"] and story["stats"]["output_tokens"] > 0
    assert len(story["segments"]) == 3 and story["segments"][0]["caption"] == OPENING
    page = (out / "story.html").read_text()
    for seg in story["segments"]:
        assert seg["caption"] and seg["image"] in page
        assert len(seg["visual_codes"]) == manifest.num_queries
        png = Image.open(io.BytesIO((out / seg["image"]).read_bytes()))
        assert png.format == "PNG" and png.size == (manifest.preset.image_size,) * 2
    assert sorted(p.name for p in out.glob("*.png")) == [f"segment_{k:03d}.png" for k in range(3)]
