#!/usr/bin/env python3
"""chat.py — a WebSocket chat, server and terminal client, in one file.

RFC 6455 (https://www.rfc-editor.org/rfc/rfc6455) written out by hand over
asyncio, with nothing but the Python standard library (3.10 or later):

    python chat.py server                  # the chat room, and a page for browsers
    python chat.py client --name bob       # a terminal client
    python chat.py echo --port 9001        # a bare echo server for conformance suites

Read it top to bottom. Sections 1-7 are the protocol path, the lesson, in the
order a learner needs it; 8 is the chat built on it. The rest is machinery
that a first reading can skip: 9-11 make the same protocol fast and safe in
public, each piece reached from the path through one name; 12 is an
extension the handshake may agree on. ``grep '^# [0-9]' chat.py`` prints
this table of contents, sub-sections included:

    1. Constants      the GUID, opcodes, close codes, the header bits, limits
    2. Errors         each error knows the close code or HTTP status it becomes
    3. Handshake      HTTP/1.1 Upgrade, both sides (RFC 6455 §1.3, §4)
    4. Frames         the §5.2 header, masking, encoding and parsing (§5.2-§5.5)
    5. Messages       fragments, UTF-8 and close payloads (§5.4, §5.6, §7.4, §8.1)
       --- everything above is pure: no await, no I/O, no logging ---
    6. Connection     one class for both roles: recv, close, send, ping (§5.5, §7)
    7. Server and client  WebSocketServer, serve() and connect(): the handshake on the wire
    8. Chat room      line formats, names, commands, flood control, the room
    9. Serving many   the speed-ups: fast masking, Incoming, batched writes and broadcasts
   10. Running a server in public   limits per address, running out of descriptors, -v
   11. Showing untrusted text   printable(): what peers send never drives a screen
   12. Compression    permessage-deflate (RFC 7692), an extension
   13. Redis: RESP    a RESP2 reader and a pipelining client   } only for
   14. Shared room    one room on many servers                 } server --redis
   15. Line editor    raw-mode keys, one buffer and a cursor, the input redrawn whole
   16. Client         connect, deliver what is typed, show the room; reconnect
   17. Web page       the HTML and JavaScript served at /
   18. Command line   argparse subcommands; main(argv) -> exit status, last

The life of a chat line, with the names to read at each step:

    bob types "hi" and Enter     LineEditor (15) -> Keyboard (16) queues the line
    bob's client sends it        Sender.send_line (16) -> Connection.send (6)
                                 -> encode_frame (4): a masked TEXT frame
    the server reads it          Connection.recv_message (6): FrameReader (4),
                                 MessageAssembler (5): the text stays the UTF-8 that came
    the room relays it           ChatRoom.relay_messages -> Pacer.submit -> on_text -> say
                                 -> broadcast (8): one frame, written to every member
    with --redis, other servers  SharedRoom.say -> share: XADD (14); each other server
                                 reads it (XREAD) and broadcasts it (14, 8)
    alice's client shows it      ChatClient.receive -> on_line -> Screen.show (16),
                                 escaped by printable (11) -> InputView.show_above (15)
    bob's copy comes back        on_line sees it: the line is confirmed, no longer dimmed (16)

What runs is that, done faster (section 9): read through Incoming, written
once per turn of the event loop, a turn's broadcasts joined once (BatchedRoom).

Left out on purpose: extensions other than permessage-deflate, subprotocols,
HTTP redirects and proxies on the client, WebSockets over HTTP/2 (RFC 8441).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import codecs
import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import hashlib
import http
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import types
import typing
import unicodedata
import urllib.parse
import weakref
import zlib
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence


def check_python_version(version_info: tuple = sys.version_info) -> None:
    """Exit with one line on Python older than 3.10, before any newer feature runs.

    Python 3.7-3.9 parse this whole file (annotations stay strings), so the
    check comes right after the imports, before the first line 3.9 can't run.
    """
    if tuple(version_info[:2]) < (3, 10):
        sys.exit(f"chat.py needs Python 3.10 or later; this is Python "
                 f"{version_info[0]}.{version_info[1]}")


check_python_version()

__all__ = [
    "Opcode", "CloseCode", "FrameHeader", "Connection", "ConnectionClosed",
    "ProtocolError", "HandshakeError", "connect", "serve", "WebSocketServer", "PublicServer",
    "FastConnection", "ChatRoom", "BatchedRoom", "SharedRoom", "main",
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
#: RSV1 as FrameHeader.rsv numbers the three bits (RSV1 4, RSV2 2, RSV3 1):
#: permessage-deflate's "this message is compressed" (RFC 7692 §6, section 12).
RSV1 = 0b100
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

#: The stream reader's buffer (the handshake's, Redis's): reading pauses once
#: this much is waiting, so a peer can never make us buffer more than about
#: twice this per connection.
READ_BUFFER_LIMIT = 64 * 1024

#: Seconds a peer gets to finish the opening handshake, and the closing one.
#: Both are bounded so that a silent peer can't hold a connection forever.
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0

#: A ping every 20 s; a peer that hasn't answered by the next one is gone.
KEEPALIVE_INTERVAL = 20.0



# 2. Errors #################################################################

class WebSocketError(Exception):
    """Base class for everything this module raises."""


class HandshakeError(WebSocketError):
    """The opening handshake failed: the server answers with this HTTP error; a client's
    carry the status a gateway would report (502 for a wrong answer, 504 for none)."""

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
#: RFC 9112 §3.2.1, RFC 3986 §3.3: a path of "pchar" segments, maybe a query;
#: the query as browsers send it (they leave | { } ^ ` [ ] unencoded there).
_PCHAR = r"(?:[\w\-.~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
_ORIGIN_FORM = re.compile(rf"(?:/{_PCHAR}*)+(?:\?[!\"$-~]*)?", re.ASCII)
#: RFC 9112 §3.2: Host is uri-host[:port], a name or an address; no userinfo, no list.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|(?:[\w\-.~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::\d*)?", re.ASCII)


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
        return self.target.partition("?")[0]


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
    if not _ORIGIN_FORM.fullmatch(target):
        raise bad_request("the request target must be a path, and maybe a query (RFC 9112 §3.2.1)")
    headers = parse_headers(lines[1:])
    if not _HOST.fullmatch(headers.get("host", "")):   # two Hosts are joined with ", ": refused too
        raise bad_request("the Host header must be one host[:port] (RFC 9112 §3.2)")
    return Request(method, target, headers)


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
    """Everything in a frame but its payload, decoded (§5.2)."""

    fin: bool
    rsv: int                 # the three reserved bits, as a number from 0 to 7
    opcode: int
    length: int              # of the payload, in bytes
    mask_key: bytes | None   # None for an unmasked frame


def apply_mask(data: bytes, mask_key: bytes, start: int = 0, end: int | None = None) -> bytearray:
    """XOR data[start:end] with the mask key repeated (§5.3); masking and unmasking are the same.

    Byte i of the payload is XOR-ed with byte i % 4 of the key. This loop is
    the reference; frames are masked with apply_mask_fast (section 9), the
    same XOR about fifty times faster on a large payload, held equal by a test.
    """
    end = len(data) if end is None else end
    return bytearray(data[start + i] ^ mask_key[i % 4] for i in range(end - start))


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
    return header + mask_key + apply_mask_fast(payload, mask_key)


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
    a socket; ``parse_frame`` from one buffer, as the tests do.

    The bytes fed are kept as they came, with a read position, and the
    payload is unmasked straight out of them: only a header cut in two is
    copied, when more arrives.
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
            chunk = apply_mask_fast(self._data, rotate_mask(self._mask_key, self._offset), start, end)
        else:
            chunk = self._data[start:end]   # when it is all the bytes fed: no copy
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
    message ends. The pieces are kept as they came and joined once, at the
    end: a growing buffer would copy a large message over and over.
    """

    __slots__ = ("max_size", "opcode", "size", "added", "pieces", "decoder")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.opcode: int | None = None   # TEXT or BINARY while a message is in progress
        self.size = 0                    # bytes announced by the frame headers so far
        self.added = 0                   # bytes of payload taken so far (after inflating, if any)
        self.pieces: list[bytes] = []
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
        if self.decoder is not None:
            self.check_utf8(chunk)
        self.added += len(chunk)
        self.pieces.append(chunk)

    def check_utf8(self, chunk: bytes) -> None:
        try:
            self.decoder.decode(chunk)   # only to check: text is passed on as UTF-8 bytes
        except UnicodeDecodeError as error:
            raise InvalidPayload(f"invalid UTF-8 in text message: {error.reason}") from None

    @property
    def size_left(self) -> int:
        """How many more bytes the message may grow by: an inflater's bound (section 12)."""
        return self.max_size - self.added

    def finish(self) -> Message:
        """The complete message, after the frame with FIN set; text stays UTF-8 bytes."""
        # join returns a lone bytes piece itself, uncopied: a frame read whole
        message = Message(self.opcode, b"".join(self.pieces))
        decoder = self.decoder
        self.opcode, self.pieces, self.decoder = None, [], None
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
    if code not in SENDABLE_CLOSE_CODES:
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
# Reading uses the one call of asyncio's StreamReader a frame reader needs,
# ``await reader.read(n)``. Every frame we send leaves through _write(), in
# the order written, whoever wrote it: a pong, a broadcast, the close frame.
# send() then waits for the peer to read; write_frame(), the broadcast path,
# never waits. (serve() and connect() return a FastConnection, section 9:
# a leaner reader with the same read(), writes gathered once per loop turn.)
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


def format_peer(writer: asyncio.StreamWriter) -> str:
    """'127.0.0.1:50312' or '[::1]:50312' for log lines."""
    peer = writer.get_extra_info("peername")
    return host_port(peer[0], peer[1]) if peer else "?"


def unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes written but not yet taken by the kernel; 0 once the connection is gone."""
    try:
        return transport.get_write_buffer_size()
    except AttributeError:   # a TLS transport that lost its connection (Python 3.10-3.11)
        return 0


class Connection:
    """One WebSocket connection after the opening handshake, in either role."""

    message_assembler = MessageAssembler   # FastConnection's: FastAssembler (ASCII fast path)

    __slots__ = ("reader", "writer", "transport", "is_client", "path", "remote", "deflate",
                 "close_timeout", "state", "close_rcvd", "close_sent", "_frames", "_message",
                 "_read_lock", "_loop", "_pong_waiters", "_close_timer", "_keepalive_pending")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 is_client: bool, path: str = "/", max_size: int = MAX_MESSAGE_SIZE,
                 close_timeout: float = CLOSE_TIMEOUT,
                 deflate: PerMessageDeflate | None = None) -> None:
        self.reader = reader                  # the handshake's StreamReader, or what has its read()
        self.writer = writer
        self.transport = writer.transport
        self.is_client = is_client
        self.path = path                      # the request target, e.g. "/chat?name=bob"
        self.remote = format_peer(writer)
        self.deflate = deflate                # permessage-deflate, if agreed (section 12)
        self.close_timeout = close_timeout
        self.state = State.OPEN
        self.close_rcvd: Close | None = None  # the peer's close frame, once it arrives
        self.close_sent: Close | None = None  # ours, once sent
        self._frames = FrameReader(expect_masked=not is_client, extension_rsv=RSV1 if deflate else 0)
        self._message = self.message_assembler(max_size)
        self._read_lock = asyncio.Lock()      # frames must be read by one task at a time
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
        """The next message with its opcode, text left as the UTF-8 bytes that came (and
        were checked): a server can relay them without decoding and encoding them."""
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
            # Compressed (section 12): inflated on the way in, its size bounded by the inflater.
            inflate = self.deflate is not None and self.deflate.start_frame(header)
            self._message.start_frame(header.opcode, 0 if inflate else header.length)
            while self._frames.remaining:
                chunk = await self._read_payload_chunk()
                self._message.add(self.deflate.inflate(chunk, self._message.size_left) if inflate else chunk)
            if header.fin:
                if inflate:
                    self._message.add(self.deflate.end_message(self._message.size_left))
                message = self._message.finish()
                if self.state is State.OPEN:   # once we sent a close frame, data is dropped
                    return message

    async def _read_header(self) -> FrameHeader:
        """The next frame's header, checked as soon as each part of it arrives (§5.2)."""
        while True:
            header = self._frames.read_header()
            if header is not None:
                return header
            await self._receive_more()

    async def _read_payload_chunk(self) -> bytes:
        """Whatever of the frame's payload has arrived, waiting until something has.

        Taking what is there lets invalid UTF-8 fail the connection the moment
        it shows up, even in the middle of a frame (§8.1).
        """
        chunk = self._frames.read_payload()
        while not chunk:
            await self._receive_more()
            chunk = self._frames.read_payload()
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

    # -- closing ------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Run the closing handshake (§7.1.2) and return once TCP is closing."""
        self.close_nowait(code, reason)
        # A task in recv() reads the peer's close frame; else we read (and drop) what comes first.
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
            # The peer may be halfway through frames we will never parse: we
            # stop writing (a server closes first, §7.1.1) and discard what it
            # sends until it hangs up, since closing with unread data sends a
            # TCP reset that could destroy our close frame before it is read.
            if not self.is_client and self.transport.can_write_eof():
                self.transport.write_eof()
            await self._discard_until_eof()
        self._finish()

    def _send_close(self, code: int, reason: str = "") -> None:
        """Send our close frame; nothing may follow it (§5.5.1)."""
        self.close_sent = Close(code, reason)
        self._send_frame(Opcode.CLOSE, encode_close_payload(code, reason))
        self.state = State.CLOSING
        self._close_timer = self._loop.call_later(self.close_timeout, self.transport.abort)

    async def _discard_until_eof(self) -> None:
        """Read and drop bytes until the peer closes TCP (or the close timer aborts it)."""
        with contextlib.suppress(OSError):
            while await self.reader.read(READ_BUFFER_LIMIT):
                pass

    def _finish(self) -> None:
        """TCP is (being) closed: settle everything still waiting on this connection."""
        self.state = State.CLOSED
        unsent = unsent_bytes(self.transport)   # asked before closing: a closed TLS transport can't tell
        self.writer.close()
        # Keep the timer only while our last bytes are still queued for a
        # peer that isn't reading: then it is what finally aborts TCP.
        if self._close_timer is not None and not unsent:
            self._close_timer.cancel()
        for waiter in self._pong_waiters.values():
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        self._pong_waiters.clear()

    # -- sending, ping and keepalive ----------------------------------------

    async def send(self, message: str | bytes) -> None:
        """Send one message: str as a text frame, bytes as a binary frame (§5.6)."""
        if self.state is not State.OPEN:
            raise self._closed_error()
        opcode, payload = ((Opcode.TEXT, message.encode("utf-8")) if isinstance(message, str)
                           else (Opcode.BINARY, bytes(message)))
        compressed = self.deflate.deflate(payload) if self.deflate is not None else None
        if compressed is not None:   # RSV1: "this message is compressed" (section 12)
            frame = encode_frame(opcode, compressed, mask=self.is_client, rsv=RSV1)
        else:
            frame = encode_frame(opcode, payload, mask=self.is_client)
        self._write(frame)
        await self._drain(len(frame))

    async def _drain(self, written: int) -> None:
        """Wait while the peer is slow to read what we wrote (``written`` bytes just now)."""
        try:
            await self.writer.drain()
        except OSError:
            self.transport.abort()      # the reading side will see the end too
            raise self._closed_error() from None

    def write_frame(self, frame: bytes) -> None:
        """Send an already-encoded data frame, never waiting: the broadcast path."""
        # §5.5.1: no data frame may follow our close frame.
        if self.close_sent is None:
            self._write(frame)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        self._write(encode_frame(opcode, payload, mask=self.is_client))

    def _write(self, frame: bytes) -> None:
        """Every frame we send leaves through here, in the order written."""
        if not self.transport.is_closing():
            self.transport.write(frame)

    async def ping(self, data: bytes = b"") -> None:
        """Send a ping and wait for its pong (§5.5.2), which some task in recv() must read."""
        if self.state is not State.OPEN:
            raise self._closed_error()
        waiter = self._pong_waiters.get(data)
        if waiter is None:
            waiter = self._pong_waiters[data] = self._loop.create_future()
            self._send_frame(Opcode.PING, data)
        await waiter

    def keepalive_tick(self) -> None:
        """Called every keepalive interval: ping, or drop a peer that missed the last ping.

        1011, as the websockets library does: the connection has become unusable.
        """
        if self.state is not State.OPEN:
            return
        if self._keepalive_pending:
            self.fail_nowait(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        else:
            self._keepalive_pending = True
            self._send_frame(Opcode.PING, b"keepalive")

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
#
# The handshake on the wire, and the two ways in: serve() listens and hands
# each new WebSocket to a handler; connect() opens one. WebSocketServer is
# the plain server; serve() runs PublicServer (section 10): this class with
# the defences a server facing the internet needs.

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


Handler = Callable[[Connection], Awaitable[None]]
RequestHook = Callable[[Request], "Response | None"]


class WebSocketServer:
    """Accepts TCP connections, runs the opening handshake, hands each WebSocket to a handler.

    ``process_request`` may answer a request itself (a web page, a 404, a
    refusal) by returning a Response; returning None lets the upgrade go on.
    """

    def __init__(self, handler: Handler, *, process_request: RequestHook | None = None,
                 max_size: int = MAX_MESSAGE_SIZE, max_clients: int | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, close_timeout: float = CLOSE_TIMEOUT,
                 keepalive_interval: float | None = KEEPALIVE_INTERVAL,
                 compression: bool = True) -> None:
        self.handler = handler
        self.process_request = process_request
        self.max_size = max_size
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.keepalive_interval = keepalive_interval
        self.compression = compression        # accept permessage-deflate (section 12)
        self.connections: set[Connection] = set()
        self._tasks: dict[asyncio.Task, Connection | asyncio.StreamWriter] = {}   # writer: handshaking
        self._server: asyncio.Server | None = None
        self._keepalive: asyncio.Task | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> None:
        # backlog: a burst of clients connecting at once waits in the kernel's
        # queue (1024, not asyncio's 100) instead of being refused.
        self._server = await asyncio.start_server(
            self._serve_tcp, host, port, ssl=ssl_context, limit=READ_BUFFER_LIMIT, backlog=1024,
            reuse_port=reuse_port or None,   # and TLS's handshake bounded like ours (not 60 s):
            ssl_handshake_timeout=self.handshake_timeout if ssl_context else None)
        if self.keepalive_interval:
            self._keepalive = asyncio.create_task(keepalive(self.connections, self.keepalive_interval))

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection, from the first byte to the last."""
        task = asyncio.current_task()
        self._tasks[task] = writer
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

    def _release(self, conn: Connection) -> None:
        """The connection is over (PublicServer stops counting it against its address)."""

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
            request, response = await asyncio.wait_for(
                self._read_request(reader, writer), self.handshake_timeout)
        except asyncio.TimeoutError:
            logger.info("%s: handshake not completed in time; dropping", peer)
            return None
        except (asyncio.IncompleteReadError, OSError):
            return None   # the peer left mid-handshake
        writer.write(serialize_response(response))
        if response.status != http.HTTPStatus.SWITCHING_PROTOCOLS:
            if response.status >= 400 and not response.logged:
                logger.info("%s: refused handshake: %d %s", peer, response.status,
                            response.body.strip()[:200])
            return None
        assert request is not None   # a 101 answers only a request that parsed
        return self._upgrade(reader, writer, request, response)

    async def _read_request(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> tuple[Request | None, Response]:
        """Read the request head and decide the answer; a HandshakeError becomes a refusal."""
        request = None   # until the request parses
        try:
            request = parse_request(await self.read_head(reader, writer))
            return request, self._route(request)
        except HandshakeError as error:
            return request, error.as_response()

    async def read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        """The request head's lines (PublicServer also spots a TLS client, and traces)."""
        return await read_http_head(reader)

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
        return switching_protocols(key, PerMessageDeflate.answer(offers) if self.compression else None)

    def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: Request, response: Response) -> Connection:
        """The 101 is sent: from here on, frames."""
        agreed = dict(response.headers).get("Sec-WebSocket-Extensions")
        return self.new_connection(reader, writer, is_client=False, path=request.target,
                                   max_size=self.max_size, close_timeout=self.close_timeout,
                                   deflate=PerMessageDeflate.agreed(agreed, is_client=False))

    def new_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       **options: typing.Any) -> Connection:
        """The Connection for a finished handshake (PublicServer makes a FastConnection)."""
        return Connection(reader, writer, **options)

    async def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down") -> None:
        """Stop listening, close every connection with ``code``, wait for them (bounded)."""
        if self._server is not None:
            self._server.close()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for held in list(self._tasks.values()):
            if isinstance(held, Connection):
                held.close_nowait(code, reason)
            else:   # still in its handshake: its read ends (a cancelled task would log a
                held.transport.abort()   # traceback on Python 3.11-3.12)
        tasks = list(self._tasks)
        if tasks:
            # Each close frame carries its own abort timer, so this wait is
            # bounded; the margin covers a handler still tidying up.
            _, pending = await asyncio.wait(tasks, timeout=self.close_timeout + 1)
            for task in pending:
                task.cancel()
            await asyncio.wait(tasks)


async def serve(handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False,
                **options: typing.Any) -> WebSocketServer:
    """Start a WebSocket server; ``options`` go to PublicServer (section 10).

    ``reuse_port`` (SO_REUSEPORT) lets several processes listen on one port;
    the kernel spreads new connections over them.
    """
    server = PublicServer(handler, **options)
    await server.start(host, port, ssl_context, reuse_port)
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
        try:
            reader, writer = await asyncio.open_connection(
                target.host, target.port, ssl=ssl_context if target.secure else None,
                limit=READ_BUFFER_LIMIT)
        except OSError as error:   # an ssl.SSLError too: it is a kind of OSError
            if target.secure:
                check_speaks_tls(error, target)   # "is it ws://?" rather than OpenSSL's words
            raise
        try:
            deflate = await client_handshake(reader, writer, target, origin, compression)
        except BaseException:
            writer.close()
            raise
        return FastConnection(reader, writer, is_client=True, path=target.resource,
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
    offer = PerMessageDeflate.CLIENT_OFFER if compression else None
    writer.write(build_request(target, key, origin, offer))
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
        # Servers say why in the body: its first line (section 10) is the reason.
        raise InvalidStatus(status, await refusal_reason(reader, headers))
    check_response(headers, key, offered_extensions=compression)
    return PerMessageDeflate.agreed(headers.get("sec-websocket-extensions"), is_client=True)


# 8. Chat room ##############################################################
#
# The application on top of the protocol, after the Ktor hands-on "Creating a
# WebSocket chat": everyone in one room, every line relayed to everyone, the
# sender included (its copy is the sender's receipt). Everything on the wire
# is a plain text line, readable in any WebSocket client (wscat, a browser
# console). What a member says always starts with "[name]", which no
# notice does, since names can't contain brackets:
#
#   [bob]: hello                          a line, the name attached by the server
#   [bob] waves                           an action (/me waves)
#   [bob → alice]: psst                   a private message (/msg alice psst)
#   (history 2026-12-02T09:15:00Z) [bob]: earlier   the recent past, its time in UTC
#   * alice joined                        a notice from the server
#   * You are connected as bob! ...       the greeting: always the first frame


# 8.1 Lines on the wire ######################################################

CHAT_PATH = "/chat"

#: A newcomer sees the last 50 lines, and at most 1 MiB of them: a few huge
#: lines must not make every newcomer's replay a flood (--history-bytes).
HISTORY_SIZE = 50
HISTORY_BYTES = 2**20

#: Announcing each arrival to every member costs N² writes while a room
#: fills; past this size joins and leaves are not announced, as in big IRC
#: channels. ``--announce-limit`` changes it.
ANNOUNCE_LIMIT = 100

#: What the server adds around a member's text when it relays it, at most:
#: a client must accept messages this much larger than the server's limit.
RELAY_OVERHEAD = 1024

#: The first frame a member receives, in sentences a person reads and a
#: client parses (see parse_greeting): who you are, the limits, the private
#: token that gets your name back after a dropped connection, and how many
#: history lines follow.
#: Its first sentences, up to " Limits: ", are all a person is shown: short
#: enough that with a time and a mark they fit 80 columns ("Type /help for
#: commands." made them 82).
GREETING = ("* You are connected as {name}! There {count}. Try /help. "
            "Limits: lines of up to {max_size} bytes; {rate}. "
            "Your resume token is {token} (keep it to yourself). The room has {delivered} of "
            "yours. {history} of history follow.")

#: Close reason for a connection whose member came back on a new one.
REPLACED_REASON = "replaced by your new connection"


class TryLater(ValueError):
    """A refusal that will pass (the room can't check names just now)."""

    close_code = CloseCode.TRY_AGAIN_LATER


def plural(count: int, word: str) -> str:
    """'1 line', '3 lines'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def describe_rate(rate: float, burst: int) -> str:
    """The flood limit in words; parse_greeting reads the numbers back."""
    if not rate:
        return "no rate limit"
    return f"bursts of {burst} lines, then {rate:g} per second"


#: RFC 3339 in UTC, as history lines carry it: "2026-12-02T09:15:00Z".
UTC_STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


#: 9999-12-31T23:59:59Z: the last time RFC 3339 (and utc_stamp) can write.
LAST_RFC3339_TIME = 253402300799.0


def utc_stamp(when: float) -> str:
    """'2026-12-02T09:15:00Z': an unambiguous time on the wire (RFC 3339)."""
    return time.strftime(UTC_STAMP_FORMAT, time.gmtime(when))


class LineFormat:
    """One kind of line the room sends: how the server writes it, how a client reads it."""

    __slots__ = ("template", "pattern", "_head")

    def __init__(self, template: str, pattern: str) -> None:
        self.template = template   # for str.format; a member's {text} comes last, relayed as it came
        self.pattern = pattern     # matches the start of such a line; JavaScript reads it the same way
        # The part before {text}, as a %-format: filled for every line relayed, so cheaply.
        self._head = re.sub(r"\{\w+\}", "%s", template.partition("{text}")[0].replace("%", "%%"))

    def head(self, *fields: str) -> str:
        """The line up to its {text}, the fields before it given in order: the room
        sends the text after it as the bytes that came."""
        return self._head % fields

    def match(self, line: str) -> re.Match | None:
        return re.match(self.pattern, line)


#: Every line a client tells apart, beside the pattern that tells it; the
#: terminal client and the page (which receives this table) both use them.
LINES = types.MappingProxyType({
    "said": LineFormat("[{name}]: {text}", r"^\[([^\]\s]+)\]: "),
    "action": LineFormat("[{name}] {text}", r"^\[([^\]\s]+)\] (?!→)"),
    "private": LineFormat("[{sender} → {recipient}]: {text}", r"^\[([^\]\s]+) → ([^\]\s]+)\]: "),
    "history": LineFormat("(history {stamp}) {text}", r"^\(history (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\) "),
    "notice": LineFormat("* {text}", r"^\* "),
    "renamed": LineFormat("* {old} is now known as {new}", r"^\* (\S+) is now known as (\S+)$"),
})


#: How a client reads the greeting back; JavaScript's regular expressions
#: accept the same patterns, so the page uses them too.
GREETING_PATTERNS = types.MappingProxyType({
    "name": r"^\* You are connected as (\S+)! ",
    "max_size": r"lines of up to (\d+) bytes",
    "burst": r"bursts of (\d+) lines",
    "rate": r"then ([\d.]+) per second",
    "token": r"Your resume token is (\S+) ",
    "delivered": r"The room has (\d+) lines? of yours",
    "history": r"(\d+) lines? of history follow",
})


class Greeting(typing.NamedTuple):
    """What a client learns from the greeting; None where the server didn't say."""

    name: str
    max_size: int | None
    burst: int | None
    rate: float | None
    token: str | None
    delivered: int | None   # how many of this member's lines the room has relayed
    history: int


def parse_greeting(line: str) -> Greeting | None:
    """The greeting's facts, or None if ``line`` is not a greeting."""
    found = {field: re.search(pattern, line) for field, pattern in GREETING_PATTERNS.items()}
    if not found["name"]:
        return None

    def value(field: str, kind: Callable[[str], typing.Any] = str) -> typing.Any:
        match = found[field]
        return kind(match[1]) if match else None

    try:
        return Greeting(value("name"), value("max_size", int), value("burst", int),
                        value("rate", float), value("token"), value("delivered", int),
                        value("history", int) or 0)
    except ValueError:   # digits Python can't take as a number ("1.2.3", 5000 of them)
        return None


# 8.2 Names ##################################################################
#
# Two names are the same name if people would read them as the same. Python
# compares code points, so "Alice", "ALICE" and "Ａｌｉｃｅ" (fullwidth) would
# be three members; name_key() maps them to one key: NFKC folds compatibility
# forms (fullwidth letters, ligatures such as "ﬁ", superscripts), case folding
# folds case ("ß" and "SS" both become "ss"). The room keeps members by key,
# shows the name as typed, and /msg looks its recipient up by key too.
#
# check_name() refuses what the key can't fold away (Unicode TR #39,
# https://www.unicode.org/reports/tr39/):
#   - invisible and format characters, which make "alice" and "alice" + ZWJ
#     two names that look alike, or (bidi controls) reorder a name on screen;
#   - letters from more than one script, such as a Cyrillic "а" in "аlice",
#     the classic look-alike; TR #39's "highly restrictive" level allows only
#     the mixes that languages need: Latin with Han and Japanese kana, with
#     Han and Bopomofo, with Han and Hangul. Digits, punctuation, symbols and
#     marks belong to no script ("Common") and go with any.
#
# What this does NOT protect against:
#   - whole-script look-alikes: "асе" written all in Cyrillic is one script
#     and passes, yet reads as Latin "ace"; so do Greek capitals "ΑΒΕ";
#   - look-alikes within a script or among Common characters: "rn" and "m",
#     "l", "I" and "1", "0" and "O", U+02BC "ʼ" and "'"; and Han against
#     kana ("口" and "ロ"), which the Japanese mix has to allow.
#   Catching these needs TR #39's confusables data (a "skeleton" per name,
#   over 6,000 mappings), too much to carry in one file.
#   - The script test reads letters' names (there is no Script property), an
#     approximation; and a letter newer than this Python's Unicode is refused.

#: Names fit on a line and can't be confused with the "[name]:" framing.
MAX_NAME_LENGTH = 32

#: Invisible characters that are not format characters (those are refused by
#: category): Unicode's Default_Ignorable_Code_Point letters and marks, and
#: U+2800 BRAILLE PATTERN BLANK, a favourite for "empty" names elsewhere.
INVISIBLE_IN_NAMES = frozenset(
    "\u034f"            # COMBINING GRAPHEME JOINER
    "\u115f\u1160"      # HANGUL CHOSEONG / JUNGSEONG FILLER
    "\u17b4\u17b5"      # KHMER VOWEL INHERENT AQ / AA
    "\u180b\u180c\u180d\u180f"   # MONGOLIAN FREE VARIATION SELECTORs
    "\u2800"            # BRAILLE PATTERN BLANK
    "\u3164\uffa0"      # HANGUL FILLER, HALFWIDTH HANGUL FILLER
)

#: Variation selectors (VS1-VS16, VS17-VS256): invisible, refused in names.
VARIATION_SELECTORS = (range(0xFE00, 0xFE10), range(0xE0100, 0xE01F0))

#: Letter names that don't begin with their script's name, and the script.
SCRIPT_ALIASES = types.MappingProxyType({
    "CJK": "HAN", "IDEOGRAPHIC": "HAN",   # CJK UNIFIED IDEOGRAPH-4E00, 々
    "HENTAIGANA": "HIRAGANA",             # historic hiragana
    "ROMAN": "LATIN", "TURNED": "LATIN",  # ↄ ROMAN NUMERAL REVERSED..., Ⅎ TURNED CAPITAL F
})

#: First words of letters that belong to no one script: modifier letters
#: (ʼ), the kana length mark ー, and a few signs shared by scripts.
COMMON_LETTER_WORDS = frozenset({
    "MODIFIER", "KATAKANA-HIRAGANA", "CARON", "MASU", "VEDIC", "VERTICAL"})

#: Scripts whose names share a first word: OLD ITALIC, OLD PERMIC, TAI LE, TAI THAM ...
TWO_WORD_SCRIPTS = frozenset({"OLD", "TAI", "LINEAR", "INSCRIPTIONAL"})

#: TR #39 §5.2 "highly restrictive": one script, or a subset of one of these.
ALLOWED_SCRIPT_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),   # Japanese
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),               # Chinese
    frozenset({"LATIN", "HAN", "HANGUL"}),                 # Korean
)


def name_key(name: str) -> str:
    """The form in which two names are compared: NFKC, case-folded, NFKC again."""
    # Case folding can undo normalisation (U+01F0 "ǰ" folds to "j" + U+030C),
    # so normalise again. That is Unicode's NFKC_Casefold (§3.13, D145) but
    # for dropping default-ignorable characters, which check_name() refuses.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def describe_character(char: str) -> str:
    """'U+200D ZERO WIDTH JOINER': a character named safely, in ASCII."""
    return f"U+{ord(char):04X} {unicodedata.name(char, '')}".rstrip()


def is_invisible_or_control(char: str) -> bool:
    """True for a character that shows nothing, or changes how others show."""
    # Stricter than printable(): a chat line may carry joiners and variation
    # selectors, but a name must be told apart from others at a glance.
    code = ord(char)
    return (unicodedata.category(char) in HIDDEN_CATEGORIES or char in INVISIBLE_IN_NAMES
            or any(code in block for block in VARIATION_SELECTORS))


def script_of(char: str) -> str | None:
    """The script of a letter, read from its Unicode name; None for anything else."""
    # Checked against Unicode's Script property for every letter Python 3.11
    # knows (in NFKC form): it differs only for about ten signs shared by
    # scripts, and for Tangut ideographs, which Python can't name.
    if not unicodedata.category(char).startswith("L"):
        return None   # digits, punctuation, symbols, marks: "Common" or "Inherited"
    words = unicodedata.name(char, "").split()
    if not words or words[0] in COMMON_LETTER_WORDS:
        return None   # the few letters Python has no name for (Tangut ideographs) too
    if words[0] in TWO_WORD_SCRIPTS and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return SCRIPT_ALIASES.get(words[0], words[0])


def scripts_in(text: str) -> list[str]:
    """The scripts of the letters in ``text``, in order of first appearance."""
    scripts = (script_of(char) for char in text)
    return list(dict.fromkeys(script for script in scripts if script is not None))


def mixes_scripts(scripts: list[str]) -> bool:
    """True if the scripts are more than one, and not a mix that a language needs."""
    return len(scripts) > 1 and not any(mix.issuperset(scripts) for mix in ALLOWED_SCRIPT_MIXES)


def listing(words: list[str]) -> str:
    """'Latin, Greek and Cyrillic' for a person to read."""
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} and {words[-1]}"


def check_name(raw: str) -> str:
    """The name as it will be shown (stripped, NFC), or ValueError saying why not."""
    # NFC changes no glyph, only how an accented letter is spelt in code
    # points, so the length limit counts "é" once however it was typed.
    name = unicodedata.normalize("NFC", raw.strip())
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"a name must have 1 to {MAX_NAME_LENGTH} characters")
    for char in name:
        if is_invisible_or_control(char):
            raise ValueError(f"a name can't contain control or invisible characters "
                             f"({describe_character(char)})")
        # /msg NAME TEXT needs names without spaces.
        if char.isspace():
            raise ValueError("a name can't contain spaces")
    # "[" and "]" would blur "[name]:"; so would "［" (fullwidth), which NFKC makes "[".
    if any(bracket in unicodedata.normalize("NFKC", name) for bracket in "[]"):
        raise ValueError("a name can't contain [ or ]")
    if unicodedata.category(name[0]).startswith("M"):
        raise ValueError(f"a name can't start with a combining mark ({describe_character(name[0])})")
    # Scripts are read on the NFKC form: fullwidth "Ａ" is a Latin letter there.
    scripts = scripts_in(unicodedata.normalize("NFKC", name))
    if mixes_scripts(scripts):
        # Only now is the name quoted: it has passed every character check, so
        # the message is safe for a log line or a close reason.
        raise ValueError(f"a name can't mix scripts "
                         f"({listing([script.title() for script in scripts])}): {name}")
    return name


# 8.3 Commands ###############################################################
#
# IRC style: a line that starts with "/" is a command, any other line is
# chat. The server parses what every client sends (a browser or wscat sends
# whatever was typed); the terminal client parses the same line first, to
# refuse an unknown command without sending it, and then sends the line
# unchanged. Both call parse_line(), so the rule lives in one place:
#
#   "hello"          ChatLine("hello")
#   "/WHO"           Command("who", "")          names are case-insensitive
#   "/msg bob  hi"   Command("msg", "bob  hi")   the argument, stripped
#   "//etc is full"  ChatLine("/etc is full")    "//" sends a line that starts with "/"
#   "  /who"         ChatLine("  /who")          as in IRC clients: a space first means chat
#   "/ hi", "/"      ChatLine(...)               a slash and no name is no command
#   "", "   "        None                        nothing to send
#   "/foo"           ValueError("unknown command /foo — /help lists them")
#   "/msg bob"       ValueError("usage: /msg NAME TEXT")

#: Every command: its usage line and what it does, in the order /help lists them.
#: The usage line is also the rule: each upper-case word is a required argument,
#: a [bracketed] one is optional, and the last one takes the rest of the line.
COMMANDS = types.MappingProxyType({
    "help": ("/help", "list these commands"),
    "nick": ("/nick NEW", "change your name to NEW"),
    "me": ("/me ACTION", "tell the room what you are doing (* bob waves)"),
    "who": ("/who", "list who is here"),
    "msg": ("/msg NAME TEXT", "send TEXT to NAME alone"),
    "quit": ("/quit [reason]", "leave the chat, saying why if you like"),
})

#: A line that starts with this is chat text that starts with "/".
LITERAL_SLASH = "//"

#: An unknown command is quoted back at most this long: it could be a whole message.
MAX_QUOTED_COMMAND = 32


class Command(typing.NamedTuple):
    """A slash command: its name (lower case, no slash) and the rest of the line."""

    name: str
    argument: str


class ChatLine(typing.NamedTuple):
    """A line for the room, to relay as it is."""

    text: str


def required_arguments(usage: str) -> int:
    """How many arguments a usage line asks for: '/msg NAME TEXT' -> 2."""
    return sum(1 for word in usage.split()[1:] if not word.startswith("["))


def parse_line(text: str) -> Command | ChatLine | None:
    """What a typed line means: a command, chat for the room, or None for nothing.

    Raises ValueError, with a reply for the sender, for an unknown command or
    missing arguments; such a line is not sent to anyone.
    """
    if not text.strip():
        return None
    if text.startswith(LITERAL_SLASH):
        return ChatLine(text[1:])
    # A command starts right at the slash: " /who" and "/ hi" are chat.
    if not text.startswith("/") or len(text) == 1 or text[1].isspace():
        return ChatLine(text)
    word, *rest = text[1:].split(maxsplit=1)
    name = word.lower()
    if name not in COMMANDS:
        quoted = word if len(word) <= MAX_QUOTED_COMMAND else word[:MAX_QUOTED_COMMAND] + "…"
        raise ValueError(f"unknown command /{quoted} — /help lists them")
    argument = rest[0].strip() if rest else ""
    usage = COMMANDS[name][0]
    if len(argument.split()) < required_arguments(usage):
        raise ValueError(f"usage: {usage}")
    return Command(name, argument)


def relayed_as_is(line: bytes) -> bool:
    """Whether parse_line() would take this UTF-8 line for chat, unchanged.

    It does whenever the first character is neither "/" nor a space, so the
    room can tell from that character alone, and relay most lines as the
    bytes they came in without decoding them (ChatRoom.on_text).
    """
    first = line[:4].decode("utf-8", "ignore")[:1]   # 4 bytes hold one character whole
    return first not in ("", "/") and not first.isspace()


def help_lines() -> list[str]:
    """The reply to /help, one notice per line (a message is one line on screen)."""
    rows = [*COMMANDS.values(), (f"{LITERAL_SLASH}text", "send a line that starts with /")]
    width = max(len(usage) for usage, _ in rows)
    return [f"* {usage:<{width}}  {meaning}" for usage, meaning in rows]


# 8.4 Flood control ##########################################################

#: Flood control, as IRC servers do it (RFC 1459 §8.10): a burst of 20 lines,
#: then 2 per second. Lines past that are not refused but held, and relayed
#: at the rate; only a member whose held lines pass MAX_HELD_LINES is
#: disconnected (1008), so memory stays bounded.
RATE_BURST = 20
RATE_PER_SECOND = 2.0
MAX_HELD_LINES = 100


class TokenBucket:
    """Rate limiting: ``burst`` tokens, refilled at ``rate`` per second, one per line."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        """Spend a token if there is one."""
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait_time(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


class Pacer:
    """One member's flood control: lines past the burst wait, and go on at the rate.

    The member's connection is read all along (pings, pongs and a close are
    answered at once); only the relaying of its lines is delayed, in order.
    Nobody else waits: the held lines are this member's alone.
    """

    def __init__(self, bucket: TokenBucket, deliver: Callable[[bytes], None]) -> None:
        self.bucket = bucket
        self.deliver = deliver
        self.held: collections.deque[bytes] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, text: bytes) -> None:
        """Relay now if the rate allows and nothing is waiting; else hold."""
        if not self.held and self.bucket.take():
            self.deliver(text)
            return
        self.held.append(text)
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.bucket.wait_time(), self._release)

    def _release(self) -> None:
        self._timer = None
        while self.held and self.bucket.take():
            self.deliver(self.held.popleft())
        if self.held:
            self._schedule()

    def stop(self) -> None:
        """The member is gone: what it still held is dropped with it."""
        if self._timer is not None:
            self._timer.cancel()


# 8.5 The room ###############################################################

def requested_name(conn: Connection) -> tuple[str | None, str]:
    """The name a newcomer asked for (checked; None for "pick one") and the resume token it offered."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(conn.path).query)
    name = check_name(query["name"][0]) if "name" in query else None
    return name, query.get("resume", [""])[0]


def requested_history(path: str) -> int | None:
    """How many lines of history a newcomer asked for (?history=N; 0: none), or None: all kept.

    A script that joins to send lines, or to ask /who, has no use for the
    past, and would have to tell it from the answers it waits for.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    if "history" not in query:
        return None
    text = query["history"][0]
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise ValueError(f"history={text} is not a number of lines (0 or more)")
    return int(text)


def name_taken(name: str) -> str:
    """The refusal of a name someone else has; clients recognise it (is_name_refusal)."""
    return f"the name {name} is taken; pick another"


def private_line(sender: str, recipient: str, text: str) -> str:
    """What /msg delivers, to the recipient and (as a receipt) the sender."""
    return LINES["private"].template.format(sender=sender, recipient=recipient, text=text)


@dataclasses.dataclass(eq=False, slots=True)   # slots: one per member, kept small
class Member:
    """Someone in the room: the name others see, the connection, the resume token."""

    name: str
    conn: Connection
    token: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(16))
    pacer: Pacer | None = None
    quit_reason: str = ""
    lines: int = 0   # relayed from this member: what its receipts count (see DeliveryLedger)


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


def utf8(line: str | bytes) -> bytes:
    """A line to send: a str is encoded; bytes are a member's text, UTF-8 already."""
    return line.encode("utf-8") if isinstance(line, str) else line


class Gate:
    """What a request gets before the upgrade: the page, a refusal, or on to the room."""

    def __init__(self, allowed_origins: Collection[str] = (), allowed_hosts: Collection[str] = (),
                 secure: bool = False) -> None:
        self.allowed_origins = {origin.lower().rstrip("/") for origin in allowed_origins}
        own_name = socket.gethostname().lower()
        self.allowed_hosts = {"localhost", own_name, own_name.partition(".")[0]} | {
            host.lower().rstrip(".") for host in allowed_hosts}
        self.secure = secure
        page()   # built now, once a process (0.2-0.5 s), not in a stall of the room
                 # when a browser first asks

    def process_request(self, request: Request) -> Response | None:
        """Serve the page at /, refuse unknown hosts, other paths and foreign origins, upgrade /chat."""
        host = request.headers.get("host", "")
        if not self.host_allowed(host):
            return host_refusal(host)
        if request.path == "/" and not wants_upgrade(request.headers):
            return Response(http.HTTPStatus.OK, page(), content_type="text/html; charset=utf-8")
        if request.path != CHAT_PATH:
            return Response(http.HTTPStatus.NOT_FOUND, "not found: the chat is at /chat, the page at /\n")
        try:
            requested_history(request.target)
        except ValueError as error:
            return Response(http.HTTPStatus.BAD_REQUEST, f"{error}\n")
        origin = request.headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("host", "")):
            return Response(http.HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed here\n")
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        """RFC 6455 §10.2: browsers say which site opened the socket; accept only ours.

        Else any page a member visits could speak in their name (cross-site
        WebSocket hijacking). Non-browser clients send no Origin at all.
        """
        origin = origin.lower().rstrip("/")
        own = f"{'https' if self.secure else 'http'}://{host.lower()}"
        # Host is only "ours" once it passed host_allowed: a rebinding page
        # chooses both the Origin and the Host its browser sends.
        return origin in self.allowed_origins or (origin == own and self.host_allowed(host))

    def host_allowed(self, host: str) -> bool:
        """Guard against DNS rebinding: answer only to names we know, or to addresses.

        A page on evil.example can make its name resolve to 127.0.0.1 after
        it loaded; its scripts then reach us as its own site, past the
        same-origin rule and our Origin check. The Host header gives them
        away: an IP literal, localhost, this machine's name and the names
        given with --allow-host ("*": any) are all we answer to.
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


class History:
    """What a newcomer is shown of the recent past: (time, parts) of the latest lines,
    at most ``maxlen`` of them and ``max_bytes`` bytes in all (0: any), the oldest
    dropped first."""

    def __init__(self, maxlen: int, max_bytes: int) -> None:
        self.maxlen, self.max_bytes = maxlen, max_bytes
        self.lines: collections.deque[tuple[float, tuple[str | bytes, ...]]] = collections.deque()
        self.size = 0   # bytes of the lines kept: a running sum, since adding them up costs

    def append(self, line: tuple[float, tuple[str | bytes, ...]]) -> None:
        self.lines.append(line)
        self.size += sum(len(utf8(part)) for part in line[1])
        while len(self.lines) > self.maxlen or (self.max_bytes and self.size > self.max_bytes):
            self.size -= sum(len(utf8(part)) for part in self.lines.popleft()[1])

    def extend(self, lines: Iterable[tuple[float, tuple[str | bytes, ...]]]) -> None:
        for line in lines:
            self.append(line)

    def __iter__(self) -> Iterator[tuple[float, tuple[str | bytes, ...]]]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)


class ChatRoom:
    """Who is here, what they said lately, and relaying it to everyone."""

    def __init__(self, *, history_size: int = HISTORY_SIZE, history_bytes: int = HISTORY_BYTES,
                 rate: float = RATE_PER_SECOND,
                 burst: int = RATE_BURST, max_held: int = MAX_HELD_LINES,
                 max_size: int = MAX_MESSAGE_SIZE, announce_limit: int = ANNOUNCE_LIMIT,
                 allowed_origins: Collection[str] = (), allowed_hosts: Collection[str] = (),
                 secure: bool = False) -> None:
        self.members: dict[str, Member] = {}   # by name_key(name): names as people read them
        # (time, parts): a line is kept in the parts it was broadcast in (see say)
        self.history = History(history_size, history_bytes)
        self.rate, self.burst, self.max_held = rate, burst, max_held
        self.max_size = max_size
        self.announce_limit = announce_limit
        self.gate = Gate(allowed_origins, allowed_hosts, secure)
        self._guest_number = 0

    def process_request(self, request: Request) -> Response | None:
        """WebSocketServer's hook, before the upgrade: the Gate decides."""
        return self.gate.process_request(request)

    # -- a member's life ---------------------------------------------------

    async def handle(self, conn: Connection) -> None:
        """The WebSocket handler: admit, relay until the member leaves, say goodbye."""
        try:
            member = await self.enter(conn)
        except ValueError as refusal:
            # Refused after the upgrade, with a close reason, rather than with
            # an HTTP error: browsers never show a page the body of a failed
            # handshake, but they do show a close frame's reason.
            self.log_refusal(conn, refusal)
            # A plain ValueError (a name refused) is a policy violation.
            code = getattr(refusal, "close_code", CloseCode.POLICY_VIOLATION)
            await conn.close(code, str(refusal))
            return
        try:
            await self.relay_messages(member)
        finally:
            self.leave(member)

    def log_refusal(self, conn: Connection, refusal: ValueError) -> None:
        """One line a newcomer turned away (a shared room logs its 1013s by the episode)."""
        logger.info("%s: refused: %s", conn.remote, refusal)

    async def enter(self, conn: Connection) -> Member:
        """Admit the newcomer; a room shared with other servers checks the name there first."""
        return self.admit(conn)

    def admit(self, conn: Connection) -> Member:
        """Give the newcomer a name, a greeting and the recent history; tell the others."""
        asked, token = requested_name(conn)
        name = asked or self.guest_name()
        held = self.members.get(name_key(name))
        if held is not None:
            return self.resume(held, conn, token)
        return self.add_member(Member(name, conn))

    def add_member(self, member: Member, *, announce: bool = True, count: int | None = None) -> Member:
        """The member is in: the others hear of it, it gets the greeting and the history."""
        if announce and len(self.members) < self.announce_limit:
            self.notice(f"* {member.name} joined")
        self.seat(member, len(self.members) + 1 if count is None else count)
        logger.info("%s: %s joined (%d here)", member.conn.remote, member.name, len(self.members))
        return member

    def resume(self, held: Member, conn: Connection, token: str) -> Member:
        """The member came back on a new connection (its old one may not know yet it is dead)."""
        if not secrets.compare_digest(token.encode(), held.token.encode()):
            raise ValueError(name_taken(held.name))
        held.conn.close_nowait(CloseCode.NORMAL_CLOSURE, REPLACED_REASON)
        member = dataclasses.replace(held, conn=conn, pacer=None)
        self.seat(member, len(self.members))
        logger.info("%s: %s came back", conn.remote, member.name)
        return member

    def seat(self, member: Member, count: int) -> None:
        """The member is in the room, and greeted: a greeting that fails leaves nothing behind."""
        self.members[name_key(member.name)] = member
        try:
            self.greet(member, count)
        except BaseException:
            self.leave(member)
            raise

    def greet(self, member: Member, count: int) -> None:
        there = f"{'is' if count == 1 else 'are'} {plural(count, 'user')} here"
        history, wanted = list(self.history), requested_history(member.conn.path)   # the Gate checked it
        if wanted is not None:
            history = history[max(0, len(history) - wanted):]   # the latest, as many as asked for
        self.tell(member.conn, GREETING.format(
            name=member.name, count=there, max_size=self.max_size, token=member.token,
            rate=describe_rate(self.rate, self.burst), delivered=plural(member.lines, "line"),
            history=plural(len(history), "line")))
        for when, parts in history:
            self.tell(member.conn, LINES["history"].head(utc_stamp(when)), *parts)

    def leave(self, member: Member) -> None:
        """The member's connection is over; unless it was replaced, the member is gone."""
        if member.pacer is not None:
            member.pacer.stop()
        if self.members.get(name_key(member.name)) is not member:
            return   # it came back on a new connection: nobody left
        del self.members[name_key(member.name)]
        code = member.conn.close_code   # None if the handler failed: the server closes it next
        logger.info("%s: %s left (%s)", member.conn.remote, member.name,
                    describe_close_code(code) if code else "handler failed")
        why = member.quit_reason or (member.conn.close_rcvd.reason if member.conn.close_rcvd else "")
        if len(self.members) < self.announce_limit:
            self.notice(f"* {member.name} left" + (f": {why}" if why else ""))

    def guest_name(self) -> str:
        while True:
            self._guest_number += 1
            name = f"user{self._guest_number}"
            if name_key(name) not in self.members:
                return name

    async def relay_messages(self, member: Member) -> None:
        """Read the member's messages until the connection ends, pacing its lines.

        Text is taken as the UTF-8 bytes it came in (recv_message, checked
        already), so that a line can be relayed without being decoded.
        """
        conn = member.conn
        if self.rate:
            member.pacer = Pacer(TokenBucket(self.rate, self.burst),
                                 lambda text: self.on_text(member, text))
        while True:
            try:
                message = await conn.recv_message()
            except ConnectionClosed:
                return
            if message.opcode != Opcode.TEXT:
                conn.fail_nowait(CloseCode.UNSUPPORTED_DATA, "binary messages are not chat; send text")
            elif member.pacer is None:
                self.on_text(member, message.payload)
            else:
                member.pacer.submit(message.payload)
                if len(member.pacer.held) > self.max_held:
                    conn.fail_nowait(CloseCode.POLICY_VIOLATION, f"flooding: "
                                     f"{plural(len(member.pacer.held), 'line')} not relayed")

    # -- what members say --------------------------------------------------

    def on_text(self, member: Member, text: bytes) -> None:
        """One line from a member, in UTF-8: chat for the room, or a command."""
        if member.conn.state is not State.OPEN:
            return   # it was held by the flood control, and the member has gone since
        if relayed_as_is(text):   # most lines: never decoded, relayed as the bytes that came
            self.say(member, LINES["said"].head(member.name), text)
            return
        try:
            line = parse_line(text.decode("utf-8"))
        except ValueError as reply:
            self.tell(member.conn, f"* {reply}")
            return
        if isinstance(line, ChatLine):
            self.say(member, LINES["said"].head(member.name), line.text)
        elif line is not None:
            self.run_command(member, line)

    def run_command(self, member: Member, command: Command) -> None:
        """Each command of COMMANDS (the one table of them) is carried out by command_NAME."""
        getattr(self, f"command_{command.name}")(member, command.argument)

    def say(self, member: Member, *parts: str | bytes) -> None:
        """A member's line for everyone, kept in the history, counted for its receipts.

        The line comes in parts, its name and its text, joined only into each
        frame that carries it: a 1 MiB line is not copied into a line first.
        """
        member.lines += 1   # its copy comes back to the member like everyone's
        self.history.append((time.time(), parts))
        self.broadcast(*parts)

    def notice(self, text: str) -> None:
        """A notice for everyone (joined, left, a new name), not kept in the history."""
        self.broadcast(text)

    def command_help(self, member: Member, argument: str) -> None:
        for line in help_lines():
            self.tell(member.conn, line)

    def command_who(self, member: Member, argument: str) -> None:
        self.list_names(member, [m.name for m in self.members.values()])

    def list_names(self, member: Member, names: list[str], note: str = "") -> None:
        names = sorted(names, key=name_key)
        self.tell(member.conn, f"* {len(names)} here: {', '.join(names)}{note}")

    def command_me(self, member: Member, action: str) -> None:
        self.say(member, LINES["action"].head(member.name), action)

    def command_msg(self, member: Member, argument: str) -> None:
        recipient_name, text = argument.split(maxsplit=1)   # parse_line checked there are two
        recipient = self.members.get(name_key(recipient_name))
        if recipient is None:
            self.tell(member.conn, f"* no one named {recipient_name} is here; /who lists who is")
            return
        line = private_line(member.name, recipient.name, text)
        self.tell(recipient.conn, line)
        if recipient is not member:
            self.tell(member.conn, line)   # the sender's receipt

    def command_nick(self, member: Member, new: str) -> None:
        name = self.new_name(member, new)
        if name is not None:
            self.rename(member, name)

    def new_name(self, member: Member, new: str) -> str | None:
        """The name /nick asks for, if valid and no one else's here; else None, and the member told why."""
        try:
            name = check_name(new)
        except ValueError as refusal:
            self.tell(member.conn, f"* {refusal}")
            return None
        holder = self.members.get(name_key(name))
        if holder is not None and holder is not member:
            self.tell(member.conn, f"* {name_taken(name)}")
            return None
        return name

    def rename(self, member: Member, name: str) -> None:
        old, member.name = member.name, name
        del self.members[name_key(old)]
        self.members[name_key(name)] = member
        self.notice(LINES["renamed"].template.format(old=old, new=name))

    def command_quit(self, member: Member, reason: str) -> None:
        member.quit_reason = reason
        member.conn.close_nowait(CloseCode.NORMAL_CLOSURE, reason or "bye")

    # -- sending -----------------------------------------------------------

    def tell(self, conn: Connection, *parts: str | bytes) -> None:
        """Send one line, made of ``parts``, to one member, after what was sent to it before."""
        conn.write_frame(encode_frame(Opcode.TEXT, b"".join(map(utf8, parts))))

    def broadcast(self, *parts: str | bytes) -> None:
        """Send one line, made of ``parts``, to every member, never waiting for any of them.

        The frame is encoded once: a server's frames are unmasked, so every
        member gets the same bytes (those who agreed to compression, the same
        compressed bytes). The parts, a name and the text as it arrived, are
        joined only into the frame: a 1 MiB line is copied once. A slow reader
        only fills its own buffer (FastConnection drops it there, section 9).
        The server runs BatchedRoom's broadcast (section 9): the same bytes,
        with one system call per member per turn of the event loop.
        """
        payload = [utf8(part) for part in parts]
        frames: dict[int, bytes] = {}   # by deflate window; 0: not compressed
        for member in self.members.values():
            conn = member.conn
            window_bits = 0 if conn.deflate is None else conn.deflate.window_bits
            frame = frames.get(window_bits)
            if frame is None:
                frame = frames[window_bits] = b"".join(broadcast_frame(Opcode.TEXT, payload, window_bits))
            conn.write_frame(frame)


# 9. Serving many ###########################################################
#
# Skip this on a first reading: nothing here changes the protocol, only how
# fast it runs (and a peer that stops reading is dropped with 1008, where
# the plain Connection would buffer for it). Sections 1-8 are the protocol
# and the chat as plainly as they can be written. This is what makes the same work fast for a room of thousands;
# each piece replaces a plain one above through one name, keeps its
# interface, and is held equal to it by a test. What each gains is measured
# in the README ("Performance"):
#
#   apply_mask_fast  masks through bytes.translate, in C, not byte by byte
#   FastAssembler    lets ASCII skip the UTF-8 decoder; copies tiny frames together
#   Incoming         the peer's bytes straight from the transport: two copies fewer
#   FastConnection   serve() and connect()'s Connection: Incoming and FastAssembler,
#                    and what it sends gathered into one system call per turn of
#                    the event loop (TurnWriter), a peer that doesn't read dropped
#   BatchedRoom      the chat room, its broadcasts of one loop turn joined once
#                    (SharedFrames) and written to each member in one piece

#: READ_BUFFER_LIMIT (section 1) for frames, once the handshake is done
#: (Incoming): again about twice this at most, the bound plus one read.
#: asyncio hands over up to 256 KiB per read of the socket; a lower bound
#: would pause and resume reading around every piece of a large message.
FRAME_BUFFER_LIMIT = 256 * 1024

#: What each piece the transport hands over costs beyond its bytes: a bytes
#: object's header and its slot in a list. Incoming counts it, so a peer that
#: sends a few bytes at a time is held to FRAME_BUFFER_LIMIT too.
PIECE_OVERHEAD = sys.getsizeof(b"") + struct.calcsize("P")

#: Bytes we let pile up for a peer that doesn't read before we drop it: four
#: maximum-size messages. A slow reader costs memory, so the bound is firm.
MAX_OUTGOING_BUFFER = 4 * MAX_MESSAGE_SIZE

#: XOR_TABLES[k] maps every byte value b to b ^ k, for bytes.translate below.
XOR_TABLES = tuple(bytes(b ^ k for b in range(256)) for k in range(256))


def apply_mask_fast(data: bytes, mask_key: bytes, start: int = 0, end: int | None = None) -> bytearray:
    """apply_mask (section 4), the same XOR done four slices at a time.

    Every fourth byte is XOR-ed with the same key byte, so each of those four
    strided slices goes through a 256-byte table by bytes.translate, in C (twice
    as fast as one big-integer XOR). It reads straight out of ``data``, so a
    frame reader need not slice the payload out first.
    """
    end = len(data) if end is None else end
    out = bytearray(end - start)
    for i, key_byte in enumerate(mask_key):
        out[i::4] = data[start + i:end:4].translate(XOR_TABLES[key_byte])
    return out


class FastAssembler(MessageAssembler):
    """MessageAssembler (section 5) with two shortcuts for what peers commonly send.

    ASCII is valid UTF-8, and bytes.isascii() scans it far faster than a
    decoder does, so only other bytes, or a piece that has to finish a
    character the previous one began, go through the decoder. And pieces
    under SMALL_PIECE bytes are first copied together, so that a peer sending
    a message one byte per frame costs no more than the message, not an
    object per byte.
    """

    SMALL_PIECE = 4096

    __slots__ = ("small", "max_frames", "frames")

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.small = bytearray()   # small pieces, copied together
        self.max_frames = 0        # frames one message may take (0: any number); see FrameFlood
        self.frames = 0            # taken by the message in progress

    def start_frame(self, opcode: int, length: int) -> None:
        super().start_frame(opcode, length)
        self.frames = self.frames + 1 if opcode == Opcode.CONTINUATION else 1
        if self.max_frames and self.frames > self.max_frames:
            raise FrameFlood(f"a message in over {self.max_frames} frames")

    def add(self, chunk: bytes) -> None:
        if self.decoder is not None and not (chunk.isascii() and not self.decoder.buffer):
            self.check_utf8(chunk)
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

    def finish(self) -> Message:
        if self.small:
            self.pieces.append(self.small)
            self.small = bytearray()
        return super().finish()


class Incoming(asyncio.Protocol):
    """What the peer sends after the handshake, handed on as the transport delivers it.

    For frames a StreamReader would cost two more copies of every byte (into
    its buffer and out): a tenth of a 1 MiB message's time. So a
    FastConnection puts this in its place as the transport's protocol:
    data_received() keeps each piece as it came, read() hands over what came
    since. Writing stays with the StreamWriter's protocol, which is told what
    the transport says (flow control, the end), so drain() works as before.
    Reading pauses while more than ``limit`` bytes wait, as a StreamReader's.
    """

    __slots__ = ("transport", "limit", "held", "_pieces", "_paused", "_ended", "_waiter",
                 "_writing", "_handshake_reader")

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.Transport, limit: int) -> None:
        self.transport = transport
        self.limit = limit
        self.held = 0                        # the unread pieces' bytes, plus PIECE_OVERHEAD each
        self._pieces: list[bytes] = []       # as they came (rarely more than one: a list is smaller)
        self._paused = False                 # reading, until more than limit waits unread
        self._ended = transport.is_closing()
        self._waiter: asyncio.Future | None = None
        self._writing = transport.get_protocol()
        transport.set_protocol(self)
        # What the peer sent right behind its handshake is in the reader:
        # read first. It gets nothing more: its end comes after that.
        self._handshake_reader: asyncio.StreamReader | None = reader
        reader.feed_eof()
        self._hear_the_end_again()

    def _hear_the_end_again(self) -> None:
        """Make sure an end the old protocol was told about before the swap reaches us too."""
        # Over TCP, a FIN the reader was told about is told again, to us,
        # once reading is re-armed: a socket at its end says so to every
        # read. Over TLS the transport closed itself at the end (is_closing()
        # above), except on Python 3.10, where a TLS transport whose
        # connection is gone says so only by failing with AttributeError.
        try:
            self.transport.pause_reading()
            self.transport.resume_reading()
        except AttributeError:
            if sys.version_info >= (3, 11):
                raise   # no known cause there: let it show
            self._ended = True

    async def read(self, n: int = -1) -> bytes:
        """All the peer sent since the last read, joined; b"" once it has sent all there is.

        StreamReader's read(n) stops at ``n`` bytes; this hands over all that
        waits, which ``limit`` already bounds.
        """
        if self._handshake_reader is not None:
            data = await self._handshake_reader.read(self.limit)
            if self._paused and not self._ended:
                # That reader resumes the transport if it had paused it
                # during the handshake; pausing is ours to decide now.
                self.transport.pause_reading()
            if data:
                return data
            self._handshake_reader = None
        while not self._pieces:
            if self._ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)   # usually one: no copy
        pieces.clear()
        self.held = 0
        if self._paused and not self._ended:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- what the transport calls --------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._pieces.append(data)
        self.held += len(data) + PIECE_OVERHEAD
        if self.held > self.limit and not self._paused:
            self._paused = True
            self.transport.pause_reading()   # until read() takes what waits
        self._wake()

    def eof_received(self) -> bool | None:
        self._ended = True
        self._wake()
        # The StreamReaderProtocol answers for us: True over TCP (keep the
        # socket open to write our close frame), False over TLS (close it).
        return self._writing.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._wake()
        self._writing.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing.pause_writing()

    def resume_writing(self) -> None:
        self._writing.resume_writing()


class TracedFrameReader(FrameReader):
    """A FrameReader that logs each header it reads, for -v (only then: it costs a call a frame)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection, **options: typing.Any) -> None:
        super().__init__(**options)
        self.conn = conn

    def read_header(self) -> FrameHeader | None:
        raw = self._header_bytes()
        header = super().read_header()
        if header is not None:
            log_frame(self.conn.remote, "<<<", raw, header.length)
        return header


class SharedFrames:
    """Frames broadcast in one turn of the event loop, queued once to each member.

    The room queues one to each member and keeps appending lines to it. It is
    sealed once a member writes it, or anything is queued behind it: every
    member writes the same bytes, joined once, and nothing later overtakes it.
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


class TurnWriter:
    """The connections that queued frames in this turn of the event loop, written at its end.

    One callback per loop turn for all of them, rather than one per
    connection: a broadcast to 10,000 members would otherwise allocate
    10,000 callbacks each turn, enough to set off CPython's full garbage
    collections. A server shares one among its connections.
    """

    __slots__ = ("_dirty",)

    def __init__(self) -> None:
        self._dirty: list[FastConnection] = []

    def add(self, conn: FastConnection) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._write)
        self._dirty.append(conn)

    def _write(self) -> None:
        dirty, self._dirty = self._dirty, []   # what is queued meanwhile waits for the next turn
        for conn in dirty:
            conn._write_queued()


#: Control frames a client may send a second, in a burst of as many: keepalive
#: needs one in 20 s, and a flood of pongs nobody asked for costs a call each.
MAX_CONTROL_RATE = 100.0


class FrameFlood(ProtocolError):
    """Frames that cost us work and carry nothing (empty fragments, pongs nobody
    asked for): past a limit, the peer is dropped with 1008, so the event loop
    stays free for everyone else (``--max-frames``, ``--max-control-rate``)."""

    close_code = CloseCode.POLICY_VIOLATION


class FastConnection(Connection):
    """Connection (section 6) as serve() and connect() make it: the same protocol, faster I/O.

    What it sends goes into an outbox, written at the end of the event loop's
    turn with one system call, in the order written. Since broadcasts and
    pongs don't wait, a peer that leaves more than ``max_buffer`` bytes unread
    is dropped with 1008: it can't make us buffer without bound.
    """

    message_assembler = FastAssembler

    __slots__ = ("max_buffer", "_outbox", "_writes", "_awaited_bytes", "_control_budget")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_buffer: int = MAX_OUTGOING_BUFFER, writes: TurnWriter | None = None,
                 max_frames: int = 0, max_control_rate: float = 0, **options: typing.Any) -> None:
        super().__init__(Incoming(reader, writer.transport, FRAME_BUFFER_LIMIT), writer, **options)
        self.max_buffer = max_buffer
        self._message.max_frames = max_frames
        # Control frames a second, in bursts of as many (0: no limit).
        self._control_budget = (TokenBucket(max_control_rate, max(1, int(max_control_rate)))
                                if max_control_rate else None)
        self._outbox: list[bytes | SharedFrames] = []   # queued in this turn of the loop
        self._writes = writes or TurnWriter()   # shared with the server's other connections
        self._awaited_bytes = 0                # of frames that send() waits to drain
        if logger.isEnabledFor(logging.DEBUG):
            self._frames = TracedFrameReader(self, expect_masked=not self.is_client,
                                             extension_rsv=self._frames.extension_rsv)

    async def _on_control(self, opcode: int, payload: bytes) -> None:
        if self._control_budget is not None and not self._control_budget.take():
            raise FrameFlood(f"over {self._control_budget.rate:g} control frames a second")
        await super()._on_control(opcode, payload)

    def queue_shared(self, frames: SharedFrames) -> None:
        """Queue this turn's broadcasts (BatchedRoom): written with whatever else is queued."""
        if self.close_sent is None:   # §5.5.1: no data frame after our close frame
            self._queue(frames)

    def _write(self, frame: bytes) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            size = header_size(frame[1])
            log_frame(self.remote, ">>>", frame[:size], len(frame) - size)
        self._queue(frame)

    def _queue(self, frame: bytes | SharedFrames) -> None:
        outbox = self._outbox
        if not outbox:
            self._writes.add(self)   # written at the end of this turn of the loop
        elif isinstance(outbox[-1], SharedFrames):
            outbox[-1].seal()   # what is queued now must come after all of it
        outbox.append(frame)

    async def _drain(self, written: int) -> None:
        self._flush()   # now, so that drain() waits for this message too
        self._awaited_bytes += written
        try:
            await super()._drain(written)
        finally:
            self._awaited_bytes -= written

    def _send_close(self, code: int, reason: str = "") -> None:
        super()._send_close(code, reason)
        self._flush()   # at once: nothing queued after it may be written

    def _write_queued(self) -> None:
        """End of the loop turn: write the outbox, and drop a peer that isn't reading.

        What send() is waiting to drain doesn't count: that wait already keeps
        it in check.
        """
        self._flush()
        backlog = unsent_bytes(self.transport) - self._awaited_bytes
        # The cheap test first: this runs for every member each turn, and
        # comparing with an Enum member is a Python-level call before 3.12.
        if backlog > self.max_buffer and self.state is State.OPEN:
            self.fail_nowait(CloseCode.POLICY_VIOLATION,
                             f"too slow: over {self.max_buffer} bytes waiting to be read")

    def _flush(self) -> None:
        """Write every queued frame, in order, with one system call."""
        outbox = self._outbox
        if len(outbox) == 1:   # the usual case, taken first: it is run for every member
            data = outbox.pop()
            if isinstance(data, SharedFrames):
                data = data.seal()
        elif outbox:
            data = b"".join([item.seal() if isinstance(item, SharedFrames) else item for item in outbox])
            outbox.clear()
        else:
            return
        if not self.transport.is_closing():
            self.transport.write(data)

    def _finish(self) -> None:
        self._outbox.clear()   # no one is left to read it
        super()._finish()


class BatchedRoom(ChatRoom):
    """ChatRoom (section 8) whose broadcasts in one loop turn are joined once for everyone.

    ChatRoom.broadcast hands each line to each member: a call per line per
    member. Here the lines broadcast in one turn of the event loop go into one
    SharedFrames (one per deflate window) queued to every member, so a busy
    room costs one call and one send() per member per turn: 2.4 times the
    deliveries per second at the benchmark's fan-out (README, "Performance").
    """

    def __init__(self, **options: typing.Any) -> None:
        super().__init__(**options)
        # This turn's broadcasts while open, one SharedFrames per deflate
        # window among the members (0: uncompressed; see section 12).
        self._shared: dict[int, SharedFrames] = {}

    def add_member(self, member: Member, **options: typing.Any) -> Member:
        member = super().add_member(member, **options)
        self._shared = {}   # what was broadcast before is not for the newcomer
        return member

    def resume(self, held: Member, conn: Connection, token: str) -> Member:
        member = super().resume(held, conn, token)
        self._shared = {}   # nor for a member back on a new connection
        return member

    def broadcast(self, *parts: str | bytes) -> None:
        payload = [utf8(part) for part in parts]
        shared = self._shared
        if not shared or any(frames.sealed for frames in shared.values()):
            shared = self._shared = {}   # by window_bits; 0: not compressed
            for member in self.members.values():
                conn = member.conn
                window_bits = 0 if conn.deflate is None else conn.deflate.window_bits
                frames = shared.get(window_bits)
                if frames is None:   # made once a member takes it: else nothing would seal it
                    frames = shared[window_bits] = SharedFrames()
                conn.queue_shared(frames)
        for window_bits, frames in shared.items():
            pieces = broadcast_frame(Opcode.TEXT, payload, window_bits)
            if logger.isEnabledFor(logging.DEBUG):
                log_frame(f"all {len(self.members)}", ">>>", pieces[0], sum(map(len, pieces[1:])))
            frames.append(*pieces)


# 10. Running a server in public ############################################
#
# Skip this on a first reading too. A server on the internet meets peers
# that are not trying to chat: scripts that open hundreds of connections,
# clients that say nothing until the process runs out of file descriptors,
# browsers pointed at the wrong scheme. PublicServer, which serve() runs,
# has the defences: each a limit with its reason and a flag (README, "Limits
# and defences"). Then the client's clearer errors, and the -v trace.

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


#: New connections one address may open: a burst of 20, then 30 a minute. A
#: script that connects and leaves in a loop would fill every screen with
#: joins and leaves (2,000 a second were seen); refusing the connections, as
#: IRC servers throttle connect floods, stops it at the door, before any
#: notice, while a class of 30 behind one NAT still gets in within a minute
#: (the last ten retrying, as 503 with Retry-After asks). --connects-per-minute.
CONNECT_BURST = 20
CONNECTS_PER_MINUTE = 30.0


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
    peer must not be able to put tracebacks in our log. A real bug keeps its.

    Running out of file descriptors is the other case. When accept() fails
    with EMFILE, asyncio retries a second later (members already here chat
    on), reporting every failed attempt: thousands of lines a second. Here
    an episode gets one line when it starts and one when it ends. And since
    the descriptors are most likely held by connections that opened and said
    nothing, each retry round drops those silent for a second, so that a
    newcomer is answered within a second or two, not after 10 s.
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




class RefusalLog:
    """Refusals logged by the episode: a line when something starts being refused, and one
    when it is let in again, with the count; not one per refusal, since a script (or a
    client that retries) may try thousands of times."""

    def __init__(self) -> None:
        # Refusals in the current episode, by what is refused; none: no episode.
        self.refused: collections.Counter[typing.Hashable] = collections.Counter()

    def refuse(self, what: typing.Hashable, message: str, *args: object) -> None:
        """One more refusal of ``what``; the first of an episode is logged."""
        if not self.refused[what]:
            logger.info(message, *args)
        self.refused[what] += 1

    def let_in(self, what: typing.Hashable, message: str, *args: object) -> None:
        """``what`` is let in: an episode of refusals, if there was one, ends, and is counted."""
        refused = self.refused.pop(what, 0)
        if refused:
            logger.info(message + "; %d connection(s) refused meanwhile", *args, refused)


class AddressLimits:
    """What one IP address may hold and open: connections at once, new ones a minute.

    Each refusal is a 503 a client can act on, logged by the episode (RefusalLog).
    """

    def __init__(self, max_per_address: int | None, connects_per_minute: float) -> None:
        self.max_per_address = max_per_address           # None: no limit, nothing counted
        self.connects_per_minute = connects_per_minute   # 0: no limit
        self.held: collections.Counter[str] = collections.Counter()   # connections per address
        self.address_of: dict[asyncio.StreamWriter, str] = {}   # what each is counted against
        self.connects: dict[str, TokenBucket] = {}       # by address, least recently seen first
        self.refusals = RefusalLog()   # by (limit, address); the limit is "rate" or "held"

    def too_often(self, client: str) -> Response | None:
        """503 for a connection over the address's rate (CONNECTS_PER_MINUTE)."""
        if not self.connects_per_minute:
            return None
        # Least recently seen first: the oldest buckets are the ones full again, so
        # forgetting them loses nothing, and costs one step a connection at most.
        bucket = self.connects.pop(client, None) or TokenBucket(self.connects_per_minute / 60,
                                                                CONNECT_BURST)
        self.connects[client] = bucket
        oldest = next(iter(self.connects.values()))
        if len(self.connects) > 10_000 and (oldest.wait_time() == 0 or len(self.connects) > 100_000):
            del self.connects[next(iter(self.connects))]
        if bucket.take():
            self._let_in("rate", client, "connecting again")
            return None
        wait = math.ceil(bucket.wait_time())
        return self._refuse("rate", client, "connecting too often; refusing with 503 for now",
                            f"too many new connections from {client} (at most "
                            f"{self.connects_per_minute:g} a minute); try again in {wait} s", wait)

    def is_full(self, client: str) -> bool:
        """Does the address hold all the connections it may (count() would refuse one more)?"""
        return self.max_per_address is not None and self.held[client] >= self.max_per_address

    def count(self, writer: asyncio.StreamWriter, client: str) -> Response | None:
        """Count the connection against its address; 503 for one too many."""
        if self.max_per_address is None:
            return None
        if self.is_full(client):
            return self._refuse("held", client, f"at its limit of {self.max_per_address} connection(s); "
                                "refusing more with 503 until one closes",
                                f"too many connections from {client} (at most "
                                f"{self.max_per_address} per address); try again later", 30)
        self.address_of[writer] = client
        self.held[client] += 1
        return None

    def uncount(self, writer: asyncio.StreamWriter) -> None:
        """The connection is over (or never got in): it no longer counts."""
        client = self.address_of.pop(writer, None)
        if client is not None:
            self.held[client] -= 1
            if not self.held[client]:
                del self.held[client]   # don't keep every address ever seen
            self._let_in("held", client, "below its limit again")

    def _refuse(self, limit: str, client: str, why: str, reason: str, retry_after: int) -> Response:
        self.refusals.refuse((limit, client), "%s: %s", client, why)
        return Response(http.HTTPStatus.SERVICE_UNAVAILABLE, reason + "\n",
                        (("Retry-After", str(retry_after)),), logged=True)

    def _let_in(self, limit: str, client: str, how: str) -> None:
        self.refusals.let_in((limit, client), "%s: %s", client, how)


def tls_failure_words(error: OSError) -> str:
    """Why a client's TLS handshake failed, for the log."""
    if isinstance(error, ssl.SSLError):
        return ssl_error_words(error)
    if isinstance(error, ConnectionResetError):   # what a client that rejects our certificate does
        return "the client hung up (did it reject our certificate?)"
    return str(error) or type(error).__name__     # "SSL handshake is taking longer than 10 seconds…"


class PublicServer(WebSocketServer):
    """WebSocketServer with the defences above, and FastConnections (section 9); serve() runs it.

    A connection counts against its address (AddressLimits) from the moment
    TCP connects; behind a reverse proxy in ``trusted_proxies``, the address
    it forwards in X-Forwarded-For counts instead, from its request on.
    """

    def __init__(self, handler: Handler, *, max_buffer: int = MAX_OUTGOING_BUFFER,
                 max_per_address: int | None = None, trusted_proxies: Collection[str] = (),
                 max_frames: int = 0, max_control_rate: float = 0, connects_per_minute: float = 0,
                 **options: typing.Any) -> None:
        super().__init__(handler, **options)
        self.max_buffer = max_buffer
        self.frame_limits = dict(max_frames=max_frames, max_control_rate=max_control_rate)
        self.limits = AddressLimits(max_per_address, connects_per_minute)
        self.trusted_proxies = {canonical_address(proxy) for proxy in trusted_proxies}
        self._writes = TurnWriter()   # one end-of-turn write callback for all connections
        self._loop_errors: LoopErrorLog | None = None
        self._handshaking: dict[asyncio.StreamWriter, float] = {}   # when each began
        self._tls: ssl.SSLContext | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:   # unless the application chose its own
            loop.set_exception_handler(LoopErrorLog())
        handler = loop.get_exception_handler()
        if isinstance(handler, LoopErrorLog):
            self._loop_errors = handler
            handler.servers.add(self)
        if ssl_context is not None:   # TLS is done here, not by asyncio: each connection
            # starts in _serve_tls instead (WebSocketServer.start hands self._serve_tcp to asyncio)
            self._tls, self._serve_tcp = ssl_context, self._serve_tls
        await super().start(host, port, None, reuse_port)

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A TLS connection: the TLS handshake, then everything as over plain TCP.

        asyncio's own TLS (start_server(ssl=...)) hides a connection until its
        TLS handshake is done: it could not be counted against its address,
        dropped when descriptors run out, or logged when it fails (a client
        that rejects our certificate). Done here, it is all of these, as a
        plain connection is from its first byte.
        """
        writer.transport.pause_reading()   # before a byte reaches the plain reader: TLS first
        task = asyncio.current_task()
        self._tasks[task] = writer         # server.close() aborts it too
        try:
            tls = await self._tls_handshake(writer)
        finally:
            del self._tasks[task]
        if tls is None:
            writer.close()
        else:
            await super()._serve_tcp(*tls)

    async def _tls_handshake(self, writer: asyncio.StreamWriter) -> tuple[asyncio.StreamReader,
                                                                          asyncio.StreamWriter] | None:
        """Reader and writer over TLS, or None (logged) if the TLS handshake failed."""
        loop = asyncio.get_running_loop()
        if self._loop_errors is not None:
            self._loop_errors.accepted(loop.time())
        peer = peer_address(writer)
        over = peer not in self.trusted_proxies and self.limits.is_full(peer)
        if not over and peer not in self.trusted_proxies:
            self.limits.count(writer, peer)   # within the limit; the one over it is refused once,
        self._handshaking[writer] = loop.time()   # with its 503, in _handshake
        reader = asyncio.StreamReader(limit=READ_BUFFER_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:   # over its address's limit: a second for TLS, then the 503 (_handshake)
            transport = await loop.start_tls(
                writer.transport, protocol, self._tls, server_side=True,
                ssl_handshake_timeout=SILENT_WHEN_SHORT if over else self.handshake_timeout)
        except OSError as error:   # ssl.SSLError, a reset, a timeout (ConnectionAbortedError)
            logger.info("%s: TLS handshake failed: %s", format_peer(writer), tls_failure_words(error))
            return None
        finally:
            del self._handshaking[writer]
            self.limits.uncount(writer)   # counted again over TLS, from its request (_handshake)
        if transport is None:   # aborted: out of descriptors, or the server closing
            return None
        protocol.connection_made(transport)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> Connection | None:
        now = asyncio.get_running_loop().time()
        if self._loop_errors is not None:
            self._loop_errors.accepted(now)
        peer = peer_address(writer)
        refusal = None if peer in self.trusted_proxies else self.limits.count(writer, peer)
        if refusal is not None:
            await self._refuse_soon(reader, writer, refusal)
            return None
        self._handshaking[writer] = now
        conn = None
        try:
            conn = await super()._handshake(reader, writer)
            return conn
        finally:
            del self._handshaking[writer]
            if conn is None:
                self.limits.uncount(writer)

    async def _refuse_soon(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           refusal: Response) -> None:
        """Answer an address over its limit once its request is read (closing on unread
        bytes could reset the connection before our answer), or drop it after a second."""
        with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError, OSError,
                                 HandshakeError):
            await asyncio.wait_for(read_http_head(reader), SILENT_WHEN_SHORT)
            writer.write(serialize_response(refusal))

    async def read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[bytes]:
        lines = await read_request_head(reader)
        if logger.isEnabledFor(logging.DEBUG):
            log_head(format_peer(writer), "<<<", b"\r\n".join(lines))
        return lines

    async def _read_request(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> tuple[Request | None, Response]:
        """As WebSocketServer's, but a bad X-Forwarded-For is a 400, and an upgrade
        too many or too often for the address a 503."""
        request, response = await super()._read_request(reader, writer)
        try:
            client = self._client_address(writer, request) if request else ""
        except HandshakeError as error:
            return request, error.as_response()
        if response.status != http.HTTPStatus.SWITCHING_PROTOCOLS:
            return request, response   # a page or a refusal: no upgrade to charge
        refusal = self.limits.too_often(client)
        if refusal is None and peer_address(writer) in self.trusted_proxies:
            refusal = self.limits.count(writer, client)   # not counted when the proxy connected
        return request, refusal or response

    def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: Request, response: Response) -> Connection:
        """The Connection, counted against its client's address."""
        if logger.isEnabledFor(logging.DEBUG):
            log_head(format_peer(writer), ">>>", serialize_response(response))
        conn = super()._upgrade(reader, writer, request, response)
        client = self._client_address(writer, request)   # it passed in _read_request
        if client != peer_address(writer):
            conn.remote = f"{client} via {conn.remote}"   # the address a trusted proxy forwarded
        return conn

    def new_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       **options: typing.Any) -> Connection:
        return FastConnection(reader, writer, max_buffer=self.max_buffer, writes=self._writes,
                              **self.frame_limits, **options)

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

    def _release(self, conn: Connection) -> None:
        self.limits.uncount(conn.writer)

    def drop_silent_handshakes(self, now: float) -> int:
        """Out of descriptors: abort the connections silent in their handshake for a second."""
        silent = [writer for writer, started in self._handshaking.items()
                  if now - started > SILENT_WHEN_SHORT]
        for writer in silent:
            writer.transport.abort()
        return len(silent)


# What the client tells a person when a handshake fails, and the -v trace.

#: What OpenSSL says when what comes back is not TLS at all (a plain HTTP
#: answer, or nothing): the sign of a wss:// URL for a ws:// server.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                             "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_EOF_WHILE_READING"})


def check_speaks_tls(error: OSError, target: WebSocketURI) -> None:
    """connect()'s TLS handshake failed: if the server doesn't speak TLS (rather than,
    say, its certificate being refused), say so in words."""
    if isinstance(error, ssl.SSLError):
        not_tls = isinstance(error, ssl.SSLEOFError) or error.reason in NOT_TLS_REASONS
    else:
        not_tls = isinstance(error, ConnectionResetError)
    if not_tls:
        raise HandshakeError(http.HTTPStatus.BAD_GATEWAY, f"the server at wss://"
                             f"{target.host_header} did not answer TLS — is it ws://?") from error


async def refusal_reason(reader: asyncio.StreamReader, headers: dict[str, str]) -> str:
    """The first line of an error response's body (at most 4 KiB): servers put the reason there."""
    try:
        length = min(int(headers.get("content-length", "0")), 4096)
        body = await reader.readexactly(length)
    except (ValueError, asyncio.IncompleteReadError, OSError):
        return ""
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else ""


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
    """The -v trace of a handshake's HTTP head, one line per header, escaped.

    A resume token in the request line is replaced by "…": it is a secret.
    """
    text = re.sub(r"([?&]resume=)[^&\s]+", r"\1…", head.decode("latin-1"))
    lines = [printable(line) for line in text.strip().split("\r\n")]
    logger.debug("%s %s %s", who, direction, Shown("\n    ".join(lines)))


# 11. Showing untrusted text ################################################
#
# Whatever a peer sends may end up on a screen: a chat client's, or an
# operator's reading the log. One definition, printable(), decides how it is
# shown, for the log (through EscapeInLogs) and the terminal client.

#: Categories that are escaped unless kept below: controls (C0, DEL, C1),
#: format characters (bidi overrides and isolates among them), surrogates,
#: private use, unassigned, and the line and paragraph separators.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

#: Format characters that only join glyphs: ZWNJ (Persian, Indic scripts)
#: and ZWJ (emoji sequences such as 👩‍💻, Indic conjuncts).
GLYPH_JOINERS = frozenset("\u200c\u200d")

#: An emoji tag sequence (UTS #51 ED-14a), the subdivision flags such as 🏴󠁧󠁢󠁳󠁣󠁴󠁿:
#: a black flag, tag letters, CANCEL TAG. Tags anywhere else are invisible
#: ASCII that a terminal doesn't show, so they are escaped.
FLAG_TAG_SEQUENCE = re.compile("\U0001F3F4[\U000E0020-\U000E007E]+\U000E007F")


def is_hidden(char: str) -> bool:
    """Is ``char`` one that printable() escapes (unless inside a flag sequence)?"""
    return unicodedata.category(char) in HIDDEN_CATEGORIES and char not in GLYPH_JOINERS


def escape_hidden(text: str) -> str:
    """``text`` with every hidden character escaped."""
    return "".join(char.encode("unicode_escape").decode("ascii") if is_hidden(char) else char
                   for char in text)


def printable(text: str) -> str:
    """Escape whatever could drive a terminal or disguise a line; leave ordinary text alone.

    An escape sequence could clear the screen or move the cursor; a newline,
    U+2028 or a bidi override (U+202E) could fake a line or reorder it. So
    every control (C0, DEL, C1) and format character, line and paragraph
    separator, surrogate, private-use and unassigned character (unknown to
    this Python's Unicode) is shown as its Python escape (\\x1b, \\n, \\u202e).

    Kept, because they only shape glyphs: ZWNJ and ZWJ (👩‍💻), variation
    selectors (🏳️‍🌈), combining marks, tag characters inside a flag sequence
    (🏴󠁧󠁢󠁳󠁣󠁴󠁿), and spaces other than U+0020 (ordinary in French or Japanese).
    U+200B ZERO WIDTH SPACE and U+00AD SOFT HYPHEN are escaped: invisible,
    they could hide a difference in a log.
    """
    if text.isprintable():
        return text   # nearly every line: no copy, no per-character work
    pieces = []
    shown_up_to = 0
    for flag in FLAG_TAG_SEQUENCE.finditer(text):
        pieces += [escape_hidden(text[shown_up_to:flag.start()]), flag[0]]
        shown_up_to = flag.end()
    pieces.append(escape_hidden(text[shown_up_to:]))
    return "".join(pieces)


@functools.cache
def hidden_ranges() -> tuple[tuple[int, int], ...]:
    """Every code point is_hidden() escapes, as (first, last) runs: printable()'s rule for the page.

    The page (section 17) is given these runs (about 700) and FLAG_TAG_SEQUENCE,
    so it escapes what the terminal escapes, by this Python's Unicode version.
    Asking about all 1.1 million code points takes 0.2 s (0.5 s on Python
    3.10): done once, as the first room starts (Gate), not in a stall of the
    room when a browser first asks.
    """
    runs = []
    first = 0
    for hidden, chars in itertools.groupby(map(chr, range(sys.maxunicode + 1)), key=is_hidden):
        count = sum(1 for _ in chars)
        if hidden:
            runs.append((first, first + count - 1))
        first += count
    return tuple(runs)



class Shown(str):
    """Text already passed through printable(), which EscapeInLogs leaves as it is."""


class EscapeInLogs(logging.Filter):
    """Escapes every text and error in a log line's arguments with printable().

    Log lines quote what peers sent (a refused request, an Origin, a reason,
    a Redis reply); escaping them here means no call site can forget to.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(str(arg)) if isinstance(arg, (str, BaseException))
                                and not isinstance(arg, Shown) else arg for arg in record.args)
        return True


logger.addFilter(EscapeInLogs())


# 12. Compression ###########################################################
#
# permessage-deflate (RFC 7692, https://www.rfc-editor.org/rfc/rfc7692), the
# one extension (RFC 6455 §9) chat.py speaks, on by default. A reader who
# skips it can ignore every line above that names PerMessageDeflate, a
# connection's ``deflate`` (None unless agreed), RSV1 or window_bits, and take
# broadcast_frame (below) with window_bits 0 as a frame header and the
# payload. How it works:
#
#   - The client offers it in Sec-WebSocket-Extensions, perhaps several times
#     with different parameters; the server accepts the first offer it can
#     serve by naming it, with the agreed parameters, in its 101 (§5, §7.1).
#   - A compressed message is its DEFLATE data (RFC 1951), ended by a "sync
#     flush" whose last 4 bytes, 00 00 ff ff, are removed on the wire and put
#     back before inflating; RSV1 on its first frame says it is compressed
#     (§6, §7.2). Control frames are never compressed, and any message may go
#     uncompressed: we send short ones as they are.
#   - "Context takeover": a compressor keeps its window of past bytes from one
#     message to the next. Our server asks that neither side does (§7.1.1):
#     then one compressed broadcast frame suits every member who agreed, and
#     a connection holds zlib state only while a message passes through.
#
# Security: compressing a secret with text an attacker chooses leaks the secret
# through the sizes (CRIME, BREACH). A chat line holds one member's text; an
# application that mixes them should turn compression off (--no-compression).

PERMESSAGE_DEFLATE = "permessage-deflate"

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


def new_deflater(window_bits: int) -> typing.Any:
    """A raw DEFLATE compressor (negative wbits: no zlib header, §7.2.1)."""
    return zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits)


def deflate_message(deflater: typing.Any, *parts: bytes) -> bytes:
    """Compress one message, given in parts (§7.2.1): its data, a sync flush, the flush's tail removed."""
    data = b"".join([deflater.compress(part) for part in parts] + [deflater.flush(zlib.Z_SYNC_FLUSH)])
    return data[:-len(DEFLATE_TAIL)]


class PerMessageDeflate:
    """One connection's end of the agreement: inflates what arrives, deflates what we send.

    The handshake (section 7) reaches it through the class: CLIENT_OFFER,
    answer() to the offers, agreed() by a 101. A compressor or decompressor
    lives only while a message passes through, unless its side keeps context
    between messages (a client of another server may have to: zlib's figures
    are about 40 KB to inflate, 270 KB to deflate with a 32 KiB window).
    """

    CLIENT_OFFER = CLIENT_DEFLATE_OFFER

    __slots__ = ("params", "is_client", "window_bits", "_inflater", "_deflater", "_inflating")

    @staticmethod
    def answer(offers: str | None) -> str | None:
        """A server's Sec-WebSocket-Extensions for a client's offers (accept_deflate)."""
        return accept_deflate(offers)

    @staticmethod
    def agreed(header: str | None, *, is_client: bool) -> PerMessageDeflate | None:
        """The extension as a 101 agreed it, for a Connection; None if it wasn't."""
        if not header:
            return None
        return PerMessageDeflate(check_deflate_answer(header), is_client=is_client)

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

    def inflate(self, chunk: bytes, size_left: int) -> bytes:
        """Inflate a piece of the message, never more than ``size_left`` bytes of output.

        The bound is what stops a "zip bomb", a few bytes that inflate to
        gigabytes: zlib is asked for one byte more than the message may still
        grow by, so it stops there and we fail with 1009 (RFC 6455 §7.4.1).
        """
        try:
            data = self._inflater.decompress(chunk, size_left + 1)
        except zlib.error as error:
            raise ProtocolError(f"invalid compressed data: {error}") from None
        if len(data) > size_left:
            raise MessageTooBig(f"message inflates to over {size_left} more bytes")
        return data

    def end_message(self, size_left: int) -> bytes:
        """The last output of a compressed message, once its tail is put back (§7.2.2)."""
        data = self.inflate(DEFLATE_TAIL, size_left)
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


# 13. Redis: the RESP protocol ###############################################
#
# Sections 13 and 14 are needed only by ``server --redis``; a reader of the
# core can skip to section 15.
#
# Redis (and Valkey, which speaks the same protocol) talks RESP, its
# serialisation protocol, over TCP (https://redis.io/docs/latest/develop/reference/protocol-spec/).
# We speak RESP2, which every Redis since 2.0 understands; RESP3 (HELLO 3)
# adds maps, sets, doubles and push messages, none of which this chat needs.
# A command is an array of bulk strings; a reply is one of five types, told
# apart by its first byte:
#
#   +OK\r\n                    simple string   -> str
#   -ERR unknown command\r\n   error           -> RedisError, returned in its place
#   :1000\r\n                  integer         -> int
#   $5\r\nhello\r\n            bulk string     -> bytes ($-1\r\n is nil -> None)
#   *2\r\n:1\r\n$1\r\nx\r\n    array           -> list (*-1\r\n is nil -> None)
#
# Replies come back in the order the commands went out, so a client may send
# many commands in one write (pipelining) and match the replies by position.
#
# Redis's bytes are untrusted, like a peer's: an impostor server (or a man in
# the middle without TLS) could announce a 4 GiB bulk string, or nest arrays
# a million deep to overflow a recursive reader's stack. RespReader keeps a
# stack of its own and checks every length against a limit (RESP_MAX_*)
# before buffering anything, as FrameReader does; anything else is a
# RespError, and the connection is dropped.

REDIS_PORT = 6379

#: A simple string, error or number line: Redis's own are under 1 KiB.
RESP_MAX_LINE = 64 * 1024

#: A bulk string: a chat event holds one line of at most --max-size bytes
#: plus a few dozen bytes around it; 8 MiB leaves room for --max-size 4 MiB.
RESP_MAX_BULK = 8 * MAX_MESSAGE_SIZE

#: Items in one array: XREAD returns at most READ_COUNT entries, SCAN and
#: MGET at most MAX_KEYS_PER_CALL; this is far above both.
RESP_MAX_ITEMS = 100_000

#: Arrays within arrays: XREAD's reply is 4 deep (streams, entries, entry,
#: fields); hiredis allows 7 levels.
RESP_MAX_DEPTH = 7

#: One reply, in bytes: XREAD's READ_COUNT entries of the largest line, twice over.
RESP_MAX_REPLY = 64 * MAX_MESSAGE_SIZE

#: Seconds a command may go unanswered before the connection counts as dead.
REDIS_TIMEOUT = 5.0


class RedisError(Exception):
    """An error reply from Redis (-ERR ..., -WRONGPASS ...): Redis is fine, the command was not."""


class RedisUnavailable(Exception):
    """Redis can't be used just now: not reachable, gone, silent, or talking nonsense."""


class RespError(RedisUnavailable):
    """The bytes from Redis are not RESP2 within our limits; the connection is dropped."""


Reply = typing.Union[str, int, bytes, None, RedisError, list]   # what RespReader returns


class _Pending(enum.Enum):
    """What RespReader._read_value returns when no value is complete yet."""

    MORE_BYTES = "the buffer ends before the value does"
    ARRAY_OPENED = "an array's header was read; its items come next"


def encode_command(*args: str | bytes | int | float) -> bytes:
    """A command as Redis expects it: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def parse_resp_integer(text: bytes) -> int:
    """A RESP integer or length: an optional minus and at most 19 digits (a signed 64-bit number)."""
    if not re.fullmatch(rb"-?[0-9]{1,19}", text):
        raise RespError(f"not a number: {text[:24]!r}")
    return int(text)


def announced(length: int, limit: int, what: str) -> bool:
    """A bulk string's or array's announced length: False for -1 (nil), True within ``limit``."""
    if length == -1:
        return False
    if not 0 <= length <= limit:
        raise RespError(f"{what.format(length)} (the limit is {limit})")
    return True


class RespReader:
    """RESP2 replies from bytes, sans I/O: a reply comes out the same however it is split."""

    def __init__(self, *, max_bulk: int = RESP_MAX_BULK, max_items: int = RESP_MAX_ITEMS,
                 max_depth: int = RESP_MAX_DEPTH, max_reply: int = RESP_MAX_REPLY) -> None:
        self.max_bulk, self.max_items = max_bulk, max_items
        self.max_depth, self.max_reply = max_depth, max_reply
        self._buffer = bytearray()
        self._pos = 0                                # where the unread bytes start
        self._arrays: list[tuple[list, int]] = []    # arrays being filled: items so far, items due
        self._bulk_length: int | None = None         # a bulk string whose header is read
        self._reply_size = 0                         # bytes of the current reply so far

    def feed(self, data: bytes) -> list[Reply]:
        """Take the next bytes from Redis; return every reply they complete, in order."""
        self._buffer += data
        replies: list[Reply] = []
        try:
            value = self._read_value()
            while value is not _Pending.MORE_BYTES:
                if value is not _Pending.ARRAY_OPENED:
                    self._place(value, replies)
                value = self._read_value()
        finally:
            del self._buffer[:self._pos]
            self._pos = 0
        return replies

    def _place(self, value: Reply, replies: list[Reply]) -> None:
        """Put a complete value into the array it belongs to; a whole reply into ``replies``."""
        while self._arrays:
            items, due = self._arrays[-1]
            items.append(value)
            if len(items) < due:
                return
            self._arrays.pop()   # this array is complete: it is a value of the one around it
            value = items
        self._reply_size = 0
        replies.append(value)

    def _read_value(self) -> Reply | _Pending:
        if self._bulk_length is not None:
            return self._read_bulk(self._bulk_length)
        line = self._read_line()
        if line is None:
            return _Pending.MORE_BYTES
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return parse_resp_integer(rest)
        if kind == b"$":
            return self._start_bulk(parse_resp_integer(rest))
        if kind == b"*":
            return self._start_array(parse_resp_integer(rest))
        raise RespError(f"unknown reply type {kind!r} (RESP2 has + - : $ *)")

    def _read_line(self) -> bytes | None:
        """The next line without its CRLF, or None if it hasn't all arrived."""
        end = self._buffer.find(b"\r\n", self._pos)
        length = (len(self._buffer) if end == -1 else end) - self._pos
        if length > RESP_MAX_LINE:
            raise RespError(f"a reply line longer than {RESP_MAX_LINE} bytes")
        if end == -1:
            return None
        line = bytes(self._buffer[self._pos:end])
        self._count(end + 2 - self._pos)
        self._pos = end + 2
        return line

    def _start_bulk(self, length: int) -> bytes | None | _Pending:
        if not announced(length, self.max_bulk, "a bulk string of {} bytes"):
            return None
        self._count(length + 2)   # counted before it is buffered
        self._bulk_length = length
        return self._read_bulk(length)

    def _read_bulk(self, length: int) -> bytes | _Pending:
        end = self._pos + length
        if len(self._buffer) < end + 2:
            return _Pending.MORE_BYTES
        if self._buffer[end:end + 2] != b"\r\n":
            raise RespError("a bulk string longer than its announced length")
        value = bytes(self._buffer[self._pos:end])
        self._pos, self._bulk_length = end + 2, None
        return value

    def _start_array(self, count: int) -> list | None | _Pending:
        if not announced(count, self.max_items, "an array of {} items"):
            return None
        if count == 0:
            return []
        if len(self._arrays) >= self.max_depth:
            raise RespError(f"arrays nested more than {self.max_depth} deep")
        self._arrays.append(([], count))
        return _Pending.ARRAY_OPENED

    def _count(self, size: int) -> None:
        self._reply_size += size
        if self._reply_size > self.max_reply:
            raise RespError(f"a reply of more than {self.max_reply} bytes")


class RedisURL(typing.NamedTuple):
    """Where Redis is: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], or rediss:// for TLS."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    def __str__(self) -> str:
        """The URL for messages and logs: never the password."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{host_port(self.host, self.port)}" + (f"/{self.db}" if self.db else "")


def parse_redis_url(url: str) -> RedisURL:
    """The parts of a Redis URL (the IANA redis: scheme), or ValueError saying what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"not a Redis URL: {url!r} (expected redis://HOST:PORT/DB or rediss://...)")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database in {url!r} must be a number, such as /0")
    unquote = lambda text: urllib.parse.unquote(text) if text is not None else None  # noqa: E731
    return RedisURL(parts.hostname, parts.port or REDIS_PORT, int(path or 0),
                    unquote(parts.username) or None, unquote(parts.password), parts.scheme == "rediss")


def connect_error_words(error: BaseException) -> str:
    """'connection refused': why a connection failed, in a few lower-case words."""
    if isinstance(error, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(error, ssl.SSLError):   # first: a certificate refused has errno 1 (EPERM)
        return f"TLS failed: {getattr(error, 'verify_message', None) or error.reason or error}"
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code).lower()
    return str(error) or type(error).__name__


class RedisConnection:
    """One connection to Redis: commands go out at once; a task matches the replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.closed: str | None = None        # why, once it is closed
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._reading = asyncio.create_task(self._read_replies(reader, RespReader()))

    @classmethod
    async def open(cls, url: RedisURL, timeout: float = REDIS_TIMEOUT) -> RedisConnection:
        """Connect, then AUTH and SELECT as the URL says; RedisUnavailable saying why not."""
        context = ssl.create_default_context() if url.tls else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                url.host, url.port, ssl=context, limit=READ_BUFFER_LIMIT), timeout)
        except (OSError, asyncio.TimeoutError) as error:
            raise RedisUnavailable(connect_error_words(error)) from None
        conn = cls(reader, writer)
        auth = (url.username, url.password) if url.username else (url.password,)
        setup = [("AUTH", *auth)] if url.password is not None else []
        if url.db:
            setup.append(("SELECT", url.db))
        try:
            for reply in await conn.pipeline(setup or [("PING",)], timeout):
                if isinstance(reply, RedisError):
                    raise RedisUnavailable(f"Redis said: {reply}")
        except RedisUnavailable:
            conn.close("setup failed")
            raise
        return conn

    async def command(self, *args: str | bytes | int | float, timeout: float = REDIS_TIMEOUT) -> Reply:
        """Send one command and return its reply; an error reply is raised as RedisError."""
        (reply,) = await self.pipeline([args], timeout)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[str | bytes | int | float]],
                       timeout: float = REDIS_TIMEOUT) -> list[Reply]:
        """Send several commands in one write; their replies, error replies in place."""
        if self.closed is not None:
            raise RedisUnavailable(self.closed)
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        self.writer.write(b"".join(encode_command(*command) for command in commands))
        _, late = await asyncio.wait(futures, timeout=timeout)
        if late:
            # The replies still owed would be matched to later commands: drop the connection.
            self.close(f"no reply within {timeout:g} s")
        if late or any(future.cancelled() for future in futures):
            raise RedisUnavailable(self.closed)
        return [future.result() for future in futures]

    async def _read_replies(self, reader: asyncio.StreamReader, replies: RespReader) -> None:
        why = "Redis closed the connection"
        try:
            while True:
                data = await reader.read(READ_BUFFER_LIMIT)
                if not data:
                    break
                for reply in replies.feed(data):
                    if not self._waiting:
                        raise RespError("a reply to no command")
                    waiter = self._waiting.popleft()
                    if not waiter.done():
                        waiter.set_result(reply)
        except RespError as error:
            why = f"malformed reply: {error}"
        except OSError as error:
            why = connect_error_words(error)
        self.close(why)

    def close(self, why: str = "closed") -> None:
        """Close the connection; every command still waiting fails with RedisUnavailable(why)."""
        if self.closed is not None:
            return
        self.closed = why
        self.writer.close()
        if self._reading is not asyncio.current_task():
            self._reading.cancel()
        for waiter in self._waiting:
            waiter.cancel()   # pipeline() raises RedisUnavailable(self.closed) for it
        self._waiting.clear()


# 14. One room on many servers ##############################################
#
# ``server --redis URL``: every server started with the same URL serves the
# same room. Each WebSocket stays on its server, and the servers share the
# room through Redis, as socket.io's Redis adapter and channels_redis do:
#
#   chat.py:events      a stream (XADD ... MAXLEN ~ 1000) of what other
#                       servers' members must see: a line, a notice, a /msg,
#                       a name taken over by a resume. Each server reads on
#                       (XREAD BLOCK) from the last entry id it saw, even
#                       after a drop: nothing is missed, as it could be with
#                       PUBLISH/SUBSCRIBE (at most once).
#   chat.py:history     a list (RPUSH, LTRIM to 50): the recent past, read by
#                       a server when it starts.
#   chat.py:name:KEY    per member, KEY its name_key(): "DIGEST SERVER NAME",
#                       DIGEST a hash of its resume token. Its server renews
#                       it every TTL/3 and deletes it on leave, so a crashed
#                       server's names are free again within TTL; the token
#                       takes the name over at once, on any server.
#   chat.py:lines:KEY   how many of its lines the room relayed: the count in
#                       the greeting of a resume on another server.
#
# A server relays its own members' lines at once, as a single server does,
# then shares them: its members never wait for Redis, and while Redis is
# away they go on talking among themselves (the room is "split"; they are
# told, and told again when it is whole). Shared events wait in a bounded
# queue and go out pipelined, in order, when Redis can take them; each
# carries its server's id and a sequence number, so one sent twice (the
# connection dropped before Redis answered) is heard once. Each server's
# events enter the stream in the order they happened there, so each sender's
# lines arrive in order everywhere; different senders' lines may interleave
# differently on different servers, as they do across IRC servers.
#
# Joins and /nick claim the name in Redis, atomically (a Lua script, EVAL);
# while Redis is unreachable they are refused (1013, try again later) rather
# than risk two members with one name. /who and /msg read the name keys. The
# scripts touch several keys, so one Redis server (or a primary with
# replicas) is assumed: Redis Cluster would refuse them.

REDIS_PREFIX = "chat.py"

#: Entries the stream keeps (about: MAXLEN ~ trims whole blocks): how far a
#: server that lost its connection can read back.
STREAM_LENGTH = 1000

#: Seconds a name stays taken after its server stopped renewing it (``--name-ttl``).
NAME_TTL = 15.0

#: XREAD waits this long for new entries, then asks again: a dead
#: connection is noticed within this plus REDIS_TIMEOUT.
READ_BLOCK = 5.0

#: Entries one XREAD returns at most (see RESP_MAX_REPLY), and events the sharer sends at once.
READ_COUNT = 32
MAX_KEYS_PER_CALL = 1000   # keys one SCAN or MGET handles

#: Bytes of events waiting for Redis; past this, newer ones stay on this server (counted).
MAX_UNSHARED_BYTES = 8 * MAX_MESSAGE_SIZE

#: Reconnecting to Redis waits 0.1, 0.2, 0.4 ... seconds, at most 5, plus up
#: to a tenth at random, so that many servers don't all retry at once;
#: sooner than a client retries (FIRST_BACKOFF): the room is split meanwhile.
REDIS_FIRST_RETRY = 0.1
REDIS_MAX_RETRY = 5.0

#: Guest names tried (user1, user2 ...) before a newcomer is refused.
GUEST_ATTEMPTS = 100

#: Told to this server's members when Redis goes away, and when it is back.
SPLIT_NOTICE = ("* the room is split: Redis is unreachable, so only the members on this "
                "server hear you for now; new names wait until it is whole")
WHOLE_NOTICE = "* the room is whole again"

#: Close reason for a member whose name another server gave away while this one was cut off.
NAME_LOST_REASON = "the name {name} was taken on another server while the room was split"


# 14.1 The link to Redis ####################################################

class RedisLink:
    """Two connections to Redis, one for commands, one blocked in XREAD; reopened if they break."""

    def __init__(self, url: RedisURL, announce: Callable[[str], None],
                 jobs: Callable[[RedisConnection, RedisConnection], list[Awaitable[None]]]) -> None:
        self.url, self.announce = url, announce   # announce: a notice for this server's members
        self.jobs = jobs                          # they run on the connections while both are open
        self.commands: RedisConnection | None = None   # None while the room is split
        self._running: asyncio.Task | None = None

    async def connect(self, first: Callable[[RedisConnection], Awaitable[None]]) -> None:
        """Open the connections, run ``first``, then the jobs; RedisUnavailable if Redis can't be used."""
        commands, blocking = await self._open()
        try:
            await first(commands)
        except (RedisUnavailable, RedisError) as error:
            commands.close()
            blocking.close()
            raise RedisUnavailable(str(error)) from None
        self._running = asyncio.create_task(self._stay_connected(commands, blocking))

    def require(self, doing: str) -> RedisConnection:
        """The connection for commands; TryLater while the room is split."""
        if self.commands is None:
            raise TryLater(f"the room is split (Redis is unreachable), so {doing} can't be checked "
                           f"against the other servers; try again soon")
        return self.commands

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            await asyncio.wait([self._running])

    async def _open(self) -> tuple[RedisConnection, RedisConnection]:
        commands = await RedisConnection.open(self.url)
        try:
            return commands, await RedisConnection.open(self.url)
        except RedisUnavailable:
            commands.close()
            raise

    async def _stay_connected(self, commands: RedisConnection, blocking: RedisConnection) -> None:
        """For as long as the server runs: run the jobs; when one fails, reconnect with backoff."""
        while True:
            self.commands = commands
            tasks = [asyncio.ensure_future(job) for job in self.jobs(commands, blocking)]
            try:   # the jobs loop until one fails; the rest are stopped with it
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
                self.commands = None
                commands.close()
                blocking.close()
            failure = done.pop().exception() or RedisUnavailable("stopped")
            if not isinstance(failure, (RedisUnavailable, RedisError)):
                logger.error("the link to Redis failed", exc_info=failure)   # a bug: show where
            logger.warning("Redis at %s: %s; the room is split", self.url, failure)
            self.announce(SPLIT_NOTICE)
            commands, blocking = await self._reconnect()
            logger.info("Redis at %s is back; the room is whole", self.url)
            self.announce(WHOLE_NOTICE)

    async def _reconnect(self) -> tuple[RedisConnection, RedisConnection]:
        delay = REDIS_FIRST_RETRY
        while True:
            await asyncio.sleep(delay * (1 + random.random() / 10))
            try:
                return await self._open()
            except RedisUnavailable as error:
                logger.info("Redis at %s: still unreachable (%s)", self.url, error)
            delay = min(delay * 2, REDIS_MAX_RETRY)


# 14.2 The stream of events #################################################

class Event(typing.NamedTuple):
    """Something a member on one server did, for the members on every other server."""

    origin: str     # the id of the server it happened on
    seq: int        # its number among that server's events, from 1
    kind: str       # "say" (kept in history), "notice", "tell" (one member), "replace"
    when: float     # time.time() on the origin server
    text: str       # the line to show
    to: str = ""    # "tell", "replace": the member it is for, by its token's digest


def encode_event(event: Event) -> bytes:
    """'ORIGIN SEQ KIND WHEN TO TEXT': the text last, since it may hold spaces."""
    to = urllib.parse.quote(event.to) or "-"   # a name key may hold a space (NFKC of U+00A8 does)
    return f"{event.origin} {event.seq} {event.kind} {event.when:.3f} {to} {event.text}".encode("utf-8")


def decode_event(data: bytes) -> Event:
    """The event in an entry from Redis, or ValueError: it is untrusted input too."""
    fields = data.decode("utf-8").split(" ", 5)
    if len(fields) != 6 or fields[2] not in ("say", "notice", "tell", "replace"):
        raise ValueError(f"not an event: {data[:40]!r}")
    origin, seq, kind, when, to, text = fields
    stamp = float(when)
    if not 0 <= stamp <= LAST_RFC3339_TIME:   # NaN fails this too; utc_stamp() can't write it
        raise ValueError(f"an event's time out of range: {when[:20]!r}")
    return Event(origin, int(seq), kind, stamp, text, "" if to == "-" else urllib.parse.unquote(to))


def stream_entries(reply: Reply) -> list[tuple[bytes, bytes]]:
    """(entry id, event bytes) from an XREAD reply: [[stream, [[id, [field, value]], ...]]]."""
    if reply is None:
        return []   # BLOCK timed out: nothing new
    try:
        [[_, entries]] = reply
        found = [(entry_id, fields[fields.index(b"event") + 1]) for entry_id, fields in entries]
        if all(isinstance(entry_id, bytes) and isinstance(data, bytes) for entry_id, data in found):
            return found
    except (TypeError, ValueError, IndexError, AttributeError):
        pass
    raise RespError("an XREAD reply of the wrong shape")


class EventStream:
    """This server's end of the stream: its events go out in order, the others' come in once."""

    def __init__(self, prefix: str, server_id: str, history: History,
                 deliver: Callable[[Event], None]) -> None:
        self.stream_key, self.history_key = f"{prefix}:events", f"{prefix}:history"
        self.server_id, self.deliver = server_id, deliver
        self.history = history                       # the room's, which the list in Redis mirrors
        self.last_id = b"0-0"                        # the last stream entry read
        self.seen: dict[str, int] = {}               # the last seq read from each other server
        self.unshared: collections.deque[tuple[bytes, list[tuple]]] = collections.deque()
        self.unshared_bytes = 0                      # a running sum: adding up a long queue costs
        self.not_shared = 0                          # events kept here for want of room
        self._seq = itertools.count(1)
        self._wake_sharer = asyncio.Event()
        self.drained = asyncio.Event()               # set whenever nothing waits to be shared

    async def read_the_past(self, link: RedisConnection) -> None:
        """The history, and where the stream ends now, in one transaction (nothing comes between)."""
        *_, transaction = await link.pipeline([
            ("MULTI",), ("XREVRANGE", self.stream_key, "+", "-", "COUNT", 1),
            ("LRANGE", self.history_key, -self.history.maxlen, -1), ("EXEC",)])
        try:
            last, history = transaction
            if last:
                self.last_id = last[0][0]
            if not isinstance(self.last_id, bytes) or not isinstance(history, list):
                raise TypeError
        except (TypeError, ValueError, IndexError):
            raise RespError("the stream or the history is not what chat.py writes") from None
        events = []
        for data in history:
            try:
                events.append(decode_event(data))
            except (ValueError, AttributeError) as error:   # AttributeError: not even bytes
                logger.warning("skipped a history entry: %s", error)
        # A line sent again after a dropped connection is in the list twice: keep one.
        once = {(event.origin, event.seq): event for event in events}.values()
        self.history.extend((event.when, (event.text,)) for event in once)

    def share(self, kind: str, text: str, to: str = "", also: Sequence[tuple] = ()) -> None:
        """Queue an event, and the commands ``also`` with it; they go out when Redis can take them."""
        event = encode_event(Event(self.server_id, next(self._seq), kind, time.time(), text, to))
        if self.unshared_bytes + len(event) > MAX_UNSHARED_BYTES:
            self.not_shared += 1   # Redis has been away long: this one stays here
            return
        commands = [("XADD", self.stream_key, "MAXLEN", "~", STREAM_LENGTH, "*", "event", event)]
        if kind == "say":
            commands += [("RPUSH", self.history_key, event),
                         ("LTRIM", self.history_key, -self.history.maxlen, -1)]
        self.write(*commands, *also, event=event)

    def write(self, *commands: tuple, event: bytes = b"") -> None:
        """Queue commands for Redis, after those queued before them (share() adds its event)."""
        self.unshared.append((event, list(commands)))
        self.unshared_bytes += len(event)
        self.drained.clear()
        self._wake_sharer.set()

    async def sharer(self, link: RedisConnection) -> None:
        """Send the waiting events, pipelined; each leaves the queue once Redis has it."""
        if self.not_shared:   # the room was split, and whole again now
            logger.warning("%s said here while the room was split stayed here (over %d bytes)",
                           plural(self.not_shared, "event"), MAX_UNSHARED_BYTES)
            self.not_shared = 0
        while True:   # what waits first: a batch in flight when the link broke is still queued
            while self.unshared:
                batch = list(itertools.islice(self.unshared, READ_COUNT))
                replies = await link.pipeline([cmd for _, queued in batch for cmd in queued])
                for error in (reply for reply in replies if isinstance(reply, RedisError)):
                    logger.error("Redis refused an event: %s", error)
                for event, _ in batch:
                    self.unshared.popleft()
                    self.unshared_bytes -= len(event)
            self.drained.set()
            await self._wake_sharer.wait()
            self._wake_sharer.clear()

    async def follower(self, link: RedisConnection) -> None:
        """Read the other servers' events as they enter the stream; deliver each once."""
        block_ms, own = int(READ_BLOCK * 1000), f"{self.server_id} ".encode()
        while True:
            reply = await link.command("XREAD", "COUNT", READ_COUNT, "BLOCK", block_ms,
                                       "STREAMS", self.stream_key, self.last_id,
                                       timeout=READ_BLOCK + REDIS_TIMEOUT)
            for entry_id, data in stream_entries(reply):
                self.last_id = entry_id
                if data.startswith(own):
                    continue   # relayed here when it happened
                try:
                    event = decode_event(data)
                except ValueError as error:
                    logger.warning("skipped a stream entry %s: %s", printable(repr(entry_id)), error)
                    continue
                if event.seq > self.seen.get(event.origin, 0):   # else sent twice: seen already
                    self.seen[event.origin] = event.seq
                    self.deliver(event)


# 14.3 Names ################################################################

#: Claim a name (KEYS: its name key, its lines key). Free, or held by the
#: claiming server for a member who left (the release is on its way): set,
#: count reset, '' returned. Held with the offered token's digest (a resume):
#: set, and what it held returned with the count. Else: unchanged, nil.
#: ARGV: the value if free, the value if resumed, the TTL in ms, the offered
#: token's digest and a space, the claiming server's id between spaces.
CLAIM_NAME = """
local held = redis.call('GET', KEYS[1])
if not held or string.find(held, ARGV[5], 1, true) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return ''
end
if string.sub(held, 1, #ARGV[4]) ~= ARGV[4] then return false end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return {held, redis.call('GET', KEYS[2]) or '0'}
"""

#: Release a name (KEYS as above) on leave, unless it was taken over since. ARGV[1]: its value.
RELEASE_NAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1], KEYS[2]) end
return 0
"""

#: The heartbeat: renew this server's names and counts, or set a name again if
#: it expired (or Redis restarted empty); return the names someone else holds
#: now. KEYS: the names, then their counts; ARGV: the names' values, the TTL.
RENEW_NAMES = """
local n, lost = #KEYS / 2, {}
for i = 1, n do
  local held = redis.call('GET', KEYS[i])
  if not held or held == ARGV[i] then
    redis.call('SET', KEYS[i], ARGV[i], 'PX', ARGV[#ARGV])
    redis.call('PEXPIRE', KEYS[n + i], ARGV[#ARGV])
  else
    lost[#lost + 1] = KEYS[i]
  end
end
return lost
"""


def parse_claim(reply: Reply) -> tuple[str, int] | None:
    """CLAIM_NAME's reply: what the name held ('' if free), its member's count; None if taken."""
    if reply is None:
        return None
    try:
        held, lines = reply if reply != b"" else (b"", b"0")   # '': it was free
        return held.decode("utf-8", "replace"), parse_resp_integer(lines)
    except (TypeError, ValueError, AttributeError):
        raise RespError("a name claim's reply of the wrong shape") from None


def token_digest(token: str) -> str:
    """What Redis keeps of a resume token: enough to check one, not to show one."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def name_holder(value: Reply) -> tuple[str, str, str] | None:
    """(token digest, server id, name) from a name key's value; None if it holds none."""
    try:
        digest, server, name = value.decode("utf-8").split(" ", 2)
    except (ValueError, AttributeError):
        return None   # nil: no one holds the name (or its member left meanwhile)
    return digest, server, name


class NameRegistry:
    """The names in Redis, one key each: claimed on join and /nick, renewed while held, freed on leave."""

    def __init__(self, redis: RedisLink, members: typing.Mapping[str, Member], prefix: str,
                 server_id: str, ttl: float) -> None:
        self.redis, self.members = redis, members   # members: this server's, the room's own dict
        self.name_prefix, self.lines_prefix = f"{prefix}:name:", f"{prefix}:lines:"
        self.server_id, self.ttl = server_id, ttl
        self._claiming: set[str] = set()   # name keys being claimed from here just now

    def value(self, name: str, token: str) -> str:
        """What a name key holds while ``name`` is a member's here (see name_holder)."""
        return f"{token_digest(token)} {self.server_id} {name}"

    async def claim(self, name: str, fresh: str, offered: str) -> tuple[str, int] | None:
        """Claim ``name`` for the token ``fresh``, or ``offered`` if it resumes; None if taken."""
        link, key = self.redis.require("names"), name_key(name)
        if key in self._claiming:
            return None   # another connection here is claiming it this very moment
        offered_digest = f"{token_digest(offered)} " if offered else "-"   # "-" matches no digest
        ours = f" {self.server_id} " if key not in self.members else "\n"   # "\n" matches nothing
        self._claiming.add(key)
        try:
            return parse_claim(await link.command(
                "EVAL", CLAIM_NAME, 2, self.name_prefix + key, self.lines_prefix + key,
                self.value(name, fresh), self.value(name, offered),
                int(self.ttl * 1000), offered_digest, ours))
        except RedisUnavailable:
            raise TryLater("the room's name store (Redis) did not answer; try again soon") from None
        finally:
            self._claiming.discard(key)

    def release(self, member: Member) -> tuple:
        """The command that frees the member's name, unless it has been taken over since."""
        key = name_key(member.name)
        return ("EVAL", RELEASE_NAME, 2, self.name_prefix + key, self.lines_prefix + key,
                self.value(member.name, member.token))

    def count_lines(self, member: Member) -> tuple:
        """The command that stores how many of the member's lines the room has relayed."""
        return ("SET", self.lines_prefix + name_key(member.name), member.lines,
                "PX", int(self.ttl * 1000))

    async def heartbeat(self, link: RedisConnection) -> None:
        """Every TTL/3, renew this server's names; close its members whose name was lost."""
        while True:
            members = self.members.values()
            keys = [self.name_prefix + key for key in self.members]
            keys += [self.lines_prefix + key for key in self.members]
            lost = await link.command("EVAL", RENEW_NAMES, len(keys), *keys,
                                      *(self.value(m.name, m.token) for m in members),
                                      int(self.ttl * 1000))
            for key in lost if isinstance(lost, list) else ():
                member = self.members.get(key.decode("utf-8", "replace")[len(self.name_prefix):])
                if member is not None:
                    member.conn.close_nowait(CloseCode.POLICY_VIOLATION,
                                             NAME_LOST_REASON.format(name=member.name))
            await asyncio.sleep(self.ttl / 3)

    async def name_keys(self) -> list[bytes]:
        """Every member's name key, on every server (SCAN: the keys are the list)."""
        link, cursor, keys = self.redis.require("the room"), b"0", []
        while True:
            reply = await link.command("SCAN", cursor, "MATCH", self.name_prefix + "*",
                                       "COUNT", MAX_KEYS_PER_CALL)
            try:
                cursor, batch = reply
                keys += batch
            except (TypeError, ValueError):
                raise RespError("a SCAN reply of the wrong shape") from None
            if cursor == b"0":
                return keys

    async def everyone(self) -> list[str]:
        """Every member's name, on every server."""
        keys, holders = await self.name_keys(), []
        for start in range(0, len(keys), MAX_KEYS_PER_CALL):
            holders += map(name_holder, await self.redis.require("the room").command(
                "MGET", *keys[start:start + MAX_KEYS_PER_CALL]))
        return [holder[2] for holder in holders if holder is not None]

    async def holder(self, name: str) -> tuple[str, str, str] | None:
        """(token digest, server id, name) of whoever holds ``name``, on any server."""
        link = self.redis.require("names")
        return name_holder(await link.command("GET", self.name_prefix + name_key(name)))


# 14.4 The shared room ######################################################

class SharedRoom(BatchedRoom):
    """A ChatRoom whose names, lines and history are shared through Redis with other servers."""

    def __init__(self, url: RedisURL, *, name_ttl: float = NAME_TTL, prefix: str = REDIS_PREFIX,
                 **options: typing.Any) -> None:
        super().__init__(**options)
        server_id = f"{os.getpid()}-{secrets.token_hex(4)}"   # in every event and name it writes
        self.redis = RedisLink(url, announce=self.broadcast, jobs=self._jobs)
        self.events = EventStream(prefix, server_id, self.history, deliver=self.on_event)
        self.names = NameRegistry(self.redis, self.members, prefix, server_id, name_ttl)
        self._busy: dict[Member, collections.deque[bytes]] = {}   # lines held behind a Redis command
        self.refusals = RefusalLog()   # newcomers told 1013 (TryLater): clients retry those

    async def connect(self) -> None:
        """Connect to Redis and read the recent past; RedisUnavailable if Redis can't be used."""
        await self.redis.connect(first=self.events.read_the_past)

    def _jobs(self, commands: RedisConnection, blocking: RedisConnection) -> list[Awaitable[None]]:
        """What runs while Redis is reachable; the first to fail splits the room."""
        return [self.events.sharer(commands), self.events.follower(blocking),   # it blocks
                self.names.heartbeat(commands)]

    async def close(self) -> None:
        """Share what is still waiting (the members' leaving, mostly), briefly; then let go."""
        if self.redis.commands is not None and self.events.unshared:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.events.drained.wait(), 1.0)
        await self.redis.close()

    def on_event(self, event: Event) -> None:
        """An event from another server, heard once (see EventStream): show it here."""
        if event.kind == "say":
            self.history.append((event.when, (event.text,)))
        if event.kind in ("say", "notice"):
            self.broadcast(event.text)
            return
        # "tell", "replace": for one member, found by token (a scan: /msg is rare), if it is here.
        member = next((m for m in self.members.values() if token_digest(m.token) == event.to), None)
        if member is None:
            return
        if event.kind == "tell":
            self.tell(member.conn, event.text)
        else:   # "replace": the member came back on another server with its token
            del self.members[name_key(member.name)]   # without a "left": it is still in the room
            member.conn.close_nowait(CloseCode.NORMAL_CLOSURE, REPLACED_REASON)

    # -- names ------------------------------------------------------------------

    async def enter(self, conn: Connection) -> Member:
        """Claim the name in Redis first; a name held on this server is for admit() to judge."""
        try:   # first: no await may come between the claim and add_member
            count: int | None = len(await self.names.name_keys())   # on every server
        except (TryLater, RedisUnavailable):
            count = None   # Redis can't say just now: the greeting counts this server's members
        asked, offered = requested_name(conn)
        if asked is not None and name_key(asked) in self.members:
            return self.admit(conn)
        member = Member(asked or "", conn)
        for _ in range(1 if asked else GUEST_ATTEMPTS):
            member.name = asked or self.guest_name()
            claimed = await self.names.claim(member.name, member.token, offered)
            if claimed is not None:
                break
        else:
            if asked:
                raise ValueError(name_taken(asked))
            raise TryLater("no free guest name; pick a name")
        self.refusals.let_in(TryLater, "letting newcomers in again")   # Redis answered a claim
        held, lines = claimed
        if held:   # a resume: its old connection, on another server, is closed there
            member.token, member.lines = offered, lines
            self.events.share("replace", "", token_digest(offered))
        elif count is not None:
            count += 1   # the newcomer
        return self.add_member(member, announce=not held, count=count)

    def log_refusal(self, conn: Connection, refusal: ValueError) -> None:
        """A 1013 is logged by the episode (it ends when a claim succeeds again); others, each."""
        if isinstance(refusal, TryLater):
            self.refusals.refuse(TryLater, "refusing newcomers with 1013 for now: %s", refusal)
        else:
            super().log_refusal(conn, refusal)

    def leave(self, member: Member) -> None:
        here = self.members.get(name_key(member.name)) is member
        super().leave(member)
        if here:
            self.events.write(self.names.release(member))   # after its last events

    # -- what members say ---------------------------------------------------------

    def say(self, member: Member, *parts: str | bytes) -> None:
        super().say(member, *parts)
        line = b"".join(map(utf8, parts)).decode("utf-8")
        self.events.share("say", line, also=[self.names.count_lines(member)])

    def notice(self, text: str) -> None:
        super().notice(text)
        self.events.share("notice", text)

    def on_text(self, member: Member, text: bytes) -> None:
        """As in ChatRoom, but lines behind a command that waits for Redis wait too, in order."""
        waiting = self._busy.get(member)
        if waiting is None:
            super().on_text(member, text)
        elif len(waiting) < self.max_held:
            waiting.append(text)
        else:
            member.conn.fail_nowait(CloseCode.POLICY_VIOLATION, "flooding: lines not relayed")

    def run_command(self, member: Member, command: Command) -> None:
        """A command that asks Redis (an async command_NAME here) runs in a task of its own."""
        handler = getattr(self, f"command_{command.name}")
        if not inspect.iscoroutinefunction(handler):
            super().run_command(member, command)
            return
        self._busy[member] = collections.deque()
        asyncio.create_task(self._run_shared(handler(member, command.argument), member))

    async def _run_shared(self, command: Awaitable[None], member: Member) -> None:
        try:
            await command
        except (TryLater, RedisUnavailable) as refusal:
            self.tell(member.conn, f"* {refusal}")
        finally:   # then the member's lines that waited behind it
            waiting = self._busy.pop(member)
            while waiting and member not in self._busy:
                self.on_text(member, waiting.popleft())
            if waiting:   # another command is waiting for Redis now: the rest waits behind it
                self._busy[member].extendleft(reversed(waiting))

    async def command_who(self, member: Member, argument: str) -> None:
        if self.redis.commands is None:
            self.list_names(member, [m.name for m in self.members.values()],
                            " (the room is split: only this server's members)")
            return
        self.list_names(member, await self.names.everyone())

    async def command_msg(self, member: Member, argument: str) -> None:
        recipient_name, text = argument.split(maxsplit=1)
        if name_key(recipient_name) in self.members:
            super().command_msg(member, argument)
            return
        holder = await self.names.holder(recipient_name)
        if holder is None:
            self.tell(member.conn, f"* no one named {recipient_name} is here; /who lists who is")
            return
        digest, _, recipient = holder
        line = private_line(member.name, recipient, text)
        self.events.share("tell", line, digest)   # by token: it reaches the member even after a /nick
        self.tell(member.conn, line)   # the sender's receipt: the room has it

    async def command_nick(self, member: Member, new: str) -> None:
        name = self.new_name(member, new)
        if name is None:
            return
        # It offers its own token: a name held with it is a new spelling of its own.
        if await self.names.claim(name, member.token, member.token) is None:
            self.tell(member.conn, f"* {name_taken(name)}")   # by a member on another server
            return
        if member.conn.state is not State.OPEN or self.members.get(name_key(member.name)) is not member:
            return   # gone while Redis answered; leave() released the old name, the new one expires
        if name_key(name) != name_key(member.name):
            self.events.write(self.names.release(member))
        self.rename(member, name)
        self.events.write(self.names.count_lines(member))   # under the new name now


# 15. Line editor ###########################################################
#
# Theory of operation. The client puts the terminal in raw mode, so every key
# reaches us as it is pressed and nothing is echoed: drawing what is typed is
# our job. Three pure pieces, in the order a keystroke meets them:
#
#   KeyDecoder   text from the terminal  -> KeyEvents (keys, typed text, pastes)
#   LineEditor   one KeyEvent            -> a new buffer and cursor index, and
#                                           lines to send or other Actions
#   InputView    prompt, buffer, cursor  -> the exact characters to write
#
# The view redraws the whole input after every change, as antirez's linenoise
# does in its multi-line mode: up to the input's first row, erase to the end
# of the screen, write the prompt and the buffer, put the cursor back. The
# input is always the last thing on the screen, so a line from the network
# is shown by erasing the input, writing the line there (the terminal wraps
# it, however long) and drawing the input again below it. The one thing the
# view must remember is how far the cursor is below the input's first row.
# Skip this section if you came for the protocol: nothing else depends on it.

ESC = "\x1b"
CSI = ESC + "["       # Control Sequence Introducer (ECMA-48 §5.4)
SS3 = ESC + "O"       # what some terminals send for arrows and Home/End instead

#: Bracketed paste (an xterm extension most terminals copy): while it is on,
#: pasted text arrives between PASTE_START and PASTE_END, so a pasted newline
#: can't be mistaken for Enter, nor a pasted ESC for the start of a key.
BRACKETED_PASTE_ON = CSI + "?2004h"
BRACKETED_PASTE_OFF = CSI + "?2004l"
PASTE_START = CSI + "200~"
PASTE_END = CSI + "201~"

ERASE_BELOW = CSI + "J"    # erase from the cursor to the end of the screen
DIM = CSI + "2m{}" + CSI + "0m"   # SGR faint, then back to normal

#: A tab (typed or pasted) becomes spaces: how wide a tab looks depends on
#: the column it lands in, which is different for everyone who reads it.
TAB_SPACES = "    "

#: Up to this many sent lines can be recalled with Up; older ones are dropped.
INPUT_HISTORY_SIZE = 1000

#: Narrower than this, a wide character could never fit in a row.
MIN_WIDTH = 2


# Display width. A terminal draws most characters in one cell, East Asian
# wide ones (漢, 😀) in two, and combining marks in none: they sit on the
# character before them. This is the classic wcwidth() approximation, and
# terminals disagree at its edges. What it gets wrong, knowingly: an emoji
# ZWJ sequence (👩‍💻 = 👩 U+200D 💻) is one two-cell glyph in many terminals
# but counts 4 here, the sum of its parts; an emoji selector U+FE0F can widen
# the character before it (❤️) but counts 0; the soft hyphen (a format char)
# is drawn by some; ambiguous-width characters (EAW "A", like ±) count 1,
# though CJK-locale terminals draw 2. A wrong count misplaces the cursor
# and the row breaks for as long as that text is in the buffer; nothing
# worse, because every redraw starts again from the input's first row.

#: General categories that take no cell: nonspacing marks (accents, and the
#: variation selectors U+FE00-FE0F), enclosing marks, and format characters
#: such as ZERO WIDTH JOINER U+200D.
ZERO_WIDTH_CATEGORIES = frozenset({"Mn", "Me", "Cf"})

#: East Asian Width classes drawn two cells wide (Unicode UAX #11).
WIDE_CLASSES = frozenset({"W", "F"})


def char_width(ch: str) -> int:
    """How many terminal cells the character ch takes: 0, 1 or 2."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ZERO_WIDTH_CATEGORIES:
        return 0
    return 2 if unicodedata.east_asian_width(ch) in WIDE_CLASSES else 1


def cell_widths(text: str) -> Iterator[int]:
    """The cells each character of text takes: char_width, except that an emoji after
    a ZERO WIDTH JOINER takes none. 👩‍💻 is then one glyph two cells wide, as tmux,
    kitty, WezTerm and iTerm2 draw it (xterm draws both halves: no count is right
    on every terminal, and this one is right on most)."""
    joined = False
    for ch in text:
        yield 0 if joined and grapheme_break(ch) == "ExtPict" else char_width(ch)
        joined = ch == "\u200d"


def display_width(text: str) -> int:
    """How many terminal cells text takes on one unbounded row."""
    return sum(cell_widths(text))


def is_control(ch: str) -> bool:
    """True for C0, DEL and C1 control characters: they move, they don't draw."""
    return unicodedata.category(ch) == "Cc"


# Keys. In raw mode a key arrives as a character (a, or ^A = "\x01") or as an
# escape sequence (Left = ESC [ D), and a read may end inside a sequence.

#: What a KeyEvent is: typed text, a pasted block, or one named key.
Key = enum.Enum("Key", ["TEXT", "PASTE", "ENTER", "TAB", "BACKSPACE", "DELETE",
                        "LEFT", "RIGHT", "UP", "DOWN", "HOME", "END",
                        "CTRL_A", "CTRL_B", "CTRL_C", "CTRL_D", "CTRL_E", "CTRL_F",
                        "CTRL_K", "CTRL_L", "CTRL_N", "CTRL_P", "CTRL_U", "CTRL_W", "CTRL_Z"])


class KeyEvent(typing.NamedTuple):
    """One thing the user did; text is set for Key.TEXT and Key.PASTE only."""

    key: Key
    text: str = ""


#: Control characters that are keys. Enter sends \r in raw mode; \n comes
#: from Ctrl-J and from pipes. Terminals send DEL for Backspace, some ^H.
CONTROL_KEYS = {
    "\x01": Key.CTRL_A, "\x02": Key.CTRL_B, "\x03": Key.CTRL_C, "\x04": Key.CTRL_D,
    "\x05": Key.CTRL_E, "\x06": Key.CTRL_F, "\x08": Key.BACKSPACE, "\t": Key.TAB,
    "\n": Key.ENTER, "\x0b": Key.CTRL_K, "\x0c": Key.CTRL_L, "\r": Key.ENTER,
    "\x0e": Key.CTRL_N, "\x10": Key.CTRL_P, "\x15": Key.CTRL_U, "\x17": Key.CTRL_W,
    "\x1a": Key.CTRL_Z, "\x7f": Key.BACKSPACE,
}

#: ESC [ X and ESC O X, by their last character. Parameters are ignored, so
#: Ctrl-Left (ESC [ 1 ; 5 D) moves like Left.
FINAL_KEYS = {"A": Key.UP, "B": Key.DOWN, "C": Key.RIGHT, "D": Key.LEFT,
              "H": Key.HOME, "F": Key.END}

#: ESC [ n ~, by n: the VT220 keypad (1, 4) and rxvt (7, 8) both survive.
TILDE_KEYS = {"1": Key.HOME, "7": Key.HOME, "4": Key.END, "8": Key.END, "3": Key.DELETE}


def escape_end(text: str, start: int) -> int | None:
    """Where the escape sequence at text[start] ends, or None if text ends first."""
    if start + 1 >= len(text):
        return None
    if text.startswith(CSI, start):
        # ECMA-48 §5.4: parameter and intermediate bytes (0x20-0x3F), then one
        # final byte (0x40-0x7E). Anything else ends a broken sequence early.
        for i in range(start + 2, len(text)):
            if "\x40" <= text[i] <= "\x7e":
                return i + 1
            if not "\x20" <= text[i] <= "\x3f":
                return i
        return None
    if text.startswith(SS3, start):
        return start + 3 if start + 2 < len(text) else None
    if text[start + 1] == ESC:
        return start + 1      # a lone ESC before another sequence: drop it alone
    return start + 2          # ESC and one character: Alt+key, which we ignore


class KeyDecoder:
    """Turns what a raw-mode terminal sends into KeyEvents, however it is split."""

    def __init__(self) -> None:
        self._unread = ""                         # a sequence cut off by the end of a feed
        self._pasted: list[str] | None = None     # a bracketed paste being collected

    def feed(self, data: str) -> list[KeyEvent]:
        """The events data completes; anything unfinished waits for the next feed."""
        text, self._unread = self._unread + data, ""
        events: list[KeyEvent] = []
        i = 0
        while i < len(text):
            if self._pasted is not None:
                i = self._collect_paste(text, i, events)
            elif text[i] == ESC:
                end = escape_end(text, i)
                if end is None:
                    self._unread = text[i:]
                    break
                self._escape(text[i:end], events)
                i = end
            else:
                i = self._plain(text, i, events)
        return events

    def _plain(self, text: str, i: int, events: list[KeyEvent]) -> int:
        """Decode typed text or one control character at text[i]; return where to go on."""
        end = i
        while end < len(text) and not is_control(text[end]):
            end += 1
        if end > i:
            events.append(KeyEvent(Key.TEXT, text[i:end]))
            return end
        if text[i] in CONTROL_KEYS:
            events.append(KeyEvent(CONTROL_KEYS[text[i]]))
        return i + 1          # other control characters mean nothing to a line editor

    def _escape(self, sequence: str, events: list[KeyEvent]) -> None:
        """Act on one whole escape sequence: a key, a paste starting, or nothing."""
        key = None
        if sequence == PASTE_START:
            self._pasted = []
        elif sequence.startswith(CSI) and sequence.endswith("~"):
            key = TILDE_KEYS.get(sequence[2:-1].split(";")[0])
        elif sequence.startswith((CSI, SS3)):
            key = FINAL_KEYS.get(sequence[-1])
        if key is not None:   # unknown sequences (F1, Alt+x, focus reports) vanish whole
            events.append(KeyEvent(key))

    def _collect_paste(self, text: str, i: int, events: list[KeyEvent]) -> int:
        """Collect pasted text up to PASTE_END; return where decoding goes on."""
        assert self._pasted is not None
        end = text.find(PASTE_END, i)
        if end == -1:
            # Hold back an ESC near the end: it may be PASTE_END, cut in two.
            held = text.rfind(ESC, max(i, len(text) - len(PASTE_END) + 1))
            end = len(text) if held == -1 else held
            self._pasted.append(text[i:end])
            self._unread = text[end:]
            return len(text)
        self._pasted.append(text[i:end])
        events.append(KeyEvent(Key.PASTE, "".join(self._pasted)))
        self._pasted = None
        return end + len(PASTE_END)


# Grapheme clusters. What a reader takes for one character may be several
# code points: e + U+0301 is é; 👋🏽 is a hand and a skin tone; 👩‍💻 is a
# woman, a ZERO WIDTH JOINER and a laptop; 🇫🇷 is two regional indicators;
# and 1️⃣ is a digit, U+FE0F and U+20E3. Unicode calls that unit an extended grapheme
# cluster (UAX #29 §3, https://www.unicode.org/reports/tr29/), and the editor
# moves and deletes by it: stepping by code points, Left then Q would type
# into the middle of 👩‍💻, and Backspace would leave half a flag. Whether two
# code points hold together depends on their Grapheme_Cluster_Break property
# and, for emoji and flags, on what came before: the rules GB3-GB13 in
# breaks_between(). unicodedata lacks that property, so grapheme_break()
# derives it from what unicodedata has (categories, Hangul syllables and jamo
# names) and from the small tables below, which follow Unicode 15.1 (the
# version of Python 3.13's unicodedata; an older one takes characters newer
# than itself for Other). Left out: GB9c (new in 15.1), which holds Indic
# conjuncts such as क्ष together; the cursor may stop inside them.

def code_points(table: str) -> tuple[range, ...]:
    """A table of code points, '0E33 1F3FB-1F3FF', as ranges."""
    return tuple(range(int(first, 16), int(last or first, 16) + 1)
                 for first, _, last in (item.partition("-") for item in table.split()))


def in_table(char: str, table: tuple[range, ...]) -> bool:
    """Whether char is in one of the table's ranges."""
    return any(ord(char) in block for block in table)


#: Extend, though not a mark (Mn or Me; variation selectors are Mn): the rest
#: of Other_Grapheme_Extend (PropList.txt), such as some vowel signs, ZWNJ,
#: the halfwidth kana voicing marks ﾞﾟ and the tags; and the skin tones.
EXTEND_TOO = code_points("""
    09BE 09D7 0B3E 0B57 0BBE 0BD7 0CC2 0CD5-0CD6 0D3E 0D57 0DCF 0DDF 1B35 200C
    302E-302F FF9E-FF9F 1133E 11357 114B0 114BD 115AF 11930 1D165 1D16E-1D172
    1F3FB-1F3FF E0020-E007F""")

#: Prepend: signs written before the letter they go with (Arabic number
#: signs, some Indic repha and prefixed consonants).
PREPEND = code_points("""
    0600-0605 06DD 070F 0890-0891 08E2 0D4E 110BD 110CD 111C2-111C3 1193F 11941
    11A3A 11A84-11A89 11D46 11F02""")

#: Spacing marks (Mc) that the standard doesn't keep with the letter before
#: them (UAX #29 Table 2); and two letters (Lo) that it does: Thai and Lao AM.
NOT_SPACING_MARKS = code_points("""
    102B-102C 1038 1062-1064 1067-106D 1083 1087-108C 108F 109A-109C 1A61
    1A63-1A64 AA7B AA7D 11720-11721""")
SPACING_LETTERS = "\u0e33\u0eb3"

#: Default-ignorable blocks: what is unassigned there counts as a control.
IGNORABLE = code_points("2065 FFF0-FFF8 E0000-E0FFF")

#: Extended_Pictographic (emoji-data.txt, Unicode 15.1): emoji and the symbols
#: reserved for future ones, which GB11 joins with ZWJ.
EXTENDED_PICTOGRAPHIC = code_points("""
    00A9 00AE 203C 2049 2122 2139 2194-2199 21A9-21AA 231A-231B 2328 2388 23CF
    23E9-23F3 23F8-23FA 24C2 25AA-25AB 25B6 25C0 25FB-25FE 2600-2605 2607-2612
    2614-2685 2690-2705 2708-2712 2714 2716 271D 2721 2728 2733-2734 2744 2747
    274C 274E 2753-2755 2757 2763-2767 2795-2797 27A1 27B0 27BF 2934-2935
    2B05-2B07 2B1B-2B1C 2B50 2B55 3030 303D 3297 3299 1F000-1F0FF 1F10D-1F10F
    1F12F 1F16C-1F171 1F17E-1F17F 1F18E 1F191-1F19A 1F1AD-1F1E5 1F201-1F20F
    1F21A 1F22F 1F232-1F23A 1F23C-1F23F 1F249-1F3FA 1F400-1F53D 1F546-1F64F
    1F680-1F6FF 1F774-1F77F 1F7D5-1F7FF 1F80C-1F80F 1F848-1F84F 1F85A-1F85F
    1F888-1F88F 1F8AE-1F8FF 1F90C-1F93A 1F93C-1F945 1F947-1FAFF 1FC00-1FFFD""")

REGIONAL_INDICATORS = code_points("1F1E6-1F1FF")   # 🇦..🇿: two make a flag
HANGUL_SYLLABLES = code_points("AC00-D7A3")          # each an LV or an LVT
HANGUL_JAMO = {"CHOSEONG": "L", "JUNGSEONG": "V", "JONGSEONG": "T"}   # leading, vowel, trailing
NAMED_BREAKS = {"\r": "CR", "\n": "LF", "\u200d": "ZWJ"}
CONTROLS = ("CR", "LF", "Control")


def grapheme_break(char: str) -> str:
    """char's Grapheme_Cluster_Break (UAX #29 Table 2), with "ExtPict" for Extended_Pictographic."""
    category = unicodedata.category(char)
    if char in NAMED_BREAKS:
        return NAMED_BREAKS[char]
    if in_table(char, REGIONAL_INDICATORS):
        return "RI"
    if in_table(char, PREPEND):
        return "Prepend"
    if category in ("Mn", "Me") or in_table(char, EXTEND_TOO):
        return "Extend"
    if category in ("Cc", "Cf", "Zl", "Zp") or (category == "Cn" and in_table(char, IGNORABLE)):
        return "Control"
    if (category == "Mc" and not in_table(char, NOT_SPACING_MARKS)) or char in SPACING_LETTERS:
        return "SpacingMark"
    if in_table(char, HANGUL_SYLLABLES):   # Unicode §3.12: 28 trailing choices, the first none
        return "LV" if (ord(char) - 0xAC00) % 28 == 0 else "LVT"
    kind = unicodedata.name(char, "").split()[:2]   # HANGUL CHOSEONG KIYEOK: an L
    if kind[0:1] == ["HANGUL"] and kind[-1] in HANGUL_JAMO:
        return HANGUL_JAMO[kind[-1]]
    return "ExtPict" if in_table(char, EXTENDED_PICTOGRAPHIC) else "Other"


def breaks_between(before: str, after: str, joins_emoji: bool, pairs_flag: bool) -> bool:
    """Whether a cluster ends between two code points, given their grapheme_break().

    joins_emoji: the cluster so far ends with ExtPict Extend* ZWJ;
    pairs_flag: it ends with an odd number of regional indicators.
    """
    if before == "CR" and after == "LF":
        return False      # GB3: CR LF is one
    if before in CONTROLS or after in CONTROLS:
        return True       # GB4, GB5: other controls stand alone
    if before == "L" and after in ("L", "V", "LV", "LVT"):
        return False      # GB6: Hangul jamo make a syllable
    if before in ("LV", "V") and after in ("V", "T"):
        return False      # GB7
    if before in ("LVT", "T") and after == "T":
        return False      # GB8
    if after in ("Extend", "ZWJ", "SpacingMark"):
        return False      # GB9, GB9a: marks, joiners and skin tones stay with what they follow
    if before == "Prepend":
        return False      # GB9b
    if joins_emoji and after == "ExtPict":
        return False      # GB11: 👩 ZWJ 💻
    if pairs_flag and after == "RI":
        return False      # GB12, GB13: regional indicators pair up, 🇫🇷 🇩🇪
    return True           # GB999


def next_boundary(text: str, i: int) -> int:
    """Where the cluster that starts at index i ends; i must be a boundary."""
    if i >= len(text):
        return len(text)
    before = grapheme_break(text[i])
    emoji, joins_emoji, pairs_flag = before == "ExtPict", False, before == "RI"
    for j in range(i + 1, len(text)):
        after = grapheme_break(text[j])
        if breaks_between(before, after, joins_emoji, pairs_flag):
            return j
        joins_emoji = emoji and after == "ZWJ"
        emoji = after == "ExtPict" or (emoji and after == "Extend")   # ExtPict Extend*
        pairs_flag = after == "RI" and not pairs_flag
        before = after
    return len(text)


def previous_boundary(text: str, i: int) -> int:
    """Where the cluster before index i starts: the one that ends at i, or holds text[i - 1]."""
    # Back to a sure boundary, one that earlier text can't undo: a pair that
    # breaks even where GB11 or GB12 could apply (they only ever join). Then
    # forward, cluster by cluster.
    start = max(i - 1, 0)
    while start > 0:
        before, after = grapheme_break(text[start - 1]), grapheme_break(text[start])
        if breaks_between(before, after, before == "ZWJ", before == "RI"):
            break
        start -= 1
    end = next_boundary(text, start)
    while end < i:
        start, end = end, next_boundary(text, end)
    return start


# Editing, with the keys of Emacs and readline. The cursor steps over and deletes
# whole grapheme clusters: it never stops between an "e" and its accent, or inside 👩‍💻.

class Action(enum.Enum):
    """What the client must do, besides sending lines and redrawing."""

    EOF = "eof"                # Ctrl-D on an empty line: the user is done
    INTERRUPT = "interrupt"    # Ctrl-C (raw mode: no SIGINT, it arrives as a key)
    SUSPEND = "suspend"        # Ctrl-Z (likewise no SIGTSTP: the client stops itself)
    REDRAW = "redraw"          # Ctrl-L: clear the screen and draw the input again


#: Keys that are a request to the client, not an edit.
KEY_ACTIONS = {Key.CTRL_C: Action.INTERRUPT, Key.CTRL_Z: Action.SUSPEND, Key.CTRL_L: Action.REDRAW}


class LineEditor:
    """The line being typed: a buffer, a cursor index into it, and the history."""

    def __init__(self, history_size: int = INPUT_HISTORY_SIZE) -> None:
        self.buffer = ""
        self.cursor = 0               # 0 .. len(buffer): a code point index, at a cluster boundary
        self.history: list[str] = []  # sent lines, oldest first
        self.history_size = history_size
        self._recalled = 0            # how many lines back Up has gone; 0: the new line
        self._draft = ""              # the new line, kept while Up and Down browse

    def handle(self, event: KeyEvent) -> list[str | Action]:
        """Apply one key event; return the lines to send (str) and Actions, in order."""
        key = event.key
        if key is Key.TEXT:
            self.insert(event.text)
        elif key is Key.PASTE:
            return self.paste(event.text)
        elif key is Key.ENTER:
            return [self.submit()]
        elif key is Key.CTRL_D and not self.buffer:
            return [Action.EOF]
        elif key in KEY_ACTIONS:
            return [KEY_ACTIONS[key]]
        else:
            self.edit(key)
        return []

    def edit(self, key: Key) -> None:
        """Move the cursor, delete, or browse the history, as key says."""
        # Not a match statement: Python 3.7-3.9 must parse this file to say it needs 3.10.
        if key in (Key.LEFT, Key.CTRL_B):
            self.cursor = previous_boundary(self.buffer, self.cursor)
        elif key in (Key.RIGHT, Key.CTRL_F):
            self.cursor = next_boundary(self.buffer, self.cursor)
        elif key in (Key.HOME, Key.CTRL_A):
            self.cursor = 0
        elif key in (Key.END, Key.CTRL_E):
            self.cursor = len(self.buffer)
        elif key is Key.BACKSPACE:
            self._delete(previous_boundary(self.buffer, self.cursor), self.cursor)
        elif key in (Key.DELETE, Key.CTRL_D):
            self._delete(self.cursor, next_boundary(self.buffer, self.cursor))
        elif key is Key.CTRL_K:
            self._delete(self.cursor, len(self.buffer))
        elif key is Key.CTRL_U:
            self._delete(0, self.cursor)
        elif key is Key.CTRL_W:
            self._delete(self._word_start(), self.cursor)
        elif key in (Key.UP, Key.CTRL_P):
            self._recall(self._recalled + 1)
        elif key in (Key.DOWN, Key.CTRL_N):
            self._recall(self._recalled - 1)
        elif key is Key.TAB:
            self.insert(TAB_SPACES)

    def insert(self, text: str) -> None:
        """Type text at the cursor: tabs as spaces, other control characters dropped."""
        text = "".join(ch for ch in text.replace("\t", TAB_SPACES) if not is_control(ch))
        self.buffer = self.buffer[:self.cursor] + text + self.buffer[self.cursor:]
        self.cursor = self._boundary_from(self.cursor + len(text))

    def paste(self, text: str) -> list[str | Action]:
        """A pasted block, as if typed: each complete line is sent on its own. What
        was after the cursor stays after the paste, in the line still being typed."""
        *lines, rest = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        after = self.buffer[self.cursor:] if lines else ""
        self.buffer = self.buffer[:len(self.buffer) - len(after)]
        sent: list[str | Action] = []
        for line in lines:
            self.insert(line)
            sent.append(self.submit())
        self.insert(rest)
        self.buffer += after   # the cursor stays where the paste ended
        return sent

    def submit(self) -> str:
        """Enter: the line is done; remember it and start a new one."""
        line = self.buffer
        if line and self.history[-1:] != [line]:    # a line sent twice is recalled once
            self.history.append(line)
            if len(self.history) > self.history_size:
                del self.history[0]
        self.buffer, self.cursor, self._recalled, self._draft = "", 0, 0, ""
        return line

    def _recall(self, back: int) -> None:
        """Show the line sent `back` lines ago (0: the new line), if there is one."""
        if not 0 <= back <= len(self.history):
            return
        if self._recalled == 0:
            self._draft = self.buffer
        self._recalled = back
        self.buffer = self.history[-back] if back else self._draft
        self.cursor = len(self.buffer)

    def _delete(self, start: int, end: int) -> None:
        self.buffer = self.buffer[:start] + self.buffer[end:]
        self.cursor = self._boundary_from(start)

    def _boundary_from(self, i: int) -> int:
        """i, or the end of the cluster i is inside: an edit can join what was apart
        (an "e" typed before an accent, a regional indicator before another)."""
        return next_boundary(self.buffer, previous_boundary(self.buffer, i)) if i else 0

    def _word_start(self) -> int:
        """Where the word before the cursor starts (Ctrl-W: spaces, then the word)."""
        i = self.cursor
        while i > 0 and self.buffer[i - 1].isspace():
            i -= 1
        while i > 0 and not self.buffer[i - 1].isspace():
            i -= 1
        return i


# Drawing. The input is laid out in rows of the terminal's width, and each row
# is written followed by "\r\n" rather than left to the terminal's own
# wrapping: then we, not the terminal, decide where every row starts, and
# terminals that reflow on resize won't join our rows back together.

def cursor_up(rows: int) -> str:
    """Move the cursor up; nothing for 0 (ESC [ 0 A would move one row)."""
    return f"{CSI}{rows}A" if rows > 0 else ""


def cursor_right(columns: int) -> str:
    """Move the cursor right; nothing for 0 (ESC [ 0 C would move one column)."""
    return f"{CSI}{columns}C" if columns > 0 else ""


def rows_needed(cells: int, width: int) -> int:
    """How many rows of `width` cells a row of `cells` cells takes (at least one)."""
    return max(1, -(-cells // width))     # -(-a // b) rounds a / b up


class Layout(typing.NamedTuple):
    """Where text goes on the screen: its rows, and the cursor's row and column."""

    rows: list[str]
    cursor_row: int
    cursor_col: int


def layout(text: str, cursor: int, width: int) -> Layout:
    """Break text into rows of at most width cells; find the cell of text[cursor]."""
    rows, col = [""], 0
    cursor_row = cursor_col = 0
    for i, (ch, w) in enumerate(zip(text, cell_widths(text))):
        if col + w > width:    # a wide char that would straddle the margin starts the next row
            rows.append("")
            col = 0
        if i == cursor:
            cursor_row, cursor_col = len(rows) - 1, col
        rows[-1] += ch
        col += w
    # Pending wrap: a terminal that has just filled the last column leaves
    # the cursor *on* it until the next character comes. An input that ends
    # there gets one more, empty, row (reached by "\r\n"), so the cursor at
    # the end really is on the next row and our count stays the terminal's.
    if col == width:
        rows.append("")
        col = 0
    if cursor >= len(text):
        cursor_row, cursor_col = len(rows) - 1, col
    return Layout(rows, cursor_row, cursor_col)


def wrap_rows(text: str, width: int) -> list[str]:
    """A line that is not being edited, in rows: no extra row when it fills the last."""
    rows = layout(text, 0, width).rows
    return rows[:-1] if len(rows) > 1 and not rows[-1] else rows


def visible_rows(count: int, cursor_row: int, height: int) -> range:
    """Which rows of the input to draw: all of them, if they fit."""
    # An input taller than the screen would scroll its own first row away, and
    # no cursor movement can reach that row again. So draw at most height - 1
    # rows (one is left for the room), centred on the cursor's row but kept
    # within the input: typing at the end shows the last rows, Home the first.
    size = max(1, height - 1)
    if count <= size:
        return range(count)
    top = min(max(cursor_row - size // 2, 0), count - size)
    return range(top, top + size)


class InputView:
    """Draws the prompt and the buffer below everything else on the screen."""

    def __init__(self, prompt: str = "> ") -> None:
        """prompt is plain text: escape sequences in it would throw the count off."""
        self.prompt = prompt
        self._width = MIN_WIDTH   # the width of the last drawing (none yet: any will do)
        self.forget()

    def forget(self) -> None:
        """Take the cursor's row as the input's first row (after fg, or Ctrl-L)."""
        self._widths_above: list[int] = []   # cells in each drawn row above the cursor's
        self._cursor_col = 0

    def redraw(self, buffer: str, cursor: int, width: int, height: int,
               status: Sequence[str] = ()) -> str:
        """Erase the input as last drawn; draw it again: status lines (dimmed), prompt, buffer."""
        width = max(width, MIN_WIDTH)
        start = self._erase(width)
        # Status lines may quote the server (a close reason): escaped as its lines are.
        above = [row for line in status for row in wrap_rows(printable(line), width)]
        # Shown as lines from the room are (printable): a typed U+202E must not
        # reorder the row. The text either side of the cursor is escaped apart,
        # so the cursor's index counts an escape's characters (\u202e: six)
        # and never falls inside one.
        before, after = printable(buffer[:cursor]), printable(buffer[cursor:])
        text = self.prompt + before + after
        rows, cursor_row, cursor_col = layout(text, len(self.prompt + before), width)
        rows, cursor_row = above + rows, cursor_row + len(above)
        shown = visible_rows(len(rows), cursor_row, height)
        self._widths_above = [display_width(row) for row in rows[shown.start:cursor_row]]
        self._cursor_col, self._width = cursor_col, width
        drawn = "\r\n".join(DIM.format(row) if i < len(above) else row
                             for i, row in enumerate(rows[shown.start:shown.stop], shown.start))
        back = cursor_up(shown.stop - 1 - cursor_row) + "\r" + cursor_right(cursor_col)
        return start + drawn + back

    def show_above(self, lines: list[str], buffer: str, cursor: int, width: int, height: int,
                   status: Sequence[str] = ()) -> str:
        """Erase the input, write lines where it was, and draw the input again below them."""
        # "\r\n" after a line also ends a pending wrap if it filled its last row.
        written = "".join(line + "\r\n" for line in lines)
        return (self._erase(max(width, MIN_WIDTH)) + written
                + self.redraw(buffer, cursor, width, height, status))

    def clear(self) -> str:
        """Erase the input, leaving the cursor where its first row was."""
        return self._erase(self._width)

    def _erase(self, width: int) -> str:
        """Move to the start of the input's first row and erase from there down."""
        # Counting each row above at the *current* width gives the plain row
        # count when nothing changed. After a resize it assumes the terminal
        # reflows lines, as tmux, VTE, kitty, iTerm2 and Windows Terminal do:
        # when narrower, each of our rows (and the cursor's) splits in as many
        # rows as it now needs; when wider, our "\r\n" rows stay apart. xterm
        # doesn't reflow, so there a narrowing overshoots: a few rows of the
        # room above the input are erased. We take that over leaving pieces
        # of the old input on the screen.
        rows = sum(rows_needed(cells, width) for cells in self._widths_above)
        rows += self._cursor_col // width
        self.forget()
        return cursor_up(rows) + "\r" + ERASE_BELOW


# 16. Client ################################################################
#
# The terminal client. Theory of operation: three things go on at once, all
# in the event loop, and meet in one ChatClient:
#
#   the keyboard   lines the user typed, in a Keyboard queue: from the line
#                  editor (section 15) at a terminal, from a thread reading
#                  plain lines when stdin is a pipe (or termios is missing)
#   the network    a Connection that reconnects with backoff; every line
#                  from the room goes to the Screen, escaped by printable()
#   delivery       the Sender sends typed lines at the room's pace, and the
#                  DeliveryLedger keeps each until the room's copy of it comes
#                  back (the server relays each line to its sender too, in
#                  order): waiting -> sent -> confirmed. Lines still waiting
#                  are shown dimmed under the room's lines; after a dropped
#                  connection they are sent again; at exit, those never
#                  confirmed are listed, and the exit status is 1.

#: Close codes after which the server may well come back: reconnect then.
#: Anything else (a refused name, a protocol error) would only repeat.
RECONNECT_CODES = frozenset({
    CloseCode.GOING_AWAY, CloseCode.ABNORMAL_CLOSURE, CloseCode.INTERNAL_ERROR,
    CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER, CloseCode.BAD_GATEWAY})

#: Reconnection waits 1, 2, 4 ... seconds, never more than 30 (the page's too).
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0


def next_backoff(delay: float) -> float:
    """How long to wait before the next try, after one that waited ``delay``."""
    return min(delay * 2, MAX_BACKOFF)


class Reconnecting:
    """A spell of tries to get back into the room, and what to say of it: no I/O.

    It begins when a connection ends or a try fails, and ends only when the
    room greets us. Not when a connection opens: a room that can't take us
    (1013) opens it and closes it at once, and starting again from a 1 s
    wait after each such close made clients retry every second for as long
    as the room was split. At a terminal, the spell is one status line that
    changes (status); piped, a line when it begins and one when it ends.
    """

    def __init__(self, first_backoff: float = FIRST_BACKOFF) -> None:
        self.first_backoff = first_backoff
        self.tries = 0               # in this spell, the one under way or next included; 0: none
        self.delay = first_backoff   # the wait before that try
        self.why = ""                # why the connection ended, or the last try failed
        self.trying = False          # that try is under way (else we wait for it)
        self._since = 0.0            # when the spell began (time.monotonic())

    def failed(self, why: str) -> None:
        """The connection ended, or a try failed: wait longer than the last time, then try."""
        if not self.tries:
            self._since = time.monotonic()
        self.delay = next_backoff(self.delay) if self.tries else self.first_backoff
        self.tries += 1
        self.why, self.trying = why, False

    def status(self) -> list[str]:
        """The terminal's status line for the spell (none outside one)."""
        if not self.tries:
            return []
        when = "now" if self.trying else f"in {self.delay:g} s"
        return [f"{NOTICE_MARK}reconnecting {when} (attempt {self.tries}: {self.why})"]

    def begun(self, said_why: bool = False) -> str:
        """The one line a pipe gets when the spell begins (``said_why``: without the why)."""
        why = "" if said_why else f"{self.why}; "
        return (f"* {why}reconnecting in {self.delay:g} s, then waiting longer each "
                f"time, up to {MAX_BACKOFF:g} s")

    def over(self) -> str | None:
        """The room greeted us: the spell is over; its last line (None: there was no spell)."""
        if not self.tries:
            return None
        said = (f"* reconnected after {plural(self.tries, 'attempt')} "
                f"({time.monotonic() - self._since:.0f} s)")
        self.tries, self.trying = 0, False
        return said


#: The client pings every 5 s: a link that died silently (a frozen network)
#: is noticed within 15 s, the 5 s close timeout included, not the server's 40.
CLIENT_KEEPALIVE_INTERVAL = 5.0

#: How long leaving (end of input, Ctrl-D, /quit) waits for the room to
#: confirm the lines still on their way; then those are listed as not sent.
CONFIRM_TIMEOUT = 10.0

#: Marks a line sent again that the others may have seen (see DeliveryLedger.greeted).
RESENT_MARK = "(resent) "

#: Confirmed lines kept, to send again if the room turns out to have lost them.
MAX_KEPT_CONFIRMED = 1000

#: At most this many of our lines on their way are listed under the room's; the rest are counted.
MAX_WAITING_SHOWN = 5

#: Lines the terminal keeps to draw the screen again after a resize.
MAX_REPAINTED_LINES = 200

#: The input line's prompt while the client asks for a name, not the chat's "> ".
NAME_PROMPT = "name> "

#: How a client marks what it shows, so that no member can pass for anyone
#: else: the server's notices and the client's own ("-!- bob left: bye")
#: apart from actions ("* bob waves"), which any member can write, as irssi
#: draws them. Only the display; the wire keeps LINES. The page uses them too.
NOTICE_MARK = "-!- "
ACTION_MARK = "* "

STYLES = {"mine": "1;32", "private": "35", "notice": "33", "history": "2", "error": "31",
          "action": "36"}


def echo_of(line: str, name: str) -> str | None:
    """How the room relays a line we send, so we know it arrived; None: no copy comes back."""
    try:
        parsed = parse_line(line)
    except ValueError:
        return None
    if isinstance(parsed, ChatLine):
        return LINES["said"].template.format(name=name, text=parsed.text)
    if isinstance(parsed, Command) and parsed.name == "me":
        return LINES["action"].template.format(name=name, text=parsed.argument)
    return None   # other commands get replies, not copies


def mark_resent(line: str) -> str:
    """The line with RESENT_MARK where the others will see it."""
    parsed = parse_line(line)
    if isinstance(parsed, Command):   # only /me is ever resent (see echo_of)
        return f"/me {RESENT_MARK}{parsed.argument}"
    assert isinstance(parsed, ChatLine)
    return RESENT_MARK + parsed.text   # "//etc" -> "(resent) /etc": no longer a command


class DeliveryLedger:
    """Which of our lines the room has yet to confirm, and which to send again: no I/O."""

    def __init__(self) -> None:
        self.unconfirmed: collections.deque[str] = collections.deque()   # oldest first
        self.delivered = 0   # of ours the room confirmed: what its greeting counts too
        # The latest confirmed, in case the room loses them (see greeted).
        self.confirmed: collections.deque[str] = collections.deque(maxlen=MAX_KEPT_CONFIRMED)
        self.lost = 0        # confirmed lines the room lost that were no longer kept

    def sent(self, line: str) -> bool:
        """``line`` went out, or may have; False if no copy will come back (a command's reply)."""
        if echo_of(line, "") is None:   # whether a copy comes back doesn't depend on the name
            return False
        self.unconfirmed.append(line)
        return True

    def confirms(self, line: str, name: str) -> bool:
        """Is this line from the room the copy of our oldest unconfirmed one? Then it is confirmed."""
        # Worked out with our name now: after a /nick, what was on its way comes back under it.
        if not self.unconfirmed or line != echo_of(self.unconfirmed[0], name):
            return False
        self.confirmed.append(self.unconfirmed.popleft())
        self.delivered += 1
        return True

    def greeted(self, has: int, same_room: bool) -> list[str]:
        """A new connection's greeting says the room has ``has`` of our lines: which to send again.

        Back in the same room (it gave our resume token back), the first
        ``has - delivered`` unconfirmed lines got there before the connection
        dropped (only their copies were lost); the rest are sent again as they
        were. A room that doesn't know us (the server restarted) can't say, and
        the old one may have relayed some to people who are here again: all
        are sent again, marked as possible repeats. So is everything when the
        count can't be reconciled: a room that has fewer than it confirmed lost
        lines (with --redis, a server crashed before sharing them), and those
        confirmed lines go again too, as far as they were kept.
        """
        lines, arrived = list(self.unconfirmed), has - self.delivered
        self.unconfirmed.clear()
        if same_room and 0 <= arrived <= len(lines):
            self.delivered = has
            return lines[arrived:]
        if same_room and arrived < 0:
            kept = list(self.confirmed)[max(0, len(self.confirmed) + arrived):]
            self.lost += -arrived - len(kept)
            lines = kept + lines
        self.confirmed.clear()
        self.delivered = has
        return [mark_resent(line) for line in lines]


def line_style(line: str, name: str) -> str:
    """Which STYLES entry a line from the room is shown in ("" for plain)."""
    for kind in ("notice", "action", "private"):   # named in STYLES as in LINES
        if LINES[kind].match(line):
            return kind
    return "mine" if line.startswith(LINES["said"].head(name)) else ""


def marked(line: str) -> str:
    """The line with the mark that says who wrote it (see NOTICE_MARK): a notice's
    "* " becomes NOTICE_MARK, an action "[bob] waves" becomes "* bob waves"."""
    action = LINES["action"].match(line)
    if action:
        return f"{ACTION_MARK}{action[1]} {line[action.end():]}"
    notice = LINES["notice"].match(line)
    if not notice:
        return line   # what a member says starts with "[name]": never with a mark
    if parse_greeting(line) is not None:   # the limits and the token are for the client
        line = line.split(" Limits: ")[0]
    return NOTICE_MARK + line[notice.end():]


def display_line(line: str, *, name: str, timestamps: bool, now: float) -> tuple[str, str]:
    """A line from the room as the terminal shows it, and its style.

    History lines carry their time in UTC; everything else is stamped now.
    Notices start with NOTICE_MARK, actions with ACTION_MARK (see marked).
    """
    stamp, style = now, ""
    history = LINES["history"].match(line)
    if history:
        with contextlib.suppress(ValueError):   # a month 13 from a broken server: stamp it now
            stamp = calendar.timegm(time.strptime(history[1], UTC_STAMP_FORMAT))
        line, style = line[history.end():], "history"
    style = style or line_style(line, name)
    text = printable(marked(line))
    return (time.strftime("%H:%M ", time.localtime(stamp)) + text if timestamps else text), style


#: What a shown line starts with before its text: the time, then a mark.
SHOWN_HEAD = re.compile(rf"(\d\d:\d\d )?({re.escape(NOTICE_MARK)}|{re.escape(ACTION_MARK)})?")


def wrap_words(text: str, width: int) -> list[str]:
    """A shown line in rows of at most ``width`` cells, broken between words.

    The terminal would break it wherever the row ends, mid-word. Rows after
    the first are indented under the text, past the time and the mark, and
    never start at the left edge, where only a notice's mark may be. A word
    longer than a row is broken where the row ends.
    """
    indent = " " * min(max(len(SHOWN_HEAD.match(text)[0]), 2), width // 2)
    rows = [""]
    for piece in re.findall(r" +|[^ ]+", text):
        if display_width(rows[-1] + piece) <= width:
            rows[-1] += piece
        elif piece.startswith(" "):
            rows.append(indent)   # the break takes the place of the spaces
        elif display_width(indent + piece) <= width and rows[-1].strip():
            rows[-1] = rows[-1].rstrip(" ")
            rows.append(indent + piece)
        else:
            start = 0   # longer than a row: break it where the row ends, not inside 👩‍💻
            while start < len(piece):
                end = next_boundary(piece, start)
                cluster = piece[start:end]
                if rows[-1].strip() and display_width(rows[-1] + cluster) > width:
                    rows.append(indent)
                rows[-1] += cluster
                start = end
    return rows


class Keyboard:
    """The lines the user typed, in order, until the client takes them."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque()
        self.ended = False          # end of input (Ctrl-D, or the end of a pipe)
        self.interrupted = False    # Ctrl-C or SIGTERM: leave now
        self.after_quit: int | None = None   # lines typed after /quit, counted, not kept
        self.on_change: Callable[[], None] = lambda: None   # e.g. redraw what is waiting
        self._changed = asyncio.Event()

    def put(self, line: str) -> None:
        if self.after_quit is not None:
            self.after_quit += 1
            return
        self.lines.append(line)
        self.changed()

    def close(self) -> None:
        """/quit: what was typed after it, and what is typed from now on, is not for the room."""
        self.after_quit = (self.after_quit or 0) + len(self.lines)
        self.lines.clear()
        self.changed()

    def end(self) -> None:
        self.ended = True
        self.changed()

    def interrupt(self) -> None:
        self.interrupted = True
        self.changed()

    def changed(self) -> None:
        """Wake whoever waits on the keyboard: what they wait for may have happened."""
        self._changed.set()
        self.on_change()

    @property
    def done(self) -> bool:
        """The user wants out: Ctrl-C, or the input ended and every line was taken."""
        return self.interrupted or (self.ended and not self.lines)

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
        self.changed()


def read_lines_in_thread(keyboard: Keyboard, stdin: typing.TextIO, prompt: str | None) -> None:
    """Feed the keyboard from plain line input: a pipe, or a terminal without termios.

    A daemon thread, because reading blocks and the event loop must not; it
    also means exiting never waits for Enter. ``prompt`` None reads a pipe.
    """
    loop = asyncio.get_running_loop()

    def read() -> None:
        while True:
            try:
                line = input(prompt) if prompt is not None else stdin.readline()
            except (EOFError, OSError, ValueError):
                line = ""
            if prompt is None and not line:
                break            # "" is the end of a pipe
            # Bytes that are not UTF-8 arrive as lone surrogates (surrogateescape):
            # shown and sent as U+FFFD, as the terminal's decoder does.
            line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            loop.call_soon_threadsafe(keyboard.put, line.rstrip("\n"))
        loop.call_soon_threadsafe(keyboard.end)

    threading.Thread(target=read, name="keyboard", daemon=True).start()


class Terminal:
    """A raw-mode POSIX terminal with the line editor: keys in, the room's lines drawn above."""

    def __init__(self, keyboard: Keyboard, fd: int, out: typing.TextIO,
                 status: Callable[[], list[str]]) -> None:
        self.keyboard, self.fd, self.out, self.status = keyboard, fd, out, status
        self.keys, self.editor, self.view = KeyDecoder(), LineEditor(), InputView()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # (text, colour) of the latest lines shown: wrapped again at each repaint's width.
        self.recent: collections.deque[tuple[str, str | None]] = collections.deque(
            maxlen=MAX_REPAINTED_LINES)
        self._saved: list | None = None   # the terminal's settings before raw mode

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._enter_raw_mode()
        loop.add_reader(self.fd, self._on_readable)
        loop.add_signal_handler(signal.SIGWINCH, self.repaint)
        loop.add_signal_handler(signal.SIGCONT, self._resumed)
        self.keyboard.on_change = self.redraw
        self.redraw()

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.fd)
        loop.remove_signal_handler(signal.SIGWINCH)
        loop.remove_signal_handler(signal.SIGCONT)
        self.keyboard.on_change = lambda: None
        self._leave_raw_mode()

    def _enter_raw_mode(self) -> None:
        """Keys as they are pressed, nothing echoed; Ctrl-C and Ctrl-Z arrive as keys.

        Not tty.setraw(): that also turns off output processing, and a stray
        "\\n" written by anyone else would then not return the carriage.
        """
        import termios
        self._saved = termios.tcgetattr(self.fd)
        attrs = termios.tcgetattr(self.fd)
        attrs[0] &= ~(termios.IXON | termios.ICRNL)                                # iflag
        attrs[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)  # lflag
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSADRAIN, attrs)
        self._write(BRACKETED_PASTE_ON)

    def _leave_raw_mode(self) -> None:
        import termios
        self._write(self.view.clear() + BRACKETED_PASTE_OFF)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.keyboard.end()
            return
        for event in self.keys.feed(self.utf8.decode(data)):
            for result in self.editor.handle(event):
                self._act(result)
        self.redraw()

    def _act(self, result: str | Action) -> None:
        if isinstance(result, str):
            if result.strip():
                self.keyboard.put(result)   # it shows again, dimmed, until the room has it
        elif result is Action.EOF:
            self.keyboard.end()
        elif result is Action.INTERRUPT:
            self.keyboard.interrupt()
        elif result is Action.SUSPEND:
            self._suspend()
        elif result is Action.REDRAW:
            self.repaint()

    def _suspend(self) -> None:
        """Ctrl-Z: give the terminal back as it was, stop; draw again after fg."""
        self._leave_raw_mode()
        os.kill(os.getpid(), signal.SIGTSTP)   # fg continues us: SIGCONT calls _resumed

    def _resumed(self) -> None:
        self._enter_raw_mode()
        self.repaint()   # the shell may have written over us meanwhile

    def show(self, text: str, color: str | None = None) -> None:
        """A line, above the input: wrapped between words, in ``color`` (an SGR code)."""
        self.recent.append((text, color))
        width, height = self._size()
        self._write(self.view.show_above(self._rows(text, color, width), self.editor.buffer,
                                         self.editor.cursor, width, height, self.status()))

    @staticmethod
    def _rows(text: str, color: str | None, width: int) -> list[str]:
        """The line's rows at this width, each coloured: a repaint may draw only the last."""
        rows = wrap_words(text, max(width, MIN_WIDTH))
        return [f"\x1b[{color}m{row}\x1b[0m" for row in rows] if color else rows

    def repaint(self) -> None:
        """Clear the screen and draw it again: the latest lines that fit, then the input.

        After a resize, terminals disagree about how they reflow what is on
        the screen (tmux, xterm and VTE all differ, and so does where they
        leave the cursor), so no redraw in place is right on all of them.
        Drawing again on a clean screen is. The lines above stay in the
        terminal's scrollback, as it reflowed them.
        """
        width, height = self._size()
        lines_below = [*map(printable, self.status()), self.view.prompt + printable(self.editor.buffer)]
        room = height - sum(rows_needed(display_width(line), width) for line in lines_below)
        shown: list[str] = []
        for text, color in reversed(self.recent):   # wrapped anew: the width may have changed
            rows = self._rows(text, color, width)
            room -= len(rows)
            if room < 0:
                break
            shown[:0] = rows
        self.view.forget()
        self._write(CSI + "H" + CSI + "2J" + "".join(line + "\r\n" for line in shown))
        self.redraw()

    def redraw(self) -> None:
        width, height = self._size()
        self._write(self.view.redraw(self.editor.buffer, self.editor.cursor,
                                     width, height, self.status()))

    def _size(self) -> tuple[int, int]:
        try:
            return os.get_terminal_size(self.fd)
        except OSError:
            return 80, 24

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class Screen:
    """Where lines go: escaped, stamped, coloured if wanted, above what is typed.

    At a terminal, everything is drawn there. Piped, the room's lines (and
    its answers to commands) go to ``out``, and the client's own words
    (connecting, not sent, an unknown command) to ``err``, so that a
    script reading stdout reads the room and nothing else.
    """

    def __init__(self, out: typing.TextIO, *, color: bool, timestamps: bool = True,
                 err: typing.TextIO | None = None) -> None:
        self.out, self.color, self.timestamps = out, color, timestamps
        self.err = out if err is None else err
        self.terminal: Terminal | None = None   # None: plain lines, as for a pipe

    def note(self, text: str, style: str = "notice") -> None:
        """The client's own word, not the room's: to ``err`` unless at the terminal."""
        self.show(text, style, own=True)

    def show(self, line: str, style: str | None = None, *, name: str = "", own: bool = False) -> None:
        """Show one line: in ``style``, or as display_line finds (``name`` is ours: "mine").

        A line given its ``style`` is the client's own, a notice like the room's.
        """
        if style is not None and not LINES["notice"].match(line):
            line = LINES["notice"].template.format(text=line)
        text, found_style = display_line(line, name=name, timestamps=self.timestamps,
                                         now=time.time())
        code = STYLES.get(found_style if style is None else style)
        if self.terminal is not None:
            self.terminal.show(text, code if self.color else None)
        else:
            out = self.err if own else self.out
            out.write(self.colored(text, code) + "\n")
            out.flush()

    def colored(self, text: str, code: str | None) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and code else text

    @contextlib.contextmanager
    def prompting(self, prompt: str) -> typing.Iterator[None]:
        """The input line starts with ``prompt`` meanwhile, not the chat's "> "."""
        if self.terminal is None:   # plain line input: its prompt is fixed
            yield
            return
        view, redraw = self.terminal.view, self.terminal.redraw
        chat_prompt, view.prompt = view.prompt, prompt
        redraw()
        try:
            yield
        finally:
            view.prompt = chat_prompt
            redraw()


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


def with_query(url: str, **params: str | None) -> str:
    """The URL with these query parameters set (None: left out)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in params]
    query += [(k, v) for k, v in params.items() if v]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def is_try_later(error: BaseException) -> bool:
    """Did the server refuse the connection for now (503: full, or too many from us)?"""
    return isinstance(error, InvalidStatus) and error.status == http.HTTPStatus.SERVICE_UNAVAILABLE


#: Why a connection ended, in words, by close code (the code follows, for experts).
CLOSE_WORDS = {
    CloseCode.NORMAL_CLOSURE: "the server closed the connection",
    CloseCode.GOING_AWAY: "the server is going away (restarting?)",
    CloseCode.PROTOCOL_ERROR: "one side broke the WebSocket protocol",
    CloseCode.UNSUPPORTED_DATA: "the server can't take that kind of message",
    CloseCode.NO_STATUS_RCVD: "the server closed the connection without saying why",
    CloseCode.ABNORMAL_CLOSURE: "the connection dropped",
    CloseCode.INVALID_PAYLOAD: "a message was not valid UTF-8 text",
    CloseCode.POLICY_VIOLATION: "the server refused",
    CloseCode.MESSAGE_TOO_BIG: "a message was too big",
    CloseCode.MANDATORY_EXTENSION: "the server lacks an extension the client needs",
    CloseCode.INTERNAL_ERROR: "the server hit an unexpected error",
    CloseCode.SERVICE_RESTART: "the server is restarting",
    CloseCode.TRY_AGAIN_LATER: "the room can't take you just now",   # a 503 too (see attempt)
    CloseCode.BAD_GATEWAY: "a proxy could not reach the server",
    CloseCode.TLS_HANDSHAKE: "the TLS handshake failed",
}

#: The reason Connection.keepalive_tick closes with: an ordinary thing (a
#: suspended laptop, a dead Wi-Fi), though its code, 1011, says "internal error".
KEEPALIVE_TIMEOUT_REASON = "keepalive ping timeout"


def describe_close(closed: ConnectionClosed) -> str:
    """Why the connection ended, for a person: words, the reason, then the code."""
    words = CLOSE_WORDS.get(closed.code, "the server closed the connection")
    # Ours (then often 1006: the dead link brought no close frame back) or the server's.
    if KEEPALIVE_TIMEOUT_REASON in (closed.reason, closed.sent and closed.sent.reason):
        text = "the connection went quiet (no answer to keepalive pings)"
    elif closed.reason and closed.code in (CloseCode.NORMAL_CLOSURE, CloseCode.POLICY_VIOLATION):
        text = closed.reason   # the server's own explanation says it best
    else:
        text = f"{words}: {closed.reason}" if closed.reason else words
    return f"{text} ({closed.code})"


#: How the room's reason starts when it refuses a name (taken, or not valid); the page's too.
NAME_REFUSAL = r"^(the|a) name "


def is_name_refusal(closed: ConnectionClosed) -> bool:
    """Did the room refuse our name (taken, or not a valid name)? Then another may do."""
    return closed.code == CloseCode.POLICY_VIOLATION and bool(re.match(NAME_REFUSAL, closed.reason))


class Sender:
    """Sends what the user types as the room will take it: none too long, none too fast."""

    def __init__(self, keyboard: Keyboard, screen: Screen, ledger: DeliveryLedger,
                 on_leaving: Callable[[], None]) -> None:
        self.keyboard, self.screen, self.ledger = keyboard, screen, ledger
        self.on_leaving = on_leaving               # the user asked to leave: end of input, /quit
        self.max_size: int | None = None           # the room's limits, from its greeting
        self.bucket: TokenBucket | None = None
        self.quit_reason: str | None = None        # /quit REASON, kept across reconnects
        self.refused = 0                           # lines refused here: see check_typed

    def obey(self, greeting: Greeting | None) -> None:
        """Keep to the limits in a new connection's greeting (None: it announced none)."""
        self.max_size = greeting.max_size if greeting else None
        self.bucket = None
        if greeting and greeting.rate:
            self.bucket = TokenBucket(greeting.rate, greeting.burst or 1)

    async def send_typed(self, conn: Connection, greeted: asyncio.Event) -> str | None:
        """Send what the user types, at the room's pace, until the user leaves.

        Returns the reason to close with ("" but for /quit REASON), or None if
        a send failed because the connection is closing.
        """
        # The greeting tells our name and the room's limits; Ctrl-C needn't wait for it.
        await self.keyboard.wait_until(lambda: greeted.is_set() or self.keyboard.interrupted)
        while True:
            if self.quit_reason is not None and not self.keyboard.lines:
                return self.quit_reason   # /quit: once every line typed before it is sent
            await self.keyboard.wait_until(lambda: bool(self.keyboard.lines) or self.keyboard.done)
            line = self.keyboard.take()
            if line is None:
                self.on_leaving()
                return ""
            try:
                await self.send_line(conn, line)
            except ConnectionClosed:
                return None

    async def send_line(self, conn: Connection, line: str) -> None:
        """Send one typed line, or note /quit REASON for send_typed to leave with."""
        parsed = self.check_typed(line)
        if parsed is None:
            return
        if isinstance(parsed, Command) and parsed.name == "quit":
            self.keyboard.close()
            self.on_leaving()
            self.quit_reason = parsed.argument or "bye"
            return
        sending = False
        try:
            while self.bucket is not None and not self.bucket.take():   # the room's pace
                if await self.interrupted_within(self.bucket.wait_time()):
                    self.keyboard.unget(line)   # Ctrl-C: leave now, without it
                    return
            if conn.state is not State.OPEN:
                raise ConnectionClosed(conn.close_rcvd, conn.close_sent, tcp_closed=False)
            sending = True
            await conn.send(line)
        except (ConnectionClosed, asyncio.CancelledError):
            # A line that got to send() and has a copy to come may be in the room: the next
            # greeting will tell (DeliveryLedger.greeted). Any other goes first next time.
            if not (sending and self.ledger.sent(line)):
                self.keyboard.unget(line)
            raise
        self.ledger.sent(line)
        self.keyboard.changed()

    async def interrupted_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds, unless Ctrl-C comes first; True if it did.

        Cancelled, like the send it paces, if the connection ends meanwhile.
        """
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.keyboard.wait_until(lambda: self.keyboard.interrupted), delay)
        return self.keyboard.interrupted

    def check_typed(self, line: str) -> Command | ChatLine | None:
        """What a typed line means, or None if it is not to be sent (and the screen says why).

        An unknown command, and a line longer than the room takes, would only
        be refused: they are refused here, before they are sent, and counted
        (the exit status is then 1).
        """
        try:
            parsed = parse_line(line)
        except ValueError as reply:
            self.screen.note(f"* {reply}", "error")
            self.refused += 1
            return None
        size = len(line.encode("utf-8"))
        if parsed is not None and self.max_size is not None and size > self.max_size:
            self.screen.note(f"* not sent: the line is {size} bytes; "
                             f"the room takes lines of up to {self.max_size}", "error")
            self.refused += 1
            return None
        return parsed


#: The notice before a replayed history: for a newcomer, and for one back after an outage.
HISTORY_BEGINS = types.MappingProxyType({
    "new": "history: what was said here before you came",
    "back": "history: what was said while you were away"})


class HistoryBlock:
    """Notices around the history a room replays after its greeting: no I/O.

    Dimmed is not enough (NO_COLOR, a pipe): a line from an hour ago must not
    read as said now. One notice before the first history line shown and one
    after the last, as IRC bouncers mark their playback, cost two rows, where
    a mark on every line would cost ten columns of each at 80.
    """

    def __init__(self) -> None:
        self.due: int | None = None   # history lines the greeting announced, still to come
        self.shown = 0                # history lines shown since the block began
        self.heading = ""

    def greeted(self, count: int | None, been_here: bool) -> None:
        """A greeting announced ``count`` lines of history (None: it didn't say)."""
        self.due, self.shown = count, 0
        # After a reconnect, only what we have not seen is shown (ChatClient.on_line).
        self.heading = "* " + HISTORY_BEGINS["back" if been_here else "new"]

    def around(self, history: bool, shown: bool) -> tuple[list[str], list[str]]:
        """The notices to show before and after one line from the room (``shown``: not a repeat)."""
        if not history:
            return self.end(), []   # the room has gone live: the block ends before this line
        before = [self.heading] if shown and not self.shown else []
        self.shown += shown
        if self.due is not None:
            self.due -= 1
        return before, self.end() if self.due == 0 else []

    def end(self) -> list[str]:
        if not self.shown:
            return []   # no block open (the greeting itself comes through here too)
        ended = [f"* end of history ({plural(self.shown, 'line')})"]
        self.due, self.shown = None, 0
        return ended


class ChatClient:
    """The session: connects, shows the room, reconnects when the server goes away."""

    def __init__(self, url: str, screen: Screen, keyboard: Keyboard, *, name: str | None = None,
                 history: int | None = None, reconnect: bool = True, interactive: bool = False,
                 ssl_context: ssl.SSLContext | None = None,
                 max_size: int = MAX_MESSAGE_SIZE + RELAY_OVERHEAD,
                 first_backoff: float = FIRST_BACKOFF, confirm_timeout: float = CONFIRM_TIMEOUT,
                 keepalive_interval: float = CLIENT_KEEPALIVE_INTERVAL,
                 on_connected: Callable[[], None] = lambda: None, compression: bool = True) -> None:
        self.url, self.screen, self.keyboard = url, screen, keyboard
        self.name = name or ""      # asked for, then the one the room gave us
        self.history_asked = history   # lines of history to be sent on joining; None: all
        self.reconnect, self.interactive = reconnect, interactive
        self.connect_options = dict(ssl_context=ssl_context, max_size=max_size,   # for connect()
                                    compression=compression)   # offer permessage-deflate (12)
        self.confirm_timeout = confirm_timeout
        self.reconnecting = Reconnecting(first_backoff)
        self.keepalive_interval = keepalive_interval
        self.on_connected = on_connected               # once, at the first connection
        self.token: str | None = None                  # gets our name back on a reconnect
        self.ledger = DeliveryLedger()
        self.sender = Sender(keyboard, screen, self.ledger, on_leaving=self.start_leaving)
        self.leave_by: float | None = None             # once the user asked to leave
        self.reconnected = False                       # then the history repeats what we saw
        self.greeted = asyncio.Event()                 # on the latest connection (see session)
        self.seen: collections.deque[str] = collections.deque(maxlen=2 * HISTORY_SIZE)
        self.history = HistoryBlock()

    def waiting(self) -> list[str]:
        """The terminal's status under the room's lines: a reconnection under way, then our
        lines still on their way, sent ones first, then typed ones."""
        lines = [*self.ledger.unconfirmed, *self.keyboard.lines]
        shown = [f"… {printable(line)}" for line in lines[:MAX_WAITING_SHOWN]]
        if len(lines) > MAX_WAITING_SHOWN:
            shown.append(f"… and {plural(len(lines) - MAX_WAITING_SHOWN, 'more line')} waiting")
        return self.reconnecting.status() + shown

    async def run(self) -> int:
        """The whole session; returns the exit status."""
        while True:
            outcome = await self.attempt()
            if isinstance(outcome, int):
                return self.finish(outcome)
            if outcome is None:
                continue   # a new name, tried at once
            if self.leave_by is not None and time.monotonic() > self.leave_by:
                return self.finish(0)   # gave up delivering: 1 if anything was lost
            self.reconnecting.failed(outcome)
            if self.screen.terminal is not None:
                self.keyboard.changed()   # the status line says it (see waiting)
            elif self.reconnecting.tries == 1:   # why, unless "disconnected: why" just said it
                self.screen.note(self.reconnecting.begun(said_why=self.greeted.is_set()))
            if await self.wants_out_within(self.reconnecting.delay):
                return self.finish(0)

    async def attempt(self) -> int | str | None:
        """One connection, to its end: an exit status, why to try again later, or None: now."""
        url = with_query(self.url, name=self.name or None, resume=self.token,
                         history=None if self.history_asked is None else str(self.history_asked))
        try:
            conn = await self.connect_unless_interrupted(url)
        except (OSError, HandshakeError, ValueError) as error:
            # A server we were in may come back; one never reached is likely a wrong URL.
            if not (self.reconnect and (self.reconnected or is_try_later(error))):
                self.screen.note(f"cannot connect to {self.url}: {explain_connect_error(error)}",
                                 "error")
                return 1
            if is_try_later(error):   # the same refusal as 1013, before the upgrade; its reason
                return f"{CLOSE_WORDS[CloseCode.TRY_AGAIN_LATER]}: {error.reason} (503)"   # says why
            return explain_connect_error(error)
        if conn is None:
            return 0   # Ctrl-C while connecting
        closed = await self.session(conn)
        if closed is None:
            return 0
        retrying = self.reconnect and closed.code in RECONNECT_CODES
        if self.greeted.is_set() or not retrying:   # else a refusal, said by the spell
            self.screen.note(f"* disconnected: {describe_close(closed)}", "error")
        self.reconnected = True
        # Not once the user is leaving (/quit, end of input): no line typed could answer.
        asking = is_name_refusal(closed) and self.interactive and self.leave_by is None
        if asking and await self.ask_for_a_name():
            return None
        return describe_close(closed) if retrying else 1

    async def connect_unless_interrupted(self, url: str) -> Connection | None:
        """connect(), said on the screen; None if Ctrl-C comes first (it works at once)."""
        if not self.reconnecting.tries:
            self.screen.note(f"* connecting to {self.url} …")
        else:
            self.reconnecting.trying = True
            self.keyboard.changed()   # at a terminal, the status line says so
        connecting = asyncio.create_task(connect(url, **self.connect_options))
        interrupted = asyncio.create_task(self.keyboard.wait_until(lambda: self.keyboard.interrupted))
        await asyncio.wait({connecting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.wait({connecting})
            return None
        conn = connecting.result()   # or the error connect() raised
        self.on_connected()          # the keyboard, and its prompt, only once there is a room
        self.on_connected = lambda: None
        return conn

    async def session(self, conn: Connection) -> ConnectionClosed | None:
        """One connection: None once the user has left, else how the connection ended."""
        greeted = self.greeted = asyncio.Event()
        receiving = asyncio.create_task(self.receive(conn, greeted))
        sending = asyncio.create_task(self.sender.send_typed(conn, greeted))
        pinging = asyncio.create_task(keepalive({conn}, self.keepalive_interval))
        try:
            await asyncio.wait({receiving, sending}, return_when=asyncio.FIRST_COMPLETED)
            if receiving.done():
                return receiving.result()
            reason = sending.result()
            if reason is None:               # a send failed: the connection is closing
                return await receiving       # bounded: a closing connection has its timer
            if self.keyboard.interrupted:   # Ctrl-C: out within a second, answered or not
                with contextlib.suppress(asyncio.TimeoutError):   # (a frozen server never is)
                    await asyncio.wait_for(conn.close(CloseCode.NORMAL_CLOSURE, reason), 1.0)
                return None
            if not await self.confirmed_before_leaving(conn, receiving):
                return receiving.result()
            await conn.close(CloseCode.NORMAL_CLOSURE, reason)
            return None
        finally:
            for task in (receiving, sending, pinging):
                task.cancel()
            # Let them finish: a cancelled send must first put its line back.
            await asyncio.gather(receiving, sending, pinging, return_exceptions=True)

    # -- leaving -----------------------------------------------------------

    def start_leaving(self) -> None:
        if self.leave_by is None:
            self.leave_by = time.monotonic() + self.confirm_timeout

    async def confirmed_before_leaving(self, conn: Connection, receiving: asyncio.Task) -> bool:
        """Wait (bounded) until the room confirmed every line and answered every command.

        The server answers frames in order, so its pong to a ping sent now
        comes after its replies to everything we sent before, unless its
        flood control held some of our lines: the Sender keeps to its rate
        so that it need not. False if the connection ended first.
        """
        async def confirmed() -> None:   # every line came back, then the pong to a last ping
            await self.keyboard.wait_until(
                lambda: not self.ledger.unconfirmed or self.keyboard.interrupted)
            if not self.keyboard.interrupted:   # Ctrl-C: leave now
                await conn.ping(b"done?")

        remaining = max(0.0, (self.leave_by or 0) - time.monotonic())
        waiting = asyncio.create_task(confirmed())
        await asyncio.wait({waiting, receiving}, timeout=remaining,
                           return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        return not receiving.done()

    def finish(self, status: int) -> int:
        """At exit: list every line the room did not confirm; 1 if there was any, or a refusal.

        A line handed to the connection may have arrived although no copy came
        back (a frozen server relays it once it runs again): only one never
        handed to it was surely not sent. Lines after /quit are only counted.
        """
        unsent = [line for line in self.keyboard.lines if not is_quit_command(line)]
        for line in self.ledger.unconfirmed:
            self.screen.note(f"* not confirmed (it may have arrived): {line}", "error")
        for line in unsent:
            self.screen.note(f"* not sent: {line}", "error")
        if self.ledger.lost:
            self.screen.note(f"* lost: {plural(self.ledger.lost, 'line')} the room confirmed, "
                             "then lost in a crash, too many to send again", "error")
        if self.keyboard.after_quit:   # /quit was meant: they don't change the status
            self.screen.note(f"* {plural(self.keyboard.after_quit, 'line')} after /quit not sent")
        failed = self.ledger.unconfirmed or unsent or self.ledger.lost or self.sender.refused
        return 1 if failed else status

    # -- receiving ---------------------------------------------------------

    async def receive(self, conn: Connection, greeted: asyncio.Event) -> ConnectionClosed:
        """Show what the room sends until the connection ends; the first frame is the greeting."""
        while True:
            try:
                message = await conn.recv()
            except ConnectionClosed as closed:
                return closed
            if isinstance(message, bytes):
                message = f"* (binary message of {len(message)} bytes)"
            if not greeted.is_set():
                self.on_greeting(message)
                greeted.set()
                self.keyboard.changed()
            self.on_line(message)

    def on_greeting(self, line: str) -> None:
        spell = self.reconnecting.over()   # in the room again: the next wait is the first
        if spell:
            self.screen.note(spell)
        greeting = parse_greeting(line)
        self.history.greeted(greeting.history if greeting else None, been_here=bool(self.seen))
        self.sender.obey(greeting)
        if greeting is None:
            return   # not our kind of server: no names, no receipts
        # Only the room we were in (the server did not restart) gives our token back.
        same_room = self.token is not None and greeting.token == self.token
        self.token = greeting.token
        self.name = greeting.name
        for line in reversed(self.ledger.greeted(greeting.delivered or 0, same_room)):
            self.keyboard.unget(line)   # before anything typed while we were away

    def on_line(self, line: str) -> None:
        """One line from the room: show it, and note what it tells about our lines."""
        if self.ledger.confirms(line, self.name):
            self.keyboard.changed()   # no longer shown as waiting
        renamed = LINES["renamed"].match(line)
        if renamed and renamed[1] == self.name:
            self.name = renamed[2]
        history = LINES["history"].match(line)
        text = line[history.end():] if history else line
        # After a reconnect the history repeats what was shown before: skip
        # that. (So a line said twice in the same words may then show once.)
        repeated = bool(history) and self.reconnected and text in self.seen
        before, after = self.history.around(bool(history), not repeated)
        if not repeated:
            self.seen.append(text)
            before.append(line)
        for shown in before + after:
            self.screen.show(shown, name=self.name)

    # -- between connections ----------------------------------------------

    async def wants_out_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds before reconnecting; True if the user wants out now.

        Ctrl-C does it; so does leaving (end of input, /quit) with nothing left
        to deliver. Lines typed meanwhile wait for the next connection.
        """
        def out() -> bool:
            lines = self.keyboard.lines
            nothing_left = not self.ledger.unconfirmed and all(map(is_quit_command, lines))
            asked = self.keyboard.ended or self.leave_by is not None or bool(lines)   # a /quit
            return self.keyboard.interrupted or (asked and nothing_left)
        try:
            await asyncio.wait_for(self.keyboard.wait_until(out), delay)
        except asyncio.TimeoutError:
            return False
        return True

    async def ask_for_a_name(self) -> bool:
        """The room refused our name: ask for another at the name prompt; False if the user leaves.

        At a prompt of its own, so that chat typed there can't pass for a
        name. A line that can't be one is not sent anywhere: the screen says
        why (a chat line, by its spaces), Up brings it back, and we ask again.
        """
        self.screen.note(f"* type another name after {NAME_PROMPT.strip()} and press Enter "
                         "(Ctrl-C leaves)")
        with self.screen.prompting(NAME_PROMPT):
            while True:
                line = await self.next_line_typed()
                if line is None or is_quit_command(line):
                    return False
                try:
                    self.name, self.token = check_typed_name(line), None
                    return True
                except ValueError as why:
                    self.screen.note(f"* not sent: {why} (Up brings it back)", "error")

    async def next_line_typed(self) -> str | None:
        """The next line the user types; None if the input ends first, or Ctrl-C.
        Lines typed before are chat, waiting to be sent: they stay."""
        waiting = len(self.keyboard.lines)
        await self.keyboard.wait_until(lambda: len(self.keyboard.lines) > waiting
                                       or self.keyboard.ended or self.keyboard.interrupted)
        return self.keyboard.lines.pop() if len(self.keyboard.lines) > waiting else None


def check_typed_name(line: str) -> str:
    """check_name for a line typed at the name prompt: one with spaces is chat typed there."""
    if any(char.isspace() for char in line.strip()):
        raise ValueError("a chat line? A name has no spaces")
    return check_name(line)


def is_quit_command(line: str) -> bool:
    try:
        parsed = parse_line(line)
    except ValueError:
        return False
    return isinstance(parsed, Command) and parsed.name == "quit"


# 17. Web page #############################################################
#
# Kept near the end, as bottle keeps its templates: HTML and JavaScript a
# reader of the protocol can skip.

#: The page served at "/": self-contained (no external scripts, styles or
#: fonts), text shown with textContent so it is never parsed as HTML. It
#: keeps the terminal client's promises, with the rules it is given from
#: Python (@FROM_PYTHON@, see page()): lines escaped as printable() escapes
#: them, notices and actions marked as the terminal marks them, lines paced
#: to the room's limit, listed until the room's copy comes back and sent
#: again after a reconnect, a pasted block sent line by line, Up and Down
#: for the lines sent before, and the same backoff between tries.
#:
#: Every text colour has a contrast of at least 4.5:1 with its background
#: (WCAG 2 AA), on white / on the bars' #f3f3f3: text #1a1a1a 17.4 / 15.7,
#: times, history, lines on their way and placeholders #595959 7.0 / 6.3,
#: notices #7a5200 6.9, actions #00666b 6.8, private lines #8a008a 8.6, our
#: own #006400 7.4, errors #b00000 7.4 (the last five on white only).
PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat.py</title>
<style>
body { font: 16px/1.4 system-ui, sans-serif; color: #1a1a1a; background: #fff; margin: 0;
       display: flex; flex-direction: column; height: 100vh; height: 100dvh; }
header, form { padding: .5em 1em; background: #f3f3f3; display: flex; align-items: center; gap: .5em; }
#status { min-width: 0; overflow-wrap: anywhere; }
#log { flex: 1; min-height: 0; overflow-y: auto; overflow-anchor: none; margin: 0; padding: .5em 1em; }
#log, #waiting { list-style: none; white-space: pre-wrap; overflow-wrap: anywhere; }
#waiting { margin: 0; padding: 0 1em; color: #595959; font-style: italic; }
input { flex: 1; min-width: 0; font: inherit; color: inherit; background: #fff;
        border: 1px solid #595959; padding: .2em .4em; }
input::placeholder { color: #595959; }
button { font: inherit; color: #1a1a1a; background: #fff; border: 1px solid #595959; padding: .2em .8em; }
.time, .history { color: #595959; } .time { font-size: 85%; margin-right: .5em; }
.notice { color: #7a5200; font-style: italic; } .action { color: #00666b; }
.private { color: #8a008a; } .mine { color: #006400; } .error { color: #b00000; }
[hidden] { display: none !important; }
</style></head>
<body>
<header><strong>chat.py</strong> <span id="status" role="status">not connected</span></header>
<ul id="log" role="log" aria-live="polite" aria-label="messages"></ul>
<ul id="waiting" aria-label="your lines on their way"></ul>
<form id="join"><label for="name">Name</label>
<input id="name" type="text" maxlength="32" autocomplete="nickname" autofocus>
<button>Join</button></form>
<form id="send" hidden><label for="text">Message</label>
<input id="text" type="text" placeholder="/help for commands" autocomplete="off">
<button>Send</button></form>
<script>
"use strict";
const {PATTERNS, LINES, NOTICE_MARK, ACTION_MARK, RESENT_MARK, NAME_REFUSAL, HISTORY_BEGINS, HIDDEN, FLAG_TAG_SEQUENCE,
       MAX_WAITING_SHOWN, INPUT_HISTORY_SIZE, CONFIRM_TIMEOUT, MAX_REASON_BYTES, NO_ANSWER_TIMEOUT,
       RECONNECT, FIRST_BACKOFF, MAX_BACKOFF} = @FROM_PYTHON@;
const $ = (id) => document.getElementById(id);
const log = $("log"), waitingList = $("waiting"), status = $("status");
const input = $("text"), nameInput = $("name");
const LINE = Object.fromEntries(Object.entries(LINES).map(([kind, pattern]) => [kind, new RegExp(pattern)]));
let socket = null, greeted = false, myName = "", token = "", delivered = 0, reconnected = false;
let backoff = FIRST_BACKOFF, retries = 0, retrying = null;   // backoffs in seconds
let bucket = null, pumping = null, leaving = null, leaveBy = null;   // leaving: the /quit reason
let maxSize = null;   // the room's limit on a line, in bytes, from its greeting
let watching = null;  // the timer that gives up on a room that doesn't answer (watch())
let historyDue = 0, historyShown = 0;   // the replay after a greeting (HistoryBlock in chat.py)
const pending = [];     // our lines on their way, oldest first: {line, copy, sent}
const seen = [];        // the latest lines shown, so a reconnect's history doesn't repeat them
const sentLines = [];   // for Up and Down, as LineEditor in chat.py
let recalled = 0, draft = "";

// printable() in chat.py, by the rule it gives: the code points it escapes
// (HIDDEN, runs [first, last]) written as Python writes them (\x1b, \n,
// \u202e, \U000e0041), flag tag sequences left whole.
const HIDDEN_CHAR = new RegExp("[" + HIDDEN.map(([first, last]) =>
  "\\u{" + first.toString(16) + "}-\\u{" + last.toString(16) + "}").join("") + "]", "gu");
const FLAG = new RegExp(FLAG_TAG_SEQUENCE, "gu");
const NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"};
function escaped(char) {   // as Python's unicode_escape codec writes it
  const code = char.codePointAt(0), hex = code.toString(16);
  return NAMED_ESCAPES[char] || (code < 0x100 ? "\\x" + hex.padStart(2, "0")
    : code < 0x10000 ? "\\u" + hex.padStart(4, "0") : "\\U" + hex.padStart(8, "0"));
}
function printable(text) {
  let shown = "", from = 0;
  for (const flag of text.matchAll(FLAG)) {
    shown += text.slice(from, flag.index).replace(HIDDEN_CHAR, escaped) + flag[0];
    from = flag.index + flag[0].length;
  }
  return shown + text.slice(from).replace(HIDDEN_CHAR, escaped);
}

function field(line, name) {   // a fact from the greeting (parse_greeting in chat.py)
  const found = new RegExp(PATTERNS[name]).exec(line);
  return found ? found[1] : null;
}

// display_line() in chat.py: a line from the room as the terminal shows it,
// [text, time, style]. The room's notices ("* bob left") show as "-!- bob
// left" and actions ("[bob] waves") as "* bob waves": no member can write a
// line that looks like the server's.
function display(line) {
  let when = null, style = "";
  const history = LINE.history.exec(line);
  if (history) {
    when = new Date(history[1]); style = "history"; line = line.slice(history[0].length);
    if (isNaN(when)) when = null;   // a month 13 from a broken server: stamp it now
  }
  const action = LINE.action.exec(line), notice = LINE.notice.exec(line), said = LINE.said.exec(line);
  style = style || (action ? "action" : notice ? "notice" : LINE.private.test(line) ? "private"
    : said && said[1] === myName ? "mine" : "");
  if (action) line = ACTION_MARK + action[1] + " " + line.slice(action[0].length);
  else if (notice) line = NOTICE_MARK + line.slice(notice[0].length);
  return [printable(line), when, style];
}

function show(text, when, style) {
  const item = document.createElement("li"), time = document.createElement("span");
  time.className = "time"; time.textContent = (when || new Date()).toTimeString().slice(0, 5);
  item.className = style; item.append(time, text);
  log.appendChild(item);
  follow();
}
function notify(text, style) {   // the page's own notices, marked as the room's are
  show(printable(NOTICE_MARK + text), null, style || "notice");
}
function setStatus(text) { status.textContent = printable(text); }

// Whether to follow is decided by how the reader scrolls, not measured when
// a line comes: by then the lines on their way, or a phone's keyboard, may
// have made the log shorter, its bottom no longer where it was. A scroll
// up leaves the newest lines; one to the bottom comes back to them.
let following = true, scrolledTo = 0;   // keep the newest line in view; where the reader was
function noteScroll() {
  if (log.scrollTop + log.clientHeight >= log.scrollHeight - 2) following = true;
  else if (log.scrollTop < scrolledTo) following = false;
  scrolledTo = log.scrollTop;
}
function follow() {
  noteScroll();   // a scroll whose event is yet to come counts too
  if (following) { log.scrollTop = log.scrollHeight; scrolledTo = log.scrollTop; }
}
log.addEventListener("scroll", noteScroll);
new ResizeObserver(() => follow()).observe(log);   // lines on their way come and go; a window turns

function showWaiting() {   // ChatClient.waiting() in chat.py: the first few, then a count
  const lines = pending.slice(0, MAX_WAITING_SHOWN).map((p) => "… " + printable(p.line));
  const more = pending.length - lines.length;
  if (more) lines.push("… and " + more + " more line" + (more === 1 ? "" : "s") + " waiting");
  waitingList.replaceChildren(...lines.map((text) =>
    Object.assign(document.createElement("li"), {textContent: text})));
  follow();   // the log just grew or shrank
}

function copyOf(line) {   // echo_of() in chat.py: how the room relays a line of ours; null: not at all
  if (!line.trim()) return null;
  if (line.startsWith("//")) return "[" + myName + "]: " + line.slice(1);
  if (!line.startsWith("/") || line.length === 1 || /\s/.test(line[1])) return "[" + myName + "]: " + line;
  const me = /^\/me\s+(\S[\s\S]*)$/i.exec(line);
  return me ? "[" + myName + "] " + me[1].trim() : null;
}

function mark(line) {   // mark_resent() in chat.py
  const me = /^\/me\s+/i.exec(line);
  if (me) return "/me " + RESENT_MARK + line.slice(me[0].length);
  return RESENT_MARK + (line.startsWith("//") ? line.slice(1) : line);   // "//etc": no longer a command
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:", query = new URLSearchParams();
  if (myName) query.set("name", myName);
  if (token) query.set("resume", token);
  const ws = socket = new WebSocket(scheme + "//" + location.host + "/chat?" + query);
  greeted = false; retrying = null;
  setStatus(retries ? "connecting… (attempt " + retries + ")" : "connecting…");
  ws.onmessage = (event) => {
    const line = typeof event.data === "string" ? event.data
      : "* (binary message of " + event.data.size + " bytes)";
    if (greeted) received(line); else greeting(line);
  };
  ws.onclose = (event) => { if (ws === socket) closed(event); };   // not an older socket's
}

function greeting(line) {
  greeted = true; backoff = FIRST_BACKOFF; retries = 0;   // in the room: the next outage starts over
  const name = field(line, "name"), rate = parseFloat(field(line, "rate")), resume = field(line, "token");
  const has = parseInt(field(line, "delivered")) || 0;
  maxSize = parseInt(field(line, "max_size")) || null;
  historyDue = parseInt(field(line, "history")) || 0; historyShown = 0;
  // Back in the same room (it gave our token back): it says how many of our
  // lines it has, so the first of the unconfirmed ones arrived; the rest are
  // sent again. A room that doesn't know us can't say: all go again, marked;
  // so do they when its count can't be reconciled (DeliveryLedger in chat.py).
  let arrived = token !== "" && resume === token ? has - delivered : null;
  if (arrived < 0) notify("lost: " + -arrived + " of your lines the room had confirmed", "error");
  if (arrived < 0 || arrived > pending.filter((p) => p.sent).length) arrived = null;
  if (name) { myName = name; token = resume || ""; }
  delivered = has;
  const burst = parseInt(field(line, "burst")) || 1;
  bucket = rate ? {rate, burst, tokens: burst, stamp: Date.now()} : null;
  setStatus(name ? "connected as " + name : "connected");
  $("join").hidden = true; $("send").hidden = false; input.focus();
  show(...display(line.split(" Limits: ")[0]));   // the limits and the token are for the page
  pending.filter((p) => p.sent).forEach((p, i) => {
    if (arrived !== null && i < arrived) { pending.splice(pending.indexOf(p), 1); return; }
    p.sent = false;
    if (arrived === null) p.line = mark(p.line);
  });
  pump();
}

function received(line) {
  const first = pending.find((p) => p.sent);
  if (first && line === first.copy) {   // confirmed
    delivered += 1; pending.splice(pending.indexOf(first), 1); showWaiting(); watch(true);
  }
  const renamed = LINE.renamed.exec(line);
  if (renamed && renamed[1] === myName) {
    myName = renamed[2]; setStatus("connected as " + myName);
    for (const p of pending) if (p.sent) p.copy = copyOf(p.line);   // copies now carry it
  }
  const history = LINE.history.exec(line), text = history ? line.slice(history[0].length) : line;
  if (!history) endHistory();   // the room has gone live
  if (!(history && reconnected && seen.includes(text))) {   // else shown before the reconnect
    if (history && !historyShown++) notify(HISTORY_BEGINS[reconnected ? "back" : "new"]);
    seen.push(text); if (seen.length > 100) seen.shift();
    show(...display(line));
  }
  if (history && --historyDue === 0) endHistory();
  leaveIfDone();
}
function endHistory() {   // grey alone is not enough to tell an hour ago from now
  if (historyShown) notify("end of history (" + historyShown + (historyShown === 1 ? " line)" : " lines)"));
  historyShown = historyDue = 0;
}

function pump() {   // send what waits, at the room's pace (it would hold the rest anyway)
  clearTimeout(pumping);
  for (const p of pending.slice()) {
    if (p.sent) continue;
    if (!socket || socket.readyState !== WebSocket.OPEN || !greeted) break;
    if (bucket) {
      const now = Date.now();
      bucket.tokens = Math.min(bucket.burst, bucket.tokens + (now - bucket.stamp) / 1000 * bucket.rate);
      bucket.stamp = now;
      if (bucket.tokens < 1) { pumping = setTimeout(pump, (1 - bucket.tokens) / bucket.rate * 1000); break; }
      bucket.tokens -= 1;
    }
    socket.send(p.line); p.sent = true; p.copy = copyOf(p.line);
    if (p.copy === null) pending.splice(pending.indexOf(p), 1);   // a command: a reply comes, no copy
  }
  showWaiting(); watch();
  leaveIfDone();
}

// A frozen server answers nothing, and a page can't send a ping (the
// browser's WebSocket has no API for it): a line of ours unanswered for
// NO_ANSWER_TIMEOUT s means the link is dead, as unanswered pings tell the
// terminal client. Then the page reconnects, and the greeting says what to resend.
function watch(answered) {   // answered: the room confirmed a line, so it is alive now
  if (answered || !pending.some((p) => p.sent)) { clearTimeout(watching); watching = null; }
  if (watching === null && socket && pending.some((p) => p.sent)) {   // not reset by each send
    watching = setTimeout(noAnswer, NO_ANSWER_TIMEOUT * 1000);
  }
}
function noAnswer() {
  const ws = socket;
  watching = null;
  if (!ws) return;
  socket = null; ws.close();   // its close may never finish: it is no longer ours (connect())
  closed({code: 1006, reason: "no answer from the server in " + NO_ANSWER_TIMEOUT + " s"});
}

function closed(event) {
  const wasGreeted = greeted, why = event.code + (event.reason ? ": " + event.reason : "");
  socket = null; greeted = false; clearTimeout(pumping); clearTimeout(watching); watching = null;
  if (wasGreeted) reconnected = true;
  if (leaving !== null) { left(); return; }
  if (RECONNECT.includes(event.code)) {   // RECONNECT_CODES: the room may well be back soon
    if (wasGreeted) notify("disconnected (" + why + "); reconnecting");
    retries += 1;   // one status, updated: not a line per try
    setStatus("reconnecting in " + backoff + " s (attempt " + retries + ")"
      + (event.reason ? ": " + event.reason : ""));
    retrying = setTimeout(connect, backoff * 1000);
    backoff = Math.min(backoff * 2, MAX_BACKOFF);   // as next_backoff()
    return;
  }
  $("send").hidden = true; $("join").hidden = false; retries = 0; backoff = FIRST_BACKOFF;
  if (event.code === 1008 && new RegExp(NAME_REFUSAL).test(event.reason)) {   // is_name_refusal()
    notify(event.reason); setStatus("pick another name");
    nameInput.value = myName || nameInput.value; myName = ""; token = "";
    nameInput.focus(); nameInput.select();
    return;
  }
  notify("disconnected (" + why + ")", "error"); setStatus("not connected");
}

function typed(line) {   // a line the user sent: remembered for Up, then on its way
  if (line && sentLines[sentLines.length - 1] !== line) sentLines.push(line);   // twice: recalled once
  if (sentLines.length > INPUT_HISTORY_SIZE) sentLines.shift();
  recalled = 0; draft = "";
  if (!line.trim() || leaving !== null) return;   // typed after /quit: not for the room
  const quit = /^\/quit(?:\s+([\s\S]*))?$/i.exec(line);
  if (quit) { leave((quit[1] || "").trim()); return; }
  const size = new TextEncoder().encode(line).length;   // refused here, as Sender.check_typed() does:
  if (maxSize && size > maxSize) {                      // the room would close the connection (1009)
    notify("not sent: the line is " + size + " bytes; the room takes lines of up to " + maxSize, "error");
    return;
  }
  pending.push({line, copy: null, sent: false});
  pump();
}

function leave(reason) {   // /quit: once the room has every line sent before, as the terminal does
  leaving = reason;
  setStatus("leaving…");
  if (!socket) { clearTimeout(retrying); left(); return; }
  leaveBy = setTimeout(() => socket && socket.close(1000, closeReason()), CONFIRM_TIMEOUT * 1000);
  leaveIfDone();
}
function leaveIfDone() {
  if (leaving !== null && socket && !pending.length) socket.close(1000, closeReason());
}
function closeReason() {   // at most MAX_REASON_BYTES of UTF-8, whole characters (RFC 6455 §5.5)
  const chars = Array.from(leaving || "bye");
  while (new TextEncoder().encode(chars.join("")).length > MAX_REASON_BYTES) chars.pop();
  return chars.join("");
}
function left() {   // calm, with the way back in
  clearTimeout(leaveBy);
  notify("you left" + (leaving ? " (" + closeReason() + ")" : ""));   // the reason as sent
  for (const p of pending)   // ChatClient.finish()'s words: one sent may be in the room
    notify((p.sent ? "not confirmed (it may have arrived): " : "not sent: ") + p.line, "error");
  pending.length = 0; showWaiting();
  leaving = null; token = ""; retries = 0; backoff = FIRST_BACKOFF;
  setStatus("not connected");
  $("send").hidden = true; $("join").hidden = false;
  nameInput.value = myName; nameInput.focus();
}

function recall(back) {   // LineEditor._recall() in chat.py: `back` lines ago, 0 the new one
  if (back < 0 || back > sentLines.length) return;
  if (recalled === 0) draft = input.value;
  recalled = back;
  input.value = back ? sentLines[sentLines.length - back] : draft;
  input.setSelectionRange(input.value.length, input.value.length);
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  myName = nameInput.value.trim(); token = ""; delivered = 0;
  connect();
});
$("send").addEventListener("submit", (event) => {
  event.preventDefault();
  const line = input.value;
  input.value = "";
  typed(line);
});
input.addEventListener("keydown", (event) => {
  if (event.isComposing || (event.key !== "ArrowUp" && event.key !== "ArrowDown")) return;
  event.preventDefault();
  recall(recalled + (event.key === "ArrowUp" ? 1 : -1));
});
// A pasted block: each whole line is sent at once, the last, unfinished
// one stays to be edited, as LineEditor.paste() does with the terminal's
// bracketed paste. (A one-line <input> would run the lines together.)
input.addEventListener("paste", (event) => {
  const text = event.clipboardData.getData("text");
  if (!/[\r\n]/.test(text)) return;   // one line: the browser pastes it
  event.preventDefault();
  const lines = text.replace(/\r\n?/g, "\n").split("\n"), rest = lines.pop();
  const after = input.value.slice(input.selectionEnd);   // stays after the paste, unsent
  lines[0] = input.value.slice(0, input.selectionStart) + lines[0];
  input.value = rest + after;
  input.setSelectionRange(rest.length, rest.length);
  lines.forEach(typed);
});
</script>
</body></html>
"""


@functools.cache
def page() -> str:
    """PAGE with the rules it takes from Python, built once, as the first room starts (Gate)."""
    return PAGE.replace("@FROM_PYTHON@", json.dumps(dict(
        PATTERNS=dict(GREETING_PATTERNS), LINES={name: line.pattern for name, line in LINES.items()},
        NOTICE_MARK=NOTICE_MARK, ACTION_MARK=ACTION_MARK, RESENT_MARK=RESENT_MARK, NAME_REFUSAL=NAME_REFUSAL,
        HISTORY_BEGINS=dict(HISTORY_BEGINS),
        HIDDEN=hidden_ranges(), FLAG_TAG_SEQUENCE=FLAG_TAG_SEQUENCE.pattern,
        MAX_WAITING_SHOWN=MAX_WAITING_SHOWN, INPUT_HISTORY_SIZE=INPUT_HISTORY_SIZE,
        CONFIRM_TIMEOUT=CONFIRM_TIMEOUT, MAX_REASON_BYTES=MAX_CONTROL_PAYLOAD - 2,
        NO_ANSWER_TIMEOUT=3 * CLIENT_KEEPALIVE_INTERVAL,
        RECONNECT=sorted(RECONNECT_CODES), FIRST_BACKOFF=FIRST_BACKOFF, MAX_BACKOFF=MAX_BACKOFF)))


# 18. Command line ##########################################################

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
    """Raise this process's limit on open files (the soft one, often 1024) to the hard
    one, which is often far higher; return the limit, or None if there is none."""
    try:
        import resource   # Unix only; imported here so that the file runs on Windows too
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):   # macOS refuses an unlimited one
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return None if soft == resource.RLIM_INFINITY else soft


def clients_descriptors_allow(max_clients: int | None) -> int | None:
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
    logger.warning("--max-clients lowered from %d to %d: this process may open %d files "
                   "(ulimit -n) and keeps %d for itself", max_clients, allowed, limit, FD_RESERVE)
    return allowed


async def run_echo(args: argparse.Namespace) -> int:
    server = await listen(echo, args, max_clients=clients_descriptors_allow(None),
                          max_size=args.max_size, compression=not args.no_compression,
                          max_buffer=max(MAX_OUTGOING_BUFFER, 4 * args.max_size))
    address, where = reachable_at(args.host, server.port)
    logger.info("echo server%s: ws://%s/", where, address)
    await run_until_signalled(server)
    return 0


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
    """'no certificate or crl found' for NO_CERTIFICATE_OR_CRL_FOUND; else without '(_ssl.c:N)'."""
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
    if args.workers > 1:
        return await run_workers(args)
    ssl_context = server_ssl_context(args.certfile, args.keyfile)
    max_clients = clients_descriptors_allow(args.max_clients)
    # Under half the send bound: a newcomer's replay must never look like a slow reader.
    history_bytes = min(args.history_bytes, args.max_buffer // 2) if args.history_bytes else 0
    options = dict(rate=args.rate, burst=args.burst, max_size=args.max_size,
                   history_bytes=history_bytes, announce_limit=args.announce_limit,
                   allowed_origins=args.allow_origin,
                   allowed_hosts=args.allow_host, secure=ssl_context is not None)
    room = SharedRoom(args.redis, name_ttl=args.name_ttl, **options) if args.redis else BatchedRoom(**options)
    if isinstance(room, SharedRoom):
        try:
            await room.connect()
        except RedisUnavailable as error:
            raise StartupError(f"cannot reach Redis at {args.redis}: {error}") from None
    server = await listen(room.handle, args, ssl_context=ssl_context,
                          process_request=room.process_request, max_size=args.max_size,
                          max_buffer=args.max_buffer, max_clients=max_clients,
                          max_per_address=args.max_per_ip or None, trusted_proxies=args.trusted_proxy,
                          max_control_rate=args.max_control_rate,
                          connects_per_minute=args.connects_per_minute,
                          max_frames=max(1, args.max_size // 1024) if args.max_frames is None else args.max_frames,
                          reuse_port=args.worker, compression=not args.no_compression)
    if args.worker:
        stop_with_parent()
    address, where = reachable_at(args.host, server.port)
    secure = "s" if ssl_context else ""
    logger.info("chat server ready%s: ws%s://%s%s for clients, http%s://%s/ in a browser%s",
                where, secure, address, CHAT_PATH, secure, address,
                f"; one room with every server on {args.redis}" if args.redis else "")
    try:
        await run_until_signalled(server)
    finally:
        if isinstance(room, SharedRoom):
            await room.close()
    return 0


async def run_workers(args: argparse.Namespace) -> int:
    """--workers N: N server processes on one port (SO_REUSEPORT), one room through Redis.

    Each is this program again; an unreachable Redis or a taken port is said once, from
    here. A worker that exits takes the others down, and any failure makes the status 1."""
    try:
        (await RedisConnection.open(args.redis)).close()
    except RedisUnavailable as error:
        raise StartupError(f"cannot reach Redis at {args.redis}: {error}") from None
    with reserved_port(args.host, args.port) as port:
        worker_argv = [*args.argv, "--port", str(port), "--workers", "1", "--worker"]
        # Their stdin is a pipe from us that we never write to: see stop_with_parent().
        workers = [await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), *worker_argv, stdin=asyncio.subprocess.PIPE)
            for _ in range(args.workers)]
        address, where = reachable_at(args.host, port)
        logger.info("%d workers%s on ws://%s%s, sharing one room through %s",
                    len(workers), where, address, CHAT_PATH, args.redis)

        stopping: list[asyncio.subprocess.Process] = []

        def stop() -> None:
            # Once each: a second SIGTERM could reach a worker that has already
            # closed its event loop (and its handler), and kill it mid-exit.
            for worker in workers:
                if worker.returncode is None and worker not in stopping:
                    stopping.append(worker)
                    worker.send_signal(signal.SIGTERM)

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        waits = [asyncio.ensure_future(worker.wait()) for worker in workers]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stop()
        codes = await asyncio.gather(*waits)
    return 1 if any(codes) else 0


def stop_with_parent() -> None:
    """In a worker: once the parent is gone, however it died, stop as if sent SIGTERM. It
    holds our stdin's other end and never writes, so stdin is readable only at its end."""
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:
        if not os.read(sys.stdin.fileno(), 1):
            loop.remove_reader(sys.stdin.fileno())
            os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(sys.stdin.fileno(), parent_gone)


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> typing.Iterator[int]:
    """A port for the workers: bound here with SO_REUSEPORT, not listening, so port 0 works too."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise StartupError("--workers needs SO_REUSEPORT, which this platform lacks")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            where = host_port(host or "*", port)
            raise StartupError(f"cannot listen on {where}: {describe_os_error(error)}") from None
        yield sock.getsockname()[1]


async def run_client(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    keyboard = Keyboard()
    screen = Screen(sys.stdout, color=wants_color(sys.stdout, os.environ),
                    timestamps=not args.no_timestamps,
                    err=sys.stdout if sys.stdout.isatty() else sys.stderr)   # stdout: the room's alone
    ssl_context = client_ssl_context(args.cafile, args.insecure) if args.url.startswith("wss:") else None
    if args.insecure:
        screen.note("* --insecure: the server's certificate is NOT checked", "error")
    # A script gets no history unless it asks (--history): it would read the past as if said now.
    history = args.history if args.history is not None or interactive else 0
    client = ChatClient(args.url, screen, keyboard, name=args.name, interactive=interactive,
                        history=history, reconnect=not args.no_reconnect, ssl_context=ssl_context,
                        max_size=args.max_size, compression=not args.no_compression,
                        on_connected=lambda: start_keyboard(keyboard, screen, client, interactive))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, keyboard.interrupt)
    try:
        return await client.run()
    finally:
        if screen.terminal is not None:
            screen.terminal.stop()


def start_keyboard(keyboard: Keyboard, screen: Screen, client: ChatClient, interactive: bool) -> None:
    """The line editor on a POSIX terminal; plain line input on a pipe, or without termios."""
    if not interactive:
        read_lines_in_thread(keyboard, sys.stdin, None)
        return
    try:
        import termios  # noqa: F401  (POSIX only)
    except ImportError:
        screen.note("* no termios here: plain line input, without the line editor")
        read_lines_in_thread(keyboard, sys.stdin, "> ")
        return
    screen.terminal = Terminal(keyboard, sys.stdin.fileno(), sys.stdout, client.waiting)
    screen.terminal.start()


# Every value is checked as it is parsed, so a bad one is a usage error (exit
# status 2, one sentence from argparse) rather than a traceback or a server that
# starts and then misbehaves (a rate of -1, or NaN, which turns the limit off).

def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int from low to high (or up), or an error saying what is wrong."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {allowed}")
        return value
    return parse


def finite_number(text: str, zero_ok: bool, error: str) -> float:
    """A number more than 0 (or 0 too, if zero_ok); "nan" and "inf" are not."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"{text!r} is not {error}")
    return value


def rate(text: str) -> float:
    return finite_number(text, True, "a rate: give a number of messages per second, 0 or more")


def seconds(text: str) -> float:
    return finite_number(text, False, "a time: give a number of seconds, more than 0")


def parsed_by(parse: Callable[[str], object], keep_text: bool = False) -> Callable[[str], object]:
    """An argparse type: parse(text), or text if keep_text; parse's ValueError is a usage error."""
    def parse_argument(text: str) -> object:
        try:
            parsed = parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text if keep_text else parsed
    return parse_argument


def readable_file(path: str) -> str:
    """A file we can open now, so a typo fails at once and not at the first client."""
    try:
        open(path, "rb").close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {describe_os_error(error)}") from None
    return path


def ip_address(text: str) -> str:
    address = canonical_address(text)
    if address is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address")
    return address


def host_only(text: str) -> str:
    """--host: a host name or an IP address (an IPv6 one bare or in brackets), no port."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" in host and canonical_address(host) is None:
        raise ValueError(f"{text!r} is not a host name or address (a port goes in --port)")
    return host


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
    add_verbose_flag(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_server_command(commands)
    add_client_command(commands)
    echo_cmd = commands.add_parser("echo", help="an echo server for conformance suites (Autobahn)",
                                   description="Send every message back unchanged, on any path.")
    add_verbose_flag(echo_cmd)
    add_listening_flags(echo_cmd, port=9001)
    echo_cmd.add_argument("--no-compression", action="store_true",
                          help="don't accept permessage-deflate (RFC 7692)")
    echo_cmd.set_defaults(run=run_echo)
    return parser


def add_verbose_flag(command: argparse.ArgumentParser, default: typing.Any = argparse.SUPPRESS) -> None:
    """-v before the command ("chat.py -v server") and after it ("chat.py server -v").

    A command's parser sets every default it has over the main parser's
    values: with none (SUPPRESS) its -v can't undo a -v given before it.
    """
    command.add_argument("-v", "--verbose", action="store_true", default=default,
                         help="log every frame: direction, opcode, FIN, length, mask (default: off)")


def add_server_command(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(
        "server", help="run the chat room (WebSocket at /chat, web page at /)",
        description="Run the chat room: WebSocket clients at /chat?name=NAME, a web page at /. "
                    "Ctrl-C closes every connection with 1001 (going away) and exits.")
    add_verbose_flag(server)
    add_listening_flags(server, port=CHAT_PORT)
    server.add_argument("--max-buffer", type=whole_number(1), default=MAX_OUTGOING_BUFFER,
                        help="bytes a client may leave unread before it is dropped with 1008 "
                             "(default: %(default)s)")
    server.add_argument("--rate", type=rate, default=RATE_PER_SECOND,
                        help="messages per second allowed per client after a burst; 0 turns "
                             "flood control off (default: %(default)s)")
    server.add_argument("--burst", type=whole_number(1), default=RATE_BURST,
                        help="messages a client may send at once (default: %(default)s)")
    server.add_argument("--history-bytes", type=whole_number(0), default=HISTORY_BYTES, metavar="N",
                        help="bytes of history a newcomer is shown, at most half of --max-buffer; "
                             "older lines go first; 0 means no limit (default: %(default)s)")
    server.add_argument("--announce-limit", type=whole_number(0), default=ANNOUNCE_LIMIT,
                        help="stop announcing joins and leaves past this many members "
                             "(default: %(default)s)")
    server.add_argument("--certfile", type=readable_file, help="serve https:// and wss:// with this certificate (PEM)")
    server.add_argument("--keyfile", type=readable_file, help="the certificate's private key (PEM), if not in --certfile")
    server.add_argument("--no-compression", action="store_true",
                        help="don't accept permessage-deflate (RFC 7692): turn it off when "
                             "messages mix secrets with text others choose (CRIME/BREACH)")
    add_server_access_flags(server)
    server.add_argument("--redis", type=parsed_by(parse_redis_url), metavar="URL",
                        help="share one room with every server started with this URL: "
                             "redis://[:PASSWORD@]HOST[:PORT][/DB], or rediss:// for TLS")
    server.add_argument("--name-ttl", type=seconds, default=NAME_TTL, metavar="SECONDS",
                        help="with --redis: how long a crashed server's names stay taken "
                             "(default: %(default)s)")
    server.add_argument("--workers", type=whole_number(1), default=1, metavar="N",
                        help="with --redis: run N server processes on one port (SO_REUSEPORT); "
                             "--max-clients and --max-per-ip then apply to each of them "
                             "(default: %(default)s)")
    server.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # see run_workers
    server.set_defaults(run=run_server)


#: Where the chat server listens, and so where the client looks for it, unless told.
CHAT_HOST = "127.0.0.1"
CHAT_PORT = 8080


def add_listening_flags(command: argparse.ArgumentParser, port: int) -> None:
    """--host, --port and --max-size, as the chat server and the echo server share them."""
    command.add_argument("--host", default=CHAT_HOST,
                         help="address to listen on; '' means all interfaces (default: %(default)s)")
    command.add_argument("--port", type=whole_number(0, 65535), default=port,
                         help="port to listen on (default: %(default)s)")
    command.add_argument("--max-size", type=whole_number(1), default=MAX_MESSAGE_SIZE,
                         help="largest message accepted, in bytes; larger ones close with 1009 "
                              "(default: %(default)s)")


def add_server_access_flags(server: argparse.ArgumentParser) -> None:
    """Who may connect, and how many: the flags for an operator's defences."""
    server.add_argument("--max-clients", type=whole_number(1), default=1000,
                        help="connections beyond this get HTTP 503; lowered at start-up if the "
                             "open-file limit (ulimit -n) can't hold them (default: %(default)s)")
    server.add_argument("--max-per-ip", type=whole_number(0), default=MAX_PER_ADDRESS,
                        help="connections one IP address may hold at once; more get HTTP 503. "
                             "A classroom behind one NAT shares one address: raise it there; "
                             "0 means no limit (default: %(default)s)")
    server.add_argument("--connects-per-minute", type=rate, default=CONNECTS_PER_MINUTE, metavar="N",
                        help=f"new connections one IP address may open a minute, after a burst "
                             f"of {CONNECT_BURST}; more get HTTP 503 with Retry-After; 0 means "
                             "no limit (default: %(default)s)")
    server.add_argument("--max-frames", type=whole_number(0), metavar="N",
                        help="frames one message may take; more close with 1008 (default: one "
                             "per KiB of --max-size, 1024; 0 means no limit)")
    server.add_argument("--max-control-rate", type=rate, default=MAX_CONTROL_RATE, metavar="N",
                        help="pings, pongs and closes a client may send a second; more close "
                             "with 1008; 0 means no limit (default: %(default)s)")
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
        description="Join the chat. Type a line and Enter to send it; /help lists the commands "
                    "(/who, /msg NAME TEXT, /me, /nick, /quit). A line is shown dimmed until the "
                    "room has it. /quit, Ctrl-D or Ctrl-C leave; lines the room never confirmed "
                    "are listed, and the exit status is then 1, as it is after a line refused "
                    "(an unknown command). Piped input is sent at the room's pace, and the "
                    "client exits once every line is confirmed; piped output has the room's "
                    "lines on stdout, the client's own on stderr. If the "
                    f"server goes away the client reconnects, waiting {FIRST_BACKOFF:g}, "
                    f"{2 * FIRST_BACKOFF:g}, {4 * FIRST_BACKOFF:g} ... up to {MAX_BACKOFF:g} "
                    "seconds, and gets its name back.")
    add_verbose_flag(client)
    client.add_argument("--name", help="your name in the room (default: the server picks userN)")
    client.add_argument("--host", type=parsed_by(host_only),
                        help=f"the server's host name or address (default: {CHAT_HOST})")
    client.add_argument("--port", type=whole_number(1, 65535),
                        help=f"the server's port (default: {CHAT_PORT})")
    client.add_argument("--url", type=parsed_by(parse_uri, keep_text=True),
                        help=f"the whole WebSocket URL, instead of --host and --port (default: "
                             f"ws://HOST:PORT{CHAT_PATH}, wss:// with --cafile or --insecure)")
    client.add_argument("--no-reconnect", action="store_true",
                        help="exit with status 1 when the connection is lost")
    client.add_argument("--history", type=whole_number(0), metavar="N",
                        help="lines of the room's history to be shown on joining, 0 for none "
                             "(default: all the room keeps at a terminal; none when stdin or "
                             "stdout is not a terminal)")
    client.add_argument("--cafile", type=readable_file, metavar="FILE",
                        help="trust the CA certificate(s) in this PEM file for wss://")
    client.add_argument("--insecure", action="store_true",
                        help="don't verify the server's certificate (testing only)")
    client.add_argument("--max-size", type=whole_number(1), default=MAX_MESSAGE_SIZE + RELAY_OVERHEAD,
                        metavar="BYTES", help="largest message accepted (default: %(default)s)")
    client.add_argument("--no-timestamps", action="store_true",
                        help="don't start each line with the local time (HH:MM)")
    client.add_argument("--no-compression", action="store_true",
                        help="don't offer permessage-deflate (RFC 7692)")
    client.set_defaults(run=run_client)


def client_url(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """--url as given, or one built from --host and --port; both ways at once is an error."""
    if args.url is None:
        scheme = "wss" if args.cafile or args.insecure else "ws"   # flags only TLS needs
        return f"{scheme}://{host_port(args.host or CHAT_HOST, args.port or CHAT_PORT)}{CHAT_PATH}"
    if args.host is not None or args.port is not None:
        parser.error("give --url, or --host and --port, not both: --url is the whole address")
    return args.url


@contextlib.contextmanager
def terminal_restored(wanted: bool) -> typing.Iterator[None]:
    """Put the terminal's settings back, should we exit with it still in raw mode."""
    settings = None
    if wanted and sys.stdin.isatty():
        with contextlib.suppress(ImportError, OSError):
            import termios   # Unix only; imported here so the rest runs anywhere
            settings = termios.tcgetattr(sys.stdin.fileno())
    try:
        yield
    finally:
        if settings is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, settings)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv   # what --workers runs again
    if getattr(args, "workers", 1) > 1 and not args.redis:
        parser.error("--workers needs --redis: separate processes share a room only through Redis")
    if args.command == "client":
        args.url = client_url(parser, args)
    if getattr(args, "redis", None) and args.max_size > MAX_MESSAGE_SIZE:
        parser.error(f"with --redis, --max-size can be at most {MAX_MESSAGE_SIZE}: "
                     "Redis's replies are read within RESP_MAX_REPLY")
    # -v traces our frames, not asyncio's internals; the client's screen is for the chat.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        level=logging.WARNING if args.command == "client" else logging.INFO)
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    with terminal_restored(args.command == "client"):
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


if __name__ == "__main__":
    sys.exit(main())
