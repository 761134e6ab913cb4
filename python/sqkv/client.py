"""A blocking client of `sqkv serve` over one TCP connection (protocol: api/net/sqkv.capnp).

Messages use Cap'n Proto's standard stream framing; tensors travel as little-endian float32
bytes. One Client is one connection and is not safe to share between threads: open one per
thread (the server serves connections concurrently).

Timeouts are per call and overall (not per receive): a call's timeout is sent to the server as
its deadline, so the server answers "unavailable" (deadline exceeded) when it passes and the
connection stays usable; the client itself gives up DEADLINE_GRACE seconds later if no answer
came at all. Long calls (import_file, calibrate, verify, compact, pin, preload) have no timeout
unless given one: they may be silent for minutes.
"""
from __future__ import annotations

import math
import os
import socket
import struct
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import capnp  # pycapnp

__all__ = ["Client", "Error", "load_schema"]

# Largest answer accepted (the server's default message limit).
MAX_MESSAGE_BYTES = 256 << 20
# Upload chunk size when the server allows more.
MAX_CHUNK_BYTES = 4 << 20
# Seconds the client waits past a call's deadline for the server's own answer (which normally
# comes at the deadline) before it gives up and closes the connection.
DEADLINE_GRACE = 2.0
_WORD = 8
_MAX_DEADLINE_MS = (1 << 32) - 1
# "The client's timeout" for short calls, as opposed to None (no limit).
_CLIENT_TIMEOUT = object()

_schema = None


def _schema_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "sqkv.capnp")  # copied in by setup.py
    if os.path.exists(installed):
        return installed
    return os.path.join(here, "..", "..", "api", "net", "sqkv.capnp")  # a source checkout


def load_schema():
    """The wire schema as a pycapnp module (loaded once)."""
    global _schema
    if _schema is None:
        # pycapnp ships capnp/c++.capnp beside its package; the schema imports it.
        imports = [os.path.dirname(os.path.dirname(capnp.__file__))]
        _schema = capnp.load(_schema_path(), imports=imports)
    return _schema


class Error(Exception):
    """A call the server (or the connection) refused.

    code: the status code's name in the schema: "invalidArgument", "notFound", "alreadyExists",
    "corruption", "ioError", "unavailable", "internal" or "cancelled".
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _split_address(addr: str) -> Tuple[str, int]:
    if addr.startswith("["):
        host, _, port = addr[1:].partition("]:")
    else:
        host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {addr!r}: want HOST:PORT, e.g. 127.0.0.1:7781")
    return host, int(port)


def _context(c) -> Dict:
    """A wire Context as the dict `sqkv info --json` prints."""
    return {
        "name": c.name,
        "version": c.version,
        "layers": c.layers,
        "kv_heads": c.kvHeads,
        "tokens": c.tokens,
        "head_dim": c.headDim,
        "dtype": c.dtype,
        "page_tokens": c.pageTokens,
        "centroid_fraction": c.centroidFraction,
        "levels": c.levels,
        "l1_fraction": c.l1Fraction,
        "pages": c.layerFirstPage[-1] if len(c.layerFirstPage) else 0,
        "segment_bytes": c.segmentBytes,
        "index_bytes": c.indexBytes,
        "window_queries": ({"q_heads": c.windowQHeads, "window": c.window}
                           if c.windowQHeads > 0 else None),
        "created_unix": c.createdUnix,
        "build_seconds": c.buildSeconds,
        "source": c.source,
        "kmeans": c.kmeans,
    }


class Client:
    """A connection to `sqkv serve`.

    >>> with Client("127.0.0.1:7781") as c:
    ...     out, lse = c.query("doc", layer=0, q=q, keep=0.1)
    """

    def __init__(self, addr: str, token: Optional[str] = None,
                 timeout: Optional[float] = 60.0):
        """Connects and says hello (with `token` when the server requires one).

        timeout: seconds the connection, and each short call (query, list, info, remove, stats,
        tier_stats, unpin, list_pins), may take in all; sent to the server as the call's
        deadline. None: no limit here (the server's default deadline, 60 s, still applies to
        short calls). Long calls take their own timeout= argument and have none by default.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        self._schema = load_schema()
        self._timeout = timeout
        host, port = _split_address(addr)
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_id = 1
        try:
            self._call(lambda r: self._hello(r, token))
        except BaseException:
            self.close()
            raise

    # ---- plumbing ----

    def _hello(self, req, token):
        h = req.init("hello")
        h.protocolVersion = self._schema.protocolVersion
        h.token = (token or "").encode()
        h.client = "sqkv-python 0.1.0"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _arm(self, give_up: Optional[float]) -> None:
        """Lets the next socket operation run until `give_up` (time.monotonic(); None: for
        ever)."""
        if give_up is None:
            self._sock.settimeout(None)
            return
        left = give_up - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self._sock.settimeout(left)

    def _recv_exactly(self, n: int, give_up: Optional[float]) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._arm(give_up)
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise Error("unavailable", "server closed the connection")
            got += k
        return bytes(buf)

    def _read_frame(self, give_up: Optional[float]) -> bytes:
        first = self._recv_exactly(_WORD, give_up)
        segments = struct.unpack_from("<I", first, 0)[0] + 1
        table_words = (1 + segments + 1) // 2
        if segments > 64:
            raise Error("internal", f"answer has {segments} segments")
        table = first + self._recv_exactly((table_words - 1) * _WORD, give_up)
        sizes = struct.unpack_from(f"<{segments}I", table, 4)
        total = (table_words + sum(sizes)) * _WORD
        if total > MAX_MESSAGE_BYTES:
            raise Error("internal", f"answer of {total} bytes exceeds the limit")
        return table + self._recv_exactly(total - len(table), give_up)

    def _read_response(self, give_up: Optional[float]):
        """The next answer, as a context manager over the decoded Response."""
        frame = self._read_frame(give_up)
        return self._schema.Response.from_bytes(
            frame, traversal_limit_in_words=2 * len(frame) // _WORD + 64, nesting_limit=16)

    def _call(self, build: Callable, read: Optional[Callable] = None,
              progress: Optional[Callable[[int, int], None]] = None,
              timeout=_CLIENT_TIMEOUT):
        """Sends one request (filled in by build(request)) and returns read(response) for the
        answer; progress answers go to progress(done, total).

        timeout: seconds for the whole call (None: no limit; default: the client's), sent as
        the request's deadline; the client gives up DEADLINE_GRACE seconds after it."""
        if self._sock is None:
            raise Error("unavailable", "client is closed")
        if timeout is _CLIENT_TIMEOUT:
            timeout = self._timeout
        req = self._schema.Request.new_message()
        req.id = self._next_id
        self._next_id += 1
        build(req)
        give_up = None
        if timeout is not None:
            if timeout <= 0:
                raise Error("unavailable", "deadline exceeded before the call was sent")
            req.deadlineMs = min(max(1, math.ceil(timeout * 1000)), _MAX_DEADLINE_MS)
            give_up = time.monotonic() + timeout + DEADLINE_GRACE
        answered = False  # the call's last frame was read: the stream is at a frame boundary
        try:
            self._arm(give_up)
            try:
                self._sock.sendall(req.to_bytes())
            except OSError as e:
                # The server may have answered before reading the whole request (a message over
                # its limit, a busy server) and closed: its answer says why, the broken pipe not.
                early = self._early_answer()
                if early is not None:
                    raise early from e
                raise
            while True:
                with self._read_response(give_up) as resp:
                    if resp.id == 0 and resp.status.code != "ok":
                        # The server could not decode or accept the request and says why; it
                        # may close the connection after this answer.
                        answered = True
                        err = Error(str(resp.status.code), resp.status.message)
                        self.close()
                        raise err
                    if resp.id != req.id:
                        raise Error("internal", f"answer to request {resp.id}, not {req.id}")
                    if resp.status.code != "ok":
                        answered = True
                        raise Error(str(resp.status.code), resp.status.message)
                    if resp.which() == "progress":
                        if progress is not None:
                            progress(resp.progress.done, resp.progress.total)
                        continue
                    answered = True
                    return read(resp) if read is not None else None
        except socket.timeout as e:
            self.close()  # the stream position is unknown now
            raise Error("unavailable",
                        f"no answer within {timeout:g} s (and {DEADLINE_GRACE:g} s of grace); "
                        "the server may still finish the call") from e
        except (OSError, capnp.KjException) as e:
            self.close()  # the stream position is unknown now
            raise Error("unavailable", f"connection failed: {e}") from e
        except BaseException:
            # Anything else before the answer (Ctrl-C, an exception out of `progress`) leaves the
            # stream mid-call: closed, which also tells the server (it stops an import or
            # rebuild and publishes nothing).
            if not answered:
                self.close()
            raise

    def _early_answer(self) -> Optional["Error"]:
        """After a failed send: the error answer the server sent before it closed, if one can be
        read at once (half a second at most); None otherwise. Closes the client either way."""
        err = None
        try:
            self._sock.settimeout(0.5)
            with self._read_response(time.monotonic() + 0.5) as resp:
                if resp.status.code != "ok":
                    err = Error(str(resp.status.code), resp.status.message)
        except (OSError, capnp.KjException, Error):
            pass
        self.close()
        return err

    # ---- calls ----

    def query(self, name: str, layer: int, q, keep: float = 0.1, dense: bool = False,
              device: str = "auto", sparsity: Optional[float] = None,
              want_selection: bool = False, timeout=_CLIENT_TIMEOUT):
        """Attention of `q` over one layer of the context.

        q: (q_heads, n, head_dim) array (converted to float32); q_heads a multiple of the
        context's kv heads.
        keep: keep whole clusters until this fraction of the keys; dense: attend to every key;
        sparsity: use the calibrated threshold for this sparsity instead (see calibrate).
        Returns (output (q_heads, n, head_dim) float32, lse (q_heads, n) float32, natural log);
        with want_selection, also the attended token positions per kv head (a list of arrays).
        timeout: seconds (None: no limit); default: the client's.
        """
        q = np.ascontiguousarray(q, dtype="<f4")
        if q.ndim != 3:
            raise ValueError(f"q must be (q_heads, n, head_dim), got shape {q.shape}")
        q_heads, n, head_dim = (int(x) for x in q.shape)

        def build(req):
            c = req.init("query")
            c.name = name
            c.layer = layer
            c.qHeads = q_heads
            c.n = n
            c.headDim = head_dim
            c.q = q.tobytes()
            c.mode = "dense" if dense else "keepFraction"
            c.keepFraction = float(keep)
            c.device = device
            c.wantSelection = want_selection
            c.sparsity = -1.0 if sparsity is None else float(sparsity)

        def read(resp):
            r = resp.query
            out = np.frombuffer(r.output, dtype="<f4").reshape(q_heads, n, head_dim).copy()
            lse = np.frombuffer(r.lse, dtype="<f4").reshape(q_heads, n).copy()
            if not want_selection:
                return out, lse
            sel = [np.array(list(t), dtype=np.int32) for t in r.selectedTokens]
            return out, lse, sel

        return self._call(build, read, timeout=timeout)

    def list(self) -> List[Dict]:
        """Every context, as the dicts `sqkv ls --json` prints."""
        def build(req):
            req.list = None
        return self._call(build, lambda r: [_context(c) for c in r.contexts])

    def info(self, name: str) -> Dict:
        """One context, as the dict `sqkv info --json` prints."""
        def build(req):
            req.info = name
        return self._call(build, lambda r: _context(r.context))

    def remove(self, name: str) -> None:
        def build(req):
            req.remove = name
        self._call(build)

    def import_file(self, name: str, path: str, centroid_fraction: float = 0.05,
                    page_tokens: int = 16, levels: int = 1, l1_fraction: float = 0.01,
                    kmeans_iterations: int = 20, kmeans_device: str = "auto",
                    progress: Optional[Callable[[int, int], None]] = None,
                    timeout: Optional[float] = None) -> Dict:
        """Uploads a safetensors context (k.<l>, v.<l>, optional q.<l>; see the README's import
        format) and imports it as `name`. Returns the new context's dict.

        timeout: seconds for the whole import, upload included (None: no limit; each upload
        step then has the client's timeout, and the indexing none). When it passes during the
        indexing, the server stops the import at its next (layer, kv head) and publishes nothing,
        as it does when the client goes away (e.g. an exception out of `progress`); an import
        already publishing when it passes still completes: look with info() before retrying.
        """
        total = os.path.getsize(path)
        ends = None if timeout is None else time.monotonic() + timeout

        def step_timeout(last: bool):
            if ends is None:
                return None if last else _CLIENT_TIMEOUT
            return ends - time.monotonic()

        def begin(req):
            b = req.init("importBegin")
            b.name = name
            b.fileName = os.path.basename(path)
            b.totalBytes = total
            o = b.init("options")
            o.centroidFraction = centroid_fraction
            o.pageTokens = page_tokens
            o.levels = levels
            o.l1Fraction = l1_fraction
            o.kmeansIterations = kmeans_iterations
            o.kmeansDevice = kmeans_device

        upload_id, chunk = self._call(
            begin, lambda r: (r.importBegin.uploadId, r.importBegin.chunkBytes),
            timeout=step_timeout(False))
        chunk = max(1, min(chunk, MAX_CHUNK_BYTES))
        with open(path, "rb") as f:
            offset = 0
            while offset < total:
                data = f.read(chunk)
                if not data:
                    raise Error("ioError", f"{path} shrank while being uploaded")

                def piece(req, data=data, offset=offset):
                    c = req.init("importChunk")
                    c.uploadId = upload_id
                    c.offset = offset
                    c.data = data
                self._call(piece, timeout=step_timeout(False))
                offset += len(data)

        def end(req):
            req.init("importEnd").uploadId = upload_id
        return self._call(end, lambda r: _context(r.context), progress,
                          timeout=step_timeout(True))

    def stats(self) -> Dict:
        def build(req):
            req.stats = None

        def read(r):
            s = r.stats
            return {f: getattr(s, f) for f in (
                "contexts", "tokens", "keys", "segmentBytes", "indexBytes", "garbageSegmentBytes",
                "catalogBytes", "liveVersions", "garbageVersions", "calibratedContexts")}
        return self._call(build, read)

    def tier_stats(self) -> Dict:
        """The server's tiers since it started: host page cache, disk reads, device pool and
        layer index cache (counters and current sizes; field names as in the schema)."""
        def build(req):
            req.tierStats = None

        def read(r):
            t = r.tierStats
            out = {f: getattr(t, f) for f in t.schema.fieldnames}
            out["diskReadUsLog2"] = list(out["diskReadUsLog2"])
            return out
        return self._call(build, read)

    def verify(self, name: str = "",
               progress: Optional[Callable[[int, int], None]] = None,
               timeout: Optional[float] = None) -> List[str]:
        """Checks checksums and index invariants of `name` (all contexts when empty); returns
        the problems found (empty when all is well). timeout: seconds (None: no limit)."""
        def build(req):
            req.verify = name
        return self._call(build, lambda r: [str(p) for p in r.verifyReport.problems], progress,
                          timeout=timeout)

    def compact(self, timeout: Optional[float] = None) -> None:
        """Reclaims removed and superseded versions no reader uses. timeout: seconds (None: no
        limit)."""
        def build(req):
            req.compact = None
        self._call(build, timeout=timeout)

    def calibrate(self, name: str, sparsities: Sequence[float],
                  timeout: Optional[float] = None) -> None:
        """Calibrates per-layer thresholds from the window queries stored at import.
        timeout: seconds (None: no limit)."""
        def build(req):
            c = req.init("calibrate")
            c.name = name
            c.useStoredQueries = True
            s = c.init("sparsities", len(sparsities))
            for i, v in enumerate(sparsities):
                s[i] = float(v)
        self._call(build, timeout=timeout)

    def pin(self, name: str, tier: str = "host", timeout: Optional[float] = None) -> None:
        """Keeps the context resident in `tier` ("host" or "device"), persisted; loads it now.
        timeout: seconds (None: no limit)."""
        def build(req):
            c = req.init("pin")
            c.name = name
            c.tier = tier
        self._call(build, timeout=timeout)

    def unpin(self, name: str) -> None:
        def build(req):
            req.unpin = name
        self._call(build)

    def preload(self, name: str, tier: str = "host", timeout: Optional[float] = None) -> None:
        """Warms the context into `tier` without pinning it. timeout: seconds (None: no
        limit)."""
        def build(req):
            c = req.init("preload")
            c.name = name
            c.tier = tier
        self._call(build, timeout=timeout)

    def list_pins(self) -> List[Tuple[str, str]]:
        def build(req):
            req.listPins = None
        return self._call(build, lambda r: [(p.name, str(p.tier)) for p in r.pins])
