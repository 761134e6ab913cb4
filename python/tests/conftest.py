"""Fixtures: the sqkv binary (from $SQKV_BIN_DIR, as ctest sets it, or a build directory of this
checkout) and a live `sqkv serve` on 127.0.0.1 with a free port over a scratch store."""
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "python"))  # the package of this checkout

# Bounded waits (seconds).
START_TIMEOUT = 15
STOP_TIMEOUT = 20


def _find_binary():
    candidates = []
    if os.environ.get("SQKV_BIN_DIR"):
        candidates.append(os.path.join(os.environ["SQKV_BIN_DIR"], "tools", "sqkv"))
    for build in ("build", "build-net", "build-main"):
        candidates.append(os.path.join(REPO, build, "tools", "sqkv"))
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture(scope="session")
def sqkv_bin():
    path = _find_binary()
    if path is None:
        pytest.skip("sqkv binary not built (set SQKV_BIN_DIR)")
    return path


def run(sqkv_bin, *args, check=True):
    r = subprocess.run([sqkv_bin, *args], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"sqkv {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


class Server:
    def __init__(self, sqkv_bin, data_dir, extra=()):
        self.proc = subprocess.Popen(
            [sqkv_bin, "serve", "--data", data_dir, "--listen", "127.0.0.1:0",
             "--metrics-listen", "off", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        line = self.proc.stdout.readline()  # "listening on HOST:PORT"
        if not line.startswith("listening on ") or time.monotonic() > deadline:
            self.proc.kill()
            raise RuntimeError(f"sqkv serve did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[2].rstrip(",")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def server(sqkv_bin, tmp_path):
    s = Server(sqkv_bin, str(tmp_path / "data"))
    yield s
    assert s.stop() == 0


@pytest.fixture
def synth(sqkv_bin, tmp_path):
    """A small synthetic context file and layer-0 queries (q_heads 4, n 3, head_dim 64)."""
    ctx, q = str(tmp_path / "ctx.safetensors"), str(tmp_path / "q.npy")
    run(sqkv_bin, "synth", ctx, "--queries-out", q, "--tokens", "400", "--layers", "2",
        "--kv-heads", "2", "--q-heads", "4", "-n", "3", "--head-dim", "64")
    return ctx, q
