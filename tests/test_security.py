"""Cluster membership: mutual TLS from a shared secret, refusal of outsiders, no secret on mDNS."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from edgeweave import security
from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.discovery import NodeWatcher
from edgeweave.coordinator.identity import Identity
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.proto import pb, pb_grpc


def _edgeweave(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_member_of_the_cluster_is_served(local_node):
    with NodeClient(local_node.addresses[0]) as client:
        info = client.info()
    assert info.secure is True
    assert info.name == local_node.names[0]


def test_wrong_secret_is_refused_as_unauthenticated(local_node):
    outsider = security.issue_member_material(os.urandom(32), "outsider")
    client = NodeClient(
        local_node.addresses[0], timeout=5,
        credentials=security.channel_credentials(outsider), extra_options=security.CHANNEL_NAME_OVERRIDE,
    )
    with client, pytest.raises(NodeError) as caught:
        client.health()
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "cluster secret" in caught.value.message


def test_plaintext_call_is_refused(local_node):
    with grpc.insecure_channel(local_node.addresses[0]) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.NodeStub(channel).Health(pb.HealthRequest(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # the TLS handshake never completes
    # ... and the node keeps serving its members
    with NodeClient(local_node.addresses[0]) as client:
        assert client.health().status == "SERVING"


def test_init_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "cfg" / "cluster.secret"
    first = _edgeweave("init", "--secret-file", str(target))
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(bytes.fromhex(target.read_text().strip())) == security.SECRET_BYTES
    again = _edgeweave("init", "--secret-file", str(target))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert _edgeweave("init", "--secret-file", str(target), "--force").returncode == 0


def test_node_without_secret_refuses_to_start_with_instructions(tmp_path):
    result = _edgeweave(
        "node", "--port", "0", "--host", "127.0.0.1", "--no-advertise", "--data-dir", str(tmp_path),
        env={"EDGEWEAVE_CLUSTER_SECRET_FILE": str(tmp_path / "missing.secret")},
    )
    assert result.returncode == 2
    assert "edgeweave init" in result.stderr and "--insecure" in result.stderr


def test_same_secret_derives_the_same_cluster():
    secret = os.urandom(32)
    a, b = security.issue_member_material(secret, "a"), security.issue_member_material(secret, "b")
    assert a.key_pem != b.key_pem  # every member has its own key ...
    assert security.cluster_fingerprint(secret) == security.cluster_fingerprint(secret)  # ... one CA
    assert security.cluster_fingerprint(secret) != security.cluster_fingerprint(os.urandom(32))


@pytest.mark.slow
def test_mdns_announcement_carries_no_secret(tmp_path):
    secret_hex = Path(os.environ["EDGEWEAVE_CLUSTER_SECRET_FILE"]).read_text().strip()
    with NodeWatcher(["127.0.0.1"]) as watcher, LocalCluster(1, base_dir=tmp_path) as cluster:
        name = cluster.names[0]
        assert watcher.wait(lambda nodes: any(r.name == name for r in nodes.values()), timeout=5)
        record = next(r for r in watcher.nodes.values() if r.name == name)
    text = " ".join(f"{k}={v}" for k, v in record.properties.items())
    assert record.properties["secure"] == "1"
    assert secret_hex not in text and secret_hex[:16] not in text


@pytest.mark.slow
def test_insecure_mode_is_plaintext_and_logged(tmp_path):
    cluster = LocalCluster(1, base_dir=tmp_path, advertise=False, cluster_identity=Identity(None, None))
    with cluster:
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            reply = pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=5)
        assert reply.secure is False
        log = cluster.log_path(0).read_text()
    assert "INSECURE MODE" in log
