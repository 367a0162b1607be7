"""Tests for chat.py, in the order of its sections; standard library only.

    python -m unittest -v test_chat

Each class names the part of RFC 6455 it checks. Network tests use real
sockets on 127.0.0.1 with port 0, and every await runs under a timeout.
"""

import asyncio
import base64
import http
import io
import logging
import os
import random
import socket
import ssl
import struct
import tempfile
import tracemalloc
import typing
import unittest
import unittest.mock

import chat
from chat import CloseCode, Opcode

#: No single step of a test may take longer than this (seconds).
TIMEOUT = 10.0

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

    def test_many_tiny_fragments_cost_no_more_memory_than_the_message(self):
        # A hostile peer may send a message one byte per frame; keeping each
        # piece as its own object would cost ~40 bytes of memory per byte.
        for opcode in (Opcode.TEXT, Opcode.BINARY):
            with self.subTest(opcode=opcode):
                assembler = chat.MessageAssembler(2**20)
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
    """Records what the connection writes; closing it ends the reader, as TCP would."""

    def __init__(self, reader: asyncio.StreamReader):
        super().__init__()
        self.reader = reader
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
        self.reader.feed_eof()

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
    """RFC 6455 §5-§7 on one connection, fed through a bare asyncio.StreamReader."""

    def connect(self, *, is_client=False, max_size=2**20):
        self.reader = asyncio.StreamReader()
        self.transport = FakeTransport(self.reader)
        return chat.Connection(self.reader, FakeWriter(self.transport), is_client=is_client,
                               max_size=max_size, close_timeout=1.0)

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
            self.reader.feed_data(data[i:i + 1])
            await until(lambda: not self.reader._buffer)
        if then_eof:
            self.reader.feed_eof()

    async def assert_fails_with(self, conn, code: int, data: bytes):
        self.reader.feed_data(data)
        self.reader.feed_eof()
        # The fake peer hangs up without answering our close frame: §7.1.5 makes that 1006.
        closed = await expect_closed(conn.recv(), CloseCode.ABNORMAL_CLOSURE)
        self.assertEqual((closed.sent.code, closed.rcvd), (code, None))
        close = self.sent_frames(by_client=conn.is_client)[-1]
        self.assertEqual(close.opcode, Opcode.CLOSE)
        self.assertEqual(chat.parse_close_payload(close.payload)[0], code)
        self.assertEqual(conn.state, chat.State.CLOSED)

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
        self.reader.feed_data(client_frame(Opcode.TEXT, "κό".encode(), fin=False)
                              + client_frame(Opcode.CONTINUATION, b"s" * 5000)
                              + client_frame(Opcode.BINARY, b"\x00"))
        self.assertEqual(await within(conn.recv_message()),
                         chat.Message(Opcode.TEXT, "κό".encode() + b"s" * 5000))
        self.assertEqual(await within(conn.recv_message()), chat.Message(Opcode.BINARY, b"\x00"))

    async def test_ping_is_answered_with_same_payload_and_unsolicited_pong_ignored(self):
        conn = self.connect()
        self.reader.feed_data(client_frame(Opcode.PONG, b"nobody asked")
                              + client_frame(Opcode.PING, b"data") + client_frame(Opcode.TEXT, b"after"))
        self.assertEqual(await within(conn.recv()), "after")
        await until(lambda: self.transport.writes)   # the pong leaves at the end of the loop turn
        self.assertEqual(self.sent_frames(), [Frame(Opcode.PONG, b"data")])

    async def test_ping_returns_when_its_pong_arrives(self):
        conn = self.connect(is_client=True)
        pinging = asyncio.create_task(conn.ping(b"42"))
        receiving = asyncio.create_task(conn.recv())
        await within(self.transport.next_write())   # the ping
        self.assertFalse(pinging.done())
        self.reader.feed_data(chat.encode_frame(Opcode.PONG, b"42") + chat.encode_frame(Opcode.TEXT, b"x"))
        await within(pinging)
        self.assertEqual(await within(receiving), "x")
        self.assertEqual(self.sent_frames(by_client=True), [Frame(Opcode.PING, b"42")])

    async def test_pings_from_a_peer_that_never_reads_our_pongs_are_bounded(self):
        conn = self.connect()
        conn.max_buffer = 1000
        self.transport.peer_never_reads = True
        receiving = asyncio.create_task(conn.recv())
        pings = client_frame(Opcode.PING, bytes(125)) * 20
        self.reader.feed_data(pings)   # one batch, answered at the end of this loop turn
        await within(self.transport.next_write())
        self.assertEqual(conn.state, chat.State.CLOSING)   # over max_buffer: dropped
        self.reader.feed_data(pings + client_frame(Opcode.CLOSE, close_frame_payload(1008)))
        await expect_closed(receiving, CloseCode.POLICY_VIOLATION)
        # Pongs stop once max_buffer is passed: at most one batch beyond it, of 20 × 127 bytes.
        self.assertLess(len(self.transport.written), 1000 + 20 * 127 + 130)

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
        self.reader.feed_data(client_frame(Opcode.TEXT, b"first") + client_frame(Opcode.TEXT, b"x", rsv=1))
        self.reader.feed_eof()
        self.assertEqual(await within(conn.recv()), "first")
        closed = await expect_closed(conn.recv())
        self.assertEqual(closed.sent.code, CloseCode.PROTOCOL_ERROR)

    async def test_peer_close_is_echoed_and_reported(self):
        conn = self.connect()
        self.reader.feed_data(client_frame(Opcode.CLOSE, close_frame_payload(1001, "bye")))
        closed = await expect_closed(conn.recv())
        self.assertEqual((closed.code, closed.reason), (1001, "bye"))
        self.assertEqual(self.sent_frames(), [Frame(Opcode.CLOSE, struct.pack("!H", 1001))])
        self.assertTrue(self.transport.closing)   # the server closes TCP first (§7.1.1)

    async def test_empty_close_is_reported_as_1005_and_answered_empty(self):
        conn = self.connect()
        self.reader.feed_data(client_frame(Opcode.CLOSE))
        await expect_closed(conn.recv(), CloseCode.NO_STATUS_RCVD)
        self.assertEqual(self.sent_frames(), [Frame(Opcode.CLOSE, b"")])

    async def test_tcp_dying_is_reported_as_1006(self):
        conn = self.connect()
        self.reader.feed_data(client_frame(Opcode.TEXT, b"half")[:5])
        self.reader.feed_eof()
        await expect_closed(conn.recv(), CloseCode.ABNORMAL_CLOSURE)
        self.assertEqual(self.sent_frames(), [])

    async def test_close_waits_for_the_peers_close_and_drops_data_in_between(self):
        conn = self.connect()
        closing = asyncio.create_task(conn.close(CloseCode.GOING_AWAY, "later"))
        await within(self.transport.next_write())
        self.assertEqual(self.sent_frames()[-1].payload, close_frame_payload(1001, "later"))
        self.reader.feed_data(client_frame(Opcode.TEXT, b"late")
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
        self.reader.feed_data(client_frame(Opcode.CLOSE, close_frame_payload(1000)))
        await within(conn.close())
        closed = await expect_closed(conn.send("later still"), CloseCode.NORMAL_CLOSURE)
        self.assertEqual(closed.rcvd, (1000, ""))

    async def test_outbox_keeps_the_order_frames_were_queued_in_one_write_per_turn(self):
        conn = self.connect()
        shared = chat.SharedFrames()
        conn.queue_frame(chat.encode_frame(Opcode.TEXT, b"one"))
        conn.queue_frame(shared)
        shared.append(chat.encode_frame(Opcode.TEXT, b"two"))
        self.assertFalse(shared.sealed)
        conn.queue_frame(chat.encode_frame(Opcode.TEXT, b"reply"))
        self.assertTrue(shared.sealed)   # a frame queued behind it: nothing more may join it
        await within(self.transport.next_write())
        await within(conn.send("three"))
        self.assertEqual(self.sent_frames(), [Frame(Opcode.TEXT, b"one"), Frame(Opcode.TEXT, b"two"),
                                              Frame(Opcode.TEXT, b"reply"), Frame(Opcode.TEXT, b"three")])
        self.assertEqual(self.transport.writes, 2)   # the turn's three frames at once, then send()

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

    async def test_client_waits_for_the_server_to_close_tcp(self):
        conn = self.connect(is_client=True)
        self.reader.feed_data(chat.encode_frame(Opcode.CLOSE, close_frame_payload(1000)))
        receiving = asyncio.create_task(conn.recv())
        await within(self.transport.next_write())   # our answering close frame
        self.assertFalse(receiving.done())              # still waiting for the server's FIN
        self.reader.feed_eof()
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

    async def test_server_shutdown_closes_clients_with_1001(self):
        server = await self.start()
        conns = [await self.open(server) for _ in range(3)]
        receiving = [asyncio.create_task(conn.recv()) for conn in conns]
        await within(server.close())
        for task in receiving:
            await expect_closed(task, CloseCode.GOING_AWAY)

    async def test_http_errors_for_bad_handshakes(self):
        server = await self.start()
        cases = [   # (request, status, the reason the body gives)
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"expected Upgrade: websocket"),
            (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"405", b"only GET is supported"),
            (b"GET / HTTP/1.0\r\n\r\n", b"400", b"needs HTTP/1.1"),
            (b"nonsense\r\n\r\n", b"400", b"malformed request line"),
            (upgrade_request(version="8"), b"426", b"unsupported WebSocket version 8"),
            (upgrade_request().replace(b"Host: 127.0.0.1\r\n", b""), b"400", b"missing Host header"),
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
        await self.start_room()
        alice = await self.open(self.server, "/chat?name=alice")
        await self.expect(alice, "* You are connected as alice! There is 1 user here. Type /help for commands.")
        bob = await self.open(self.server, "/chat?name=bob")
        await self.expect(bob, "* You are connected as bob! There are 2 users here. Type /help for commands.")
        await self.expect(alice, "* bob joined")

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
        await self.expect(bob, *[f"(history) [alice]: message {i}" for i in range(5, 55)])

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
        await self.expect(alice, "* there is no dave here; /who lists who is")
        await alice.send("public")
        for conn in (alice, bob, carol):   # carol's next line is this one: she saw no private message
            await self.expect(conn, "[alice]: public")

    async def test_unknown_command_gets_help_and_is_not_broadcast(self):
        await self.start_room()
        alice, bob = await self.join("alice"), await self.join("bob")
        await self.expect(alice, "* bob joined")
        await bob.send("/dance")
        await self.expect(bob, chat.HELP)
        await bob.send("visible")
        await self.expect(alice, "[bob]: visible")

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


class TestRoomOrder(QuietLogs, unittest.IsolatedAsyncioTestCase):
    """What one turn of the event loop queues reaches each member in order, in one write."""

    def member(self, room, name):
        reader = asyncio.StreamReader()
        transport = FakeTransport(reader)
        conn = chat.Connection(reader, FakeWriter(transport), is_client=False,
                               path=f"/chat?name={name}")
        room.admit(conn)
        return conn, transport

    @staticmethod
    def texts(transport, since=0):
        data, texts = bytes(transport.written[since:]), []
        while data:
            frame, size = parse_frame(data, expect_masked=False)
            texts.append(frame.payload.decode())
            data = data[size:]
        return texts

    async def test_a_reply_a_broadcast_and_a_join_in_one_turn_keep_their_order(self):
        room = chat.ChatRoom(rate=0)
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


# Hardening (RFC 6455 §10) ##################################################

class TestLimitsAndDefences(ChatTestCase):
    """Each defence refuses the bad peer and leaves a well-behaved member unaffected."""

    async def assert_still_served(self, conn, name="alice"):
        await conn.send("still here")
        while await within(conn.recv()) != f"[{name}]: still here":
            pass   # notices about others may come first

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

    async def test_over_max_clients_gets_503_and_the_others_stay(self):
        await self.start_room(max_clients=2)
        alice = await self.join("alice")
        await self.join("bob")
        with self.assertRaises(chat.InvalidStatus) as caught:
            await within(chat.connect(self.url + "?name=carol"))
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("server full (2 clients); try again later", str(caught.exception))
        await self.assert_still_served(alice)

    async def test_flood_is_refused_then_closed_with_1008(self):
        await self.start_room(room=chat.ChatRoom(rate=0.001, burst=3))
        alice = await self.join("alice")
        flooder = await self.join("flooder")
        await self.expect(alice, "* flooder joined")
        for i in range(3):
            await flooder.send(f"burst {i}")
        await flooder.send("one too many")
        await self.expect(flooder, "[flooder]: burst 0", "[flooder]: burst 1", "[flooder]: burst 2")
        self.assertTrue((await within(flooder.recv())).startswith("* slow down: message not sent"))
        for _ in range(5):
            await flooder.send("spam")
        await expect_closed(flooder, CloseCode.POLICY_VIOLATION)
        await self.expect(alice, "[flooder]: burst 0", "[flooder]: burst 1", "[flooder]: burst 2",
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

    async def test_wss_with_a_trusted_ca(self):
        url = await self.start_tls_room()
        conn = await within(chat.connect(url, ssl_context=chat.client_ssl_context(self.files["ca"], False)))
        self.assertTrue((await within(conn.recv())).startswith("* You are connected"))
        await conn.send("secret")
        self.assertEqual(await within(conn.recv()), "[user1]: secret")
        await within(conn.close())

    async def test_unknown_certificate_is_refused_unless_insecure(self):
        url = await self.start_tls_room()
        logged = LogCatcher(logging.INFO)
        self.addCleanup(logged.remove)
        with self.assertRaises(ssl.SSLCertVerificationError):
            await within(chat.connect(url))   # the system's CAs don't know ours
        record = await within(logged.next())  # the server logs one line, not a traceback
        self.assertIn("Error on transport creation", record.getMessage())
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


# 9. Client #################################################################

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class TestScreen(unittest.TestCase):
    """What reaches the user's terminal."""

    def test_control_characters_and_escape_sequences_are_shown_escaped(self):
        self.assertEqual(chat.printable("plain text, é ✓"), "plain text, é ✓")
        self.assertEqual(chat.printable("\x1b[2Jgone"), "\\x1b[2Jgone")
        self.assertEqual(chat.printable("a\nb\rc\x07\x9b\u202e"), "a\\nb\\rc\\x07\\x9b\\u202e")
        self.assertEqual(chat.printable("\x1b]0;title\x07"), "\\x1b]0;title\\x07")

    def test_plain_lines_when_not_coloured(self):
        out = io.StringIO()
        screen = chat.Screen(out, interactive=False, color=False, name="bob")
        screen.show("[alice]: \x1b[31mred?")
        screen.show("* bob joined")
        self.assertEqual(out.getvalue(), "[alice]: \\x1b[31mred?\n* bob joined\n")

    def test_colours_mark_me_private_notices_and_history(self):
        out = io.StringIO()
        screen = chat.Screen(out, interactive=False, color=True, name="bob")
        for line in ("[bob]: mine", "[alice → bob]: psst", "* notice", "(history) [x]: old", "[alice]: hi"):
            screen.show(line)
        self.assertEqual(out.getvalue().splitlines(), [
            "\x1b[1;32m[bob]: mine\x1b[0m", "\x1b[35m[alice → bob]: psst\x1b[0m",
            "\x1b[33m* notice\x1b[0m", "\x1b[2m(history) [x]: old\x1b[0m", "[alice]: hi"])

    def test_screen_learns_the_name_the_server_gave(self):
        screen = chat.Screen(io.StringIO(), interactive=False, color=False)
        screen.show("* You are connected as user7! There is 1 user here.")
        self.assertEqual(screen.classify("[user7]: hi"), "mine")

    def test_interactive_lines_go_above_the_prompt(self):
        out = io.StringIO()
        chat.Screen(out, interactive=True, color=False).show("[a]: hi")
        self.assertEqual(out.getvalue(), chat.ABOVE_PROMPT.format("[a]: hi"))

    def test_colour_only_on_a_terminal_without_no_color(self):
        self.assertTrue(chat.wants_color(FakeTerminal(), {}))
        self.assertFalse(chat.wants_color(FakeTerminal(), {"NO_COLOR": "1"}))
        self.assertFalse(chat.wants_color(io.StringIO(), {}))

    def test_url_gets_the_name(self):
        self.assertEqual(chat.with_name("ws://h/chat", "bob"), "ws://h/chat?name=bob")
        self.assertEqual(chat.with_name("ws://h/chat?name=x&a=1", "b o"), "ws://h/chat?a=1&name=b+o")
        self.assertEqual(chat.with_name("ws://h/chat", None), "ws://h/chat")


class TestChatClient(ChatTestCase):
    """The terminal client against a real room, with patched stdin and stdout."""

    def client(self, url, stdin, **options):
        out = io.StringIO()
        screen = chat.Screen(out, interactive=False, color=False)
        keyboard = chat.Keyboard(screen, stdin)
        keyboard.start()
        return chat.ChatClient(url, screen, keyboard, **options), out

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
        client, out = self.client(chat.with_name(self.url, "bot"), io.StringIO("hi\n\nsecond line\n"))
        self.assertEqual(await within(client.run()), 0)
        await self.expect(alice, "* bot joined", "[bot]: hi", "[bot]: second line", "* bot left")

    async def test_quit_command_exits_0_and_sends_nothing_after_it(self):
        await self.start_room()
        alice = await self.join("alice")
        client, out = self.client(chat.with_name(self.url, "bot"), io.StringIO("/quit\nnot sent\n"))
        self.assertEqual(await within(client.run()), 0)
        # Neither "/quit" nor the line after it reached the room: bot only came and went.
        await self.expect(alice, "* bot joined", "* bot left")
        await alice.send("done")
        await self.expect(alice, "[alice]: done")

    async def test_a_line_typed_while_the_connection_closes_is_kept_not_retried(self):
        class ClosingConnection:
            """In its closing handshake: send() fails; the peer's close frame comes 50 ms later."""
            sends = 0

            async def send(self, line):
                self.sends += 1
                asyncio.get_running_loop().call_later(0.05, peer_closed.set)
                raise chat.ConnectionClosed(None, chat.Close(1001), tcp_closed=False)

            async def recv(self):
                await peer_closed.wait()
                raise chat.ConnectionClosed(chat.Close(1001, "bye"), chat.Close(1001), tcp_closed=True)

        peer_closed = asyncio.Event()
        conn = ClosingConnection()
        stdin, feed = self.pipe()
        client, out = self.client("ws://127.0.0.1:9/chat", stdin)   # session() doesn't connect
        feed.write("typed while closing\n")
        closed = await within(client.session(conn))
        self.assertEqual(closed.code, CloseCode.GOING_AWAY)
        self.assertEqual(conn.sends, 1)   # tried once, not in a loop until the close arrived
        self.assertEqual(list(client.keyboard.lines), ["typed while closing"])   # for the next connection

    async def test_cannot_connect_says_so_and_exits_1(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()   # nothing listens there now
        client, out = self.client(f"ws://127.0.0.1:{port}/chat", io.StringIO(""))
        self.assertEqual(await within(client.run()), 1)
        self.assertEqual(out.getvalue(), f"cannot connect to ws://127.0.0.1:{port}/chat: "
                                         "connection refused — is the server running?\n")

    async def test_refused_name_shows_the_servers_reason_and_exits_1(self):
        await self.start_room()
        await self.join("bob")
        stdin, feed = self.pipe()
        client, out = self.client(chat.with_name(self.url, "bob"), stdin)
        self.assertEqual(await within(client.run()), 1)
        self.assertIn("disconnected: 1008 (policy violation): the name bob is taken", out.getvalue())

    async def test_no_reconnect_exits_1_when_the_server_goes_away(self):
        await self.start_room()
        stdin, feed = self.pipe()
        client, out = self.client(chat.with_name(self.url, "bob"), stdin, reconnect=False)
        watcher = await self.join("watcher")
        running = asyncio.create_task(client.run())
        await self.expect(watcher, "* bob joined")
        watching = asyncio.create_task(expect_closed(watcher, CloseCode.GOING_AWAY))
        await within(self.server.close())
        await within(watching)
        self.assertEqual(await within(running), 1)
        self.assertIn("disconnected: 1001 (going away): server shutting down", out.getvalue())

    async def test_client_reconnects_when_the_server_comes_back(self):
        first = await self.start_room()
        port = first.port
        watcher = await self.join("watcher")
        stdin, feed = self.pipe()
        client, out = self.client(chat.with_name(self.url, "bob"), stdin, first_backoff=0.05)
        running = asyncio.create_task(client.run())
        await self.expect(watcher, "* bob joined")
        watching = asyncio.create_task(expect_closed(watcher, CloseCode.GOING_AWAY))
        await within(first.close())
        await within(watching)
        # The same port, a new server: the client must come back by itself.
        room = chat.ChatRoom(rate=0)
        second = await chat.serve(room.handle, "127.0.0.1", port, process_request=room.process_request,
                                  keepalive_interval=None)
        self.addAsyncCleanup(second.close)
        watcher = await within(chat.connect(f"ws://127.0.0.1:{port}/chat?name=watcher"))
        self.addAsyncCleanup(watcher.close)
        lines = []
        while "* bob joined" not in lines:
            lines.append(await within(watcher.recv()))
        feed.write("back again\n")
        await self.expect(watcher, "[bob]: back again")
        feed.close()   # end of input: the client closes and exits 0
        self.assertEqual(await within(running), 0)
        self.assertIn("disconnected: 1001 (going away)", out.getvalue())
        self.assertIn("* reconnecting in", out.getvalue())


# 10. Command line ##########################################################

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
        self.reader = asyncio.StreamReader()
        self.transport = FakeTransport(self.reader)
        deflate = chat.PerMessageDeflate(chat.check_deflate_answer(chat.SERVER_DEFLATE_ANSWER),
                                         is_client=False)
        return chat.Connection(self.reader, FakeWriter(self.transport), is_client=False,
                               max_size=10_000, close_timeout=1.0, deflate=deflate)

    async def test_compressed_message_split_over_fragments_with_a_ping_between(self):
        conn = self.deflate_connection()
        data = deflated("héllo, wörld ".encode() * 40)
        self.reader.feed_data(client_frame(Opcode.TEXT, data[:10], fin=False, rsv=chat.RSV1)
                              + client_frame(Opcode.PING, b"p")
                              + client_frame(Opcode.CONTINUATION, data[10:20], fin=False)
                              + client_frame(Opcode.CONTINUATION, data[20:]))
        self.assertEqual(await within(conn.recv()), "héllo, wörld " * 40)

    async def assert_fails_with(self, conn, code: int, data: bytes):
        self.reader.feed_data(data)
        self.reader.feed_eof()
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
