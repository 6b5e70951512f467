"""Tensor-parallel SmolLM2 across hosts: two nodes and the coordinator in separate network
namespaces, found over real multicast, must generate exactly Hugging Face's greedy tokens."""

from __future__ import annotations

import json
import os

import pytest
from llm_reference import CHAT, hf_reference

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.llm]


def test_generation_across_namespaces_matches_transformers(netns_testbed, tmp_path):
    reference = hf_reference()
    bed = netns_testbed(3)  # hosts 0 and 1: nodes; host 2: the coordinator
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    addresses = [bed.start_node(i, f"tp-node{i}-{bed.prefix[-4:]}", tmp_path, env=env) for i in range(2)]

    result = bed.python(2, [
        "-m", "edgeweave", "run", "--json", "--quantize", "none", "--interface", bed.ips[2], "--discovery-timeout", "6",
        "--weights", "2,1", "--max-tokens", str(len(reference.tokens)), "--prompt", CHAT[0]["content"],
    ], timeout=400, env={**env, "EDGEWEAVE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert sorted(node["address"] for node in out["nodes"]) == sorted(addresses)  # found by mDNS, not given
    assert out["tokens"] == reference.tokens
