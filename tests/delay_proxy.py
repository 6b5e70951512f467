"""A TCP proxy that adds a fixed one-way delay to every chunk, in both directions.

`tc netem` is not available here, so link latency is emulated at the TCP level: each chunk read
from one side is written to the other `delay_s` later (order preserved, no throughput cap).
Each direction buffers at most MAX_CHUNKS chunks: a slow receiver (a shaped link) slows the
sender down instead of filling the proxy's memory, so a sender measures the real throughput.
Use `DelayProxy` in-process, or run this file as a script inside a network namespace:
    python tests/delay_proxy.py --listen 10.1.0.3:6000 --target 10.1.0.1:50551 --delay-ms 5
One process can serve many links (the edge test bed runs one for all its nodes):
    python tests/delay_proxy.py --map 10.1.1.1:50551=10.1.0.2:50551@2 --map ... --exit-on-eof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading

#: chunks (of up to 64 KiB) one direction of one connection may hold: 16 MiB at most, far more than
#: the bandwidth-delay product of any link the test bed emulates (1 Gbit/s x 10 ms = 1.25 MB)
MAX_CHUNKS = 256


async def _pump(reader: asyncio.StreamReader, source: asyncio.StreamWriter, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Copy reader -> writer, each chunk `delay_s` after it was read; EOF is passed on as EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_CHUNKS)

    async def deliver() -> None:
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:  # the far side is gone: stop this direction's reader, unblock its puts
            source.close()
            while not queue.empty():
                queue.get_nowait()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            if task.done():
                break
            await queue.put((loop.time() + delay_s, data))
    except OSError:
        pass
    if not task.done():
        await queue.put(None)
    await task


async def _handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int],
                  delay_s: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, client_w, server_w, delay_s), _pump(server_r, server_w, client_w, delay_s))
    finally:
        for w in (client_w, server_w):
            w.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> asyncio.AbstractServer:
    return await asyncio.start_server(lambda r, w: _handle(r, w, target, delay_s), *listen)


class DelayProxy:
    """In-process proxy on its own event-loop thread. `.port` is the bound listening port."""

    def __init__(self, target: tuple[str, int], delay_s: float, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.target, self.delay_s, self.listen = target, delay_s, listen
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="delay-proxy")
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(_serve(self.listen, self.target, self.delay_s), self._loop)
        self._server = future.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


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


async def _exit_on_eof() -> None:
    """Return when stdin reaches EOF: the process that started us (and holds the pipe) is gone."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)


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

    async def run() -> None:
        servers = [await _serve(listen, target, ms / 1e3) for listen, target, ms in maps]
        for server, (_, target, ms) in zip(servers, maps, strict=True):
            host, port = server.sockets[0].getsockname()[:2]
            print(f"delay proxy on {host}:{port} -> {target[0]}:{target[1]} (+{ms:g} ms each way)", flush=True)
        print("ready", flush=True)
        if args.exit_on_eof:
            await _exit_on_eof()
        else:
            await asyncio.Event().wait()
        for server in servers:
            server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
