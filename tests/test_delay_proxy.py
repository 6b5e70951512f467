"""The delay proxy (tests/delay_proxy.py) is a faithful wire: the RTT it adds is its delay (not a
millisecond more), bytes keep their order, a half-close passes through, a receiver that does not
read stops the sender instead of filling the proxy, and its command line starts, relays and exits."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from delay_proxy import CHUNK, MAX_CHUNKS, DelayProxy

pytestmark = pytest.mark.serial  # it measures added RTTs to a fraction of a millisecond: alone, not beside the suite

SCRIPT = Path(__file__).with_name("delay_proxy.py")


@contextmanager
def _server(handle) -> Iterator[int]:
    """A TCP server on loopback running `handle(conn)` per connection on a thread; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.shutdown(socket.SHUT_RDWR)


def _echo_until_eof(conn: socket.socket) -> None:
    """Echo everything, and after the peer's half-close one b"END", then close."""
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.sendall(b"END")


def _dial(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _round_trip_ms(conn: socket.socket) -> float:
    t0 = time.perf_counter()
    conn.sendall(b"x" * 64)
    got = 0
    while got < 64:
        got += len(conn.recv(64 - got))
    return (time.perf_counter() - t0) * 1e3


@pytest.mark.parametrize("rtt_ms", [1.0, 4.0])
def test_the_added_round_trip_is_the_delay(rtt_ms):
    """Interleaved with the same ping on the server's own port: proxied - direct = 2 x delay, median
    within +-0.25 ms (the asyncio proxy this replaced measured +2.47 and +4.57 here: ms timers).
    Up to 3 rounds of 150 pings: a VM whose host is busy can wake every sleep late for a second
    (one CI run read +1.53 and +6.09 ms for 1 and 4 ms); a proxy that is off is off in every round."""
    rounds = []
    with _server(_echo_until_eof) as port, DelayProxy(("127.0.0.1", port), delay_s=rtt_ms / 2e3) as proxy, \
            _dial(proxy.port) as far, _dial(port) as near:
        _round_trip_ms(far), _round_trip_ms(near)
        for _ in range(3):
            proxied, direct = [], []
            for _ in range(150):
                proxied.append(_round_trip_ms(far))
                direct.append(_round_trip_ms(near))
            added = statistics.median(proxied) - statistics.median(direct)
            rounds.append((round(added, 3), round(min(proxied), 3)))
            if rtt_ms - 0.25 <= added <= rtt_ms + 0.25 and min(proxied) >= rtt_ms - 0.2:
                return  # held delay - relay cost each way: never much early
    pytest.fail(f"added round trip, earliest proxied ping (ms) per round: {rounds}; want {rtt_ms} +- 0.25")


def test_order_and_half_close_pass_through():
    payload = bytes(range(256)) * 20000  # 5 MB: many chunks in flight at once
    with _server(_echo_until_eof) as port, DelayProxy(("127.0.0.1", port), delay_s=0.002) as proxy, \
            _dial(proxy.port) as conn:
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while data := conn.recv(1 << 20):  # ends only when the server's close comes through
            received += data
        sender.join()
    assert bytes(received) == payload + b"END"


def test_a_receiver_that_does_not_read_stops_the_sender():
    """The proxy holds at most MAX_CHUNKS chunks per direction: with a server that never reads, what
    the sender gets rid of is that plus the kernel's socket buffers, then its sends block."""
    stop = threading.Event()
    with _server(lambda conn: stop.wait()) as port, DelayProxy(("127.0.0.1", port), delay_s=0.0) as proxy, \
            _dial(proxy.port) as conn:
        conn.setblocking(False)
        block, sent, idle_since = b"\0" * CHUNK, 0, time.monotonic()
        while time.monotonic() - idle_since < 1.0:  # 1 s without progress: the sender is held back
            try:
                sent += conn.send(block)
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        stop.set()
    assert sent < MAX_CHUNKS * CHUNK + 48 * 2**20, sent  # bounded, not the 16 GiB a loop could push


@pytest.mark.slow
def test_the_command_line_relays_and_exits_when_stdin_closes():
    with _server(_echo_until_eof) as port:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--exit-on-eof", "--map",
                                 f"127.0.0.1:0=127.0.0.1:{port}@0.5"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            lines = [proc.stdout.readline()]
            while lines[-1] not in ("ready\n", ""):
                lines.append(proc.stdout.readline())
            assert lines[-1] == "ready\n", lines
            [line] = [line for line in lines if line.startswith("delay proxy on ")]
            listen = int(line.split()[3].rsplit(":", 1)[1])  # "delay proxy on HOST:PORT -> ..."
            with _dial(listen) as conn:
                assert _round_trip_ms(conn) >= 0.8
            proc.stdin.close()
            assert proc.wait(10) == 0
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_bad_map_is_one_sentence():
    result = subprocess.run([sys.executable, str(SCRIPT), "--map", "127.0.0.1:1=nowhere"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "is not LISTEN_HOST:PORT=TARGET_HOST:PORT@DELAY_MS" in result.stderr
    assert "Traceback" not in result.stderr
