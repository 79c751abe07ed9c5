"""A gRPC-web call over HTTP/1.1, as a browser's gRPC-web client makes it.

The protocol is small enough to speak directly: each message is a 5-byte frame (flag,
length) before the protobuf bytes, and the trailers come last in a frame flagged 0x80.
"""

from __future__ import annotations

import base64
import http.client
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import unquote

from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from .support import assert_catalogued

M = TypeVar("M", bound=Message)
TRAILER_FLAG = 0x80


@dataclass
class Reply:
    http_status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    def _get(self, name: str) -> str | None:
        return self.trailers.get(name, self.headers.get(name))

    @property
    def status(self) -> int:
        """The gRPC status code (0 is OK); -1 if the reply carries none."""
        value = self._get("grpc-status")
        return int(value) if value is not None else -1

    @property
    def message(self) -> str:
        return unquote(self._get("grpc-message") or "")

    def _detail(self, kind: type[M]) -> M | None:
        raw = self._get("grpc-status-details-bin")
        if raw is None:
            return None
        status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
        assert_catalogued(status)
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                found = kind()
                detail.Unpack(found)
                return found
        return None

    @property
    def info(self) -> error_details_pb2.ErrorInfo | None:
        return self._detail(error_details_pb2.ErrorInfo)

    @property
    def retry(self) -> error_details_pb2.RetryInfo | None:
        return self._detail(error_details_pb2.RetryInfo)

    def one(self, kind: type[M]) -> M:
        assert self.status == 0, f"gRPC status {self.status}: {self.message}"
        assert len(self.messages) == 1, self.messages
        return kind.FromString(self.messages[0])


def call(
    port: int,
    host: str,
    method: str,
    request: Message,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """POST one unary gRPC-web call to the gateway on ``port`` with ``Host: host``."""
    sent = {
        "Host": host,
        "Content-Type": "application/grpc-web+proto",
        "Accept": "application/grpc-web+proto",
        "X-Grpc-Web": "1",
        "X-User-Agent": "grpc-web-python-test/1.0",
    }
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("POST", method, frame(request), headers=sent)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return parse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


def frame(request: Message) -> bytes:
    """One message as a gRPC-web request body: flag 0, 4-byte length, the protobuf bytes."""
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def parse(http_status: int, headers: dict[str, str], data: bytes) -> Reply:
    """A gRPC-web response: its data frames and its trailer frame."""
    reply = Reply(http_status, headers)
    offset = 0
    while offset + 5 <= len(data):
        flag, length = data[offset], int.from_bytes(data[offset + 1 : offset + 5], "big")
        chunk = data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flag & TRAILER_FLAG:
            for line in chunk.decode().split("\r\n"):
                if ":" in line:
                    name, value = line.split(":", 1)
                    reply.trailers[name.strip().lower()] = value.strip()
        else:
            reply.messages.append(chunk)
    return reply
