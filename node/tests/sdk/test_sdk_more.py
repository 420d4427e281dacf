"""More of the unmodified E2B SDK through a sandmesh node: commands
(background, callbacks, stdin, kill, PTY, timeouts), the filesystem,
watch_dir, signed file URLs used without SDK headers, connect and error
mapping. One sandbox serves the whole module."""

import time
import urllib.error
import urllib.request
import uuid

import httpx
import pytest
from e2b import (
    CommandExitException,
    NotFoundException,
    PtySize,
    Sandbox,
    TimeoutException,
)
from e2b.sandbox.filesystem.filesystem import FileType

from conftest import module_sandbox, point_sdk_at


@pytest.fixture(scope="module")
def sbx(node):
    with module_sandbox(node) as box:
        yield box


def test_background_wait_and_on_stdout(sbx):
    h = sbx.commands.run("sleep 0.3; echo done", background=True)
    r = h.wait()
    assert r.exit_code == 0 and r.stdout == "done\n"

    seen = []
    r = sbx.commands.run("echo a; echo b 1>&2; echo c", on_stdout=seen.append)
    assert "".join(seen) == "a\nc\n"
    assert r.stderr == "b\n"


def test_stdin(sbx):
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "hello ")
    sbx.commands.send_stdin(h.pid, "stdin\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "hello stdin\n"


def test_kill(sbx):
    h = sbx.commands.run("sleep 30", background=True)
    assert sbx.commands.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()


def test_pty(sbx):
    out = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(h.pid, b"echo pty-$((40+2))\nexit\n")
    h.wait(on_pty=out.extend)
    assert b"pty-42" in out


def test_command_timeout(sbx):
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 5", timeout=1)


def test_files(sbx):
    d = f"/tmp/files-{uuid.uuid4().hex[:8]}"
    assert not sbx.files.exists(d)
    assert sbx.files.make_dir(d)
    assert sbx.files.exists(d)
    data = bytes(range(256)) * 4
    sbx.files.write(f"{d}/a.bin", data)
    assert bytes(sbx.files.read(f"{d}/a.bin", format="bytes")) == data

    info = sbx.files.get_info(f"{d}/a.bin")
    assert info.name == "a.bin" and info.type == FileType.FILE and info.size == len(data)
    sbx.files.make_dir(f"{d}/sub")
    names = {(e.name, e.type) for e in sbx.files.list(d)}
    assert names == {("a.bin", FileType.FILE), ("sub", FileType.DIR)}

    sbx.files.rename(f"{d}/a.bin", f"{d}/b.bin")
    assert not sbx.files.exists(f"{d}/a.bin")
    assert bytes(sbx.files.read(f"{d}/b.bin", format="bytes")) == data
    sbx.files.remove(f"{d}/b.bin")
    assert not sbx.files.exists(f"{d}/b.bin")
    with pytest.raises(NotFoundException):
        sbx.files.read(f"{d}/b.bin")


def test_watch_dir(sbx):
    d = f"/tmp/watch-{uuid.uuid4().hex[:8]}"
    sbx.files.make_dir(d)
    w = sbx.files.watch_dir(d)
    try:
        sbx.files.write(f"{d}/new.txt", "x")
        deadline = time.time() + 10
        names = set()
        while "new.txt" not in names:
            assert time.time() < deadline, "no watch event for new.txt"
            names |= {e.name for e in w.get_new_events()}
            time.sleep(0.2)
    finally:
        w.stop()


def test_signed_urls_without_headers(sbx):
    path = f"/tmp/signed-{uuid.uuid4().hex[:8]}.txt"
    up = sbx.upload_url(path)
    assert "signature=" in up
    r = httpx.post(up, files={"file": ("f.txt", b"uploaded via a signed url")})
    assert r.status_code == 200, r.text
    assert sbx.files.read(path) == "uploaded via a signed url"

    down = sbx.download_url(path)
    with urllib.request.urlopen(down) as resp:
        assert resp.read() == b"uploaded via a signed url"

    # With an expiration.
    down = sbx.download_url(path, use_signature_expiration=60)
    assert "signature_expiration=" in down
    assert httpx.get(down).content == b"uploaded via a signed url"

    # A tampered signature matches no sandbox: 401 JSON.
    bad = down.replace("signature=v1_", "signature=v1_x")
    r = httpx.get(bad)
    assert r.status_code == 401
    assert r.json()["code"] == 401
    # A download signature does not allow an upload.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(sbx.download_url(path), data=b"", method="POST"))
    assert e.value.code == 401


def test_connect_from_a_second_object(sbx, node):
    url, key = node
    with pytest.MonkeyPatch.context() as mp:
        point_sdk_at(mp, url, key)
        other = Sandbox.connect(sbx.sandbox_id)
        assert other.sandbox_id == sbx.sandbox_id
        sbx.files.write("/tmp/shared.txt", "from the first")
        assert other.files.read("/tmp/shared.txt") == "from the first"
        assert other.commands.run("echo second").stdout == "second\n"
        with pytest.raises(NotFoundException):
            Sandbox.connect("i" + "0" * 19)
