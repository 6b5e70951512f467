"""The import rules of DESIGN.md, checked on the source: runtime and splitting stay pure, and
node and coordinator meet only through proto."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> the edgeweave packages it may import (besides itself and the root `edgeweave` module)
ALLOWED = {
    "runtime": set(),
    "splitting": {"runtime"},
    "proto": set(),
    "node": {"runtime", "proto"},
    "coordinator": {"splitting", "runtime", "proto"},
}
#: networking libraries that must not appear in the pure layers
FORBIDDEN_PURE = {"grpc", "zeroconf", "subprocess", "socket", "fastapi", "uvicorn"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_design(package):
    violations = []
    for path in sorted((ROOT / package).glob("*.py")):
        if path.name.startswith("edgeweave_pb2"):
            continue
        for name in _imports(path):
            parts = name.split(".")
            layer = parts[1] if parts[0] == "edgeweave" and len(parts) > 1 else None
            if layer in ALLOWED and layer != package and layer not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
            if package in ("runtime", "splitting") and parts[0] in FORBIDDEN_PURE:
                violations.append(f"{path.relative_to(ROOT)} imports {name} (pure layer)")
    assert not violations, "\n".join(violations)


def test_nothing_unpickles():
    """No torch.load / pickle anywhere in the shipped code: weights are safetensors, graphs ONNX."""
    offenders = []
    for package in ALLOWED:
        for path in (ROOT / package).glob("*.py"):
            text = path.read_text()
            for needle in ("torch.load(", "pickle.load", "pickle.loads", "import pickle"):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, "\n".join(offenders)
