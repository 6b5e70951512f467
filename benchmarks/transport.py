"""Transport floor vs. our Forward path, side by side in one run, on loopback.

Compares, for each payload size: raw TCP echo (length-prefixed, a tiny socket server in its own
process), gRPC unary Echo, gRPC EchoStream (bidi, one message in flight), and the Forward stream
through the codec and the echo executor, over gRPC and over the node's raw-TCP data plane (TLS). Median round trip, and throughput counted as payload
bytes moved both ways per second. The ratio Forward/EchoStream at 16 KiB is the codec+executor
overhead a decode step pays per layer half (goal <= 1.5x).

    python benchmarks/transport.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.proto import pb

SIZES = {"4 KiB": 4 << 10, "16 KiB": 16 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}
TCP_SERVER = """
import socket, struct, sys
server = socket.create_server(("127.0.0.1", 0)); print(server.getsockname()[1], flush=True)
conn, _ = server.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def exact(n):
    buf = bytearray(n); view = memoryview(buf); got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k: sys.exit(0)
        got += k
    return buf
while True:
    (n,) = struct.unpack("<Q", exact(8)); conn.sendall(struct.pack("<Q", n) + exact(n))
"""


def iterations(size: int, quick: bool) -> int:
    n = 400 if size <= 64 << 10 else 40 if size <= 1 << 20 else 6
    return max(3, n // 4) if quick else n


def measure_interleaved(fns: dict, n: int) -> dict[str, float]:
    """Median seconds per call of each fn, taking turns so that load changes hit all paths alike."""
    for fn in fns.values():
        for _ in range(max(2, n // 10)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


class TcpEcho:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", TCP_SERVER], stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(self, payload: bytes) -> None:
        self.conn.sendall(struct.pack("<Q", len(payload)) + payload)
        header = self.conn.recv(8, socket.MSG_WAITALL)
        (n,) = struct.unpack("<Q", header)
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            got += self.conn.recv_into(view[got:])

    def close(self) -> None:
        self.conn.close()
        self.proc.kill()
        self.proc.wait()


class EchoStream:
    def __init__(self, client: NodeClient) -> None:
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = client.stub.EchoStream(iter(self.requests.get, None))
        self.replies = iter(self.call)

    def round_trip(self, message: pb.EchoMessage) -> None:
        self.requests.put(message)
        next(self.replies)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    rows = []
    with LocalCluster(1, advertise=False) as cluster, NodeClient(cluster.addresses[0], timeout=60) as client:
        client.load("bench-echo", "echo", {}, {})
        tcp, echo_stream, forward = TcpEcho(), EchoStream(client), client.open_stream(reply_timeout=60, transport="grpc")
        forward_tcp = client.open_stream(reply_timeout=60, transport="tcp")
        try:
            for label, size in SIZES.items():
                n = iterations(size, args.quick)
                payload = bytes(size)
                message = pb.EchoMessage(data=payload)
                tensor = torch.randn(size // 4)
                results = measure_interleaved({
                    "raw TCP": lambda p=payload: tcp.round_trip(p),
                    "gRPC Echo": lambda m=message: client.stub.Echo(m, timeout=60),
                    "gRPC EchoStream": lambda m=message: echo_stream.round_trip(m),
                    "Forward (codec)": lambda t=tensor: forward.call("bench-echo", "echo", [t]),
                    "Forward raw TCP": lambda t=tensor: forward_tcp.call("bench-echo", "echo", [t]),
                }, n)
                for path, seconds in results.items():
                    rows.append({"size": label, "bytes": size, "path": path, "iterations": n,
                                 "median_rtt_us": seconds * 1e6, "throughput_gbps": 2 * size / seconds / 1e9})
        finally:
            tcp.close()
            echo_stream.close()
            forward.close()
            forward_tcp.close()

    def rtt(size: str, path: str) -> float:
        return next(r["median_rtt_us"] for r in rows if r["size"] == size and r["path"] == path)

    ratio = rtt("16 KiB", "Forward (codec)") / rtt("16 KiB", "gRPC EchoStream")
    tcp_ratio = rtt("16 KiB", "Forward raw TCP") / rtt("16 KiB", "raw TCP")
    table = Table(title="loopback round trips (median)")
    for column in ("size", "path", "n", "RTT µs", "GB/s", "vs raw TCP"):
        table.add_column(column, justify="right" if column not in ("size", "path") else "left")
    for r in rows:
        table.add_row(r["size"], r["path"], str(r["iterations"]), f"{r['median_rtt_us']:.0f}",
                      f"{r['throughput_gbps']:.3f}", f"{r['median_rtt_us'] / rtt(r['size'], 'raw TCP'):.1f}x")
    console = Console()
    console.print(table)
    console.print(f"Forward / EchoStream at 16 KiB: {ratio:.2f}x (goal <= 1.5x)")
    console.print(f"Forward raw TCP / raw TCP at 16 KiB: {tcp_ratio:.2f}x (TLS + codec + executor on the data plane)")
    out = Path(__file__).resolve().parent / "results" / "transport.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "forward_over_echostream_16k": ratio,
                               "forward_tcp_over_raw_tcp_16k": tcp_ratio}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
