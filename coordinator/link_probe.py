"""What the link to a node costs, and what one more message costs the coordinator itself.

Link (per node, `probe_link`): an echo job on the node, and the Forward stream the driver would
open to it (`NodeClient.open_stream`: the raw-TCP data plane, with TLS, when the node has one,
else gRPC; `LinkCosts.transport` says which). RTT is the median of ~20 round trips of a
decode-sized message ([1, hidden] float32) through the codec, the wire and the node's own
`handle_forward`: exactly what a decode step's message pays apart from compute. Bandwidth is
timed with one bigger echo (up to a few MB, sized from a first 256 KiB one so it stays within
the time budget): 2 x bytes / (its round trip - RTT), both directions counted.

Fan-out (`probe_fanout`): the same echo to every node at once, as a reduction runs (all sends,
then all receives). Its excess over the slowest single RTT, per further node, is what each more
message of a reduction really costs: at least `message_cost_s`, more where nodes share the
coordinator's cores (a local cluster: measured 0.5 ms per extra message on 2 busy cores, against
0.1 ms of the coordinator's own Python).

Reductions with work (`EchoReductions.median_s` with `works_s`): the same fan-out, each node
first busy for the device time its share of an op would take (the echo executor's op "work"), as
a real tensor-parallel reduction keeps them: what the nodes' message handling, their wake-ups and
the hub's serial sends and receives cost while every rank computes, which echoes of idle nodes
do not show (`layout_choice.measure_reductions` turns it into the planner's X_R,op).

Coordinator (`message_cost_s`): the hub sends to every rank of a reduction and then reads every
reply in one thread, so each message after the first costs the coordinator its own Python work
in series: build and serialize the ForwardRequest (the client's own `_request`, codec included),
the kernel's send and receive copies (timed on a local socket pair), parse and decode the reply
(`_reply_tensors`) and add it into the sum. No node and no wire are in it (nor TLS records: those
are in the RTT of the first message).
"""

from __future__ import annotations

import itertools
import select
import socket
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgeweave.coordinator.client import ForwardCalls, NodeClient, RawForwardStream, _reply_tensors
from edgeweave.proto import pb
from edgeweave.proto.framing import HEADER
from edgeweave.runtime.codec import encode
from edgeweave.runtime.layer_compute import torch_threads
from edgeweave.runtime.layer_profile import sustained_seconds

ROUND_TRIPS = 20
#: the most bytes one bandwidth echo carries each way
BULK_BYTES = 4 << 20
FIRST_BULK_BYTES = 256 << 10
#: the socket copies of one message are timed in pieces of this (a socket pair's buffer holds one)
_PIECE = 1 << 16


@dataclass(frozen=True)
class LinkCosts:
    rtt_s: float  # median round trip of a [1, hidden] float32 message
    bandwidth_Bps: float  # bytes per second, each way
    transport: str  # "tcp" (raw data plane) or "grpc"
    round_trips: int  # small round trips timed
    bulk_bytes: int  # bytes each way of the bandwidth echo


def probe_link(client: NodeClient, hidden: int, round_trips: int = ROUND_TRIPS, bulk_bytes: int = BULK_BYTES,
               budget_s: float = 1.0) -> LinkCosts:
    """RTT and bandwidth of the Forward stream to `client`'s node (module docstring), in about `budget_s`."""
    start = time.perf_counter()
    job = f"link-probe-{uuid.uuid4().hex[:12]}"
    client.load(job, "echo", {}, {})
    try:
        with client.open_stream(reply_timeout=max(10.0, 4 * budget_s)) as stream:
            small = torch.zeros(1, hidden)
            for _ in range(3):  # warm: first frames, TLS records, the node's thread
                stream.call(job, "echo", [small])
            samples: list[float] = []
            while len(samples) < round_trips:
                t0 = time.perf_counter()
                stream.call(job, "echo", [small])
                samples.append(time.perf_counter() - t0)
                if len(samples) >= 5 and time.perf_counter() - start > budget_s / 2:
                    break
            rtt = statistics.median(samples)

            def echo(nbytes: int) -> float:
                rows = max(1, nbytes // (4 * hidden))
                t0 = time.perf_counter()
                stream.call(job, "echo", [torch.zeros(rows, hidden)])
                return time.perf_counter() - t0

            first = max(echo(FIRST_BULK_BYTES) - rtt, 1e-9)
            estimate = 2 * FIRST_BULK_BYTES / first
            left = max(budget_s - (time.perf_counter() - start), 0.0)
            size = int(min(bulk_bytes, max(FIRST_BULK_BYTES, estimate * left / 2 / 2)))
            if size > FIRST_BULK_BYTES:
                seconds = max(echo(size) - rtt, 1e-9)
            else:
                size, seconds = FIRST_BULK_BYTES, first
            transport = "tcp" if isinstance(stream, RawForwardStream) else "grpc"
            return LinkCosts(rtt, 2 * size / seconds, transport, len(samples), size)
    finally:
        client.unload(job)


class EchoReductions:
    """An echo job and a Forward stream on every node, to time reductions as the hub runs them
    (every send, then every receive, [1, hidden] float32): `probe_fanout`, and the layout
    planner's reductions with every rank busy (`layout_choice.measure_reductions`). Loaded once
    for many timings; a context manager that unloads what it loaded."""

    def __init__(self, clients: Sequence[NodeClient], hidden: int, reply_timeout: float = 10.0) -> None:
        self.clients, self.small = list(clients), torch.zeros(1, hidden)
        self.job = f"link-probe-{uuid.uuid4().hex[:12]}"
        self.reply_timeout = reply_timeout
        self._loaded: list[NodeClient] = []
        self.streams: list = []

    def __enter__(self) -> EchoReductions:
        try:
            for client in self.clients:
                client.load(self.job, "echo", {}, {})
                self._loaded.append(client)
                self.streams.append(client.open_stream(reply_timeout=self.reply_timeout))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        for client in self._loaded:
            client.unload(self.job)
        self.streams, self._loaded = [], []

    def median_s(self, members: Sequence[int], works_s: Sequence[float] | None = None,
                 round_trips: int = 3 * ROUND_TRIPS, budget_s: float = 0.5) -> float:
        """Median seconds of one reduction over the nodes `members` (indexes into the clients),
        each first busy for its `works_s` of device time (op "work" of the echo executor; None:
        plain echoes). At least 5 timed reductions after 2 warm ones, more while `budget_s` lasts."""
        start = time.perf_counter()
        self.time_s(members, works_s, 2)  # warm
        samples = self.time_s(members, works_s)
        while len(samples) < round_trips and (len(samples) < 5 or time.perf_counter() - start < budget_s):
            samples += self.time_s(members, works_s)
        return statistics.median(samples)

    def time_s(self, members: Sequence[int], works_s: Sequence[float] | None = None, count: int = 1) -> list[float]:
        """Seconds of each of `count` reductions over `members` back to back (as `median_s`)."""
        streams = [self.streams[i] for i in members]
        if works_s is None:
            messages = [("echo", [self.small])] * len(streams)
        else:
            messages = [("work", [self.small, torch.tensor([w], dtype=torch.float32)]) for w in works_s]
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            for stream, (op, tensors) in zip(streams, messages, strict=True):
                stream.send(self.job, op, tensors)
            for stream in streams:
                stream.recv()
            out.append(time.perf_counter() - t0)
        return out


def probe_fanout(clients: Sequence[NodeClient], hidden: int, round_trips: int = 3 * ROUND_TRIPS,
                 budget_s: float = 0.5) -> float:
    """Median seconds of one echo "reduction" over all `clients` as the hub runs one (every send,
    then every receive, [1, hidden] float32): the RTT of the slowest plus what each further
    message really costs here, co-located nodes competing for the same cores included."""
    with EchoReductions(clients, hidden, reply_timeout=max(10.0, 4 * budget_s)) as echoes:
        return echoes.median_s(range(len(clients)), None, round_trips, budget_s)


def message_cost_s(hidden: int, tokens: int = 1, budget_s: float = 0.1, threads: int | None = None) -> float:
    """Sustained seconds this process spends on one more message of a reduction (module docstring),
    with torch on `threads` (the hub's: 1 beside a quantized LM head, see `runtime.tp_hub`)."""
    calls = ForwardCalls()
    calls.address, calls._closed, calls._seq = "local", False, itertools.count(1)
    x = torch.randn(tokens, hidden)
    reply = pb.ForwardReply(seq=1, tensors=[pb.Tensor(**encode(x))], compute_s=1e-3).SerializeToString()
    total = torch.zeros(tokens, hidden)
    a, b = socket.socketpair()
    buffer = bytearray(_PIECE)

    def one() -> None:
        body = calls._request("job", "attn", [x], 1, 100, "session").SerializeToString()
        frame = memoryview(HEADER.pack(len(body)) + body)
        select.select([a], [], [], 0)  # the stream's idle-close check before a send
        for at in range(0, len(frame), _PIECE):  # the send's copy into the kernel and the receive's out
            a.sendall(frame[at:at + _PIECE])
            got = 0
            while got < len(frame[at:at + _PIECE]):
                got += b.recv_into(buffer)
        total.add_(_reply_tensors(pb.ForwardReply.FromString(reply), False)[0])

    try:
        with torch_threads(threads or torch.get_num_threads()):
            one()
            return sustained_seconds(one, budget_s)[0]
    finally:
        a.close()
        b.close()
