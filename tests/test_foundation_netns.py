"""Multi-host on one machine: nodes in separate network namespaces, found over real multicast."""

from __future__ import annotations

import json
import socket
import textwrap
import time

import pytest
from delay_proxy import DelayProxy

ECHO_CLIENT = textwrap.dedent("""
    import json, sys, torch
    from edgeweave.coordinator.client import NodeClient
    out = {}
    for address in sys.argv[1:]:
        with NodeClient(address, timeout=20) as client:
            client.load("ns-echo", "echo", {}, {})
            x = torch.randn(64, 576)
            with client.open_stream(reply_timeout=20) as stream:
                (y,), _ = stream.call("ns-echo", "echo", [x])
            out[address] = bool(torch.equal(x, y))
    print(json.dumps(out))
""")


@pytest.mark.root
@pytest.mark.slow
def test_discovery_and_forward_across_namespaces(netns_testbed, tmp_path):
    bed = netns_testbed(3)
    names = [f"ns-node{i}-{bed.prefix[-4:]}" for i in range(2)]
    addresses = [bed.start_node(i, name, tmp_path) for i, name in enumerate(names)]
    assert addresses[0].startswith(bed.ips[0] + ":") and addresses[1].startswith(bed.ips[1] + ":")

    bed.shape(1, rate_mbit=100)  # a shaped link still carries discovery and tensors
    assert "tbf" in bed.run(1, ["tc", "qdisc", "show", "dev", "eth0"]).stdout

    found = bed.python(2, ["-m", "edgeweave", "nodes", "--json", "--interface", bed.ips[2], "--timeout", "10",
                           "--wait-for", "2"])
    assert found.returncode == 0, found.stderr
    records = {r["name"]: r for r in json.loads(found.stdout)}
    for name, address in zip(names, addresses, strict=True):
        assert records[name]["address"] == address and records[name]["source"] == "mdns"
        assert records[name]["rtt_ms"] is not None

    echoed = bed.python(2, ["-c", ECHO_CLIENT, *addresses])
    assert echoed.returncode == 0, echoed.stderr
    assert json.loads(echoed.stdout) == {a: True for a in addresses}
    # and the host itself cannot see the namespaced nodes: the test bed is isolated
    with socket.socket() as s:
        s.settimeout(0.5)
        assert s.connect_ex((bed.ips[0], int(addresses[0].rsplit(":", 1)[1]))) != 0


def _echo_server() -> tuple[socket.socket, int]:
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_delay_proxy_relays_bytes_and_adds_at_least_its_delay():
    server, port = _echo_server()
    with server, DelayProxy(("127.0.0.1", port), delay_s=0.02) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as conn:
        payload = bytes(range(256)) * 400
        start = time.perf_counter()
        conn.sendall(payload)
        received = b""
        while len(received) < len(payload):
            received += conn.recv(65536)
        elapsed = time.perf_counter() - start
    assert received == payload
    assert elapsed >= 0.04  # two one-way delays are a floor, whatever the machine's load
