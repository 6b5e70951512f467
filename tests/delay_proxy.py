"""A TCP proxy that adds a fixed one-way delay to every chunk, in both directions.

`tc netem` is not available here, so link latency is emulated at the TCP level: each chunk read
from one side is written to the other `delay_s` later (order preserved, no throughput cap).
Each direction buffers at most MAX_CHUNKS chunks: a slow receiver (a shaped link) slows the
sender down instead of filling the proxy's memory, so a sender measures the real throughput.
Use `DelayProxy` in-process, or run this file as a script inside a network namespace:
    python tests/delay_proxy.py --listen 10.1.0.3:6000 --target 10.1.0.1:50551 --delay-ms 5
One process can serve many links (the edge test bed runs one per node, for its gRPC and data ports):
    python tests/delay_proxy.py --map 10.1.1.1:50551=10.1.0.2:50551@2 --map ... --exit-on-eof
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time

#: chunks (of up to 64 KiB) one direction of one connection may hold: 16 MiB at most, far more than
#: the bandwidth-delay product of any link the test bed emulates (1 Gbit/s x 10 ms = 1.25 MB)
MAX_CHUNKS = 256
CHUNK = 1 << 16
_PR_SET_TIMERSLACK = 29


#: what relaying a chunk costs by itself, one way (a loopback hop, a read, a queue hand-off, a write;
#: measured ~0.1 ms at delay 0 on the 2-core test VM): held that much less, so a link adds its delay
RELAY_COST_S = 1e-4
REALTIME_PRIORITY = 10  # SCHED_FIFO, low among real-time tasks (the kernel's own threads run at 50+)


#: the most a write thread shortens its sleeps by (its measured lateness is clipped to this)
MAX_LATE_S = 0.5e-3


def _wire_thread() -> bool:
    """Make the calling thread behave like a wire, not like one more process on a loaded machine:
    SCHED_FIFO (a thread whose chunk is due runs now, instead of waiting ms for a busy core: CFS only
    preempts for a waker after its wakeup granularity) and timer slack 1 ns (sleeps end when due, not
    up to 50 us later). The kernel still keeps 5% of each core for normal tasks. False if refused."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except (OSError, AttributeError):
        return False
    return True


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read(source: socket.socket, chunks: queue.Queue, delay_s: float) -> None:
    """Blocking reads from `source`, each chunk queued with the time it is due; None = EOF. A full
    queue blocks this thread, so the sender's TCP window closes: a slow receiver slows the sender."""
    _wire_thread()
    hold = max(0.0, delay_s - RELAY_COST_S)
    try:
        while data := source.recv(CHUNK):
            chunks.put((time.monotonic() + hold, data))
    except OSError:
        pass
    chunks.put(None)


def _write(chunks: queue.Queue, sink: socket.socket, source: socket.socket) -> None:
    """Send each chunk to `sink` when due (time.sleep: clock_nanosleep, not an event loop's
    millisecond timer; on a loaded VM it wakes 0.05-0.25 ms late, so the thread asks for its mean
    lateness less and waits out the rest); EOF becomes a half-close. If `sink` is gone, shut `source` so its
    reader stops, and drop what is still queued (unblocking the reader's puts)."""
    _wire_thread()
    late = 0.0  # how late this thread's sleeps wake (a running mean): asked for that much less
    try:
        while (item := chunks.get()) is not None:
            due, data = item
            if (wait := due - time.monotonic()) > 0:
                ask = max(0.0, wait - late)
                start = time.monotonic()
                time.sleep(ask)
                late = min(MAX_LATE_S, 0.9 * late + 0.1 * max(0.0, time.monotonic() - start - ask))
                while time.monotonic() < due:  # woke early by the estimate's error: tens of us
                    pass
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
        return
    except OSError:
        with contextlib.suppress(OSError):
            source.shutdown(socket.SHUT_RDWR)
    while chunks.get() is not None:
        pass


class _Relay:
    """Every listening socket of one proxy process, and the connections they accepted."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="delay-proxy-accept")

    def listen(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> tuple[str, int]:
        """Bind `listen` (before `start`); returns the bound address."""
        server = socket.create_server(listen, backlog=128)
        self._selector.register(server, selectors.EVENT_READ, (target, delay_s))
        return server.getsockname()[:2]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Close the listeners, cut every connection (their threads then end), wait for the acceptor."""
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(10)
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._wake_r.close(), self._wake_w.close()

    def _accept_loop(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.data is None:
                    continue
                with contextlib.suppress(OSError):
                    client, _ = key.fileobj.accept()
                    threading.Thread(target=self._connection, args=(client, *key.data), daemon=True,
                                     name="delay-proxy-conn").start()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _connection(self, client: socket.socket, target: tuple[str, int], delay_s: float) -> None:
        """One accepted connection: dial the target, then a reader and a writer thread per direction."""
        try:
            server = socket.create_connection(target, timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        for sock in (client, server):
            _nodelay(sock)
        with self._lock:
            if self._stopping:
                client.close(), server.close()
                return
            self._conns.update((client, server))
        threads = []
        for source, sink in ((client, server), (server, client)):
            chunks: queue.Queue = queue.Queue(maxsize=MAX_CHUNKS)
            threads += [threading.Thread(target=_read, args=(source, chunks, delay_s), daemon=True),
                        threading.Thread(target=_write, args=(chunks, sink, source), daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with self._lock:
            self._conns.difference_update((client, server))
        client.close(), server.close()


class DelayProxy:
    """In-process proxy on its own threads. `.port` is the bound listening port."""

    def __init__(self, target: tuple[str, int], delay_s: float, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.target, self.delay_s, self.listen = target, delay_s, listen
        self.port = 0
        self._relay = _Relay()

    def __enter__(self) -> DelayProxy:
        self.port = self._relay.listen(self.listen, self.target, self.delay_s)[1]
        self._relay.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._relay.stop()


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _mapping(text: str) -> tuple[tuple[str, int], tuple[str, int], float]:
    """LISTEN=TARGET@DELAY_MS, e.g. 10.1.1.1:50551=10.1.0.2:50551@2.5"""
    listen, eq, rest = text.partition("=")
    target, at, delay = rest.partition("@")
    if not (eq and at):
        raise argparse.ArgumentTypeError(f"{text!r} is not LISTEN_HOST:PORT=TARGET_HOST:PORT@DELAY_MS")
    try:
        delay_ms = float(delay)
    except ValueError:
        raise argparse.ArgumentTypeError(f"delay {delay!r} in {text!r} is not a number of milliseconds") from None
    return _addr(listen), _addr(target), delay_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_addr)
    parser.add_argument("--target", type=_addr)
    parser.add_argument("--delay-ms", type=float)
    parser.add_argument("--map", type=_mapping, action="append", default=[], metavar="LISTEN=TARGET@MS",
                        help="One more proxied link (repeatable).")
    parser.add_argument("--exit-on-eof", action="store_true", help="Exit when stdin closes (the launcher died).")
    args = parser.parse_args()
    maps = list(args.map)
    if args.listen or args.target or args.delay_ms is not None:
        if not (args.listen and args.target and args.delay_ms is not None):
            parser.error("--listen, --target and --delay-ms go together")
        maps.append((args.listen, args.target, args.delay_ms))
    if not maps:
        parser.error("nothing to proxy: give --listen/--target/--delay-ms or --map")

    if not _wire_thread():
        print("no real-time priority for the relay threads (needs root): round trips run late under load", flush=True)
    relay = _Relay()
    for listen, target, ms in maps:
        host, port = relay.listen(listen, target, ms / 1e3)
        print(f"delay proxy on {host}:{port} -> {target[0]}:{target[1]} (+{ms:g} ms each way)", flush=True)
    relay.start()
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        if args.exit_on_eof:
            sys.stdin.buffer.read()  # EOF: the process that started us (and holds the pipe) is gone
        else:
            signal.pause()
    relay.stop()


if __name__ == "__main__":
    main()
