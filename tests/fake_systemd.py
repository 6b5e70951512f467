"""Just enough of systemctl/journalctl for tests/test_deploy.py's walk of docs/deploy.md.

The test machines have systemd installed but not running (containers), so `systemctl enable --now`
is carried out here the way systemd would for our unit: create its StateDirectory for its User,
then start its ExecStart as that user and group, with only its Environment= (plus what systemd
itself sets: PATH, HOME, USER, LOGNAME), its UMask and its WorkingDirectory. The log goes to a file
that `journalctl -u` prints. Every directive the unit sets that this emulation does not apply is
a sandboxing option (checked by systemd-analyze in the test instead).

    fake_systemd.py STATE_DIR systemctl daemon-reload | enable --now UNIT | status UNIT | stop UNIT
    fake_systemd.py STATE_DIR journalctl -u UNIT [...]
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")


def read_unit(name: str) -> dict[str, list[str]]:
    """`Key=value` lines of the [Service] section, a list per key (Environment= repeats)."""
    path = UNIT_DIR / (name if name.endswith(".service") else f"{name}.service")
    if not path.exists():
        sys.exit(f"Unit {path.name} not found in {UNIT_DIR}.")
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def start(state: Path, name: str) -> None:
    unit = read_unit(name)
    user = pwd.getpwnam(unit["User"][-1])
    group = unit.get("Group", [user.pw_name])[-1]
    for directory in unit.get("StateDirectory", []):
        path = Path("/var/lib") / directory
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(int(unit.get("StateDirectoryMode", ["0755"])[-1], 8))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir,
           "USER": user.pw_name, "LOGNAME": user.pw_name}
    for assignment in unit.get("Environment", []):
        for item in shlex.split(assignment):
            key, _, value = item.partition("=")
            env[key] = value
    argv = shlex.split(unit["ExecStart"][-1])
    umask = int(unit.get("UMask", ["0022"])[-1], 8)
    log = open(state / f"{name}.journal", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_name}", f"--regid={group}", "--init-groups", "--", *argv],
        env=env, cwd=unit.get("WorkingDirectory", ["/"])[-1], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=lambda: os.umask(umask),
    )
    (state / f"{name}.pid").write_text(str(proc.pid))
    print(f"fake systemd: started {name} as {user.pw_name}, pid {proc.pid}")


def running(state: Path, name: str) -> int | None:
    pid_file = state / f"{name}.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def stop(state: Path, name: str) -> None:
    pid = running(state, name)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)  # KillSignal=SIGTERM, then SIGKILL after a TimeoutStopSec
    deadline = time.monotonic() + 20
    while running(state, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(state, name):
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> None:
    state, tool, *args = argv
    state_dir = Path(state)
    if tool == "journalctl":
        name = args[args.index("-u") + 1]
        journal = state_dir / f"{name}.journal"
        print(journal.read_text() if journal.exists() else f"-- No entries for {name} --")
        return
    command, *rest = args
    names = [a for a in rest if not a.startswith("-")]
    if command == "daemon-reload":
        return
    if command == "enable" and "--now" in rest:
        start(state_dir, names[0])
    elif command == "status":
        pid = running(state_dir, names[0])
        print(f"{names[0]}.service: " + (f"active (running), main PID {pid}" if pid else "inactive (dead)"))
        if pid is None:
            sys.exit(3)
    elif command == "stop":
        stop(state_dir, names[0])
    else:
        sys.exit(f"fake systemd: systemctl {' '.join(args)} is not emulated")


if __name__ == "__main__":
    main(sys.argv[1:])
