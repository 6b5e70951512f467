"""Split computing through real node daemons: two local processes, then two network namespaces.

Every mode (all local, full offload, bottleneck split) must give the predictions of the
same graphs run in this process with torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from split_helpers import demo_artifacts, sample_images

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.split_driver import MODES, SplitSession, classify_adaptively, image_as_uint8
from edgeweave.security import create_secret
from edgeweave.splitting.bottleneck import load_student, load_teacher
from edgeweave.splitting.split_planner import Link, Replanner

#: tolerance on split logits: ONNX and torch heads differ by ~1e-6, which can move a value across a
#: rounding boundary of the uint8 bottleneck (one step); local and offload carry no such rounding.
ATOL = {"local": 1e-4, "offload": 1e-4, "split": 5e-2}


def reference_logits(directory: Path, images: torch.Tensor, per_image: bool = False) -> dict[str, torch.Tensor]:
    """In-process torch: the teacher for local/offload (offload sees the uint8 pixels), the student for split
    (it quantizes the bottleneck to uint8 like the wire: per call, so per image when images travel one by one)."""
    teacher, _ = load_teacher(directory)
    student, _, _ = load_student(directory)
    with torch.no_grad():
        split = torch.cat([student(x[None]) for x in images]) if per_image else student(images)
        return {"local": teacher(images), "offload": teacher(image_as_uint8(images).dequantize()), "split": split}


@pytest.mark.slow
def test_split_modes_through_two_local_nodes_match_in_process():
    directory = demo_artifacts()
    images, _ = sample_images(16)
    want = reference_logits(directory, images)
    with LocalCluster(2, advertise=False) as cluster:
        device, server = (NodeClient(a, timeout=30) for a in cluster.addresses)
        with device, server, SplitSession(directory, device, server) as session:
            for mode in MODES:
                got = session.classify(images, mode)
                assert torch.equal(got.argmax(1), want[mode].argmax(1)), mode
                assert torch.allclose(got, want[mode], atol=ATOL[mode]), mode
            assert session.bytes_up("split") <= 0.25 * images[0].numel() * 4

            # re-planning: start from a link believed to carry 1 kbit/s (so all-local wins); the first
            # re-measurement of the real loopback link moves bandwidth far past the threshold
            replanner = Replanner(session.time_candidates(images[:1]), Link(bandwidth_bps=1e3, rtt_s=0.1))
            assert replanner.current.choice.kind == "local"
            logits, used, replans = classify_adaptively(session, server, replanner, images[:6], every=2)
            assert replans and replans[0]["image"] == 2 and replans[0]["bandwidth_mbit"] > 1.0
            assert used[:2] == ["local", "local"] and used[2] == replans[0]["mode"]
            for i, mode in enumerate(used):
                assert int(logits[i].argmax()) == int(want[mode][i].argmax()), (i, mode)

            # a wrong tensor gets INVALID_ARGUMENT and a sentence; the node keeps serving
            head_job = session.jobs[("device", "head")].job_id
            with device.open_stream(reply_timeout=30) as stream, pytest.raises(NodeError) as err:
                stream.call(head_job, "run", [torch.rand(1, 3, 28, 28)])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "must have shape" in err.value.message
            assert torch.equal(session.classify(images, "split").argmax(1), want["split"].argmax(1))


@pytest.mark.root
@pytest.mark.slow
def test_split_across_two_namespaces_matches_in_process(netns_testbed, tmp_path):
    directory = demo_artifacts()
    bed = netns_testbed(2)  # host 0: the device (node + coordinator), host 1: the server
    secret = str(create_secret(tmp_path / "cluster.secret"))  # both nodes and the coordinator share it
    addresses = [bed.start_node(i, f"split-{i}-{bed.prefix[-4:]}", tmp_path, ["--no-advertise", "--secret-file", secret])
                 for i in range(2)]
    for host in range(2):
        bed.shape(host, rate_mbit=10)
    n = 8
    result = bed.python(0, ["-m", "edgeweave", "--secret-file", secret, "split", "run", "--device-peer", addresses[0], "--server-peer",
                            addresses[1], "--artifacts", str(directory), "--images", str(n), "--mode", "all", "--json"],
                        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    images, _ = sample_images(n)
    want = reference_logits(directory, images, per_image=True)
    for mode in MODES:
        got = torch.tensor(report["modes"][mode]["logits"])
        assert report["modes"][mode]["predictions"] == want[mode].argmax(1).tolist(), mode
        assert torch.allclose(got, want[mode], atol=ATOL[mode]), mode
    link = report["plan"]["link"]
    assert 2e6 < link["bandwidth_bps"] < 20e6  # the measured link sees the 10 Mbit/s token bucket
