#!/usr/bin/env python3
"""chat.py — a WebSocket chat, server and terminal client, in one file.

RFC 6455 (https://www.rfc-editor.org/rfc/rfc6455) written out by hand over
asyncio streams, with nothing but the Python standard library (3.10 or later):

    python chat.py server                  # the chat room, and a page for browsers
    python chat.py client --name bob       # a terminal client
    python chat.py echo --port 9001        # a bare echo server for conformance suites

Read it top to bottom; the sections come in the order a learner needs them
(``grep '^# [0-9]' chat.py`` prints this table of contents):

    1. Constants      the GUID, opcodes, close codes, limits and why they are what they are
    2. Errors         each error knows the close code or HTTP status it becomes
    3. Handshake      HTTP/1.1 Upgrade, both sides (RFC 6455 §1.3, §4)
    4. Frames         the §5.2 header, masking, encoding and parsing (§5.2-§5.5)
    5. Messages       fragments, UTF-8 and close payloads (§5.4, §5.6, §7.4, §8.1)
       --- everything above is pure: no await, no I/O, no logging ---
    6. Connection     one class for both roles: recv, send, ping, close (§5.5, §7)
    7. Server and client  serve() and connect(): TCP, the handshake on the wire
    8. Chat room      names, history, broadcast, commands, rate limits
    9. Client         connect, read the keyboard, show the room safely
   10. Command line   argparse subcommands; main(argv) -> exit status
   11. Web page       the HTML and JavaScript served at /
   12. Compression    permessage-deflate (RFC 7692): an extension; skip it on a first read

The life of a chat line, with the names to read at each step:

    bob types "hi" and Enter     Keyboard (9) queues the line; ChatClient.session takes it
    bob's client sends it        Connection.send (6) -> encode_frame (4): a masked TEXT frame
    the server reads it          Connection.recv_message (6): FrameReader (4), MessageAssembler (5)
    the room relays it           ChatRoom.relay_messages -> on_text -> broadcast (8)
    every member's socket        Connection.queue_frame (6): one write per member per loop turn
    alice's client shows it      ChatClient.show_incoming -> Screen.show (9), escaped by printable

Left out on purpose: extensions other than permessage-deflate, subprotocols,
HTTP redirects and proxies on the client, WebSockets over HTTP/2 (RFC 8441).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import dataclasses
import enum
import hashlib
import http
import json
import logging
import os
import re
import secrets
import signal
import ssl
import struct
import sys
import threading
import time
import typing
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Collection

__all__ = [
    "Opcode", "CloseCode", "Frame", "Connection", "ConnectionClosed",
    "ProtocolError", "HandshakeError", "connect", "serve", "WebSocketServer",
    "ChatRoom", "main",
]

logger = logging.getLogger("chat")


# 1. Constants ##############################################################

#: RFC 6455 §1.3: the server proves it read the handshake by hashing the
#: client's key with this fixed GUID, which no non-WebSocket server would know.
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: RFC 6455 §4.1: the only version of the protocol; anything else gets 426.
WEBSOCKET_VERSION = "13"


class Opcode(enum.IntEnum):
    """What a frame carries (RFC 6455 §5.2, §11.8)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


DATA_OPCODES = frozenset({Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY})
CONTROL_OPCODES = frozenset({Opcode.CLOSE, Opcode.PING, Opcode.PONG})
KNOWN_OPCODES = DATA_OPCODES | CONTROL_OPCODES   # §5.2: the rest are reserved


class CloseCode(enum.IntEnum):
    """Why a connection closed (RFC 6455 §7.4.1 and the IANA registry)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005     # never sent: "the close frame had no code"
    ABNORMAL_CLOSURE = 1006   # never sent: "TCP closed without a close frame"
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015      # never sent: "the TLS handshake failed"


#: RFC 6455 §7.4.2: 3000-3999 are registered with IANA for libraries and
#: frameworks, 4000-4999 are private to applications; both may be sent.
APPLICATION_CLOSE_CODES = range(3000, 5000)

#: RFC 6455 §7.4.1-§7.4.2: every code an endpoint may put in a close frame,
#: and so the only ones it may receive. 1005, 1006 and 1015 only report what
#: happened locally; 1004 and the unlisted rest of 1000-2999 are reserved.
SENDABLE_CLOSE_CODES = frozenset(CloseCode) - {
    CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE, CloseCode.TLS_HANDSHAKE,
} | frozenset(APPLICATION_CLOSE_CODES)

# The §5.2 header, bit by bit.
FIN_BIT = 0x80
RSV_BITS = 0x70
OPCODE_BITS = 0x0F
MASK_BIT = 0x80
LENGTH_BITS = 0x7F
PAYLOAD_LEN_16BIT = 126   # a 7-bit length of 126: "the next 2 bytes hold the length"
PAYLOAD_LEN_64BIT = 127   # a 7-bit length of 127: "the next 8 bytes hold the length"

#: RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less."
MAX_CONTROL_PAYLOAD = 125

#: The largest message we accept (1 MiB): a chat line is far smaller, and a
#: limit checked against the frame header stops a peer that announces a huge
#: message before we buffer any of it. ``--max-size`` changes it.
MAX_MESSAGE_SIZE = 2**20

#: The request or response head: 8 KiB and 100 header lines is what common
#: HTTP servers allow; past that we answer 431 instead of buffering more.
MAX_HEAD_SIZE = 8 * 1024
MAX_HEADER_LINES = 100

#: The stream reader's buffer: reading pauses once this much is waiting, so a
#: peer can never make us buffer more than about twice this per connection.
READ_BUFFER_LIMIT = 64 * 1024

#: Seconds a peer gets to finish the opening handshake, and the closing one.
#: Both are bounded so that a silent peer can't hold a connection forever.
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0

#: A ping every 20 s; a peer that hasn't answered by the next one is gone.
KEEPALIVE_INTERVAL = 20.0

#: Bytes we let pile up for a peer that doesn't read before we drop it: four
#: maximum-size messages. A slow reader costs memory, so the bound is firm.
MAX_OUTGOING_BUFFER = 4 * MAX_MESSAGE_SIZE


# 2. Errors #################################################################

class WebSocketError(Exception):
    """Base class for everything this module raises."""


class HandshakeError(WebSocketError):
    """The opening handshake failed; on the server this becomes an HTTP error."""

    def __init__(self, status: http.HTTPStatus, reason: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers

    def as_response(self) -> Response:
        """The HTTP refusal a server sends for this error, its reason as the body."""
        return Response(self.status, self.reason + "\n", self.headers)


class InvalidStatus(HandshakeError):
    """The server answered the handshake with something other than 101."""

    def __str__(self) -> str:
        text = f"server answered {self.status.value} {self.status.phrase}"
        return f"{text}: {self.reason}" if self.reason else text


class ProtocolError(WebSocketError):
    """The peer broke RFC 6455; the connection fails with ``close_code``."""

    close_code = CloseCode.PROTOCOL_ERROR


class InvalidPayload(ProtocolError):
    """Text that is not UTF-8 (RFC 6455 §8.1)."""

    close_code = CloseCode.INVALID_PAYLOAD


class MessageTooBig(ProtocolError):
    """A message over our size limit (RFC 6455 §7.4.1, code 1009)."""

    close_code = CloseCode.MESSAGE_TOO_BIG


class Close(typing.NamedTuple):
    """What one side put in its close frame (§5.5.1)."""

    code: int
    reason: str = ""

    def __str__(self) -> str:
        return describe_close_code(self.code) + (f": {self.reason}" if self.reason else "")


class ConnectionClosed(WebSocketError):
    """The connection is over, or closing; it carries the close frames exchanged.

    ``code`` and ``reason`` are derived from them (RFC 6455 §7.1.5-§7.1.6):
    the peer's close frame if one arrived; else ours while the closing
    handshake we began is still under way (TCP open); else 1006, "abnormal
    closure": TCP ended and no close frame came.
    """

    def __init__(self, rcvd: Close | None, sent: Close | None, *, tcp_closed: bool) -> None:
        super().__init__(rcvd, sent)
        self.rcvd, self.sent = rcvd, sent
        if rcvd is not None:
            self.code, self.reason = rcvd
        elif sent is not None and not tcp_closed:
            self.code, self.reason = sent
        else:
            self.code, self.reason = CloseCode.ABNORMAL_CLOSURE, ""

    def __str__(self) -> str:
        text = str(Close(self.code, self.reason))
        if self.rcvd is None and self.sent is not None and self.code != self.sent.code:
            text += f" (we sent {self.sent}; no close frame came back)"
        return text


def describe_close_code(code: int) -> str:
    """'1001 (going away)' for a log line or a person."""
    try:
        name = CloseCode(code).name.replace("_", " ").lower()
    except ValueError:
        name = "application" if code in APPLICATION_CLOSE_CODES else "unknown"
    return f"{code} ({name})"


# 3. Handshake ##############################################################
#
# A WebSocket connection starts life as an HTTP/1.1 request that asks to
# "upgrade" the TCP connection (RFC 6455 §1.3, §4):
#
#   GET /chat HTTP/1.1                       HTTP/1.1 101 Switching Protocols
#   Host: example.com                        Upgrade: websocket
#   Upgrade: websocket              ──►      Connection: Upgrade
#   Connection: Upgrade             ◄──      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=
#   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==
#   Sec-WebSocket-Version: 13
#
# After the 101 both sides speak frames (section 4) on the same socket.

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HTTP_VERSION = re.compile(r"HTTP/(\d)\.(\d)")


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §1.3, §4.2.2)."""
    digest = hashlib.sha1((key + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64-encoded (§4.1)."""
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")


@dataclasses.dataclass
class Request:
    """An HTTP request head; header names are lowercase (they are case-insensitive)."""

    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path


@dataclasses.dataclass
class Response:
    """An HTTP response the server sends instead of upgrading."""

    status: http.HTTPStatus
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain; charset=utf-8"


def bad_request(reason: str) -> HandshakeError:
    return HandshakeError(http.HTTPStatus.BAD_REQUEST, reason)


def parse_headers(lines: list[bytes]) -> dict[str, str]:
    """Header lines to a dict; a repeated header's values are joined with ", " (RFC 9110 §5.3)."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise bad_request(f"malformed header line {line[:40]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise bad_request(f"control character in header {name.decode()}")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def parse_request(lines: list[bytes]) -> Request:
    """The request line and headers (RFC 9112 §3), checked only as far as HTTP goes."""
    if not lines:
        raise bad_request("empty request")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise bad_request("malformed request line") from None
    match = _HTTP_VERSION.fullmatch(version)
    if not match or (int(match[1]), int(match[2])) < (1, 1):
        raise bad_request("WebSocket needs HTTP/1.1 or later (RFC 6455 §4.1)")
    if not target.startswith("/"):
        raise bad_request("request target must be a path")
    return Request(method, target, parse_headers(lines[1:]))


def header_tokens(headers: dict[str, str], name: str) -> set[str]:
    """A comma-separated header as a set of lowercase tokens ("keep-alive, Upgrade")."""
    return {token.strip().lower() for token in headers.get(name, "").split(",")}


def wants_upgrade(headers: dict[str, str]) -> bool:
    """Does the request (or response) say "Upgrade: websocket" (§4.1, §4.2.1)?"""
    return "websocket" in header_tokens(headers, "upgrade")


def require_get(request: Request) -> None:
    """RFC 6455 §4.1: "The method of the request MUST be GET" (and our page is GET too).

    The server checks this first, before it looks at any other header, so
    check_request below takes it as done.
    """
    if request.method != "GET":
        raise HandshakeError(http.HTTPStatus.METHOD_NOT_ALLOWED,
                             "only GET is supported", (("Allow", "GET"),))


def check_request(request: Request) -> str:
    """Check a GET request's upgrade headers (RFC 6455 §4.2.1); return its key."""
    headers = request.headers
    if "host" not in headers:
        raise bad_request("missing Host header")
    if not wants_upgrade(headers):
        raise bad_request("this is a WebSocket endpoint: expected Upgrade: websocket")
    if "upgrade" not in header_tokens(headers, "connection"):
        raise bad_request("expected Connection: Upgrade")
    version = headers.get("sec-websocket-version")
    if version is None:
        raise bad_request("missing Sec-WebSocket-Version")
    if version != WEBSOCKET_VERSION:
        # §4.4: say which version we speak, so the client can retry with it.
        raise HandshakeError(http.HTTPStatus.UPGRADE_REQUIRED,
                             f"unsupported WebSocket version {version}; this server speaks 13",
                             (("Sec-WebSocket-Version", WEBSOCKET_VERSION), ("Upgrade", "websocket")))
    key = headers.get("sec-websocket-key", "")
    try:
        raw_key = base64.b64decode(key, validate=True)
    except ValueError:
        raw_key = b""
    if len(raw_key) != 16:
        raise bad_request("Sec-WebSocket-Key must be 16 bytes in base64")
    return key


def http_response(status: http.HTTPStatus, headers: tuple[tuple[str, str], ...] = (),
                  body: bytes = b"") -> bytes:
    """Serialize an HTTP/1.1 response head (and body)."""
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def switching_protocols(key: str, extensions: str | None = None) -> Response:
    """The 101 response that completes the server's side of the handshake (§4.2.2),
    naming the extensions we accepted, if any (§9.1)."""
    headers = (
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    )
    if extensions:
        headers += (("Sec-WebSocket-Extensions", extensions),)
    return Response(http.HTTPStatus.SWITCHING_PROTOCOLS, headers=headers)


def serialize_response(response: Response) -> bytes:
    """A Response as bytes: a 101 hands the socket over to frames; any other
    answer (a page, a refusal) is complete in itself, and the connection closes."""
    if response.status == http.HTTPStatus.SWITCHING_PROTOCOLS:
        return http_response(response.status, response.headers)
    body = response.body.encode("utf-8")
    headers = response.headers + (
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    )
    return http_response(response.status, headers, body)


def host_port(host: str, port: int) -> str:
    """'example.com:8080', or '[::1]:8080': an IPv6 address needs brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclasses.dataclass
class WebSocketURI:
    """A parsed ws:// or wss:// URI (RFC 6455 §3)."""

    secure: bool
    host: str
    port: int
    resource: str   # path and query: what goes in the request line

    @property
    def host_header(self) -> str:
        address = host_port(self.host, self.port)
        default = 443 if self.secure else 80   # RFC 6455 §4.1: the port may then be left out
        return address.rpartition(":")[0] if self.port == default else address


def parse_uri(uri: str) -> WebSocketURI:
    """Split a WebSocket URI into what the client needs to connect (RFC 6455 §3)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"{uri!r} is not a ws:// or wss:// URI")
    if parts.fragment or uri.endswith("#"):
        raise ValueError("a WebSocket URI can't have a #fragment (RFC 6455 §3)")
    if not parts.hostname:
        raise ValueError(f"{uri!r} has no host")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)   # .port raises ValueError if out of range
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebSocketURI(secure, parts.hostname, port, resource)


def build_request(uri: WebSocketURI, key: str, origin: str | None = None,
                  extensions: str | None = None) -> bytes:
    """The client's opening handshake (RFC 6455 §4.1), offering ``extensions`` if given (§9.1)."""
    lines = [
        f"GET {uri.resource} HTTP/1.1",
        f"Host: {uri.host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {WEBSOCKET_VERSION}",
    ]
    if origin:
        lines.append(f"Origin: {origin}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_status_line(line: bytes) -> http.HTTPStatus:
    """'HTTP/1.1 101 Switching Protocols' -> HTTPStatus.SWITCHING_PROTOCOLS."""
    version, _, rest = line.decode("latin-1").partition(" ")
    code = rest[:3]
    if not _HTTP_VERSION.fullmatch(version) or not code.isdigit():
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY, f"not an HTTP response: {line[:40]!r}")
    try:
        return http.HTTPStatus(int(code))
    except ValueError:
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY, f"unknown HTTP status {code}") from None


def check_response(headers: dict[str, str], key: str, *, offered_extensions: bool = False) -> None:
    """Check the server's 101 response (RFC 6455 §4.1, the client's steps 1-6)."""
    def fail(reason: str) -> HandshakeError:
        return HandshakeError(http.HTTPStatus.BAD_GATEWAY, reason)

    if not wants_upgrade(headers):
        raise fail("response lacks Upgrade: websocket")
    if "upgrade" not in header_tokens(headers, "connection"):
        raise fail("response lacks Connection: Upgrade")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise fail("wrong Sec-WebSocket-Accept")
    # §4.1 steps 5 and 6: the server may select only an extension or a
    # subprotocol we offered: we wouldn't know how to speak another. We offer
    # no subprotocol, and at most one extension (section 12 checks its answer).
    if "sec-websocket-extensions" in headers and not offered_extensions:
        raise fail("server selected an extension we did not offer")
    if "sec-websocket-protocol" in headers:
        raise fail("server selected a subprotocol we did not offer")


# 4. Frames #################################################################
#
# RFC 6455 §5.2: every message travels in frames with this header.
#
#    0                   1                   2                   3
#    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
#   +-+-+-+-+-------+-+-------------+-------------------------------+
#   |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
#   |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
#   |N|V|V|V|       |S|             |   (if payload len==126/127)   |
#   | |1|2|3|       |K|             |                               |
#   +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
#   |     Extended payload length continued, if payload len == 127  |
#   + - - - - - - - - - - - - - - - +-------------------------------+
#   |                               |Masking-key, if MASK set to 1  |
#   +-------------------------------+-------------------------------+
#   | Masking-key (continued)       |          Payload Data         |
#   +-------------------------------- - - - - - - - - - - - - - - - +
#   :                     Payload Data continued ...                :
#   + - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - +
#
# A client masks every frame it sends with a fresh random key (§5.3) so that
# an attacker's script can't choose the bytes a proxy sees (§10.3); a server
# never masks. Each side fails the connection if the other gets it wrong.

class FrameHeader(typing.NamedTuple):
    """Everything in a frame but its payload, decoded (§5.2).

    A NamedTuple rather than a dataclass: one is made for every frame read,
    and a tuple is the cheapest object Python can build.
    """

    fin: bool
    rsv: int                 # the three reserved bits, as a number from 0 to 7
    opcode: int
    length: int              # of the payload, in bytes
    mask_key: bytes | None   # None for an unmasked frame


#: XOR_TABLES[k] maps every byte value b to b ^ k, for bytes.translate below.
XOR_TABLES = tuple(bytes(b ^ k for b in range(256)) for k in range(256))


def apply_mask(data: bytes, mask_key: bytes, start: int = 0, end: int | None = None) -> bytearray:
    """XOR data[start:end] with the mask key repeated (§5.3); masking and unmasking are the same.

    The simple version is a loop, ``bytes(b ^ mask_key[i % 4] for i, b in
    enumerate(data))``, at about 50 ns a byte. But every fourth byte is
    XOR-ed with the same key byte, so each of those four strided slices is
    mapped through a 256-byte table by bytes.translate, in C: twice as fast as
    XOR-ing the payload as one big integer, and it reads straight out of
    ``data`` between ``start`` and ``end``, so a frame reader need not slice
    the payload out of its buffer first.
    """
    end = len(data) if end is None else end
    out = bytearray(end - start)
    for i, key_byte in enumerate(mask_key):
        out[i::4] = data[start + i:end:4].translate(XOR_TABLES[key_byte])
    return out


def rotate_mask(mask_key: bytes, offset: int) -> bytes:
    """The mask key as seen from ``offset`` bytes into the payload (§5.3: byte i uses key[i % 4])."""
    shift = offset % 4
    return mask_key[shift:] + mask_key[:shift]


def frame_header(opcode: int, length: int, *, fin: bool = True, mask: bool = False,
                 rsv: int = 0) -> bytes:
    """The first bytes of a frame (§5.2): FIN, RSV, opcode, MASK and the length, not the mask key."""
    first = (FIN_BIT if fin else 0) | rsv << 4 | opcode
    mask_bit = MASK_BIT if mask else 0
    # §5.2: "the minimal number of bytes MUST be used to encode the length".
    if length < PAYLOAD_LEN_16BIT:
        return bytes((first, mask_bit | length))
    if length < 2**16:
        return struct.pack("!BBH", first, mask_bit | PAYLOAD_LEN_16BIT, length)
    return struct.pack("!BBQ", first, mask_bit | PAYLOAD_LEN_64BIT, length)


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False,
                 mask_key: bytes | None = None, rsv: int = 0) -> bytes:
    """Serialize a frame (§5.2); a client passes ``mask=True`` (§5.3)."""
    header = frame_header(opcode, len(payload), fin=fin, mask=mask, rsv=rsv)
    if not mask:
        return header + payload
    if mask_key is None:
        mask_key = secrets.token_bytes(4)   # §5.3: "derived from a strong source of entropy"
    return header + mask_key + apply_mask(payload, mask_key)


def check_first_two_bytes(first: int, second: int, *, expect_masked: bool,
                          extension_rsv: int = 0) -> None:
    """Everything §5.2-§5.5 lets us reject before reading further.

    ``extension_rsv`` holds the reserved bits a negotiated extension gives a
    meaning on data frames (RSV1 for compression, section 12); none on control frames.
    """
    opcode = first & OPCODE_BITS
    allowed = 0 if opcode in CONTROL_OPCODES else extension_rsv << 4
    if first & RSV_BITS & ~allowed:
        # §5.2: "MUST be 0 unless an extension is negotiated that defines meanings".
        raise ProtocolError("reserved bits set without an extension that defines them")
    if opcode not in KNOWN_OPCODES:
        raise ProtocolError(f"unknown opcode {opcode:#x}")
    if bool(second & MASK_BIT) != expect_masked:
        # §5.1: a server MUST close on an unmasked frame; a client on a masked one.
        raise ProtocolError("client frames must be masked" if expect_masked
                            else "server frames must not be masked")
    if opcode in CONTROL_OPCODES:
        # §5.5: control frames "MUST NOT be fragmented" and carry at most 125 bytes.
        if not first & FIN_BIT:
            raise ProtocolError("fragmented control frame")
        if second & LENGTH_BITS > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control frame payload over 125 bytes")


def header_size(second: int) -> int:
    """The header's size in bytes, known from its second byte: 2, plus the
    extended length, plus the mask key."""
    extended = {PAYLOAD_LEN_16BIT: 2, PAYLOAD_LEN_64BIT: 8}.get(second & LENGTH_BITS, 0)
    return 2 + extended + (4 if second & MASK_BIT else 0)


def parse_header(data: bytes | bytearray) -> FrameHeader:
    """Decode a complete header (``header_size`` bytes) that has passed the checks."""
    first, second = data[0], data[1]
    length, offset = second & LENGTH_BITS, 2
    if length == PAYLOAD_LEN_16BIT:
        length, offset = int.from_bytes(data[2:4], "big"), 4
    elif length == PAYLOAD_LEN_64BIT:
        length, offset = int.from_bytes(data[2:10], "big"), 10
        if length >= 2**63:
            # §5.2: "the most significant bit MUST be 0".
            raise ProtocolError("64-bit payload length with the high bit set")
    mask_key = bytes(data[offset:offset + 4]) if second & MASK_BIT else None
    return FrameHeader(bool(first & FIN_BIT), (first & RSV_BITS) >> 4, first & OPCODE_BITS,
                       length, mask_key)


class FrameReader:
    """Turns the bytes of a stream into frame headers and payload (sans I/O).

    ``feed()`` it whatever arrived; ``read_header()`` returns the next frame's
    header once all of it is here, and ``read_payload()`` as much of that
    frame's payload as is here, unmasked. Handing the payload over piece by
    piece lets the message layer check UTF-8 as it arrives (§8.1). Bad bytes
    raise ProtocolError as soon as they are seen. The Connection feeds it from
    a socket; ``parse_frame`` from one buffer, which is how the tests use it.

    The bytes fed are kept as they came, with a read position, rather than
    copied into a growing buffer: the payload is unmasked straight out of
    them. Only what is left unread when more arrives (a header cut in two) is
    copied, and the Connection reads all it can before it feeds more.
    """

    __slots__ = ("expect_masked", "extension_rsv", "remaining", "_data", "_pos", "_mask_key",
                 "_offset")

    def __init__(self, *, expect_masked: bool, extension_rsv: int = 0) -> None:
        self.expect_masked = expect_masked   # True on the server: client frames are masked
        self.extension_rsv = extension_rsv   # RSV bits an extension defines (check_first_two_bytes)
        self.remaining = 0                   # payload bytes of the current frame not yet read
        self._data = b""                     # bytes fed; those before _pos are read
        self._pos = 0
        self._mask_key: bytes | None = None
        self._offset = 0                     # payload bytes of the current frame already read

    def feed(self, data: bytes) -> None:
        self._data = self._data[self._pos:] + data   # b"" + data is data itself: no copy
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes fed but not handed out yet."""
        return len(self._data) - self._pos

    def _header_bytes(self) -> bytes:
        """The next header's bytes if all of them are here, else b""."""
        data, pos = self._data, self._pos
        if len(data) - pos < 2:
            return b""
        check_first_two_bytes(data[pos], data[pos + 1], expect_masked=self.expect_masked,
                              extension_rsv=self.extension_rsv)
        size = header_size(data[pos + 1])
        return data[pos:pos + size] if len(data) - pos >= size else b""

    def peek_header(self) -> bytes:
        """The next header's bytes, for the -v trace, without reading them."""
        return self._header_bytes()

    def read_header(self) -> FrameHeader | None:
        """The next frame's header, or None until all of it has arrived."""
        assert not self.remaining, "the previous frame's payload is still unread"
        raw = self._header_bytes()
        if not raw:
            return None
        header = parse_header(raw)
        self._advance(len(raw))
        self.remaining, self._mask_key, self._offset = header.length, header.mask_key, 0
        return header

    def read_payload(self) -> bytes:
        """Whatever of the current frame's payload has arrived, unmasked (maybe b"")."""
        start = self._pos
        end = start + min(self.remaining, len(self._data) - start)
        if start == end:
            return b""
        if self._mask_key is not None:
            chunk = apply_mask(self._data, rotate_mask(self._mask_key, self._offset), start, end)
        else:
            chunk = self._data[start:end]   # all of the bytes fed: the same object, no copy
        self._advance(end - start)
        self.remaining -= end - start
        self._offset += end - start
        return chunk

    def _advance(self, size: int) -> None:
        self._pos += size
        if self._pos == len(self._data):   # all read: let go of it (an idle peer keeps nothing)
            self._data, self._pos = b"", 0


def parse_frame(data: bytes, *, expect_masked: bool) -> tuple[FrameHeader, bytes, int]:
    """Decode one complete frame from the start of ``data``: header, payload, size in bytes."""
    reader = FrameReader(expect_masked=expect_masked)
    reader.feed(data)
    header = reader.read_header()
    payload = reader.read_payload() if header is not None else b""
    if header is None or reader.remaining:
        raise ValueError("incomplete frame")
    return header, payload, len(data) - reader.buffered


# 5. Messages ###############################################################

class Message(typing.NamedTuple):
    """A complete data message (§5.6): TEXT, its payload already checked as UTF-8, or BINARY."""

    opcode: int
    payload: bytes

    def decoded(self) -> str | bytes:
        """What recv() returns: the text as a str, a binary payload as bytes."""
        return self.payload.decode("utf-8") if self.opcode == Opcode.TEXT else self.payload


class MessageAssembler:
    """Joins data frames into messages (§5.4) and checks text as it arrives (§8.1).

    A message is one TEXT or BINARY frame followed by CONTINUATION frames
    until one has FIN set. Control frames may come in between (§5.4), so they
    never pass through here. Text goes through an incremental UTF-8 decoder as
    it arrives, so an invalid byte fails the connection at once, not when the
    message ends.

    The pieces are kept as they came and joined once, at the end, so each
    byte is copied once (a growing buffer would copy a large message over and
    over as it grows). Pieces under SMALL_PIECE bytes are first copied
    together, so that a peer sending a message one byte per frame costs us
    no more than the message, not an object per byte.
    """

    SMALL_PIECE = 4096

    __slots__ = ("max_size", "opcode", "size", "added", "pieces", "small", "decoder")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.opcode: int | None = None   # TEXT or BINARY while a message is in progress
        self.size = 0                    # bytes announced by the frame headers so far
        self.added = 0                   # bytes of payload taken so far (after inflating, if any)
        self.pieces: list[bytes] = []
        self.small = bytearray()         # small pieces, copied together
        self.decoder: codecs.BufferedIncrementalDecoder | None = None

    def start_frame(self, opcode: int, length: int) -> None:
        """Check a data frame's header against the message in progress, before its payload."""
        if opcode == Opcode.CONTINUATION:
            if self.opcode is None:
                raise ProtocolError("continuation frame with no message to continue")
        elif self.opcode is not None:
            raise ProtocolError("new message before the previous one's final fragment")
        else:
            self.opcode = opcode
            self.size = self.added = 0
            if opcode == Opcode.TEXT:
                self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.size += length
        if self.size > self.max_size:
            # Checked against the header, so the payload is never read at all.
            raise MessageTooBig(f"message over {self.max_size} bytes")

    def add(self, chunk: bytes) -> None:
        """Take the next piece of (unmasked) payload."""
        # ASCII is valid UTF-8, and bytes.isascii() scans it far faster than a
        # decoder does, so only other bytes, or a piece that has to finish a
        # character the previous one began, go through the decoder.
        if self.decoder is not None and not (chunk.isascii() and not self.decoder.buffer):
            try:
                self.decoder.decode(chunk)   # only to check: text is passed on as UTF-8 bytes
            except UnicodeDecodeError as error:
                raise InvalidPayload(f"invalid UTF-8 in text message: {error.reason}") from None
        self.added += len(chunk)
        if len(chunk) < self.SMALL_PIECE:
            self.small += chunk
            if len(self.small) < self.SMALL_PIECE:
                return
            chunk = self.small
        elif self.small:
            self.pieces.append(self.small)
        self.small = bytearray()
        self.pieces.append(chunk)

    @property
    def room(self) -> int:
        """How many more bytes the message may grow by: an inflater's bound (section 12)."""
        return self.max_size - self.added

    def finish(self) -> Message:
        """The complete message, after the frame with FIN set; text stays UTF-8 bytes."""
        if self.small:
            self.pieces.append(self.small)
        # join returns a lone bytes piece itself, uncopied: a frame read whole
        message = Message(self.opcode, b"".join(self.pieces))
        decoder = self.decoder
        self.opcode, self.pieces, self.small, self.decoder = None, [], bytearray(), None
        if decoder is not None:
            try:
                decoder.decode(b"", True)   # a sequence cut off at the end?
            except UnicodeDecodeError:
                raise InvalidPayload("text message ends inside a UTF-8 sequence") from None
        return message


def encode_close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: a 2-byte code, then a UTF-8 reason (§5.5.1)."""
    if code == CloseCode.NO_STATUS_RCVD:
        return b""   # "no code" is expressed by an empty payload
    encoded = reason.encode("utf-8")
    # Trim the reason so the frame stays within 125 bytes, without splitting a character.
    encoded = encoded[:MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + encoded


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """A received close frame's code and reason (§5.5.1, §7.4)."""
    if not payload:
        return CloseCode.NO_STATUS_RCVD, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = struct.unpack("!H", payload[:2])[0]
    if code not in SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(f"close code {code} is not allowed on the wire")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("close reason is not UTF-8") from None
    return code, reason


# 6. Connection #############################################################
#
# Theory of operation. A Connection runs no task of its own: the task that
# calls recv() reads frames, answers pings, and notices the closing handshake
# on the way to the next message. That keeps an idle connection small (one
# task per connection in all) and keeps every frame in order: a message that
# arrived before a broken frame is delivered before the connection fails.
# The price: pings are answered only while some task is in recv(), so a
# program that stops reading for long is, to its peer, a dead one.
#
# Everything we send goes through one outbox per connection: a frame is
# queued, and the queue is written at the end of the current turn of the
# event loop with one system call. Pongs, broadcasts, direct replies and the
# close frame all take that path, so they leave in the order they were
# queued, whoever queued them; send() writes the queue at once and then waits
# for the peer to read it.
#
# States (§7): OPEN -> CLOSING once a close frame was sent -> CLOSED once TCP
# is closed. Whenever we send a close frame we also start a timer that aborts
# TCP if the peer doesn't finish the handshake in time; that one timer covers
# a peer that never answers, never reads, or never hangs up. How it ended is
# not stored but derived from the close frames sent and received (see
# ConnectionClosed).

class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def printable(text: str) -> str:
    """Escape every control or invisible character, so a peer can't drive a terminal.

    Whatever a peer sends may end up on a screen: the chat client's, or an
    operator's reading the log. An escape sequence could clear the screen,
    move the cursor or retitle the window; a newline or a right-to-left
    override could fake a line from someone else. Each one is shown as its
    Python escape instead (\\x1b, \\n).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def format_peer(writer: asyncio.StreamWriter) -> str:
    """'127.0.0.1:50312' or '[::1]:50312' for log lines."""
    peer = writer.get_extra_info("peername")
    return host_port(peer[0], peer[1]) if peer else "?"


def log_frame(who: str, direction: str, header_bytes: bytes, length: int) -> None:
    """The -v trace of one frame, so a learner can watch the protocol at work:

        127.0.0.1:50312 <<< TEXT fin=1 len=5 masked | 81 85 37 fa 21 3d
    """
    first, second = header_bytes[0], header_bytes[1]
    opcode = first & OPCODE_BITS
    name = Opcode(opcode).name if opcode in KNOWN_OPCODES else hex(opcode)
    logger.debug("%s %s %s fin=%d len=%d%s%s | %s", who, direction, name, bool(first & FIN_BIT),
                 length, " compressed" if first & RSV1 << 4 else "",
                 " masked" if second & MASK_BIT else "", header_bytes.hex(" "))


def log_head(who: str, direction: str, head: bytes) -> None:
    """The -v trace of a handshake's HTTP head, one line per header, escaped."""
    lines = [printable(line) for line in head.decode("latin-1").strip().split("\r\n")]
    logger.debug("%s %s %s", who, direction, "\n    ".join(lines))


def encode_and_trace(who: str, opcode: int, payload: bytes, *, mask: bool = False,
                     rsv: int = 0) -> bytes:
    """encode_frame, plus the -v trace line for the frame it returns."""
    frame = encode_frame(opcode, payload, mask=mask, rsv=rsv)
    if logger.isEnabledFor(logging.DEBUG):
        log_frame(who, ">>>", frame[:len(frame) - len(payload)], len(payload))
    return frame


class SharedFrames:
    """Frames broadcast in one turn of the event loop, queued once to each member.

    Queuing every broadcast line to every member costs a call per line per
    member; instead the room queues one SharedFrames to each member and keeps
    appending lines to it. It is sealed as soon as one member writes it, or
    anything else is queued behind it, so every member writes the very same
    bytes, joined once, and nothing queued later can overtake it.
    """

    __slots__ = ("frames", "_data")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._data: bytes | None = None

    @property
    def sealed(self) -> bool:
        return self._data is not None

    def append(self, *pieces: bytes) -> None:
        """Add a frame, whole or in pieces (its header, then its payload's parts)."""
        assert self._data is None, "sealed: start a new SharedFrames"
        self.frames += pieces

    def seal(self) -> bytes:
        """The frames, joined; nothing more can be appended."""
        if self._data is None:
            self._data = b"".join(self.frames)
        return self._data


class Connection:
    """One WebSocket connection after the opening handshake, in either role."""

    __slots__ = ("reader", "writer", "transport", "is_client", "path", "remote", "deflate",
                 "max_buffer", "close_timeout", "state", "close_rcvd", "close_sent",
                 "_frames", "_message", "_read_lock", "_outbox", "_loop", "_pong_waiters",
                 "_awaited_bytes", "_close_timer", "_keepalive_pending")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 is_client: bool, path: str = "/", max_size: int = MAX_MESSAGE_SIZE,
                 max_buffer: int = MAX_OUTGOING_BUFFER, close_timeout: float = CLOSE_TIMEOUT,
                 deflate: PerMessageDeflate | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.is_client = is_client
        self.path = path                      # the request target, e.g. "/chat?name=bob"
        self.remote = format_peer(writer)
        self.deflate = deflate                # permessage-deflate, if negotiated (section 12)
        self.max_buffer = max_buffer
        self.close_timeout = close_timeout
        self.state = State.OPEN
        self.close_rcvd: Close | None = None  # the peer's close frame, once it arrives
        self.close_sent: Close | None = None  # ours, once sent
        self._frames = FrameReader(expect_masked=not is_client, extension_rsv=RSV1 if deflate else 0)
        self._message = MessageAssembler(max_size)
        self._read_lock = asyncio.Lock()      # frames must be read by one task at a time
        self._outbox: list[bytes | SharedFrames] = []   # queued in this turn of the loop
        self._awaited_bytes = 0               # of frames that send() waits to drain
        self._loop = asyncio.get_running_loop()
        self._pong_waiters: dict[bytes, asyncio.Future] = {}
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive_pending = False

    @property
    def close_code(self) -> int | None:
        """How the connection ended or is ending (see ConnectionClosed); None while open."""
        return None if self.state is State.OPEN else self._closed_error().code

    # -- receiving ----------------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next message: str for text, bytes for binary; ConnectionClosed once over."""
        return (await self.recv_message()).decoded()

    async def recv_message(self) -> Message:
        """The next message with its opcode, text left as the UTF-8 bytes that came.

        Its UTF-8 was checked as it arrived, so a server that relays text can
        put these bytes in its own frame without decoding and encoding them.
        """
        async with self._read_lock:
            return await self._receive()

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> str | bytes:
        """``async for message in conn`` ends quietly when the connection closes."""
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def _receive(self) -> Message:
        """Read the next message; every way a connection can end becomes ConnectionClosed."""
        if self.state is State.CLOSED:
            raise self._closed_error()
        try:
            return await self._read_message()
        except ProtocolError as error:        # this is the one place errors become close codes
            await self._fail(error.close_code, str(error))
        except (asyncio.IncompleteReadError, OSError):
            self._finish()                    # TCP ended, with or without a close frame
        raise self._closed_error()

    async def _read_message(self) -> Message:
        """Read frames until a data message is complete, handling control frames on the way."""
        while True:
            header = await self._read_header()
            if header.opcode in CONTROL_OPCODES:   # §5.4: may come between fragments
                await self._on_control(header.opcode, await self._read_control_payload())
                continue
            inflate = self.deflate is not None and self.deflate.start_frame(header)
            # A compressed frame's length says little about the message's: the inflater bounds that.
            self._message.start_frame(header.opcode, 0 if inflate else header.length)
            while self._frames.remaining:
                chunk = await self._read_payload_chunk()
                self._message.add(self.deflate.inflate(chunk, self._message.room) if inflate else chunk)
            if header.fin:
                if inflate:
                    self._message.add(self.deflate.end_message(self._message.room))
                message = self._message.finish()
                if self.state is State.OPEN:   # once we sent a close frame, data is dropped
                    return message

    async def _read_header(self) -> FrameHeader:
        """The next frame's header, checked as soon as each part of it arrives (§5.2)."""
        while True:
            raw = self._frames.peek_header() if logger.isEnabledFor(logging.DEBUG) else b""
            header = self._frames.read_header()
            if header is not None:
                break
            await self._receive_more()
        if raw:
            log_frame(self.remote, "<<<", raw, header.length)
        return header

    async def _read_payload_chunk(self) -> bytes:
        """Whatever of the frame's payload has arrived, waiting until something has.

        Taking what is there, rather than waiting for the whole payload, lets
        invalid UTF-8 fail the connection the moment it shows up, even in the
        middle of a frame (§8.1). Usually the whole payload is already here.
        """
        while not (chunk := self._frames.read_payload()):
            await self._receive_more()
        return chunk

    async def _read_control_payload(self) -> bytes:
        payload = b""
        while self._frames.remaining:   # at most 125 bytes (§5.5)
            payload += await self._read_payload_chunk()
        return payload

    async def _receive_more(self) -> None:
        """Feed the frame reader whatever the socket has next."""
        data = await self.reader.read(READ_BUFFER_LIMIT)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)   # TCP closed mid-frame
        self._frames.feed(data)

    async def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == Opcode.PING:
            # §5.5.2: "an endpoint MUST send a Pong frame in response", with the same data,
            # unless it has already sent a close frame.
            if self.state is State.OPEN:
                self._send_frame(Opcode.PONG, payload)
        elif opcode == Opcode.PONG:
            self._on_pong(payload)
        else:
            await self._on_close(payload)

    def _on_pong(self, payload: bytes) -> None:
        """Wake ping() callers; an unsolicited pong is simply ignored (§5.5.3)."""
        self._keepalive_pending = False   # any pong shows the peer is alive
        if payload not in self._pong_waiters:
            return
        # §5.5.3: a pong may answer only the latest ping, so it settles earlier ones too.
        for data in list(self._pong_waiters):
            waiter = self._pong_waiters.pop(data)
            if not waiter.done():
                waiter.set_result(None)
            if data == payload:
                break

    async def _on_close(self, payload: bytes) -> None:
        """The peer's close frame: answer it if it started the closing handshake (§5.5.1)."""
        self.close_rcvd = Close(*parse_close_payload(payload))
        if self.state is State.OPEN:
            # §5.5.1: "the endpoint MUST send a Close frame in response ...
            # typically echoing the status code it received".
            self._send_close(self.close_rcvd.code)
        if self.is_client:
            # §7.1.1: the server closes TCP first; the client waits for that.
            await self._discard_until_eof()
        self._finish()
        raise self._closed_error()

    # -- sending ------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        """Send one message: str as a text frame, bytes as a binary frame (§5.6)."""
        if self.state is not State.OPEN:
            raise self._closed_error()
        opcode, payload = ((Opcode.TEXT, message.encode("utf-8")) if isinstance(message, str)
                           else (Opcode.BINARY, bytes(message)))
        compressed = self.deflate.deflate(payload) if self.deflate is not None else None
        if compressed is None:
            frame = encode_and_trace(self.remote, opcode, payload, mask=self.is_client)
        else:
            frame = encode_and_trace(self.remote, opcode, compressed, mask=self.is_client, rsv=RSV1)
        self._queue(frame)
        self._flush()                   # now, so that drain() waits for this message too
        self._awaited_bytes += len(frame)
        try:
            await self.writer.drain()   # wait while the peer is slow to read
        except OSError:
            self.transport.abort()      # the reading side will see the end too
            raise self._closed_error() from None
        finally:
            self._awaited_bytes -= len(frame)

    def queue_frame(self, frame: bytes | SharedFrames) -> None:
        """Queue already-encoded data frames, never waiting: the broadcast path.

        They are written at the end of this turn of the event loop, together
        with everything else queued for this peer meanwhile.
        """
        if self.state is State.OPEN:
            self._queue(frame)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        self._queue(encode_and_trace(self.remote, opcode, payload, mask=self.is_client))

    def _queue(self, frame: bytes | SharedFrames) -> None:
        outbox = self._outbox
        if not outbox:
            self._loop.call_soon(self._write_queued)
        elif isinstance(outbox[-1], SharedFrames):
            outbox[-1].seal()   # what is queued now must come after all of it
        outbox.append(frame)

    def _write_queued(self) -> None:
        """End of the loop turn: write the outbox, and drop a peer that isn't reading.

        Whatever we write without waiting (broadcasts, pongs) is kept in check
        only by the peer's reading; one that leaves more than ``max_buffer``
        bytes unread is dropped with 1008, so a slow reader can neither make
        us buffer without bound nor delay anyone else. What send() is waiting
        to drain doesn't count: that wait already keeps it in check.
        """
        self._flush()
        backlog = self._unsent_bytes() - self._awaited_bytes
        if self.state is State.OPEN and backlog > self.max_buffer:
            self.fail_nowait(CloseCode.POLICY_VIOLATION,
                             f"too slow: over {self.max_buffer} bytes waiting to be read")

    def _flush(self) -> None:
        """Write every queued frame, in order, with one system call."""
        outbox = self._outbox
        if not outbox:
            return
        parts = [item.seal() if isinstance(item, SharedFrames) else item for item in outbox]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        outbox.clear()
        if not self.transport.is_closing():
            self.transport.write(data)

    def _unsent_bytes(self) -> int:
        """Bytes written but not yet taken by the kernel; 0 once the connection is gone."""
        try:
            return self.transport.get_write_buffer_size()
        except AttributeError:   # a TLS transport that lost its connection (Python 3.10-3.11)
            return 0

    async def ping(self, data: bytes = b"") -> None:
        """Send a ping and wait for its pong (§5.5.2).

        The pong arrives through recv(), so some task must be reading
        (a server handler always is; a client usually runs a receive loop).
        """
        if self.state is not State.OPEN:
            raise self._closed_error()
        waiter = self._pong_waiters.get(data)
        if waiter is None:
            waiter = self._pong_waiters[data] = self._loop.create_future()
            self._send_frame(Opcode.PING, data)
        await waiter

    def keepalive_tick(self) -> None:
        """Called every keepalive interval: ping, or drop a peer that missed the last ping.

        We close with 1011, as the websockets library does: from our side the
        connection has become unusable, which is an unexpected condition.
        """
        if self.state is not State.OPEN:
            return
        if self._keepalive_pending:
            self.fail_nowait(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        else:
            self._keepalive_pending = True
            self._send_frame(Opcode.PING, b"keepalive")

    # -- closing ------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Run the closing handshake (§7.1.2) and return once TCP is closed."""
        self.close_nowait(code, reason)
        # If another task is in recv(), it will read the peer's close frame;
        # otherwise we read (and drop) whatever comes before it ourselves.
        async with self._read_lock:
            while self.state is not State.CLOSED:
                try:
                    await self._receive()
                except ConnectionClosed:
                    pass

    def close_nowait(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame now; whichever task reads will finish the handshake."""
        if self.state is State.OPEN:
            self._send_close(code, reason)

    def fail_nowait(self, code: int, reason: str) -> None:
        """Close from code that can't wait (a broadcast, a timer), and log why."""
        if self.state is State.OPEN:
            logger.info("%s: closing with %s: %s", self.remote, describe_close_code(code), reason)
            self._send_close(code, reason)

    async def _fail(self, code: int, reason: str) -> None:
        """Fail the WebSocket Connection (§7.1.7) after the peer broke the protocol."""
        logger.info("%s: protocol error, closing with %s: %s",
                    self.remote, describe_close_code(code), reason)
        if self.state is not State.OPEN:   # already closing: no second close frame
            self.transport.abort()
        else:
            self._send_close(code, reason)
            # The peer may be halfway through frames we will never parse. We
            # stop writing (a server closes first, §7.1.1), then discard what
            # it sends until it hangs up, so that closing our socket with
            # unread data doesn't send a TCP reset that could destroy our
            # close frame before the peer reads it.
            if not self.is_client and self.transport.can_write_eof():
                self.transport.write_eof()
            await self._discard_until_eof()
        self._finish()

    def _send_close(self, code: int, reason: str = "") -> None:
        """Queue our close frame and write it at once: nothing may follow it (§5.5.1)."""
        self.close_sent = Close(code, reason)
        self._send_frame(Opcode.CLOSE, encode_close_payload(code, reason))
        self._flush()
        self.state = State.CLOSING
        self._close_timer = self._loop.call_later(self.close_timeout, self.transport.abort)

    async def _discard_until_eof(self) -> None:
        """Read and drop bytes until the peer closes TCP (or the close timer aborts it)."""
        try:
            while await self.reader.read(READ_BUFFER_LIMIT):
                pass
        except OSError:
            pass

    def _finish(self) -> None:
        """TCP is (being) closed: settle everything still waiting on this connection."""
        self.state = State.CLOSED
        self._outbox.clear()            # no one is left to read it
        unsent = self._unsent_bytes()   # asked before closing: a closed TLS transport can't tell
        self.writer.close()
        # Keep the timer only while our last bytes are still queued for a
        # peer that isn't reading: then it is what finally aborts TCP.
        if self._close_timer is not None and not unsent:
            self._close_timer.cancel()
        for waiter in self._pong_waiters.values():
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        self._pong_waiters.clear()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self.close_rcvd, self.close_sent,
                                tcp_closed=self.state is State.CLOSED)


async def keepalive(connections: Collection[Connection], interval: float) -> None:
    """Ping every connection each interval, dropping those that missed the last ping.

    One loop for the whole server, instead of a timer task per connection.
    """
    while True:
        await asyncio.sleep(interval)
        for conn in list(connections):
            conn.keepalive_tick()


# 7. Server and client ######################################################

async def read_http_head(reader: asyncio.StreamReader) -> list[bytes]:
    """Read lines up to the blank line that ends an HTTP head, within our limits."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the whole read buffer
            raise HandshakeError(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 "request head too large") from None
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)  # the peer hung up mid-head
        size += len(line)
        if size > MAX_HEAD_SIZE or len(lines) > MAX_HEADER_LINES:
            raise HandshakeError(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 f"request head over {MAX_HEAD_SIZE} bytes or {MAX_HEADER_LINES} lines")
        line = line.rstrip(b"\r\n")
        if not line:
            return lines
        lines.append(line)


def log_network_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Event-loop errors caused by a peer (a failed TLS handshake, a reset) get one line.

    asyncio would log them with a traceback; a peer must not be able to put
    tracebacks in our log. Anything else is a real bug and keeps its traceback.
    """
    error = context.get("exception")
    if isinstance(error, (OSError, ssl.SSLError)):
        logger.info("%s: %s", context.get("message", "network error"), error)
    else:
        loop.default_exception_handler(context)


Handler = Callable[[Connection], Awaitable[None]]
RequestHook = Callable[[Request], "Response | None"]


class WebSocketServer:
    """Accepts TCP connections, runs the opening handshake, hands each WebSocket to a handler.

    ``process_request`` may answer a request itself (a web page, a 404, a
    refusal) by returning a Response; returning None lets the upgrade go on.
    """

    def __init__(self, handler: Handler, *, process_request: RequestHook | None = None,
                 max_size: int = MAX_MESSAGE_SIZE, max_buffer: int = MAX_OUTGOING_BUFFER,
                 max_clients: int | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 close_timeout: float = CLOSE_TIMEOUT,
                 keepalive_interval: float | None = KEEPALIVE_INTERVAL,
                 compression: bool = True) -> None:
        self.handler = handler
        self.process_request = process_request
        self.max_size = max_size
        self.max_buffer = max_buffer
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.keepalive_interval = keepalive_interval
        self.compression = compression        # accept permessage-deflate (section 12)
        self.connections: set[Connection] = set()
        self._tasks: dict[asyncio.Task, Connection | None] = {}
        self._server: asyncio.Server | None = None
        self._keepalive: asyncio.Task | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:   # unless the application chose its own
            loop.set_exception_handler(log_network_errors)
        # backlog: a burst of clients connecting at once waits in the kernel's
        # queue (1024, not asyncio's 100) instead of being refused.
        self._server = await asyncio.start_server(
            self._serve_tcp, host, port, ssl=ssl_context, limit=READ_BUFFER_LIMIT, backlog=1024)
        if self.keepalive_interval:
            self._keepalive = asyncio.create_task(keepalive(self.connections, self.keepalive_interval))

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection, from the first byte to the last."""
        task = asyncio.current_task()
        self._tasks[task] = None
        try:
            conn = await self._handshake(reader, writer)
            if conn is not None:
                self._tasks[task] = conn
                await self._run_handler(conn)
        finally:
            del self._tasks[task]
            writer.close()

    async def _run_handler(self, conn: Connection) -> None:
        self.connections.add(conn)
        code = CloseCode.NORMAL_CLOSURE
        try:
            await self.handler(conn)
        except Exception:   # a bug in the handler must not take the server down
            logger.exception("%s: handler failed", conn.remote)
            code = CloseCode.INTERNAL_ERROR
        finally:
            self.connections.discard(conn)
        await conn.close(code)

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> Connection | None:
        """Read the request; answer 101 and return a Connection, or refuse and return None."""
        peer = format_peer(writer)
        try:
            # Both sides bound the handshake the same way: wait_for around it.
            request, response = await asyncio.wait_for(self._read_request(reader, peer),
                                                       self.handshake_timeout)
        except asyncio.TimeoutError:
            logger.info("%s: handshake not completed in time; dropping", peer)
            return None
        except (asyncio.IncompleteReadError, OSError):
            return None   # the peer left mid-handshake
        head = serialize_response(response)
        writer.write(head)
        if response.status != http.HTTPStatus.SWITCHING_PROTOCOLS:
            if response.status >= 400:
                logger.info("%s: refused handshake: %d %s", peer, response.status,
                            printable(response.body.strip()[:200]))
            return None
        if logger.isEnabledFor(logging.DEBUG):
            log_head(peer, ">>>", head)
        assert request is not None   # a 101 answers only a request that parsed
        agreed = dict(response.headers).get("Sec-WebSocket-Extensions")
        return Connection(reader, writer, is_client=False, path=request.target,
                          max_size=self.max_size, max_buffer=self.max_buffer,
                          close_timeout=self.close_timeout,
                          deflate=agreed_deflate(agreed, is_client=False))

    async def _read_request(self, reader: asyncio.StreamReader,
                            peer: str) -> tuple[Request | None, Response]:
        """Read the request head and decide the answer; a HandshakeError becomes a refusal."""
        request = None   # until it parses
        try:
            lines = await read_http_head(reader)
            if logger.isEnabledFor(logging.DEBUG):
                log_head(peer, "<<<", b"\r\n".join(lines))
            request = parse_request(lines)
            return request, self._route(request)
        except HandshakeError as error:
            return request, error.as_response()

    def _route(self, request: Request) -> Response:
        """What a request gets: the application's own answer, a refusal, or the 101."""
        require_get(request)
        if self.process_request is not None:
            response = self.process_request(request)
            if response is not None:
                return response
        key = check_request(request)
        if self.max_clients is not None and len(self.connections) >= self.max_clients:
            return Response(http.HTTPStatus.SERVICE_UNAVAILABLE,
                            f"server full ({self.max_clients} clients); try again later\n",
                            (("Retry-After", "30"),))
        offers = request.headers.get("sec-websocket-extensions")
        return switching_protocols(key, accept_deflate(offers) if self.compression else None)

    async def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down") -> None:
        """Stop listening, close every connection with ``code``, wait for them (bounded)."""
        if self._server is not None:
            self._server.close()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for task, conn in list(self._tasks.items()):
            if conn is None:
                task.cancel()             # still in its handshake
            else:
                conn.close_nowait(code, reason)
        tasks = list(self._tasks)
        if tasks:
            # Each close frame carries its own abort timer, so this wait is
            # bounded; the margin covers a handler still tidying up.
            _, pending = await asyncio.wait(tasks, timeout=self.close_timeout + 1)
            for task in pending:
                task.cancel()
            await asyncio.wait(tasks)


async def serve(handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                ssl_context: ssl.SSLContext | None = None, **options: typing.Any) -> WebSocketServer:
    """Start a WebSocket server; ``options`` go to WebSocketServer."""
    server = WebSocketServer(handler, **options)
    await server.start(host, port, ssl_context)
    return server


async def connect(uri: str, *, ssl_context: ssl.SSLContext | None = None,
                  origin: str | None = None, max_size: int = MAX_MESSAGE_SIZE,
                  open_timeout: float = HANDSHAKE_TIMEOUT,
                  close_timeout: float = CLOSE_TIMEOUT, compression: bool = True) -> Connection:
    """Open a client connection to a ws:// or wss:// URI (RFC 6455 §4.1),
    offering permessage-deflate unless ``compression`` is False (section 12)."""
    target = parse_uri(uri)
    if target.secure and ssl_context is None:
        ssl_context = ssl.create_default_context()   # verifies the certificate and host name

    async def open_and_handshake() -> Connection:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=ssl_context if target.secure else None,
            limit=READ_BUFFER_LIMIT)
        try:
            deflate = await client_handshake(reader, writer, target, origin, compression)
        except BaseException:
            writer.close()
            raise
        return Connection(reader, writer, is_client=True, path=target.resource,
                          max_size=max_size, close_timeout=close_timeout, deflate=deflate)

    try:
        return await asyncio.wait_for(open_and_handshake(), open_timeout)
    except asyncio.TimeoutError:
        raise HandshakeError(http.HTTPStatus.GATEWAY_TIMEOUT,
                             f"no handshake within {open_timeout:g} s") from None


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           target: WebSocketURI, origin: str | None,
                           compression: bool = False) -> PerMessageDeflate | None:
    """Send the request and check the response (§4.1); raise HandshakeError if refused.

    Returns the compression the server agreed to, if we offered it.
    """
    key = new_key()
    offer = CLIENT_DEFLATE_OFFER if compression else None
    writer.write(build_request(target, key, origin, offer))
    try:
        lines = await read_http_head(reader)
    except asyncio.IncompleteReadError:
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY,
                             "connection closed during the handshake") from None
    if not lines:
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY, "empty response")
    status = parse_status_line(lines[0])
    headers = parse_headers(lines[1:])
    if status != http.HTTPStatus.SWITCHING_PROTOCOLS:
        raise InvalidStatus(status, await read_short_body(reader, headers))
    check_response(headers, key, offered_extensions=compression)
    return agreed_deflate(headers.get("sec-websocket-extensions"), is_client=True)


async def read_short_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> str:
    """The first line of an error response's body: servers put the reason there."""
    try:
        length = min(int(headers.get("content-length", "0")), 4096)
        body = await reader.readexactly(length)
    except (ValueError, asyncio.IncompleteReadError, OSError):
        return ""
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else ""


# 8. Chat room ##############################################################
#
# The application on top of the protocol, after the Ktor hands-on "Creating a
# WebSocket chat": everyone in one room, every line relayed to everyone.
# Everything on the wire is a plain text line, readable in any WebSocket
# client (wscat, a browser console):
#
#   [bob]: hello                  a message, the name attached by the server
#   [bob → alice]: psst           a private message (/msg alice psst)
#   (history) [bob]: earlier      the recent past, sent to a newcomer
#   * alice joined                a notice from the server

CHAT_PATH = "/chat"

#: A newcomer sees the last 50 messages.
HISTORY_SIZE = 50

#: Names fit on a line and can't be confused with the "[name]:" framing.
MAX_NAME_LENGTH = 32

#: Announcing each arrival to every member costs N² writes while a room
#: fills; past this size joins and leaves are not announced, as in big IRC
#: channels. ``--announce-limit`` changes it.
ANNOUNCE_LIMIT = 100

#: Flood control: a burst of 20 messages, then 2 per second. A member who
#: keeps sending into a refusal 20 times in a row is disconnected (1008).
RATE_BURST = 20
RATE_PER_SECOND = 2.0

#: What the server adds around a member's text when it relays it, at most:
#: a client must accept messages this much larger than the server's limit.
RELAY_OVERHEAD = 1024

#: The first line a member receives; clients learn their name from it.
GREETING = "* You are connected as {name}!"
GREETING_PATTERN = r"^\* You are connected as (\S+)!"   # the terminal client and the page

HELP = "* commands: /who (who is here), /msg NAME TEXT (private message), /quit"


def check_name(raw: str) -> str:
    """A usable name, or ValueError saying why not."""
    name = raw.strip()
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"a name must have 1 to {MAX_NAME_LENGTH} characters")
    # /msg NAME TEXT needs names without spaces; "[" and "]" would blur "[name]:".
    if not name.isprintable() or any(c.isspace() or c in "[]" for c in name):
        raise ValueError("a name can't contain spaces, brackets or control characters")
    return name


class TokenBucket:
    """Rate limiting: ``burst`` tokens, refilled at ``rate`` per second, one per message."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def utf8(line: str | bytes) -> bytes:
    """A line to send: a str is encoded; bytes are a member's text, UTF-8 already."""
    return line.encode("utf-8") if isinstance(line, str) else line


class ChatRoom:
    """Who is here, what they said lately, and relaying it to everyone."""

    def __init__(self, *, history_size: int = HISTORY_SIZE, rate: float = RATE_PER_SECOND,
                 burst: int = RATE_BURST, announce_limit: int = ANNOUNCE_LIMIT,
                 allowed_origins: Collection[str] = (), secure: bool = False) -> None:
        self.members: dict[str, Connection] = {}
        # (name, text): the text as the UTF-8 it came in
        self.history: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=history_size)
        self.rate, self.burst = rate, burst
        self.announce_limit = announce_limit
        self.allowed_origins = {origin.lower().rstrip("/") for origin in allowed_origins}
        self.secure = secure
        self._guest_number = 0
        # This turn's broadcasts while open, one SharedFrames per deflate
        # window among the members (0: uncompressed; see section 12).
        self._shared: dict[int, SharedFrames] = {}

    # -- before the upgrade ------------------------------------------------

    def process_request(self, request: Request) -> Response | None:
        """Serve the page at /, refuse other paths and foreign origins, upgrade /chat."""
        if request.path == "/" and not wants_upgrade(request.headers):
            return Response(http.HTTPStatus.OK, PAGE, content_type="text/html; charset=utf-8")
        if request.path != CHAT_PATH:
            return Response(http.HTTPStatus.NOT_FOUND, "not found: the chat is at /chat, the page at /\n")
        origin = request.headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("host", "")):
            return Response(http.HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed here\n")
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        """RFC 6455 §10.2: browsers say which site opened the socket; accept only ours.

        Without this check any web page a member visits could open a socket
        to the chat with their cookies and speak in their name (cross-site
        WebSocket hijacking). Non-browser clients send no Origin at all.
        """
        origin = origin.lower().rstrip("/")
        own = f"{'https' if self.secure else 'http'}://{host.lower()}"
        return origin == own or origin in self.allowed_origins

    # -- a member's life ---------------------------------------------------

    async def handle(self, conn: Connection) -> None:
        """The WebSocket handler: admit, relay until the member leaves, say goodbye."""
        try:
            name = self.admit(conn)
        except ValueError as refusal:
            # Refused after the upgrade, with a close reason, rather than with
            # an HTTP error: browsers never show a page the body of a failed
            # handshake, but they do show a close frame's reason.
            logger.info("%s: refused: %s", conn.remote, refusal)
            await conn.close(CloseCode.POLICY_VIOLATION, str(refusal))
            return
        logger.info("%s: %s joined (%d here)", conn.remote, name, len(self.members))
        try:
            await self.relay_messages(name, conn)
        finally:
            del self.members[name]
            code = conn.close_code   # None if the handler failed: the server closes it next
            logger.info("%s: %s left (%s)", conn.remote, name,
                        describe_close_code(code) if code else "handler failed")
            if len(self.members) < self.announce_limit:
                self.broadcast(f"* {name} left")

    def admit(self, conn: Connection) -> str:
        """Give the newcomer a name, a greeting and the recent history; tell the others."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(conn.path).query)
        name = check_name(query["name"][0]) if "name" in query else self.guest_name()
        if name in self.members:
            raise ValueError(f"the name {name} is taken; pick another")
        if len(self.members) < self.announce_limit:
            self.broadcast(f"* {name} joined")
        self.members[name] = conn
        self._shared = {}   # what was broadcast before is not for the newcomer
        count = len(self.members)
        self.tell(conn, GREETING.format(name=name) + f" There {'is' if count == 1 else 'are'} "
                        f"{count} user{'' if count == 1 else 's'} here. Type /help for commands.")
        for sender, text in self.history:
            self.tell(conn, f"(history) [{sender}]: ".encode("utf-8") + text)
        return name

    def guest_name(self) -> str:
        while True:
            self._guest_number += 1
            name = f"user{self._guest_number}"
            if name not in self.members:
                return name

    async def relay_messages(self, name: str, conn: Connection) -> None:
        """Read the member's messages until the connection ends."""
        bucket = TokenBucket(self.rate, self.burst) if self.rate else None
        refused_in_a_row = 0
        while True:
            try:
                message = await conn.recv_message()
            except ConnectionClosed:
                return
            if message.opcode == Opcode.BINARY:
                conn.fail_nowait(CloseCode.UNSUPPORTED_DATA, "binary messages are not chat; send text")
            elif bucket is not None and not bucket.take():
                refused_in_a_row += 1
                if refused_in_a_row >= self.burst:
                    conn.fail_nowait(CloseCode.POLICY_VIOLATION, "flooding")
                else:
                    self.tell(conn, f"* slow down: message not sent (at most {self.rate:g} per second)")
            else:
                refused_in_a_row = 0
                self.on_text(name, conn, message.payload)

    def on_text(self, name: str, conn: Connection, text: bytes) -> None:
        """A member's line, as the UTF-8 it came in: relayed as it is, never decoded."""
        if not text.startswith(b"/"):
            self.history.append((name, text))
            self.broadcast(f"[{name}]: ", text)
            return
        command, _, argument = text.decode("utf-8").partition(" ")
        if command == "/who":
            self.tell(conn, f"* {len(self.members)} here: {', '.join(sorted(self.members))}")
        elif command == "/msg":
            self.private_message(name, conn, argument)
        elif command == "/quit":
            conn.close_nowait(CloseCode.NORMAL_CLOSURE, "bye")
        else:
            self.tell(conn, HELP)

    def private_message(self, name: str, conn: Connection, argument: str) -> None:
        recipient, _, text = argument.strip().partition(" ")
        if not recipient or not text:
            self.tell(conn, "* usage: /msg NAME TEXT")
        elif recipient not in self.members:
            self.tell(conn, f"* there is no {recipient} here; /who lists who is")
        else:
            line = f"[{name} → {recipient}]: {text}"
            self.tell(self.members[recipient], line)
            if recipient != name:
                self.tell(conn, line)

    # -- sending -----------------------------------------------------------

    def tell(self, conn: Connection, line: str | bytes) -> None:
        """Send one line to one member, without waiting, after what was queued for it before."""
        conn.queue_frame(encode_and_trace(conn.remote, Opcode.TEXT, utf8(line)))

    def broadcast(self, *parts: str | bytes) -> None:
        """Send one line, made of ``parts``, to every member, never waiting for any of them.

        The frame is encoded once: a server's frames are unmasked, so every
        member gets the same bytes. Lines broadcast in one turn of the event
        loop go into one SharedFrames queued to every member, and each
        connection writes its outbox with one system call, so a busy room
        costs one send() per member per turn, not one per line per member.
        A slow reader only fills its own buffer, and its connection drops it
        there. (The simple version: ``for conn in members: conn.queue_frame(frame)``;
        it is about a third slower at the benchmark's fan-out.)

        The parts (a name, then the member's text just as it arrived) are
        joined only there, with the header, so a 1 MiB line is copied once on
        its way to every member, rather than once into a line and again into
        a frame. Members who negotiated compression share a second
        SharedFrames, compressed once per line (section 12, broadcast_frame).
        """
        payload = [utf8(part) for part in parts]
        shared = self._shared
        if not shared or any(frames.sealed for frames in shared.values()):
            shared = self._shared = {}
            for conn in self.members.values():
                window_bits = conn.deflate.window_bits if conn.deflate is not None else 0
                if window_bits not in shared:
                    shared[window_bits] = SharedFrames()
                conn.queue_frame(shared[window_bits])
        for window_bits, frames in shared.items():
            pieces = broadcast_frame(Opcode.TEXT, payload, window_bits)
            if logger.isEnabledFor(logging.DEBUG):
                log_frame(f"all {len(self.members)}", ">>>", pieces[0], sum(map(len, pieces[1:])))
            frames.append(*pieces)


# 9. Client #################################################################
#
# The terminal client: a thread reads the keyboard (input() blocks, and the
# event loop must not), the event loop receives and prints. Lines from the
# network are printed *above* the line being typed, and nothing a peer sends
# reaches the terminal unescaped.

#: Close codes after which the server may well come back: reconnect then.
#: Anything else (a refused name, a protocol error) would only repeat.
RECONNECT_CODES = frozenset({
    CloseCode.GOING_AWAY, CloseCode.ABNORMAL_CLOSURE, CloseCode.INTERNAL_ERROR,
    CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER, CloseCode.BAD_GATEWAY})

#: Reconnection waits 1, 2, 4 ... seconds, never more than 30.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0

#: Print a line above the one being typed, leaving it (and the cursor) intact;
#: the technique of the websockets library's interactive client. In words:
#: save the cursor; open a new line and come back up; insert a blank line,
#: which pushes the typed line down; print there; restore the cursor, which
#: is now one line above the typed line (or on it, if the screen scrolled),
#: and step down.
ABOVE_PROMPT = "\x1b7\n\x1b[A\x1b[L{}\n\x1b8\x1b[B"

STYLES = {"mine": "1;32", "private": "35", "notice": "33", "history": "2", "error": "31"}


class Screen:
    """Where the room's lines go: escaped, coloured if wanted, above the typed line."""

    def __init__(self, out: typing.TextIO, *, interactive: bool, color: bool, name: str = "") -> None:
        self.out = out
        self.interactive = interactive   # a person typing at a terminal, with a prompt
        self.color = color
        self.name = name
        self.prompt = "> " if interactive else ""
        self._lock = threading.Lock()    # the keyboard thread writes too

    def classify(self, line: str) -> str:
        if line.startswith("* "):
            return "notice"
        if line.startswith("(history) "):
            return "history"
        if re.match(r"\[[^\]]* → ", line):
            return "private"
        if self.name and line.startswith(f"[{self.name}]: "):
            return "mine"
        return ""

    def show(self, line: str, style: str | None = None) -> None:
        named = re.match(GREETING_PATTERN, line)
        if named:
            self.name = named[1]
        text = printable(line)
        code = STYLES.get(self.classify(line) if style is None else style)
        if self.color and code:
            text = f"\x1b[{code}m{text}\x1b[0m"
        with self._lock:
            self.out.write(ABOVE_PROMPT.format(text) if self.interactive else text + "\n")
            self.out.flush()

    def erase_typed_line(self) -> None:
        """After Enter, remove the typed line: the server's echo will show it."""
        with self._lock:
            self.out.write("\x1b[A\x1b[2K")
            self.out.flush()


class Keyboard:
    """The lines the user typed, in order, read by a daemon thread.

    input() blocks, and the event loop must not; a daemon thread also means
    that Ctrl-C or the end of the program never waits for Enter. The loop
    side waits with ``wait()`` and takes a line with ``take()``; a line that
    could not be sent goes back to the front with ``unget()``.
    """

    def __init__(self, screen: Screen, stdin: typing.TextIO) -> None:
        self.screen = screen
        self.stdin = stdin
        self.lines: collections.deque[str] = collections.deque()
        self.ended = False          # end of input (Ctrl-D, or the end of a pipe)
        self.interrupted = False    # Ctrl-C or SIGTERM: quit now
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        threading.Thread(target=self._read, name="keyboard", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                line: str | None = input(self.screen.prompt) if self.screen.interactive \
                    else self.stdin.readline()
            except (EOFError, OSError, ValueError):
                line = None
            if not self.screen.interactive:
                line = line.rstrip("\n") if line else None   # "" means end of input
            elif line is not None:
                self.screen.erase_typed_line()
            self._loop.call_soon_threadsafe(self._put, line)
            if line is None:
                return

    def _put(self, line: str | None) -> None:
        if line is None:
            self.ended = True
        else:
            self.lines.append(line)
        self._changed.set()

    def interrupt(self) -> None:
        """Ctrl-C: quit before anything still queued."""
        self.interrupted = True
        self._changed.set()

    @property
    def done(self) -> bool:
        """The user wants out: Ctrl-C, or the input ended and every line was taken."""
        return self.interrupted or (self.ended and not self.lines)

    def quit_requested(self) -> bool:
        """Has the user asked to leave, even with lines still waiting to be sent?"""
        return self.interrupted or self.ended or any(map(is_quit_command, self.lines))

    async def wait(self) -> None:
        """Until there is a line to take, or the user is done."""
        await self.wait_until(lambda: bool(self.lines) or self.done)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` holds; it is checked again whenever the input changes."""
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    def take(self) -> str | None:
        """The next line, or None once the user is done."""
        return None if self.interrupted or not self.lines else self.lines.popleft()

    def unget(self, line: str) -> None:
        """Put back a line that could not be sent, to be sent first next time."""
        self.lines.appendleft(line)


def is_quit_command(line: str) -> bool:
    return line.strip() == "/quit"


def wants_color(out: typing.TextIO, environ: typing.Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return out.isatty() and not environ.get("NO_COLOR")


def explain_connect_error(error: BaseException) -> str:
    """What went wrong, in words a person can act on."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused — is the server running?"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{error.verify_message}: the server's certificate is not trusted " \
               "(--cafile FILE trusts a private CA; --insecure skips the check)"
    if isinstance(error, (HandshakeError, ValueError)):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def with_name(url: str, name: str | None) -> str:
    """The chat URL with ?name=... set (or left to the server when no name is given)."""
    if not name:
        return url
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "name"]
    query.append(("name", name))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class ChatClient:
    """Connects, shows the room, sends what is typed, reconnects when the server goes away."""

    def __init__(self, url: str, screen: Screen, keyboard: Keyboard, *,
                 reconnect: bool = True, ssl_context: ssl.SSLContext | None = None,
                 max_size: int = MAX_MESSAGE_SIZE + RELAY_OVERHEAD,
                 first_backoff: float = FIRST_BACKOFF, compression: bool = True) -> None:
        self.url, self.screen, self.keyboard = url, screen, keyboard
        self.reconnect = reconnect
        self.first_backoff = first_backoff
        self.ssl_context = ssl_context
        self.max_size = max_size
        self.compression = compression

    async def run(self) -> int:
        """The whole session; returns the exit status."""
        backoff, connected_before = self.first_backoff, False
        while True:
            try:
                conn = await connect(self.url, ssl_context=self.ssl_context, max_size=self.max_size,
                                     compression=self.compression)
            except (OSError, HandshakeError, ValueError) as error:
                if not (connected_before and self.reconnect):
                    self.screen.show(f"cannot connect to {self.url}: {explain_connect_error(error)}", "error")
                    return 1
                why = f" ({explain_connect_error(error)})"
            else:
                connected_before, backoff = True, self.first_backoff
                closed = await self.session(conn)
                if closed is None:
                    return 0
                self.screen.show(f"* disconnected: {closed}", "error")
                if not self.reconnect or closed.code not in RECONNECT_CODES:
                    return 1
                why = ""
            self.screen.show(f"* reconnecting in {backoff:g} s{why}", "notice")
            if await self.quit_requested_within(backoff):
                return 0
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def session(self, conn: Connection) -> ConnectionClosed | None:
        """One connection: None if the user quit, else how the connection ended."""
        receiving = asyncio.create_task(self.show_incoming(conn))
        pinging = asyncio.create_task(keepalive({conn}, KEEPALIVE_INTERVAL))
        try:
            while True:
                typed = asyncio.create_task(self.keyboard.wait())
                await asyncio.wait({typed, receiving}, return_when=asyncio.FIRST_COMPLETED)
                typed.cancel()
                if receiving.done():
                    return receiving.result()
                line = self.keyboard.take()
                if line is None or is_quit_command(line):
                    await conn.close(CloseCode.NORMAL_CLOSURE)
                    return None
                if line.strip() and not await self.send(conn, line):
                    return await receiving   # bounded: a closing connection has its timer
        finally:
            receiving.cancel()
            pinging.cancel()

    async def send(self, conn: Connection, line: str) -> bool:
        """Send a typed line; if the connection is closing, keep it for the next one."""
        try:
            await conn.send(line)
        except ConnectionClosed:
            self.keyboard.unget(line)
            return False
        return True

    async def show_incoming(self, conn: Connection) -> ConnectionClosed:
        while True:
            try:
                message = await conn.recv()
            except ConnectionClosed as closed:
                return closed
            if isinstance(message, bytes):
                message = f"* (binary message of {len(message)} bytes)"
            self.screen.show(message)

    async def quit_requested_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds; True if the user quit meanwhile (typed lines stay queued)."""
        try:
            await asyncio.wait_for(self.keyboard.wait_until(self.keyboard.quit_requested), delay)
        except asyncio.TimeoutError:
            return False
        return True


# 10. Command line ##########################################################

async def echo(conn: Connection) -> None:
    """Send every message back unchanged: the server conformance suites expect."""
    async for message in conn:
        await conn.send(message)


async def run_until_signalled(server: WebSocketServer) -> None:
    """Serve until Ctrl-C or SIGTERM, then close every connection with 1001."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    try:
        await stop
    finally:
        logger.info("shutting down: closing %d connection(s) with 1001", len(server.connections))
        await server.close()


async def run_echo(args: argparse.Namespace) -> int:
    server = await serve(echo, args.host, args.port, max_size=args.max_size,
                         max_buffer=max(MAX_OUTGOING_BUFFER, 4 * args.max_size),
                         compression=not args.no_compression)
    logger.info("echo server on ws://%s/", host_port(args.host, server.port))
    await run_until_signalled(server)
    return 0


def server_ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def client_ssl_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def run_server(args: argparse.Namespace) -> int:
    ssl_context = server_ssl_context(args.certfile, args.keyfile)
    room = ChatRoom(rate=args.rate, burst=args.burst, announce_limit=args.announce_limit,
                    allowed_origins=args.allow_origin, secure=ssl_context is not None)
    server = await serve(room.handle, args.host, args.port, ssl_context=ssl_context,
                         process_request=room.process_request, max_size=args.max_size,
                         max_buffer=args.max_buffer, max_clients=args.max_clients,
                         compression=not args.no_compression)
    address = host_port(args.host, server.port)
    secure = "s" if ssl_context else ""
    logger.info("chat server ready: ws%s://%s%s for clients, http%s://%s/ in a browser",
                secure, address, CHAT_PATH, secure, address)
    await run_until_signalled(server)
    return 0


async def run_client(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    color = wants_color(sys.stdout, os.environ)
    screen = Screen(sys.stdout, interactive=interactive, color=color, name=args.name or "")
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:   # not on every platform; plain input() still works
            pass
    keyboard = Keyboard(screen, sys.stdin)
    url = with_name(args.url, args.name)
    ssl_context = client_ssl_context(args.cafile, args.insecure) if url.startswith("wss:") else None
    if args.insecure:
        screen.show("* --insecure: the server's certificate is NOT checked", "error")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, keyboard.interrupt)
    keyboard.start()
    client = ChatClient(url, screen, keyboard, reconnect=not args.no_reconnect,
                        ssl_context=ssl_context, max_size=args.max_size,
                        compression=not args.no_compression)
    status = await client.run()
    if interactive:
        print()   # end the prompt's line, so the shell's prompt starts on its own
    return status


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="A WebSocket chat (RFC 6455) in one file, standard library only.",
        epilog="Try: 'python chat.py server' in one terminal, "
               "'python chat.py client --name bob' in another, http://127.0.0.1:8080/ in a browser.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every frame (direction, opcode, FIN, length, mask)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_server_command(commands)
    add_client_command(commands)
    add_echo_command(commands)
    return parser


def add_server_command(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "server", help="run the chat room (WebSocket at /chat, web page at /)",
        description="Run the chat room: WebSocket clients at /chat?name=NAME, a web page at /. "
                    "Ctrl-C closes every connection with 1001 (going away) and exits.")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    server.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    server.add_argument("--max-size", type=positive_int, default=MAX_MESSAGE_SIZE,
                        help="largest message accepted, in bytes; larger ones close with 1009 "
                             "(default: %(default)s)")
    server.add_argument("--max-clients", type=positive_int, default=1000,
                        help="connections beyond this get HTTP 503 (default: %(default)s)")
    server.add_argument("--max-buffer", type=positive_int, default=MAX_OUTGOING_BUFFER,
                        help="bytes a client may leave unread before it is dropped with 1008 "
                             "(default: %(default)s)")
    server.add_argument("--rate", type=float, default=RATE_PER_SECOND,
                        help="messages per second allowed per client after a burst; 0 turns "
                             "flood control off (default: %(default)s)")
    server.add_argument("--burst", type=positive_int, default=RATE_BURST,
                        help="messages a client may send at once (default: %(default)s)")
    server.add_argument("--announce-limit", type=int, default=ANNOUNCE_LIMIT,
                        help="stop announcing joins and leaves past this many members "
                             "(default: %(default)s)")
    server.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="also accept browsers from this origin, e.g. https://example.com "
                             "(repeatable; the server's own origin is always accepted)")
    server.add_argument("--certfile", help="serve https:// and wss:// with this certificate (PEM)")
    server.add_argument("--keyfile", help="the certificate's private key (PEM), if not in --certfile")
    server.add_argument("--no-compression", action="store_true",
                        help="don't accept permessage-deflate (RFC 7692): turn it off when "
                             "messages mix secrets with text others choose (CRIME/BREACH)")
    server.set_defaults(run=run_server)


def add_client_command(commands: argparse._SubParsersAction) -> None:
    client = commands.add_parser(
        "client", help="join the chat from this terminal",
        description="Join the chat. Type a line and Enter to send it; /who, /msg NAME TEXT; "
                    "/quit, Ctrl-D or Ctrl-C to leave. If the server goes away the client "
                    "reconnects, waiting 1, 2, 4 ... up to 30 seconds between attempts.")
    client.add_argument("--name", help="your name in the room (default: the server picks userN)")
    client.add_argument("--url", default=f"ws://127.0.0.1:8080{CHAT_PATH}",
                        help="the chat's WebSocket URL (default: %(default)s)")
    client.add_argument("--no-reconnect", action="store_true",
                        help="exit with status 1 when the connection is lost")
    client.add_argument("--cafile", help="trust the CA certificate(s) in this PEM file for wss://")
    client.add_argument("--insecure", action="store_true",
                        help="don't verify the server's certificate (testing only)")
    client.add_argument("--max-size", type=positive_int, default=MAX_MESSAGE_SIZE + RELAY_OVERHEAD,
                        help="largest message accepted, in bytes (default: %(default)s)")
    client.add_argument("--no-compression", action="store_true",
                        help="don't offer permessage-deflate (RFC 7692)")
    client.set_defaults(run=run_client)


def add_echo_command(commands: argparse._SubParsersAction) -> None:
    echo_cmd = commands.add_parser(
        "echo", help="an echo server for conformance suites (Autobahn)",
        description="Send every message back unchanged, on any path.")
    echo_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    echo_cmd.add_argument("--port", type=int, default=9001, help="port to listen on (default: %(default)s)")
    echo_cmd.add_argument("--max-size", type=positive_int, default=MAX_MESSAGE_SIZE,
                          help="largest message accepted, in bytes (default: %(default)s)")
    echo_cmd.add_argument("--no-compression", action="store_true",
                          help="don't accept permessage-deflate (RFC 7692)")
    echo_cmd.set_defaults(run=run_echo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # -v traces our frames, not asyncio's internals; the client's screen is for the chat.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        level=logging.WARNING if args.command == "client" else logging.INFO)
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    terminal = save_terminal() if args.command == "client" else None
    try:
        return asyncio.run(args.run(args))
    except KeyboardInterrupt:
        return 0
    except (OSError, ssl.SSLError) as error:   # e.g. the port is taken, a bad certificate file
        print(f"chat.py: {error.strerror or error}", file=sys.stderr)
        return 1
    finally:
        restore_terminal(terminal)


def save_terminal() -> list | None:
    """The terminal's settings, to restore if we exit while readline holds it in raw mode."""
    if not sys.stdin.isatty():
        return None
    try:
        import termios   # Unix only; imported here so the rest runs anywhere
        return termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError):
        return None


def restore_terminal(settings: list | None) -> None:
    if settings is not None:
        import termios
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, settings)


# 11. Web page #############################################################
#
# Kept near the end, as bottle keeps its templates: 70 lines of HTML and
# JavaScript a reader of the protocol can skip (only the extension follows).

#: The browser page served at "/": self-contained (no external scripts,
#: styles or fonts), text shown with textContent so it is never parsed as
#: HTML, and the socket URL taken from the page's own location.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat.py</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
header, form { padding: .5em 1em; background: #f3f3f3; display: flex; gap: .5em; }
#log { flex: 1; overflow-y: auto; padding: .5em 1em; margin: 0; list-style: none; white-space: pre-wrap; }
.notice { color: #777; font-style: italic; } .history { color: #999; } .private { color: #a0a; }
.mine { color: #070; } input[type=text] { flex: 1; } [hidden] { display: none !important; }
</style></head>
<body>
<header><strong>chat.py</strong><span id="status">not connected</span></header>
<ul id="log"></ul>
<form id="join"><input id="name" type="text" placeholder="your name" maxlength="32" autofocus>
<button>Join</button></form>
<form id="send" hidden><input id="text" type="text" placeholder="message, /who, /msg NAME TEXT" autocomplete="off">
<button>Send</button></form>
<script>
"use strict";
const GREETING_PATTERN = @GREETING_PATTERN@;
const log = document.getElementById("log"), status = document.getElementById("status");
const joinForm = document.getElementById("join"), sendForm = document.getElementById("send");
let socket = null, myName = "";
const GREETING = new RegExp(GREETING_PATTERN);

function show(text) {
  const item = document.createElement("li");
  item.textContent = text;
  if (text.startsWith("* ")) item.className = "notice";
  else if (text.startsWith("(history) ")) item.className = "history";
  else if (/^\\[[^\\]]* → /.test(text)) item.className = "private";
  else if (text.startsWith("[" + myName + "]: ")) item.className = "mine";
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 5;
  log.appendChild(item);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  myName = document.getElementById("name").value.trim();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = myName ? "?name=" + encodeURIComponent(myName) : "";
  socket = new WebSocket(scheme + "//" + location.host + "/chat" + query);
  status.textContent = "connecting…";
  socket.onopen = () => {
    status.textContent = "connected";
    joinForm.hidden = true; sendForm.hidden = false;
    document.getElementById("text").focus();
  };
  socket.onmessage = (event) => {
    const named = GREETING.exec(event.data);
    if (named) myName = named[1];
    show(event.data);
  };
  socket.onclose = (event) => {
    show("* disconnected (" + event.code + (event.reason ? ": " + event.reason : "") + ")");
    status.textContent = "not connected";
    joinForm.hidden = false; sendForm.hidden = true;
  };
});

sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("text");
  if (input.value && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(input.value);
    input.value = "";
  }
});
</script>
</body></html>
""".replace("@GREETING_PATTERN@", json.dumps(GREETING_PATTERN))


# 12. Compression ###########################################################
#
# permessage-deflate (RFC 7692, https://www.rfc-editor.org/rfc/rfc7692), the
# one extension (RFC 6455 §9) chat.py speaks. Nothing above needs it: a reader
# of the core protocol can stop here. How it works:
#
#   - The client offers it in Sec-WebSocket-Extensions, perhaps several times
#     with different parameters; the server accepts the first offer it can
#     serve by naming it, with the agreed parameters, in its 101 (§5, §7.1).
#   - A compressed message is its DEFLATE data (RFC 1951), ended by a "sync
#     flush" whose last 4 bytes, 00 00 ff ff, are removed on the wire and put
#     back before inflating; RSV1 on its first frame says it is compressed
#     (§6, §7.2). Control frames are never compressed, and any message may go
#     uncompressed: we send short ones as they are.
#   - "Context takeover" means a compressor keeps its window of past bytes
#     from one message to the next. Our server asks that neither side does
#     (server_no_context_takeover, client_no_context_takeover, which a server
#     may add unasked, §7.1.1): then one compressed broadcast frame suits
#     every member who negotiated the extension, and a connection holds zlib
#     state only while a compressed message is passing through.
#
# Security: compressing a secret together with text an attacker chooses lets
# the attacker learn the secret from the compressed sizes (the CRIME and
# BREACH attacks on TLS and HTTPS). A chat message holds one member's line,
# so nobody's secret shares a message with someone else's text; but an
# application that sends secrets (tokens, session ids, private data) in
# messages that also carry attacker-influenced text over wss:// should run
# with --no-compression (connect(compression=False), serve(compression=False)).

PERMESSAGE_DEFLATE = "permessage-deflate"

#: RSV1, as FrameHeader.rsv sees it: "Per-Message Compressed" (RFC 7692 §6).
RSV1 = 0b100

#: §7.2.1: what a sync flush ends with; removed before sending, added before inflating.
DEFLATE_TAIL = b"\x00\x00\xff\xff"

#: The LZ77 window as a power of 2: 15 (32 KiB) is DEFLATE's largest and the
#: default; RFC 7692 lets a peer ask for as little as 8 (§7.1.2). zlib can't
#: deflate with a 256-byte window, so a peer that asks for 8 gets plain frames.
MAX_WINDOW_BITS = 15
MIN_DEFLATE_WINDOW_BITS = 9

#: Messages shorter than this are sent uncompressed (RFC 7692 lets any
#: message be): under it, starting a compressor costs more than it saves.
COMPRESS_MIN_SIZE = 128

#: What our client offers, as browsers do: "I can limit my window if you ask."
CLIENT_DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"

#: What our server answers: the two "no context takeover" parameters always.
SERVER_DEFLATE_ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"

_EXTENSION_ITEM = re.compile(r"""
    [\s,]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)      # a token: an extension's or a parameter's name
    (?:\s*=\s*(?:([!#$%&'*+\-.^_`|~0-9A-Za-z]+)|"((?:[^"\\]|\\.)*)"))?   # = token or "quoted"
    \s*([;,]|$)""", re.VERBOSE)
_WINDOW_BITS = re.compile(r"[89]|1[0-5]")   # §7.1.2: 8 to 15, "without leading zeros"

Params = list[tuple[str, typing.Optional[str]]]


def parse_extensions(header: str) -> list[tuple[str, Params]]:
    """Sec-WebSocket-Extensions (RFC 6455 §9.1) as [(name, [(parameter, value or None)])].

    'permessage-deflate; server_max_window_bits="10", x' ->
    [("permessage-deflate", [("server_max_window_bits", "10")]), ("x", [])]
    """
    extensions: list[tuple[str, Params]] = []
    params: Params | None = None   # those of the extension being read
    pos = 0
    while header[pos:].strip(" \t,"):
        match = _EXTENSION_ITEM.match(header, pos)
        if not match:
            raise ValueError(f"malformed Sec-WebSocket-Extensions: {header!r}")
        name, token, quoted, separator = match.groups()
        value = token if quoted is None else re.sub(r"\\(.)", r"\1", quoted)
        if quoted is not None and not _TOKEN.fullmatch(value.encode("latin-1")):
            raise ValueError(f"{name}: a quoted value must be a token (RFC 6455 §9.1)")
        if params is None:
            if value is not None:
                raise ValueError(f"an extension name can't have a value: {name}")
            params = []
            extensions.append((name.lower(), params))
        else:
            params.append((name.lower(), value))
        if separator != ";":
            params = None
        pos = match.end()
    return extensions


class DeflateParams(typing.NamedTuple):
    """permessage-deflate's parameters (RFC 7692 §7.1), as offered or as agreed."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int | None = None   # None: not limited, so 15
    client_max_window_bits: int | None = None   # in an offer, 15 if given with no value


def parse_deflate_params(params: Params, *, offer: bool) -> DeflateParams:
    """Read an offer's or an answer's parameters (§7.1): ValueError for an
    unknown, repeated or invalid one, which makes a server decline the offer
    and a client fail the connection (§7)."""
    found: dict[str, typing.Any] = {}
    for name, value in params:
        if name in found:
            raise ValueError(f"{name} given twice")
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                raise ValueError(f"{name} takes no value")
            found[name] = True
        elif name in ("server_max_window_bits", "client_max_window_bits"):
            if value is None and offer and name == "client_max_window_bits":
                found[name] = MAX_WINDOW_BITS   # §7.1.2.2: "you may limit my window"
            elif value is not None and _WINDOW_BITS.fullmatch(value):
                found[name] = int(value)
            else:
                raise ValueError(f"invalid {name}={value}")
        else:
            raise ValueError(f"unknown parameter {name}")
    return DeflateParams(**found)


def accept_deflate(header: str | None) -> str | None:
    """The server's answer to a client's offers: our Sec-WebSocket-Extensions, or None.

    We take the first permessage-deflate offer with valid parameters (§7:
    others are declined, not refused) and always add both "no context
    takeover" parameters. A limit the client puts on our window we accept
    and repeat (§7.1.2.1); a limit on its own window we need not ask for: its
    context is dropped after each message anyway.
    """
    try:
        offers = parse_extensions(header or "")
    except ValueError:
        return None   # a malformed header: decline every extension in it
    for name, params in offers:
        if name != PERMESSAGE_DEFLATE:
            continue
        try:
            offer = parse_deflate_params(params, offer=True)
        except ValueError:
            continue
        if offer.server_max_window_bits:
            return f"{SERVER_DEFLATE_ANSWER}; server_max_window_bits={offer.server_max_window_bits}"
        return SERVER_DEFLATE_ANSWER
    return None


def check_deflate_answer(header: str) -> DeflateParams:
    """The client's check of the server's answer to CLIENT_DEFLATE_OFFER (§7.1).

    The server may add either "no context takeover" parameter and
    server_max_window_bits unasked (§7.1.1, §7.1.2.1), and limit our window
    since we offered client_max_window_bits (§7.1.2.2). Anything else, or a
    second extension, fails the connection: we could not speak it.
    """
    def fail(reason: str) -> HandshakeError:
        return HandshakeError(http.HTTPStatus.BAD_GATEWAY, f"server's Sec-WebSocket-Extensions: {reason}")

    try:
        extensions = parse_extensions(header)
        if [name for name, _ in extensions] != [PERMESSAGE_DEFLATE]:
            raise fail("selected an extension we did not offer")
        return parse_deflate_params(extensions[0][1], offer=False)
    except ValueError as error:
        raise fail(str(error)) from None


def agreed_deflate(header: str | None, *, is_client: bool) -> PerMessageDeflate | None:
    """The extension as a 101 agreed it, for a Connection; None if it wasn't."""
    if not header:
        return None
    return PerMessageDeflate(check_deflate_answer(header), is_client=is_client)


def new_deflater(window_bits: int) -> typing.Any:
    """A raw DEFLATE compressor (negative wbits: no zlib header, §7.2.1)."""
    return zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits)


def deflate_message(deflater: typing.Any, *parts: bytes) -> bytes:
    """Compress one message, given in parts (§7.2.1): its data, a sync flush, the flush's tail removed."""
    data = b"".join([deflater.compress(part) for part in parts] + [deflater.flush(zlib.Z_SYNC_FLUSH)])
    return data[:-len(DEFLATE_TAIL)]


class PerMessageDeflate:
    """One connection's end of the agreement: inflates what arrives, deflates what we send.

    A compressor or decompressor exists only while a message passes through,
    unless the side that made it keeps its context between messages: then it
    lives as long as the connection (a client talking to a server other than
    ours may have to keep one; about 40 KB to inflate, 270 KB to deflate with
    a 32 KiB window, zlib's figures).
    """

    __slots__ = ("params", "is_client", "window_bits", "_inflater", "_deflater", "_inflating")

    def __init__(self, params: DeflateParams, *, is_client: bool) -> None:
        self.params = params
        self.is_client = is_client
        # Ours, to deflate with; 0 when the peer asked for a window zlib can't do.
        ours = (params.client_max_window_bits if is_client else params.server_max_window_bits)
        ours = ours or MAX_WINDOW_BITS
        self.window_bits = ours if ours >= MIN_DEFLATE_WINDOW_BITS else 0
        self._inflater: typing.Any = None
        self._deflater: typing.Any = None
        self._inflating = False   # the message being read is compressed

    @property
    def peer_keeps_context(self) -> bool:
        return not (self.params.server_no_context_takeover if self.is_client
                    else self.params.client_no_context_takeover)

    @property
    def we_keep_context(self) -> bool:
        return not (self.params.client_no_context_takeover if self.is_client
                    else self.params.server_no_context_takeover)

    def start_frame(self, header: FrameHeader) -> bool:
        """Is this data frame's payload compressed? RSV1 says so on a message's first frame only (§6.1)."""
        if header.opcode == Opcode.CONTINUATION:
            if header.rsv & RSV1:
                raise ProtocolError("RSV1 set on a continuation frame")
        else:
            self._inflating = bool(header.rsv & RSV1)
            if self._inflating and self._inflater is None:
                # A 32 KiB window inflates whatever window the peer deflated with.
                self._inflater = zlib.decompressobj(-MAX_WINDOW_BITS)
        return self._inflating

    def inflate(self, chunk: bytes, room: int) -> bytes:
        """Inflate a piece of the message, never more than ``room`` bytes of output.

        The bound is what stops a "zip bomb", a few bytes that inflate to
        gigabytes: zlib is asked for one byte more than the message may still
        grow by, so it stops there and we fail with 1009 (RFC 6455 §7.4.1).
        """
        try:
            data = self._inflater.decompress(chunk, room + 1)
        except zlib.error as error:
            raise ProtocolError(f"invalid compressed data: {error}") from None
        if len(data) > room:
            raise MessageTooBig(f"message inflates to over {room} more bytes")
        return data

    def end_message(self, room: int) -> bytes:
        """The last output of a compressed message, once its tail is put back (§7.2.2)."""
        data = self.inflate(DEFLATE_TAIL, room)
        if not self.peer_keeps_context or self._inflater.eof:
            self._inflater = None
        self._inflating = False
        return data

    def deflate(self, payload: bytes) -> bytes | None:
        """Our message compressed, or None to send it as it is (short, or a window we can't do)."""
        if len(payload) < COMPRESS_MIN_SIZE or not self.window_bits:
            return None
        if self._deflater is None:
            self._deflater = new_deflater(self.window_bits)
        data = deflate_message(self._deflater, payload)
        if not self.we_keep_context:
            self._deflater = None
        # Once our kept context has seen it, the message must go compressed.
        return data if len(data) < len(payload) or self.we_keep_context else None


def broadcast_frame(opcode: int, payload: list[bytes], window_bits: int) -> list[bytes]:
    """One broadcast's frame, in pieces (header first), for every member whose
    deflate window is ``window_bits`` (0: members who get it uncompressed).

    Compressed without context takeover, so the same bytes suit each of
    them: a room compresses a line once, not once per member.
    """
    length = sum(map(len, payload))
    if window_bits and length >= COMPRESS_MIN_SIZE:
        data = deflate_message(new_deflater(window_bits), *payload)
        if len(data) < length:   # else incompressible: the plain frame is shorter
            return [frame_header(opcode, len(data), rsv=RSV1), data]
    return [frame_header(opcode, length), *payload]


if __name__ == "__main__":
    sys.exit(main())
