"""Ask the package registry whether every runtime dependency has a binary wheel for aarch64 Linux.

Uses pip's own resolver (`pip install --dry-run --only-binary=:all: --platform ...`), one
dependency at a time, so a failure names the package. Needs the registry, so it is a script,
not a test (tests/test_packaging.py holds the offline list this script verifies).

    python scripts/check_aarch64_wheels.py [--python 3.11] [--platform TAG ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: pip does not widen --platform to older glibc tags itself, so name each one a wheel may carry
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_26_aarch64",
             "manylinux_2_17_aarch64", "manylinux2014_aarch64"]


def check(requirement: str, python: str, platforms: list[str]) -> tuple[bool, str]:
    """(ok, wheel file name or pip's last error line) for one requirement."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
                "--only-binary=:all:", *(f"--platform={p}" for p in platforms), "--python-version", python,
                "--target", str(Path(tmp) / "t"), "--report", str(report), requirement]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            return False, lines[-1] if lines else done.stderr.strip()[-200:]
        item = json.loads(report.read_text())["install"][0]
        return True, item["download_info"]["url"].rsplit("/", 1)[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.11", help="target Python (Raspberry Pi OS bookworm: 3.11)")
    parser.add_argument("--platform", action="append", help="wheel platform tag(s); default: glibc 2.17..2.28 aarch64 "
                        "(Raspberry Pi OS bookworm has glibc 2.36, JetPack 6 has 2.35)")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    failures = 0
    for requirement in project["dependencies"]:
        if "python_version <" in requirement and tuple(map(int, args.python.split("."))) >= (3, 11):
            continue  # a backport the target Python does not need
        ok, detail = check(requirement.split(";")[0].strip(), args.python, args.platform or PLATFORMS)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {requirement:32} {detail}")
    print(f"{failures} dependencies without an aarch64 wheel" if failures else "every dependency has an aarch64 wheel")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
