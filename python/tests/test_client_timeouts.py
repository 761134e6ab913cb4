"""The client's timeouts against a scripted server on 127.0.0.1: a call's timeout bounds the whole
call (progress answers do not extend it) and is sent as the request's deadlineMs; long calls have
no timeout by default, so a server silent for longer than the client's timeout is waited for."""
import socket
import struct
import threading
import time

import pytest

pytest.importorskip("numpy")
pytest.importorskip("capnp")

from sqkv import Client, Error  # noqa: E402
from sqkv.client import DEADLINE_GRACE, load_schema  # noqa: E402

# Bounded waits (seconds).
JOIN_TIMEOUT = 10


class ScriptedServer:
    """Accepts one connection, answers hello, and hands every other request to
    script(server, kind, request_id), which answers it (or not) with server.answer(). Records
    (kind, deadlineMs) of every request."""

    def __init__(self, script):
        self.schema = load_schema()
        self.script = script
        self.requests = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self._conn = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _recv_exactly(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self._conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _read_frame(self):
        first = self._recv_exactly(8)
        segments = struct.unpack_from("<I", first, 0)[0] + 1
        table = first + self._recv_exactly(((1 + segments + 1) // 2 - 1) * 8)
        sizes = struct.unpack_from(f"<{segments}I", table, 4)
        return table + self._recv_exactly(sum(sizes) * 8)

    def answer(self, request_id, fill=None, code="ok", message=""):
        resp = self.schema.Response.new_message()
        resp.id = request_id
        resp.status.code = code
        resp.status.message = message
        if fill is not None:
            fill(resp)
        else:
            resp.none = None
        self._conn.sendall(resp.to_bytes())

    def _serve(self):
        self._conn, _ = self._listener.accept()
        try:
            while True:
                frame = self._read_frame()
                with self.schema.Request.from_bytes(frame) as req:
                    kind, rid, deadline = req.which(), req.id, req.deadlineMs
                self.requests.append((kind, deadline))
                if kind == "hello":
                    def hello(resp):
                        h = resp.init("hello")
                        h.protocolVersion = self.schema.protocolVersion
                        h.server = "scripted"
                        h.maxMessageBytes = 1 << 20
                    self.answer(rid, hello)
                else:
                    self.script(self, kind, rid)
        except (EOFError, OSError):
            pass

    def close(self):
        self._listener.close()
        if self._conn is not None:
            self._conn.close()
        self._thread.join(JOIN_TIMEOUT)


def test_long_calls_wait_past_the_client_timeout():
    silent = 1.0  # seconds the server says nothing, over three times the client's timeout

    def script(server, kind, rid):
        time.sleep(silent)
        server.answer(rid)

    s = ScriptedServer(script)
    try:
        with Client(s.address, timeout=0.3) as c:
            started = time.monotonic()
            c.compact()  # before: "unavailable" after 0.3 s of silence, the server went on
            c.calibrate("doc", [0.5])
            c.pin("doc")
            c.preload("doc")
            assert time.monotonic() - started >= 4 * silent
        # No deadline sent for them (the server has none for long calls); hello had the client's.
        assert s.requests == [("hello", 300), ("compact", 0), ("calibrate", 0), ("pin", 0),
                              ("preload", 0)]
    finally:
        s.close()


def test_a_timeout_bounds_the_whole_call_and_is_sent_as_the_deadline():
    def script(server, kind, rid):
        if kind == "verify":  # progress every 0.1 s, never an answer
            for done in range(1000):
                def progress(resp, done=done):
                    p = resp.init("progress")
                    p.done, p.total = done, 1000
                server.answer(rid, progress)
                time.sleep(0.1)
        # query: never answered

    s = ScriptedServer(script)
    try:
        c = Client(s.address)
        seen = []
        started = time.monotonic()
        with pytest.raises(Error) as e:
            c.verify(progress=lambda d, t: seen.append(d), timeout=0.6)
        took = time.monotonic() - started
        assert e.value.code == "unavailable"
        assert "no answer within 0.6 s" in e.value.message
        assert 0.6 + DEADLINE_GRACE - 0.1 <= took < 0.6 + DEADLINE_GRACE + 2
        assert len(seen) >= 3  # progress went on all along and did not extend the call
        assert s.requests[-1] == ("verify", 600)
        with pytest.raises(Error) as e:
            c.list()  # the connection was closed: its stream position is unknown
        assert e.value.code == "unavailable"
        c.close()
    finally:
        s.close()


def test_short_calls_send_the_client_timeout_and_honour_their_own():
    def script(server, kind, rid):
        if kind == "list":
            server.answer(rid, lambda resp: resp.init("contexts", 0))
        elif kind == "query":  # the server's answer at the deadline
            server.answer(rid, code="unavailable", message="deadline exceeded")

    s = ScriptedServer(script)
    try:
        import numpy as np
        with Client(s.address, timeout=2.5) as c:
            assert c.list() == []
            with pytest.raises(Error) as e:
                c.query("doc", layer=0, q=np.zeros((1, 1, 8), np.float32), timeout=0.25)
            assert e.value.code == "unavailable" and "deadline" in e.value.message
            assert c.list() == []  # a deadline answered by the server keeps the connection
        assert s.requests == [("hello", 2500), ("list", 2500), ("query", 250), ("list", 2500)]
    finally:
        s.close()
