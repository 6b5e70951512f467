"""A real `edgeweave serve` process for the serving tests: started on a free port, waited for until
it announces itself (then its first /health must answer), stopped afterwards (its output goes to
a log that failures quote)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], tmp: Path, env: dict[str, str] | None = None,
                  timeout_s: float = 180) -> Iterator[str]:
    """`edgeweave serve --port P *args` with $EDGEWEAVE_CACHE under `tmp`; yields its base URL."""
    port = free_port()
    log = tmp / "serve.log"
    argv = [sys.executable, "-m", "edgeweave", "serve", "--port", str(port), *args]
    full_env = {**os.environ, "EDGEWEAVE_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while f"on {url}/v1" not in log.read_text():  # serve says so only once it accepts connections
            if proc.poll() is not None:
                pytest.fail(f"edgeweave serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"edgeweave serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        # so the very first request after the announcement must be answered: no retry here
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200, log.read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
