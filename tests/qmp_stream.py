"""Read JSON messages from a QMP byte stream (clients need not end them with a newline)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

_DECODER = json.JSONDecoder()


class QMPStreamReader:
    """Yields one decoded JSON object per call, however the bytes are split."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = ""

    async def next(self) -> dict[str, Any]:
        while True:
            text = self.buffer.lstrip()
            if text:
                try:
                    obj, end = _DECODER.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buffer = text[end:]
                    return obj if isinstance(obj, dict) else {}
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionResetError("client went away")
            self.buffer += chunk.decode(errors="replace")
