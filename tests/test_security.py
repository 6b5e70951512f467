"""Cluster membership: mutual TLS from a shared secret, refusal of outsiders, no secret on mDNS."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from delay_proxy import DelayProxy

from edgeweave import security
from edgeweave.coordinator import identity
from edgeweave.coordinator.client import FIRST_CONTACT_S, PROBE_TIMEOUT_S, NodeClient, NodeError
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
        assert reply.secure is False and reply.cluster == security.INSECURE_FINGERPRINT
        error, took = _first_call_error(cluster.addresses[0])  # this process is a secure member
        assert "speaks plaintext" in error.message and took < 3, (error, took)
        log = cluster.log_path(0).read_text()
    assert "INSECURE MODE" in log


def _first_call_error(address: str, **kwargs) -> tuple[NodeError, float]:
    """The NodeError of a first Info call with a long deadline, and how long it took to come."""
    began = time.monotonic()
    with NodeClient(address, timeout=30, **kwargs) as client, pytest.raises(NodeError) as caught:
        client.info()
    return caught.value, time.monotonic() - began


def _other_cluster(tmp_path: Path) -> Identity:
    path = security.create_secret(tmp_path / "other.secret")
    return Identity(path, security.issue_member_material(security.load_secret(path), "coordinator"))


def test_fingerprint_travels_in_info_and_in_the_certificate(local_node):
    ours = identity.current()
    assert ours.fingerprint == security.cluster_fingerprint(security.load_secret(ours.secret_file))
    with NodeClient(local_node.addresses[0]) as client:
        assert client.info().cluster == ours.fingerprint
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificate(ours.material.cert_pem).public_bytes(serialization.Encoding.DER)
    assert security.certificate_fingerprint(leaf) == ours.fingerprint
    assert Identity(None, None).fingerprint == security.INSECURE_FINGERPRINT


def test_insecure_coordinator_is_told_the_node_requires_tls(local_node):
    error, took = _first_call_error(local_node.addresses[0], cluster=Identity(None, None))
    assert error.code is grpc.StatusCode.UNAUTHENTICATED
    assert "requires TLS" in error.message and "--insecure" in error.message
    assert identity.current().fingerprint in error.message
    assert took < 3, took


def test_coordinator_of_another_cluster_is_told_so_with_both_fingerprints(local_node, tmp_path):
    other = _other_cluster(tmp_path)
    error, took = _first_call_error(local_node.addresses[0], cluster=other)
    assert error.code is grpc.StatusCode.UNAUTHENTICATED
    assert f"another cluster (fingerprint {identity.current().fingerprint}; ours is {other.fingerprint})" in error.message
    assert took < 3, took


def test_static_peer_of_another_cluster_is_named_by_the_cli(local_node, tmp_path):
    other = _other_cluster(tmp_path)
    result = _edgeweave("--secret-file", str(other.secret_file), "run", "--peer", local_node.addresses[0], "-p", "hi")
    assert result.returncode == 2, result.stderr
    assert local_node.addresses[0] in result.stderr and "another cluster" in result.stderr
    assert "Traceback" not in result.stderr


def test_closed_port_and_black_hole_are_told_apart_quickly():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    refused, refused_s = _first_call_error(closed)
    assert "nothing listens there" in refused.message and refused_s < 3, refused_s
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)  # connections complete in the kernel, nothing ever answers
        silent, silent_s = _first_call_error(f"127.0.0.1:{hole.getsockname()[1]}")
    assert silent.code is grpc.StatusCode.UNAVAILABLE and "never answers" in silent.message
    assert silent_s < FIRST_CONTACT_S + PROBE_TIMEOUT_S + 2, silent_s  # not the 30 s deadline


def test_a_slow_link_to_a_live_node_gets_its_full_deadline(local_node):
    """1.2 s round trips: the first call needs more than FIRST_CONTACT_S, the probe finds a live
    TLS server, and the call goes on instead of being cut short."""
    host, port = local_node.addresses[0].rsplit(":", 1)
    with DelayProxy((host, int(port)), delay_s=0.6) as proxy, NodeClient(f"127.0.0.1:{proxy.port}", timeout=30) as client:
        began = time.monotonic()
        assert client.info().name == local_node.names[0]
    assert time.monotonic() - began > FIRST_CONTACT_S  # it really was slower than the contact budget
