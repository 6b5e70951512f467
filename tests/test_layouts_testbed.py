"""Layouts across emulated devices: tensor, pipeline and hybrid runs over three nodes, each in its
own network namespace and cgroup (one behind a delayed Wi-Fi-class link), give the greedy tokens of
the single-node run; a pipeline is bitwise the single-node computation (same kernels, whole layers)."""

from __future__ import annotations

import json
import os
import textwrap

import edge_cgroups
import pytest
from edge_profiles import device, link
from edge_testbed import EdgeTestbed

from edgeweave.security import create_secret
from edgeweave.splitting.random_llama import write_random_llama

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.llm,
              pytest.mark.skipif(os.geteuid() == 0 and edge_cgroups.available() is not None,
                                 reason=f"no usable cgroups: {edge_cgroups.available()}")]

#: runs in the coordinator's namespace: each layout's tokens, and its logits' largest distance
#: from the single-node run's
DRIVER = textwrap.dedent("""
    import json, sys
    import torch
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.layouts import parse_layout
    model, runs, prompt, *peers = sys.argv[1:]
    checkpoint = open_checkpoint(model or None)
    clients = [NodeClient(p, timeout=60) for p in peers]
    out, reference = {}, None
    for name, layout, n in json.loads(runs):
        with DistributedLlama(checkpoint, clients[:n], [1.0] * n, layout=parse_layout(layout)) as llm:
            logits = []
            tokens = list(llm.generate(json.loads(prompt), 16, logits_out=logits))
            stacked = torch.stack(logits)
            reference = stacked if reference is None else reference
            steps = min(len(stacked), len(reference))
            out[name] = {"tokens": tokens, "layout": llm.layout.describe(), "messages": llm.messages_per_token,
                         "max_diff": float((stacked[:steps] - reference[:steps]).abs().max())}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def bed_peers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts-bed")
    # full cores here (the limits' own test is test_edge_testbed.py); node 3 behind a 4 ms link
    specs = [(device("pi4", cpu_fraction=1.0), link("ethernet"))] * 2 + [(device("pi4", cpu_fraction=1.0), link("wifi"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEWEAVE_CACHE": str(folder / "cache"),
           "EDGEWEAVE_CLUSTER_SECRET_FILE": str(create_secret(folder / "cluster.secret"))}
    with EdgeTestbed(specs) as bed:
        yield bed, bed.start_nodes(folder, args=["--no-advertise"], env=env), env, folder


def _run(bed_peers, model: str, runs: list) -> dict:
    bed, peers, env, _ = bed_peers
    done = bed.run_python(DRIVER, model, json.dumps(runs), json.dumps(list(range(5, 25))), *peers, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_random_llama_gives_the_same_tokens_in_every_layout(bed_peers):
    model = write_random_llama(bed_peers[3] / "tiny", "tiny")
    out = _run(bed_peers, str(model), [["single", "tensor", 1], ["tensor", "tensor", 3], ["pipeline", "pipeline", 3],
                                       ["hybrid", "hybrid:2x2,2x1", 3]])
    assert [out[k]["layout"] for k in out] == ["single", "tensor x3", "pipeline 0-1|2-2|3-3", "hybrid 0-1 x2|2-3"]
    assert [out[k]["messages"] for k in out] == [1, 8, 3, 5]
    for name in ("tensor", "pipeline", "hybrid"):
        assert out[name]["tokens"] == out["single"]["tokens"], name
        assert out[name]["max_diff"] < 1e-4, name
    assert out["pipeline"]["max_diff"] == 0.0  # the same kernels over the same whole layers


def test_smollm_pipeline_is_bitwise_the_single_node_run(bed_peers):
    """The shipped Q4_1 GGUF: three stages over three namespaces, one of them behind the delayed link."""
    out = _run(bed_peers, "", [["single", "tensor", 1], ["pipeline", "pipeline", 3]])
    assert out["pipeline"]["layout"] == "pipeline 0-9|10-19|20-29"
    assert out["pipeline"]["tokens"] == out["single"]["tokens"] and out["pipeline"]["max_diff"] == 0.0
