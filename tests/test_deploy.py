"""docs/deploy.md works when followed, and the systemd unit it installs is valid and hardened.

The walk test runs the guide's own `sh` blocks (parsed from the page, so page and test cannot
drift) as root inside a network namespace and a private mount namespace: /etc, /opt and
/var/lib are overlays whose changes vanish with the namespace, so the `edgeweave` user, the
venv in /opt and the files in /etc are real for the commands and never reach the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
UNIT = ROOT / "edgeweave" / "deploy" / "edgeweave-node.service"
FAKE_SYSTEMD = Path(__file__).resolve().parent / "fake_systemd.py"
SCORE_LIMIT = 4.0  # systemd-analyze security: 4.0 and below reads "OK"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (.ci/run installs systemd)"
)


def doc_blocks(text: str) -> list[tuple[str, bool, str]]:
    """Every ```sh block of the page: its text, whether the walk runs it (not after a "not walked"
    comment), and the heading of its section."""
    blocks = []
    pattern = r"^(## [^\n]*)$|^(<!-- not walked[^\n]*-->\n)?```sh\n(.*?)^```$"
    heading = ""
    for match in re.finditer(pattern, text, re.S | re.M):
        if match.group(1):
            heading = match.group(1)[3:]
        else:
            blocks.append((match.group(3), match.group(2) is None, heading))
    return blocks


def unit_service_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def test_guide_and_unit_agree():
    """The unit starts what the guide installs and points at documentation the wheel installs."""
    keys = unit_service_keys()
    assert keys["ExecStart"] == ["/opt/edgeweave/venv/bin/edgeweave node --data-dir /var/lib/edgeweave"]
    assert keys["Documentation"] == ["file:///opt/edgeweave/venv/share/doc/edgeweave/deploy.md"]
    walked = "\n".join(block for block, walk, _ in doc_blocks(DOC.read_text()) if walk)
    for needed in ("sudo python3 -m venv /opt/edgeweave/venv", "useradd --system", "sudo tee /etc/edgeweave/config.toml",
                   "/opt/edgeweave/venv/share/edgeweave/edgeweave-node.service", "systemctl enable --now edgeweave-node"):
        assert needed in walked, needed
    assert walked.index("useradd") < walked.index("install -d -o root -g edgeweave") < walked.index("cluster.secret")


@needs_systemd_analyze
def test_unit_verifies_without_warnings(tmp_path):
    """`systemd-analyze verify` checks every directive; only ExecStart's binary is swapped for one that
    exists here (verify refuses a missing one), so a misspelt or misplaced key still shows."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("ExecStart=/opt/edgeweave/venv/bin/edgeweave ", "ExecStart=/bin/true "))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@needs_systemd_analyze
def test_unit_security_exposure_is_ok():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= SCORE_LIMIT, result.stdout


# ----------------------------------------------------------------------------------------------
# The walk

def _untraversable_dirs(paths: list[Path]) -> list[Path]:
    """Ancestors the service user could not enter (a 0700 /root holding pyenv or the checkout)."""
    found: list[Path] = []
    for path in paths:
        for parent in [*reversed(path.resolve().parents), path.resolve()]:
            if parent.is_dir() and not parent.stat().st_mode & 0o001 and parent not in found:
                found.append(parent)
    return found


def _mountpoints_below(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


BUILD_SECTION = "1. Build the wheel"  # runs on "any machine with the checkout": the host, whose network reaches PyPI


def _shell_stubs(work: Path, cwd: str) -> list[str]:
    """What the walk does instead of sudo, apt-get, scp and a systemd that is not running here."""
    q = shlex.quote
    py = q(sys.executable)
    return [
        "set -euo pipefail",
        f"state={q(str(work / 'state'))}",
        "sudo() { \"$@\"; }  # the walk runs as root",
        "apt-get() { echo \"walk: not run here: apt-get $*\"; }",
        "scp() {  # the device is this machine: copy into the destination (home unless absolute)",
        "  local dest=\"${*: -1}\"; dest=\"${dest#*:}\"; [[ $dest = /* ]] || dest=\"$HOME/$dest\"",
        "  cp \"${@:1:$#-1}\" \"$dest\"",
        "}",
        f"systemctl() {{ {py} {q(str(FAKE_SYSTEMD))} \"$state\" systemctl \"$@\"; }}",
        f"journalctl() {{ {py} {q(str(FAKE_SYSTEMD))} \"$state\" journalctl \"$@\"; }}",
        f"cd {cwd}",
    ]


def build_script(work: Path) -> str:
    lines = [*_shell_stubs(work, shlex.quote(str(ROOT))), "set -x"]
    blocks = [block for block, walk, heading in doc_blocks(DOC.read_text()) if walk and heading.startswith(BUILD_SECTION)]
    assert blocks, f"deploy.md has no section {BUILD_SECTION!r} with a walked block"
    for block in blocks:
        lines += block.splitlines()
    return "\n".join(lines) + "\n"


def device_script(work: Path, dev_site_dirs: list[str]) -> str:
    """The guide's other walked blocks, in order, after a prelude that builds the throw-away root."""
    q = shlex.quote
    lines = [
        "set -euo pipefail",
        f"scratch={q(str(work / 'ns'))}; mkdir -p \"$scratch\"; mount -t tmpfs tmpfs \"$scratch\"",
        "overlay() {  # a writable layer over $1 that disappears with this mount namespace",
        "  mkdir -p \"$scratch/$2/u\" \"$scratch/$2/w\"; chmod \"${3:-0755}\" \"$scratch/$2/u\"",
        "  mount -t overlay overlay -o \"lowerdir=$1,upperdir=$scratch/$2/u,workdir=$scratch/$2/w\" \"$1\"",
        "}",
        "overlay /etc etc; overlay /opt opt; overlay /var/lib varlib",
    ]
    # The service user must reach the interpreter and the dev venv's packages: where a parent is
    # closed (0700), open it in this namespace only, keeping whatever is mounted below it.
    untraversable = _untraversable_dirs([Path(sys.base_prefix), *map(Path, dev_site_dirs)])
    for i, directory in enumerate(untraversable):
        mode = oct(directory.stat().st_mode & 0o777 | 0o011)[2:]
        below = _mountpoints_below(directory)
        for j, point in enumerate(below):
            lines.append(f"mkdir -p \"$scratch/keep{i}-{j}\"; mount --rbind {q(point)} \"$scratch/keep{i}-{j}\"")
        lines.append(f"overlay {q(str(directory))} open{i} {mode}")
        for j, point in enumerate(below):
            lines.append(f"mount --rbind \"$scratch/keep{i}-{j}\" {q(point)}")
    lines += [*_shell_stubs(work, "\"$HOME\""), "trap 'systemctl stop edgeweave-node || true' EXIT", "set -x"]
    hooks_used = 0
    site = "lib/python{}.{}/site-packages".format(*sys.version_info[:2])
    for block, walk, heading in doc_blocks(DOC.read_text()):
        if not walk or heading.startswith(BUILD_SECTION):
            continue
        for line in block.splitlines():
            if line == "sudo /opt/edgeweave/venv/bin/pip install ~/edgeweave-*.whl":
                # The wheel itself, offline; its dependencies are the ones this suite runs on (the
                # same versions `make` installs), reached with a .pth instead of a 2 GB download.
                hooks_used += 1
                lines += ["export PIP_NO_DEPS=1 PIP_NO_INDEX=1", line, "unset PIP_NO_DEPS PIP_NO_INDEX",
                          f"printf '%s\\n' {' '.join(map(q, dev_site_dirs))} > /opt/edgeweave/venv/{site}/dev-deps.pth"]
            else:
                lines.append(line)
    assert hooks_used == 1, "deploy.md no longer installs the wheel with the line this test expects"
    lines += [  # the test's own checks, on the machine the guide left behind
        "set +x",
        f"edgeweave nodes --peer 127.0.0.1:50551 --json > {q(str(work / 'peer.json'))}",
        f"ps -o user= -p \"$(cat \"$state/edgeweave-node.pid\")\" > {q(str(work / 'user.txt'))}",
        f"stat -c '%n %U:%G %a' /etc/edgeweave /etc/edgeweave/config.toml /etc/edgeweave/cluster.secret "
        f"/var/lib/edgeweave > {q(str(work / 'modes.txt'))}",
        "test -f /opt/edgeweave/venv/share/doc/edgeweave/deploy.md",
        "cmp /etc/systemd/system/edgeweave-node.service /opt/edgeweave/venv/share/edgeweave/edgeweave-node.service",
        f"/opt/edgeweave/venv/bin/python -c 'import edgeweave; print(edgeweave.__file__)' > {q(str(work / 'where.txt'))}",
        "systemctl stop edgeweave-node",
    ]
    return "\n".join(lines) + "\n"


def _dev_site_dirs() -> list[str]:
    """site-packages of this interpreter (a .pth may add another venv's, as in a worktree)."""
    purelib = sysconfig.get_paths()["purelib"]
    return list(dict.fromkeys([purelib, *(p for p in sys.path if p.endswith("site-packages"))]))


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deploy_guide_walk(netns_testbed, tmp_path):
    bed = netns_testbed(1)
    home = tmp_path / "home"
    bin_dir = tmp_path / "bin"
    for folder in (home, bin_dir, tmp_path / "state"):
        folder.mkdir()
    # `python3` of the guide is the interpreter under this venv: the dev packages match its ABI.
    (bin_dir / "python3").symlink_to(os.path.realpath(sys._base_executable))  # type: ignore[attr-defined]
    (tmp_path / "build.sh").write_text(build_script(tmp_path))
    (tmp_path / "device.sh").write_text(device_script(tmp_path, _dev_site_dirs()))
    env = {"PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
           "LANG": "C.UTF-8", "COLUMNS": "200"}
    built = subprocess.run(["bash", str(tmp_path / "build.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    assert list(home.glob("edgeweave-*-py3-none-any.whl")), "the build section did not leave a wheel in the device's home"
    pid_file = tmp_path / "state" / "edgeweave-node.pid"
    try:
        result = subprocess.run(
            bed.argv(0, ["unshare", "--mount", "--propagation", "private", "bash", str(tmp_path / "device.sh")]),
            capture_output=True, text=True, env=env, timeout=300)
        journal = tmp_path / "state" / "edgeweave-node.journal"
        report = f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}\n--- node log\n" + (
            journal.read_text()[-3000:] if journal.exists() else "(none)")
        assert result.returncode == 0, report
    finally:
        if pid_file.exists():  # the node, should the walk have died before stopping it
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert "pi-kitchen" in result.stdout and "mdns" in result.stdout, report  # the guide's `edgeweave nodes`
    records = {r["source"]: r for r in json.loads((tmp_path / "peer.json").read_text())}
    static = records["static"]
    assert static["name"] == "pi-kitchen" and static["address"] == "127.0.0.1:50551" and static["rtt_ms"] is not None
    assert static["properties"]["secure"] == "1" and static["properties"]["budget"] == str(2 * 2**30)
    assert (tmp_path / "user.txt").read_text().strip() == "edgeweave"
    modes = dict(line.split(" ", 1) for line in (tmp_path / "modes.txt").read_text().splitlines())
    assert modes == {"/etc/edgeweave": "root:edgeweave 750", "/etc/edgeweave/config.toml": "root:edgeweave 640",
                     "/etc/edgeweave/cluster.secret": "edgeweave:edgeweave 600",
                     "/var/lib/edgeweave": "edgeweave:edgeweave 750"}
    assert (tmp_path / "where.txt").read_text().startswith("/opt/edgeweave/venv/")
