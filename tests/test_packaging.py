"""The package installs on the boards we target (Raspberry Pi OS and Jetson, both aarch64).

Offline checks only: every runtime dependency must be on the list of packages whose aarch64
wheels we have verified (scripts/check_aarch64_wheels.py does that against the registry), none
may be an x86-only or compile-from-source package, and the systemd unit ships in the package.
One slow test builds the wheel with `make wheel` (pip fetches setuptools from the registry).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: runtime dependencies with manylinux aarch64 wheels (or pure Python), re-checked by
#: scripts/check_aarch64_wheels.py; adding a dependency means checking it and adding it here
VERIFIED_AARCH64 = {
    "torch", "numpy", "grpcio", "protobuf", "zeroconf", "psutil", "onnx", "onnxruntime", "safetensors", "gguf",
    "tokenizers", "jinja2", "typer", "rich", "cryptography", "fastapi", "uvicorn", "tomli", "prometheus-client",
}
#: x86-only, CUDA-on-x86 or build-from-source packages that would break `pip install` on a Pi
NOT_ON_AARCH64 = {
    "intel-extension-for-pytorch", "mkl", "tensorflow-intel", "triton", "flash-attn", "xformers", "deepspeed",
    "bitsandbytes", "llama-cpp-python", "auto-gptq", "nvidia-cudnn-cu12", "nvidia-cublas-cu12", "onnxruntime-gpu",
    "openvino", "pyaudio", "uvloop-x86",
}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_dependencies_have_aarch64_wheels():
    names = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert names, "no dependencies parsed from pyproject.toml"
    assert not names & NOT_ON_AARCH64, f"x86-only or source-built dependencies: {sorted(names & NOT_ON_AARCH64)}"
    unverified = names - VERIFIED_AARCH64
    assert not unverified, (
        f"{sorted(unverified)} not verified on aarch64: run scripts/check_aarch64_wheels.py, then add to VERIFIED_AARCH64"
    )


def test_build_needs_no_compiler():
    """setuptools + wheel only: the project itself is pure Python (no C extensions to build on a Pi)."""
    assert {requirement_name(r) for r in PYPROJECT["build-system"]["requires"]} <= {"setuptools", "wheel"}
    assert "ext-modules" not in PYPROJECT.get("tool", {}).get("setuptools", {})


def test_systemd_unit_ships_in_the_package():
    unit = (ROOT / "edgeweave" / "deploy" / "edgeweave-node.service").read_text()
    assert "deploy/*" in PYPROJECT["tool"]["setuptools"]["package-data"]["edgeweave"]
    for line in ("Restart=on-failure", "User=edgeweave", "Environment=EDGEWEAVE_CONFIG=/etc/edgeweave/config.toml",
                 "After=network-online.target", "StateDirectory=edgeweave"):
        assert line in unit.splitlines(), line


def _package_data_sources() -> dict[str, Path]:
    """Wheel path -> checkout file, for every data file the package declares."""
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    package_dirs = setuptools_cfg["package-dir"]
    expected: dict[str, Path] = {}
    for package, patterns in setuptools_cfg["package-data"].items():
        source = ROOT / package_dirs[package]
        for pattern in patterns:
            for path in source.glob(pattern):
                if path.is_file():
                    expected[f"{package.replace('.', '/')}/{path.relative_to(source)}"] = path
    data = f"edgeweave-{PYPROJECT['project']['version']}.data/data"
    for target, files in setuptools_cfg["data-files"].items():
        for name in files:
            expected[f"{data}/{target}/{Path(name).name}"] = ROOT / name
    return expected


@pytest.mark.slow
def test_make_wheel_holds_the_package_data():
    """`make wheel` (what deploy.md has users run) packs the unit, the web page, the .proto and the
    guide the unit's Documentation= names, byte for byte, and nothing from outside the package."""
    result = subprocess.run(["make", "-s", "wheel"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = ROOT / "dist" / f"edgeweave-{PYPROJECT['project']['version']}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        expected = _package_data_sources()
        assert {"edgeweave/deploy/edgeweave-node.service", "edgeweave/coordinator/web/index.html",
                "edgeweave/proto/edgeweave.proto"} <= expected.keys()
        for name, source in expected.items():
            assert name in names, f"{name} missing from {wheel.name}"
            assert archive.read(name) == source.read_bytes(), f"{name} differs from {source}"
        entry_points = archive.read(f"edgeweave-{PYPROJECT['project']['version']}.dist-info/entry_points.txt").decode()
    assert "edgeweave = edgeweave.cli:main" in entry_points
    assert {"edgeweave/proto/edgeweave_pb2.py", "edgeweave/node/daemon.py", "edgeweave/cli.py"} <= names
    version = PYPROJECT["project"]["version"]
    assert {n.split("/", 1)[0] for n in names} == {"edgeweave", f"edgeweave-{version}.dist-info", f"edgeweave-{version}.data"}
    unit = (ROOT / "edgeweave" / "deploy" / "edgeweave-node.service").read_text()
    assert "Documentation=file:///opt/edgeweave/venv/share/doc/edgeweave/deploy.md" in unit.splitlines()
