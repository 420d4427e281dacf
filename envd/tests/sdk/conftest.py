"""Fixtures for driving envd with the official E2B Python SDK.

The SDK's debug mode skips the REST API (there is no node here) and, with
E2B_SANDBOX_URL set, sends all sandbox traffic to that one URL — so the
unmodified SDK talks straight to an envd host process.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

ENVD = os.environ.get("ENVD_BIN", str(pathlib.Path(__file__).parents[3] / "target/debug/envd"))


@pytest.fixture
def envd_root():
    """A scratch root for envd: accounts `root` and `user` (uid 1000)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="envd-sdk-"))
    os.chmod(root, 0o755)  # user 1000 must be able to reach its home
    for d in ("etc", "tmp", "home/user", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
    )
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    os.chown(root / "home/user", 1000, 1000)
    os.chmod(root / "tmp", 0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def envd(envd_root, monkeypatch):
    """A running envd; the SDK environment points at it."""
    proc = subprocess.Popen(
        [ENVD, "--listen", "127.0.0.1:0", "--no-vsock", "--root", str(envd_root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("envd listening on tcp "), line
    addr = line.rsplit(" ", 1)[1]
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://{addr}")
    monkeypatch.setenv("E2B_API_KEY", "unused-in-debug-mode")
    yield envd_root
    proc.kill()
    proc.wait()
