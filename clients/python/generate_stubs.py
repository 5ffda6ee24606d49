"""Regenerates the gRPC stubs in ``seedstory_client/v1/`` from ``proto/seedstory/v1/story.proto``.

Run it from a checkout of the project, with grpcio-tools (the server's ``dev`` extra):
``python clients/python/generate_stubs.py``. Not part of the installed package: it needs the
project's ``proto/``. protoc maps the proto's folder to the virtual path ``seedstory_client/v1``, so
the generated modules import each other as ``seedstory_client.v1.story_pb2`` (protoc only writes
absolute imports). ``tests/test_api.py`` fails when the committed stubs are stale.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE.parents[1] / "proto" / "seedstory" / "v1" / "story.proto"
PACKAGE = "seedstory_client/v1"
STUBS = ("story_pb2.py", "story_pb2_grpc.py", "story_pb2.pyi")


def generate(out_root: Path = HERE) -> list[Path]:
    """Run protoc on the .proto; the stubs land under ``out_root/seedstory_client/v1/``."""
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PACKAGE}={PROTO.parent}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / PACKAGE / name for name in STUBS]


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path}")
