"""Tensor-parallel SmolLM2 across hosts: two nodes and the coordinator in separate network
namespaces, found over real multicast, must generate exactly Hugging Face's greedy tokens."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from llm_reference import CHAT, hf_reference

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.llm]


def _wait_ready(path: Path, proc, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"node exited with {proc.returncode}"
        assert time.monotonic() < deadline, "node not ready in time"
        time.sleep(0.1)
    return json.loads(path.read_text())


def test_generation_across_namespaces_matches_transformers(netns_testbed, tmp_path):
    reference = hf_reference()
    bed = netns_testbed(3)  # hosts 0 and 1: nodes; host 2: the coordinator
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    addresses = []
    for i in range(2):
        name = f"tp-node{i}-{bed.prefix[-4:]}"
        ready = tmp_path / f"{name}.ready.json"
        with open(tmp_path / f"{name}.log", "wb") as log:
            proc = bed.popen(i, [sys.executable, "-m", "edgeweave", "node", "--name", name, "--host", bed.ips[i],
                                 "--interface", bed.ips[i], "--port", "0", "--data-dir", str(tmp_path / name),
                                 "--ready-file", str(ready)], stdout=log, stderr=log, env=env)
        addresses.append(_wait_ready(ready, proc)["address"])

    result = bed.python(2, [
        "-m", "edgeweave", "run", "--json", "--interface", bed.ips[2], "--discovery-timeout", "6",
        "--weights", "2,1", "--max-tokens", str(len(reference.tokens)), "--prompt", CHAT[0]["content"],
    ], timeout=400, env={**env, "EDGEWEAVE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert sorted(node["address"] for node in out["nodes"]) == sorted(addresses)  # found by mDNS, not given
    assert out["tokens"] == reference.tokens
