"""Tests for chat.py, in the order of its sections; standard library only.

    python -m unittest -v test_chat

Each class names the part of RFC 6455 it checks. Network tests use real
sockets on 127.0.0.1 with port 0, and every await runs under a timeout.
"""

import asyncio
import base64
import collections
import contextlib
import glob
import http
import importlib.util
import io
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import typing
import unicodedata
import unittest
import unittest.mock
import urllib.request

import chat
from chat import CloseCode, Opcode
from chat import (  # the pure parts of sections 8 and 9, tested name by name
    BRACKETED_PASTE_ON, COMMANDS, MAX_NAME_LENGTH, PASTE_END, PASTE_START, TAB_SPACES, Action,
    ChatLine, Command, InputView, Key, KeyDecoder, KeyEvent, LineEditor, char_width,
    check_name, display_width, help_lines, layout, name_key, parse_line, printable, script_of,
    visible_rows)

#: No single step of a test may take longer than this (seconds).
TIMEOUT = 10.0


def setUpModule():
    chat.page()   # built once (0.2-0.5 s), before a test's event loop would report it as slow

MASK = b"\x37\xfa\x21\x3d"   # the mask key of RFC 6455 §5.7's examples


async def within(awaitable, seconds: float = TIMEOUT):
    return await asyncio.wait_for(awaitable, seconds)


async def expect_closed(source, code: int | None = None) -> chat.ConnectionClosed:
    """The ConnectionClosed that ends ``source``, checking its code if one is given.

    ``source`` is a Connection (read until it closes, whatever comes first)
    or an awaitable such as ``conn.recv()`` or a task.
    """
    try:
        if isinstance(source, chat.Connection):
            while True:
                await within(source.recv())
        await within(source)
    except chat.ConnectionClosed as closed:
        if code is not None and closed.code != code:
            raise AssertionError(f"closed with {closed}, expected {code}") from None
        return closed
    raise AssertionError("the connection did not close")


async def until(predicate, seconds: float = TIMEOUT) -> None:
    """Wait, turn by turn of the event loop, until ``predicate()`` holds (bounded)."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0)
    await within(poll(), seconds)


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A frame as a client sends it: masked."""
    return chat.encode_frame(opcode, payload, fin=fin, mask=True, mask_key=MASK, rsv=rsv)


class Frame(typing.NamedTuple):
    """What the tests compare of a frame: its opcode, unmasked payload and FIN bit."""

    opcode: int
    payload: bytes = b""
    fin: bool = True


def parse_frame(data: bytes, *, expect_masked: bool) -> tuple[Frame, int]:
    """chat.parse_frame (the connection's own FrameReader), as a Frame and its size."""
    header, payload, size = chat.parse_frame(data, expect_masked=expect_masked)
    return Frame(header.opcode, payload, header.fin), size


def close_frame_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


class LogCatcher(logging.Handler):
    """Collects the "chat" logger's records; next() waits for the next one."""

    def __init__(self, level):
        super().__init__(level)
        self.records = asyncio.Queue()
        logger = logging.getLogger("chat")
        self.previous_level = logger.level
        logger.setLevel(level)
        logger.addHandler(self)

    def emit(self, record):
        self.records.put_nowait(record)

    async def next(self) -> logging.LogRecord:
        return await self.records.get()

    def remove(self):
        logging.getLogger("chat").removeHandler(self)
        logging.getLogger("chat").setLevel(self.previous_level)


class QuietLogs(unittest.TestCase):
    """Keep the expected refusals out of the test output."""

    @classmethod
    def setUpClass(cls):
        logging.getLogger("chat").setLevel(logging.CRITICAL)

    @classmethod
    def tearDownClass(cls):
        logging.getLogger("chat").setLevel(logging.NOTSET)


# 3. Handshake ##############################################################

class TestHandshake(unittest.TestCase):
    """RFC 6455 §1.3 and §4: the opening handshake, as pure functions."""

    def request(self, **overrides):
        headers = {
            "host": "example.com", "upgrade": "websocket", "connection": "Upgrade",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13",
        }
        headers.update(overrides)
        return chat.Request("GET", "/chat", {k: v for k, v in headers.items() if v is not None})

    def assert_refused(self, request, status):
        with self.assertRaises(chat.HandshakeError) as caught:
            chat.require_get(request)
            chat.check_request(request)
        self.assertEqual(caught.exception.status, status)
        return caught.exception

    def test_accept_key_matches_rfc_example(self):
        # RFC 6455 §1.3
        self.assertEqual(chat.accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_new_key_is_16_random_bytes_in_base64(self):
        keys = {chat.new_key() for _ in range(10)}
        self.assertEqual(len(keys), 10)
        for key in keys:
            self.assertEqual(len(base64.b64decode(key)), 16)

    def test_valid_request_returns_key(self):
        self.assertEqual(chat.check_request(self.request()), "dGhlIHNhbXBsZSBub25jZQ==")

    def test_header_values_are_case_insensitive_and_token_lists(self):
        request = self.request(upgrade="WebSocket", connection="keep-alive, UPGRADE")
        self.assertEqual(chat.check_request(request), "dGhlIHNhbXBsZSBub25jZQ==")

    def test_rejects_missing_host(self):
        self.assert_refused(self.request(host=None), http.HTTPStatus.BAD_REQUEST)

    def test_rejects_plain_http_request(self):
        self.assert_refused(self.request(upgrade=None, connection=None), http.HTTPStatus.BAD_REQUEST)

    def test_rejects_connection_without_upgrade_token(self):
        self.assert_refused(self.request(connection="keep-alive"), http.HTTPStatus.BAD_REQUEST)

    def test_rejects_key_that_is_not_16_bytes(self):
        for key in ("", "not base64!", base64.b64encode(b"x" * 15).decode(), None):
            with self.subTest(key=key):
                self.assert_refused(self.request(**{"sec-websocket-key": key}), http.HTTPStatus.BAD_REQUEST)

    def test_rejects_other_version_with_426_naming_13(self):
        error = self.assert_refused(self.request(**{"sec-websocket-version": "8"}),
                                    http.HTTPStatus.UPGRADE_REQUIRED)
        self.assertIn(("Sec-WebSocket-Version", "13"), error.headers)

    def test_rejects_missing_version(self):
        self.assert_refused(self.request(**{"sec-websocket-version": None}), http.HTTPStatus.BAD_REQUEST)

    def test_rejects_method_other_than_get_with_405(self):
        request = self.request()
        request.method = "POST"
        self.assert_refused(request, http.HTTPStatus.METHOD_NOT_ALLOWED)

    def test_parse_request_rejects_http_1_0_and_garbage(self):
        for line in (b"GET / HTTP/1.0", b"GET /", b"GET  / HTTP/1.1", b"\xff / HTTP/1.1", b"GET x HTTP/1.1"):
            with self.subTest(line=line):
                with self.assertRaises(chat.HandshakeError) as caught:
                    chat.parse_request([line, b"Host: x"])
                self.assertEqual(caught.exception.status, http.HTTPStatus.BAD_REQUEST)

    def test_a_target_that_is_not_a_path_and_query_is_400(self):
        for target in ("//[", "//[::1/", "//a]b/chat", "/chat\x00x", "/a b", "/café", "/x#frag", "/%zz"):
            with self.subTest(target=target), self.assertRaises(chat.HandshakeError) as caught:
                chat.parse_request([f"GET {target} HTTP/1.1".encode("utf-8"), b"Host: x"])
            self.assertEqual(caught.exception.status, http.HTTPStatus.BAD_REQUEST)
        for target in ("/", "/chat?name=bob%20x&resume=a-b_c", "//x/chat", "/a/b;c=d?e=/f?g",
                       "/chat?name=a|b{c}^`[]"):   # as browsers send a query
            with self.subTest(target=target):
                self.assertEqual(chat.parse_request([f"GET {target} HTTP/1.1".encode(), b"Host: x"]).target,
                                 target)

    def test_host_is_one_host_and_port_without_userinfo(self):
        for hosts in ([b"Host: 127.0.0.1", b"Host: evil.example"], [b"Host: evil.example@127.0.0.1"],
                      [b"Host: a b"], [b"Host: [::1"]):
            with self.subTest(hosts=hosts), self.assertRaises(chat.HandshakeError) as caught:
                chat.parse_request([b"GET /chat HTTP/1.1", *hosts])
            self.assertEqual(caught.exception.status, http.HTTPStatus.BAD_REQUEST)
        for host in (b"example.com", b"127.0.0.1:8080", b"[::1]:80", b"xn--bcher-kva.example."):
            with self.subTest(host=host):
                chat.parse_request([b"GET /chat HTTP/1.1", b"Host: " + host])

    def test_parse_headers_joins_repeats_and_rejects_malformed_lines(self):
        headers = chat.parse_headers([b"Connection: keep-alive", b"connection:  Upgrade "])
        self.assertEqual(headers["connection"], "keep-alive, Upgrade")
        for line in (b"no colon", b"bad name: x", b" folded: x", b"X: a\x00b"):
            with self.subTest(line=line), self.assertRaises(chat.HandshakeError):
                chat.parse_headers([line])

    def test_parse_uri(self):
        cases = {
            "ws://example.com": (False, "example.com", 80, "/", "example.com"),
            "wss://example.com/chat?name=bob": (True, "example.com", 443, "/chat?name=bob", "example.com"),
            "ws://example.com:8080/a/b": (False, "example.com", 8080, "/a/b", "example.com:8080"),
            "wss://example.com:443/": (True, "example.com", 443, "/", "example.com"),
            "ws://[::1]:9000/chat": (False, "::1", 9000, "/chat", "[::1]:9000"),
            "ws://[::1]/": (False, "::1", 80, "/", "[::1]"),
        }
        for uri, (secure, host, port, resource, host_header) in cases.items():
            with self.subTest(uri=uri):
                parsed = chat.parse_uri(uri)
                self.assertEqual((parsed.secure, parsed.host, parsed.port, parsed.resource, parsed.host_header),
                                 (secure, host, port, resource, host_header))

    def test_parse_uri_rejects_other_schemes_fragments_and_bad_ports(self):
        for uri in ("http://example.com/", "ws://example.com/#frag", "ws:///path", "ws://host:99999/"):
            with self.subTest(uri=uri), self.assertRaises(ValueError):
                chat.parse_uri(uri)

    def test_build_request_has_every_required_header(self):
        request = chat.build_request(chat.parse_uri("ws://[::1]:9000/chat?x=1"), "KEY", "http://o")
        lines = request.decode().split("\r\n")
        self.assertEqual(lines[0], "GET /chat?x=1 HTTP/1.1")
        for line in ("Host: [::1]:9000", "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Key: KEY", "Sec-WebSocket-Version: 13", "Origin: http://o"):
            self.assertIn(line, lines)
        self.assertTrue(request.endswith(b"\r\n\r\n"))

    def test_check_response(self):
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        good = {"upgrade": "websocket", "connection": "Upgrade",
                "sec-websocket-accept": "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="}
        chat.check_response(good, key)
        for change in ({"upgrade": "h2c"}, {"connection": "close"}, {"sec-websocket-accept": "wrong"},
                       {"sec-websocket-extensions": "permessage-deflate"}, {"sec-websocket-protocol": "chat"}):
            with self.subTest(change=change), self.assertRaises(chat.HandshakeError):
                chat.check_response({**good, **change}, key)


# 4. Frames #################################################################

class TestFrames(unittest.TestCase):
    """RFC 6455 §5.2-§5.7: every §5.7 example, bytes -> frame and frame -> bytes."""

    EXAMPLES = [
        # (description, bytes on the wire, masked, opcode, payload, fin)
        ("unmasked text 'Hello'", bytes.fromhex("810548656c6c6f"), False, Opcode.TEXT, b"Hello", True),
        ("masked text 'Hello'", bytes.fromhex("818537fa213d7f9f4d5158"), True, Opcode.TEXT, b"Hello", True),
        ("first fragment 'Hel'", bytes.fromhex("010348656c"), False, Opcode.TEXT, b"Hel", False),
        ("final fragment 'lo'", bytes.fromhex("80026c6f"), False, Opcode.CONTINUATION, b"lo", True),
        ("unmasked ping 'Hello'", bytes.fromhex("890548656c6c6f"), False, Opcode.PING, b"Hello", True),
        ("masked pong 'Hello'", bytes.fromhex("8a8537fa213d7f9f4d5158"), True, Opcode.PONG, b"Hello", True),
        ("256 bytes binary", bytes.fromhex("827e0100") + bytes(256), False, Opcode.BINARY, bytes(256), True),
        ("64 KiB binary", bytes.fromhex("827f0000000000010000") + bytes(65536), False, Opcode.BINARY,
         bytes(65536), True),
    ]

    def test_rfc_examples_decode(self):
        for description, wire, masked, opcode, payload, fin in self.EXAMPLES:
            with self.subTest(description):
                frame, size = parse_frame(wire, expect_masked=masked)
                self.assertEqual(frame, Frame(opcode, payload, fin))
                self.assertEqual(size, len(wire))

    def test_rfc_examples_encode(self):
        for description, wire, masked, opcode, payload, fin in self.EXAMPLES:
            with self.subTest(description):
                encoded = chat.encode_frame(opcode, payload, fin=fin, mask=masked,
                                            mask_key=MASK if masked else None)
                self.assertEqual(encoded, wire)

    def test_lengths_use_the_smallest_field(self):
        for length, header_size in ((0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)):
            with self.subTest(length=length):
                encoded = chat.encode_frame(Opcode.BINARY, bytes(length))
                self.assertEqual(len(encoded) - length, header_size)
                self.assertEqual(parse_frame(encoded, expect_masked=False)[0].payload, bytes(length))

    def test_masking_uses_a_fresh_key_each_time(self):
        frames = {chat.encode_frame(Opcode.TEXT, b"same", mask=True) for _ in range(10)}
        self.assertEqual(len(frames), 10)
        for frame in frames:
            self.assertEqual(parse_frame(frame, expect_masked=True)[0].payload, b"same")

    def test_apply_mask_is_its_own_inverse_and_matches_a_byte_loop(self):
        data = bytes(range(256)) * 5 + b"xyz"
        expected = bytes(b ^ MASK[i % 4] for i, b in enumerate(data))
        self.assertEqual(chat.apply_mask(data, MASK), expected)
        self.assertEqual(chat.apply_mask(expected, MASK), data)
        self.assertEqual(chat.apply_mask(b"", MASK), b"")

    def test_rotated_mask_unmasks_a_payload_read_in_pieces(self):
        data = bytes(range(50))
        masked = chat.apply_mask(data, MASK)
        pieces = [masked[:3], masked[3:10], masked[10:11], masked[11:]]
        offset, out = 0, b""
        for piece in pieces:
            out += chat.apply_mask(piece, chat.rotate_mask(MASK, offset))
            offset += len(piece)
        self.assertEqual(out, data)

    def test_apply_mask_reads_between_start_and_end_without_slicing_first(self):
        data = bytes(range(50))
        masked = b"head" + bytes(chat.apply_mask(data, MASK)) + b"tail"
        self.assertEqual(chat.apply_mask(masked, MASK, 4, 54), data)
        self.assertEqual(chat.apply_mask(masked, chat.rotate_mask(MASK, 7), 11, 54), data[7:])

    def test_reader_hands_over_payload_fed_in_pieces_unmasked(self):
        wire = client_frame(Opcode.BINARY, bytes(range(200)))
        reader = chat.FrameReader(expect_masked=True)
        pieces = []
        for i in range(0, len(wire), 7):
            reader.feed(wire[i:i + 7])
            if reader.remaining or reader.read_header() is not None:
                pieces.append(reader.read_payload())
        self.assertEqual(b"".join(pieces), bytes(range(200)))
        self.assertEqual((reader.remaining, reader.buffered), (0, 0))

    def assert_header_rejected(self, wire: bytes, *, expect_masked: bool):
        with self.assertRaises(chat.ProtocolError) as caught:
            parse_frame(wire, expect_masked=expect_masked)
        self.assertEqual(caught.exception.close_code, CloseCode.PROTOCOL_ERROR)

    def test_server_rejects_unmasked_client_frame(self):
        self.assert_header_rejected(bytes.fromhex("810548656c6c6f"), expect_masked=True)

    def test_client_rejects_masked_server_frame(self):
        self.assert_header_rejected(bytes.fromhex("818537fa213d7f9f4d5158"), expect_masked=False)

    def test_rejects_reserved_bits(self):
        for rsv in range(1, 8):
            with self.subTest(rsv=rsv):
                self.assert_header_rejected(client_frame(Opcode.TEXT, b"x", rsv=rsv), expect_masked=True)

    def test_rejects_unknown_opcodes(self):
        for opcode in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):
            with self.subTest(opcode=opcode):
                self.assert_header_rejected(client_frame(opcode), expect_masked=True)

    def test_rejects_fragmented_and_oversized_control_frames(self):
        self.assert_header_rejected(client_frame(Opcode.PING, b"x", fin=False), expect_masked=True)
        self.assert_header_rejected(client_frame(Opcode.PING, bytes(126)), expect_masked=True)
        self.assertEqual(parse_frame(client_frame(Opcode.PING, bytes(125)), expect_masked=True)[0].payload,
                         bytes(125))

    def test_rejects_64_bit_length_with_high_bit(self):
        self.assert_header_rejected(bytes.fromhex("827f8000000000000000"), expect_masked=False)


# 5. Messages ###############################################################

class TestMessages(unittest.TestCase):
    """RFC 6455 §5.4 (fragments), §8.1 (UTF-8), §5.5.1 and §7.4 (close payloads)."""

    def test_reassembles_fragmented_text(self):
        assembler = chat.MessageAssembler(100)
        assembler.start_frame(Opcode.TEXT, 3)
        assembler.add(b"Hel")
        assembler.start_frame(Opcode.CONTINUATION, 2)
        assembler.add(b"lo")
        self.assertEqual(assembler.finish(), chat.Message(Opcode.TEXT, b"Hello"))

    def test_continuation_with_nothing_to_continue_is_1002(self):
        with self.assertRaises(chat.ProtocolError) as caught:
            chat.MessageAssembler(100).start_frame(Opcode.CONTINUATION, 1)
        self.assertEqual(caught.exception.close_code, CloseCode.PROTOCOL_ERROR)

    def test_new_message_before_final_fragment_is_1002(self):
        assembler = chat.MessageAssembler(100)
        assembler.start_frame(Opcode.TEXT, 1)
        with self.assertRaises(chat.ProtocolError) as caught:
            assembler.start_frame(Opcode.BINARY, 1)
        self.assertEqual(caught.exception.close_code, CloseCode.PROTOCOL_ERROR)

    def test_size_limit_counts_every_fragment_and_is_1009(self):
        assembler = chat.MessageAssembler(10)
        assembler.start_frame(Opcode.BINARY, 6)
        with self.assertRaises(chat.MessageTooBig) as caught:
            assembler.start_frame(Opcode.CONTINUATION, 5)
        self.assertEqual(caught.exception.close_code, CloseCode.MESSAGE_TOO_BIG)

    def test_invalid_utf8_fails_at_the_byte_not_at_the_end(self):
        assembler = chat.MessageAssembler(100)
        assembler.start_frame(Opcode.TEXT, 20)
        assembler.add("κό".encode())
        with self.assertRaises(chat.InvalidPayload) as caught:
            assembler.add(b"\xed\xa0\x80")   # a UTF-16 surrogate: never valid in UTF-8
        self.assertEqual(caught.exception.close_code, CloseCode.INVALID_PAYLOAD)

    def test_utf8_split_across_fragments_is_fine_but_cut_off_is_1007(self):
        assembler = chat.MessageAssembler(100)
        assembler.start_frame(Opcode.TEXT, 2)
        assembler.add("é".encode()[:1])
        assembler.add("é".encode()[1:])
        self.assertEqual(assembler.finish().decoded(), "é")
        assembler.start_frame(Opcode.TEXT, 1)
        assembler.add(b"\xc3")
        with self.assertRaises(chat.InvalidPayload):
            assembler.finish()

    def test_close_payloads(self):
        self.assertEqual(chat.parse_close_payload(b""), (CloseCode.NO_STATUS_RCVD, ""))
        self.assertEqual(chat.parse_close_payload(close_frame_payload(1000, "bye")), (1000, "bye"))
        for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999):
            with self.subTest(code=code):
                self.assertEqual(chat.parse_close_payload(struct.pack("!H", code))[0], code)

    def test_close_payload_of_one_byte_is_1002(self):
        with self.assertRaises(chat.ProtocolError) as caught:
            chat.parse_close_payload(b"\x03")
        self.assertEqual(caught.exception.close_code, CloseCode.PROTOCOL_ERROR)

    def test_close_codes_not_allowed_on_the_wire_are_1002(self):
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
            with self.subTest(code=code), self.assertRaises(chat.ProtocolError) as caught:
                chat.parse_close_payload(struct.pack("!H", code))
            self.assertEqual(caught.exception.close_code, CloseCode.PROTOCOL_ERROR)

    def test_close_reason_that_is_not_utf8_is_1007(self):
        with self.assertRaises(chat.InvalidPayload) as caught:
            chat.parse_close_payload(struct.pack("!H", 1000) + b"\xff")
        self.assertEqual(caught.exception.close_code, CloseCode.INVALID_PAYLOAD)

    def test_encoded_close_reason_fits_in_a_control_frame(self):
        payload = chat.encode_close_payload(1000, "é" * 200)
        self.assertLessEqual(len(payload), 125)
        self.assertEqual(chat.parse_close_payload(payload)[0], 1000)
        self.assertEqual(chat.encode_close_payload(CloseCode.NO_STATUS_RCVD), b"")


# 6. Connection #############################################################

class FakeTransport(asyncio.Transport):
    """Records what the connection writes, and hands its protocol what the test says the peer sent.

    Its first protocol is a StreamReaderProtocol, as after a real handshake;
    the Connection puts its Incoming in that one's place.
    """

    def __init__(self, reader: asyncio.StreamReader):
        super().__init__()
        self.protocol: asyncio.BaseProtocol = asyncio.StreamReaderProtocol(reader)
        self.reading_paused = False
        self.peer_ended = False   # deliver_eof() was called
        self.written = bytearray()
        self.closing = False
        self.eof_written = False
        self.peer_never_reads = False   # then everything written stays in our buffer
        self.write_waiters = []
        self.writes = 0
        self.drain_started = asyncio.Event()
        self.drain_released: asyncio.Event | None = None   # an Event makes drain() wait for it

    def write(self, data):
        self.written += data
        self.writes += bool(data)   # each one a system call on a real socket
        for waiter in self.write_waiters:
            waiter.done() or waiter.set_result(None)
        self.write_waiters.clear()

    def next_write(self) -> asyncio.Future:
        """A future that is done once the connection next writes (or closes) anything."""
        waiter = asyncio.get_running_loop().create_future()
        self.write_waiters.append(waiter)
        return waiter

    def is_closing(self):
        return self.closing

    def get_protocol(self):
        return self.protocol

    def set_protocol(self, protocol):
        self.protocol = protocol

    def pause_reading(self):
        self.reading_paused = True

    def resume_reading(self):
        """As a socket's transport: reading again, it hears again that the peer ended."""
        self.reading_paused = False
        if self.peer_ended:
            asyncio.get_running_loop().call_soon(lambda: self.protocol.eof_received())

    def deliver(self, data: bytes):
        """The peer sent ``data``: hand it to the protocol, as a socket's transport does."""
        self.protocol.data_received(data)

    def deliver_eof(self):
        """The peer closed its side of TCP."""
        self.peer_ended = True
        self.protocol.eof_received()

    def get_write_buffer_size(self):
        return len(self.written) if self.peer_never_reads else 0

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof_written = True

    def close(self):
        self.closing = True
        self.write(b"")

    def abort(self):
        self.close()
        self.protocol.connection_lost(None)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 12345) if name == "peername" else default


class FakeWriter:
    """Just the StreamWriter methods a Connection uses."""

    def __init__(self, transport):
        self.transport = transport

    def get_extra_info(self, name, default=None):
        return self.transport.get_extra_info(name, default)

    def close(self):
        self.transport.close()

    async def drain(self):
        """Returns at once, unless a test holds it (``hold_drain``) to play a slow reader."""
        if self.transport.drain_released is not None:
            self.transport.drain_started.set()
            await self.transport.drain_released.wait()


class TestConnection(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """RFC 6455 §5-§7 on one connection, fed through a bare asyncio.StreamReader.

    TestFastConnection (section 9) runs every test here again on the
    FastConnection that serve() and connect() make.
    """

    connection_class = chat.Connection

    def connect(self, *, is_client=False, max_size=2**20):
        self.reader = asyncio.StreamReader()   # the handshake's
        self.transport = FakeTransport(self.reader)
        return self.connection_class(self.reader, FakeWriter(self.transport), is_client=is_client,
                                     max_size=max_size, close_timeout=1.0)

    def unread(self) -> int:
        """Bytes delivered that the connection hasn't taken yet (StreamReader has no public count)."""
        return len(self.reader._buffer)

    def sent_frames(self, *, by_client=False):
        data, frames = bytes(self.transport.written), []
        while data:
            frame, size = parse_frame(data, expect_masked=by_client)
            frames.append(frame)
            data = data[size:]
        return frames

    async def feed_slowly(self, data: bytes, then_eof: bool = False):
        """One byte at a time, the next once the connection took the last: the slowest network."""
        for i in range(len(data)):
            self.transport.deliver(data[i:i + 1])
            await until(lambda: not self.unread())
        if then_eof:
            self.transport.deliver_eof()

    async def assert_fails_with(self, conn, code: int, data: bytes):
        self.transport.deliver(data)
        self.transport.deliver_eof()
        # The fake peer hangs up without answering our close frame: §7.1.5 makes that 1006.
        closed = await expect_closed(conn.recv(), CloseCode.ABNORMAL_CLOSURE)
        self.assertEqual((closed.sent.code, closed.rcvd), (code, None))
        close = self.sent_frames(by_client=conn.is_client)[-1]
        self.assertEqual(close.opcode, Opcode.CLOSE)
        self.assertEqual(chat.parse_close_payload(close.payload)[0], code)
        self.assertEqual(conn.state, chat.State.CLOSED)

    async def test_a_fin_the_handshake_reader_heard_reaches_the_connection(self):
        reader = asyncio.StreamReader()
        self.transport = FakeTransport(reader)
        self.transport.deliver(client_frame(Opcode.TEXT, b"last words"))
        self.transport.deliver_eof()   # both before the Connection takes over reading
        conn = self.connection_class(reader, FakeWriter(self.transport), is_client=False,
                                     close_timeout=1.0)
        self.assertEqual(await within(conn.recv()), "last words")
        await expect_closed(conn.recv(), CloseCode.ABNORMAL_CLOSURE)

    async def test_frame_reader_fed_one_byte_at_a_time(self):
        conn = self.connect()
        wire = (client_frame(Opcode.TEXT, b"Hel", fin=False) + client_frame(Opcode.PING, b"p")
                + client_frame(Opcode.CONTINUATION, b"lo") + client_frame(Opcode.BINARY, bytes(300)))
        feeding = asyncio.create_task(self.feed_slowly(wire))
        self.assertEqual(await within(conn.recv()), "Hello")
        self.assertEqual(await within(conn.recv()), bytes(300))
        await feeding
        self.assertEqual(self.sent_frames(), [Frame(Opcode.PONG, b"p")])

    async def test_recv_message_hands_text_over_as_the_utf8_that_came(self):
        conn = self.connect()
        self.transport.deliver(client_frame(Opcode.TEXT, "κό".encode(), fin=False)
                              + client_frame(Opcode.CONTINUATION, b"s" * 5000)
                              + client_frame(Opcode.BINARY, b"\x00"))
        self.assertEqual(await within(conn.recv_message()),
                         chat.Message(Opcode.TEXT, "κό".encode() + b"s" * 5000))
        self.assertEqual(await within(conn.recv_message()), chat.Message(Opcode.BINARY, b"\x00"))

    async def test_ping_is_answered_with_same_payload_and_unsolicited_pong_ignored(self):
        conn = self.connect()
        written = self.transport.next_write()
        self.transport.deliver(client_frame(Opcode.PONG, b"nobody asked")
                              + client_frame(Opcode.PING, b"data") + client_frame(Opcode.TEXT, b"after"))
        self.assertEqual(await within(conn.recv()), "after")
        await within(written)   # the pong leaves at the end of this turn of the loop
        self.assertEqual(self.sent_frames(), [Frame(Opcode.PONG, b"data")])

    async def test_ping_returns_when_its_pong_arrives(self):
        conn = self.connect(is_client=True)
        pinging = asyncio.create_task(conn.ping(b"42"))
        receiving = asyncio.create_task(conn.recv())
        await within(self.transport.next_write())   # the ping
        self.assertFalse(pinging.done())
        self.transport.deliver(chat.encode_frame(Opcode.PONG, b"42") + chat.encode_frame(Opcode.TEXT, b"x"))
        await within(pinging)
        self.assertEqual(await within(receiving), "x")
        self.assertEqual(self.sent_frames(by_client=True), [Frame(Opcode.PING, b"42")])

    async def test_server_rejects_unmasked_client_frame_with_1002(self):
        await self.assert_fails_with(self.connect(), CloseCode.PROTOCOL_ERROR,
                                     chat.encode_frame(Opcode.TEXT, b"hi"))

    async def test_client_rejects_masked_server_frame_with_1002(self):
        await self.assert_fails_with(self.connect(is_client=True), CloseCode.PROTOCOL_ERROR,
                                     client_frame(Opcode.TEXT, b"hi"))

    async def test_protocol_errors_close_with_1002(self):
        cases = {
            "reserved bit": client_frame(Opcode.TEXT, b"x", rsv=4),
            "unknown opcode": client_frame(0x3, b"x"),
            "fragmented ping": client_frame(Opcode.PING, b"x", fin=False),
            "ping over 125": client_frame(Opcode.PING, bytes(126)),
            "lone continuation": client_frame(Opcode.CONTINUATION, b"x"),
            "text inside text": client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.TEXT, b"b"),
            "1-byte close": client_frame(Opcode.CLOSE, b"\x03"),
            "close code 1005": client_frame(Opcode.CLOSE, close_frame_payload(1005)),
            "close code 999": client_frame(Opcode.CLOSE, close_frame_payload(999)),
        }
        for name, wire in cases.items():
            with self.subTest(name):
                await self.assert_fails_with(self.connect(), CloseCode.PROTOCOL_ERROR, wire)

    async def test_invalid_utf8_closes_with_1007(self):
        await self.assert_fails_with(self.connect(), CloseCode.INVALID_PAYLOAD,
                                     client_frame(Opcode.TEXT, b"ok \xff"))
        await self.assert_fails_with(self.connect(), CloseCode.INVALID_PAYLOAD,
                                     client_frame(Opcode.CLOSE, close_frame_payload(1000) + b"\xff"))

    async def test_invalid_utf8_fails_before_the_frame_is_complete(self):
        conn = self.connect()
        wire = client_frame(Opcode.TEXT, b"valid, then \xf4\x90 and more that never arrives")
        # Only the header and the first bytes of the payload: a reader that waits
        # for the whole frame would see the end of the stream (1006) instead.
        await self.assert_fails_with(conn, CloseCode.INVALID_PAYLOAD, wire[:6 + 14])

    async def test_message_over_the_limit_closes_with_1009_before_the_payload(self):
        conn = self.connect(max_size=1000)
        header_only = client_frame(Opcode.BINARY, bytes(1001))[:8]
        await self.assert_fails_with(conn, CloseCode.MESSAGE_TOO_BIG, header_only)

    async def test_message_before_a_broken_frame_is_delivered_first(self):
        conn = self.connect()
        self.transport.deliver(client_frame(Opcode.TEXT, b"first") + client_frame(Opcode.TEXT, b"x", rsv=1))
        self.transport.deliver_eof()
        self.assertEqual(await within(conn.recv()), "first")
        closed = await expect_closed(conn.recv())
        self.assertEqual(closed.sent.code, CloseCode.PROTOCOL_ERROR)

    async def test_peer_close_is_echoed_and_reported(self):
        conn = self.connect()
        self.transport.deliver(client_frame(Opcode.CLOSE, close_frame_payload(1001, "bye")))
        closed = await expect_closed(conn.recv())
        self.assertEqual((closed.code, closed.reason), (1001, "bye"))
        self.assertEqual(self.sent_frames(), [Frame(Opcode.CLOSE, struct.pack("!H", 1001))])
        self.assertTrue(self.transport.closing)   # the server closes TCP first (§7.1.1)

    async def test_empty_close_is_reported_as_1005_and_answered_empty(self):
        conn = self.connect()
        self.transport.deliver(client_frame(Opcode.CLOSE))
        await expect_closed(conn.recv(), CloseCode.NO_STATUS_RCVD)
        self.assertEqual(self.sent_frames(), [Frame(Opcode.CLOSE, b"")])

    async def test_tcp_dying_is_reported_as_1006(self):
        conn = self.connect()
        self.transport.deliver(client_frame(Opcode.TEXT, b"half")[:5])
        self.transport.deliver_eof()
        await expect_closed(conn.recv(), CloseCode.ABNORMAL_CLOSURE)
        self.assertEqual(self.sent_frames(), [])

    async def test_close_waits_for_the_peers_close_and_drops_data_in_between(self):
        conn = self.connect()
        closing = asyncio.create_task(conn.close(CloseCode.GOING_AWAY, "later"))
        await within(self.transport.next_write())
        self.assertEqual(self.sent_frames()[-1].payload, close_frame_payload(1001, "later"))
        self.transport.deliver(client_frame(Opcode.TEXT, b"late")
                              + client_frame(Opcode.CLOSE, close_frame_payload(1001)))
        await within(closing)
        self.assertEqual(conn.state, chat.State.CLOSED)
        await expect_closed(conn.recv(), CloseCode.GOING_AWAY)
        with self.assertRaises(chat.ConnectionClosed):
            await conn.send("too late")

    async def test_close_gives_up_after_the_timeout_when_the_peer_is_silent(self):
        conn = self.connect()
        await within(conn.close(), 5)   # close_timeout is 1 s here
        self.assertEqual(conn.state, chat.State.CLOSED)
        self.assertEqual(conn.close_code, CloseCode.ABNORMAL_CLOSURE)

    async def test_send_while_closing_reports_the_close_under_way_not_1006(self):
        conn = self.connect()
        conn.close_nowait(CloseCode.NORMAL_CLOSURE, "done")
        closed = await expect_closed(conn.send("after the close"), CloseCode.NORMAL_CLOSURE)
        self.assertEqual((closed.reason, closed.rcvd), ("done", None))
        # The peer's answer settles it: its close frame is what §7.1.5 reports.
        self.transport.deliver(client_frame(Opcode.CLOSE, close_frame_payload(1000)))
        await within(conn.close())
        closed = await expect_closed(conn.send("later still"), CloseCode.NORMAL_CLOSURE)
        self.assertEqual(closed.rcvd, (1000, ""))

    async def test_client_waits_for_the_server_to_close_tcp(self):
        conn = self.connect(is_client=True)
        self.transport.deliver(chat.encode_frame(Opcode.CLOSE, close_frame_payload(1000)))
        receiving = asyncio.create_task(conn.recv())
        await within(self.transport.next_write())   # our answering close frame
        self.assertFalse(receiving.done())              # still waiting for the server's FIN
        self.transport.deliver_eof()
        await expect_closed(receiving, 1000)


# 7. Server and client over real sockets ####################################

async def raw_exchange(port: int, data: bytes, *, read_until_eof: bool = True) -> bytes:
    """Send raw bytes to the server and return everything it answers before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await within(reader.read()) if read_until_eof else b""
    finally:
        writer.close()


def upgrade_request(path: str = "/", extra: str = "", version: str = "13") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n"
            f"{extra}\r\n").encode()


class ServerTestCase(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """Starts servers on 127.0.0.1:0 and closes them (and their clients) afterwards."""

    async def start(self, handler=chat.echo, **options):
        options.setdefault("keepalive_interval", None)
        options.setdefault("close_timeout", 2.0)
        server = await chat.serve(handler, "127.0.0.1", 0, **options)
        self.addAsyncCleanup(server.close)   # after its clients: cleanups run last-in, first-out
        return server

    async def open(self, server, path="/", **options):
        conn = await within(chat.connect(f"ws://127.0.0.1:{server.port}{path}", **options))
        self.addAsyncCleanup(conn.close)
        return conn


class TestEchoRoundTrips(ServerTestCase):
    """The client and server roles talking to each other (RFC 6455 §5-§7)."""

    async def test_text_and_binary_at_every_length_boundary(self):
        server = await self.start()
        conn = await self.open(server)
        for size in (0, 125, 126, 65535, 65536, 2**20):
            with self.subTest(size=size):
                text = "é" * (size // 2) + "x" * (size % 2)   # multi-byte UTF-8, exactly `size` bytes
                await within(conn.send(text))
                self.assertEqual(await within(conn.recv()), text)
                data = os.urandom(size)
                await within(conn.send(data))
                self.assertEqual(await within(conn.recv()), data)

    async def test_async_for_and_ping(self):
        server = await self.start()
        conn = await self.open(server)
        await conn.send("one")
        await conn.send("two")
        received = []
        async for message in conn:
            received.append(message)
            if len(received) == 2:
                pinging = asyncio.create_task(conn.ping(b"are you there"))
                await conn.close()
        self.assertEqual(received, ["one", "two"])
        with self.assertRaises(chat.ConnectionClosed):
            await within(pinging)   # the connection ended before a pong could be read

    async def test_ping_round_trip(self):
        server = await self.start()
        conn = await self.open(server)
        receiving = asyncio.create_task(conn.recv())
        await within(conn.ping(b"hello"))
        await conn.send("done")
        self.assertEqual(await within(receiving), "done")

    async def test_client_starts_the_closing_handshake(self):
        seen = asyncio.get_running_loop().create_future()

        async def handler(conn):
            try:
                await conn.recv()
            except chat.ConnectionClosed as closed:
                seen.set_result((closed.code, closed.reason))

        server = await self.start(handler)
        conn = await self.open(server)
        await within(conn.close(CloseCode.NORMAL_CLOSURE, "bye"))
        self.assertEqual(await within(seen), (1000, "bye"))
        self.assertEqual(conn.close_code, 1000)   # the server's echo

    async def test_server_starts_the_closing_handshake(self):
        async def handler(conn):
            await conn.close(CloseCode.POLICY_VIOLATION, "go away")

        server = await self.start(handler)
        conn = await self.open(server)
        closed = await expect_closed(conn.recv())
        self.assertEqual((closed.code, closed.reason), (1008, "go away"))

    async def test_handler_crash_closes_with_1011(self):
        async def handler(conn):
            raise RuntimeError("bug")

        server = await self.start(handler)
        with self.assertLogs("chat", logging.ERROR) as logs:
            conn = await self.open(server)
            await expect_closed(conn.recv(), CloseCode.INTERNAL_ERROR)
        self.assertIn("handler failed", logs.output[0])

    async def test_frame_pipelined_with_the_handshake_is_not_lost(self):
        server = await self.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request() + client_frame(Opcode.TEXT, b"early bird"))
        head = await within(reader.readuntil(b"\r\n\r\n"))
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", head)
        echoed = await within(reader.readexactly(2 + len(b"early bird")))
        self.assertEqual(echoed, chat.encode_frame(Opcode.TEXT, b"early bird"))
        writer.close()

    async def test_a_hang_up_right_behind_the_handshake_is_noticed(self):
        # The FIN may reach the server before the connection takes over reading
        # from the handshake's StreamReader (chat.Incoming): it must not be missed.
        server = await self.start(close_timeout=60.0)
        for _ in range(20):   # the race goes either way from one run to the next
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(upgrade_request() + client_frame(Opcode.TEXT, b"last words"))
            writer.write_eof()
            answer = await within(reader.read())   # to EOF: the server closed, well before 60 s
            self.assertTrue(answer.endswith(chat.encode_frame(Opcode.TEXT, b"last words")), answer)
            writer.close()

    async def test_server_shutdown_closes_clients_with_1001(self):
        server = await self.start()
        conns = [await self.open(server) for _ in range(3)]
        receiving = [asyncio.create_task(conn.recv()) for conn in conns]
        await within(server.close())
        for task in receiving:
            await expect_closed(task, CloseCode.GOING_AWAY)

    async def test_shutdown_with_handshakes_half_sent_reports_no_error(self):
        loop, errors = asyncio.get_running_loop(), []
        loop.set_exception_handler(lambda _, context: errors.append(context))   # before serve()
        self.addCleanup(loop.set_exception_handler, None)
        server = await self.start()
        member = await self.open(server)
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            self.addCleanup(writer.close)
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # and no more
        await until(lambda: len(server._tasks) == 21)
        receiving = asyncio.create_task(member.recv())
        await within(server.close())
        await expect_closed(receiving, CloseCode.GOING_AWAY)
        self.assertEqual(errors, [])   # Python 3.11-3.12 logged one per cancelled handshake

    async def test_http_errors_for_bad_handshakes(self):
        server = await self.start()
        cases = [   # (request, status, the reason the body gives)
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"expected Upgrade: websocket"),
            (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"405", b"only GET is supported"),
            (b"GET / HTTP/1.0\r\n\r\n", b"400", b"needs HTTP/1.1"),
            (b"nonsense\r\n\r\n", b"400", b"malformed request line"),
            (upgrade_request(version="8"), b"426", b"unsupported WebSocket version 8"),
            (upgrade_request().replace(b"Host: 127.0.0.1\r\n", b""), b"400", b"missing Host header"),
            (b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"must be a path"),
            (upgrade_request(extra="Host: evil.example\r\n"), b"400", b"Host header must be one"),
            (upgrade_request(extra="X-Big: " + "a" * 9000 + "\r\n"), b"431", b"request head"),
            (upgrade_request(extra="".join(f"X-{i}: 1\r\n" for i in range(101))), b"431",
             b"100 lines"),
        ]
        for request, status, reason in cases:
            with self.subTest(request=request[:30], status=status):
                response = await raw_exchange(server.port, request)
                self.assertTrue(response.startswith(b"HTTP/1.1 " + status), response[:60])
                head, _, body = response.partition(b"\r\n\r\n")
                self.assertIn(b"Content-Length: %d" % len(body), head)
                self.assertIn(reason, body)
                self.assertEqual(body.count(b"\n"), 1)   # one line a person can read
        response = await raw_exchange(server.port, upgrade_request(version="8"))
        self.assertIn(b"Sec-WebSocket-Version: 13", response)

    async def test_control_characters_from_a_peer_never_reach_the_log(self):
        server = await self.start()
        logged = LogCatcher(logging.DEBUG)   # the -v trace logs request heads too
        self.addCleanup(logged.remove)
        request = upgrade_request(version="\x1b]0;pwned\x07").replace(b"GET /", b"GET /\x1b[2J")
        response = await raw_exchange(server.port, request + b"")
        self.assertTrue(response.startswith(b"HTTP/1.1 4"))
        messages = []
        while not any("refused handshake" in message for message in messages):
            messages.append((await within(logged.next())).getMessage())
        text = "\n".join(messages)
        self.assertNotIn("\x1b", text)
        self.assertIn("\\x1b[2J", text)   # shown escaped instead

    async def test_client_error_names_the_status_and_reason(self):
        server = await self.start(process_request=lambda request: chat.Response(
            http.HTTPStatus.FORBIDDEN, "no entry\n"))
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(f"ws://127.0.0.1:{server.port}/"))
        self.assertEqual(caught.exception.status, 403)
        self.assertIn("403 Forbidden: no entry", str(caught.exception))


class FakeServer:
    """A TCP server that answers the handshake with whatever bytes a test chooses."""

    def __init__(self, respond):
        self.respond = respond   # key -> bytes to send after reading the request

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.received = asyncio.get_running_loop().create_future()
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def serve(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        key = chat.parse_headers(head.split(b"\r\n")[1:-2])["sec-websocket-key"]
        response = self.respond(key)
        if response is None:   # hang up without answering
            writer.close()
            return
        writer.write(response)
        rest = await reader.read()   # whatever the client says before it hangs up
        if not self.received.done():
            self.received.set_result((head, rest))
        writer.close()


def accept(key: str, extra: str = "") -> bytes:
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {chat.accept_key(key)}\r\n{extra}\r\n").encode()


class TestClientRole(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """The client is as strict as the server (RFC 6455 §4.1, §5.1)."""

    async def test_client_sends_a_correct_request(self):
        async with FakeServer(lambda key: accept(key)) as fake:
            conn = await within(chat.connect(f"ws://localhost:{fake.port}/chat?name=bob"))
            await within(conn.send("hi"))
            conn.transport.close()
            head, rest = await within(fake.received)
        lines = head.decode().split("\r\n")
        self.assertEqual(lines[0], "GET /chat?name=bob HTTP/1.1")
        self.assertIn(f"Host: localhost:{fake.port}", lines)
        frame, _ = parse_frame(rest, expect_masked=True)   # masked, as a client must
        self.assertEqual(frame, Frame(Opcode.TEXT, b"hi"))

    async def test_client_refuses_bad_responses(self):
        responses = {
            "wrong accept": lambda key: accept("AAAAAAAAAAAAAAAAAAAAAA=="),
            "extension": lambda key: accept(key, "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n"),
            "subprotocol": lambda key: accept(key, "Sec-WebSocket-Protocol: chat\r\n"),
            "no upgrade": lambda key: accept(key).replace(b"Upgrade: websocket\r\n", b""),
            "not http": lambda key: b"SSH-2.0-OpenSSH\r\n\r\n",
            "hang up": lambda key: None,
        }
        for name, respond in responses.items():
            with self.subTest(name):
                async with FakeServer(respond) as fake:
                    with self.assertRaises(chat.HandshakeError):
                        await within(chat.connect(f"ws://127.0.0.1:{fake.port}/"))

    async def test_client_reports_non_101_status(self):
        body = "name taken\n"

        def respond(key):
            return f"HTTP/1.1 409 Conflict\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()

        async with FakeServer(respond) as fake:
            with self.assertRaises(chat.InvalidStatus) as caught:
                await within(chat.connect(f"ws://127.0.0.1:{fake.port}/"))
        self.assertEqual(str(caught.exception), "server answered 409 Conflict: name taken")

    async def test_client_fails_masked_server_frame_with_1002(self):
        async with FakeServer(lambda key: accept(key) + client_frame(Opcode.TEXT, b"masked!")) as fake:
            # This fake never closes TCP, so the client waits for its close timeout.
            conn = await within(chat.connect(f"ws://127.0.0.1:{fake.port}/", close_timeout=0.2))
            closed = await expect_closed(conn.recv())
            _, rest = await within(fake.received)
        self.assertEqual(closed.sent.code, CloseCode.PROTOCOL_ERROR)
        close, _ = parse_frame(rest, expect_masked=True)
        self.assertEqual(chat.parse_close_payload(close.payload)[0], CloseCode.PROTOCOL_ERROR)

    async def test_client_reads_frames_that_came_with_the_101(self):
        greeting = chat.encode_frame(Opcode.TEXT, b"welcome")
        async with FakeServer(lambda key: accept(key) + greeting) as fake:
            conn = await within(chat.connect(f"ws://127.0.0.1:{fake.port}/"))
            self.assertEqual(await within(conn.recv()), "welcome")
            conn.transport.close()


# 8. Chat room ##############################################################

class ChatTestCase(ServerTestCase):
    """A chat server on 127.0.0.1:0 and helpers to join it."""

    async def start_room(self, *, room=None, **server_options):
        self.room = room or chat.ChatRoom(rate=0)
        self.server = await self.start(self.room.handle, process_request=self.room.process_request,
                                       **server_options)
        self.url = f"ws://127.0.0.1:{self.server.port}/chat"
        return self.server

    async def join(self, name=None, **options):
        """Connect, read the greeting, and return the connection."""
        conn = await self.open(self.server, f"/chat?name={name}" if name else "/chat", **options)
        greeting = await within(conn.recv())
        self.assertTrue(greeting.startswith("* You are connected as "), greeting)
        return conn

    async def expect(self, conn, *texts):
        for text in texts:
            self.assertEqual(await within(conn.recv()), text)


class TestChatRoom(ChatTestCase):
    """The room: names, greetings, history, relaying and commands."""

    async def test_greeting_counts_users_and_others_hear_the_join(self):
        await self.start_room(room=chat.ChatRoom(rate=2, burst=20, max_size=4096))
        alice = await self.open(self.server, "/chat?name=alice")
        greeting = await within(alice.recv())
        self.assertTrue(greeting.startswith(
            "* You are connected as alice! There is 1 user here. Try /help. "
            "Limits: lines of up to 4096 bytes; bursts of 20 lines, then 2 per second. "
            "Your resume token is "), greeting)
        self.assertTrue(greeting.endswith(
            " (keep it to yourself). The room has 0 lines of yours. 0 lines of history follow."))
        bob = await self.open(self.server, "/chat?name=bob")
        parsed = chat.parse_greeting(await within(bob.recv()))
        self.assertEqual(parsed._replace(token=None), chat.Greeting("bob", 4096, 20, 2.0, None, 0, 0))
        self.assertEqual(len(parsed.token), 22)   # 16 random bytes
        await self.expect(alice, "* bob joined")

    async def test_the_greeting_is_recognised_only_as_the_first_frame(self):
        await self.start_room()
        alice, bob = await self.join("alice"), await self.join("bob")
        await self.expect(alice, "* bob joined")
        fake = "* You are connected as alice! Your resume token is stolen (keep it)."
        await bob.send(fake)
        await self.expect(alice, f"[bob]: {fake}")   # what a member says always starts with [name]

    async def test_text_is_relayed_to_everyone_with_the_senders_name(self):
        await self.start_room()
        alice = await self.join("alice")
        bob = await self.join("bob")
        await self.expect(alice, "* bob joined")
        await bob.send("[alice]: hi ✓ (names come from the server, not the text)")
        for conn in (alice, bob):
            await self.expect(conn, "[bob]: [alice]: hi ✓ (names come from the server, not the text)")

    async def test_newcomer_gets_the_last_50_messages_as_history(self):
        await self.start_room()
        alice = await self.join("alice")
        for i in range(55):
            await alice.send(f"message {i}")
        for i in range(55):
            await self.expect(alice, f"[alice]: message {i}")
        bob = await self.join("bob")
        for i in range(5, 55):
            stamp, line = re.fullmatch(r"\(history (\S+)\) (.*)", await within(bob.recv())).groups()
            self.assertEqual(line, f"[alice]: message {i}")
            said = chat.calendar.timegm(chat.time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
            self.assertLess(abs(said - chat.time.time()), 60)   # UTC, and just now

    async def test_who_lists_everyone(self):
        await self.start_room()
        alice = await self.join("alice")
        await self.join("bob")
        await self.expect(alice, "* bob joined")
        await alice.send("/who")
        await self.expect(alice, "* 2 here: alice, bob")

    async def test_private_messages_reach_only_the_two_people(self):
        await self.start_room()
        alice, bob, carol = await self.join("alice"), await self.join("bob"), await self.join("carol")
        await self.expect(alice, "* bob joined", "* carol joined")
        await self.expect(bob, "* carol joined")
        await alice.send("/msg bob psst")
        await self.expect(alice, "[alice → bob]: psst")
        await self.expect(bob, "[alice → bob]: psst")
        await alice.send("/msg dave hello?")
        await self.expect(alice, "* no one named dave is here; /who lists who is")
        await alice.send("public")
        for conn in (alice, bob, carol):   # carol's next line is this one: she saw no private message
            await self.expect(conn, "[alice]: public")

    async def test_unknown_command_gets_help_and_is_not_broadcast(self):
        await self.start_room()
        alice, bob = await self.join("alice"), await self.join("bob")
        await self.expect(alice, "* bob joined")
        await bob.send("/dance")
        await self.expect(bob, "* unknown command /dance — /help lists them")
        await bob.send("/HELP")
        await self.expect(bob, *help_lines())
        await bob.send("visible")
        await self.expect(alice, "[bob]: visible")   # and nothing of /dance before it

    async def test_names_are_unique_as_people_read_them(self):
        await self.start_room()
        alice = await self.join("Alice")
        for twin in ("alice", "ALICE", "%EF%BC%A1lice"):   # the last: a fullwidth Ａ
            with self.subTest(twin=twin):
                conn = await self.open(self.server, f"/chat?name={twin}")
                closed = await expect_closed(conn, CloseCode.POLICY_VIOLATION)
                self.assertIn("is taken", closed.reason)
        bob = await self.join("bob")
        await bob.send("/msg ALICE found you")
        await self.expect(alice, "* bob joined", "[bob → Alice]: found you")

    async def test_a_name_mixing_scripts_is_refused(self):
        await self.start_room()
        conn = await self.open(self.server, "/chat?name=%D0%B0lice")   # Cyrillic а, Latin lice
        closed = await expect_closed(conn, CloseCode.POLICY_VIOLATION)
        self.assertEqual(closed.reason, "a name can't mix scripts (Cyrillic and Latin): аlice")

    async def test_nick_renames_and_the_room_is_told(self):
        await self.start_room()
        alice, bob = await self.join("alice"), await self.join("bob")
        await self.expect(alice, "* bob joined")
        await bob.send("/nick ALICE")
        await self.expect(bob, "* the name ALICE is taken; pick another")
        await bob.send("/nick robert")
        for conn in (alice, bob):
            await self.expect(conn, "* bob is now known as robert")
        await alice.send("/who")
        await self.expect(alice, "* 2 here: alice, robert")
        await bob.send("/nick Robert")   # one's own name in other letters is fine
        await self.expect(alice, "* robert is now known as Robert")

    async def test_me_slash_slash_and_empty_lines(self):
        await self.start_room()
        alice, bob = await self.join("alice"), await self.join("bob")
        await self.expect(alice, "* bob joined")
        for line in ("/me waves", "", "   ", "//etc/hosts is a file", " /who is chat"):
            await bob.send(line)
        await self.expect(alice, "[bob] waves", "[bob]: /etc/hosts is a file", "[bob]:  /who is chat")

    async def test_quit_with_a_reason_tells_the_room(self):
        await self.start_room()
        alice, bob = await self.join("alice"), await self.join("bob")
        await self.expect(alice, "* bob joined")
        await bob.send("/quit gone fishing")
        closed = await expect_closed(bob, CloseCode.NORMAL_CLOSURE)
        self.assertEqual(closed.reason, "gone fishing")
        await self.expect(alice, "* bob left: gone fishing")

    async def test_the_resume_token_replaces_a_connection_the_server_still_holds(self):
        await self.start_room()
        alice = await self.join("alice")
        old = await self.open(self.server, "/chat?name=bob")
        token = chat.parse_greeting(await within(old.recv())).token
        await self.expect(alice, "* bob joined")
        await old.send("before the link died")
        await self.expect(alice, "[bob]: before the link died")
        thief = await self.open(self.server, "/chat?name=bob&resume=wrong")
        await expect_closed(thief, CloseCode.POLICY_VIOLATION)
        new = await self.open(self.server, f"/chat?name=bob&resume={token}")
        greeting = chat.parse_greeting(await within(new.recv()))
        self.assertEqual((greeting.token, greeting.delivered), (token, 1))   # it has 1 of bob's

        closed = await expect_closed(old, CloseCode.NORMAL_CLOSURE)
        self.assertEqual(closed.reason, chat.REPLACED_REASON)
        await new.send("back")
        await self.expect(alice, "[bob]: back")   # no "left" or "joined" in between

    async def test_guests_get_numbered_names(self):
        await self.start_room()
        first = await self.open(self.server, "/chat")
        self.assertTrue((await within(first.recv())).startswith("* You are connected as user1!"))
        second = await self.open(self.server, "/chat")
        self.assertTrue((await within(second.recv())).startswith("* You are connected as user2!"))

    async def test_taken_name_is_refused_with_a_reason(self):
        await self.start_room()
        await self.join("bob")
        impostor = await self.open(self.server, "/chat?name=bob")
        closed = await expect_closed(impostor, CloseCode.POLICY_VIOLATION)
        self.assertEqual(closed.reason, "the name bob is taken; pick another")

    async def test_invalid_names_are_refused(self):
        await self.start_room()
        for name in ("a%20b", "x" * 33, "%1b%5B2J", "%5Bbob%5D", "%20%20"):
            with self.subTest(name=name):
                conn = await self.open(self.server, f"/chat?name={name}")
                await expect_closed(conn, CloseCode.POLICY_VIOLATION)

    async def test_names_are_trimmed(self):
        await self.start_room()
        conn = await self.open(self.server, "/chat?name=%20bob%20")
        self.assertTrue((await within(conn.recv())).startswith("* You are connected as bob!"))

    async def test_binary_message_closes_with_1003(self):
        await self.start_room()
        alice = await self.join("alice")
        bob = await self.join("bob")
        await bob.send(b"\x00\x01")
        closed = await expect_closed(bob, CloseCode.UNSUPPORTED_DATA)
        self.assertIn("binary", closed.reason)
        await self.expect(alice, "* bob joined", "* bob left")

    async def test_leave_is_announced_once_when_a_client_vanishes(self):
        await self.start_room()
        alice = await self.join("alice")
        bob = await self.join("bob")
        await self.expect(alice, "* bob joined")
        bob.transport.abort()          # like kill -9: no close frame, just TCP gone
        await self.expect(alice, "* bob left")
        await alice.send("/who")
        await self.expect(alice, "* 1 here: alice")   # and no second "left" before it

    async def test_quit_command_closes_normally(self):
        await self.start_room()
        bob = await self.join("bob")
        await bob.send("/quit")
        await expect_closed(bob, CloseCode.NORMAL_CLOSURE)

    def test_history_keeps_the_latest_lines_within_its_byte_budget(self):
        history = chat.History(50, 1000)
        for n in range(8):
            history.append((n, ("[bob]: ", bytes(300))))
        self.assertEqual([when for when, _ in history], [5, 6, 7])   # 3 × 307 bytes fit
        self.assertEqual(history.size, 3 * 307)
        history.extend((n, ("x",)) for n in range(100))
        self.assertEqual(len(history), 50)

    async def test_a_newcomer_that_does_not_read_the_history_is_not_taken_for_slow(self):
        big = 2**20
        await self.start_room(room=chat.BatchedRoom(rate=0, max_size=big, history_bytes=big),
                              max_size=big, max_buffer=4 * big)
        alice = await self.join("alice", max_size=2 * big)
        for n in range(8):   # 4 MiB of lines: twice what a newcomer is now shown
            await alice.send(f"{n} " + "x" * (big // 2))
            await within(alice.recv())
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.addCleanup(writer.close)
        writer.write(upgrade_request("/chat?name=slowpoke"))   # and never read
        await self.expect(alice, "* slowpoke joined")
        await alice.send("one more turn")
        await self.expect(alice, "[alice]: one more turn")
        self.assertIn("slowpoke", self.room.members)   # not closed as "too slow"
        carol = await self.join("carol", max_size=2 * big)   # the greeting was read by join()
        shown = [(await within(carol.recv())).split(") ", 1)[1][:14] for _ in self.room.history]
        self.assertEqual(shown, ["[alice]: 7 xxx", "[alice]: one m"])   # 1 MiB of the latest

    async def test_a_join_whose_greeting_fails_leaves_nothing_behind(self):
        await self.start_room()
        with unittest.mock.patch.object(self.room, "greet", side_effect=ValueError("cannot greet")):
            refused = await self.open(self.server, "/chat?name=alice")
            await expect_closed(refused, CloseCode.POLICY_VIOLATION)
        self.assertEqual(self.room.members, {})   # no ghost: counted, its name taken
        await self.join("alice")

    async def test_shutdown_sends_1001_to_every_member(self):
        await self.start_room()
        members = [await self.join(name) for name in ("a", "b", "c")]
        receiving = [asyncio.create_task(expect_closed(conn, CloseCode.GOING_AWAY)) for conn in members]
        await within(self.server.close())
        await within(asyncio.gather(*receiving))

    async def test_page_at_root_and_404_elsewhere(self):
        await self.start_room()
        page = await raw_exchange(self.server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertTrue(page.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Content-Type: text/html; charset=utf-8", page)
        self.assertIn(b"new WebSocket(", page)
        self.assertIn(b"textContent", page)
        for forbidden in (b"innerHTML", b"<script src", b"<link", b"http://", b"https://"):
            self.assertNotIn(forbidden, page)
        missing = await raw_exchange(self.server.port, b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertTrue(missing.startswith(b"HTTP/1.1 404"))
        upgrade_elsewhere = await raw_exchange(self.server.port, upgrade_request("/other"))
        self.assertTrue(upgrade_elsewhere.startswith(b"HTTP/1.1 404"))


# Names and commands (8.2, 8.3): pure functions, tested name by name

# Emoji sequences built from code points, so the test says what is in them.
TECHNOLOGIST = "\U0001F469\u200d\U0001F4BB"                            # 👩‍💻 woman, ZWJ, laptop
RAINBOW_FLAG = "\U0001F3F3\ufe0f\u200d\U0001F308"                      # 🏳️‍🌈 flag, VS16, ZWJ, rainbow
FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467"                  # 👨‍👩‍👧
SCOTLAND = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"  # 🏴󠁧󠁢󠁳󠁣󠁴󠁿


class TestNameKey(unittest.TestCase):
    """name_key(): names compared as people read them (NFKC, then case folding)."""

    def test_case_and_width_fold_to_one_key(self):
        self.assertEqual(name_key("Alice"), name_key("ALICE"))
        self.assertEqual(name_key("Alice"), name_key("\uff21\uff4c\uff49\uff43\uff45"))  # Ａｌｉｃｅ

    def test_sharp_s_folds_to_ss(self):
        self.assertEqual(name_key("straße"), name_key("STRASSE"))

    def test_canonical_and_compatibility_forms_fold(self):
        self.assertEqual(name_key("e\u0301"), name_key("\u00e9"))       # é, two spellings
        self.assertEqual(name_key("\ufb01sh"), name_key("fish"))         # ﬁ ligature
        self.assertEqual(name_key("bob\u00b2"), name_key("bob2"))         # superscript two

    def test_different_names_keep_different_keys(self):
        self.assertNotEqual(name_key("alice"), name_key("alicia"))
        self.assertNotEqual(name_key("alice"), name_key("\u0430lice"))   # Cyrillic а

    def test_key_is_stable(self):
        for name in ("ǰ", "ẞ", "ΣΑΣ", "ﬃ"):
            with self.subTest(name=name):
                self.assertEqual(name_key(name_key(name)), name_key(name))


class TestScriptOf(unittest.TestCase):
    """script_of(): a letter's script, approximated from its Unicode name."""

    def test_letters(self):
        self.assertEqual(script_of("a"), "LATIN")
        self.assertEqual(script_of("\u0430"), "CYRILLIC")
        self.assertEqual(script_of("\u03b1"), "GREEK")
        self.assertEqual(script_of("\u65e5"), "HAN")          # 日 CJK UNIFIED IDEOGRAPH
        self.assertEqual(script_of("\u3005"), "HAN")          # 々 IDEOGRAPHIC ITERATION MARK
        self.assertEqual(script_of("\ud55c"), "HANGUL")       # 한

    def test_two_word_scripts(self):
        self.assertEqual(script_of("\U00010300"), "OLD ITALIC")
        self.assertEqual(script_of("\u1950"), "TAI LE")

    def test_non_letters_and_shared_letters_are_common(self):
        for char in "0_-.!\u2764\u30fc\u02bc\u0301":   # ..., ❤, ー, ʼ, combining acute
            with self.subTest(char=f"U+{ord(char):04X}"):
                self.assertIsNone(script_of(char))


class TestCheckName(unittest.TestCase):
    """check_name(): the old rules, plus no invisible characters and no mixed scripts."""

    def assertRefused(self, raw, *words):
        with self.assertRaises(ValueError) as caught:
            check_name(raw)
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_ordinary_names(self):
        for name in ("bob", "bob2", "a_b-c.d", "Zoë", "\U0001F642bob"):
            with self.subTest(name=name):
                self.assertEqual(check_name(name), name)

    def test_surrounding_whitespace_is_stripped(self):
        self.assertEqual(check_name("  alice\t"), "alice")

    def test_name_is_nfc_normalised_for_display(self):
        self.assertEqual(check_name("Zoe\u0308"), "Zo\u00eb")

    def test_fullwidth_name_is_kept_as_typed(self):
        fullwidth = "\uff21\uff4c\uff49\uff43\uff45"
        self.assertEqual(check_name(fullwidth), fullwidth)

    def test_length_limits(self):
        self.assertEqual(check_name("x" * MAX_NAME_LENGTH), "x" * MAX_NAME_LENGTH)
        self.assertRefused("x" * (MAX_NAME_LENGTH + 1), "1 to 32")
        self.assertRefused("", "1 to 32")
        self.assertRefused("   ", "1 to 32")

    def test_length_counts_an_accented_letter_once(self):
        self.assertEqual(len(check_name("e\u0301" * MAX_NAME_LENGTH)), MAX_NAME_LENGTH)

    def test_spaces_are_refused(self):
        for name in ("al ice", "al\u00a0ice", "al\u3000ice"):
            with self.subTest(name=name):
                self.assertRefused(name, "spaces")

    def test_brackets_are_refused(self):
        for name in ("[bob]", "bob]", "bob\uff3b"):   # ［ FULLWIDTH LEFT SQUARE BRACKET
            with self.subTest(name=name):
                self.assertRefused(name, "[ or ]")

    def test_control_characters_are_refused(self):
        self.assertRefused("bob\x1b[31m", "U+001B")
        self.assertRefused("bo\x85b", "U+0085")
        self.assertRefused("bo\tb", "U+0009")
        self.assertRefused("al\u2028ice", "U+2028 LINE SEPARATOR")
        self.assertRefused("bob\x7f", "U+007F")

    def test_format_characters_are_refused(self):
        for char in "\u200d\u200c\u200b\u00ad\u202e\u2066\u2060\ufeff\U000E0041":
            with self.subTest(char=f"U+{ord(char):04X}"):
                self.assertRefused(f"ali{char}ce", f"U+{ord(char):04X}", "invisible")

    def test_zwj_emoji_is_refused_in_a_name(self):
        self.assertRefused(f"bob{TECHNOLOGIST}", "ZERO WIDTH JOINER")

    def test_invisible_letters_and_marks_are_refused(self):
        for char in "\u3164\uffa0\u115f\u1160\u2800\u034f\ufe0f\U000E0100\u180b\u17b4":
            with self.subTest(char=f"U+{ord(char):04X}"):
                self.assertRefused(f"bob{char}", f"U+{ord(char):04X}")

    def test_a_name_of_only_a_filler_is_refused(self):
        self.assertRefused("\u3164", "HANGUL FILLER")

    def test_private_use_and_unassigned_are_refused(self):
        self.assertRefused("bob\ue000", "U+E000")
        self.assertRefused("bob\u0378", "U+0378")

    def test_leading_combining_mark_is_refused(self):
        self.assertRefused("\u0301bob", "combining mark", "U+0301")

    def test_latin_with_cyrillic_is_refused(self):
        self.assertRefused("\u0430lice", "mix scripts", "Cyrillic and Latin", "\u0430lice")

    def test_latin_with_greek_is_refused(self):
        self.assertRefused("\u03b1lpha", "Greek and Latin")
        self.assertRefused("b\u03bfb", "Latin and Greek")           # Greek omicron

    def test_three_scripts_are_listed(self):
        self.assertRefused("a\u0430\u03b1", "Latin, Cyrillic and Greek")

    def test_fullwidth_latin_with_cyrillic_is_refused(self):
        self.assertRefused("\uff41\u0430", "Latin and Cyrillic")     # ａ is Latin after NFKC

    def test_japanese_mix_is_allowed(self):
        self.assertEqual(check_name("日本語ひらがなカタカナ"), "日本語ひらがなカタカナ")
        self.assertEqual(check_name("ゆきYuki"), "ゆきYuki")         # TR #39: Latin goes too

    def test_korean_mix_is_allowed(self):
        self.assertEqual(check_name("한국어漢字"), "한국어漢字")
        self.assertEqual(check_name("Kim민수"), "Kim민수")

    def test_chinese_with_bopomofo_is_allowed(self):
        self.assertEqual(check_name("中文ㄅㄆ"), "中文ㄅㄆ")

    def test_mixes_across_languages_are_refused(self):
        self.assertRefused("ひらがな한국", "Hiragana and Hangul")
        self.assertRefused("漢字\u0430", "Han and Cyrillic")

    def test_digits_and_punctuation_go_with_any_script(self):
        for name in ("\u0431\u043e\u0431_2", "\u03b1-1", "\u05d3\u05d5\u05d3.3", "\u6771\u4eac2020"):
            with self.subTest(name=name):
                self.assertEqual(check_name(name), name)

    def test_whole_script_cyrillic_lookalike_is_accepted_a_known_gap(self):
        # "асе" is all Cyrillic, so it is one script, yet it reads as Latin "ace".
        # Catching it needs TR #39's confusables data; see the comment in names.py.
        self.assertEqual(check_name("\u0430\u0441\u0435"), "\u0430\u0441\u0435")
        self.assertNotEqual(name_key("\u0430\u0441\u0435"), name_key("ace"))

    def test_refusal_names_the_character_in_ascii(self):
        with self.assertRaises(ValueError) as caught:
            check_name("bob\u202eevil")
        self.assertTrue(str(caught.exception).isascii())


class TestParseLine(unittest.TestCase):
    """parse_line(): commands IRC style; chat otherwise; nothing for empty lines."""

    def test_every_command_has_its_method_in_the_room(self):
        for name in chat.COMMANDS:   # the one table: ChatRoom.run_command finds command_NAME
            self.assertTrue(callable(getattr(chat.ChatRoom, f"command_{name}", None)), name)

    def assertReply(self, text, reply):
        with self.assertRaises(ValueError) as caught:
            parse_line(text)
        self.assertEqual(str(caught.exception), reply)

    def test_chat_text(self):
        self.assertEqual(parse_line("hello"), ChatLine("hello"))
        self.assertEqual(parse_line("hello / goodbye"), ChatLine("hello / goodbye"))

    def test_chat_text_is_kept_exactly(self):
        self.assertEqual(parse_line("  two spaces  "), ChatLine("  two spaces  "))

    def test_every_command(self):
        self.assertEqual(parse_line("/help"), Command("help", ""))
        self.assertEqual(parse_line("/nick carol"), Command("nick", "carol"))
        self.assertEqual(parse_line("/me waves"), Command("me", "waves"))
        self.assertEqual(parse_line("/who"), Command("who", ""))
        self.assertEqual(parse_line("/msg alice psst"), Command("msg", "alice psst"))
        self.assertEqual(parse_line("/quit"), Command("quit", ""))
        self.assertEqual(parse_line("/quit gone fishing"), Command("quit", "gone fishing"))

    def test_commands_are_case_insensitive(self):
        self.assertEqual(parse_line("/WHO"), Command("who", ""))
        self.assertEqual(parse_line("/Msg alice Hi"), Command("msg", "alice Hi"))

    def test_argument_is_stripped_and_keeps_inner_spaces(self):
        self.assertEqual(parse_line("/msg  alice  a  b  "), Command("msg", "alice  a  b"))
        self.assertEqual(parse_line("/me\twaves"), Command("me", "waves"))

    def test_msg_argument_splits_into_recipient_and_text(self):
        command = parse_line("/msg alice  hi there")
        self.assertEqual(command.argument.split(maxsplit=1), ["alice", "hi there"])

    def test_double_slash_sends_a_literal_slash_line(self):
        self.assertEqual(parse_line("//text"), ChatLine("/text"))
        self.assertEqual(parse_line("//who"), ChatLine("/who"))
        self.assertEqual(parse_line("//"), ChatLine("/"))

    def test_unknown_command_is_a_reply_not_a_message(self):
        self.assertReply("/foo", "unknown command /foo — /help lists them")
        self.assertReply("/FOO bar", "unknown command /FOO — /help lists them")

    def test_a_long_unknown_command_is_quoted_short(self):
        self.assertReply("/" + "x" * 1000, f"unknown command /{'x' * 32}… — /help lists them")

    def test_missing_arguments_give_the_usage(self):
        self.assertReply("/msg", "usage: /msg NAME TEXT")
        self.assertReply("/msg alice", "usage: /msg NAME TEXT")
        self.assertReply("/msg alice   ", "usage: /msg NAME TEXT")
        self.assertReply("/nick", "usage: /nick NEW")
        self.assertReply("/me ", "usage: /me ACTION")

    def test_leading_space_makes_a_command_chat(self):
        self.assertEqual(parse_line(" /who"), ChatLine(" /who"))

    def test_slash_without_a_name_is_chat(self):
        self.assertEqual(parse_line("/"), ChatLine("/"))
        self.assertEqual(parse_line("/ shrug"), ChatLine("/ shrug"))

    def test_empty_and_blank_lines_are_nothing(self):
        for text in ("", " ", "\t  ", "\u3000"):
            with self.subTest(text=text):
                self.assertIsNone(parse_line(text))

    def test_every_command_in_the_table_parses(self):
        for name, (usage, _) in COMMANDS.items():
            with self.subTest(name=name):
                line = usage.replace("[reason]", "").replace("TEXT", "a b")
                self.assertEqual(parse_line(line).name, name)

    def test_relayed_as_is_only_where_parse_line_keeps_the_line_as_it_is(self):
        # The room's shortcut for lines it relays without decoding (ChatRoom.on_text).
        lines = ["hello", "x", "日本語", "😀 hi", "é", "a /who", "\x1c", "\x1cx", "\u3000hi",
                 "\u00a0x", " /who", "/who", "//x", "/", "", " ", "\t", "\u2028x", "\x85x"]
        for line in lines:
            with self.subTest(line=line):
                fast = chat.relayed_as_is(line.encode())
                try:
                    kept = parse_line(line) == ChatLine(line)
                except ValueError:
                    kept = False
                self.assertTrue(kept or not fast)   # never a shortcut parse_line would not take
        self.assertTrue(all(chat.relayed_as_is(line.encode()) for line in ("hello", "日本語", "😀 hi")))


class TestHelpLines(unittest.TestCase):
    """help_lines(): the /help reply, built from the COMMANDS table."""

    def test_one_notice_per_command_and_one_for_double_slash(self):
        lines = help_lines()
        self.assertEqual(len(lines), len(COMMANDS) + 1)
        for line, (usage, meaning) in zip(lines, COMMANDS.values()):
            self.assertTrue(line.startswith(f"* {usage} "))
            self.assertTrue(line.endswith(meaning))
        self.assertTrue(lines[-1].startswith("* //text "))

    def test_lines_are_printable(self):
        for line in help_lines():
            self.assertEqual(printable(line), line)



# 9. Serving many ###########################################################

class TestFastConnection(TestConnection):
    """Every TestConnection test again on FastConnection, and what only it does:
    Incoming's bounded reading, the outbox, the slow-reader cut-off."""

    connection_class = chat.FastConnection

    def unread(self) -> int:
        return self.transport.protocol.held   # the transport's protocol is now Incoming

    async def test_reading_pauses_while_more_than_the_limit_waits_unread(self):
        conn = self.connect()
        incoming = conn.reader
        half = b"x" * (incoming.limit // 2 - chat.PIECE_OVERHEAD)
        self.transport.deliver(half)
        self.transport.deliver(half)
        self.assertFalse(self.transport.reading_paused)   # exactly the limit
        self.transport.deliver(b"y")
        self.assertTrue(self.transport.reading_paused)   # a peer can't make us buffer without bound
        self.assertEqual(await within(incoming.read()), half + half + b"y")   # all that came, joined
        self.assertFalse(self.transport.reading_paused)

    async def test_a_peer_sending_a_few_bytes_at_a_time_is_held_to_the_limit_too(self):
        conn = self.connect()
        incoming = conn.reader
        for pieces in range(1, incoming.limit):
            self.transport.deliver(bytes(2))
            if self.transport.reading_paused:   # a real transport stops reading here
                break
        # Each piece counts what its object costs, not only its 2 bytes.
        self.assertEqual(pieces, incoming.limit // (2 + chat.PIECE_OVERHEAD) + 1)
        self.assertEqual(await within(incoming.read()), bytes(2 * pieces))

    async def test_reading_stays_paused_when_the_handshake_reader_is_read(self):
        reader = asyncio.StreamReader(limit=chat.READ_BUFFER_LIMIT)
        self.transport = FakeTransport(reader)
        reader.set_transport(self.transport)
        reader.feed_data(bytes(3 * chat.READ_BUFFER_LIMIT))   # pipelined behind the handshake
        self.assertTrue(self.transport.reading_paused)         # by the handshake's reader
        conn = self.connection_class(reader, FakeWriter(self.transport), is_client=False)
        self.transport.deliver(bytes(conn.reader.limit + 1))
        self.assertEqual(await within(conn.reader.read()), bytes(3 * chat.READ_BUFFER_LIMIT))
        self.assertTrue(self.transport.reading_paused)   # that reader resumed it; we paused again
        self.assertEqual(await within(conn.reader.read()), bytes(conn.reader.limit + 1))
        self.assertFalse(self.transport.reading_paused)

    async def test_pings_from_a_peer_that_never_reads_our_pongs_are_bounded(self):
        conn = self.connect()
        conn.max_buffer = 1000
        self.transport.peer_never_reads = True
        receiving = asyncio.create_task(conn.recv())
        pings = client_frame(Opcode.PING, bytes(125)) * 20
        self.transport.deliver(pings)   # one batch, answered at the end of this loop turn
        await within(self.transport.next_write())
        self.assertEqual(conn.state, chat.State.CLOSING)   # over max_buffer: dropped
        self.transport.deliver(pings + client_frame(Opcode.CLOSE, close_frame_payload(1008)))
        await expect_closed(receiving, CloseCode.POLICY_VIOLATION)
        # Pongs stop once max_buffer is passed: at most one batch beyond it, of 20 × 127 bytes.
        self.assertLess(len(self.transport.written), 1000 + 20 * 127 + 130)

    async def test_outbox_keeps_the_order_frames_were_queued_in_one_write_per_turn(self):
        conn = self.connect()
        shared = chat.SharedFrames()
        conn.write_frame(chat.encode_frame(Opcode.TEXT, b"one"))
        conn.queue_shared(shared)
        shared.append(chat.encode_frame(Opcode.TEXT, b"two"))
        self.assertFalse(shared.sealed)
        conn.write_frame(chat.encode_frame(Opcode.TEXT, b"reply"))
        self.assertTrue(shared.sealed)   # a frame queued behind it: nothing more may join it
        await within(self.transport.next_write())
        await within(conn.send("three"))
        self.assertEqual(self.sent_frames(), [Frame(Opcode.TEXT, b"one"), Frame(Opcode.TEXT, b"two"),
                                              Frame(Opcode.TEXT, b"reply"), Frame(Opcode.TEXT, b"three")])
        self.assertEqual(self.transport.writes, 2)   # the turn's three frames at once, then send()

    async def test_nothing_queued_for_a_broadcast_follows_our_close_frame(self):
        conn = self.connect()
        conn.write_frame(chat.encode_frame(Opcode.TEXT, b"before"))
        conn.close_nowait(CloseCode.GOING_AWAY, "bye")
        conn.write_frame(chat.encode_frame(Opcode.TEXT, b"after"))   # §5.5.1: dropped
        shared = chat.SharedFrames()
        conn.queue_shared(shared)
        shared.append(chat.encode_frame(Opcode.TEXT, b"shared after"))
        turn_over = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(turn_over.set_result, None)   # after the outbox's write
        await within(turn_over)
        self.assertEqual(self.sent_frames(), [Frame(Opcode.TEXT, b"before"),
                                              Frame(Opcode.CLOSE, close_frame_payload(1001, "bye"))])

    async def test_a_message_send_waits_for_is_not_counted_as_a_slow_readers_backlog(self):
        conn = self.connect(is_client=True)
        conn.max_buffer = 1000
        self.transport.peer_never_reads = True
        self.transport.drain_released = asyncio.Event()
        sending = asyncio.create_task(conn.send("x" * 5000))   # five times max_buffer
        await within(self.transport.drain_started.wait())
        turn_over = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(turn_over.set_result, None)   # after the outbox's check
        await within(turn_over)
        self.assertEqual(conn.state, chat.State.OPEN)
        self.transport.peer_never_reads = False
        self.transport.drain_released.set()
        await within(sending)
        self.assertEqual(self.sent_frames(by_client=True), [Frame(Opcode.TEXT, b"x" * 5000)])



    async def test_a_message_in_more_frames_than_its_limit_closes_with_1008(self):
        self.connect()
        conn = self.connection_class(self.reader, FakeWriter(self.transport), is_client=False,
                                     close_timeout=1.0, max_frames=4)
        frames = client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.CONTINUATION, fin=False) * 4
        await self.assert_fails_with(conn, CloseCode.POLICY_VIOLATION, frames)

    async def test_control_frames_past_their_rate_close_with_1008(self):
        self.connect()
        conn = self.connection_class(self.reader, FakeWriter(self.transport), is_client=False,
                                     close_timeout=1.0, max_control_rate=10)
        self.transport.deliver(client_frame(Opcode.PONG) * 10 + client_frame(Opcode.TEXT, b"ok"))
        self.assertEqual(await within(conn.recv()), "ok")   # a burst of 10 is allowed
        await self.assert_fails_with(conn, CloseCode.POLICY_VIOLATION, client_frame(Opcode.PONG) * 5)


class TestSpeedupsMatchTheirReference(unittest.TestCase):
    """Each speed-up of section 9 gives what the plain version above it gives, on random data."""

    def test_apply_mask_fast_equals_apply_mask(self):
        rng = random.Random(6455)
        for _ in range(300):
            data = rng.randbytes(rng.randrange(0, 70))
            key = rng.randbytes(4)
            start = rng.randrange(0, len(data) + 1)
            end = rng.randrange(start, len(data) + 1)
            with self.subTest(data=data, key=key, start=start, end=end):
                self.assertEqual(chat.apply_mask_fast(data, key, start, end),
                                 chat.apply_mask(data, key, start, end))
                self.assertEqual(chat.apply_mask_fast(data, key), chat.apply_mask(data, key))

    def test_fast_assembler_equals_message_assembler(self):
        rng = random.Random(7692)
        texts = ["hello", "é" * 3000, "👩‍💻 ok " * 900, "x" * 9000, "ascii then ü"]
        for _ in range(200):
            opcode = rng.choice((Opcode.TEXT, Opcode.BINARY))
            payload = rng.choice(texts).encode() if opcode == Opcode.TEXT else rng.randbytes(rng.randrange(9000))
            cuts = sorted(rng.sample(range(len(payload) + 1), min(len(payload) + 1, rng.randrange(1, 12))))
            pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
            results = []
            for assembler in (chat.MessageAssembler(2**20), chat.FastAssembler(2**20)):
                for n, piece in enumerate(pieces):
                    assembler.start_frame(Opcode.CONTINUATION if n else opcode, len(piece))
                    assembler.add(piece)
                results.append(assembler.finish())
            self.assertEqual(results[0], results[1])
            self.assertEqual(results[1], chat.Message(opcode, payload))

    def test_fast_assembler_refuses_what_message_assembler_refuses(self):
        for bad in (b"ok \xff", b"\xc3", "é".encode()[:1] + b"a", b"a" * 5000 + b"\xed\xa0\x80"):
            for assembler in (chat.MessageAssembler(2**20), chat.FastAssembler(2**20)):
                with self.subTest(bad=bad[-4:], assembler=type(assembler).__name__), \
                        self.assertRaises(chat.InvalidPayload):
                    assembler.start_frame(Opcode.TEXT, len(bad))
                    assembler.add(bad)
                    assembler.finish()

    def test_many_tiny_fragments_cost_no_more_memory_than_the_message(self):
        # A hostile peer may send a message one byte per frame; keeping each
        # piece as its own object would cost ~40 bytes of memory per byte.
        for opcode in (Opcode.TEXT, Opcode.BINARY):
            with self.subTest(opcode=opcode):
                assembler = chat.FastAssembler(2**20)
                tracemalloc.start()
                assembler.start_frame(opcode, 1)
                assembler.add(b"x")
                for _ in range(100_000 - 1):
                    assembler.start_frame(Opcode.CONTINUATION, 1)
                    assembler.add(b"x")
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                self.assertLess(peak, 4 * 100_000)
                self.assertEqual(len(assembler.finish().payload), 100_000)



class TestRoomOrder(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """What one turn of the event loop queues reaches each member in order, in one write."""

    def member(self, room, name, writes=None, deflate=None):
        reader = asyncio.StreamReader()
        transport = FakeTransport(reader)
        conn = chat.FastConnection(reader, FakeWriter(transport), is_client=False,
                                   path=f"/chat?name={name}", writes=writes, deflate=deflate)
        room.admit(conn)
        return conn, transport

    async def test_a_broadcast_to_many_members_schedules_one_write_callback(self):
        room, writes = chat.BatchedRoom(rate=0), chat.TurnWriter()
        members = [self.member(room, f"m{i}", writes) for i in range(50)]
        await within(members[-1][1].next_write())   # the greetings and joins are out
        loop = asyncio.get_running_loop()
        with unittest.mock.patch.object(loop, "call_soon", wraps=loop.call_soon) as call_soon:
            room.broadcast("[m0]: to everyone")
        self.assertEqual(call_soon.call_count, 1)   # not one per member
        await within(members[-1][1].next_write())
        for _, transport in members:
            self.assertEqual(self.texts(transport)[-1], "[m0]: to everyone")

    async def test_batched_broadcast_delivers_what_the_plain_broadcast_does(self):
        with unittest.mock.patch("secrets.token_urlsafe", return_value="token"):   # in greetings
            plain = await self.broadcast_at_random(chat.ChatRoom(rate=0))
            batched = await self.broadcast_at_random(chat.BatchedRoom(rate=0))
        self.assertEqual(batched, plain)   # every member's bytes, to the last one

    async def broadcast_at_random(self, room) -> list[bytes]:
        """30 loop turns of random broadcasts, compressed for some members, and late joins."""
        rng = random.Random(2026)   # the same script for every room
        params = chat.check_deflate_answer(chat.SERVER_DEFLATE_ANSWER)
        members = [self.member(room, f"m{i}", deflate=chat.PerMessageDeflate(params, is_client=False)
                               if i % 2 else None) for i in range(4)]
        for _ in range(30):
            for _ in range(rng.randrange(1, 5)):
                text = rng.choice([rng.randbytes(rng.randrange(200)).hex(), "a" * rng.randrange(500)])
                room.broadcast(f"[m{rng.randrange(4)}]: ", text.encode())
            if rng.random() < 0.2:
                members.append(self.member(room, f"late{len(members)}"))
            turn_over = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(turn_over.set_result, None)   # after the writes
            await within(turn_over)
        return [bytes(transport.written) for _, transport in members]

    @staticmethod
    def texts(transport, since=0):
        data, texts = bytes(transport.written[since:]), []
        while data:
            frame, size = parse_frame(data, expect_masked=False)
            texts.append(frame.payload.decode())
            data = data[size:]
        return texts

    async def test_a_reply_a_broadcast_and_a_join_in_one_turn_keep_their_order(self):
        room = chat.BatchedRoom(rate=0)
        (alice, alice_out), (bob, bob_out) = self.member(room, "alice"), self.member(room, "bob")
        await within(bob_out.next_write())   # the greetings and joins so far
        before = {"alice": len(alice_out.written), "bob": len(bob_out.written)}
        writes = {"alice": alice_out.writes, "bob": bob_out.writes}
        # One turn of the loop, as a busy server has them:
        room.broadcast("[bob]: first")
        room.tell(alice, "* a reply to alice")
        room.broadcast("[bob]: second")
        carol, carol_out = self.member(room, "carol")
        room.broadcast("[bob]: third")
        await within(carol_out.next_write())
        self.assertEqual(self.texts(alice_out, before["alice"]), [
            "[bob]: first", "* a reply to alice", "[bob]: second", "* carol joined", "[bob]: third"])
        self.assertEqual(self.texts(bob_out, before["bob"]), [
            "[bob]: first", "[bob]: second", "* carol joined", "[bob]: third"])
        greeting, *rest = self.texts(carol_out)
        self.assertTrue(greeting.startswith("* You are connected as carol!"), greeting)
        self.assertEqual(rest, ["[bob]: third"])   # nothing said before carol came in
        self.assertEqual((alice_out.writes - writes["alice"], bob_out.writes - writes["bob"],
                          carol_out.writes), (1, 1, 1))   # one system call each for the turn


# 10. Running a server in public (RFC 6455 §10) #############################

class TestLimitsAndDefences(ChatTestCase):
    """Each defence refuses the bad peer and leaves a well-behaved member unaffected."""

    async def assert_still_served(self, conn, name="alice"):
        await conn.send("still here")
        while await within(conn.recv()) != f"[{name}]: still here":
            pass   # notices about others may come first

    async def test_a_flood_of_empty_frames_closes_the_flooder_and_others_chat_on(self):
        await self.start_room(max_frames=1024, max_control_rate=100)
        alice = await self.join("alice")
        for flood in (client_frame(Opcode.PONG) * 50_000,
                      client_frame(Opcode.TEXT, fin=False) + client_frame(Opcode.CONTINUATION, fin=False) * 50_000):
            with self.subTest(flood=flood[:8]):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
                self.addCleanup(writer.close)
                writer.write(upgrade_request("/chat?name=flooder"))
                await within(reader.readuntil(b"\r\n\r\n"))
                writer.write(flood)
                data = b""
                while not re.search(rb"\x88.\x03\xf0", data, re.DOTALL):   # a close frame with 1008
                    chunk = await within(reader.read(65536))
                    self.assertTrue(chunk, data[-60:])
                    data += chunk
                await self.assert_still_served(alice)

    async def test_an_address_connecting_too_often_gets_503_and_a_class_still_gets_in(self):
        await self.start_room(connects_per_minute=30)
        heads = await within(asyncio.gather(*(self.upgrade_status() for _ in range(30))))
        statuses = collections.Counter(head.split(b" ")[1] for head, _ in heads)
        self.assertEqual(statuses, {b"101": chat.CONNECT_BURST, b"503": 30 - chat.CONNECT_BURST})
        refused = next(head for head, _ in heads if b" 503 " in head)
        self.assertRegex(refused, rb"\r\nRetry-After: [12]\r\n")   # 30 a minute: one every 2 s

    async def test_page_loads_are_not_charged_to_the_connect_rate(self):
        await self.start_room(connects_per_minute=30)
        for _ in range(chat.CONNECT_BURST + 5):   # a class loading the page, and its favicon
            response = await raw_exchange(self.server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:40])
        await self.join("alice")

    async def test_a_trusted_proxys_own_upgrades_count_and_a_throttled_address_is_logged_once(self):
        logged = LogCatcher(logging.INFO)
        self.addCleanup(logged.remove)
        await self.start_room(max_per_address=2, trusted_proxies=["127.0.0.1"], connects_per_minute=60)
        heads = [(await self.upgrade_status())[0][:12] for _ in range(3)]   # no X-Forwarded-For
        self.assertEqual(heads, [b"HTTP/1.1 101", b"HTTP/1.1 101", b"HTTP/1.1 503"])
        for _ in range(chat.CONNECT_BURST + 3):
            await self.upgrade_status("203.0.113.9")
        messages = []
        while not any("connecting too often" in message for message in messages):
            messages.append((await within(logged.next())).getMessage())
        await self.upgrade_status("203.0.113.9")
        self.assertFalse(any("refused handshake" in message for message in messages))

    def test_the_connect_rate_table_stays_bounded_and_cheap(self):
        server = chat.PublicServer(chat.echo, connects_per_minute=30)
        started = time.monotonic()
        for n in range(100_100):
            server.limits.too_often(f"2001:db8::{n:x}")
        self.assertLessEqual(len(server.limits.connects), 100_000)
        self.assertLess(time.monotonic() - started, 10)   # each connect costs one step, not a sweep

    async def test_a_connect_and_leave_loop_reaches_the_room_only_up_to_its_burst(self):
        await self.start_room(connects_per_minute=30)
        watcher = await self.join("watcher")
        for n in range(200):
            try:
                conn = await within(chat.connect(f"{self.url}?name=spam{n}"))
            except chat.InvalidStatus as refusal:
                self.assertEqual(refusal.status, 503)
                continue
            await conn.close(reason="x" * 100)
        await watcher.send("done")
        notices = []
        while (line := await within(watcher.recv())) != "[watcher]: done":
            notices.append(line)
        self.assertEqual(len(notices), 2 * (chat.CONNECT_BURST - 1))   # the watcher was the first

    async def test_foreign_origin_gets_403_and_own_origin_is_accepted(self):
        room = chat.ChatRoom(rate=0, allowed_origins=["https://friend.example"])
        await self.start_room(room=room)
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(self.url, origin="https://evil.example"))
        self.assertEqual(caught.exception.status, 403)
        self.assertIn("origin https://evil.example is not allowed here", str(caught.exception))
        for origin in (f"http://127.0.0.1:{self.server.port}", "https://friend.example", None):
            with self.subTest(origin=origin):
                conn = await within(chat.connect(self.url, origin=origin))
                self.assertTrue((await within(conn.recv())).startswith("* You are connected"))
                await conn.close()

    def rebinding_request(self, path="/chat", host="evil.example:8080"):
        """What a DNS-rebinding page's browser sends: its own name in Host and Origin."""
        return upgrade_request(path, f"Origin: http://{host}\r\n").replace(
            b"Host: 127.0.0.1", f"Host: {host}".encode())

    async def test_unknown_host_gets_421_saying_how_to_allow_it(self):
        await self.start_room()
        alice = await self.join("alice")
        for path in ("/chat", "/"):
            with self.subTest(path=path):
                answer = await raw_exchange(self.server.port, self.rebinding_request(path))
                self.assertTrue(answer.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), answer)
                self.assertIn(b"start it with --allow-host evil.example\n", answer)
        await self.assert_still_served(alice)

    async def test_allow_host_admits_that_name_and_star_admits_any(self):
        for allowed, host in ((["evil.example"], "evil.example:8080"), (["*"], "other.example")):
            with self.subTest(allowed=allowed):
                await self.start_room(room=chat.ChatRoom(rate=0, allowed_hosts=allowed))
                reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
                self.addCleanup(writer.close)
                writer.write(self.rebinding_request(host=host))
                self.assertEqual(await within(reader.readline()), b"HTTP/1.1 101 Switching Protocols\r\n")

    async def test_addresses_localhost_and_this_machines_name_are_always_answered(self):
        await self.start_room()
        port = self.server.port
        for host in ("127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost",
                     f"LOCALHOST.:{port}", socket.gethostname()):
            with self.subTest(host=host):
                answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)

    async def test_over_max_clients_gets_503_and_the_others_stay(self):
        await self.start_room(max_clients=2)
        alice = await self.join("alice")
        await self.join("bob")
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(self.url + "?name=carol"))
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("server full (2 clients); try again later", str(caught.exception))
        await self.assert_still_served(alice)

    async def test_a_burst_past_the_limit_is_delayed_not_dropped(self):
        await self.start_room(room=chat.ChatRoom(rate=100, burst=3))
        alice = await self.join("alice")
        fast = await self.join("fast")
        await self.expect(alice, "* fast joined")
        for i in range(30):   # ten times the burst, at once
            await fast.send(f"line {i}")
        await self.expect(alice, *[f"[fast]: line {i}" for i in range(30)])
        await self.expect(fast, *[f"[fast]: line {i}" for i in range(30)])

    async def upgrade_status(self, forwarded_for=None):
        """Send an upgrade request (with X-Forwarded-For if given); the response head and the reader."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.addCleanup(writer.close)
        extra = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
        writer.write(upgrade_request("/chat", extra))
        head = await within(reader.readuntil(b"\r\n\r\n"))
        return head, reader

    async def test_one_address_over_max_per_address_gets_503_and_the_others_stay(self):
        await self.start_room(max_per_address=2)
        alice = await self.join("alice")
        bob = await self.join("bob")
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(self.url + "?name=carol"))
        self.assertEqual(caught.exception.status, 503)
        self.assertEqual(caught.exception.reason, "too many connections from 127.0.0.1 "
                                                  "(at most 2 per address); try again later")
        head, _ = await self.upgrade_status()
        self.assertIn(b"\r\nRetry-After: 30\r\n", head)
        await self.assert_still_served(alice)
        logged = LogCatcher(logging.INFO)
        self.addCleanup(logged.remove)
        await bob.close()
        await self.expect(alice, "* bob left")
        await self.join("carol")   # bob's place is free again
        messages = [(await within(logged.next())).getMessage() for _ in range(2)]
        self.assertEqual(messages[1], "127.0.0.1: below its limit again; 2 connection(s) refused meanwhile")

    async def test_simultaneous_handshakes_from_one_address_get_no_more_than_its_limit(self):
        await self.start_room(max_per_address=5)
        heads = await within(asyncio.gather(*(self.upgrade_status() for _ in range(30))))
        statuses = collections.Counter(head.split(b" ")[1] for head, _ in heads)
        self.assertEqual(statuses, {b"101": 5, b"503": 25})   # counted from the first byte, not the 101

    async def test_connections_silent_in_their_handshake_count_against_their_address(self):
        await self.start_room(max_per_address=3)
        silent = []
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
            self.addCleanup(writer.close)
            silent.append(reader)
        for reader in silent[3:]:   # past the limit: dropped within a second, not held for 10 s
            self.assertEqual(await within(reader.read()), b"")
        head, _ = await self.upgrade_status()   # the three silent ones still hold the places
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)

    async def test_trusted_proxy_makes_limits_and_logs_use_x_forwarded_for(self):
        logged = LogCatcher(logging.INFO)
        self.addCleanup(logged.remove)
        await self.start_room(max_per_address=1, trusted_proxies=["127.0.0.1"])
        first, _ = await self.upgrade_status("10.9.9.9, 203.0.113.7")
        other, _ = await self.upgrade_status("198.51.100.1")
        again, _ = await self.upgrade_status("203.0.113.7")
        self.assertTrue(first.startswith(b"HTTP/1.1 101 "), first)
        self.assertTrue(other.startswith(b"HTTP/1.1 101 "), other)
        self.assertTrue(again.startswith(b"HTTP/1.1 503 "), again)
        messages = []
        while not any("at its limit" in message for message in messages):
            messages.append((await within(logged.next())).getMessage())
        self.assertRegex(messages[0], r"^203\.0\.113\.7 via 127\.0\.0\.1:\d+: user1 joined")
        self.assertEqual(messages[-1], "203.0.113.7: at its limit of 1 connection(s); "
                                       "refusing more with 503 until one closes")

    async def test_a_trusted_proxys_bad_x_forwarded_for_is_a_400_whatever_it_asks_for(self):
        await self.start_room(trusted_proxies=["127.0.0.1"])
        for request in (upgrade_request("/chat", "X-Forwarded-For: nonsense\r\n"),
                        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: nonsense\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
            self.addCleanup(writer.close)
            writer.write(request)
            head = await within(reader.readuntil(b"\r\n\r\n"))
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)   # the page too, as before

    async def test_a_room_subclass_can_answer_requests_itself(self):
        class Room(chat.ChatRoom):
            def process_request(self, request):
                return chat.Response(http.HTTPStatus.IM_A_TEAPOT, "no\n") if request.path == "/tea" else \
                    super().process_request(request)

        await self.start_room(room=Room(rate=0))
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.addCleanup(writer.close)
        writer.write(b"GET /tea HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertTrue((await within(reader.readuntil(b"\r\n\r\n"))).startswith(b"HTTP/1.1 418 "))

    async def test_x_forwarded_for_from_anyone_else_is_ignored(self):
        await self.start_room(max_per_address=1, trusted_proxies=["192.0.2.1"])
        first, _ = await self.upgrade_status("203.0.113.7")
        second, body = await self.upgrade_status("198.51.100.1")
        self.assertTrue(first.startswith(b"HTTP/1.1 101 "), first)
        self.assertTrue(second.startswith(b"HTTP/1.1 503 "), second)
        self.assertTrue((await within(body.read())).startswith(b"too many connections from 127.0.0.1 "))

    async def test_a_flood_past_the_held_bound_closes_with_1008_and_others_are_not_slowed(self):
        await self.start_room(room=chat.ChatRoom(rate=0.001, burst=3, max_held=5))
        alice = await self.join("alice")
        flooder = await self.join("flooder")
        await self.expect(alice, "* flooder joined")

        async def read_all(conn):
            lines = []
            try:
                while True:
                    lines.append(await conn.recv())
            except chat.ConnectionClosed as closed:
                return lines, closed

        reading = asyncio.create_task(read_all(flooder))
        for i in range(8):   # 3 relayed at once, 5 held: up to the bound
            await flooder.send(f"line {i}")
        await within(flooder.ping(b"still there?"))   # held lines don't hold up the connection
        await flooder.send("one more")
        lines, closed = await within(reading)
        self.assertEqual(lines, ["[flooder]: line 0", "[flooder]: line 1", "[flooder]: line 2"])
        self.assertEqual((closed.code, closed.reason),
                         (CloseCode.POLICY_VIOLATION, "flooding: 6 lines not relayed"))
        await self.expect(alice, "[flooder]: line 0", "[flooder]: line 1", "[flooder]: line 2",
                          "* flooder left")
        await self.assert_still_served(alice)

    async def test_client_that_never_reads_is_dropped_with_1008_and_nobody_waits(self):
        await self.start_room(max_buffer=256 * 1024, close_timeout=0.5)
        alice = await self.join("alice")
        # A client with a tiny receive buffer that never reads after its handshake.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.server.port))
        sock.setblocking(False)
        _, writer = await asyncio.open_connection(sock=sock)
        self.addCleanup(writer.close)
        writer.write(upgrade_request("/chat?name=sloth"))
        await self.expect(alice, "* sloth joined")
        # 9 MB for sloth, who reads none of it: more than the kernel's socket
        # buffers (4 MB on Linux) and the server's own bound (256 KiB here).
        # Alice keeps up with the room (she reads each line before sending the
        # next), and gets every one of them while sloth is cut off.
        text = "x" * 60_000
        for _ in range(150):
            await alice.send(text)
            await self.expect(alice, f"[alice]: {text}")
        await self.expect(alice, "* sloth left")
        self.assertEqual(list(self.room.members), ["alice"])

    async def test_peer_that_misses_a_keepalive_ping_is_dropped(self):
        await self.start_room(keepalive_interval=0.2, close_timeout=0.2)
        alice = await self.join("alice")
        # A raw client that completes the handshake, then never answers anything.
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.addCleanup(writer.close)
        writer.write(upgrade_request("/chat?name=mute"))
        await self.expect(alice, "* mute joined")
        await self.expect(alice, "* mute left")   # alice, who answers pings, stays
        await self.assert_still_served(alice)

    async def test_handshake_must_finish_in_time(self):
        await self.start_room(handshake_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(b"GET /chat HTTP/1.1\r\n")   # ... and nothing more
        self.assertEqual(await within(reader.read(), 5), b"")
        writer.close()

    async def test_every_sender_is_heard_by_everyone_in_order(self):
        await self.start_room()
        members = [await self.join(f"m{i}") for i in range(5)]
        for i, conn in enumerate(members):   # drain the join notices
            for j in range(i + 1, 5):
                await self.expect(conn, f"* m{j} joined")

        async def send_all(i, conn):
            for n in range(50):
                await conn.send(f"{i}:{n}")

        async def receive_all(conn):
            return [await within(conn.recv()) for _ in range(5 * 50)]

        receiving = [asyncio.create_task(receive_all(conn)) for conn in members]
        await within(asyncio.gather(*(send_all(i, conn) for i, conn in enumerate(members))))
        for received in await within(asyncio.gather(*receiving)):
            for i in range(5):
                self.assertEqual([line for line in received if line.startswith(f"[m{i}]")],
                                 [f"[m{i}]: {i}:{n}" for n in range(50)])

    async def test_oversized_message_closes_with_1009_and_others_stay(self):
        await self.start_room(max_size=1000)
        alice = await self.join("alice")
        bob = await self.join("bob")
        await bob.send("x" * 1001)
        await expect_closed(bob, CloseCode.MESSAGE_TOO_BIG)
        await self.expect(alice, "* bob joined", "* bob left")
        await self.assert_still_served(alice)


# A private test CA and a certificate for localhost/127.0.0.1 it signed, valid
# until 2126. Made once with openssl for these tests; nothing is generated or
# fetched when they run. The key protects nothing but this test.
TEST_CA = """\
-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUYlMKmmcm7PUa+2gOkYRcWvXieaAwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPY2hhdC5weSB0ZXN0IENBMCAXDTI2MTEyNTE5MzMxM1oYDzIx
MjYxMTAxMTkzMzEzWjAaMRgwFgYDVQQDDA9jaGF0LnB5IHRlc3QgQ0EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAASjmUHFYdkEOm+WeWqqC+Yh3rZo5Zhfvf9e0MNs
FMoXisBM3BAVgM6HdLBWmBEmrkk9LjxkJ8bFOwsy6XELHVZmo2MwYTAdBgNVHQ4E
FgQUZHKc+J8KKfoBRRYnyjys++6P3O4wHwYDVR0jBBgwFoAUZHKc+J8KKfoBRRYn
yjys++6P3O4wDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZI
zj0EAwIDSAAwRQIgR7+Ra4yqOnKK9R0MxcNoahRV5zvk1P7saeTHFr8StIsCIQDd
mbhduzh657C7S6EzVV2oIUAZbojdF2ZmxlIwnhJ5jQ==
-----END CERTIFICATE-----
"""

TEST_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBxDCCAWugAwIBAgIUXR87b3XpQnV1ZZOQQVtXcLXNDeYwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPY2hhdC5weSB0ZXN0IENBMCAXDTI2MTEyNTE5MzMxM1oYDzIx
MjYxMTAxMTkzMzEzWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAARLs7VeWrdMVnN4APchrouLenWcKWm2bmJez6sAOiLV1GUu
R5eRZjNfKBzhldRT0IhgvDaFG9HAAaoYpW0q/LvBo4GSMIGPMBoGA1UdEQQTMBGC
CWxvY2FsaG9zdIcEfwAAATAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIHgDAT
BgNVHSUEDDAKBggrBgEFBQcDATAfBgNVHSMEGDAWgBRkcpz4nwop+gFFFifKPKz7
7o/c7jAdBgNVHQ4EFgQUDuKYvIpJYR3Yu7pzfOAnweweyqowCgYIKoZIzj0EAwID
RwAwRAIgD2rYguTappRPGYxUpFVxqEVrdTvWlAwdCxncwzzSSXACICGLgVWfnE2/
Q9zirQi8g0Dq5VX5tQ1zkaZMJAnpvCh0
-----END CERTIFICATE-----
"""

TEST_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgsHF+lHhTZHXmXlXt
HF19PY78c0Wa/Jt0yQzePNw18vmhRANCAARLs7VeWrdMVnN4APchrouLenWcKWm2
bmJez6sAOiLV1GUuR5eRZjNfKBzhldRT0IhgvDaFG9HAAaoYpW0q/LvB
-----END PRIVATE KEY-----
"""


class TestOutOfDescriptors(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """A server at its open-file limit: a child process with a tiny RLIMIT_NOFILE."""

    #: The child: soft limit 70, hard 72; the server raises it to 72 and keeps 64.
    CHILD = ("import resource, sys\n"
             "resource.setrlimit(resource.RLIMIT_NOFILE, (70, 72))\n"
             "import chat\n"
             "sys.exit(chat.main(sys.argv[1:]))\n")

    async def start_child(self):
        if importlib.util.find_spec("resource") is None:
            self.skipTest("no resource module (Windows)")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", self.CHILD, "server", "--port", "0", "--max-clients", "20",
            "--max-per-ip", "0", "--connects-per-minute", "0", cwd=os.path.dirname(os.path.abspath(chat.__file__)),
            stderr=asyncio.subprocess.PIPE)
        self.addAsyncCleanup(self.stop, child)
        return child

    async def stop(self, child):
        if child.returncode is None:
            child.terminate()
            await within(child.wait())

    async def log_lines_until(self, child, text):
        lines = []
        while not lines or text not in lines[-1]:
            line = await within(child.stderr.readline())
            self.assertTrue(line, f"the server exited before logging {text!r}: {lines}")
            lines.append(line.decode().rstrip("\n"))
        return lines

    async def assert_refused_as_full(self, url):
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(url))
        self.assertEqual((caught.exception.status, caught.exception.reason),
                         (503, "server full (8 clients); try again later"))

    async def test_at_the_limit_members_chat_on_and_newcomers_get_503_with_one_log_line(self):
        child = await self.start_child()
        started = await self.log_lines_until(child, "chat server ready")
        self.assertIn("WARNING --max-clients lowered from 20 to 8: this process may open 72 files "
                      "(ulimit -n) and keeps 64 for itself", started[0])
        url = "ws://" + re.search(r"ws://(127\.0\.0\.1:\d+)/chat", started[-1])[1] + "/chat"
        members = [await within(chat.connect(f"{url}?name=m{i}")) for i in range(8)]
        for member in members:
            self.addAsyncCleanup(member.close)
        await self.assert_refused_as_full(url)
        host, port = url[5:-5].split(":")
        idle = [(await within(asyncio.open_connection(host, int(port))))[1] for _ in range(100)]
        for writer in idle:
            self.addCleanup(writer.close)
        await self.log_lines_until(child, "cannot accept new connections: too many open files")
        await members[0].send("still here")
        while await within(members[0].recv()) != "[m0]: still here":
            pass
        await self.assert_refused_as_full(url)   # the silent ones made room for the answer
        for writer in idle:
            writer.close()
        for member in members:
            await within(member.close())
        await self.stop(child)
        rest = (await within(child.stderr.read())).decode()
        self.assertNotIn("cannot accept", rest)   # one line for the whole episode
        self.assertLess(len(rest.splitlines()), 40, rest)


class TestTLS(ChatTestCase):
    """wss:// and https:// with the standard ssl module."""

    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.files = {}
        for name, text in (("ca", TEST_CA), ("cert", TEST_CERT), ("key", TEST_KEY)):
            self.files[name] = os.path.join(folder.name, f"{name}.pem")
            with open(self.files[name], "w") as file:
                file.write(text)

    async def start_tls_room(self):
        context = chat.server_ssl_context(self.files["cert"], self.files["key"])
        await self.start_room(ssl_context=context)
        return f"wss://localhost:{self.server.port}/chat"

    async def test_a_silent_tls_connection_is_dropped_at_the_handshake_timeout(self):
        context = chat.server_ssl_context(self.files["cert"], self.files["key"])
        await self.start_room(ssl_context=context, handshake_timeout=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.addCleanup(writer.close)
        writer.write(b"\x16\x03\x01")   # half a ClientHello, then nothing
        self.assertEqual(await within(reader.read(), 5), b"")   # asyncio's own bound is 60 s

    async def test_connections_in_their_tls_handshake_count_against_their_address(self):
        context = chat.server_ssl_context(self.files["cert"], self.files["key"])
        await self.start_room(ssl_context=context, max_per_address=2)
        for _ in range(2):   # TCP connected, not a byte of TLS
            writer = (await asyncio.open_connection("127.0.0.1", self.server.port))[1]
            self.addCleanup(writer.close)
        await until(lambda: len(self.server._handshaking) == 2)
        client_context = chat.client_ssl_context(self.files["ca"], False)
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(f"wss://localhost:{self.server.port}/chat", ssl_context=client_context))
        self.assertEqual(caught.exception.status, 503)
        self.assertEqual(self.server.limits.refusals.refused, {("held", "127.0.0.1"): 1})   # once

    async def test_out_of_descriptors_a_silent_tls_handshake_is_dropped(self):
        context = chat.server_ssl_context(self.files["cert"], self.files["key"])
        await self.start_room(ssl_context=context)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.addCleanup(writer.close)
        await until(lambda: self.server._handshaking)
        later = asyncio.get_running_loop().time() + 2 * chat.SILENT_WHEN_SHORT
        self.assertEqual(self.server.drop_silent_handshakes(later), 1)   # as LoopErrorLog does
        self.assertEqual(await within(reader.read()), b"")

    async def test_ws_to_a_tls_server_suggests_wss(self):
        url = (await self.start_tls_room()).replace("wss://", "ws://")
        with self.assertRaises(chat.HandshakeError) as caught:
            await within(chat.connect(url))
        self.assertEqual(str(caught.exception),
                         "connection closed during the handshake (if it speaks TLS, is it wss://?)")

    async def test_wss_with_a_trusted_ca(self):
        url = await self.start_tls_room()
        conn = await within(chat.connect(url, ssl_context=chat.client_ssl_context(self.files["ca"], False)))
        self.assertTrue((await within(conn.recv())).startswith("* You are connected"))
        await conn.send("secret")
        self.assertEqual(await within(conn.recv()), "[user1]: secret")
        await within(conn.close())

    async def test_a_hang_up_right_behind_the_handshake_is_noticed_over_tls(self):
        # On Python 3.10 the TLS connection may be gone before chat.Incoming
        # takes over, and then its transport fails pause_reading(): the
        # connection must end quietly, not with a traceback or a task left waiting.
        # (Only 3.10 can fail here, and only when the race goes that way:
        # about 4 tries in 5 without the fix.)
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        server = await self.start(ssl_context=chat.server_ssl_context(self.files["cert"], self.files["key"]),
                                  close_timeout=60.0)
        client_context = chat.client_ssl_context(self.files["ca"], False)
        for _ in range(20):   # the race goes either way from one run to the next
            reader, writer = await asyncio.open_connection("localhost", server.port, ssl=client_context)
            writer.write(upgrade_request() + client_frame(Opcode.TEXT, b"last words"))
            writer.close()   # close_notify and FIN right behind
            with contextlib.suppress(OSError):
                await within(writer.wait_closed())
        await until(lambda: not server.connections)   # well before the 60 s close timeout
        self.assertEqual(errors, [])

    async def test_over_tls_reading_pauses_and_goes_on(self):
        paused = []
        data_received = chat.Incoming.data_received
        def record(incoming, data):
            data_received(incoming, data)
            if incoming.transport.get_extra_info("sockname")[1] == self.server.port:   # the server's
                paused.append(not incoming.transport.is_reading())
        # A small bound, so that the server's reading pauses within one message.
        with unittest.mock.patch.object(chat, "FRAME_BUFFER_LIMIT", 4096), \
                unittest.mock.patch.object(chat.Incoming, "data_received", record):
            url = await self.start_tls_room()
            conn = await within(chat.connect(url, ssl_context=chat.client_ssl_context(self.files["ca"], False)))
            self.assertTrue((await within(conn.recv())).startswith("* You are connected"))
            big = secrets.token_hex(100_000)   # 200 KB that compression can't shrink much
            await conn.send(big)
            self.assertEqual(await within(conn.recv()), f"[user1]: {big}")
            await within(conn.close())
        self.assertIn(True, paused)

    async def test_unknown_certificate_is_refused_unless_insecure(self):
        url = await self.start_tls_room()
        logged = LogCatcher(logging.INFO)
        self.addCleanup(logged.remove)
        with self.assertRaises(ssl.SSLCertVerificationError):
            await within(chat.connect(url))   # the system's CAs don't know ours
        record = await within(logged.next())  # the server logs one line, not a traceback
        self.assertRegex(record.getMessage(), r"^127\.0\.0\.1:\d+: TLS handshake failed: "
                                              r"the client hung up \(did it reject our certificate\?\)$")
        self.assertIsNone(record.exc_info)
        conn = await within(chat.connect(url, ssl_context=chat.client_ssl_context(None, True)))
        self.assertTrue((await within(conn.recv())).startswith("* You are connected"))
        await within(conn.close())

    async def test_https_page(self):
        await self.start_tls_room()
        context = chat.client_ssl_context(self.files["ca"], False)
        reader, writer = await asyncio.open_connection("localhost", self.server.port, ssl=context)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue((await within(reader.readline())).startswith(b"HTTP/1.1 200"))
        writer.close()


# 11. Showing untrusted text ################################################

class TestPrintable(unittest.TestCase):
    """printable(): escape what drives a terminal or reorders a line, nothing else."""

    def assertUnchanged(self, text):
        self.assertEqual(printable(text), text)

    def test_plain_text_is_returned_as_is(self):
        text = "hello, world"
        self.assertIs(printable(text), text)

    def test_zwj_emoji_sequences_are_unchanged(self):
        for emoji in (TECHNOLOGIST, RAINBOW_FLAG, FAMILY):
            with self.subTest(emoji=emoji):
                self.assertUnchanged(f"[bob]: {emoji}!")

    def test_flag_tag_sequence_is_unchanged(self):
        self.assertUnchanged(f"go {SCOTLAND} go")

    def test_tag_characters_outside_a_flag_are_escaped(self):
        # Invisible "tag ASCII" can smuggle text that a terminal doesn't show.
        self.assertEqual(printable("hi\U000E0041\U000E0042"), "hi\\U000e0041\\U000e0042")
        self.assertEqual(printable("\U000E0067\U000E007F"), "\\U000e0067\\U000e007f")

    def test_combining_marks_and_variation_selectors_are_unchanged(self):
        self.assertUnchanged("e\u0301")                  # e + COMBINING ACUTE ACCENT
        self.assertUnchanged("\u2764\ufe0f")             # ❤️ with VS16
        self.assertUnchanged("\u845b\U000E0100")         # 葛 with an ideographic variation selector

    def test_zwnj_is_unchanged(self):
        self.assertUnchanged("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")   # Persian

    def test_non_ascii_spaces_are_unchanged(self):
        self.assertUnchanged("Quoi\u00a0? \u3042\u3000\u3044")   # no-break, ideographic

    def test_c0_controls_and_del_are_escaped(self):
        self.assertEqual(printable("a\x1b[2Jb"), "a\\x1b[2Jb")
        self.assertEqual(printable("one\ntwo\rthree\t"), "one\\ntwo\\rthree\\t")
        self.assertEqual(printable("\x00\x7f"), "\\x00\\x7f")

    def test_c1_controls_are_escaped(self):
        self.assertEqual(printable("a\x85b\x9bc"), "a\\x85b\\x9bc")   # NEL, CSI

    def test_bidi_controls_are_escaped(self):
        for char in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
            with self.subTest(char=f"U+{ord(char):04X}"):
                self.assertEqual(printable(f"x{char}y"), f"x\\u{ord(char):04x}y")

    def test_line_and_paragraph_separators_are_escaped(self):
        self.assertEqual(printable("a\u2028b\u2029c"), "a\\u2028b\\u2029c")

    def test_zero_width_space_and_soft_hyphen_are_escaped(self):
        self.assertEqual(printable("pay\u200bpal\xad"), "pay\\u200bpal\\xad")

    def test_other_format_private_use_and_unassigned_are_escaped(self):
        self.assertEqual(printable("\ufeff\u2060"), "\\ufeff\\u2060")       # BOM, WORD JOINER
        self.assertEqual(printable("\ue000"), "\\ue000")                    # private use
        self.assertEqual(printable("\U0010ffff\u0378"), "\\U0010ffff\\u0378")  # unassigned
        self.assertEqual(printable("\ud800"), "\\ud800")                    # lone surrogate

    def test_escapes_among_emoji(self):
        self.assertEqual(printable(f"{TECHNOLOGIST}\u202e{SCOTLAND}\n"),
                         f"{TECHNOLOGIST}\\u202e{SCOTLAND}\\n")

    def test_the_page_is_given_the_runs_of_characters_printable_escapes(self):
        runs = chat.hidden_ranges()

        def escaped(code):
            return printable(chr(code)) != chr(code)

        for (first, last), after in zip(runs, [*runs[1:], (sys.maxunicode + 2, 0)]):
            self.assertTrue(first <= last < after[0] - 1)   # sorted, apart
            self.assertTrue(escaped(first) and escaped(last), (first, last))
            self.assertFalse(first > 0 and escaped(first - 1), first)
            self.assertFalse(last < sys.maxunicode and escaped(last + 1), last)
        for code in random.Random(6455).sample(range(sys.maxunicode + 1), 2000):   # and between
            inside = any(first <= code <= last for first, last in runs)
            self.assertEqual(inside, escaped(code), hex(code))


# 12. Compression ###########################################################

def deflated(payload: bytes) -> bytes:
    """A message compressed as RFC 7692 §7.2.1 says: raw DEFLATE, sync flush, tail removed."""
    return chat.deflate_message(chat.new_deflater(15), payload)


class TestCompression(ChatTestCase):
    """RFC 7692: negotiation (§5, §7.1), compressed frames (§6, §7.2), the bomb bound."""

    def test_extension_header_parses_lists_parameters_and_quoted_values(self):
        self.assertEqual(chat.parse_extensions('permessage-deflate; server_max_window_bits="10", x, '
                                               'Permessage-Deflate;client_max_window_bits'),
                         [("permessage-deflate", [("server_max_window_bits", "10")]), ("x", []),
                          ("permessage-deflate", [("client_max_window_bits", None)])])
        self.assertEqual(chat.parse_extensions(""), [])
        for bad in ('a; b="x y"', "a=1", "a; ;", 'a; b="unterminated'):
            with self.subTest(bad), self.assertRaises(ValueError):
                chat.parse_extensions(bad)

    def test_server_accepts_the_first_valid_offer_and_declines_the_rest(self):
        answer = chat.SERVER_DEFLATE_ANSWER
        cases = {
            "permessage-deflate": answer,
            "permessage-deflate; client_max_window_bits": answer,
            "permessage-deflate; client_max_window_bits=10": answer,
            "permessage-deflate; server_max_window_bits=10": answer + "; server_max_window_bits=10",
            "x-other, permessage-deflate; server_no_context_takeover": answer,
            # §7: an unknown, repeated or invalid parameter declines that offer only.
            "permessage-deflate; foo, permessage-deflate; server_max_window_bits=9":
                answer + "; server_max_window_bits=9",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover": None,
            "permessage-deflate; server_max_window_bits=16": None,
            "permessage-deflate; server_max_window_bits=08": None,
            "permessage-deflate; server_max_window_bits": None,
            "permessage-deflate; client_no_context_takeover=1": None,
            "x-webkit-deflate-frame": None,
            "permessage-deflate; a=\"b c\"": None,   # malformed: every extension declined
        }
        for offer, expected in cases.items():
            with self.subTest(offer):
                self.assertEqual(chat.accept_deflate(offer), expected)
        self.assertIsNone(chat.accept_deflate(None))

    def test_client_accepts_what_a_server_may_add_and_refuses_the_rest(self):
        agreed = chat.check_deflate_answer(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=10; client_max_window_bits=9")
        self.assertEqual(agreed, chat.DeflateParams(True, True, 10, 9))
        self.assertEqual(chat.check_deflate_answer("permessage-deflate"), chat.DeflateParams())
        for bad in ("permessage-deflate; client_max_window_bits",   # a value is required here
                    "permessage-deflate; server_max_window_bits=7", "permessage-deflate; foo",
                    "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                    "x-other", "permessage-deflate, permessage-deflate", "permessage-deflate; a=\""):
            with self.subTest(bad), self.assertRaises(chat.HandshakeError):
                chat.check_deflate_answer(bad)

    async def test_client_fails_on_an_answer_it_cannot_accept(self):
        respond = lambda key: accept(key, "Sec-WebSocket-Extensions: permessage-deflate; foo=1\r\n")
        async with FakeServer(respond) as fake:
            with self.assertRaises(chat.HandshakeError):
                await within(chat.connect(f"ws://127.0.0.1:{fake.port}/"))
        # Not offered, so not to be selected (RFC 6455 §4.1).
        respond = lambda key: accept(key, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
        async with FakeServer(respond) as fake:
            with self.assertRaises(chat.HandshakeError):
                await within(chat.connect(f"ws://127.0.0.1:{fake.port}/", compression=False))

    async def test_client_and_server_interoperate_in_every_parameter_combination(self):
        text = "compress me, " * 500
        answers = ["permessage-deflate", "permessage-deflate; server_no_context_takeover",
                   "permessage-deflate; client_no_context_takeover",
                   "permessage-deflate; server_max_window_bits=9; client_max_window_bits=9",
                   "permessage-deflate; client_max_window_bits=8", chat.SERVER_DEFLATE_ANSWER]
        for answer in answers:
            with self.subTest(answer), unittest.mock.patch("chat.accept_deflate", return_value=answer):
                conn = await self.open(await self.start())
                self.assertEqual(conn.deflate.params, chat.check_deflate_answer(answer))
                for message in (text, text.encode(), "short", text + "!"):   # context carried over
                    await within(conn.send(message))
                    self.assertEqual(await within(conn.recv()), message)

    async def test_no_compression_on_either_side_means_plain_frames(self):
        for server_side, client_side in ((True, False), (False, True)):
            with self.subTest(server=server_side, client=client_side):
                conn = await self.open(await self.start(compression=server_side), compression=client_side)
                self.assertIsNone(conn.deflate)
                await within(conn.send("x" * 1000))
                self.assertEqual(await within(conn.recv()), "x" * 1000)

    def deflate_connection(self) -> chat.Connection:
        reader = asyncio.StreamReader()
        self.transport = FakeTransport(reader)
        deflate = chat.PerMessageDeflate(chat.check_deflate_answer(chat.SERVER_DEFLATE_ANSWER),
                                         is_client=False)
        return chat.Connection(reader, FakeWriter(self.transport), is_client=False,
                               max_size=10_000, close_timeout=1.0, deflate=deflate)

    async def test_compressed_message_split_over_fragments_with_a_ping_between(self):
        conn = self.deflate_connection()
        data = deflated("héllo, wörld ".encode() * 40)
        self.transport.deliver(client_frame(Opcode.TEXT, data[:10], fin=False, rsv=chat.RSV1)
                              + client_frame(Opcode.PING, b"p")
                              + client_frame(Opcode.CONTINUATION, data[10:20], fin=False)
                              + client_frame(Opcode.CONTINUATION, data[20:]))
        self.assertEqual(await within(conn.recv()), "héllo, wörld " * 40)

    async def assert_fails_with(self, conn, code: int, data: bytes):
        self.transport.deliver(data)
        self.transport.deliver_eof()
        closed = await expect_closed(conn.recv())
        self.assertEqual(closed.sent.code, code)

    async def test_rsv1_misuse_fails_the_connection(self):
        start = client_frame(Opcode.TEXT, deflated(b"a" * 200)[:5], fin=False, rsv=chat.RSV1)
        cases = {
            "on a control frame": client_frame(Opcode.PING, b"", rsv=chat.RSV1),
            "on a continuation": start + client_frame(Opcode.CONTINUATION, b"x", rsv=chat.RSV1),
            "RSV2": client_frame(Opcode.TEXT, b"x", rsv=2),
        }
        for name, wire in cases.items():
            with self.subTest(name):
                await self.assert_fails_with(self.deflate_connection(), CloseCode.PROTOCOL_ERROR, wire)
        with self.subTest("without the extension"), self.assertRaises(chat.ProtocolError):
            parse_frame(client_frame(Opcode.TEXT, b"x", rsv=chat.RSV1), expect_masked=True)

    async def test_invalid_compressed_data_is_1002(self):
        await self.assert_fails_with(self.deflate_connection(), CloseCode.PROTOCOL_ERROR,
                                     client_frame(Opcode.TEXT, b"\xff\xff\xff garbage", rsv=chat.RSV1))

    async def test_a_bomb_is_stopped_at_max_size_with_1009(self):
        conn = self.deflate_connection()   # max_size 10,000
        bomb = deflated(bytes(5_000_000))   # 5 MB of zeros in about 5 KB
        self.assertLess(len(bomb), 6_000)
        inflated = []
        real_inflate = chat.PerMessageDeflate.inflate

        def counting_inflate(deflate, chunk, room):
            data = real_inflate(deflate, chunk, room)
            inflated.append(len(data))
            return data
        with unittest.mock.patch.object(chat.PerMessageDeflate, "inflate", counting_inflate):
            await self.assert_fails_with(conn, CloseCode.MESSAGE_TOO_BIG,
                                         client_frame(Opcode.BINARY, bomb, rsv=chat.RSV1))
        self.assertLessEqual(sum(inflated), 10_000)

    async def test_a_broadcast_no_member_takes_is_not_kept(self):
        # A --redis server with no members here still broadcasts what others say.
        room = chat.BatchedRoom(rate=0)
        for _ in range(3):
            room.broadcast("[far away]: ", b"x" * 1000)
        self.assertEqual(room._shared, {})   # nothing was queued to anyone, so nothing is held

    async def test_broadcast_is_compressed_once_for_every_member(self):
        await self.start_room()
        members = [await self.join(f"m{i}") for i in range(3)]
        plain = await self.join("plain", compression=False)
        line = "[m0]: " + "a long line " * 100
        with unittest.mock.patch("chat.new_deflater", wraps=chat.new_deflater) as deflaters:
            self.room.broadcast("[m0]: ", b"a long line " * 100)
        self.assertEqual(deflaters.call_count, 1)   # one for the three who compress
        for conn in members + [plain]:
            while (message := await within(conn.recv())) != line:
                self.assertTrue(message.startswith("* "), message)   # join notices
        self.assertIsNone(plain.deflate)
# 13. Redis: the RESP protocol ##############################################

class TestRespReader(unittest.TestCase):
    """RESP2 (https://redis.io/docs/latest/develop/reference/protocol-spec/): bytes in, replies out."""

    def replies(self, data: bytes, **limits):
        return chat.RespReader(**limits).feed(data)

    def assert_malformed(self, data: bytes, message: str, **limits):
        with self.assertRaises(chat.RespError) as caught:
            self.replies(data, **limits)
        self.assertIn(message, str(caught.exception))

    def test_a_command_is_an_array_of_bulk_strings(self):
        self.assertEqual(chat.encode_command("SET", "k", b"v\r\n", 10),
                         b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$2\r\n10\r\n")

    def test_each_reply_type(self):
        replies = self.replies(b"+OK\r\n:-42\r\n$5\r\nhe\r\no\r\n$0\r\n\r\n$-1\r\n*-1\r\n*0\r\n")
        self.assertEqual(replies, ["OK", -42, b"he\r\no", b"", None, None, []])
        [error] = self.replies(b"-WRONGTYPE Operation against a key\r\n")
        self.assertIsInstance(error, chat.RedisError)   # a value in its place, not raised
        self.assertEqual(str(error), "WRONGTYPE Operation against a key")

    def test_a_nested_reply_fed_byte_by_byte_comes_out_whole(self):
        # An XREAD reply: [[stream, [[id, [field, value]]]]], then a pipelined PONG.
        data = (b"*1\r\n*2\r\n$6\r\nevents\r\n*1\r\n*2\r\n$3\r\n1-0\r\n"
                b"*2\r\n$5\r\nevent\r\n$2\r\nhi\r\n+PONG\r\n")
        expected = [[[b"events", [[b"1-0", [b"event", b"hi"]]]]], "PONG"]
        self.assertEqual(self.replies(data), expected)
        reader, replies = chat.RespReader(), []
        for i in range(len(data)):
            replies += reader.feed(data[i:i + 1])
        self.assertEqual(replies, expected)

    def test_limits_are_checked_before_anything_is_buffered(self):
        self.assert_malformed(b"$9\r\n", "bulk string of 9 bytes (the limit is 8)", max_bulk=8)
        self.assert_malformed(b"$99999999999\r\n", "bulk string of 99999999999 bytes")
        self.assert_malformed(b"*5\r\n", "array of 5 items (the limit is 4)", max_items=4)
        self.assert_malformed(b"*1\r\n" * 8 + b":1\r\n", "nested more than 7 deep")
        self.assert_malformed(b"*2\r\n$6\r\n123456\r\n$6\r\n", "reply of more than 16 bytes",
                              max_reply=16)
        self.assert_malformed(b"+" + b"x" * chat.RESP_MAX_LINE, "line longer than")

    def test_anything_else_is_malformed(self):
        self.assert_malformed(b"%1\r\n", "unknown reply type b'%'")   # a RESP3 map
        self.assert_malformed(b"$abc\r\n", "not a number")
        self.assert_malformed(b":1" + b"0" * 30 + b"\r\n", "not a number")
        self.assert_malformed(b"$2\r\nabc\r\n", "longer than its announced length")
        self.assert_malformed(b"*-2\r\n", "array of -2 items")

    def test_redis_urls(self):
        url = chat.parse_redis_url("rediss://:s%40cret@cache.example:6380/2")
        self.assertEqual(url, chat.RedisURL("cache.example", 6380, 2, None, "s@cret", True))
        self.assertEqual(str(url), "rediss://cache.example:6380/2")   # never the password
        self.assertEqual(str(chat.parse_redis_url("redis://127.0.0.1")), "redis://127.0.0.1:6379")
        self.assertEqual(chat.parse_redis_url("redis://me:pw@[::1]/0")[:5], ("::1", 6379, 0, "me", "pw"))
        for bad in ("http://x", "redis://", "redis://h/x"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                chat.parse_redis_url(bad)

    def test_events_round_trip_and_garbage_is_refused(self):
        event = chat.Event("12-ab", 7, "tell", 1796000000.5, "[a → b c]: hi  there", " \u0308b")
        self.assertEqual(chat.decode_event(chat.encode_event(event)), event)
        for garbage in (b"", b"x 1 say 0 -", b"x 1 shout 0 - hi", b"x one say 0 - hi", b"\xff 1 say 0 - hi",
                        b"x 1 say nan - hi", b"x 1 say inf - hi", b"x 1 say -1 - hi", b"x 1 say 1e20 - hi"):
            with self.subTest(garbage=garbage), self.assertRaises(ValueError):
                chat.decode_event(garbage)
        with self.assertRaises(chat.RespError):
            chat.stream_entries([[b"s", [[b"1-0", [b"other", b"x"]]]]])


class FakeRedis:
    """A TCP server that reads commands and answers each with the next bytes a test chose."""

    def __init__(self, *answers: bytes):
        self.answers = list(answers)
        self.commands = []
        self.writers = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = chat.parse_redis_url(f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}")
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for writer in self.writers:
            writer.close()

    async def serve(self, reader, writer):
        self.writers.append(writer)
        commands = chat.RespReader()   # a command is an array of bulk strings: a reply's shape
        while self.answers and (data := await reader.read(4096)):
            for command in commands.feed(data):
                self.commands.append(command)
                writer.write(self.answers.pop(0))
        await reader.read()
        writer.close()


async def close_redis(conn: chat.RedisConnection) -> None:
    """A cleanup: RedisConnection.close() wants the event loop running."""
    conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TestRedisConnection(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """The client side of RESP: setup from the URL, pipelining, and a peer that talks nonsense."""

    async def test_events_in_flight_when_the_link_broke_are_shared_on_the_next_link(self):
        class Link:
            def __init__(self, fails):
                self.fails, self.sent = fails, []

            async def pipeline(self, commands):
                if self.fails:
                    raise chat.RedisUnavailable("the link broke")
                self.sent += commands
                return [b"OK"] * len(commands)

        stream = chat.EventStream("p", "s1", chat.History(50, 0), deliver=lambda event: None)
        stream.share("say", "[a]: hello")
        with self.assertRaises(chat.RedisUnavailable):
            await within(stream.sharer(Link(fails=True)))
        link = Link(fails=False)
        sharing = asyncio.create_task(stream.sharer(link))
        self.addCleanup(sharing.cancel)
        await within(stream.drained.wait())
        self.assertEqual([command[0] for command in link.sent], ["XADD", "RPUSH", "LTRIM"])

    async def test_auth_and_select_come_from_the_url_and_replies_match_in_order(self):
        async with FakeRedis(b"+OK\r\n", b"+OK\r\n", b":1\r\n", b"$1\r\nx\r\n") as fake:
            url = fake.url._replace(password="pw", username="me", db=3)
            conn = await within(chat.RedisConnection.open(url))
            self.addAsyncCleanup(close_redis, conn)
            self.assertEqual(await within(conn.pipeline([("INCR", "n"), ("GET", "k")])), [1, b"x"])
        self.assertEqual(fake.commands, [[b"AUTH", b"me", b"pw"], [b"SELECT", b"3"],
                                         [b"INCR", b"n"], [b"GET", b"k"]])

    async def test_a_malformed_reply_is_a_clear_error_and_drops_the_connection(self):
        async with FakeRedis(b"+PONG\r\n", b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n") as fake:
            conn = await within(chat.RedisConnection.open(fake.url))
            with self.assertRaises(chat.RedisUnavailable) as caught:
                await within(conn.command("XREAD", "STREAMS", "s", "0"))
            self.assertEqual(str(caught.exception), "malformed reply: arrays nested more than 7 deep")
            with self.assertRaises(chat.RedisUnavailable):
                await within(conn.command("PING"))   # no reply could be matched to it now

    async def test_an_error_reply_is_raised_by_the_command_only(self):
        async with FakeRedis(b"+PONG\r\n", b"-ERR nope\r\n", b"+PONG\r\n") as fake:
            conn = await within(chat.RedisConnection.open(fake.url))
            self.addAsyncCleanup(close_redis, conn)
            with self.assertRaisesRegex(chat.RedisError, "ERR nope"):
                await within(conn.command("NOPE"))
            self.assertEqual(await within(conn.command("PING")), "PONG")

    async def test_a_room_refuses_to_start_on_a_malformed_reply(self):
        answers = [b"+PONG\r\n"] * 2 + [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"*1\r\n:1\r\n"]
        async with FakeRedis(*answers) as fake:
            room = chat.SharedRoom(fake.url)
            with self.assertRaisesRegex(chat.RedisUnavailable, "not what chat.py writes"):
                await within(room.connect())

    async def test_what_waits_for_redis_is_bounded(self):
        room = chat.SharedRoom(chat.parse_redis_url("redis://127.0.0.1"))   # never connected
        with unittest.mock.patch("chat.MAX_UNSHARED_BYTES", 10_000):
            for i in range(1000):
                room.events.share("say", f"[bob]: line {i} " + "x" * 50)
        self.assertLessEqual(room.events.unshared_bytes, 10_000)
        self.assertEqual(len(room.events.unshared) + room.events.not_shared, 1000)   # the rest stayed here
        self.assertEqual(room.events.unshared_bytes, sum(len(event) for event, _ in room.events.unshared))

    async def test_unreachable_redis_at_start_is_one_sentence_and_status_1(self):
        port = free_port()
        loop = asyncio.get_running_loop()
        with unittest.mock.patch("sys.stderr", io.StringIO()) as err:
            status = await loop.run_in_executor(None, chat.main, [
                "server", "--port", "0", "--redis", f"redis://127.0.0.1:{port}"])
        self.assertEqual(status, 1)
        self.assertEqual(err.getvalue().splitlines()[-1],
                         f"chat.py: cannot reach Redis at redis://127.0.0.1:{port}: connection refused")
        self.assertNotIn("Traceback", err.getvalue())


# 14. One room on many servers ##############################################

def redis_server_or_skip() -> str:
    """The redis-server program; skip without one, except in CI, where it must be there."""
    program = shutil.which("redis-server")
    if program is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI=true but redis-server is missing: .ci/run installs it")
        raise unittest.SkipTest("needs redis-server (Debian: apt-get install redis-server)")
    return program


class RedisProcess:
    """A redis-server of our own on a free port, in a temporary directory, saving nothing."""

    def __init__(self, program: str, folder: str, url: str = "redis://127.0.0.1:{port}"):
        self.program, self.folder, self.options = program, folder, ()
        self.port = free_port()
        self.url = chat.parse_redis_url(url.format(port=self.port))
        self.process = None

    async def start(self):
        self.process = await asyncio.create_subprocess_exec(
            self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.folder, *self.options,
            stdout=asyncio.subprocess.PIPE)
        while b"Ready to accept connections" not in await within(self.process.stdout.readline()):
            pass

    async def kill(self):
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await within(self.process.wait())


class SharedRoomTestCase(ChatTestCase):
    """A redis-server and chat servers sharing a room through it, all on 127.0.0.1."""

    NAME_TTL = 1.0

    async def asyncSetUp(self):
        self.greetings = {}
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.redis = RedisProcess(redis_server_or_skip(), folder.name)
        self.addAsyncCleanup(self.redis.kill)   # last: the rooms' cleanups come after it
        await self.redis.start()

    async def start_shared(self):
        """A chat server on its own port: returns (room, server); join(name, server) joins it."""
        room = chat.SharedRoom(self.redis.url, rate=0, name_ttl=self.NAME_TTL)
        await within(room.connect())
        self.addAsyncCleanup(room.close)
        server = await self.start(room.handle, process_request=room.process_request)
        return room, server

    async def join_at(self, server, name, resume=None):
        query = f"name={name}" + (f"&resume={resume}" if resume else "")
        conn = await self.open(server, f"/chat?{query}")
        text = await within(conn.recv())
        self.greetings[conn] = text
        self.assertIsNotNone(chat.parse_greeting(text), text)
        return conn

    def greeting(self, conn):
        return chat.parse_greeting(self.greetings[conn])

    async def refused(self, server, name):
        conn = await self.open(server, f"/chat?name={name}")
        return await expect_closed(conn)

    async def lines_until(self, conn, last):
        lines = []
        while not lines or lines[-1] != last:
            lines.append(await within(conn.recv()))
        return lines


class TestSharedRoom(SharedRoomTestCase):
    """Two servers, one room: lines, notices, /who, /msg, names and history across servers."""

    async def test_history_entries_redis_holds_that_chat_py_cant_show_are_skipped(self):
        link = await within(chat.RedisConnection.open(self.redis.url))
        for seq, when in enumerate(("nan", "inf", "1796000000.000"), 1):
            await within(link.command("RPUSH", "chat.py:history", f"x {seq} say {when} - [x]: at {when}"))
        link.close()
        _, server = await self.start_shared()
        alice = await self.join_at(server, "alice")
        self.assertEqual(self.greeting(alice).history, 1)
        self.assertTrue((await within(alice.recv())).endswith("[x]: at 1796000000.000"))

    async def test_every_line_reaches_every_member_once_and_in_order(self):
        (_, one), (_, two) = await self.start_shared(), await self.start_shared()
        alice = await self.join_at(one, "alice")
        bob = await self.join_at(two, "bob")
        self.assertIn("! There are 2 users here.", self.greetings[bob])
        await self.expect(alice, "* bob joined")
        for i in range(20):
            await alice.send(f"a{i}")
            await bob.send(f"b{i}")
        await alice.send("a-done"), await bob.send("b-done")
        for conn in (alice, bob):
            lines = await self.lines_until(conn, "[alice]: a-done") + []
            while "[bob]: b-done" not in lines:
                lines.append(await within(conn.recv()))
            for sender in ("alice", "bob"):
                mine = [line for line in lines if line.startswith(f"[{sender}]: ")]
                self.assertEqual(mine, [f"[{sender}]: {sender[0]}{i}" for i in range(20)]
                                 + [f"[{sender}]: {sender[0]}-done"])   # all, once, in order
        await alice.send("/who")
        await self.expect(alice, "* 2 here: alice, bob")
        await bob.send("/msg ALICE psst")
        await self.expect(bob, "[bob → alice]: psst")
        await self.expect(alice, "[bob → alice]: psst")
        await bob.send("/msg carol hello?")
        await self.expect(bob, "* no one named carol is here; /who lists who is")

    async def test_names_are_unique_across_servers_and_history_is_shared(self):
        (_, one), (_, two) = await self.start_shared(), await self.start_shared()
        alice = await self.join_at(one, "alice")
        await alice.send("before you came")
        await self.expect(alice, "[alice]: before you came")
        closed = await self.refused(two, "ALICE")
        self.assertEqual((closed.code, closed.reason), (1008, "the name ALICE is taken; pick another"))
        bob = await self.join_at(two, "bob")
        self.assertEqual(self.greeting(bob).history, 1)
        self.assertRegex(await within(bob.recv()), r"^\(history \S+Z\) \[alice\]: before you came$")
        await bob.send("/nick Alice")
        await self.expect(bob, "* the name Alice is taken; pick another")
        await bob.send("/nick robert")
        await self.expect(bob, "* bob is now known as robert")
        await self.expect(alice, "* bob joined", "* bob is now known as robert")
        await self.join_at(one, "bob")   # the old name is free again
        await self.expect(alice, "* bob joined")
        await self.expect(bob, "* bob joined")
        _, three = await self.start_shared()   # a server started now reads the past from Redis
        carol = await self.join_at(three, "carol")
        self.assertEqual(self.greeting(carol).history, 1)
        self.assertRegex(await within(carol.recv()), r"^\(history \S+Z\) \[alice\]: before you came$")

    async def test_a_newcomer_that_asks_for_no_history_gets_none_from_a_shared_room(self):
        (_, one), (_, two) = await self.start_shared(), await self.start_shared()
        alice = await self.join_at(one, "alice")
        await alice.send("before you came")
        await self.expect(alice, "[alice]: before you came")
        bob = await self.join_at(two, "bob&history=0")
        self.assertEqual(self.greeting(bob).history, 0)
        await bob.send("hi")
        await self.expect(bob, "[bob]: hi")
        carol = await self.join_at(two, "carol&history=1")
        self.assertEqual(self.greeting(carol).history, 1)
        self.assertTrue((await within(carol.recv())).endswith("[bob]: hi"))

    async def test_a_resume_token_takes_the_name_back_at_once_on_another_server(self):
        (_, one), (_, two) = await self.start_shared(), await self.start_shared()
        alice = await self.join_at(one, "alice")
        bob = await self.join_at(two, "bob")
        await self.expect(alice, "* bob joined")
        await alice.send("one"), await alice.send("/me two")
        await self.expect(bob, "[alice]: one", "[alice] two")
        again = await self.join_at(two, "alice", resume=self.greeting(alice).token)
        self.assertEqual(self.greeting(again).name, "alice")
        self.assertEqual(self.greeting(again).delivered, 2)   # the receipts' count came along
        closed = await expect_closed(alice)
        self.assertEqual((closed.code, closed.reason), (1000, chat.REPLACED_REASON))
        await again.send("still me")
        await self.expect(bob, "[alice]: still me")   # no "left", no "joined" in between


class TestRedisOverTLS(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """rediss:// with a password and a database, against redis-server's own TLS port."""

    async def test_rediss_with_a_password_and_a_database(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        files = {}
        for name, text in (("ca", TEST_CA), ("cert", TEST_CERT), ("key", TEST_KEY)):
            files[name] = os.path.join(folder.name, f"{name}.pem")
            with open(files[name], "w") as file:
                file.write(text)
        redis = RedisProcess(redis_server_or_skip(), folder.name,
                             url="rediss://:s3cret@localhost:{port}/1")
        redis.options = ("--port", "0", "--tls-port", str(redis.port), "--tls-auth-clients", "no",
                         "--tls-cert-file", files["cert"], "--tls-key-file", files["key"],
                         "--requirepass", "s3cret")   # the later --port wins: TLS only
        self.addAsyncCleanup(redis.kill)
        await redis.start()
        with self.assertRaisesRegex(chat.RedisUnavailable, "TLS failed: .*certificate"):
            await within(chat.RedisConnection.open(redis.url))   # our CA is no system CA
        with unittest.mock.patch.dict(os.environ, SSL_CERT_FILE=files["ca"]):
            conn = await within(chat.RedisConnection.open(redis.url))
        self.addAsyncCleanup(close_redis, conn)
        self.assertIn(b" db=1 ", await within(conn.command("CLIENT", "INFO")))   # SELECT 1 was sent


class TestSharedRoomFaults(SharedRoomTestCase):
    """Redis killed and restarted; a chat server killed with SIGKILL."""

    async def test_while_redis_is_away_the_room_splits_and_heals(self):
        (room_one, one), (_, two) = await self.start_shared(), await self.start_shared()
        alice, amy = await self.join_at(one, "alice"), await self.join_at(one, "amy")
        bob = await self.join_at(two, "bob")
        await self.expect(alice, "* amy joined", "* bob joined")
        await self.expect(amy, "* bob joined")
        await self.redis.kill()
        for conn in (alice, amy, bob):
            await self.expect(conn, chat.SPLIT_NOTICE)
        await alice.send("just us")
        await self.expect(amy, "[alice]: just us")   # this server's members still talk
        closed = await self.refused(one, "carol")
        self.assertEqual(closed.code, CloseCode.TRY_AGAIN_LATER)
        self.assertIn("the room is split", closed.reason)
        await alice.send("/nick al")
        await self.expect(alice, "[alice]: just us")
        self.assertIn("the room is split", await within(alice.recv()))
        await self.redis.start()   # empty: nothing was saved
        for conn in (alice, amy, bob):
            await self.expect(conn, chat.WHOLE_NOTICE)
        await self.expect(bob, "[alice]: just us")   # shared once Redis was back
        await bob.send("/who")
        await self.expect(bob, "* 3 here: alice, amy, bob")   # the heartbeat set the names again
        self.assertEqual(room_one.events.unshared_bytes, 0)

    async def test_newcomers_refused_while_the_room_is_split_are_logged_once_an_episode(self):
        _, one = await self.start_shared()
        alice = await self.join_at(one, "alice")
        logged = LogCatcher(logging.INFO)
        self.addCleanup(logged.remove)
        await self.redis.kill()
        await self.expect(alice, chat.SPLIT_NOTICE)
        for name in ("carol", "dave", "erin"):
            self.assertEqual((await self.refused(one, name)).code, CloseCode.TRY_AGAIN_LATER)
        await self.redis.start()
        await self.expect(alice, chat.WHOLE_NOTICE)
        await self.join_at(one, "frank")
        messages = []
        while not any("joined" in message for message in messages):
            messages.append((await within(logged.next())).getMessage())
        refusals = [message for message in messages if "refus" in message or "letting" in message]
        self.assertEqual(len(refusals), 2, messages)
        self.assertRegex(refusals[0], r"^refusing newcomers with 1013 for now: the room is split")
        self.assertEqual(refusals[1], "letting newcomers in again; 3 connection(s) refused meanwhile")

    async def test_a_killed_servers_names_are_free_within_the_ttl(self):
        _, one = await self.start_shared()
        server = await asyncio.create_subprocess_exec(
            sys.executable, chat.__file__, "server", "--port", "0", "--rate", "0",
            "--redis", str(self.redis.url), "--name-ttl", str(self.NAME_TTL),
            stderr=asyncio.subprocess.PIPE)
        self.addAsyncCleanup(server.wait)
        self.addCleanup(lambda: server.returncode is None and server.kill())
        ready = None
        while ready is None:   # the start-up line (any warning before it is not our business)
            line = (await within(server.stderr.readline())).decode()
            ready = re.search(r"ready: ws://127\.0\.0\.1:(\d+)/chat", line)
        port = int(ready[1])
        url = f"ws://127.0.0.1:{port}/chat"
        bob = await within(chat.connect(f"{url}?name=bob"))
        alice = await within(chat.connect(f"{url}?name=alice"))
        alice_token = chat.parse_greeting(await within(alice.recv())).token
        server.kill()   # SIGKILL: no leave, no release
        await within(server.wait())
        for conn in (alice, bob):
            await expect_closed(conn, CloseCode.ABNORMAL_CLOSURE)
        killed = asyncio.get_running_loop().time()
        again = await self.join_at(one, "alice", resume=alice_token)   # with the token: at once
        self.assertEqual(self.greeting(again).name, "alice")
        self.assertEqual((await self.refused(one, "bob")).code, 1008)  # without: not yet
        while True:
            conn = await self.open(one, "/chat?name=bob")
            try:
                await within(conn.recv())   # the greeting: bob is in
                break
            except chat.ConnectionClosed:   # still taken: poll, bounded by the assertion below
                await asyncio.sleep(self.NAME_TTL / 10)
        self.assertLess(asyncio.get_running_loop().time() - killed, self.NAME_TTL + 1)

    async def test_workers_share_one_port_and_all_close_with_1001(self):
        port = free_port()
        parent = await asyncio.create_subprocess_exec(
            sys.executable, chat.__file__, "server", "--port", str(port), "--workers", "2",
            "--redis", str(self.redis.url), stderr=asyncio.subprocess.PIPE)
        self.addAsyncCleanup(parent.wait)
        self.addCleanup(lambda: parent.returncode is None and parent.kill())
        ready = 0
        while ready < 2:
            ready += "chat server ready" in (await within(parent.stderr.readline())).decode()
        names = ["w0", "w1", "w2", "w3", "w4", "w5"]
        conns = [await within(chat.connect(f"ws://127.0.0.1:{port}/chat?name={name}")) for name in names]
        for conn in conns:
            await within(conn.recv())   # the greeting
        await conns[0].send("/who")
        while not (line := await within(conns[0].recv())).startswith("* 6 here"):
            pass
        self.assertEqual(line, "* 6 here: " + ", ".join(names))
        parent.send_signal(signal.SIGTERM)
        for conn in conns:
            await expect_closed(conn, CloseCode.GOING_AWAY)
        self.assertEqual(await within(parent.wait()), 0)


# 15. Line editor ###########################################################

ESC = "\x1b"
CSI_SEQUENCE = re.compile(r"\x1b\[([0-9;?]*)([@-~])")


class FakeTerminal:
    """Just enough of xterm to check what InputView writes: a grid of cells and a cursor.

    A wide character fills two cells: itself and an empty placeholder "". A
    combining character joins the cell before the cursor, and so does what
    follows a ZERO WIDTH JOINER if it is an emoji (tmux draws 👩‍💻 in two cells). Writing into the
    last column leaves the cursor there with a wrap pending (xterm's deferred
    wrap); the next printable character wraps first. Anything it doesn't
    know fails the test, so InputView can't emit a sequence nobody checked.
    """

    def __init__(self, width: int = 80, height: int = 24) -> None:
        """A blank screen, cursor at the top left."""
        self.width, self.height = width, height
        self.grid = [self._blank_row() for _ in range(height)]
        self.wrapped = [False] * height      # did this row's text go on, wrapped, below it?
        self.row = self.col = 0
        self.wrap_pending = False
        self.joined = False                  # the last character printed was a ZWJ
        self.scrolled_off: list[str] = []    # rows pushed off the top, oldest first

    def _blank_row(self) -> list[str]:
        """One row of blank cells."""
        return [" "] * self.width

    def write(self, text: str) -> None:
        """Interpret text as the terminal would."""
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == ESC:
                match = CSI_SEQUENCE.match(text, i)
                assert match, f"unexpected escape sequence {text[i:i + 12]!r}"
                self._csi(match[1], match[2])
                i = match.end()
                continue
            if ch == "\r":
                self.col, self.wrap_pending = 0, False
            elif ch == "\n":
                self._line_feed()
            else:
                assert unicodedata.category(ch) != "Cc", f"unexpected control {ch!r}"
                self._print(ch)
            i += 1

    def _csi(self, params: str, final: str) -> None:
        """One control sequence: cursor moves and erasing; modes and colours are ignored."""
        if params.startswith("?") and final in "hl" or final == "m":
            return
        n = int(params or 0)
        if final in "ABCD":
            n = n or 1     # 0 means 1 for cursor moves
            self.wrap_pending = False
            if final == "A":
                self.row = max(0, self.row - n)
            elif final == "B":
                self.row = min(self.height - 1, self.row + n)
            elif final == "C":
                self.col = min(self.width - 1, self.col + n)
            else:
                self.col = max(0, self.col - n)
        elif final == "K":
            self._erase_cells(self.row, 0 if n == 2 else self.col)
        elif final == "J" and n == 0:
            self._erase_cells(self.row, self.col)
            for row in range(self.row + 1, self.height):
                self._erase_cells(row, 0)
        elif final == "J" and n == 2:
            for row in range(self.height):
                self._erase_cells(row, 0)
        elif final == "H" and not params:
            self.row = self.col = 0
            self.wrap_pending = False
        else:
            raise AssertionError(f"unexpected control sequence {params!r} {final!r}")

    def _erase_cells(self, row: int, start: int) -> None:
        """Blank the cells of row from start to the end of the row."""
        self.grid[row][start:] = [" "] * (self.width - start)
        self.wrapped[row] = False

    def _line_feed(self) -> None:
        """Down one row; at the bottom, scroll everything up instead."""
        self.wrap_pending = False
        if self.row < self.height - 1:
            self.row += 1
            return
        self.scrolled_off.append("".join(self.grid.pop(0)).rstrip(" "))
        self.grid.append(self._blank_row())
        self.wrapped = self.wrapped[1:] + [False]

    def _print(self, ch: str) -> None:
        """Draw one printable character at the cursor and move on."""
        w = 0 if self.joined and chat.grapheme_break(ch) == "ExtPict" else char_width(ch)
        self.joined = ch == "\u200d"
        if w == 0:
            col = self.col if self.wrap_pending else self.col - 1
            if col >= 0:
                self.grid[self.row][col] += ch
            return
        if self.wrap_pending or self.col + w > self.width:
            self.wrapped[self.row] = True
            self._line_feed()
            self.col = 0
        cells = self.grid[self.row]
        if cells[self.col] == "" and self.col > 0:
            cells[self.col - 1] = " "      # overwrote the right half of a wide character
        if self.col + w < self.width and cells[self.col + w] == "":
            cells[self.col + w] = " "      # overwrote the left half of one
        cells[self.col:self.col + w] = [ch] + [""] * (w - 1)
        if self.col + w >= self.width:
            self.col, self.wrap_pending = self.width - 1, True
        else:
            self.col += w

    def resize(self, width: int, *, reflow: bool = False) -> None:
        """A new width: xterm cuts or pads rows; tmux, VTE, kitty... reflow them."""
        if reflow:
            self._reflow(width)
        else:
            self.grid = [(row + [" "] * width)[:width] for row in self.grid]
            self.col = min(self.col, width - 1)
        self.width = width

    def _reflow(self, width: int) -> None:
        """Rewrap each logical line (rows joined by wraps) at width; follow the cursor."""
        lines: list[list[str]] = []
        for r, row in enumerate(self.grid):
            if r == 0 or not self.wrapped[r - 1]:
                lines.append([])
            if r == self.row:
                cursor = len(lines) - 1, len(lines[-1]) + self.col
            lines[-1].extend(row if self.wrapped[r] else "".join(row).rstrip(" "))
        grid: list[list[str]] = []
        wrapped: list[bool] = []
        for n, cells in enumerate(lines):
            if n == cursor[0]:
                self.row, self.col = len(grid) + cursor[1] // width, cursor[1] % width
            pieces = [cells[i:i + width] for i in range(0, len(cells), width)] or [[]]
            grid += [piece + [" "] * (width - len(piece)) for piece in pieces]
            wrapped += [True] * (len(pieces) - 1) + [False]
        while len(grid) > self.height and self.row < len(grid) - 1 and not "".join(grid[-1]).strip():
            grid.pop(), wrapped.pop()        # blank rows below the cursor go first
        while len(grid) > self.height:
            self.scrolled_off.append("".join(grid.pop(0)).rstrip(" "))
            wrapped.pop(0)
            self.row -= 1
        self.grid = grid + [[" "] * width for _ in range(self.height - len(grid))]
        self.wrapped = wrapped + [False] * (self.height - len(wrapped))

    def screen(self) -> list[str]:
        """The rows as text, trailing blanks stripped."""
        return ["".join(row).rstrip(" ") for row in self.grid]

    @property
    def cursor(self) -> tuple[int, int]:
        """(row, column) of the cursor."""
        return self.row, self.col


class Client:
    """The client's loop, minus the network: keys in, drawing out, lines "sent"."""

    def __init__(self, width: int = 80, height: int = 24, prompt: str = "> ") -> None:
        """A fresh terminal with the prompt drawn."""
        self.width, self.height = width, height
        self.terminal = FakeTerminal(width, height)
        self.decoder = KeyDecoder()
        self.editor = LineEditor()
        self.view = InputView(prompt)
        self.sent: list[str] = []
        self.actions: list[Action] = []
        self.draw()

    def draw(self) -> None:
        """Redraw the input."""
        self.terminal.write(self.view.redraw(
            self.editor.buffer, self.editor.cursor, self.width, self.height))

    def keys(self, data: str) -> None:
        """What the keyboard sent: edit, send lines, then redraw once."""
        for event in self.decoder.feed(data):
            for result in self.editor.handle(event):
                if isinstance(result, str):
                    self.terminal.write(self.view.clear())   # the server's echo will show it
                    self.sent.append(result)
                else:
                    self.actions.append(result)
        self.draw()

    def incoming(self, *lines: str) -> None:
        """Lines from the room, shown above the input."""
        self.terminal.write(self.view.show_above(
            list(lines), self.editor.buffer, self.editor.cursor, self.width, self.height))


def alphabet(n: int) -> str:
    """n characters that show where each one landed: abc...zabc..."""
    return "".join(chr(ord("a") + i % 26) for i in range(n))


def chunks(text: str, size: int) -> list[str]:
    """text cut in pieces of size characters."""
    return [text[i:i + size] for i in range(0, len(text), size)]


class TestDisplayWidth(unittest.TestCase):
    """char_width and display_width."""

    def test_ascii_is_one_cell_each(self) -> None:
        self.assertEqual(display_width("hello, world"), 12)

    def test_cjk_is_two_cells_each(self) -> None:
        self.assertEqual(display_width("漢字"), 4)
        self.assertEqual(char_width("Ａ"), 2)     # fullwidth Latin

    def test_emoji_is_two_cells(self) -> None:
        self.assertEqual(display_width("😀"), 2)

    def test_combining_mark_takes_no_cell(self) -> None:
        self.assertEqual(display_width("e\u0301"), 1)
        self.assertEqual(char_width("\u20dd"), 0)  # enclosing circle (Me)

    def test_zwj_and_variation_selector_take_no_cell(self) -> None:
        self.assertEqual(char_width("\u200d"), 0)
        self.assertEqual(char_width("\ufe0f"), 0)

    def test_a_zwj_sequence_is_as_wide_as_its_first_emoji(self) -> None:
        # 👩‍💻 and 👨‍👩‍👧‍👦 are one glyph in tmux, kitty, WezTerm, iTerm2 (xterm draws the parts).
        self.assertEqual(display_width("\U0001f469\u200d\U0001f4bb"), 2)
        self.assertEqual(display_width("\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"), 2)
        self.assertEqual(display_width("a\u200db"), 2)   # only emoji join into one glyph


class TestKeyDecoder(unittest.TestCase):
    """KeyDecoder: what raw-mode terminals send."""

    SEQUENCES = {
        "\x1b[A": Key.UP, "\x1b[B": Key.DOWN, "\x1b[C": Key.RIGHT, "\x1b[D": Key.LEFT,
        "\x1bOA": Key.UP, "\x1bOB": Key.DOWN, "\x1bOC": Key.RIGHT, "\x1bOD": Key.LEFT,
        "\x1b[H": Key.HOME, "\x1b[F": Key.END, "\x1bOH": Key.HOME, "\x1bOF": Key.END,
        "\x1b[1~": Key.HOME, "\x1b[4~": Key.END, "\x1b[7~": Key.HOME, "\x1b[8~": Key.END,
        "\x1b[3~": Key.DELETE, "\x1b[1;5D": Key.LEFT, "\x7f": Key.BACKSPACE,
        "\x08": Key.BACKSPACE, "\r": Key.ENTER, "\n": Key.ENTER, "\t": Key.TAB,
        "\x01": Key.CTRL_A, "\x02": Key.CTRL_B, "\x03": Key.CTRL_C, "\x04": Key.CTRL_D,
        "\x05": Key.CTRL_E, "\x06": Key.CTRL_F, "\x0b": Key.CTRL_K, "\x0c": Key.CTRL_L,
        "\x0e": Key.CTRL_N, "\x10": Key.CTRL_P, "\x15": Key.CTRL_U, "\x17": Key.CTRL_W,
        "\x1a": Key.CTRL_Z,
    }

    def feed_all(self, pieces: list[str]) -> list[KeyEvent]:
        """Feed one decoder piece by piece; all the events."""
        decoder = KeyDecoder()
        return [event for piece in pieces for event in decoder.feed(piece)]

    def test_every_sequence(self) -> None:
        for sequence, key in self.SEQUENCES.items():
            with self.subTest(sequence=sequence):
                self.assertEqual(KeyDecoder().feed(sequence), [KeyEvent(key)])

    def test_every_sequence_one_character_at_a_time(self) -> None:
        for sequence, key in self.SEQUENCES.items():
            with self.subTest(sequence=sequence):
                self.assertEqual(self.feed_all(list(sequence)), [KeyEvent(key)])

    def test_all_sequences_in_one_stream_split_everywhere(self) -> None:
        stream = "".join(self.SEQUENCES)
        expected = [KeyEvent(key) for key in self.SEQUENCES.values()]
        for size in (1, 2, 3, 5, 7):
            with self.subTest(size=size):
                self.assertEqual(self.feed_all(chunks(stream, size)), expected)

    def test_text_between_keys(self) -> None:
        self.assertEqual(KeyDecoder().feed("héllo\x1b[Dwörld\r"), [
            KeyEvent(Key.TEXT, "héllo"), KeyEvent(Key.LEFT),
            KeyEvent(Key.TEXT, "wörld"), KeyEvent(Key.ENTER)])

    def test_unknown_sequences_are_swallowed_whole(self) -> None:
        # F1 (SS3 P), F5 (CSI 15~), a focus report (CSI I), Alt+x, a private CSI.
        events = KeyDecoder().feed("a\x1bOPb\x1b[15~c\x1b[Id\x1bxe\x1b[?1;2$yf")
        self.assertEqual(events, [KeyEvent(Key.TEXT, ch) for ch in "abcdef"])

    def test_broken_sequence_does_not_eat_the_next_key(self) -> None:
        self.assertEqual(KeyDecoder().feed("\x1b[12\rx"), [KeyEvent(Key.ENTER), KeyEvent(Key.TEXT, "x")])

    def test_other_control_characters_are_dropped(self) -> None:
        self.assertEqual(KeyDecoder().feed("a\x00\x07\x85b"),
                         [KeyEvent(Key.TEXT, "a"), KeyEvent(Key.TEXT, "b")])

    def test_paste(self) -> None:
        pasted = "one\r\ntwo\x1b[Athree"
        events = KeyDecoder().feed("x" + PASTE_START + pasted + PASTE_END + "\x1b[D")
        self.assertEqual(events, [KeyEvent(Key.TEXT, "x"), KeyEvent(Key.PASTE, pasted), KeyEvent(Key.LEFT)])

    def test_paste_split_across_feeds(self) -> None:
        pasted = "first line\nsecond \x1b line\n" * 3
        stream = PASTE_START + pasted + PASTE_END + "z"
        for size in (1, 2, 4, 6, 13, 100):
            with self.subTest(size=size):
                self.assertEqual(self.feed_all(chunks(stream, size)),
                                 [KeyEvent(Key.PASTE, pasted), KeyEvent(Key.TEXT, "z")])

    def test_cut_off_sequence_waits_for_the_rest(self) -> None:
        decoder = KeyDecoder()
        self.assertEqual(decoder.feed("ab\x1b["), [KeyEvent(Key.TEXT, "ab")])
        self.assertEqual(decoder.feed("3"), [])
        self.assertEqual(decoder.feed("~"), [KeyEvent(Key.DELETE)])


class TestLineEditor(unittest.TestCase):
    """LineEditor: editing keys, history, pastes, actions."""

    def editor(self, text: str, cursor: int | None = None) -> LineEditor:
        """An editor holding text, cursor at the end unless given."""
        editor = LineEditor()
        editor.insert(text)
        if cursor is not None:
            editor.cursor = cursor
        return editor

    def press(self, editor: LineEditor, *keys: Key) -> list[str | Action]:
        """Press keys; everything they returned."""
        return [result for key in keys for result in editor.handle(KeyEvent(key))]

    def test_typing_inserts_at_the_cursor(self) -> None:
        editor = self.editor("held", 2)
        editor.handle(KeyEvent(Key.TEXT, "llo wor"))
        self.assertEqual((editor.buffer, editor.cursor), ("hello world", 9))

    def test_moving(self) -> None:
        editor = self.editor("abc")
        self.press(editor, Key.LEFT, Key.LEFT)
        self.assertEqual(editor.cursor, 1)
        self.press(editor, Key.HOME)
        self.assertEqual(editor.cursor, 0)
        self.press(editor, Key.LEFT, Key.RIGHT, Key.CTRL_F)
        self.assertEqual(editor.cursor, 2)
        self.press(editor, Key.CTRL_A, Key.CTRL_E)
        self.assertEqual(editor.cursor, 3)
        self.press(editor, Key.RIGHT, Key.CTRL_B, Key.END)
        self.assertEqual(editor.cursor, 3)

    def test_combining_mark_moves_and_deletes_with_its_base(self) -> None:
        editor = self.editor("ae\u0301b")
        self.press(editor, Key.LEFT, Key.LEFT)
        self.assertEqual(editor.cursor, 1)
        self.press(editor, Key.DELETE)
        self.assertEqual(editor.buffer, "ab")
        editor = self.editor("ae\u0301")
        self.press(editor, Key.BACKSPACE)
        self.assertEqual(editor.buffer, "a")

    def test_backspace_and_delete(self) -> None:
        editor = self.editor("abcd", 2)
        self.press(editor, Key.BACKSPACE)
        self.assertEqual((editor.buffer, editor.cursor), ("acd", 1))
        self.press(editor, Key.DELETE)
        self.assertEqual((editor.buffer, editor.cursor), ("ad", 1))
        self.press(editor, Key.CTRL_D)
        self.assertEqual((editor.buffer, editor.cursor), ("a", 1))
        self.press(editor, Key.DELETE, Key.HOME, Key.BACKSPACE)
        self.assertEqual((editor.buffer, editor.cursor), ("a", 0))

    def test_ctrl_k_u_w(self) -> None:
        editor = self.editor("one two  three four", 15)
        self.press(editor, Key.CTRL_K)
        self.assertEqual(editor.buffer, "one two  three ")
        self.press(editor, Key.CTRL_W)
        self.assertEqual((editor.buffer, editor.cursor), ("one two  ", 9))
        self.press(editor, Key.CTRL_W)
        self.assertEqual(editor.buffer, "one ")
        editor = self.editor("one two", 4)
        self.press(editor, Key.CTRL_U)
        self.assertEqual((editor.buffer, editor.cursor), ("two", 0))

    def test_tab_becomes_spaces(self) -> None:
        editor = self.editor("a")
        self.press(editor, Key.TAB)
        self.assertEqual(editor.buffer, "a" + TAB_SPACES)

    def test_enter_submits_and_empties_the_line(self) -> None:
        editor = self.editor("hello", 2)
        self.assertEqual(self.press(editor, Key.ENTER), ["hello"])
        self.assertEqual((editor.buffer, editor.cursor), ("", 0))

    def test_actions(self) -> None:
        editor = LineEditor()
        self.assertEqual(self.press(editor, Key.CTRL_D), [Action.EOF])
        self.assertEqual(self.press(editor, Key.CTRL_C, Key.CTRL_Z, Key.CTRL_L),
                         [Action.INTERRUPT, Action.SUSPEND, Action.REDRAW])
        editor = self.editor("typed")
        self.assertEqual(self.press(editor, Key.CTRL_C), [Action.INTERRUPT])
        self.assertEqual(editor.buffer, "typed")

    def test_history_up_and_down_keep_the_line_being_written(self) -> None:
        editor = LineEditor()
        for line in ("first", "second", "second", "third"):
            editor.insert(line)
            editor.submit()
        self.assertEqual(editor.history, ["first", "second", "third"])
        editor.insert("draft")
        seen = []
        for key in (Key.UP, Key.UP, Key.CTRL_P, Key.UP, Key.DOWN, Key.CTRL_N, Key.DOWN, Key.DOWN):
            self.press(editor, key)
            seen.append(editor.buffer)
        self.assertEqual(seen, ["third", "second", "first", "first", "second", "third", "draft", "draft"])
        self.assertEqual(editor.cursor, len("draft"))

    def test_history_is_bounded(self) -> None:
        editor = LineEditor(history_size=3)
        for n in range(5):
            editor.insert(str(n))
            editor.submit()
        self.assertEqual(editor.history, ["2", "3", "4"])

    def test_paste_of_25_lines_sends_25_lines_in_order(self) -> None:
        lines = [f"line {n}" for n in range(25)]
        editor = LineEditor()
        results = editor.handle(KeyEvent(Key.PASTE, "\n".join(lines) + "\n"))
        self.assertEqual(results, lines)
        self.assertEqual(editor.buffer, "")

    def test_paste_is_as_if_typed(self) -> None:
        editor = self.editor("<>", 1)
        results = editor.handle(KeyEvent(Key.PASTE, "a\r\nb\rc\nd\tD\x1b\x07"))
        self.assertEqual(results, ["<a", "b", "c"])   # what was after the cursor stays, unsent
        self.assertEqual((editor.buffer, editor.cursor), ("d" + TAB_SPACES + "D>", 6))

    # The issue's examples: 👩‍💻, 🏳️‍🌈 and 👨‍👩‍👧‍👦, each one grapheme cluster of 3 to 7 code points.
    CODER = "\U0001f469\u200d\U0001f4bb"
    RAINBOW_FLAG = "\U0001f3f3\ufe0f\u200d\U0001f308"
    FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"

    def test_left_and_right_step_over_a_whole_emoji(self) -> None:
        editor = self.editor(f"a{self.CODER}b")
        self.press(editor, Key.LEFT, Key.LEFT)
        editor.handle(KeyEvent(Key.TEXT, "Q"))
        self.assertEqual(editor.buffer, f"aQ{self.CODER}b")
        for emoji in (self.CODER, self.RAINBOW_FLAG, self.FAMILY):
            with self.subTest(emoji=emoji):
                editor = self.editor(f"x{emoji}y", 1)
                seen = [editor.cursor]
                for key in (Key.RIGHT, Key.CTRL_F, Key.LEFT, Key.CTRL_B):
                    self.press(editor, key)
                    seen.append(editor.cursor)
                after = 1 + len(emoji)
                self.assertEqual(seen, [1, after, after + 1, after, 1])

    def test_backspace_and_delete_remove_a_whole_cluster(self) -> None:
        for emoji in (self.RAINBOW_FLAG, self.FAMILY, "\U0001f44b\U0001f3fd", "1\ufe0f\u20e3"):
            with self.subTest(emoji=emoji):
                editor = self.editor(f"a{emoji}b")
                self.press(editor, Key.LEFT, Key.BACKSPACE)
                self.assertEqual((editor.buffer, editor.cursor), ("ab", 1))
                editor = self.editor(f"a{emoji}b", 1)
                self.press(editor, Key.DELETE)
                self.assertEqual(editor.buffer, "ab")
                editor = self.editor(f"a{emoji}b", 1)
                self.press(editor, Key.CTRL_D)
                self.assertEqual(editor.buffer, "ab")

    def test_an_edit_that_joins_clusters_leaves_the_cursor_after_them(self) -> None:
        editor = self.editor("\u0301")      # a lone accent, then an "e" typed before it
        self.press(editor, Key.HOME)
        editor.handle(KeyEvent(Key.TEXT, "e"))
        self.assertEqual((editor.buffer, editor.cursor), ("e\u0301", 2))
        editor = self.editor("\U0001f1eb-\U0001f1f7", 2)   # 🇫-🇷: Backspace makes 🇫🇷
        self.press(editor, Key.BACKSPACE)
        self.assertEqual((editor.buffer, editor.cursor), ("\U0001f1eb\U0001f1f7", 2))


class TestGraphemeClusters(unittest.TestCase):
    """next_boundary and previous_boundary: user-perceived characters (UAX #29)."""

    def clusters(self, text: str) -> list[str]:
        """text cut by next_boundary, after checking that previous_boundary cuts it alike."""
        ends = [0]
        while ends[-1] < len(text):
            ends.append(chat.next_boundary(text, ends[-1]))
        starts = [len(text)]
        while starts[-1] > 0:
            starts.append(chat.previous_boundary(text, starts[-1]))
        self.assertEqual(starts[::-1], ends, f"backwards differs for {text!r}")
        return [text[start:end] for start, end in zip(ends, ends[1:])]

    def test_what_a_reader_sees_as_one_character(self) -> None:
        cases = {
            "e\u0301x": ["e\u0301", "x"],                                   # é as e + accent
            "\U0001f44b\U0001f3fd!": ["\U0001f44b\U0001f3fd", "!"],         # 👋🏽: a skin tone
            "\U0001f1eb\U0001f1f7\U0001f1e9\U0001f1ea": ["\U0001f1eb\U0001f1f7", "\U0001f1e9\U0001f1ea"],
            "\U0001f1eb\U0001f1f7\U0001f1e9": ["\U0001f1eb\U0001f1f7", "\U0001f1e9"],   # 🇫🇷 and half
            "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f.":  # 🏴󠁧󠁢󠁳󠁣󠁴󠁿
                ["\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "."],
            "1\ufe0f\u20e3#": ["1\ufe0f\u20e3", "#"],                      # 1️⃣: a keycap
            "\u1100\u1161\u11a8\ud55c": ["\u1100\u1161\u11a8", "\ud55c"],   # 각 in jamo L V T, then 한
            "a\u200db": ["a\u200d", "b"],                                   # ZWJ joins emoji only
            "\U0001f469\u200d\U0001f4bb\u200d": ["\U0001f469\u200d\U0001f4bb\u200d"],   # 👩‍💻 and a ZWJ
            "\U0001f3f3\ufe0f\u200d\U0001f308?": ["\U0001f3f3\ufe0f\u200d\U0001f308", "?"],   # 🏳️‍🌈
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(self.clusters(text), expected)

    def test_stepping_back_looks_only_near_the_cursor(self) -> None:
        text = "\U0001f469\u200d\U0001f4bb" * 1000     # 1,000 👩‍💻: Left must not rescan them
        with unittest.mock.patch("chat.grapheme_break", wraps=chat.grapheme_break) as looked_at:
            self.assertEqual(chat.previous_boundary(text, len(text)), len(text) - 3)
        self.assertLess(looked_at.call_count, 20)

    #: Lines of GraphemeBreakTest.txt, Unicode 15.1.0 (ucd/auxiliary), with
    #: ÷ where a boundary is and × where none is; one or more for each rule.
    #: Chosen from characters that Python 3.10's Unicode 13 knows alike, and
    #: none for GB9c, which the segmenter leaves out.
    BREAK_TEST = """
        ÷ 0020 ÷ 0020 ÷
        ÷ 0061 × 0308 ÷ 0062 ÷
        ÷ 000D × 000A ÷ 0061 ÷ 000A ÷ 0308 ÷
        ÷ 0001 ÷ 0308 ÷ 0020 ÷
        ÷ 0378 × 0308 ÷ 0378 ÷
        ÷ 0020 × 200D ÷ 0646 ÷
        ÷ 0061 × 0903 ÷ 0062 ÷
        ÷ 0061 ÷ 0600 × 0062 ÷
        ÷ 0600 × 0020 ÷
        ÷ 0600 ÷ 000A ÷
        ÷ 1100 × 1160 ÷
        ÷ 1100 × AC01 ÷
        ÷ AC00 × 1160 ÷
        ÷ 1160 × 11A8 ÷
        ÷ 11A8 ÷ 1160 ÷
        ÷ AC00 × 11A8 ÷ 1100 ÷
        ÷ AC01 × 11A8 ÷ 1100 ÷
        ÷ 1F1E6 × 0308 ÷ 1F1E6 ÷
        ÷ 1F1E6 × 1F1E7 ÷ 1F1E8 ÷ 0062 ÷
        ÷ 0061 ÷ 1F1E6 × 1F1E7 ÷ 1F1E8 ÷ 0062 ÷
        ÷ 0061 ÷ 1F1E6 × 1F1E7 × 200D ÷ 1F1E8 ÷ 0062 ÷
        ÷ 0061 ÷ 1F1E6 × 200D ÷ 1F1E7 × 1F1E8 ÷ 0062 ÷
        ÷ 0061 ÷ 1F1E6 × 1F1E7 ÷ 1F1E8 × 1F1E9 ÷ 0062 ÷
        ÷ 231A ÷ 0020 ÷
        ÷ 200D ÷ 231A ÷
        ÷ 1F476 × 1F3FF ÷ 1F476 ÷
        ÷ 0061 × 1F3FF ÷ 1F476 × 200D × 1F6D1 ÷
        ÷ 1F476 × 1F3FF × 0308 × 200D × 1F476 × 1F3FF ÷
        ÷ 1F6D1 × 200D × 1F6D1 ÷
        ÷ 0061 × 200D ÷ 1F6D1 ÷
    """

    def test_unicode_grapheme_break_test_lines(self) -> None:
        for line in self.BREAK_TEST.strip().splitlines():
            expected = [cluster.split() for cluster in line.strip(" ÷").split("÷")]
            expected = ["".join(chr(int(code, 16)) for code in cluster if code != "×")
                        for cluster in expected]
            with self.subTest(line=line.strip()):
                self.assertEqual(self.clusters("".join(expected)), expected)


class TestLayout(unittest.TestCase):
    """layout and visible_rows, the arithmetic behind InputView."""

    def test_rows_and_cursor(self) -> None:
        self.assertEqual(layout("abcdefg", 3, 3), (["abc", "def", "g"], 1, 0))
        self.assertEqual(layout("abcdefg", 7, 3), (["abc", "def", "g"], 2, 1))

    def test_full_last_row_gets_an_empty_row(self) -> None:
        self.assertEqual(layout("abcdef", 6, 3), (["abc", "def", ""], 2, 0))
        self.assertEqual(layout("abcdef", 5, 3), (["abc", "def", ""], 1, 2))

    def test_wide_character_does_not_straddle_the_margin(self) -> None:
        self.assertEqual(layout("a漢字", 2, 4), (["a漢", "字"], 1, 0))

    def test_combining_mark_stays_on_a_full_row(self) -> None:
        self.assertEqual(layout("abce\u0301f", 6, 4), (["abce\u0301", "f"], 1, 1))

    def test_visible_rows(self) -> None:
        self.assertEqual(visible_rows(5, 4, 24), range(5))
        self.assertEqual(visible_rows(100, 99, 24), range(77, 100))
        self.assertEqual(visible_rows(100, 0, 24), range(0, 23))
        self.assertEqual(visible_rows(100, 50, 24), range(39, 62))
        self.assertEqual(visible_rows(3, 2, 1), range(2, 3))


class TestRendering(unittest.TestCase):
    """InputView on an 80 x 24 FakeTerminal: the cases from the issue."""

    def test_fake_terminal_defers_the_wrap(self) -> None:
        terminal = FakeTerminal(4, 3)
        terminal.write("abcd")
        self.assertEqual((terminal.cursor, terminal.wrap_pending), ((0, 3), True))
        terminal.write("e漢\r\n\n")
        self.assertEqual(terminal.screen(), ["e漢", "", ""])
        self.assertEqual(terminal.scrolled_off, ["abcd"])

    def test_a_status_line_quoting_the_server_is_escaped(self) -> None:
        # A reconnect's status quotes the server's close reason: it must not clear the screen.
        drawn = chat.InputView().redraw("", 0, 80, 24, ["-!- reconnecting (\x1b[2J\u202eevil)"])
        self.assertNotIn("\x1b[2J", drawn)
        self.assertNotIn("\u202e", drawn)
        self.assertIn("\\x1b[2J\\u202eevil", drawn)

    def test_long_typed_line_wraps_over_two_rows(self) -> None:     # (a)
        client = Client()
        client.keys(alphabet(150))
        text = "> " + alphabet(150)
        self.assertEqual(client.terminal.screen()[:3], [text[:80], text[80:], ""])
        self.assertEqual(client.terminal.cursor, (1, 72))

    def test_long_incoming_line_while_typing(self) -> None:        # (b)
        client = Client()
        client.keys("half way through typing")
        incoming = alphabet(240)
        client.incoming(incoming)
        self.assertEqual(client.terminal.screen()[:5], [
            incoming[:80], incoming[80:160], incoming[160:], "> half way through typing", ""])
        self.assertEqual(client.terminal.cursor, (3, 25))
        client.keys("!")
        self.assertEqual(client.terminal.screen()[3], "> half way through typing!")

    def test_incoming_line_while_input_is_wrapped(self) -> None:   # (c)
        client = Client()
        client.keys(alphabet(150))
        client.incoming("[alice]: hi", "[bob]: " + "x" * 100)
        text = "> " + alphabet(150)
        self.assertEqual(client.terminal.screen()[:6], [
            "[alice]: hi", "[bob]: " + "x" * 73, "x" * 27, text[:80], text[80:], ""])
        self.assertEqual(client.terminal.cursor, (4, 72))

    def test_nothing_is_left_after_enter(self) -> None:            # (d)
        client = Client()
        client.incoming("* welcome")
        client.keys(alphabet(150) + "\r")
        self.assertEqual(client.sent, [alphabet(150)])
        self.assertEqual(client.terminal.screen()[:4], ["* welcome", ">", "", ""])
        client.incoming("[me]: " + alphabet(150))
        self.assertEqual(client.terminal.screen()[:5], [
            "* welcome", "[me]: " + alphabet(74), alphabet(150)[74:], ">", ""])
        self.assertEqual(client.terminal.cursor, (3, 2))

    def test_clear_leaves_nothing(self) -> None:
        client = Client()
        client.keys(alphabet(200))
        client.terminal.write(client.view.clear())
        self.assertEqual(client.terminal.screen(), [""] * 24)
        self.assertEqual(client.terminal.cursor, (0, 0))

    def test_input_taller_than_the_screen_shows_rows_around_the_cursor(self) -> None:  # (e)
        client = Client()
        client.incoming(*(f"line {n}" for n in range(10)))
        text = "> " + alphabet(10_000)
        rows = [text[i:i + 80] for i in range(0, len(text), 80)]     # 126 rows
        client.keys(PASTE_START + alphabet(10_000) + PASTE_END)
        self.assertEqual(client.terminal.screen(), ["line 9"] + rows[-23:])
        self.assertEqual(client.terminal.cursor, (23, 2))
        client.keys("\x01")        # Ctrl-A: the first rows
        self.assertEqual(client.terminal.screen(), ["line 9"] + rows[:23])
        self.assertEqual(client.terminal.cursor, (1, 2))
        client.keys("\x1b[C" * 80 * 50)    # 50 rows down: the cursor's row in the middle
        self.assertEqual(client.terminal.screen(), ["line 9"] + rows[39:62])
        self.assertEqual(client.terminal.cursor, (12, 2))
        client.incoming("[alice]: still here?")
        self.assertEqual(client.terminal.screen(), ["[alice]: still here?"] + rows[39:62])
        client.keys("\x05\r")       # Ctrl-E, Enter
        self.assertEqual(client.terminal.screen(), ["[alice]: still here?", ">"] + [""] * 22)

    def test_input_ending_at_the_margin(self) -> None:             # (f)
        client = Client()
        client.keys("x" * 78)
        self.assertEqual(client.terminal.screen()[:2], ["> " + "x" * 78, ""])
        self.assertEqual(client.terminal.cursor, (1, 0))
        self.assertFalse(client.terminal.wrap_pending)
        client.keys("y")
        self.assertEqual(client.terminal.screen()[:3], ["> " + "x" * 78, "y", ""])
        self.assertEqual(client.terminal.cursor, (1, 1))
        client.keys("\x7f")
        self.assertEqual(client.terminal.screen()[:2], ["> " + "x" * 78, ""])
        client.incoming("hello")
        self.assertEqual(client.terminal.screen()[:3], ["hello", "> " + "x" * 78, ""])
        self.assertEqual(client.terminal.cursor, (2, 0))

    def test_wide_character_that_does_not_fit_moves_to_the_next_row(self) -> None:  # (g)
        client = Client()
        client.keys("a" + "漢" * 40)      # "> a" and 38 of them fill 79 cells
        self.assertEqual(client.terminal.screen()[:3], ["> a" + "漢" * 38, "漢漢", ""])
        self.assertEqual(client.terminal.cursor, (1, 4))
        client.keys("\x1b[D" * 2)        # onto the first 漢 of row 2
        self.assertEqual(client.terminal.cursor, (1, 0))
        client.keys("\x1b[D")
        self.assertEqual(client.terminal.cursor, (0, 77))
        client.incoming("news")
        self.assertEqual(client.terminal.screen()[:4], ["news", "> a" + "漢" * 38, "漢漢", ""])

    def test_cursor_in_the_middle_of_a_wrapped_line(self) -> None:  # (h)
        client = Client()
        client.keys(alphabet(150))
        client.keys("\x1b[D" * 80)       # index 70: column 72 of the first row
        self.assertEqual(client.terminal.cursor, (0, 72))
        client.keys("XYZ")
        text = "> " + alphabet(70) + "XYZ" + alphabet(150)[70:]
        self.assertEqual(client.terminal.screen()[:3], [text[:80], text[80:], ""])
        self.assertEqual(client.terminal.cursor, (0, 75))
        client.incoming("ping")
        self.assertEqual(client.terminal.screen()[:4], ["ping", text[:80], text[80:], ""])
        self.assertEqual(client.terminal.cursor, (1, 75))

    def test_pasted_lines_are_sent_and_the_rest_stays(self) -> None:
        client = Client()
        client.keys(PASTE_START + "one\ntwo\nthr" + PASTE_END + "ee")
        self.assertEqual(client.sent, ["one", "two"])
        self.assertEqual(client.terminal.screen()[:2], ["> three", ""])

    def test_redraw_after_fg(self) -> None:
        client = Client()
        client.keys("abc")
        client.terminal.write(client.view.clear())      # before stopping
        client.terminal.write("[1]+  Stopped\r\n$ fg\r\n")   # the shell's
        client.view.forget()
        client.draw()
        self.assertEqual(client.terminal.screen()[:4], ["[1]+  Stopped", "$ fg", "> abc", ""])
        self.assertEqual(client.terminal.cursor, (2, 5))

    def resized(self, client: Client, width: int, *, reflow: bool) -> None:
        """The window changes width (SIGWINCH), and the client redraws."""
        client.terminal.resize(width, reflow=reflow)
        client.width = width
        client.draw()

    def test_redraw_after_widening(self) -> None:
        for reflow in (False, True):
            with self.subTest(reflow=reflow):
                client = Client()
                client.incoming("hello")
                client.keys(alphabet(150))
                self.resized(client, 100, reflow=reflow)
                text = "> " + alphabet(150)
                self.assertEqual(client.terminal.screen()[:4], ["hello", text[:100], text[100:], ""])
                self.assertEqual(client.terminal.cursor, (2, 52))

    def test_redraw_after_narrowing_a_reflowing_terminal(self) -> None:
        client = Client()
        client.incoming("hello", "x" * 100)
        client.keys(alphabet(150))
        self.resized(client, 40, reflow=True)
        text = "> " + alphabet(150)
        self.assertEqual(client.terminal.screen()[:10],
                         ["hello", "x" * 40, "x" * 40, "x" * 20] + chunks(text, 40) + ["", ""])
        self.assertEqual(client.terminal.cursor, (7, 32))

    def test_narrowing_xterm_erases_rows_above_rather_than_leave_pieces(self) -> None:
        client = Client()
        client.incoming("one", "two", "three")
        client.keys(alphabet(150))
        self.resized(client, 40, reflow=False)
        text = "> " + alphabet(150)
        # The known cost of assuming reflow: "two" and "three" are gone.
        self.assertEqual(client.terminal.screen()[:6], ["one"] + chunks(text, 40) + [""])

    def test_layout_matches_the_terminal_s_own_wrapping(self) -> None:
        for text in ("> " + alphabet(200), "> a" + "漢" * 60, "> " + "e\u0301" * 100, "> " + "x" * 158):
            with self.subTest(text=text[:5]):
                terminal = FakeTerminal(80, 24)
                terminal.write(text)
                rows = layout(text, len(text), 80).rows
                self.assertEqual(terminal.screen()[:len(rows)], [row.rstrip(" ") for row in rows])

    def test_cursor_steps_over_an_emoji_zwj_sequence(self) -> None:
        client = Client()
        coder = TestLineEditor.CODER
        client.keys(f"a{coder}b\x1b[D\x1b[D")
        self.assertEqual(client.terminal.cursor, (0, 3))
        client.keys("Q")
        self.assertEqual(client.terminal.screen()[:2], [f"> aQ{coder}b", ""])
        self.assertEqual(client.terminal.cursor, (0, 4))
        client.keys("\x1b[C")      # over 👩‍💻, two cells as tmux draws it (see cell_widths)
        self.assertEqual(client.terminal.cursor, (0, 6))

    def test_own_bidi_override_is_shown_escaped_as_received_lines_are(self) -> None:
        client = Client()
        client.keys("RLO:\u202eabc")
        self.assertEqual(client.terminal.screen()[:2], ["> RLO:\\u202eabc", ""])
        self.assertEqual(client.terminal.cursor, (0, 15))
        client.keys("\x1b[D" * 3)    # before "a": right after the six characters of the escape
        self.assertEqual(client.terminal.cursor, (0, 12))
        client.keys("\x1b[D")        # before U+202E: before its escape
        self.assertEqual(client.terminal.cursor, (0, 6))
        client.keys("\r")
        self.assertEqual(client.sent, ["RLO:\u202eabc"])   # escaped on the screen only

    def test_bracketed_paste_sequences(self) -> None:
        self.assertEqual(BRACKETED_PASTE_ON, "\x1b[?2004h")
        self.assertEqual(PASTE_END, "\x1b[201~")



# 16. Client ################################################################

class TtyStream(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self):
        return True


class TestScreen(unittest.TestCase):
    """What reaches the user's terminal: escaped, stamped, styled."""

    def show(self, *lines, color=False, timestamps=False, name="bob"):
        out = io.StringIO()
        screen = chat.Screen(out, color=color, timestamps=timestamps)
        for line in lines:
            screen.show(line, name=name)
        return out.getvalue().splitlines()

    def test_control_characters_and_escape_sequences_are_shown_escaped(self):
        self.assertEqual(chat.printable("plain text, é ✓"), "plain text, é ✓")
        self.assertEqual(chat.printable("\x1b[2Jgone"), "\\x1b[2Jgone")
        self.assertEqual(chat.printable("a\nb\rc\x07\x9b\u202e"), "a\\nb\\rc\\x07\\x9b\\u202e")
        self.assertEqual(chat.printable("\x1b]0;title\x07"), "\\x1b]0;title\\x07")

    def test_plain_lines_when_not_coloured(self):
        self.assertEqual(self.show("[alice]: \x1b[31mred?", "* bob joined"),
                         ["[alice]: \\x1b[31mred?", "-!- bob joined"])

    def test_colours_mark_me_private_actions_notices_and_history(self):
        lines = ("[bob]: mine", "[alice → bob]: psst", "* notice", "[alice] waves",
                 "(history 2026-12-02T09:15:00Z) [x]: old", "[alice]: hi")
        self.assertEqual(self.show(*lines, color=True), [
            "\x1b[1;32m[bob]: mine\x1b[0m", "\x1b[35m[alice → bob]: psst\x1b[0m",
            "\x1b[33m-!- notice\x1b[0m", "\x1b[36m* alice waves\x1b[0m", "\x1b[2m[x]: old\x1b[0m",
            "[alice]: hi"])

    def test_live_lines_are_stamped_now_and_history_with_its_own_time_in_local_time(self):
        said = chat.calendar.timegm((2026, 12, 2, 9, 15, 0))
        local = chat.time.strftime("%H:%M", chat.time.localtime(said))
        now = chat.time.strftime("%H:%M", chat.time.localtime())
        shown = self.show("(history 2026-12-02T09:15:00Z) [x]: old", "[y]: new", timestamps=True)
        self.assertEqual(shown[0], f"{local} [x]: old")
        self.assertIn(shown[1], (f"{now} [y]: new",
                                 chat.time.strftime("%H:%M [y]: new")))   # the minute may turn

    def test_the_greeting_is_shown_without_the_limits_and_the_token(self):
        greeting = ("* You are connected as bob! There is 1 user here. Type /help for commands. "
                    "Limits: lines of up to 10 bytes; no rate limit. Your resume token is x "
                    "(keep it to yourself). 0 lines of history follow.")
        self.assertEqual(self.show(greeting), [
            "-!- You are connected as bob! There is 1 user here. Type /help for commands."])

    def test_zwj_emoji_are_shown_whole_and_bidi_overrides_escaped(self):
        self.assertEqual(self.show(f"[alice]: {TECHNOLOGIST} {RAINBOW_FLAG} {FAMILY}",
                                   "[alice]: abc\u202edef"),
                         [f"[alice]: {TECHNOLOGIST} {RAINBOW_FLAG} {FAMILY}", "[alice]: abc\\u202edef"])

    def test_colour_only_on_a_terminal_without_no_color(self):
        self.assertTrue(chat.wants_color(TtyStream(), {}))
        self.assertFalse(chat.wants_color(TtyStream(), {"NO_COLOR": "1"}))
        self.assertFalse(chat.wants_color(io.StringIO(), {}))

    def test_url_gets_the_name_and_the_token(self):
        self.assertEqual(chat.with_query("ws://h/chat", name="bob"), "ws://h/chat?name=bob")
        self.assertEqual(chat.with_query("ws://h/chat?name=x&a=1", name="b o", resume="t"),
                         "ws://h/chat?a=1&name=b+o&resume=t")
        self.assertEqual(chat.with_query("ws://h/chat", name=None), "ws://h/chat")


class TestMarks(unittest.TestCase):
    """Who wrote a line, told apart on screen: the server and the client (NOTICE_MARK) from
    a member's action (ACTION_MARK), in colour, with NO_COLOR and piped alike."""

    def shown(self, line, style=None, timestamps=False):
        out = io.StringIO()
        chat.Screen(out, color=False, timestamps=timestamps).show(line, style, name="alice")
        return out.getvalue().rstrip("\n")

    def test_an_action_can_never_pass_for_a_notice(self):
        # The issue's forgeries: members named the, 3, You, unknown and bob doing /me.
        for notice, forged in [("* the room is split: a, b", "[the] room is split: a, b"),
                               ("* 3 here: alice, bob, carol", "[3] here: alice, bob, carol"),
                               ("* You are connected as alice! Try /help.",
                                "[You] are connected as alice! Try /help."),
                               ("* unknown command /x — /help lists them", "[unknown] command /x"),
                               ("* bob left: see you", "[bob] left: see you")]:
            for timestamps in (False, True):
                with self.subTest(forged=forged, timestamps=timestamps):
                    head = r"\d\d:\d\d " if timestamps else ""
                    self.assertRegex(self.shown(notice, timestamps=timestamps), f"^{head}-!- ")
                    self.assertRegex(self.shown(forged, timestamps=timestamps), f"^{head}\\* ")
                    history = f"(history 2026-12-05T19:00:00Z) {forged}"
                    self.assertRegex(self.shown(history, timestamps=timestamps), f"^{head}\\* ")
        # Nothing else a member can write starts with the notice mark either.
        names = ["bob", "-!-", "*", "You", "3"]
        texts = ["-!- the room is split", "* bob left", "hi"]
        lines = [chat.LINES[kind].template.format(name=name, sender=name, recipient="alice",
                                                  text=text)
                 for kind in ("said", "action", "private") for name in names for text in texts]
        lines += [f"(history 2026-12-05T19:00:00Z) {line}" for line in lines]
        for line in lines:
            with self.subTest(line=line):
                self.assertFalse(self.shown(line).startswith(chat.NOTICE_MARK))

    def test_the_clients_own_lines_are_notices_too(self):
        self.assertEqual(self.shown("* reconnecting in 1 s", "notice"), "-!- reconnecting in 1 s")
        self.assertEqual(self.shown("cannot connect to ws://h/chat: refused", "error"),
                         "-!- cannot connect to ws://h/chat: refused")

    def test_the_greeting_fits_80_columns_with_the_time_and_the_mark(self):
        greeting = chat.GREETING.format(name="alice", count="are 12 users here", max_size=1,
                                        rate="no rate limit", token="T", delivered="0 lines",
                                        history="0 lines")
        shown = self.shown(greeting, timestamps=True)
        self.assertRegex(shown, r"^\d\d:\d\d -!- You are connected as alice! .*/help")
        self.assertLessEqual(display_width(shown), 80)


class TestWrapWords(unittest.TestCase):
    """wrap_words: a shown line broken between words at the terminal's width, not mid-word."""

    def test_a_word_longer_than_a_row_breaks_between_grapheme_clusters(self):
        line = "[bob]: " + "👩‍💻" * 30   # each 👩‍💻 is one cluster of three code points
        for width in (20, 21, 22):
            for row in chat.wrap_words(line, width):
                self.assertFalse(row.startswith("\u200d") or row.endswith("\u200d"), (width, row))
                self.assertFalse(row.lstrip().startswith("💻"), (width, row))

    def test_rows_break_between_words_and_are_indented_under_the_text(self):
        self.assertEqual(chat.wrap_words("12:00 -!- one two three four", 20),
                         ["12:00 -!- one two", "          three four"])
        self.assertEqual(chat.wrap_words("12:00 * bob waves at everyone", 20),
                         ["12:00 * bob waves at", "        everyone"])
        self.assertEqual(chat.wrap_words("12:00 [bob]: one two three", 20),
                         ["12:00 [bob]: one two", "      three"])

    def test_a_row_after_the_first_never_starts_at_the_left_edge(self):
        # Without timestamps a member's line could otherwise put "-!- " where a notice starts.
        rows = chat.wrap_words("[bob]: " + "x" * 10 + " -!- the room is split", 20)
        self.assertEqual(rows, ["[bob]: xxxxxxxxxx", "  -!- the room is", "  split"])

    def test_a_word_longer_than_a_row_breaks_where_the_row_ends(self):
        self.assertEqual(chat.wrap_words("[bob]: " + "x" * 30, 20),
                         ["[bob]: xxxxxxxxxxxxx", "  xxxxxxxxxxxxxxxxx"])

    def test_wide_characters_count_two_cells(self):
        rows = chat.wrap_words("[bob]: 漢字漢字 漢字漢字 漢字", 16)
        self.assertEqual(rows, ["[bob]: 漢字漢字", "  漢字漢字 漢字"])
        self.assertTrue(all(display_width(row) <= 16 for row in rows))

    def test_a_line_that_fits_is_left_alone(self):
        self.assertEqual(chat.wrap_words("12:00 [bob]:   spaced   out  ", 80),
                         ["12:00 [bob]:   spaced   out  "])


class TestHistoryBlock(unittest.TestCase):
    """The room's replay of its history, marked where it starts and ends: dimming alone
    is lost with NO_COLOR and in a pipe."""

    GREETING = ("* You are connected as bob! Your resume token is T (keep it to yourself). "
                "{} of history follow.")

    def setUp(self):
        self.out = io.StringIO()
        self.client = chat.ChatClient("ws://h/chat", chat.Screen(self.out, color=False, timestamps=False),
                                      chat.Keyboard())

    def receive(self, *lines):
        """Lines from the room as receive() hands them over: the first is the greeting."""
        start = len(self.out.getvalue())
        self.client.on_greeting(lines[0])
        for line in lines:
            self.client.on_line(line)
        return self.out.getvalue()[start:].splitlines()

    def test_history_is_marked_where_it_starts_and_where_it_ends(self):
        shown = self.receive(self.GREETING.format("2 lines"), "(history 2026-12-05T19:00:00Z) [x]: one",
                             "(history 2026-12-05T19:01:00Z) [y] waves", "[x]: now")
        self.assertEqual(shown[1:], ["-!- history: what was said here before you came",
                                     "[x]: one", "* y waves", "-!- end of history (2 lines)",
                                     "[x]: now"])

    def test_after_a_reconnect_only_what_was_missed_is_marked_as_history(self):
        old = "(history 2026-12-05T19:00:00Z) [x]: one"
        self.receive(self.GREETING.format("1 line"), old)
        self.client.reconnected = True
        shown = self.receive(self.GREETING.format("2 lines"), old,
                             "(history 2026-12-05T19:05:00Z) [x]: missed")
        self.assertEqual(shown[1:], ["-!- history: what was said while you were away",
                                     "[x]: missed", "-!- end of history (1 line)"])
        self.assertEqual(self.receive(self.GREETING.format("1 line"), old)[1:], [])   # all seen

    def test_a_block_the_greeting_did_not_count_ends_at_the_first_live_line(self):
        shown = self.receive("* welcome", "(history 2026-12-05T19:00:00Z) [x]: one", "* x left")
        self.assertEqual(shown, ["-!- welcome", "-!- history: what was said here before you came",
                                 "[x]: one", "-!- end of history (1 line)", "-!- x left"])


class TestCloseWords(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """describe_close: why the connection ended, in words, the code kept for experts."""

    def closed(self, code, reason="", *, by_us=False):
        close = chat.Close(code, reason)
        return chat.ConnectionClosed(None if by_us else close, close if by_us else None,
                                     tcp_closed=True)

    def test_close_codes_in_words(self):
        for closed, words in [
            (self.closed(1006), "the connection dropped (1006)"),
            (self.closed(1001), "the server is going away (restarting?) (1001)"),
            (self.closed(1013, "full"), "the room can't take you just now: full (1013)"),
            (self.closed(1008, "the name bob is taken"), "the name bob is taken (1008)"),
            (self.closed(1011), "the server hit an unexpected error (1011)"),
            (self.closed(4321, "kicked"), "the server closed the connection: kicked (4321)"),
        ]:
            with self.subTest(code=closed.code):
                self.assertEqual(chat.describe_close(closed), words)

    async def test_a_keepalive_timeout_is_not_an_internal_error(self):
        # The reason as Connection.keepalive_tick really writes it, not a copy of it.
        reader = asyncio.StreamReader()
        conn = chat.Connection(reader, FakeWriter(FakeTransport(reader)), is_client=True,
                               close_timeout=0.05)
        conn.keepalive_tick()   # a ping...
        conn.keepalive_tick()   # ... with no pong by the next one
        closed = await expect_closed(conn.recv())
        self.assertEqual(chat.describe_close(closed), "the connection went quiet "
                         f"(no answer to keepalive pings) ({closed.code})")
        # The server's close frame says the same when it is the one that gave up.
        theirs = self.closed(1011, closed.sent.reason)
        self.assertEqual(chat.describe_close(theirs),
                         "the connection went quiet (no answer to keepalive pings) (1011)")


class TestDelivery(unittest.TestCase):
    """The DeliveryLedger: which lines come back as receipts, and which are sent again after a reconnect."""

    def ledger(self, *sent):
        ledger = chat.DeliveryLedger()
        for line in sent:
            ledger.sent(line)
        return ledger

    def test_chat_lines_and_actions_come_back_commands_do_not(self):
        self.assertEqual(chat.echo_of("hi", "bob"), "[bob]: hi")
        self.assertEqual(chat.echo_of("//x", "bob"), "[bob]: /x")
        self.assertEqual(chat.echo_of("/me waves ", "bob"), "[bob] waves")
        for command in ("/who", "/msg alice hi", "/nick x", "/foo"):
            self.assertIsNone(chat.echo_of(command, "bob"))

    def test_only_lines_with_a_copy_to_come_are_kept_unconfirmed(self):
        ledger = chat.DeliveryLedger()
        self.assertEqual([ledger.sent(line) for line in ("hi", "/who", "/me waves", "/nick x")],
                         [True, False, True, False])
        self.assertEqual(list(ledger.unconfirmed), ["hi", "/me waves"])

    def test_a_copy_confirms_the_oldest_unconfirmed_line_only(self):
        ledger = self.ledger("one", "two")
        self.assertFalse(ledger.confirms("[bob]: two", "bob"))   # the room relays in order
        self.assertFalse(ledger.confirms("[alice]: one", "bob"))
        self.assertTrue(ledger.confirms("[bob]: one", "bob"))
        self.assertEqual((list(ledger.unconfirmed), ledger.delivered), (["two"], 1))

    def test_after_a_nick_the_copies_on_their_way_carry_the_new_name(self):
        ledger = self.ledger("hi", "/me waves")
        self.assertTrue(ledger.confirms("[robert]: hi", "robert"))
        self.assertTrue(ledger.confirms("[robert] waves", "robert"))

    def test_after_a_reconnect_to_the_same_room_only_what_it_lacks_is_sent_again(self):
        self.assertEqual(self.ledger("one", "two", "three").greeted(2, same_room=True), ["three"])
        self.assertEqual(self.ledger("ok", "ok").greeted(1, same_room=True), ["ok"])   # counted, not matched

    def test_confirmed_lines_a_room_lost_in_a_crash_are_sent_again_marked(self):
        ledger = self.ledger("B1", "B2", "B3", "B4", "B5")
        for line in ("B1", "B2", "B3", "B4"):
            self.assertTrue(ledger.confirms(f"[bob]: {line}", "bob"))
        # Another server of the room says it has 2: two confirmed lines never reached it.
        self.assertEqual(ledger.greeted(2, same_room=True),
                         ["(resent) B3", "(resent) B4", "(resent) B5"])
        self.assertEqual((ledger.delivered, ledger.lost), (2, 0))

    def test_confirmed_lines_lost_beyond_those_kept_are_counted(self):
        with unittest.mock.patch.object(chat, "MAX_KEPT_CONFIRMED", 1):
            ledger = self.ledger("B1", "B2", "B3")
        for line in ("B1", "B2", "B3"):
            ledger.confirms(f"[bob]: {line}", "bob")
        self.assertEqual(ledger.greeted(0, same_room=True), ["(resent) B3"])
        self.assertEqual(ledger.lost, 2)   # finish() reports them, and the exit status is 1

    def test_a_room_that_does_not_know_us_gets_them_all_marked_as_possible_repeats(self):
        self.assertEqual(self.ledger("one", "/me waves", "//etc").greeted(0, same_room=False),
                         ["(resent) one", "/me (resent) waves", "(resent) /etc"])

    def test_the_greeting_count_is_where_the_next_reconnect_counts_from(self):
        ledger = self.ledger("one", "two")
        # More than we ever sent: a count we can't reconcile, so both go again, marked.
        self.assertEqual(ledger.greeted(5, same_room=True), ["(resent) one", "(resent) two"])
        self.assertEqual((list(ledger.unconfirmed), ledger.delivered), ([], 5))
        for line in ("three", "four"):
            ledger.sent(line)
        self.assertEqual(ledger.greeted(6, same_room=True), ["four"])

    def test_a_reconnected_client_resends_what_the_room_never_got(self):
        keyboard = chat.Keyboard()
        client = chat.ChatClient("ws://h/chat", chat.Screen(io.StringIO(), color=False), keyboard)
        greeting = ("* You are connected as bob! Limits: lines of up to 99 bytes; no rate limit. "
                    "Your resume token is T1 (keep it to yourself). The room has {} of yours. "
                    "0 lines of history follow.")
        client.on_greeting(greeting.format("0 lines"))
        for line in ("ok", "ok", "three"):
            client.ledger.sent(line)
        client.on_line("[bob]: ok")
        self.assertEqual((client.ledger.delivered, len(client.ledger.unconfirmed)), (1, 2))
        # The connection drops; the same room (it gives T1 back) had relayed one more.
        client.on_greeting(greeting.format("2 lines"))
        self.assertEqual(list(keyboard.lines), ["three"])   # sent again as it was
        self.assertFalse(client.ledger.unconfirmed)
        # A server that restarted doesn't know T1: it can't say, so the line is marked.
        client.ledger.sent("four")
        client.on_greeting(greeting.format("0 lines").replace("T1", "T2"))
        self.assertEqual(list(keyboard.lines), ["(resent) four", "three"])

    def test_a_broken_greeting_or_history_stamp_is_shown_not_a_traceback(self):
        self.assertIsNone(chat.parse_greeting("* You are connected as x! Limits: lines of up to "
                                              "10 bytes; bursts of 3 lines, then 1.2.3 per second."))
        text, style = chat.display_line("(history 2026-13-45T99:00:00Z) [x]: odd", name="y",
                                        timestamps=False, now=0)
        self.assertEqual((text, style), ("[x]: odd", "history"))


class TestSender(unittest.TestCase):
    """The room's limits kept on our side: lines too long refused here, the rest paced."""

    def sender(self):
        out = io.StringIO()
        sender = chat.Sender(chat.Keyboard(), chat.Screen(out, color=False, timestamps=False),
                             chat.DeliveryLedger(), on_leaving=lambda: None)
        return sender, out

    def test_a_line_over_the_announced_size_is_refused_and_counted(self):
        sender, out = self.sender()
        sender.obey(chat.parse_greeting("* You are connected as bob! Limits: lines of up to "
                                        "10 bytes; bursts of 3 lines, then 2 per second."))
        self.assertEqual((sender.max_size, sender.bucket.burst, sender.bucket.rate), (10, 3, 2.0))
        self.assertIsNone(sender.check_typed("x" * 11))
        self.assertEqual(sender.check_typed("x" * 10), chat.ChatLine("x" * 10))
        self.assertEqual(sender.refused, 1)
        self.assertEqual(out.getvalue(), "-!- not sent: the line is 11 bytes; "
                                         "the room takes lines of up to 10\n")

    def test_a_server_that_announces_no_limits_gets_none_kept(self):
        sender, out = self.sender()
        sender.obey(None)
        self.assertEqual((sender.max_size, sender.bucket), (None, None))
        self.assertEqual(sender.check_typed("x" * 100_000), chat.ChatLine("x" * 100_000))


class TestReconnectBackoff(unittest.TestCase):
    """The waits between tries, and the page waiting the same."""

    def test_the_wait_doubles_up_to_the_maximum(self):
        waits = [chat.FIRST_BACKOFF]
        while waits[-1] < chat.MAX_BACKOFF:
            waits.append(chat.next_backoff(waits[-1]))
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30])
        self.assertEqual(chat.next_backoff(chat.MAX_BACKOFF), chat.MAX_BACKOFF)

    def test_a_spell_of_tries_waits_longer_each_time_until_the_room_greets_us(self):
        spell = chat.Reconnecting()
        waits = []
        for _ in range(7):
            spell.failed("the room can't take you just now")
            waits.append(spell.delay)
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(spell.status(), ["-!- reconnecting in 30 s (attempt 7: the room can't "
                                          "take you just now)"])
        self.assertRegex(spell.over(), r"^\* reconnected after 7 attempts \(0 s\)$")
        self.assertEqual((spell.status(), spell.over()), ([], None))   # no spell, nothing to say
        spell.failed("1001 (going away)")
        self.assertEqual(spell.delay, 1)   # a new spell starts from the first wait

    def test_the_page_is_given_the_same_numbers(self):
        given = json.loads(re.search(r"^       RECONNECT, .*\} = (\{.*\});$", chat.page(), re.M)[1])
        self.assertEqual((given["FIRST_BACKOFF"], given["MAX_BACKOFF"]),
                         (chat.FIRST_BACKOFF, chat.MAX_BACKOFF))
        self.assertNotRegex(chat.page(), r"@[A-Z_]+@")   # every placeholder filled in


class TestHistoryRequest(ChatTestCase):
    """?history=N: a newcomer asks for the latest N lines of history, or none; the greeting counts them."""

    async def room_that_said(self, *lines):
        await self.start_room()
        speaker = await self.join("speaker")
        for line in lines:
            await speaker.send(line)
            await self.expect(speaker, f"[speaker]: {line}")

    async def test_a_newcomer_gets_as_many_history_lines_as_it_asks_for(self):
        await self.room_that_said("one", "two", "three")
        for asked, expected in (("", ["one", "two", "three"]), ("history=2", ["two", "three"]),
                                ("history=9", ["one", "two", "three"])):
            with self.subTest(asked=asked):
                conn = await self.open(self.server, f"/chat?{asked}")
                greeting = chat.parse_greeting(await within(conn.recv()))
                self.assertEqual(greeting.history, len(expected))
                got = [await within(conn.recv()) for _ in expected]
                self.assertEqual([line.rpartition(": ")[2] for line in got], expected)

    async def test_history_0_sends_none_and_the_greeting_says_so(self):
        await self.room_that_said("before you came")
        conn = await self.open(self.server, "/chat?name=script&history=0")
        greeting = await within(conn.recv())
        self.assertIn(" 0 lines of history follow.", greeting)
        await conn.send("hello")
        await self.expect(conn, "[script]: hello")   # the first thing after the greeting

    async def test_a_history_that_is_not_a_number_is_a_400(self):
        await self.start_room()
        for value in ("all", "-1", "1.5", "٣"):   # the last: an Arabic-Indic 3
            with self.subTest(value=value), self.assertRaises(chat.InvalidStatus) as caught:
                await within(chat.connect(self.url + "?" + chat.urllib.parse.urlencode({"history": value})))
            self.assertEqual(caught.exception.status, 400)
            self.assertIn("is not a number of lines", caught.exception.reason)


class TestChatClient(ChatTestCase):
    """The terminal client against a real room, with piped stdin and captured stdout."""

    def client(self, url, stdin, name=None, err=None, **options):
        out = io.StringIO()
        screen = chat.Screen(out, color=False, timestamps=False, err=err)
        keyboard = chat.Keyboard()
        chat.read_lines_in_thread(keyboard, stdin, None)
        return chat.ChatClient(url, screen, keyboard, name=name, **options), out

    def pipe(self):
        """A stdin that stays open until the test closes its other end."""
        read_fd, write_fd = os.pipe()
        stdin, feed = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w", buffering=1)
        self.addCleanup(stdin.close)
        self.addCleanup(lambda: feed.closed or feed.close())
        return stdin, feed

    async def test_piped_input_is_sent_and_end_of_input_exits_cleanly(self):
        await self.start_room()
        alice = await self.join("alice")
        client, out = self.client(self.url, io.StringIO("hi\n\nsecond line\n"), "bot")
        self.assertEqual(await within(client.run()), 0)
        await self.expect(alice, "* bot joined", "[bot]: hi", "[bot]: second line", "* bot left")
        self.assertEqual(out.getvalue().splitlines()[2:], ["[bot]: hi", "[bot]: second line"])

    async def test_a_hundred_piped_lines_arrive_in_order_paced_to_the_room(self):
        # A client sending all 100 at once would have 90 held and be dropped;
        # one that keeps to the greeting's pace has at most one held by jitter.
        await self.start_room(room=chat.ChatRoom(rate=400, burst=10, max_held=5))
        alice = await self.join("alice")
        lines = "".join(f"{i}\n" for i in range(1, 101))
        client, out = self.client(self.url, io.StringIO(lines), "counter")
        status = await within(client.run())
        self.assertEqual(status, 0, out.getvalue())
        await self.expect(alice, "* counter joined", *[f"[counter]: {i}" for i in range(1, 101)],
                          "* counter left")

    async def test_piped_commands_get_their_replies_before_the_client_exits(self):
        await self.start_room()
        await self.join("watcher")
        client, out = self.client(self.url, io.StringIO("/who\n"), "asker")
        self.assertEqual(await within(client.run()), 0)
        self.assertIn("-!- 2 here: asker, watcher", out.getvalue().splitlines())

    async def test_piped_the_room_is_on_stdout_and_the_clients_own_words_on_stderr(self):
        await self.start_room()
        await self.join("watcher")
        err = io.StringIO()
        client, out = self.client(self.url, io.StringIO("/who\n/dance\n"), "asker", err=err)
        self.assertEqual(await within(client.run()), 1)   # /dance was refused
        self.assertEqual(out.getvalue().splitlines()[1:], ["-!- 2 here: asker, watcher"])
        self.assertTrue(out.getvalue().startswith("-!- You are connected as asker!"))
        self.assertEqual(err.getvalue().splitlines(), [f"-!- connecting to {self.url} …",
                                                       "-!- unknown command /dance — /help lists them"])

    async def test_a_line_refused_here_makes_the_exit_status_1_and_the_rest_is_sent(self):
        await self.start_room()
        alice = await self.join("alice")
        client, out = self.client(self.url, io.StringIO("/dance\nhello\n"), "bot")
        self.assertEqual(await within(client.run()), 1)
        await self.expect(alice, "* bot joined", "[bot]: hello", "* bot left")

    async def test_lines_after_quit_are_counted_and_the_exit_status_stays_0(self):
        await self.start_room()
        alice = await self.join("alice")
        err = io.StringIO()
        client, out = self.client(self.url, io.StringIO("hi\n/quit\none\ntwo\n"), "bot", err=err)
        self.assertEqual(await within(client.run()), 0)
        await self.expect(alice, "* bot joined", "[bot]: hi", "* bot left: bye")
        self.assertIn("-!- 2 lines after /quit not sent", err.getvalue().splitlines())

    async def test_a_piped_client_shows_no_history_unless_asked_and_exits_0(self):
        await self.start_room()
        speaker = await self.join("speaker")
        await speaker.send("said before")
        await self.expect(speaker, "[speaker]: said before")
        for extra, shown in (([], []), (["--history", "1"], ["[speaker]: said before"])):
            with self.subTest(extra=extra):
                done = await asyncio.create_subprocess_exec(
                    sys.executable, chat.__file__, "client", "--url", self.url, "--name", "asker",
                    "--no-timestamps", *extra, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                self.addCleanup(lambda: done.returncode is None and done.kill())
                out, err = await within(done.communicate(b"/who\n"))
                self.assertEqual(done.returncode, 0, err)
                lines = out.decode().splitlines()
                self.assertTrue(lines[0].startswith("-!- You are connected as asker! "), lines)
                self.assertEqual(lines[-1], "-!- 2 here: asker, speaker")
                self.assertEqual([line for line in lines if line.startswith("[")], shown)
                self.assertEqual(err.decode(), f"-!- connecting to {self.url} …\n")

    async def test_a_server_that_says_try_later_is_retried_with_backoff(self):
        await self.start_room(connects_per_minute=60)
        for n in range(chat.CONNECT_BURST):   # use up the burst: the next connection gets 503
            await self.join(f"m{n}")
        err = io.StringIO()
        client, out = self.client(self.url, io.StringIO("hello\n"), "late", err=err,
                                  first_backoff=0.05)
        self.assertEqual(await within(client.run()), 0, err.getvalue())
        said = err.getvalue().splitlines()   # piped: one line as the spell begins, one as it ends
        self.assertEqual(said[1], "-!- the room can't take you just now: too many new connections "
                                  "from 127.0.0.1 (at most 60 a minute); try again in 1 s (503); "
                                  "reconnecting in 0.05 s, then waiting longer each time, up to 30 s")
        self.assertRegex(said[2], r"^-!- reconnected after \d+ attempts \(\d+ s\)$")
        self.assertEqual(len(said), 3, said)
        self.assertIn("[late]: hello", out.getvalue())

    async def test_a_room_that_refuses_with_1013_is_retried_ever_more_slowly_and_quietly(self):
        for at_a_terminal in (False, True):
            with self.subTest(at_a_terminal=at_a_terminal):
                tries, said = await self.refused_four_times(at_a_terminal)
                waits = [later[0] - earlier[0] for earlier, later in zip(tries, tries[1:])]
                for wait, backoff in zip(waits, (0.05, 0.1, 0.2, 0.4)):
                    self.assertGreater(wait, backoff - 0.01, waits)   # not 0.05 each time
                self.assertEqual([status for _, status in tries], [
                    ["… hello"], *([f"-!- reconnecting now (attempt {n}: the room can't take you "
                                    "just now: the room is split; try again soon (1013))", "… hello"]
                                   for n in range(1, 5))])
                if at_a_terminal:   # the status line changed; no line was added per try
                    self.assertEqual(said[0], f"-!- connecting to {self.url} …")
                    self.assertRegex(said[1], r"^-!- reconnected after 4 attempts \(\d+ s\)$")
                else:
                    self.assertEqual(len([line for line in said if "reconnect" in line]), 2, said)
                self.assertFalse([line for line in said if "disconnected" in line], said)

    async def refused_four_times(self, at_a_terminal):
        """A client whose first four tries get 1013: when each came, the status it showed, and what it said."""
        tries = []

        class BusyRoom(chat.ChatRoom):
            async def enter(self, conn):
                tries.append((asyncio.get_running_loop().time(), client.waiting()))
                if len(tries) <= 4:
                    raise chat.TryLater("the room is split; try again soon")
                return await super().enter(conn)

        class Shown(list):   # a terminal, as far as the Screen can tell
            def show(self, text, color=None):
                self.append(text)

        await self.start_room(room=BusyRoom(rate=0))
        err = io.StringIO()
        stdin, feed = self.pipe()
        client, out = self.client(self.url, stdin, "late", err=err, first_backoff=0.05)
        if at_a_terminal:
            client.screen.terminal = Shown()
        feed.write("hello\n")
        await until(lambda: list(client.keyboard.lines) == ["hello"])
        running = asyncio.create_task(client.run())
        await until(lambda: not client.waiting() and len(tries) == 5)   # delivered
        feed.close()
        self.assertEqual(await within(running), 0)
        return tries, client.screen.terminal if at_a_terminal else err.getvalue().splitlines()

    async def test_unknown_commands_and_lines_over_the_limit_are_refused_before_sending(self):
        await self.start_room(room=chat.ChatRoom(rate=0, max_size=100))
        alice = await self.join("alice")
        client, out = self.client(self.url, io.StringIO("/foo\n" + "x" * 101 + "\nok\n"), "bot")
        self.assertEqual(await within(client.run()), 1)   # a line did not get through
        await self.expect(alice, "* bot joined", "[bot]: ok", "* bot left")
        self.assertIn("-!- unknown command /foo — /help lists them", out.getvalue())
        self.assertIn("-!- not sent: the line is 101 bytes; the room takes lines of up to 100",
                      out.getvalue())

    async def test_lines_sent_but_never_confirmed_may_have_arrived_and_the_exit_status_is_1(self):
        async def deaf_room(conn):   # greets, then reads everything and relays nothing
            await conn.send("* You are connected as bot! Your resume token is T (keep it). "
                            "0 lines of history follow.")
            async for _ in conn:
                pass

        server = await self.start(deaf_room)
        client, out = self.client(f"ws://127.0.0.1:{server.port}/chat", io.StringIO("hello\n"),
                                  "bot", confirm_timeout=0.2)
        self.assertEqual(await within(client.run()), 1)
        self.assertIn("not confirmed (it may have arrived): hello", out.getvalue())
        self.assertNotIn("not sent", out.getvalue())   # it was: the room may relay it yet

    async def test_ctrl_c_lists_lines_sent_as_not_confirmed_and_the_rest_as_not_sent(self):
        received = []

        async def slow_deaf_room(conn):   # one line, then one a minute; relays nothing
            await conn.send("* You are connected as bot! Limits: lines of up to 99 bytes; bursts of "
                            "1 lines, then 0.01 per second. Your resume token is T (keep it). "
                            "0 lines of history follow.")
            async for line in conn:
                received.append(line)

        server = await self.start(slow_deaf_room)
        stdin, feed = self.pipe()
        client, out = self.client(f"ws://127.0.0.1:{server.port}/chat", stdin, "bot")
        running = asyncio.create_task(client.run())
        feed.write("one\ntwo\n")   # "two" waits for the room's pace
        await until(lambda: received == ["one"] and list(client.keyboard.lines) == [])
        client.keyboard.interrupt()   # Ctrl-C: at once, not when the pace allows "two"
        self.assertEqual(await within(running), 1)
        shown = out.getvalue().splitlines()
        self.assertIn("-!- not confirmed (it may have arrived): one", shown)   # it did
        self.assertIn("-!- not sent: two", shown)
        self.assertEqual(received, ["one"])

    async def test_ctrl_c_leaves_within_a_second_when_the_server_is_frozen(self):
        async def frozen_room(conn):   # greets, then reads nothing: a close is never answered
            await conn.send("* You are connected as bot! 0 lines of history follow.")
            await asyncio.Event().wait()

        server = await self.start(frozen_room, close_timeout=0.5)
        stdin, feed = self.pipe()
        client, out = self.client(f"ws://127.0.0.1:{server.port}/chat", stdin, "bot")
        running = asyncio.create_task(client.run())
        await until(lambda: "You are connected" in out.getvalue())
        client.keyboard.interrupt()
        started = asyncio.get_running_loop().time()
        self.assertEqual(await within(running), 0)
        self.assertLess(asyncio.get_running_loop().time() - started, 2.5)   # not the 5 s close timeout

    async def test_quit_command_exits_0_and_sends_nothing_after_it(self):
        await self.start_room()
        alice = await self.join("alice")
        client, out = self.client(self.url, io.StringIO("/quit see you\nnot sent\n"), "bot")
        self.assertEqual(await within(client.run()), 0)
        # Neither "/quit" nor the line after it reached the room: bot came and went.
        await self.expect(alice, "* bot joined", "* bot left: see you")
        self.assertIn("1 line after /quit not sent", out.getvalue())

    async def test_a_line_typed_while_the_connection_closes_is_kept_not_retried(self):
        class ClosingConnection:
            """Greets, then is closing: send() fails; the peer's close frame comes 50 ms later."""
            sends = 0
            greeted = False
            state = chat.State.OPEN   # as far as the client can tell before it sends

            async def send(self, line):
                self.sends += 1
                asyncio.get_running_loop().call_later(0.05, peer_closed.set)
                raise chat.ConnectionClosed(None, chat.Close(1001), tcp_closed=False)

            async def recv(self):
                if not self.greeted:
                    self.greeted = True
                    return "* You are connected as bob! 0 lines of history follow."
                await peer_closed.wait()
                raise chat.ConnectionClosed(chat.Close(1001, "bye"), chat.Close(1001), tcp_closed=True)

            def keepalive_tick(self):
                pass

        peer_closed = asyncio.Event()
        conn = ClosingConnection()
        stdin, feed = self.pipe()
        client, out = self.client("ws://127.0.0.1:9/chat", stdin)   # session() doesn't connect
        feed.write("typed while closing\n")
        closed = await within(client.session(conn))
        self.assertEqual(closed.code, CloseCode.GOING_AWAY)
        self.assertEqual(conn.sends, 1)   # tried once, not in a loop until the close arrived
        self.assertEqual(client.waiting(), ["… typed while closing"])   # kept for the next one

    async def test_cannot_connect_says_so_and_exits_1(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()   # nothing listens there now
        client, out = self.client(f"ws://127.0.0.1:{port}/chat", io.StringIO(""))
        self.assertEqual(await within(client.run()), 1)
        self.assertEqual(out.getvalue(), f"-!- connecting to ws://127.0.0.1:{port}/chat …\n"
                                         f"-!- cannot connect to ws://127.0.0.1:{port}/chat: "
                                         "connection refused — is the server running?\n")

    async def silent_listener(self):
        """A TCP server that accepts and never answers; returns its port and an 'accepted' event."""
        accepted = asyncio.Event()
        held = []

        def hold(reader, writer):
            held.append(writer)
            accepted.set()
        listener = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.addAsyncCleanup(listener.wait_closed)
        self.addCleanup(listener.close)
        self.addCleanup(lambda: [writer.close() for writer in held])
        return listener.sockets[0].getsockname()[1], accepted

    async def test_ctrl_c_while_connecting_to_a_silent_server_quits_at_once(self):
        port, accepted = await self.silent_listener()
        client = await asyncio.create_subprocess_exec(
            sys.executable, chat.__file__, "client", "--url", f"ws://127.0.0.1:{port}/chat",
            "--no-timestamps", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)   # piped: the client's own words on stderr
        self.addCleanup(lambda: client.returncode is None and client.kill())
        self.assertEqual(await within(client.stderr.readline()),
                         f"-!- connecting to ws://127.0.0.1:{port}/chat …\n".encode())
        await within(accepted.wait())
        client.send_signal(signal.SIGINT)
        # Well within connect()'s own 10 s timeout: Ctrl-C itself ended it.
        self.assertEqual(await within(client.wait(), chat.HANDSHAKE_TIMEOUT / 4), 0)
        self.assertEqual(await within(client.stdout.read()), b"")   # no prompt, no error

    async def test_wss_to_a_plain_server_says_so_in_words(self):
        await self.start_room()
        client, out = self.client(f"wss://127.0.0.1:{self.server.port}/chat", io.StringIO(""),
                                  ssl_context=ssl.create_default_context())
        self.assertEqual(await within(client.run()), 1)
        self.assertIn(f"cannot connect to wss://127.0.0.1:{self.server.port}/chat: the server at "
                      f"wss://127.0.0.1:{self.server.port} did not answer TLS — is it ws://?\n",
                      out.getvalue())

    async def test_refused_name_shows_the_servers_reason_and_exits_1(self):
        await self.start_room()
        await self.join("bob")
        stdin, feed = self.pipe()
        client, out = self.client(self.url, stdin, "bob")
        self.assertEqual(await within(client.run()), 1)
        self.assertIn("disconnected: the name bob is taken; pick another (1008)", out.getvalue())

    async def test_a_refused_name_at_a_terminal_lets_the_user_pick_another(self):
        await self.start_room()
        watcher = await self.join("bob")
        stdin, feed = self.pipe()
        client, out = self.client(self.url, stdin, "BOB", interactive=True)
        running = asyncio.create_task(client.run())
        await until(lambda: "type another name" in out.getvalue())
        feed.write("robert\n")
        await self.expect(watcher, "* robert joined")
        feed.close()
        self.assertEqual(await within(running), 0)

    async def test_no_reconnect_exits_1_when_the_server_goes_away(self):
        await self.start_room()
        stdin, feed = self.pipe()
        client, out = self.client(self.url, stdin, "bob", reconnect=False)
        watcher = await self.join("watcher")
        running = asyncio.create_task(client.run())
        await self.expect(watcher, "* bob joined")
        watching = asyncio.create_task(expect_closed(watcher, CloseCode.GOING_AWAY))
        await within(self.server.close())
        await within(watching)
        self.assertEqual(await within(running), 1)
        self.assertIn("disconnected: the server is going away (restarting?): server shutting down (1001)",
                      out.getvalue())

    async def test_a_guest_keeps_its_name_and_its_lines_across_a_server_restart(self):
        first = await self.start_room()
        port = first.port
        watcher = await self.join("watcher")
        stdin, feed = self.pipe()
        client, out = self.client(self.url, stdin, first_backoff=0.05)   # no --name: a guest
        running = asyncio.create_task(client.run())
        await self.expect(watcher, "* user1 joined")
        watching = asyncio.create_task(expect_closed(watcher, CloseCode.GOING_AWAY))
        await within(first.close())
        await within(watching)
        feed.write("typed while the server was down\n")   # waits for the next connection
        # The same port, a new server (with a guest counter of its own): the
        # client comes back by itself, with its name, and delivers the line.
        room = chat.ChatRoom(rate=0)
        second = await chat.serve(room.handle, "127.0.0.1", port, process_request=room.process_request,
                                  keepalive_interval=None)
        self.addAsyncCleanup(second.close)
        watcher = await within(chat.connect(f"ws://127.0.0.1:{port}/chat?name=watcher"))
        self.addAsyncCleanup(watcher.close)
        lines = []
        while not lines or not lines[-1].startswith("[user1]"):
            lines.append(await within(watcher.recv()))
        self.assertIn("* user1 joined", lines)
        self.assertEqual(lines[-1], "[user1]: typed while the server was down")   # never sent before
        feed.close()   # end of input: the client closes and exits 0
        self.assertEqual(await within(running), 0)
        self.assertIn("-!- disconnected: the server is going away (restarting?): server shutting "
                      "down (1001)\n-!- reconnecting in 0.05 s", out.getvalue())   # the why said once


@unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal (POSIX)")
class TestTerminal(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """The raw-mode terminal on a real pseudo-terminal, its output drawn on a fake VT100."""

    async def asyncSetUp(self):
        import termios
        self.termios = termios
        self.master, self.slave = os.openpty()
        self.addCleanup(os.close, self.master)
        self.addCleanup(os.close, self.slave)
        self.set_size(80, 24)
        self.keyboard = chat.Keyboard()
        self.out = io.StringIO()
        self.waiting = []
        self.terminal = chat.Terminal(self.keyboard, self.slave, self.out, lambda: self.waiting)
        self.terminal.start()

        async def stop():
            self.terminal.stop()
        self.addAsyncCleanup(stop)

    def set_size(self, width, height):
        import fcntl
        fcntl.ioctl(self.slave, self.termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def type(self, keys: bytes, until_buffer: str):
        os.write(self.master, keys)
        await until(lambda: self.terminal.editor.buffer == until_buffer)

    def drawn(self, width=80, height=24, since=0):
        screen = FakeTerminal(width, height)
        screen.write(self.out.getvalue()[since:])
        return screen

    async def test_typing_and_a_long_incoming_line_at_80_columns(self):
        await self.type(b"half way through typing", "half way through typing")
        self.terminal.show("[bob]: " + "x" * 233)   # 240 characters: a word longer than a row
        screen = self.drawn()
        self.assertEqual(screen.screen()[:5], ["[bob]: " + "x" * 73, "  " + "x" * 78, "  " + "x" * 78,
                                               "  xxxx", "> half way through typing"])
        self.assertEqual(screen.cursor, (4, 25))

    async def test_waiting_lines_are_drawn_between_the_room_and_the_input(self):
        self.waiting = ["… sent, not yet confirmed"]
        await self.type(b"next", "next")
        self.assertEqual(self.drawn().screen()[:2], ["… sent, not yet confirmed", "> next"])

    async def test_enter_puts_the_line_in_the_keyboard_and_leaves_no_fragment(self):
        await self.type(b"y" * 150, "y" * 150)
        await self.type(b"\r", "")
        self.assertEqual(list(self.keyboard.lines), ["y" * 150])
        self.assertEqual(self.drawn().screen()[:3], [">", "", ""])

    async def test_a_resize_repaints_the_latest_lines_and_the_input(self):
        for i in range(30):
            self.terminal.show(f"line {i}")
        await self.type("漢字 and 👩‍💻".encode(), "漢字 and 👩‍💻")
        since = len(self.out.getvalue())
        self.set_size(40, 10)
        self.terminal.repaint()   # what SIGWINCH does
        rows = self.drawn(40, 10, since).screen()
        self.assertEqual(rows, [f"line {i}" for i in range(21, 30)] + ["> 漢字 and 👩‍💻"])

    async def test_a_resize_wraps_the_latest_lines_again_between_words(self):
        self.terminal.show("[bob]: " + " ".join(["word"] * 30))   # 156 characters
        since = len(self.out.getvalue())
        self.set_size(40, 10)
        self.terminal.repaint()   # what SIGWINCH does
        rows = self.drawn(40, 10, since).screen()
        self.assertEqual(rows[0], "[bob]: word word word word word word")
        self.assertTrue(all(row.endswith("word") for row in rows[:5]), rows)

    async def test_the_screen_wraps_lines_between_words_at_the_terminal_s_width(self):
        line = "* " + " ".join(["word"] * 30)   # 150 characters: "-!- word word ..."
        screen = chat.Screen(io.StringIO(), color=True, timestamps=False)
        screen.terminal = self.terminal
        screen.show(line)
        self.assertEqual(self.drawn().screen()[:3], ["-!- " + " ".join(["word"] * 15),
                                                     "    " + " ".join(["word"] * 15), ">"])
        self.set_size(40, 24)
        since = len(self.out.getvalue())
        screen.show(line)
        self.assertEqual(self.drawn(40, 24, since).screen()[:2], ["-!- " + " ".join(["word"] * 7),
                                                                  "    " + " ".join(["word"] * 7)])
        piped = chat.Screen(io.StringIO(), color=False, timestamps=False)
        piped.show(line)
        self.assertEqual(piped.out.getvalue(), "-!- " + line[2:] + "\n")   # a pipe: not wrapped

    async def test_a_name_is_asked_at_a_prompt_of_its_own_and_chat_typed_there_is_kept(self):
        out = io.StringIO()
        screen = chat.Screen(out, color=False, timestamps=False)
        screen.terminal = self.terminal
        client = chat.ChatClient("ws://127.0.0.1:9/chat", screen, self.keyboard, interactive=True)
        asking = asyncio.create_task(client.ask_for_a_name())
        self.addCleanup(asking.cancel)
        await until(lambda: self.drawn().screen()[1] == "name>")
        await self.type(b"hello everyone, sorry I'm late\r", "")
        await until(lambda: "not sent" in self.drawn().screen()[1])
        self.assertEqual(self.drawn().screen()[:3], [
            "-!- type another name after name> and press Enter (Ctrl-C leaves)",
            "-!- not sent: a chat line? A name has no spaces (Up brings it back)", "name>"])
        self.assertFalse(asking.done())
        await self.type(b"\x1b[A", "hello everyone, sorry I'm late")   # Up
        await self.type(b"\x15robert\r", "")                          # Ctrl-U, a name, Enter
        self.assertTrue(await within(asking))
        self.assertEqual((client.name, list(self.keyboard.lines)), ("robert", []))
        self.assertEqual(self.drawn().screen()[2], ">")   # the chat's prompt again

    async def test_ctrl_c_and_ctrl_d_reach_the_keyboard_as_keys(self):
        os.write(self.master, b"\x04")   # Ctrl-D on an empty line: the end of input
        await until(lambda: self.keyboard.ended)
        os.write(self.master, b"\x03")
        await until(lambda: self.keyboard.interrupted)


# 18. Command line ##########################################################

class TestCommandLine(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """What a person typing commands sees."""

    def test_help_explains_every_command(self):
        for argv in (["--help"], ["server", "--help"], ["client", "--help"], ["echo", "--help"]):
            with self.subTest(argv=argv), self.assertRaises(SystemExit) as caught:
                with unittest.mock.patch("sys.stdout", io.StringIO()) as out:
                    chat.main(argv)
            self.assertEqual(caught.exception.code, 0)
            self.assertIn("usage: chat.py", out.getvalue())

    async def test_port_in_use_is_one_sentence_and_status_1(self):
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        self.addAsyncCleanup(blocker.wait_closed)
        self.addCleanup(blocker.close)
        port = blocker.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        with unittest.mock.patch("sys.stderr", io.StringIO()) as err:
            status = await loop.run_in_executor(None, chat.main, ["echo", "--port", str(port)])
        self.assertEqual(status, 1)
        self.assertIn("address already in use", err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())

    def run_main(self, argv):
        """chat.main(argv) with stderr captured: (exit status, what it printed)."""
        with unittest.mock.patch("sys.stderr", io.StringIO()) as err:
            try:
                status = chat.main(argv)
            except SystemExit as exit:
                status = exit.code
        return status, err.getvalue()

    def test_bad_values_are_usage_errors_in_one_sentence_with_status_2(self):
        for argv, message in [
            (["server", "--port", "70000"], "argument --port: 70000 is out of range: "
                                            "give a number from 0 to 65535"),
            (["server", "--port", "-1"], "argument --port: -1 is out of range: "
                                         "give a number from 0 to 65535"),
            (["echo", "--port", "echo"], "argument --port: 'echo' is not a whole number"),
            (["server", "--rate", "-1"], "argument --rate: '-1' is not a rate: "
                                         "give a number of messages per second, 0 or more"),
            (["server", "--rate", "nan"], "argument --rate: 'nan' is not a rate: "
                                          "give a number of messages per second, 0 or more"),
            (["server", "--burst", "0"], "argument --burst: 0 is out of range: give a number 1 or more"),
            (["server", "--announce-limit", "-1"], "argument --announce-limit: -1 is out of range: "
                                                   "give a number 0 or more"),
            (["server", "--certfile", "/nonexistent.pem"],
             "argument --certfile: cannot read /nonexistent.pem: no such file"),
            (["client", "--url", "http://example.com/"],
             "argument --url: 'http://example.com/' is not a ws:// or wss:// URI"),
        ]:
            with self.subTest(argv=argv):
                status, err = self.run_main(argv)
                self.assertEqual(status, 2)
                self.assertEqual(err.splitlines()[-1], f"chat.py {argv[0]}: error: {message}")
                self.assertNotIn("Traceback", err)

    def test_client_takes_host_and_port_or_a_whole_url(self):
        parser = chat.build_parser()
        for argv, url in [
            ([], "ws://127.0.0.1:8080/chat"),
            (["--port", "18001"], "ws://127.0.0.1:18001/chat"),
            (["--host", "chat.example", "--port", "80"], "ws://chat.example:80/chat"),
            (["--host", "::1"], "ws://[::1]:8080/chat"),
            (["--host", "[::1]"], "ws://[::1]:8080/chat"),
            (["--host", "chat.example", "--insecure"], "wss://chat.example:8080/chat"),
            (["--url", "wss://chat.example/chat"], "wss://chat.example/chat"),
        ]:
            with self.subTest(argv=argv):
                self.assertEqual(chat.client_url(parser, parser.parse_args(["client", *argv])), url)
        status, err = self.run_main(["client", "--url", "ws://h/chat", "--port", "18001"])
        self.assertEqual(status, 2)
        self.assertEqual(err.splitlines()[-1], "chat.py: error: give --url, or --host and --port, "
                                               "not both: --url is the whole address")
        status, err = self.run_main(["client", "--host", "localhost:18001"])   # was a traceback
        self.assertEqual((status, err.splitlines()[-1]), (2, "chat.py client: error: argument --host: "
                         "'localhost:18001' is not a host name or address (a port goes in --port)"))

    async def test_piped_bytes_that_are_not_utf8_are_sent_as_replacement_characters(self):
        keyboard = chat.Keyboard()
        chat.read_lines_in_thread(keyboard, io.StringIO("ok\udcff\udcfe bytes\n"), None)   # surrogateescape
        await within(keyboard.wait_until(lambda: keyboard.ended))
        self.assertEqual(list(keyboard.lines), ["ok\ufffd\ufffd bytes"])   # was a traceback when sent

    def test_verbose_before_or_after_the_command(self):
        parser = chat.build_parser()
        for command in ("server", "client", "echo"):
            for argv, verbose in [([command], False), (["-v", command], True),
                                  ([command, "-v"], True), ([command, "--verbose"], True)]:
                with self.subTest(argv=argv):
                    self.assertIs(parser.parse_args(argv).verbose, verbose)

    async def test_start_up_failures_are_one_sentence_with_status_1(self):
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as not_pem:
            not_pem.write("not a certificate\n")
            not_pem.flush()
            no_such_host = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            for argv, message in [
                (["server", "--host", "nosuchhost.invalid"],
                 "cannot listen on nosuchhost.invalid:8080: no such host"),
                (["server", "--port", "0", "--certfile", not_pem.name],
                 f"cannot use --certfile {not_pem.name}: [SSL] PEM lib"),
            ]:
                with self.subTest(argv=argv), unittest.mock.patch("socket.getaddrinfo",
                                                                  side_effect=no_such_host):
                    loop = asyncio.get_running_loop()
                    status, err = await within(loop.run_in_executor(None, self.run_main, argv))
                    self.assertEqual(status, 1)
                    self.assertTrue(err.startswith(f"chat.py: {message}"), err)
                    self.assertEqual(len(err.splitlines()), 1, err)

    def test_empty_host_means_all_interfaces_and_says_so(self):
        self.assertEqual(chat.reachable_at("", 8093),
                         (f"{socket.gethostname()}:8093", " on all interfaces"))
        self.assertEqual(chat.reachable_at("::1", 8093), ("[::1]:8093", ""))

    def test_python_before_3_10_gets_one_line(self):
        for version in ((3, 7, 16, "final", 0), (3, 9, 18, "final", 0)):
            with self.subTest(version=version), self.assertRaises(SystemExit) as caught:
                chat.check_python_version(version)
            self.assertEqual(caught.exception.code, "chat.py needs Python 3.10 or later; "
                                                    f"this is Python 3.{version[1]}")
        chat.check_python_version((3, 10, 0, "final", 0))   # no exit

    def test_python_3_7_to_3_9_really_stop_at_the_check(self):
        # The fake version above can't show that the file gets as far as the
        # check on an old Python; the old interpreters can, where pyenv has them.
        pythons = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[789].*/bin/python")))
        if not pythons:
            self.skipTest("no Python 3.7-3.9 here")
        for python in pythons:
            with self.subTest(python=python):
                done = subprocess.run([python, chat.__file__, "server"], capture_output=True,
                                      text=True, timeout=TIMEOUT)
                self.assertEqual(done.returncode, 1)
                self.assertRegex(done.stderr, r"\Achat.py needs Python 3.10 or later; "
                                              r"this is Python 3\.[789]\n\Z")

    async def test_verbose_trace_shows_the_handshake_and_frame_headers(self):
        logged = LogCatcher(logging.DEBUG)
        self.addCleanup(logged.remove)
        server = await chat.serve(chat.echo, "127.0.0.1", 0, keepalive_interval=None)
        self.addAsyncCleanup(server.close)
        conn = await within(chat.connect(f"ws://127.0.0.1:{server.port}/"))
        self.addAsyncCleanup(conn.close)
        await conn.send("Hello")
        await within(conn.recv())
        lines = []   # the client logs too: read until the server's echo shows up
        while not any(">>> TEXT fin=1 len=5 | 81 05" in line for line in lines):
            lines.append((await within(logged.next())).getMessage())
        text = "\n".join(lines)
        self.assertIn("<<< GET / HTTP/1.1", text)
        self.assertIn(">>> HTTP/1.1 101 Switching Protocols", text)
        self.assertRegex(text, r"<<< TEXT fin=1 len=5 masked \| 81 85( [0-9a-f]{2}){4}")
        self.assertIn(">>> TEXT fin=1 len=5 | 81 05", text)


# The web page, in a real browser ############################################

def browser_or_skip() -> str:
    """A Chromium to drive; skip without one, except in CI, where it must be there."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        program = shutil.which(name)
        if program is not None:
            return program
    if os.environ.get("CI") == "true":
        raise AssertionError("CI=true but chromium is missing: .ci/run installs it")
    raise unittest.SkipTest("needs Chromium (Debian: apt-get install chromium)")


class Chromium:
    """A headless Chromium of our own: its DevTools on a port it picks, a throwaway profile."""

    def __init__(self, program: str):
        self.profile = tempfile.mkdtemp(prefix="chat-page-")
        self.process = subprocess.Popen(
            [program, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = self._devtools_port()

    def _devtools_port(self) -> int:
        """The port Chromium chose, from the DevToolsActivePort file it writes (bounded wait)."""
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                with open(path) as file:
                    lines = file.read().splitlines()
                if len(lines) == 2:   # the port, then the browser's path: written whole
                    return int(lines[0])
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("Chromium did not start")
            time.sleep(0.05)   # polling for the file, not a guess at how long it takes

    def _http(self, path: str, method: str = "GET") -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/{path}", method=method)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.read()

    def new_tab(self) -> dict:
        """A blank tab: its "id" and its "webSocketDebuggerUrl"."""
        return json.loads(self._http("new?about:blank", method="PUT"))

    def close_tab(self, tab_id: str):
        self._http(f"close/{tab_id}")

    def stop(self):
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


#: Run before the page's own script: timers run 20 times faster (backoffs of
#: 50 ms, not 1 s) and the delays asked for are kept in window.delays.
FASTER_TIMERS = """
window.delays = [];
const realSetTimeout = window.setTimeout;
window.setTimeout = (callback, ms, ...args) => {
  window.delays.push(ms);
  return realSetTimeout(callback, ms / 20, ...args);
};"""

#: The log's lines, without their times, and their styles.
LOG_LINES = "[...document.querySelectorAll('#log li')].map((li) => [li.childNodes[1].textContent, li.className])"

#: What a person would see go wrong: boxes overlapping or spilling out of
#: their bar, a horizontal scroll, the newest line out of view, the focus
#: on something without a label.
LAYOUT = """new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done((() => {
  const box = (element) => element.getBoundingClientRect();
  const shown = ["header", "#log", "#waiting", "#join", "#send"].map((s) => document.querySelector(s))
    .filter((element) => element.getClientRects().length && box(element).height > 0);
  const problems = [];
  shown.forEach((element, i) => {
    if (i && box(element).top < box(shown[i - 1]).bottom - 0.5) problems.push(element.id + " overlaps");
  });
  if (box(shown[shown.length - 1]).bottom > innerHeight + 0.5) problems.push("below the window");
  for (const bar of document.querySelectorAll("header, form")) {
    for (const child of bar.children) {
      const inner = box(child), outer = box(bar);
      if (child.getClientRects().length && (inner.left < outer.left || inner.right > outer.right + 0.5
          || inner.top < outer.top || inner.bottom > outer.bottom + 0.5)) problems.push(child.tagName + " spills");
    }
  }
  if (document.documentElement.scrollWidth > innerWidth) problems.push("horizontal scroll");
  const log = document.getElementById("log"), newest = log.lastElementChild;
  if (newest && (box(newest).top < box(log).top - 0.5 || box(newest).bottom > box(log).bottom + 0.5))
    problems.push("newest line out of view");
  const focused = document.activeElement;
  if (!focused.labels || !focused.labels.length || !focused.labels[0].textContent.trim())
    problems.push("focus on " + focused.tagName + " without a label");
  return problems;
})()))))"""   # as drawn: two frames on

#: Every text's contrast with the background behind it, WCAG 2's formula:
#: [ratio, colour, background, the text], for each element with text of its
#: own, each input's placeholder, and a sample line in every style.
CONTRASTS = """(() => {
  const log = document.getElementById("log"), waiting = document.getElementById("waiting");
  const samples = ["", "notice", "action", "private", "mine", "history", "error"].map((style) => {
    const item = document.createElement("li"), time = document.createElement("span");
    time.className = "time"; time.textContent = "12:00"; item.className = style;
    item.append(time, "a sample " + style + " line"); log.appendChild(item); return item;
  });
  samples.push(waiting.appendChild(Object.assign(document.createElement("li"), {textContent: "… on its way"})));
  const rgb = (colour) => colour.match(/[\\d.]+/g).map(Number);
  const luminance = (colour) => rgb(colour).slice(0, 3).map((c) => c / 255)
    .map((c) => c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4)
    .reduce((sum, c, i) => sum + c * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (element) => {
    for (; element; element = element.parentElement) {
      const colour = getComputedStyle(element).backgroundColor;
      if (rgb(colour)[3] !== 0) return colour;
    }
    return "rgb(255, 255, 255)";
  };
  const ratio = (a, b) => { const [l1, l2] = [luminance(a), luminance(b)].sort((x, y) => y - x); return (l1 + 0.05) / (l2 + 0.05); };
  const found = [];
  for (const element of document.body.querySelectorAll("*")) {
    if (!element.getClientRects().length || element.tagName === "SCRIPT") continue;
    const own = [...element.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join("").trim();
    const texts = [[own, getComputedStyle(element).color]];
    if (element.placeholder) texts.push([element.placeholder, getComputedStyle(element, "::placeholder").color]);
    for (const [text, colour] of texts)
      if (text) found.push([ratio(colour, background(element)), colour, background(element), text]);
  }
  samples.forEach((sample) => sample.remove());
  return found;
})()"""


class Tab:
    """One browser tab, driven over the DevTools protocol with chat.py's own client."""

    def __init__(self, conn: chat.Connection):
        self.conn, self.calls = conn, 0

    async def call(self, method: str, **params) -> dict:
        self.calls += 1
        await self.conn.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:   # events may come first
            reply = json.loads(await within(self.conn.recv()))
            if reply.get("id") == self.calls:
                break
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, seconds: float = TIMEOUT):
        """The expression's value once it is truthy in the page; fail after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still not true after {seconds} s: {expression}")
            await asyncio.sleep(0.02)   # between polls: the browser runs meanwhile

    async def type(self, text: str):
        await self.call("Input.insertText", text=text)

    async def press(self, key: str):
        """Enter, ArrowUp or ArrowDown, as the keyboard sends them."""
        code = {"Enter": 13, "ArrowUp": 38, "ArrowDown": 40}[key]
        text = {"text": "\r"} if key == "Enter" else {}
        await self.call("Input.dispatchKeyEvent", type="keyDown", key=key, code=key,
                        windowsVirtualKeyCode=code, **text)
        await self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=key,
                        windowsVirtualKeyCode=code)

    async def log_lines(self) -> list[list[str]]:
        return await self.evaluate(LOG_LINES)

    async def shown(self, text: str) -> list[str]:
        """Wait until the log shows the line ``text``; return [text, its style]."""
        return (await self.wait_for(f"{LOG_LINES}.filter(([text]) => text === {json.dumps(text)})"))[-1]


class TestPage(ChatTestCase):
    """The page at "/" in headless Chromium: the terminal client's promises, kept accessibly."""

    @classmethod
    def setUpClass(cls):
        cls.chromium = Chromium(browser_or_skip())   # one for the class: starting one takes a while
        chat.page()   # built once (0.2-0.5 s), here rather than while a test's loop waits
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.chromium.stop()

    async def open_page(self, width: int = 390, height: int = 800, *, server=None) -> Tab:
        """A new tab at ``width`` x ``height`` showing the page of ``server`` (a room of our own)."""
        if server is None:
            server = await self.start_room()
        target = await asyncio.to_thread(self.chromium.new_tab)
        self.addAsyncCleanup(asyncio.to_thread, self.chromium.close_tab, target["id"])
        conn = await within(chat.connect(target["webSocketDebuggerUrl"], max_size=2**26,
                                         compression=False))
        self.addAsyncCleanup(conn.close)
        tab = Tab(conn)
        await tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                       deviceScaleFactor=1, mobile=False)
        await tab.call("Page.enable")   # without it, Chromium 156 did not run the script below
        await tab.call("Page.addScriptToEvaluateOnNewDocument", source=FASTER_TIMERS)
        await tab.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
        await tab.wait_for(f"location.port === '{server.port}' && document.readyState === 'complete'")
        return tab

    async def join_page(self, tab: Tab, name: str = "alice"):
        await tab.evaluate("document.getElementById('name').focus()")
        await tab.type(name)
        await tab.press("Enter")
        await tab.wait_for("document.activeElement.id === 'text' && document.getElementById('log')"
                           f".textContent.includes('You are connected as {name}!')")

    async def assertLaidOut(self, tab: Tab):
        self.assertEqual(await tab.evaluate(LAYOUT), [])

    async def test_text_is_escaped_as_printable_escapes_it(self):
        tricky = ["brb\n19:16 * bob left: bye", "a\u2028b\u2029c", "see \u202e!tsil eht no si bob",
                  f"{TECHNOLOGIST} {RAINBOW_FLAG}", f"go {SCOTLAND} go", "hi\U000E0041",
                  "\U000E0067\U000E007F", "soft\xadhyphen pay\u200bpal", "nul\x00 del\x7f",
                  "c1\x85\x9b", "tab\tcr\r", "\ue000 \U000F0000 \U0010FFFD", "\u0378 \U0010FFFF",
                  "\ufeff\u2060\u061c", "e\u0301 \u3000\u00a0 \u200c"]
        edges = sorted({code for first, last in chat.hidden_ranges()   # every run's ends, and past them
                        for code in (first - 1, first, last, last + 1) if 0 <= code <= sys.maxunicode})
        tricky += [f"<{chr(code)}>" for code in edges]
        tab = await self.open_page()
        shown = await tab.evaluate(f"{json.dumps(tricky)}.map(printable)")
        self.assertEqual(shown, [printable(text) for text in tricky])
        await self.join_page(tab)
        bob = await self.join("bob")
        await bob.send(tricky[0])
        await bob.send(tricky[2])
        await tab.shown(f"[bob]: {printable(tricky[2])}")
        self.assertIn([f"[bob]: {printable(tricky[0])}", ""], await tab.log_lines())   # one line

    async def test_notices_and_actions_are_marked_apart(self):
        tab = await self.open_page()
        await self.join_page(tab)
        bob = await self.join("bob")
        self.assertEqual(await tab.shown("-!- bob joined"), ["-!- bob joined", "notice"])
        await bob.send("/me waves")
        self.assertEqual(await tab.shown("* bob waves"), ["* bob waves", "action"])
        await bob.send("* alice left: bye")   # what a member says can't pass for a notice
        await tab.shown("[bob]: * alice left: bye")
        await bob.close(CloseCode.NORMAL_CLOSURE, "bye")
        self.assertEqual(await tab.shown("-!- bob left: bye"), ["-!- bob left: bye", "notice"])
        lines = [text for text, _ in await tab.log_lines()]
        self.assertTrue(lines[0].startswith("-!- You are connected as alice! There is 1 user here."))

    async def test_the_newest_line_stays_in_view_through_pending_lines_and_an_outage(self):
        tab = await self.open_page(390, 800)
        await self.join_page(tab)
        bob = await self.join("bob")
        for i in range(40):
            await bob.send(f"line {i}")
        await tab.shown("[bob]: line 39")
        await self.assertLaidOut(tab)
        port = self.server.port
        await self.server.close()   # the server goes away ...
        await tab.wait_for("document.getElementById('status').textContent.startsWith('reconnecting')")
        for line in ("one", "two", "three"):   # ... while alice goes on typing
            await tab.type(line)
            await tab.press("Enter")
        await tab.wait_for("document.querySelectorAll('#waiting li').length === 3")
        await self.assertLaidOut(tab)
        room = chat.ChatRoom(rate=0)   # ... and comes back on the same port, knowing no one
        self.server = await chat.serve(room.handle, "127.0.0.1", port, keepalive_interval=None,
                                       process_request=room.process_request)
        self.addAsyncCleanup(self.server.close)
        await tab.shown("[alice]: three")   # never sent before: not marked as resent
        await tab.wait_for("!document.querySelector('#waiting li')")
        await self.assertLaidOut(tab)
        await tab.evaluate("document.getElementById('log').scrollTop = 0")   # the reader scrolls up
        carol = await self.join("carol")
        await carol.send("hello")
        await tab.shown("[carol]: hello")
        self.assertEqual(await tab.evaluate("document.getElementById('log').scrollTop"), 0)

    async def test_refusals_back_off_with_one_status_and_no_lines(self):
        gate, tries = chat.Gate(), itertools.count(1)

        def refuse_every_other(request):   # 503 before the upgrade, then 1013 after it
            answer = gate.process_request(request)
            if answer is None and next(tries) % 2:
                return chat.Response(http.HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
            return answer

        async def try_later(conn):
            await conn.close(CloseCode.TRY_AGAIN_LATER, "names can't be checked just now")

        server = await self.start(try_later, process_request=refuse_every_other)
        tab = await self.open_page(server=server)
        await tab.type("alice")
        await tab.press("Enter")
        status = await tab.wait_for(
            "((status) => status.includes('attempt 4') && status)(document.getElementById('status').textContent)")
        self.assertEqual(status, "reconnecting in 8 s (attempt 4): names can't be checked just now")
        self.assertEqual(await tab.evaluate("window.delays"), [1000, 2000, 4000, 8000])
        self.assertEqual(await tab.log_lines(), [])

    async def test_a_pasted_block_goes_line_by_line_and_up_recalls_the_lines(self):
        tab = await self.open_page()
        await self.join_page(tab)
        bob = await self.join("bob")
        await tab.evaluate("""(() => {
          const text = document.getElementById("text");
          text.value = " draft"; text.setSelectionRange(0, 0);   // stays after the paste, unsent
          const data = new DataTransfer();
          data.setData("text/plain", "one\\r\\ntwo\\nthree");
          document.getElementById("text").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
        })()""")
        await self.expect(bob, "[alice]: one", "[alice]: two")
        self.assertEqual(await tab.evaluate("document.getElementById('text').value"), "three draft")
        await self.assertLaidOut(tab)
        await tab.press("Enter")
        await self.expect(bob, "[alice]: three draft")
        recalled = []
        for key in ("ArrowUp", "ArrowUp", "ArrowDown", "ArrowDown"):
            await tab.press(key)
            recalled.append(await tab.evaluate("document.getElementById('text').value"))
        self.assertEqual(recalled, ["three draft", "two", "three draft", ""])

    async def test_a_line_over_the_room_s_limit_is_refused_here_and_the_page_stays(self):
        server = await self.start_room(room=chat.ChatRoom(rate=0, max_size=100), max_size=100)
        tab = await self.open_page(server=server)
        await self.join_page(tab)
        bob = await self.join("bob")
        await tab.evaluate("document.getElementById('text').value = 'z'.repeat(101)")
        await tab.press("Enter")   # the room would close the connection with 1009
        await tab.shown("-!- not sent: the line is 101 bytes; the room takes lines of up to 100")
        await tab.type("short")
        await tab.press("Enter")
        await self.expect(bob, "[alice]: short")

    async def test_a_room_that_never_answers_a_line_is_left_and_rejoined(self):
        class Frozen(chat.ChatRoom):   # as a server stopped with kill -STOP: the first line gets nothing
            def on_text(self, member, text):
                if member.name == "alice" and not self.froze:
                    self.froze = True
                    return
                super().on_text(member, text)
        room = Frozen(rate=0)
        room.froze = False
        server = await self.start_room(room=room)
        tab = await self.open_page(server=server)
        await self.join_page(tab)
        bob = await self.join("bob")
        await tab.type("are you there?")
        await tab.press("Enter")
        await self.expect(bob, "* alice left", "* alice joined")   # the page gave up, came back
        await self.expect(bob, "[alice]: (resent) are you there?")   # sent again, marked: the
        # room forgot alice when she left, so it can't say whether it had the line
        await tab.wait_for("!document.getElementById('waiting').textContent")

    async def test_history_is_marked_where_it_starts_and_ends(self):
        await self.start_room()
        bob = await self.join("bob")
        for text in ("one", "two"):
            await bob.send(text)
            await self.expect(bob, f"[bob]: {text}")
        tab = await self.open_page(server=self.server)
        await self.join_page(tab)
        await tab.shown("-!- end of history (2 lines)")
        texts = [text for text, _ in await tab.log_lines()]
        self.assertEqual(texts[1:], ["-!- history: what was said here before you came",
                                     "[bob]: one", "[bob]: two", "-!- end of history (2 lines)"])

    async def test_quit_is_calm_and_offers_to_join_again(self):
        tab = await self.open_page()
        await self.join_page(tab)
        bob = await self.join("bob")
        await tab.type("/quit gone for lunch")
        await tab.press("Enter")
        await self.expect(bob, "* alice left: gone for lunch")
        self.assertEqual(await tab.shown("-!- you left (gone for lunch)"),
                         ["-!- you left (gone for lunch)", "notice"])
        self.assertEqual(await tab.evaluate(
            "[document.activeElement.id, document.activeElement.value, document.getElementById('join').hidden]"),
            ["name", "alice", False])
        await tab.press("Enter")
        await tab.wait_for("document.getElementById('status').textContent === 'connected as alice'")

    async def test_a_refused_name_asks_for_another(self):
        tab = await self.open_page()
        await self.join("alice")
        await tab.type("alice")
        await tab.press("Enter")
        self.assertEqual(await tab.shown("-!- the name alice is taken; pick another"),
                         ["-!- the name alice is taken; pick another", "notice"])
        self.assertEqual(await tab.evaluate("document.getElementById('status').textContent"),
                         "pick another name")
        await self.assertLaidOut(tab)   # the focus among them: in the name field, labelled
        self.assertEqual(await tab.evaluate("document.activeElement.id"), "name")
        await tab.type("carol")   # over the refused name, which is selected
        await tab.press("Enter")
        await tab.wait_for("document.getElementById('status').textContent === 'connected as carol'")

    async def test_labels_roles_and_contrast_at_phone_and_desktop_widths(self):
        for width in (390, 1280):
            with self.subTest(width=width):
                tab = await self.open_page(width, 800)
                labels = "['name', 'text'].map((id) => document.getElementById(id).labels[0].textContent)"
                self.assertEqual(await tab.evaluate(labels), ["Name", "Message"])
                log = "['role', 'aria-live'].map((name) => document.getElementById('log').getAttribute(name))"
                self.assertEqual(await tab.evaluate(log), ["log", "polite"])
                await self.join_page(tab, f"user{width}")
                await self.assertLaidOut(tab)
                contrasts = await tab.evaluate(CONTRASTS)
                self.assertGreater(len(contrasts), 10)
                self.assertEqual([found for found in contrasts if found[0] < 4.5], [])


# Fuzzing ###################################################################

class TestFuzz(ChatTestCase):
    """Seeded random and mutated handshakes and frames against a running room.

    The server must never log a traceback, never hang past its timeouts, and
    keep serving a well-behaved member throughout.
    """

    SEED = 6455
    CONNECTIONS = 1000   # with this seed: 3,301 frames and 286 mutated handshakes

    def mutate(self, rng: random.Random, data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.3 and data:
                del data[rng.randrange(len(data)):]                            # truncate
            elif kind < 0.6 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)       # flip a bit
            elif kind < 0.8:
                data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 20))  # insert
            else:
                data += rng.randbytes(rng.randint(1, 200))                   # garbage after
        return bytes(data)

    def random_frames(self, rng: random.Random) -> bytes:
        frames = []
        for _ in range(rng.randint(1, 8)):
            choice = rng.random()
            opcode = rng.choice([0, 1, 2, 3, 8, 9, 10, 11, 15])
            payload = rng.choice([b"", b"hello", "κόσμε".encode(), b"\xff\xfe", rng.randbytes(200),
                                  close_frame_payload(rng.choice([1000, 1005, 999, 4000]))])
            frame = chat.encode_frame(opcode, payload, fin=rng.random() < 0.7, mask=rng.random() < 0.9,
                                      rsv=rng.choice([0, 0, 0, 1, 4]))
            if choice < 0.1:   # a huge declared length
                frame = bytes([frame[0], 0xFF]) + struct.pack("!Q", rng.choice([2**63, 2**40, 2**20 + 1]))
            frames.append(self.mutate(rng, frame) if choice > 0.7 else frame)
        return b"".join(frames)

    async def attack(self, rng: random.Random) -> None:
        if rng.random() < 0.3:
            data = self.mutate(rng, upgrade_request("/chat"))
        else:
            data = upgrade_request("/chat") + self.random_frames(rng)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(data)
            if rng.random() < 0.5:
                writer.write_eof()            # done talking; the server must finish up
                await within(reader.read())   # ... and close, well within its timeouts
            else:
                writer.transport.abort()      # vanish mid-frame
        except (ConnectionError, OSError):
            pass                              # the server may cut us off first
        finally:
            writer.close()

    async def test_server_survives_random_and_mutated_input(self):
        await self.start_room(handshake_timeout=1.0, close_timeout=1.0, max_size=4096)
        alice = await self.join("alice")
        errors = LogCatcher(logging.ERROR)
        self.addCleanup(errors.remove)
        asyncio_errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: asyncio_errors.append(context))

        rng = random.Random(self.SEED)
        for batch in range(self.CONNECTIONS // 20):
            await within(asyncio.gather(*(self.attack(rng) for _ in range(20))))
            await alice.send(f"after batch {batch}")
            while (line := await within(alice.recv())) != f"[alice]: after batch {batch}":
                # In between: fuzzers joining and leaving, and their valid texts.
                self.assertTrue(line.startswith(("* user", "[user")), line)

        self.assertTrue(errors.records.empty(), "the server logged an error")
        self.assertEqual(asyncio_errors, [])
        # Every attacker is gone; only alice's connection is left.
        while len(self.server._tasks) > 1:
            await within(alice.recv())
        self.assertEqual(list(self.room.members), ["alice"])


if __name__ == "__main__":
    unittest.main()
