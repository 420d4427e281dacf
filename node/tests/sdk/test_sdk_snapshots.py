"""Snapshots and forks with the unmodified E2B SDK.

`create_snapshot` copies a running sandbox (it keeps running, same id) into
the object store; `Sandbox.create(snapshot_id)` starts a new sandbox from the
copy, memory included; `fork(count=N)` makes N such sandboxes at once.
"""


import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from conftest import COUNTER, counter

@pytest.fixture
def source(sdk_env):
    """A sandbox with a file and a counter running in it."""
    sbx = Sandbox.create(timeout=300, metadata={"suite": "snapshots"})
    sbx.files.write("/home/user/note.txt", "from the source")
    sbx.files.write("/tmp/counter.py", COUNTER)
    sbx.commands.run("python3 /tmp/counter.py", background=True, timeout=0)
    counter(sbx)
    yield sbx
    sbx.kill()


def test_a_snapshot_keeps_the_source_running_and_creates_sandboxes_with_its_memory(source):
    pid, secret, n = counter(source)
    snap = source.create_snapshot(name="with-counter")
    assert snap.snapshot_id.startswith("snap-"), snap
    assert snap.names == ["with-counter"]
    # The source runs on: same id, same process, its counter advancing.
    assert source.is_running()
    assert counter(source, after=n)[:2] == (pid, secret)

    listed = Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()
    assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
    by_name = Sandbox.list_snapshots(name="with-counter").next_items()
    assert snap.snapshot_id in [s.snapshot_id for s in by_name]

    copy = Sandbox.create(snap.snapshot_id, timeout=120)
    try:
        assert copy.sandbox_id != source.sandbox_id
        # Its own identity and token; the source's memory and files.
        assert copy.commands.run("echo $E2B_SANDBOX_ID").stdout.strip() == copy.sandbox_id
        assert copy.files.read("/home/user/note.txt") == "from the source"
        assert counter(copy)[:2] == (pid, secret)
        # Separate from then on.
        copy.files.write("/home/user/note.txt", "changed in the copy")
        assert source.files.read("/home/user/note.txt") == "from the source"
    finally:
        copy.kill()

    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    assert snap.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    with pytest.raises(SandboxException):
        Sandbox.create(snap.snapshot_id, timeout=60)


COUNTER_RUNS = """
import os
print(any(b'counter.py' in open(f'/proc/{p}/cmdline', 'rb').read()
          for p in os.listdir('/proc') if p.isdigit()))
"""


def test_a_filesystem_snapshot_boots_fresh_sandboxes_with_its_files(source):
    pid, secret, n = counter(source)
    # Written by a process and never synced by it: the snapshot flushes the
    # guest's cache first. A file of the template deleted: the deletion
    # travels too.
    source.commands.run("echo written-by-a-command > /home/user/cmd.txt")
    source.commands.run("test -e /etc/hostname && rm /etc/hostname", user="root")
    snap = source.create_snapshot(mode="filesystem")
    assert snap.snapshot_id.startswith("snap-"), snap
    assert source.is_running()
    assert counter(source, after=n)[:2] == (pid, secret)

    copy = Sandbox.create(snap.snapshot_id, timeout=120)
    try:
        assert copy.commands.run("echo $E2B_SANDBOX_ID").stdout.strip() == copy.sandbox_id
        assert copy.files.read("/home/user/note.txt") == "from the source"
        assert copy.files.read("/home/user/cmd.txt") == "written-by-a-command\n"
        assert copy.commands.run("test -e /etc/hostname || echo gone").stdout.strip() == "gone"
        # A fresh boot: the files, not the processes.
        copy.files.write("/tmp/counter_runs.py", COUNTER_RUNS)
        assert copy.commands.run("python3 /tmp/counter_runs.py").stdout.strip() == "False"
        copy.files.write("/home/user/note.txt", "changed in the copy")
        assert source.files.read("/home/user/note.txt") == "from the source"
    finally:
        copy.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True


def test_fork_makes_independent_copies_and_the_source_keeps_its_id(source):
    pid, secret, n = counter(source)
    before = source.get_info()
    forks = source.fork(count=2, timeout=120)
    try:
        assert len(forks) == 2, forks
        for f in forks:
            assert isinstance(f, Sandbox), f
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 2 and source.sandbox_id not in ids
        for i, f in enumerate(forks):
            assert f.files.read("/home/user/note.txt") == "from the source"
            assert counter(f)[:2] == (pid, secret)
            f.files.write("/home/user/note.txt", f"fork {i}")
        assert [f.files.read("/home/user/note.txt") for f in forks] == ["fork 0", "fork 1"]
        assert source.files.read("/home/user/note.txt") == "from the source"
        # The source keeps its id and deadline.
        after = source.get_info()
        assert after.sandbox_id == before.sandbox_id
        assert after.end_at == before.end_at
        assert counter(source, after=n)[:2] == (pid, secret)
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()


def test_bad_fork_and_snapshot_requests_are_clear_errors(source, sdk_env):
    url, key = sdk_env
    api = httpx.Client(base_url=url, headers={"X-API-KEY": key}, timeout=30)
    # The SDK checks the count itself; the server does too.
    for body in ({"count": 21}, {"count": 0}, {"count": "two"}):
        r = api.post(f"/sandboxes/{source.sandbox_id}/fork", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["code"] == 400 and r.json()["message"], r.text
    r = api.post(f"/sandboxes/{source.sandbox_id}/fork", content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == 400, r.text
    r = api.post("/sandboxes/nosuchsandbox0000000/fork", json={"count": 1})
    assert r.status_code == 404 and r.json()["code"] == 404, r.text
    r = api.post(f"/sandboxes/{source.sandbox_id}/snapshots", json={"name": ""})
    assert r.status_code == 400, r.text
    r = api.delete("/templates/snap-nosuchsnapshot")
    assert r.status_code == 404 and r.json()["code"] == 404, r.text
    # Nothing was made of them: the source runs, no snapshot of it exists.
    assert source.is_running()
    assert Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items() == []
