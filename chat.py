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
    7. Server, client serve() and connect(): TCP, the handshake on the wire, timeouts
    8. Chat room      names, history, broadcast, commands, rate limits, the web page
    9. Client         connect, read the keyboard, show the room safely
   10. Command line   argparse subcommands; main(argv) -> exit status

Left out on purpose: extensions (permessage-deflate), subprotocols, HTTP
redirects and proxies on the client, WebSockets over HTTP/2 (RFC 8441).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import dataclasses
import enum
import errno
import hashlib
import http
import ipaddress
import logging
import math
import os
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import typing
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Collection


def check_python_version(version_info: tuple = sys.version_info) -> None:
    """Exit with one line on Python older than 3.10, before any newer feature runs.

    Python 3.7-3.9 can parse this whole file (the annotations stay unevaluated
    strings), so the check sits right after the imports, which 3.7 has too;
    the first line that 3.9 could not run (``Callable[...]`` at module level)
    comes after it.
    """
    if tuple(version_info[:2]) < (3, 10):
        sys.exit(f"chat.py needs Python 3.10 or later; this is Python "
                 f"{version_info[0]}.{version_info[1]}")


check_python_version()

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


#: RFC 6455 §7.4.1-§7.4.2: codes an endpoint may put in a close frame. 1005,
#: 1006 and 1015 only report what happened locally; 1004 is reserved;
#: 3000-4999 belong to libraries and applications.
SENDABLE_CLOSE_CODES = frozenset(CloseCode) - {
    CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE, CloseCode.TLS_HANDSHAKE}

# The §5.2 header, bit by bit.
FIN_BIT = 0x80
RSV_BITS = 0x70
OPCODE_BITS = 0x0F
MASK_BIT = 0x80
LENGTH_BITS = 0x7F
LENGTH_16 = 126   # "the next 2 bytes hold the length"
LENGTH_64 = 127   # "the next 8 bytes hold the length"

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

#: File descriptors kept back from members. Each member holds one; the server
#: itself needs a few (the listening sockets, the event loop's, stdio, log
#: files), and newcomers need one each while they are told the room is full.
#: --max-clients is lowered, at start-up, to what the process's limit leaves.
FD_RESERVE = 64

#: One IP address may hold 50 connections at once, so one script can't fill
#: the room (or its screens with "joined" and "left"). The trade-off: people
#: behind one NAT, a classroom or an office, share an address, and 50 of them
#: is the most that fits. ``--max-per-ip`` changes it; behind a reverse proxy,
#: ``--trusted-proxy`` counts the addresses it forwards instead of its own.
MAX_PER_ADDRESS = 50


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


class ConnectionClosed(WebSocketError):
    """The connection is over; ``code`` and ``reason`` say why (§7.1.5, §7.1.6)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{describe_close_code(self.code)}{': ' + self.reason if self.reason else ''}"


def describe_close_code(code: int) -> str:
    """'1001 (going away)' for a log line or a person."""
    try:
        name = CloseCode(code).name.replace("_", " ").lower()
    except ValueError:
        name = "application" if code >= 3000 else "unknown"
    return f"{code} ({name})"


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
    logged: bool = False   # the refusal is already in the log, in a line of its own


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


def require_get(request: Request) -> None:
    """RFC 6455 §4.1: "The method of the request MUST be GET" (and our page is GET too)."""
    if request.method != "GET":
        raise HandshakeError(http.HTTPStatus.METHOD_NOT_ALLOWED,
                             "only GET is supported", (("Allow", "GET"),))


def check_request(request: Request) -> str:
    """Check a client's upgrade request (RFC 6455 §4.2.1); return its key."""
    require_get(request)
    headers = request.headers
    if "host" not in headers:
        raise bad_request("missing Host header")
    if "websocket" not in header_tokens(headers, "upgrade"):
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


def switching_protocols(key: str) -> bytes:
    """The 101 response that completes the server's side of the handshake (§4.2.2)."""
    return http_response(http.HTTPStatus.SWITCHING_PROTOCOLS, (
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ))


def error_response(response: Response) -> bytes:
    """A complete HTTP response that refuses or answers a request, then closes."""
    body = response.body.encode("utf-8")
    headers = response.headers + (
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    )
    return http_response(response.status, headers, body)


@dataclasses.dataclass
class WebSocketURI:
    """A parsed ws:// or wss:// URI (RFC 6455 §3)."""

    secure: bool
    host: str
    port: int
    resource: str   # path and query: what goes in the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"


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


def build_request(uri: WebSocketURI, key: str, origin: str | None = None) -> bytes:
    """The client's opening handshake (RFC 6455 §4.1)."""
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


def check_response(headers: dict[str, str], key: str) -> None:
    """Check the server's 101 response (RFC 6455 §4.1, the client's steps 1-6)."""
    def fail(reason: str) -> HandshakeError:
        return HandshakeError(http.HTTPStatus.BAD_GATEWAY, reason)

    if "websocket" not in header_tokens(headers, "upgrade"):
        raise fail("response lacks Upgrade: websocket")
    if "upgrade" not in header_tokens(headers, "connection"):
        raise fail("response lacks Connection: Upgrade")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise fail("wrong Sec-WebSocket-Accept")
    # §4.1 steps 5 and 6: we offered no extension and no subprotocol, so the
    # server may not select one: we wouldn't know how to speak it.
    if "sec-websocket-extensions" in headers:
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

@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame: the header's bits and the (unmasked) payload."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0   # the three reserved bits, as a number from 0 to 7


class FrameHeader(typing.NamedTuple):
    """The first two bytes of a frame, decoded (§5.2).

    A NamedTuple rather than a dataclass: one is made for every frame read,
    and a tuple is the cheapest object Python can build.
    """

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    length7: int   # 0-125 is the length itself; 126 and 127 announce a longer field

    @property
    def rest_size(self) -> int:
        """How many more header bytes follow: extended length, then mask key."""
        extended = {LENGTH_16: 2, LENGTH_64: 8}.get(self.length7, 0)
        return extended + (4 if self.masked else 0)


def apply_mask(data: bytes, mask_key: bytes) -> bytes:
    """XOR data with the mask key repeated (§5.3); masking and unmasking are the same.

    A per-byte Python loop costs about a microsecond per byte. Instead we turn
    the data and the key, repeated to the same length, into two big integers
    and XOR them in one operation that CPython runs in C, then turn the result
    back into bytes. Byte order doesn't matter as long as both sides use the
    same one: XOR never carries from one byte into another.
    """
    length = len(data)
    key = (mask_key * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def rotate_mask(mask_key: bytes, offset: int) -> bytes:
    """The mask key as seen from ``offset`` bytes into the payload (§5.3: byte i uses key[i % 4])."""
    shift = offset % 4
    return mask_key[shift:] + mask_key[:shift]


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False,
                 mask_key: bytes | None = None, rsv: int = 0) -> bytes:
    """Serialize a frame (§5.2); a client passes ``mask=True`` (§5.3)."""
    first = (FIN_BIT if fin else 0) | rsv << 4 | opcode
    mask_bit = MASK_BIT if mask else 0
    length = len(payload)
    # §5.2: "the minimal number of bytes MUST be used to encode the length".
    if length < LENGTH_16:
        header = bytes((first, mask_bit | length))
    elif length < 2**16:
        header = struct.pack("!BBH", first, mask_bit | LENGTH_16, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | LENGTH_64, length)
    if not mask:
        return header + payload
    if mask_key is None:
        mask_key = secrets.token_bytes(4)   # §5.3: "derived from a strong source of entropy"
    return header + mask_key + apply_mask(payload, mask_key)


def parse_header(first_two: bytes) -> FrameHeader:
    """Decode the two bytes every frame starts with."""
    first, second = first_two
    return FrameHeader(fin=bool(first & FIN_BIT), rsv=(first & RSV_BITS) >> 4,
                       opcode=first & OPCODE_BITS, masked=bool(second & MASK_BIT),
                       length7=second & LENGTH_BITS)


def check_header(header: FrameHeader, *, expect_masked: bool) -> None:
    """Everything §5.2-§5.5 lets us reject before reading further."""
    if header.rsv:
        # §5.2: "MUST be 0 unless an extension is negotiated" - we negotiate none.
        raise ProtocolError("reserved bits set without an extension")
    if header.opcode not in DATA_OPCODES and header.opcode not in CONTROL_OPCODES:
        raise ProtocolError(f"unknown opcode {header.opcode:#x}")
    if header.masked != expect_masked:
        # §5.1: a server MUST close on an unmasked frame; a client on a masked one.
        raise ProtocolError("client frames must be masked" if expect_masked
                            else "server frames must not be masked")
    if header.opcode in CONTROL_OPCODES:
        # §5.5: control frames "MUST NOT be fragmented" and carry at most 125 bytes.
        if not header.fin:
            raise ProtocolError("fragmented control frame")
        if header.length7 > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control frame payload over 125 bytes")


def parse_header_rest(header: FrameHeader, rest: bytes) -> tuple[int, bytes | None]:
    """The payload length and mask key from the bytes after the first two."""
    if header.length7 == LENGTH_16:
        length, rest = struct.unpack("!H", rest[:2])[0], rest[2:]
    elif header.length7 == LENGTH_64:
        length, rest = struct.unpack("!Q", rest[:8])[0], rest[8:]
        if length >= 2**63:
            # §5.2: "the most significant bit MUST be 0".
            raise ProtocolError("64-bit payload length with the high bit set")
    else:
        length = header.length7
    return length, (rest if header.masked else None)


def parse_frame(data: bytes, *, expect_masked: bool) -> tuple[Frame, int]:
    """Decode one complete frame from the start of ``data``; return it and its size.

    The connection reads frames piece by piece from a socket instead; this
    whole-buffer version shares its steps and lets tests check the RFC's bytes.
    """
    header = parse_header(data[:2])
    check_header(header, expect_masked=expect_masked)
    end_of_header = 2 + header.rest_size
    length, mask_key = parse_header_rest(header, data[2:end_of_header])
    payload = data[end_of_header:end_of_header + length]
    if len(payload) < length:
        raise ValueError("incomplete frame")
    if mask_key is not None:
        payload = apply_mask(payload, mask_key)
    return Frame(header.opcode, payload, header.fin, header.rsv), end_of_header + length


# 5. Messages ###############################################################

class MessageAssembler:
    """Joins data frames into messages (§5.4) and checks text as it arrives (§8.1).

    A message is one TEXT or BINARY frame followed by CONTINUATION frames
    until one has FIN set. Control frames may come in between (§5.4), so they
    never pass through here. Text goes through an incremental UTF-8 decoder as
    it arrives, so an invalid byte fails the connection at once, not when the
    message ends. The bytes themselves go into one growing buffer: a peer that
    sends a message one byte per frame costs us no more than the message.
    """

    __slots__ = ("max_size", "opcode", "size", "payload", "decoder")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.opcode: int | None = None   # TEXT or BINARY while a message is in progress
        self.size = 0
        self.payload = bytearray()
        self.decoder: codecs.IncrementalDecoder | None = None

    def start_frame(self, opcode: int, length: int) -> None:
        """Check a data frame's header against the message in progress, before its payload."""
        if opcode == Opcode.CONTINUATION:
            if self.opcode is None:
                raise ProtocolError("continuation frame with no message to continue")
        elif self.opcode is not None:
            raise ProtocolError("new message before the previous one's final fragment")
        else:
            self.opcode = opcode
            self.size = 0
            if opcode == Opcode.TEXT:
                self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.size += length
        if self.size > self.max_size:
            # Checked against the header, so the payload is never read at all.
            raise MessageTooBig(f"message over {self.max_size} bytes")

    def add(self, chunk: bytes) -> None:
        """Take the next piece of (unmasked) payload."""
        if self.decoder is not None:
            try:
                self.decoder.decode(chunk)   # only to check; the text is decoded once, at the end
            except UnicodeDecodeError as error:
                raise InvalidPayload(f"invalid UTF-8 in text message: {error.reason}") from None
        self.payload += chunk

    def finish(self) -> str | bytes:
        """The complete message, after the frame with FIN set."""
        payload, decoder = self.payload, self.decoder
        self.opcode, self.payload, self.decoder = None, bytearray(), None
        if decoder is None:
            return bytes(payload)
        try:
            decoder.decode(b"", True)   # a sequence cut off at the end?
        except UnicodeDecodeError:
            raise InvalidPayload("text message ends inside a UTF-8 sequence") from None
        return payload.decode("utf-8")


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
# States (§7): OPEN -> CLOSING once we have sent a close frame -> CLOSED once
# TCP is closed. Whenever we send a close frame we also start a timer that
# aborts TCP if the peer doesn't finish the handshake in time; that one timer
# covers a peer that never answers, never reads, or never hangs up.
#
# What the application sees as close_code (§7.1.5): the code in the peer's
# close frame (1005 if it had none); ours, if we failed the connection; 1006
# if TCP ended without any close frame.

class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def format_peer(writer: asyncio.StreamWriter) -> str:
    """'127.0.0.1:50312' or '[::1]:50312' for log lines."""
    peer = writer.get_extra_info("peername")
    if not peer:
        return "?"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_frame(who: str, direction: str, header_bytes: bytes, length: int) -> None:
    """The -v trace of one frame, so a learner can watch the protocol at work:

        127.0.0.1:50312 <<< TEXT fin=1 len=5 masked | 81 85 37 fa 21 3d
    """
    header = parse_header(header_bytes[:2])
    known = header.opcode in DATA_OPCODES or header.opcode in CONTROL_OPCODES
    name = Opcode(header.opcode).name if known else hex(header.opcode)
    logger.debug("%s %s %s fin=%d len=%d%s | %s", who, direction, name, header.fin, length,
                 " masked" if header.masked else "", header_bytes.hex(" "))


def log_head(who: str, direction: str, head: bytes) -> None:
    """The -v trace of a handshake's HTTP head, one line per header, escaped."""
    lines = [printable(line) for line in head.decode("latin-1").strip().split("\r\n")]
    logger.debug("%s %s %s", who, direction, "\n    ".join(lines))


def traced_frame(who: str, opcode: int, payload: bytes, *, mask: bool = False) -> bytes:
    """encode_frame, plus the -v trace line for the frame it returns."""
    frame = encode_frame(opcode, payload, mask=mask)
    if logger.isEnabledFor(logging.DEBUG):
        log_frame(who, ">>>", frame[:len(frame) - len(payload)], len(payload))
    return frame


class Connection:
    """One WebSocket connection after the opening handshake, in either role."""

    __slots__ = ("reader", "writer", "transport", "is_client", "path", "remote",
                 "max_buffer", "close_timeout", "state", "close_code", "close_reason",
                 "_message", "_read_lock", "_pong_waiters", "_close_timer",
                 "_keepalive_pending")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 is_client: bool, path: str = "/", max_size: int = MAX_MESSAGE_SIZE,
                 max_buffer: int = MAX_OUTGOING_BUFFER,
                 close_timeout: float = CLOSE_TIMEOUT) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.is_client = is_client
        self.path = path                      # the request target, e.g. "/chat?name=bob"
        self.remote = format_peer(writer)
        self.max_buffer = max_buffer
        self.close_timeout = close_timeout
        self.state = State.OPEN
        self.close_code: int | None = None    # set once: what the application will see
        self.close_reason = ""
        self._message = MessageAssembler(max_size)
        self._read_lock = asyncio.Lock()      # frames must be read by one task at a time
        self._pong_waiters: dict[bytes, asyncio.Future] = {}
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive_pending = False

    # -- receiving ----------------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next message: str for text, bytes for binary; ConnectionClosed once over."""
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

    async def _receive(self) -> str | bytes:
        """Read the next message; every way a connection can end becomes ConnectionClosed."""
        if self.state is State.CLOSED:
            raise self._closed()
        try:
            return await self._read_message()
        except ProtocolError as error:        # this is the one place errors become close codes
            await self._fail(error.close_code, str(error))
        except (asyncio.IncompleteReadError, OSError):
            self._set_close(CloseCode.ABNORMAL_CLOSURE, "")   # TCP ended without a close frame
            self._finish()
        raise self._closed()

    async def _read_message(self) -> str | bytes:
        """Read frames until a data message is complete, handling control frames on the way."""
        while True:
            header, length, mask_key = await self._read_header()
            if header.opcode in CONTROL_OPCODES:   # §5.4: may come between fragments
                payload = await self.reader.readexactly(length)
                if mask_key is not None:
                    payload = apply_mask(payload, mask_key)
                await self._on_control(header.opcode, payload)
                continue
            self._message.start_frame(header.opcode, length)
            await self._read_payload(length, mask_key)
            if header.fin:
                message = self._message.finish()
                if self.state is State.OPEN:   # once we sent a close frame, data is dropped
                    return message

    async def _read_header(self) -> tuple[FrameHeader, int, bytes | None]:
        """The frame header, checked as soon as each part of it arrives (§5.2)."""
        first_two = await self.reader.readexactly(2)
        header = parse_header(first_two)
        check_header(header, expect_masked=not self.is_client)
        rest = await self.reader.readexactly(header.rest_size) if header.rest_size else b""
        length, mask_key = parse_header_rest(header, rest)
        if logger.isEnabledFor(logging.DEBUG):
            log_frame(self.remote, "<<<", first_two + rest, length)
        return header, length, mask_key

    async def _read_payload(self, length: int, mask_key: bytes | None) -> None:
        """Feed a data frame's payload to the message as it arrives.

        Reading whatever has arrived, rather than waiting for the whole
        payload, lets invalid UTF-8 fail the connection the moment it shows
        up, even in the middle of a frame (§8.1). Usually the whole payload
        is already buffered and this loop runs once.
        """
        received = 0
        while received < length:
            chunk = await self.reader.read(length - received)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", length - received)
            if mask_key is not None:
                chunk = apply_mask(chunk, rotate_mask(mask_key, received))
            received += len(chunk)
            self._message.add(chunk)

    async def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == Opcode.PING:
            # §5.5.2: "an endpoint MUST send a Pong frame in response", with the same data,
            # unless it has already sent a close frame.
            if self.state is State.OPEN:
                self._write_frame(Opcode.PONG, payload)
                self._check_backlog()   # a peer may ping and never read the pongs
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
        code, reason = parse_close_payload(payload)
        self._set_close(code, reason)
        if self.state is State.OPEN:
            # §5.5.1: "the endpoint MUST send a Close frame in response ...
            # typically echoing the status code it received".
            self._send_close(code)
        if self.is_client:
            # §7.1.1: the server closes TCP first; the client waits for that.
            await self._discard_until_eof()
        self._finish()
        raise self._closed()

    # -- sending ------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        """Send one message: str as a text frame, bytes as a binary frame (§5.6)."""
        if self.state is not State.OPEN:
            raise self._closed()
        if isinstance(message, str):
            self._write_frame(Opcode.TEXT, message.encode("utf-8"))
        else:
            self._write_frame(Opcode.BINARY, bytes(message))
        try:
            await self.writer.drain()   # wait while the peer is slow to read
        except OSError:
            self.transport.abort()      # the reading side will see the end too
            raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE) from None

    def write_frame(self, frame: bytes) -> None:
        """Queue an already-encoded frame without waiting: the broadcast path.

        A peer that lets more than ``max_buffer`` bytes pile up is dropped
        with 1008, so a slow reader can neither make us buffer without bound
        nor delay anyone else: we never wait for it.
        """
        transport = self.transport
        if self.state is not State.OPEN or transport.is_closing():
            return
        transport.write(frame)
        self._check_backlog()

    def _check_backlog(self) -> None:
        """Drop a peer that leaves more than max_buffer bytes unread (1008).

        Applies to what we write without waiting, which the peer's reading
        alone keeps in check: broadcasts and pongs. send() waits instead.
        """
        if self._unsent_bytes() > self.max_buffer:
            self.fail_nowait(CloseCode.POLICY_VIOLATION,
                             f"too slow: over {self.max_buffer} bytes waiting to be read")

    def _unsent_bytes(self) -> int:
        """Bytes written but not yet taken by the kernel; 0 once the connection is gone."""
        try:
            return self.transport.get_write_buffer_size()
        except AttributeError:   # a TLS transport that lost its connection (Python 3.10-3.11)
            return 0

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        frame = traced_frame(self.remote, opcode, payload, mask=self.is_client)
        if not self.transport.is_closing():
            self.transport.write(frame)

    async def ping(self, data: bytes = b"") -> None:
        """Send a ping and wait for its pong (§5.5.2).

        The pong arrives through recv(), so some task must be reading
        (a server handler always is; a client usually runs a receive loop).
        """
        if self.state is not State.OPEN:
            raise self._closed()
        waiter = self._pong_waiters.get(data)
        if waiter is None:
            waiter = self._pong_waiters[data] = asyncio.get_running_loop().create_future()
            self._write_frame(Opcode.PING, data)
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
            self._write_frame(Opcode.PING, b"keepalive")

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
        """Fail the connection from code that can't wait (a broadcast, a timer)."""
        if self.state is State.OPEN:
            logger.info("%s: closing with %s: %s", self.remote, describe_close_code(code), reason)
            self._set_close(code, reason)
            self._send_close(code, reason)

    async def _fail(self, code: int, reason: str) -> None:
        """Fail the WebSocket Connection (§7.1.7) after the peer broke the protocol."""
        logger.info("%s: protocol error, closing with %s: %s",
                    self.remote, describe_close_code(code), reason)
        self._set_close(code, reason)
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
        self._write_frame(Opcode.CLOSE, encode_close_payload(code, reason))
        self.state = State.CLOSING
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(self.close_timeout, self.transport.abort)

    async def _discard_until_eof(self) -> None:
        """Read and drop bytes until the peer closes TCP (or the close timer aborts it)."""
        try:
            while await self.reader.read(READ_BUFFER_LIMIT):
                pass
        except OSError:
            pass

    def _set_close(self, code: int, reason: str) -> None:
        """Record why the connection ended; the first explanation wins."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def _finish(self) -> None:
        """TCP is (being) closed: settle everything still waiting on this connection."""
        self.state = State.CLOSED
        self._set_close(CloseCode.ABNORMAL_CLOSURE, "")
        unsent = self._unsent_bytes()   # asked before closing: a closed TLS transport can't tell
        self.writer.close()
        # Keep the timer only while our last bytes are still queued for a
        # peer that isn't reading: then it is what finally aborts TCP.
        if self._close_timer is not None and not unsent:
            self._close_timer.cancel()
        for waiter in self._pong_waiters.values():
            if not waiter.done():
                waiter.set_exception(self._closed())
        self._pong_waiters.clear()

    def _closed(self) -> ConnectionClosed:
        code = CloseCode.ABNORMAL_CLOSURE if self.close_code is None else self.close_code
        return ConnectionClosed(code, self.close_reason)



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


#: RFC 8446 §5.1: the first byte of a TLS record that carries a handshake
#: message. A request that starts with it is a wss:// client's ClientHello.
TLS_HANDSHAKE_RECORD = 0x16


async def read_request_head(reader: asyncio.StreamReader) -> list[bytes]:
    """The request head; a client that speaks TLS to this plain server is told at once.

    Else its ClientHello would wait for a line end that may never come, and
    the client would see a reset after the 10 s handshake timeout. The 400
    we answer instead makes its TLS library fail at once ("wrong version").
    """
    first = await reader.readexactly(1)
    if first[0] == TLS_HANDSHAKE_RECORD:
        raise bad_request("a TLS handshake on a plain ws:// server: is the client's URL wss://?")
    lines = await read_http_head(reader)
    return [first + lines[0], *lines[1:]] if lines else []


#: Shorter than asyncio's one-second retry of a failed accept(), far longer than one round of accepts.
ACCEPT_ROUND = 0.5

#: While descriptors are short, a connection that hasn't sent its whole request
#: in this many seconds loses its descriptor: an honest client sends it at once.
SILENT_WHEN_SHORT = 1.0


class LoopErrorLog:
    """The event loop's exception handler: what peers cause gets one line, never a traceback.

    asyncio would log a failed TLS handshake or a reset with a traceback; a
    peer must not be able to put tracebacks in our log. Anything else is a
    real bug and keeps its traceback.

    Running out of file descriptors is the other case. When accept() fails
    with EMFILE, asyncio stops watching the listening socket and tries again
    a second later; new connections wait in the kernel's listen queue, and
    members already connected need no new descriptor, so they chat on. But
    asyncio reports every failed attempt (a retry tries up to the backlog,
    1024, and retries multiply): thousands of lines a second. Here an episode
    gets one line when it starts and one when accepting works again. And
    since the descriptors are most likely held by connections that opened
    and then said nothing, each retry round has the servers drop those
    silent for a second, so that a newcomer gets its answer (a 101, or a
    503 if the room is full) within a second or two, not after the
    10 s handshake timeout.
    """

    def __init__(self) -> None:
        self.servers: weakref.WeakSet[WebSocketServer] = weakref.WeakSet()
        self.failed_accepts = 0     # in the current episode; 0: not out of descriptors
        self.dropped = 0            # silent handshakes cut in the current episode
        self.first_failure = self.last_failure = self.last_drop = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        if context.get("message") == "socket.accept() out of system resource":
            self.accept_failed(loop.time(), error)
        elif isinstance(error, (OSError, ssl.SSLError)):
            logger.info("%s: %s", context.get("message", "network error"), error)
        else:
            loop.default_exception_handler(context)

    def accept_failed(self, now: float, error: OSError | None) -> None:
        if not self.failed_accepts:
            self.first_failure = now
            reason = getattr(error, "strerror", None) or "out of resources"
            logger.warning("cannot accept new connections: %s (see ulimit -n); they wait until "
                           "a connection closes, members already here are unaffected", reason.lower())
        self.failed_accepts += 1
        self.last_failure = now
        if now - self.last_drop > ACCEPT_ROUND:   # once a round, not once an attempt
            self.last_drop = now
            self.dropped += sum(server.drop_silent_handshakes(now) for server in self.servers)

    def accepted(self, now: float) -> None:
        """A connection was accepted: the episode is over, unless accept() failed this round too.

        asyncio retries once a second; a failure in the same round (milliseconds
        ago) means descriptors are still short, one a round earlier does not.
        """
        if self.failed_accepts and now - self.last_failure > ACCEPT_ROUND:
            logger.warning("accepting connections again after %.1f s (%d attempts failed, "
                           "%d silent connections dropped)", now - self.first_failure,
                           self.failed_accepts, self.dropped)
            self.failed_accepts = self.dropped = 0


def canonical_address(text: str) -> str | None:
    """An IP address written one way ("::ffff:10.0.0.1" is 10.0.0.1), or None if it isn't one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)   # an IPv4 client on an IPv6 socket
    return str(mapped or address)


def peer_address(writer: asyncio.StreamWriter) -> str:
    """The IP address at the other end of the TCP connection."""
    peername = writer.get_extra_info("peername")
    return (canonical_address(peername[0]) or peername[0]) if peername else "?"


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
                 max_per_address: int | None = None, trusted_proxies: Collection[str] = ()) -> None:
        self.handler = handler
        self.process_request = process_request
        self.max_size = max_size
        self.max_buffer = max_buffer
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.keepalive_interval = keepalive_interval
        self.max_per_address = max_per_address
        self.trusted_proxies = {canonical_address(proxy) for proxy in trusted_proxies}
        self.connections: set[Connection] = set()
        self._per_address: collections.Counter[str] = collections.Counter()
        self._address_of: dict[Connection, str] = {}
        self._refused_at_limit: collections.Counter[str] = collections.Counter()
        self._tasks: dict[asyncio.Task, Connection | None] = {}
        self._server: asyncio.Server | None = None
        self._loop_errors: LoopErrorLog | None = None
        self._handshake_timers: dict[asyncio.StreamWriter, asyncio.TimerHandle] = {}
        self._keepalive: asyncio.Task | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:   # unless the application chose its own
            loop.set_exception_handler(LoopErrorLog())
        handler = loop.get_exception_handler()
        if isinstance(handler, LoopErrorLog):
            self._loop_errors = handler
            handler.servers.add(self)
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
        if self._loop_errors is not None:
            self._loop_errors.accepted(asyncio.get_running_loop().time())
        try:
            conn = await self._handshake(reader, writer)
            if conn is not None:
                self._tasks[task] = conn
                try:
                    await self._run_handler(conn)
                finally:
                    self._release(conn)
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
        timer = asyncio.get_running_loop().call_later(
            self.handshake_timeout, self._handshake_timed_out, writer, peer)
        self._handshake_timers[writer] = timer
        try:
            lines = await read_request_head(reader)
            if logger.isEnabledFor(logging.DEBUG):
                log_head(peer, "<<<", b"\r\n".join(lines))
            request = parse_request(lines)
            client = self._client_address(writer, request)
            peer = peer if client == peer_address(writer) else f"{client} via {peer}"
            response, key = self._route(request)
            if response is None:
                response = self._over_address_limit(client)
        except HandshakeError as error:
            response = Response(error.status, error.reason + "\n", error.headers)
        except (asyncio.IncompleteReadError, OSError):
            return None   # the peer left mid-handshake, or the timer cut it off
        finally:
            timer.cancel()
            del self._handshake_timers[writer]
        if response is not None:
            if response.status >= 400 and not response.logged:
                logger.info("%s: refused handshake: %d %s", peer, response.status,
                            printable(response.body.strip()[:200]))
            writer.write(error_response(response))
            return None
        return self._upgrade(reader, writer, request, key, client, peer)

    def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: Request, key: str, client: str, peer: str) -> Connection:
        """Send 101 and count the new connection against its address."""
        accepted = switching_protocols(key)
        writer.write(accepted)
        if logger.isEnabledFor(logging.DEBUG):
            log_head(peer, ">>>", accepted)
        conn = Connection(reader, writer, is_client=False, path=request.target,
                          max_size=self.max_size, max_buffer=self.max_buffer,
                          close_timeout=self.close_timeout)
        conn.remote = peer   # the forwarded address, when a trusted proxy gave one
        self._address_of[conn] = client
        self._per_address[client] += 1
        return conn

    def _client_address(self, writer: asyncio.StreamWriter, request: Request) -> str:
        """The client's IP address: the peer's, or behind a trusted proxy, the one it forwards."""
        address = peer_address(writer)
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded is None or address not in self.trusted_proxies:
            return address   # anyone else's X-Forwarded-For is whatever they like
        # Each proxy appends the address it saw, so the last one is what our
        # proxy saw; the ones before it came from the client and prove nothing.
        client = canonical_address(forwarded.rpartition(",")[2].strip())
        if client is None:
            raise bad_request("X-Forwarded-For from the trusted proxy ends in no address")
        return client

    def _over_address_limit(self, client: str) -> Response | None:
        """503 for one connection too many from one address, before the upgrade."""
        if self.max_per_address is None or self._per_address[client] < self.max_per_address:
            return None
        # One line when the address reaches its limit and one when it drops below
        # (in _release), not one per refusal: a script may try thousands of times.
        if not self._refused_at_limit[client]:
            logger.info("%s: at its limit of %d connection(s); refusing more with 503 until "
                        "one closes", client, self.max_per_address)
        self._refused_at_limit[client] += 1
        return Response(http.HTTPStatus.SERVICE_UNAVAILABLE,
                        f"too many connections from {client} (at most {self.max_per_address} "
                        "per address); try again later\n", (("Retry-After", "30"),), logged=True)

    def _release(self, conn: Connection) -> None:
        """The connection is over: it no longer counts against its address."""
        client = self._address_of.pop(conn)
        self._per_address[client] -= 1
        if not self._per_address[client]:
            del self._per_address[client]   # don't keep every address ever seen
        refused = self._refused_at_limit.pop(client, 0)
        if refused:
            logger.info("%s: below its limit again; %d connection(s) refused meanwhile", client, refused)

    def _route(self, request: Request) -> tuple[Response | None, str]:
        """Decide what a request gets: (a response, "") or (None, the WebSocket key)."""
        require_get(request)
        if self.process_request is not None:
            response = self.process_request(request)
            if response is not None:
                return response, ""
        key = check_request(request)
        if self.max_clients is not None and len(self.connections) >= self.max_clients:
            return Response(http.HTTPStatus.SERVICE_UNAVAILABLE,
                            f"server full ({self.max_clients} clients); try again later\n",
                            (("Retry-After", "30"),)), ""
        return None, key

    def drop_silent_handshakes(self, now: float) -> int:
        """Out of descriptors: abort the connections silent in their handshake for a second."""
        silent = [writer for writer, timer in self._handshake_timers.items()
                  if now - (timer.when() - self.handshake_timeout) > SILENT_WHEN_SHORT]
        for writer in silent:
            writer.transport.abort()
        return len(silent)

    @staticmethod
    def _handshake_timed_out(writer: asyncio.StreamWriter, peer: str) -> None:
        logger.info("%s: handshake not completed in time; dropping", peer)
        writer.transport.abort()

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
                  close_timeout: float = CLOSE_TIMEOUT) -> Connection:
    """Open a client connection to a ws:// or wss:// URI (RFC 6455 §4.1)."""
    target = parse_uri(uri)
    if target.secure and ssl_context is None:
        ssl_context = ssl.create_default_context()   # verifies the certificate and host name

    async def open_and_handshake() -> Connection:
        try:
            reader, writer = await asyncio.open_connection(
                target.host, target.port, ssl=ssl_context if target.secure else None,
                limit=READ_BUFFER_LIMIT)
        except OSError as error:   # ssl.SSLError is an OSError too
            if target.secure and not_tls(error):
                raise HandshakeError(http.HTTPStatus.BAD_GATEWAY, f"the server at wss://"
                                     f"{target.host_header} did not answer TLS — is it ws://?") from error
            raise
        try:
            await client_handshake(reader, writer, target, origin)
        except BaseException:
            writer.close()
            raise
        return Connection(reader, writer, is_client=True, path=target.resource,
                          max_size=max_size, close_timeout=close_timeout)

    try:
        return await asyncio.wait_for(open_and_handshake(), open_timeout)
    except asyncio.TimeoutError:
        raise HandshakeError(http.HTTPStatus.GATEWAY_TIMEOUT,
                             f"no handshake within {open_timeout:g} s") from None


#: What OpenSSL says when what comes back is not TLS at all (a plain HTTP
#: answer, or nothing): the sign of a wss:// URL for a ws:// server.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                             "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_EOF_WHILE_READING"})


def not_tls(error: OSError) -> bool:
    """Did a TLS handshake fail because the server doesn't speak TLS (rather than, say, its certificate)?"""
    if isinstance(error, ssl.SSLError):
        return isinstance(error, ssl.SSLEOFError) or error.reason in NOT_TLS_REASONS
    return isinstance(error, ConnectionResetError)


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           target: WebSocketURI, origin: str | None) -> None:
    """Send the request and check the response (§4.1); raise HandshakeError if refused."""
    key = new_key()
    writer.write(build_request(target, key, origin))
    try:
        lines = await read_http_head(reader)
    except asyncio.IncompleteReadError as error:
        # A TLS server hangs up, unanswered, on the plain HTTP of a ws:// URL.
        hint = "" if error.partial or target.secure else " (if it speaks TLS, is it wss://?)"
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY,
                             f"connection closed during the handshake{hint}") from None
    if not lines:
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY, "empty response")
    status = parse_status_line(lines[0])
    headers = parse_headers(lines[1:])
    if status != http.HTTPStatus.SWITCHING_PROTOCOLS:
        raise InvalidStatus(status, await read_short_body(reader, headers))
    check_response(headers, key)


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


def host_name(host: str) -> str | None:
    """The name in a Host header, without the port or IPv6 brackets ("[::1]:80" -> "::1")."""
    try:
        name = urllib.parse.urlsplit(f"//{host}").hostname
    except ValueError:   # "[not-an-address]"
        return None
    return name.rstrip(".") if name else None


def host_refusal(host: str) -> Response:
    """421 for a Host we don't answer to, saying why and how to allow it."""
    name = printable(host_name(host) or host)
    if not name:
        return Response(http.HTTPStatus.BAD_REQUEST, "missing Host header\n")
    return Response(http.HTTPStatus.MISDIRECTED_REQUEST,
                    f"this server does not answer to the name {name} (a guard against DNS "
                    f"rebinding); if that name is really its own, start it with --allow-host {name}\n")


class ChatRoom:
    """Who is here, what they said lately, and relaying it to everyone."""

    def __init__(self, *, history_size: int = HISTORY_SIZE, rate: float = RATE_PER_SECOND,
                 burst: int = RATE_BURST, announce_limit: int = ANNOUNCE_LIMIT,
                 allowed_origins: Collection[str] = (), allowed_hosts: Collection[str] = (),
                 secure: bool = False) -> None:
        self.members: dict[str, Connection] = {}
        self.history: collections.deque[str] = collections.deque(maxlen=history_size)
        self.rate, self.burst = rate, burst
        self.announce_limit = announce_limit
        self.allowed_origins = {origin.lower().rstrip("/") for origin in allowed_origins}
        own_name = socket.gethostname().lower()
        self.allowed_hosts = {"localhost", own_name, own_name.partition(".")[0]} | {
            host.lower().rstrip(".") for host in allowed_hosts}
        self.secure = secure
        self._guest_number = 0
        self._unsent: list[bytes] = []   # broadcast frames waiting for the end of this loop turn

    # -- before the upgrade ------------------------------------------------

    def process_request(self, request: Request) -> Response | None:
        """Serve the page at /, refuse unknown hosts, other paths and foreign origins, upgrade /chat."""
        host = request.headers.get("host", "")
        if not self.host_allowed(host):
            return host_refusal(host)
        upgrade = "websocket" in header_tokens(request.headers, "upgrade")
        if request.path == "/" and not upgrade:
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
        # Host is only "ours" once it passed host_allowed: a rebinding page
        # chooses both the Origin and the Host its browser sends.
        return origin in self.allowed_origins or (origin == own and self.host_allowed(host))

    def host_allowed(self, host: str) -> bool:
        """Guard against DNS rebinding: answer only to names we know, or to addresses.

        A page on evil.example can make its own name resolve to 127.0.0.1 a
        moment after it loaded; its scripts then reach this server as
        "evil.example", which the browser treats as the page's own site, so
        neither the same-origin rule nor our Origin check stops them. The name
        in the Host header gives them away: rebinding needs a name, so an IP
        literal is always fine, as are localhost, this machine's name and the
        names given with --allow-host ("*" accepts any).
        """
        if "*" in self.allowed_hosts:
            return True
        name = host_name(host)
        if name is None:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name in self.allowed_hosts
        return True

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
            self.flush()   # what was said while they were here still reaches them
            del self.members[name]
            logger.info("%s: %s left (%s)", conn.remote, name, describe_close_code(conn.close_code or 1006))
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
        self.flush()   # earlier broadcasts are not for the newcomer
        self.members[name] = conn
        count = len(self.members)
        self.tell(conn, f"* You are connected as {name}! There {'is' if count == 1 else 'are'} "
                        f"{count} user{'' if count == 1 else 's'} here. Type /help for commands.")
        for line in self.history:
            self.tell(conn, f"(history) {line}")
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
        async for message in conn:
            if isinstance(message, bytes):
                conn.fail_nowait(CloseCode.UNSUPPORTED_DATA, "binary messages are not chat; send text")
            elif bucket is not None and not bucket.take():
                refused_in_a_row += 1
                if refused_in_a_row >= self.burst:
                    conn.fail_nowait(CloseCode.POLICY_VIOLATION, "flooding")
                else:
                    self.tell(conn, f"* slow down: message not sent (at most {self.rate:g} per second)")
            else:
                refused_in_a_row = 0
                self.on_text(name, conn, message)

    def on_text(self, name: str, conn: Connection, text: str) -> None:
        if not text.startswith("/"):
            line = f"[{name}]: {text}"
            self.history.append(line)
            self.broadcast(line)
            return
        command, _, argument = text.partition(" ")
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

    def tell(self, conn: Connection, text: str) -> None:
        """Send one line to one member, without waiting, after what was broadcast before it."""
        self.flush()
        conn.write_frame(traced_frame(conn.remote, Opcode.TEXT, text.encode("utf-8")))

    def broadcast(self, text: str) -> None:
        """Send one line to every member, at the end of this turn of the event loop.

        The frame is encoded once: a server's frames are unmasked, so every
        member gets the same bytes. It isn't written at once: frames broadcast
        in the same turn of the loop (a busy room reads many messages per
        turn) are joined and written with one system call per member instead
        of one per frame per member, which is where a chat server spends its
        time. The flush runs before the loop next waits for the network, and
        before anything that must come after these frames (a reply to one
        member, someone joining or leaving), so nothing is reordered.
        """
        frame = traced_frame(f"all {len(self.members)}", Opcode.TEXT, text.encode("utf-8"))
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self.flush)
        self._unsent.append(frame)

    def flush(self) -> None:
        """Write the waiting broadcast frames to every member, never waiting for one.

        A slow reader only fills its own buffer, and write_frame cuts it off there.
        """
        if not self._unsent:
            return
        data = self._unsent[0] if len(self._unsent) == 1 else b"".join(self._unsent)
        self._unsent.clear()
        for conn in self.members.values():
            conn.write_frame(data)


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
const log = document.getElementById("log"), status = document.getElementById("status");
const joinForm = document.getElementById("join"), sendForm = document.getElementById("send");
let socket = null, myName = "";

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
    const named = /^\\* You are connected as (\\S+)!/.exec(event.data);
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
"""


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
        named = re.match(r"\* You are connected as (\S+)!", line)
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
    """Lines the user typed, read by a daemon thread so Ctrl-C or exit never waits for Enter.

    None in the queue means "the user is done" (Ctrl-D, end of input, Ctrl-C).
    """

    def __init__(self, screen: Screen, stdin: typing.TextIO) -> None:
        self.screen = screen
        self.stdin = stdin
        self.lines: collections.deque[str | None] = collections.deque()
        self.ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()

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
            self.loop.call_soon_threadsafe(self.put, line)
            if line is None:
                return

    def put(self, line: str | None) -> None:
        self.lines.append(line)
        self.ready.set()

    def interrupt(self) -> None:
        """Ctrl-C: quit before anything still queued."""
        self.lines.appendleft(None)
        self.ready.set()

    async def wait(self) -> None:
        while not self.lines:
            self.ready.clear()
            await self.ready.wait()


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
                 first_backoff: float = FIRST_BACKOFF,
                 on_connected: Callable[[], None] | None = None) -> None:
        self.url, self.screen, self.keyboard = url, screen, keyboard
        self.on_connected = on_connected   # called once, at the first connection
        self.reconnect = reconnect
        self.first_backoff = first_backoff
        self.ssl_context = ssl_context
        self.max_size = max_size

    async def run(self) -> int:
        """The whole session; returns the exit status."""
        backoff, connected_before = self.first_backoff, False
        while True:
            try:
                conn = await self.connect_unless_quit()
            except (OSError, HandshakeError, ValueError) as error:
                if not (connected_before and self.reconnect):
                    self.screen.show(f"cannot connect to {self.url}: {explain_connect_error(error)}", "error")
                    return 1
                why = f" ({explain_connect_error(error)})"
            else:
                if conn is None:
                    return 0   # Ctrl-C (or /quit) while connecting
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

    async def connect_unless_quit(self) -> Connection | None:
        """connect(), said on the screen; None if the user quits first (Ctrl-C works at once)."""
        self.screen.show(f"* connecting to {self.url} …", "notice")
        connecting = asyncio.create_task(
            connect(self.url, ssl_context=self.ssl_context, max_size=self.max_size))
        # connect() gives up by itself after HANDSHAKE_TIMEOUT: waiting as long is enough.
        quitting = asyncio.create_task(self.quit_requested_within(HANDSHAKE_TIMEOUT))
        done, _ = await asyncio.wait({connecting, quitting}, return_when=asyncio.FIRST_COMPLETED)
        if connecting not in done and quitting.result():
            connecting.cancel()
            await asyncio.wait({connecting})
            return None
        quitting.cancel()
        conn = await connecting
        if self.on_connected is not None:
            self.on_connected()   # the keyboard, and its prompt, only once there is a room
            self.on_connected = None
        return conn

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
                line = self.keyboard.lines.popleft()
                if line is None or line.strip() == "/quit":
                    await conn.close(CloseCode.NORMAL_CLOSURE)
                    return None
                if line.strip():
                    await self.send(conn, line)
        finally:
            receiving.cancel()
            pinging.cancel()

    async def send(self, conn: Connection, line: str) -> None:
        try:
            await conn.send(line)
        except ConnectionClosed:
            self.keyboard.lines.appendleft(line)   # not lost: sent after reconnecting
            await asyncio.sleep(0)                 # let the receiving task report the close

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
        deadline = asyncio.get_running_loop().time() + delay
        while True:
            if None in self.keyboard.lines or any(
                    line is not None and line.strip() == "/quit" for line in self.keyboard.lines):
                return True
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self.keyboard.ready.clear()
            try:
                await asyncio.wait_for(self.keyboard.ready.wait(), remaining)
            except asyncio.TimeoutError:
                return False


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


class StartupError(Exception):
    """What kept the program from starting, as one sentence for the person who ran it."""


async def listen(handler: Handler, args: argparse.Namespace, **options: typing.Any) -> WebSocketServer:
    """serve() on --host and --port, with a failure to listen put in words."""
    try:
        return await serve(handler, args.host, args.port, **options)
    except OSError as error:   # socket.gaierror (no such host) is an OSError too
        where = host_port(args.host or "*", args.port)
        raise StartupError(f"cannot listen on {where}: {describe_os_error(error)}") from None


#: Listening addresses that mean "every interface", and how the start-up line says so.
ALL_INTERFACES = {"": "all interfaces", "0.0.0.0": "all IPv4 interfaces", "::": "all IPv6 interfaces"}


def reachable_at(host: str, port: int) -> tuple[str, str]:
    """The host:port for the start-up URLs, and " on all interfaces" when that is so."""
    if host in ALL_INTERFACES:
        return host_port(socket.gethostname(), port), f" on {ALL_INTERFACES[host]}"
    return host_port(host, port), ""


def raise_descriptor_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit; return the limit.

    Only the soft limit applies, and it is often 1024 while the hard limit,
    which a process may raise it to, is far higher. None: no limit we know of.
    """
    try:
        import resource   # Unix only; imported here so that the file runs on Windows too
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):   # macOS refuses an unlimited one: keep the soft limit
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def clients_descriptors_allow(max_clients: int | None, flag: str = "--max-clients") -> int | None:
    """max_clients, lowered (and said so) if the open-file limit can't hold that many members."""
    limit = raise_descriptor_limit()
    if limit is None:
        return max_clients
    allowed = limit - FD_RESERVE
    if allowed < 1:
        raise StartupError(f"this process may open only {limit} files and the server needs more "
                           f"than {FD_RESERVE}: raise the limit (ulimit -n)")
    if max_clients is None or max_clients <= allowed:
        return allowed if max_clients is None else max_clients
    logger.warning("%s lowered from %d to %d: this process may open %d files (ulimit -n) "
                   "and keeps %d for itself", flag, max_clients, allowed, limit, FD_RESERVE)
    return allowed


async def run_echo(args: argparse.Namespace) -> int:
    max_clients = clients_descriptors_allow(None)
    server = await listen(echo, args, max_size=args.max_size, max_clients=max_clients,
                          max_buffer=max(MAX_OUTGOING_BUFFER, 4 * args.max_size))
    address, where = reachable_at(args.host, server.port)
    logger.info("echo server%s: ws://%s/", where, address)
    await run_until_signalled(server)
    return 0


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as error:
        files = f"--certfile {certfile}" + (f" with --keyfile {keyfile}" if keyfile else "")
        raise StartupError(f"cannot use {files}: {ssl_error_words(error)} (a PEM certificate "
                           "and its key are needed; --keyfile names the key if it is apart)") from None
    return context


def ssl_error_words(error: ssl.SSLError) -> str:
    """'no certificate or crl found' for NO_CERTIFICATE_OR_CRL_FOUND; '[SSL] PEM lib' without the C file."""
    if error.reason:
        return error.reason.replace("_", " ").lower()
    return re.sub(r" \(_ssl\.c:\d+\)$", "", error.strerror or str(error))


def client_ssl_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as error:
        raise StartupError(f"cannot use --cafile {cafile}: {ssl_error_words(error)} "
                           "(it must hold PEM certificates)") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def run_server(args: argparse.Namespace) -> int:
    ssl_context = server_ssl_context(args.certfile, args.keyfile)
    max_clients = clients_descriptors_allow(args.max_clients)
    room = ChatRoom(rate=args.rate, burst=args.burst, announce_limit=args.announce_limit,
                    allowed_origins=args.allow_origin, allowed_hosts=args.allow_host,
                    secure=ssl_context is not None)
    server = await listen(room.handle, args, ssl_context=ssl_context,
                          process_request=room.process_request, max_size=args.max_size,
                          max_buffer=args.max_buffer, max_clients=max_clients,
                          max_per_address=args.max_per_ip or None, trusted_proxies=args.trusted_proxy)
    address, where = reachable_at(args.host, server.port)
    secure = "s" if ssl_context else ""
    logger.info("chat server ready%s: ws%s://%s%s for clients, http%s://%s/ in a browser",
                where, secure, address, CHAT_PATH, secure, address)
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
    client = ChatClient(url, screen, keyboard, reconnect=not args.no_reconnect,
                        ssl_context=ssl_context, max_size=args.max_size,
                        on_connected=keyboard.start)   # no prompt before a connection exists
    status = await client.run()
    if interactive:
        print()   # end the prompt's line, so the shell's prompt starts on its own
    return status


# Every value is checked as it is parsed, so a bad one is a usage error (exit
# status 2, one sentence from argparse) rather than a traceback or a server that
# starts and then misbehaves (a rate of -1, or NaN, which turns the limit off).

def whole_number(text: str, low: int, high: int | None = None) -> int:
    """An int from low to high (or up), or an error saying what was wrong with ``text``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {allowed}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def port_number(text: str) -> int:
    """0 to 65535; 0 lets the system pick a free port."""
    return whole_number(text, 0, 65535)


def rate(text: str) -> float:
    """A finite number of messages per second, 0 or more ("nan" and "inf" are not rates)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: give a number of "
                                         "messages per second, 0 or more")
    return value


def readable_file(path: str) -> str:
    """A file we can open now, so a typo fails at once and not at the first client."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {describe_os_error(error)}") from None
    return path


def ip_address(text: str) -> str:
    address = canonical_address(text)
    if address is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address")
    return address


def websocket_url(url: str) -> str:
    try:
        parse_uri(url)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return url


def describe_os_error(error: OSError) -> str:
    """The few system errors a person starting chat.py meets, in words to act on."""
    if isinstance(error, socket.gaierror):
        if error.errno == socket.EAI_NONAME:
            return "no such host (give a name this machine can resolve, or an address)"
        return f"cannot look the name up ({error.strerror}; is DNS reachable?)"
    reasons = {
        errno.ENOENT: "no such file",
        errno.EACCES: "permission denied",
        errno.EISDIR: "it is a directory",
        errno.EADDRINUSE: "address already in use (is another server running? --port picks another)",
        errno.EADDRNOTAVAIL: "this machine has no such address",
    }
    return reasons.get(error.errno, (error.strerror or str(error)).lower())


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
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; '' means all interfaces (default: %(default)s)")
    server.add_argument("--port", type=port_number, default=8080, help="port to listen on (default: %(default)s)")
    server.add_argument("--max-size", type=positive_int, default=MAX_MESSAGE_SIZE,
                        help="largest message accepted, in bytes; larger ones close with 1009 "
                             "(default: %(default)s)")
    server.add_argument("--max-buffer", type=positive_int, default=MAX_OUTGOING_BUFFER,
                        help="bytes a client may leave unread before it is dropped with 1008 "
                             "(default: %(default)s)")
    server.add_argument("--rate", type=rate, default=RATE_PER_SECOND,
                        help="messages per second allowed per client after a burst; 0 turns "
                             "flood control off (default: %(default)s)")
    server.add_argument("--burst", type=positive_int, default=RATE_BURST,
                        help="messages a client may send at once (default: %(default)s)")
    server.add_argument("--announce-limit", type=non_negative_int, default=ANNOUNCE_LIMIT,
                        help="stop announcing joins and leaves past this many members "
                             "(default: %(default)s)")
    server.add_argument("--certfile", type=readable_file, help="serve https:// and wss:// with this certificate (PEM)")
    server.add_argument("--keyfile", type=readable_file, help="the certificate's private key (PEM), if not in --certfile")
    add_server_access_flags(server)
    server.set_defaults(run=run_server)


def add_server_access_flags(server: argparse.ArgumentParser) -> None:
    """Who may connect, and how many: the flags for an operator's defences."""
    server.add_argument("--max-clients", type=positive_int, default=1000,
                        help="connections beyond this get HTTP 503; lowered at start-up if the "
                             "open-file limit (ulimit -n) can't hold them (default: %(default)s)")
    server.add_argument("--max-per-ip", type=non_negative_int, default=MAX_PER_ADDRESS,
                        help="connections one IP address may hold at once; more get HTTP 503. "
                             "A classroom behind one NAT shares one address: raise it there; "
                             "0 means no limit (default: %(default)s)")
    server.add_argument("--trusted-proxy", action="append", default=[], type=ip_address,
                        metavar="ADDR",
                        help="a reverse proxy in front of the server: for connections from ADDR "
                             "(and only from it), limits and logs use the client address in its "
                             "X-Forwarded-For header (repeatable)")
    server.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="also accept browsers from this origin, e.g. https://example.com "
                             "(repeatable; the server's own origin is always accepted)")
    server.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for this host name (repeatable; '*' for any). "
                             "IP addresses, localhost and this machine's name always work; other "
                             "names get HTTP 421, which stops DNS-rebinding pages")


def add_client_command(commands: argparse._SubParsersAction) -> None:
    client = commands.add_parser(
        "client", help="join the chat from this terminal",
        description="Join the chat. Type a line and Enter to send it; /who, /msg NAME TEXT; "
                    "/quit, Ctrl-D or Ctrl-C to leave. If the server goes away the client "
                    "reconnects, waiting 1, 2, 4 ... up to 30 seconds between attempts.")
    client.add_argument("--name", help="your name in the room (default: the server picks userN)")
    client.add_argument("--url", type=websocket_url, default=f"ws://127.0.0.1:8080{CHAT_PATH}",
                        help="the chat's WebSocket URL (default: %(default)s)")
    client.add_argument("--no-reconnect", action="store_true",
                        help="exit with status 1 when the connection is lost")
    client.add_argument("--cafile", type=readable_file, help="trust the CA certificate(s) in this PEM file for wss://")
    client.add_argument("--insecure", action="store_true",
                        help="don't verify the server's certificate (testing only)")
    client.add_argument("--max-size", type=positive_int, default=MAX_MESSAGE_SIZE + RELAY_OVERHEAD,
                        help="largest message accepted, in bytes (default: %(default)s)")
    client.set_defaults(run=run_client)


def add_echo_command(commands: argparse._SubParsersAction) -> None:
    echo_cmd = commands.add_parser(
        "echo", help="an echo server for conformance suites (Autobahn)",
        description="Send every message back unchanged, on any path.")
    echo_cmd.add_argument("--host", default="127.0.0.1",
                          help="address to listen on; '' means all interfaces (default: %(default)s)")
    echo_cmd.add_argument("--port", type=port_number, default=9001, help="port to listen on (default: %(default)s)")
    echo_cmd.add_argument("--max-size", type=positive_int, default=MAX_MESSAGE_SIZE,
                          help="largest message accepted, in bytes (default: %(default)s)")
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
    except StartupError as error:
        print(f"chat.py: {error}", file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    sys.exit(main())
