"""An HTTP/1.1 proxy on loopback in front of an S3 endpoint (moto) that throttles request bodies
and injects faults into chosen requests: a 500 reply, a dropped connection, or no reply at all (a
timeout). Raw TCP with just enough HTTP to see where each request starts (its head, then a
Content-Length or chunked body); replies are passed through untouched.

    proxy = FaultProxy("127.0.0.1", moto_port, rate=2_000_000).start()   # AWS_ENDPOINT_URL=proxy.endpoint
    proxy.add(Fault("500", path=r"/checkpoints/step-\\d+/", times=2))
    ...; proxy.stop()

Runs in a thread of the test, or on its own (`python -m testkit.faultproxy --target HOST:PORT
--rate BYTES_PER_S --port-file F`) for a benchmark that must not share the GIL with it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import threading
import time
from dataclasses import dataclass

ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected by testkit.faultproxy</Message></Error>"
)
CHUNK = 64 * 1024


@dataclass
class Fault:
    """Hit requests whose method is `method` and whose path matches `path` (a regex, searched),
    `times` times (None: every time), with `action`: "500", "drop" or "hang"."""

    action: str
    path: str = ""
    method: str = "PUT"
    times: int | None = 1

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path, path) is not None and self.times != 0


class FaultProxy:
    def __init__(self, host: str, port: int, rate: float | None = None):
        self.target = (host, port)
        self.rate = rate  # bytes/s of request bodies, all connections together; None: no limit
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []  # (method, path, "ok" or the fault applied)
        self.port = 0
        self._lock = threading.Lock()
        self._free_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ control (any thread)
    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def applied(self, action: str | None = None) -> list[tuple[str, str, str]]:
        with self._lock:
            return [e for e in self.log if (e[2] != "ok" if action is None else e[2] == action)]

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            server.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # ------------------------------------------------------------ the proxy (its own loop)
    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                    self.log.append((method, path, fault.action))
                    return fault.action
            self.log.append((method, path, "ok"))
            return "ok"

    async def _throttle(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._free_at = max(self._free_at, now) + n / self.rate
        await asyncio.sleep(self._free_at - now)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_w = None
        pump = None
        try:
            while True:
                try:
                    head = await client_r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, _, rest = head.decode("latin-1").partition("\r\n")
                method, path = (request_line.split(" ") + ["", ""])[:2]
                headers = {}
                for line in rest.split("\r\n"):
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                action = self._decide(method, path)
                if action == "drop":
                    return
                if action == "hang":  # never answer: the client's read timeout must fire
                    while await client_r.read(CHUNK):
                        pass
                    return
                if action == "500":
                    client_w.write(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(ERROR_BODY)}\r\nConnection: close\r\n\r\n".encode()
                        + ERROR_BODY
                    )
                    await client_w.drain()
                    return
                if upstream_w is None:
                    upstream_r, upstream_w = await asyncio.open_connection(*self.target)
                    pump = asyncio.ensure_future(_copy(upstream_r, client_w))
                upstream_w.write(head)
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    await self._chunked(client_r, upstream_w)
                else:
                    left = int(headers.get("content-length", "0") or 0)
                    while left:
                        piece = await client_r.read(min(CHUNK, left))
                        if not piece:
                            return
                        await self._throttle(len(piece))
                        upstream_w.write(piece)
                        await upstream_w.drain()
                        left -= len(piece)
                await upstream_w.drain()
        except (ConnectionError, OSError):
            return
        finally:
            if pump is not None:
                pump.cancel()
            for w in (upstream_w, client_w):
                if w is not None:
                    w.close()

    async def _chunked(self, client_r: asyncio.StreamReader, upstream_w: asyncio.StreamWriter) -> None:
        while True:
            size_line = await client_r.readuntil(b"\r\n")
            upstream_w.write(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:  # trailers, then the empty line
                while (line := await client_r.readuntil(b"\r\n")) != b"\r\n":
                    upstream_w.write(line)
                upstream_w.write(b"\r\n")
                return
            data = await client_r.readexactly(size + 2)
            await self._throttle(size)
            upstream_w.write(data)
            await upstream_w.drain()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="throttling proxy in front of an HTTP endpoint")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--rate", type=float, default=None, help="request body bytes/s (all connections)")
    parser.add_argument("--port-file", required=True, help="where to write the port once listening")
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    proxy = FaultProxy(host, int(port), args.rate).start()
    with open(args.port_file, "w") as f:
        f.write(str(proxy.port))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
