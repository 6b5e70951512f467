"""Regenerate the committed protobuf/gRPC modules from edgeweave.proto.

The generated gRPC module must import `edgeweave.proto.edgeweave_pb2` (not a bare
`edgeweave_pb2`), so protoc runs on a temporary tree where the file sits at
`edgeweave/proto/edgeweave.proto`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("edgeweave_pb2.py", "edgeweave_pb2_grpc.py", "edgeweave_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir and return the generated files."""
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "edgeweave" / "proto"
        src.mkdir(parents=True)
        shutil.copy(HERE / "edgeweave.proto", src / "edgeweave.proto")
        gen = Path(tmp) / "out"
        gen.mkdir()
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main([
            "protoc", f"-I{tmp}", f"-I{include}",
            f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}",
            "edgeweave/proto/edgeweave.proto",
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        produced = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copy(gen / "edgeweave" / "proto" / name, target)
            produced.append(target)
        return produced


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
