"""HTTP/1.1 over trio streams with h11, as the daemon's HTTP front ends serve it (the Docker
plugin's socket, the metrics endpoint): events read in small pieces so that h11's bound on an
incomplete event holds, bodies read within a bound.
"""

from __future__ import annotations

from typing import Any

import h11
import trio


class HttpError(Exception):
    """A request refused before it was answered: its HTTP status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def next_event(stream: trio.SocketStream, http: h11.Connection) -> Any:
    while True:
        event = http.next_event()
        if event is not h11.NEED_DATA:
            return event
        # Small reads: h11 bounds only what it buffers of an incomplete event, so headers that
        # arrive whole in one big read would get past MAX_HEADERS.
        http.receive_data(await stream.receive_some(8192))  # b"": the client closed


async def read_body(stream: trio.SocketStream, http: h11.Connection, limit: int) -> bytes:
    body = bytearray()
    while True:
        event = await next_event(stream, http)
        if isinstance(event, h11.EndOfMessage):
            return bytes(body)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise HttpError(413, f"the request body is over {limit} bytes")
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("the client closed mid-request")


async def send_response(
    stream: trio.SocketStream, http: h11.Connection, status: int, content_type: str, data: bytes
) -> None:
    """Send one whole response: status, type and length, and *data*."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(data)))]
    await stream.send_all(http.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(http.send(h11.Data(data=data)) or b"")
    await stream.send_all(http.send(h11.EndOfMessage()) or b"")
