"""The layout rules of DESIGN.md §3, the Serve config, and the main job (the demo)."""

import ast
import io
import json
import tomllib
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> set[str]:
    mods = set()
    for f in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
    return mods


def test_actors_import_neither_training_nor_cluster():
    assert not imported_modules("actors") & {"training", "cluster"}


def test_proto_holds_no_python_package():
    assert not list((ROOT / "proto").rglob("*.py"))


def test_pyproject_never_names_the_cuda_only_torch_companions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    assert not [d for d in deps if d.split("=")[0].split("[")[0].strip() in {"torchvision", "torchaudio", "torchcodec"}]
    assert {"cpu", "gpu", "dev"} <= set(project["optional-dependencies"])
    assert project["scripts"]["seedstory"] == "cluster.cli:main"


def test_ray_config_parses_with_serves_own_schema():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "ray_config.yaml").read_text()))
    assert config.grpc_options.port == 9000 and config.http_options.port == 8000
    assert [app.name for app in config.applications] == ["seedstory"]


def test_demo_writes_a_story_a_person_can_open(tiny_ckpt, tmp_path):
    from cluster.demo import run_demo

    opening = "Once upon a time, Kip the green triangle jumps in the forest."
    page = run_demo(tmp_path / "story", opening, tiny_ckpt, segments=2)
    segments = json.loads((tmp_path / "story" / "story.json").read_text())["segments"]
    assert len(segments) == 2 and segments[0]["caption"] == opening and segments[1]["caption"]
    for seg in segments:
        assert len(seg["visual_codes"]) == 16 and all(0 <= c < 256 for c in seg["visual_codes"])
        png = (tmp_path / "story" / seg["image"]).read_bytes()
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert seg["image"] in page.read_text()
    assert "Kip the green triangle" in page.read_text()
