"""A TCP proxy that adds a fixed one-way delay to every chunk, in both directions.

`tc netem` is not available here, so link latency is emulated at the TCP level: each chunk read
from one side is written to the other `delay_s` later (order preserved, no throughput cap).
Use `DelayProxy` in-process, or run this file as a script inside a network namespace:
    python tests/delay_proxy.py --listen 10.1.0.3:6000 --target 10.1.0.1:50551 --delay-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            await queue.put((time.monotonic() + delay_s, data))
    except ConnectionError:
        pass
    await queue.put(None)
    with contextlib.suppress(ConnectionError):
        await task


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float, started: threading.Event | None,
                 bound: list) -> asyncio.AbstractServer:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, delay_s), _pump(server_r, client_w, delay_s))

    server = await asyncio.start_server(handle, *listen)
    bound.append(server.sockets[0].getsockname()[1])
    if started:
        started.set()
    return server


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
        bound: list[int] = []
        future = asyncio.run_coroutine_threadsafe(_serve(self.listen, self.target, self.delay_s, None, bound), self._loop)
        self._server = future.result(10)
        self.port = bound[0]
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
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, type=_addr)
    parser.add_argument("--target", required=True, type=_addr)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()

    async def run() -> None:
        bound: list[int] = []
        server = await _serve(args.listen, args.target, args.delay_ms / 1e3, None, bound)
        print(f"delay proxy on {args.listen[0]}:{bound[0]} -> {args.target[0]}:{args.target[1]}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
