"""The gRPC API's generated Python stubs (``story_pb2``, ``story_pb2_grpc``).

The source is ``proto/seedstory/v1/story.proto``. protoc maps it to the virtual path
``cluster/api/story.proto`` so that the generated modules import each other as
``cluster.api.story_pb2`` (protoc only writes absolute imports). Regenerate with
``python -m cluster.api``; ``tests/test_api_stubs.py`` fails when the stubs are stale.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "seedstory" / "v1" / "story.proto"
STUBS = ("story_pb2.py", "story_pb2_grpc.py", "story_pb2.pyi")


def generate(out_root: Path = ROOT) -> list[Path]:
    """Run protoc on the .proto; the stubs land under ``out_root/cluster/api/``."""
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / "cluster" / "api").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-Icluster/api={PROTO.parent}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", str(PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "cluster" / "api" / name for name in STUBS]
