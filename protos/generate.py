"""Generate the Python protobuf and gRPC stubs for every .proto file under protos/.

`protos/pagedserve/v1/executor.proto` becomes `executor_pb2.py`, `executor_pb2.pyi` and
`executor_pb2_grpc.py` beside it, importable as `pagedserve.v1.executor_pb2` once the package is
installed (protos/ is the import root, so the generated modules import each other as `pagedserve.v1.*`).
The stubs are never committed: setup.py runs this before every build, including `pip install -e .`.
After editing a .proto in an editable install, run it by hand:

    python protos/generate.py
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run grpc_tools.protoc on every .proto under `proto_root`; return the stub files it wrote.

    Raises ImportError without grpcio-tools, FileNotFoundError when there is no .proto file and
    RuntimeError when protoc fails.
    """
    try:
        from grpc_tools import protoc  # a build-time dependency only
    except ImportError as e:
        raise ImportError("generating the stubs needs grpcio-tools: pip install grpcio-tools==1.84.0") from e

    proto_root = Path(proto_root).resolve()
    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={proto_root}",
        f"--pyi_out={proto_root}",
        f"--grpc_python_out={proto_root}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(str(p.relative_to(proto_root)) for p in protos)}")
    stubs = [p.with_name(p.stem + suffix) for p in protos for suffix in STUB_SUFFIXES]
    missing = [s for s in stubs if not s.is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write {', '.join(map(str, missing))}")
    return stubs


def main() -> int:
    """Generate the stubs and list them."""
    for path in generate():
        print(path.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
