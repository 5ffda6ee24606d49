"""The layout rules of docs/architecture.md, the Serve config, and the main job (the demo)."""

import ast
import base64
import io
import json
import tomllib
from pathlib import Path

import numpy as np
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


PACKAGES = ("actors", "cluster", "training")
LONGEST_SOURCE_FILE = 450  # lines: a file past it holds more than one job


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (at module level or inside functions)."""
    files = {module_name(f): f for package in PACKAGES for f in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycle_through(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_project_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the project
    assert cycle_through(graph) is None, " -> ".join(cycle_through(graph))


def test_the_cycle_check_finds_a_cycle():
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_source_file_outside_tests_is_longer_than_one_job():
    sources = [f for top in (*PACKAGES, "benchmarks", "clients") for f in (ROOT / top).rglob("*.py")]
    generated = {"story_pb2.py", "story_pb2_grpc.py"}
    long = {
        str(f.relative_to(ROOT)): n
        for f in sources
        if f.name not in generated
        if (n := len(f.read_text().splitlines())) > LONGEST_SOURCE_FILE
    }
    assert not long


def test_no_committed_file_names_this_machines_paths_or_the_world_outside():
    """A clone must stand alone: no file names the folder it was written in (an absolute path on
    one machine), a saved model's ``_name_or_path``, or the design notes outside the project."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    bad = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png", ".jpg", ".safetensors", ".parquet"}:
            continue
        text = path.read_text(errors="ignore")
        if any(mark in text for mark in (str(ROOT), '"_name_or_path": ' + '"/', "../" + "shared")):
            bad.append(name)
    assert not bad


def test_proto_holds_no_python_package():
    assert not list((ROOT / "proto").rglob("*.py"))


def test_pyproject_never_names_the_cuda_only_torch_companions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    assert not [
        d
        for d in deps
        if d.split("=")[0].split("[")[0].strip() in {"torchvision", "torchaudio", "torchcodec"}
    ]
    assert {"cpu", "gpu", "dev"} <= set(project["optional-dependencies"])
    assert project["scripts"]["seedstory"] == "cluster.cli:main"


def test_ray_config_parses_with_serves_own_schema_and_our_settings():
    from ray.serve.schema import ServeDeploySchema

    from cluster.serving import load_config
    from cluster.settings import AppSettings

    raw = load_config()
    config = ServeDeploySchema.model_validate(raw)
    assert config.grpc_options.port == 9000 and config.http_options.port == 8000
    assert config.grpc_options.grpc_servicer_functions == [
        "seedstory_client.v1.story_pb2_grpc.add_StoryServiceServicer_to_server"
    ]
    [app] = config.applications
    settings = AppSettings.from_args(app.args)
    assert settings.limits.max_segments >= 25 and settings.limits.default_segments == 10
    pools = {d.name: d for d in app.deployments}
    assert set(pools) == {"StoryIngress", "TokenizerPool", "MLLMPool", "DetokenizerPool"}
    for name in ("TokenizerPool", "MLLMPool", "DetokenizerPool"):
        assert pools[name].autoscaling_config["max_replicas"] >= 1, name
        assert pools[name].ray_actor_options.num_cpus > 0, name


def test_every_pool_fits_the_two_core_machine_at_its_max_replicas():
    """ray_config.yaml is sized for this project's 2-core machine: autoscaling must be able to
    reach every pool's max_replicas there, two de-tokenizer replicas beside the MLLM included."""
    from cluster.serving import load_config

    deployments = {d["name"]: d for d in load_config()["applications"][0]["deployments"]}
    reserved = sum(
        d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_cpus"]
        for d in deployments.values()
    )
    assert reserved <= 2.0 + 1e-9, reserved
    assert deployments["DetokenizerPool"]["autoscaling_config"]["max_replicas"] >= 2


def test_app_args_are_checked_once():
    import pytest

    from cluster.settings import AppSettings

    with pytest.raises(ValueError, match="unknown application args"):
        AppSettings.from_args({"checkpoint": "x", "max_storeis": 3})
    with pytest.raises(ValueError, match="sink mode"):
        AppSettings.from_args({"checkpoint": "x", "sink": {"mode": "sideways"}})


def test_the_demo_serves_and_writes_a_story_a_person_can_open(tmp_path):
    """The README's main job as a user runs it, on the embedded model: a new local cluster, gRPC,
    files on disk."""
    import subprocess
    import sys

    opening = "Once upon a time, Kip the green triangle jumps in the forest."
    out = tmp_path / "story"
    # Own ports: the session's shared Serve app holds 9000/8000.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "demo",
            "--out",
            str(out),
            "--segments",
            "2",
            "--prompt",
            opening,
            "--grpc-port",
            "9301",
            "--http-port",
            "8301",
        ],
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    page = out / "story.html"
    segments = json.loads((out / "story.json").read_text())["segments"]
    assert len(segments) == 2 and segments[0]["caption"] == opening and segments[1]["caption"]
    for seg in segments:
        # The picture's features, as the service sent them: 16 x 64 little-endian float32, base64.
        features = np.frombuffer(base64.b64decode(seg["features"]), dtype="<f4")
        assert features.shape == (16 * 64,) and np.isfinite(features).all()
        assert "visual_codes" not in seg
        png = (out / seg["image"]).read_bytes()
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert seg["image"] in page.read_text()
    assert "Kip the green triangle" in page.read_text()
