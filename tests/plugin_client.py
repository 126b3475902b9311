"""A client of the Docker volume plugin protocol for the tests: what dockerd sends, by hand.

http.client over the plugin's unix socket, so the requests are well-formed HTTP and the
tests of the plugin's answers do not depend on a Docker engine; `raw` sends bytes as they
are, for the malformed ones.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to a unix socket (kept alive between requests)."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


def request(
    conn: http.client.HTTPConnection, endpoint: str, body: object = None, method: str = "POST"
) -> tuple[int, dict]:
    """One request on *conn*: a JSON *body* (bytes as they are; None: no body)."""
    if body is None:
        data = b""
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    headers = {"Content-Type": "application/vnd.docker.plugins.v1.2+json"}
    conn.request(method, f"/{endpoint}", body=data, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def call(path: Path, endpoint: str, body: object = None) -> tuple[int, dict]:
    """POST /*endpoint* with *body* on a connection of its own; the status and JSON reply."""
    conn = UnixHTTPConnection(path)
    try:
        return request(conn, endpoint, body)
    finally:
        conn.close()


def raw(path: Path, data: bytes, timeout: float = 30) -> bytes:
    """Send *data* as it is, half-close, and return all the plugin answers before it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
