"""The Python client against a live `sqkv serve`: the same answers as the C++ CLI through the
same server (bit for bit), admin calls, errors, authentication."""
import json
import os
import time

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("capnp")

from conftest import Server, run  # noqa: E402
from sqkv import Client, Error  # noqa: E402


def test_import_list_info_query_remove(sqkv_bin, server, synth, tmp_path):
    ctx, qpath = synth
    with Client(server.address) as c:
        # Too quick for the server's progress tick: test_import_reports_progress checks it.
        info = c.import_file("doc", ctx, progress=lambda d, t: None)
        assert info["name"] == "doc" and info["tokens"] == 400 and info["layers"] == 2
        cli_ls = json.loads(run(sqkv_bin, "--server", server.address, "ls", "--json").stdout)
        assert c.list() == cli_ls
        cli_info = json.loads(run(sqkv_bin, "--server", server.address, "info", "doc",
                                  "--json").stdout)
        assert c.info("doc") == cli_info

        q = np.load(qpath)
        for dense in (False, True):
            out_dir = str(tmp_path / f"cli-{dense}")
            mode = ["--dense"] if dense else ["--keep", "0.2"]
            run(sqkv_bin, "--server", server.address, "query", "doc", "--layer", "1",
                "--queries", qpath, "--out", out_dir, *mode)
            out, lse = c.query("doc", layer=1, q=q, keep=0.2, dense=dense)
            assert out.shape == (4, 3, 64) and out.dtype == np.float32
            assert lse.shape == (4, 3)
            assert np.array_equal(out, np.load(os.path.join(out_dir, "output.npy")))
            assert np.array_equal(lse, np.load(os.path.join(out_dir, "lse.npy")))
        out, lse, sel = c.query("doc", layer=0, q=q, keep=0.1, want_selection=True)
        assert len(sel) == 2 and all(np.all(np.diff(s) > 0) for s in sel)

        assert c.stats()["contexts"] == 1
        tiers = c.tier_stats()
        assert tiers["indexLayersCached"] >= 1 and tiers["indexBytesCached"] > 0
        assert tiers["hostHits"] + tiers["hostMisses"] > 0
        assert tiers["indexCapacityBytes"] == 1 << 30
        assert c.verify() == []
        c.calibrate("doc", [0.5, 0.9])
        out_s, _ = c.query("doc", layer=0, q=q, sparsity=0.9)
        assert np.all(np.isfinite(out_s))
        c.pin("doc", "host")
        assert c.list_pins() == [("doc", "host")]
        c.unpin("doc")
        c.preload("doc")
        assert c.list_pins() == []
        c.compact()
        c.remove("doc")
        assert c.list() == []


def test_import_reports_progress(sqkv_bin, server, tmp_path):
    # 4 layers x 4 kv heads of 4096 tokens with 80 K-means iterations: about 3 s of indexing on
    # two cores, reported after each of the 16 heads, so the server (which sends progress at
    # most every 250 ms, when it changed) has many chances to send some.
    layers, kv_heads = 4, 4
    ctx = str(tmp_path / "big.safetensors")
    run(sqkv_bin, "synth", ctx, "--tokens", "4096", "--layers", str(layers), "--kv-heads",
        str(kv_heads), "--q-heads", "8", "-n", "1", "--head-dim", "64")
    seen = []
    with Client(server.address) as c:
        info = c.import_file("big", ctx, kmeans_iterations=80,
                             progress=lambda d, t: seen.append((d, t)))
    assert info["layers"] == layers
    assert seen, "no progress answer during a multi-second import"
    assert all(t == layers * kv_heads and 1 <= d <= t for d, t in seen), seen
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), seen


def _long_import_file(sqkv_bin, tmp_path):
    """A context of 8 layers x 4 kv heads of 4096 tokens: with 80 K-means iterations, about 6 s
    of indexing on two cores, far longer than the 250 ms in which the server notices a client
    gone or a deadline passed."""
    ctx = str(tmp_path / "long.safetensors")
    run(sqkv_bin, "synth", ctx, "--tokens", "4096", "--layers", "8", "--kv-heads", "4",
        "--q-heads", "8", "-n", "1", "--head-dim", "64")
    return ctx


def _wait_for_uploads_gone(data_dir, limit=120.0):
    """The server removes an upload when the store call importing it has returned (cancelled or
    not): after that, what the import left in the catalog is final."""
    uploads = os.path.join(data_dir, "uploads")
    ends = time.monotonic() + limit
    while os.path.isdir(uploads) and os.listdir(uploads):
        assert time.monotonic() < ends, f"upload still there: {os.listdir(uploads)}"
        time.sleep(0.05)


class _GoAway(Exception):
    pass


def test_import_stops_when_its_client_goes_away(sqkv_bin, server, tmp_path):
    ctx = _long_import_file(sqkv_bin, tmp_path)
    seen = []

    def progress(done, total):
        seen.append(done)
        raise _GoAway()  # out of import_file, mid-call

    c = Client(server.address)
    with pytest.raises(_GoAway):  # no with block: the client closes itself, mid-call
        c.import_file("long", ctx, kmeans_iterations=80, progress=progress)
    assert seen and seen[0] < 32
    with pytest.raises(Error) as e:
        c.list()
    assert e.value.code == "unavailable" and "closed" in str(e.value)
    _wait_for_uploads_gone(str(tmp_path / "data"))
    with Client(server.address) as c:
        assert c.list() == []
        c.import_file("small", ctx, kmeans_iterations=1)  # the server serves on
        assert [x["name"] for x in c.list()] == ["small"]


def test_import_past_its_deadline_publishes_nothing(sqkv_bin, server, tmp_path):
    ctx = _long_import_file(sqkv_bin, tmp_path)
    with Client(server.address) as c:
        with pytest.raises(Error) as e:
            c.import_file("long", ctx, kmeans_iterations=80, timeout=1.0)
        assert e.value.code == "unavailable", e.value
    _wait_for_uploads_gone(str(tmp_path / "data"))
    with Client(server.address) as c:
        assert c.list() == []


def test_errors_carry_the_store_code(server, synth):
    ctx, qpath = synth
    with Client(server.address) as c:
        with pytest.raises(Error) as e:
            c.info("missing")
        assert e.value.code == "notFound"
        c.import_file("doc", ctx)
        with pytest.raises(Error) as e:
            c.import_file("doc", ctx)
        assert e.value.code == "alreadyExists"
        q = np.load(qpath)
        with pytest.raises(Error) as e:
            c.query("doc", layer=9, q=q)
        assert e.value.code == "invalidArgument"
        with pytest.raises(Error) as e:
            c.query("doc", layer=0, q=q[:3])  # 3 query heads over 2 kv heads
        assert e.value.code == "invalidArgument"
        # The connection is still usable after errors.
        assert [x["name"] for x in c.list()] == ["doc"]


def test_refused_messages_carry_the_servers_reason(sqkv_bin, tmp_path, synth):
    """A request over the server's message limit is refused before it is read (an answer with
    id 0, then the connection closes): the client raises the server's reason, whether its send
    completed (a message that fits the socket buffers) or broke off (a large one). It raised
    "answer to request 0" or "Broken pipe" before."""
    ctx, _ = synth
    s = Server(sqkv_bin, str(tmp_path / "data"), ["--max-message-mib", "1"])
    try:
        with Client(s.address) as c:
            c.import_file("doc", ctx)
        for n in (1100, 40000):  # 1.1 MB and 41 MB of q
            q = np.zeros((4, n, 64), dtype=np.float32)
            with Client(s.address) as c:
                with pytest.raises(Error) as e:
                    c.query("doc", layer=0, q=q)
            assert e.value.code == "invalidArgument", (n, e.value)
            assert "exceeds the limit" in str(e.value), (n, e.value)
        with Client(s.address) as c:  # the server is fine
            assert [x["name"] for x in c.list()] == ["doc"]
    finally:
        assert s.stop() == 0


def test_token(sqkv_bin, tmp_path):
    token = tmp_path / "token"
    token.write_text("py-secret\n")
    s = Server(sqkv_bin, str(tmp_path / "data"), ["--auth-token-file", str(token)])
    try:
        with Client(s.address, token="py-secret") as c:
            assert c.list() == []
        for bad in (None, "wrong"):
            with pytest.raises(Error) as e:
                Client(s.address, token=bad)
            assert e.value.code == "unavailable"
    finally:
        assert s.stop() == 0


def test_bad_address():
    with pytest.raises(ValueError):
        Client("no-port")
