"""The package installs on the boards we target (Raspberry Pi OS and Jetson, both aarch64).

Offline checks only: every runtime dependency must be on the list of packages whose aarch64
wheels we have verified (scripts/check_aarch64_wheels.py does that against the registry), none
may be an x86-only or compile-from-source package, and the systemd unit ships in the package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

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
