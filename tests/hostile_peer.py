"""HostileFakeQMPPeer: a deliberately misbehaving QMP server, for what real QEMU won't do.

Real QEMU cannot be made to send garbage, stall mid-reply or flood events on demand, so
these behaviours come from this fake, named as such. It serves one UNIX socket from a
background thread; every connection gets the configured misbehaviour.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from tests.qmp_stream import QMPStreamReader

GREETING = (
    json.dumps(
        {
            "QMP": {
                "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                "capabilities": ["oob"],
            }
        }
    )
    + "\r\n"
).encode()

MODES = (
    "garbage",  # random bytes instead of a greeting, then close
    "invalid-json",  # a greeting line that is not JSON
    "wrong-greeting",  # valid JSON, wrong shape
    "no-greeting",  # accept and say nothing, ever
    "close-at-once",  # accept and close
    "huge-line",  # greeting, then a 100 MiB reply line
    "deep-nesting",  # greeting, then a reply nested 200,000 levels deep
    "stall-mid-reply",  # greeting, then half a reply and silence
    "close-mid-reply",  # greeting, then half a reply and close
    "unknown-ids",  # greeting, then replies with ids nobody asked for
    "event-flood",  # greeting, then endless events and no replies
    "wrong-shapes",  # greeting, then `{"return": 42}` to every command
)


class HostileFakeQMPPeer:
    """Serve `mode` on `path` until `stop()`; a context manager."""

    def __init__(self, path: Path, mode: str) -> None:
        assert mode in MODES, mode
        self.path, self.mode = path, mode
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> HostileFakeQMPPeer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_unix_server(self._serve, path=str(self.path))
        )
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._behave(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _next_id(self, stream: QMPStreamReader) -> object:
        return (await stream.next()).get("id")

    async def _behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        stream = QMPStreamReader(reader)
        if mode == "garbage":
            writer.write(bytes(range(256)) * 16)
            await writer.drain()
            return
        if mode == "invalid-json":
            writer.write(b"{this is not json\r\n")
        elif mode == "wrong-greeting":
            writer.write(b'{"QMP": 5}\r\n')
        elif mode == "no-greeting":
            await asyncio.Event().wait()
        elif mode == "close-at-once":
            return
        else:
            writer.write(GREETING)
        await writer.drain()
        await self._next_id(stream)  # qmp_capabilities
        writer.write(b'{"return": {}}\r\n')
        await writer.drain()
        if mode == "event-flood":
            event = json.dumps(
                {
                    "event": "DEVICE_DELETED",
                    "data": {"path": "/x" * 50},
                    "timestamp": {"seconds": 1, "microseconds": 2},
                }
            ).encode()
            while True:
                writer.write(event + b"\r\n")
                await writer.drain()
        cid = await self._next_id(stream)
        if mode == "huge-line":
            chunk = b"x" * (1 << 20)
            writer.write(b'{"return": "')
            for _ in range(100):
                writer.write(chunk)
                await writer.drain()
            writer.write(b'"}\r\n')
        elif mode == "deep-nesting":
            writer.write(b'{"return": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\r\n")
        elif mode in ("stall-mid-reply", "close-mid-reply"):
            writer.write(b'{"return": {"qemu": {"maj')
            await writer.drain()
            if mode == "stall-mid-reply":
                await asyncio.Event().wait()
            return
        elif mode == "unknown-ids":
            while True:
                writer.write(json.dumps({"return": {}, "id": f"nobody-{cid}"}).encode() + b"\r\n")
                await writer.drain()
                cid = await self._next_id(stream)
        elif mode == "wrong-shapes":
            while True:
                writer.write(json.dumps({"return": 42, "id": cid}).encode() + b"\r\n")
                await writer.drain()
                cid = await self._next_id(stream)
        await writer.drain()
        await asyncio.Event().wait()
