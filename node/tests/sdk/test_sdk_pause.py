"""Pause, resume, connect and auto-pause with the unmodified E2B SDK.

A paused sandbox is saved whole (memory and files) by the runtime
(`runsc checkpoint` here) and stopped; `Sandbox.connect` restores it under
the same id and token.
"""

import concurrent.futures
import os
import time
import uuid

from e2b import Sandbox, SandboxQuery, SandboxState

from conftest import COUNTER, counter

# Pause/resume cycles of the first test, and how long the counter may take
# to show progress (fewer cycles, more time on the emulated L1 host, where
# a guest's Python takes many seconds to start).
CYCLES = int(os.environ.get("SANDMESH_SDK_PAUSE_CYCLES", "50"))
STATE_TIMEOUT = float(os.environ.get("SANDMESH_SDK_STATE_TIMEOUT", "10"))


def test_pause_resume_keeps_memory_and_files_50_times(sdk_env):
    sbx = Sandbox.create(timeout=900, metadata={"suite": "pause"})
    sandbox_id = sbx.sandbox_id
    try:
        sbx.files.write("/home/user/note.txt", "written before the first pause")
        sbx.files.write("/tmp/counter.py", COUNTER)
        # timeout=0: the SDK's default (60 s) is a deadline envd enforces by
        # killing the process, as E2B's does, and the 50 cycles can take
        # longer than that on a loaded machine (the guest's clock runs on
        # across pauses).
        sbx.commands.run("python3 /tmp/counter.py", background=True, timeout=0)
        pid, secret, n = counter(sbx, timeout=STATE_TIMEOUT)

        pause_s, resume_s = [], []
        for cycle in range(CYCLES):
            t0 = time.monotonic()
            assert sbx.pause() is True
            pause_s.append(time.monotonic() - t0)
            if cycle == 0:
                assert Sandbox.get_info(sandbox_id).state == SandboxState.PAUSED
                paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
                assert sandbox_id in [s.sandbox_id for s in paused]
                assert paused[[s.sandbox_id for s in paused].index(sandbox_id)].metadata["suite"] == "pause"
                # Pausing twice: the SDK's documented False.
                assert sbx.pause() is False
            t0 = time.monotonic()
            sbx = Sandbox.connect(sandbox_id, timeout=900)
            resume_s.append(time.monotonic() - t0)
            assert sbx.sandbox_id == sandbox_id
            pid2, secret2, n2 = counter(sbx, after=n, timeout=STATE_TIMEOUT)
            assert (pid2, secret2) == (pid, secret), f"cycle {cycle}: the process restarted"
            n = n2
        assert sbx.files.read("/home/user/note.txt") == "written before the first pause"
        assert Sandbox.get_info(sandbox_id).state == SandboxState.RUNNING
        pause_s.sort()
        resume_s.sort()
        mid = CYCLES // 2
        print(f"{CYCLES} cycles: pause p50 {pause_s[mid]*1000:.0f} ms, resume (connect) p50 {resume_s[mid]*1000:.0f} ms")
    finally:
        assert Sandbox.kill(sandbox_id)


def test_auto_pause_at_timeout_then_connect_and_kill(sdk_env):
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"}, metadata={"tag": tag})
    sandbox_id = sbx.sandbox_id
    sbx.files.write("/tmp/auto.txt", "kept across auto-pause")
    deadline = time.monotonic() + 30
    while Sandbox.get_info(sandbox_id).state != SandboxState.PAUSED:
        assert time.monotonic() < deadline, "not auto-paused at its timeout"
        time.sleep(0.25)
    listed = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])).next_items()
    assert [s.sandbox_id for s in listed] == [sandbox_id]

    sbx = Sandbox.connect(sandbox_id, timeout=60)
    assert sbx.files.read("/tmp/auto.txt") == "kept across auto-pause"
    assert sbx.pause() is True
    # Killing a paused sandbox deletes it (and its snapshot).
    assert Sandbox.kill(sandbox_id) is True
    assert Sandbox.kill(sandbox_id) is False
    assert Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items() == []


def test_twenty_sandboxes_from_one_template_are_independent(sdk_env):
    """20 creates at once, all restored from the base template's snapshot:
    each has its own identity, files and randomness."""
    tag = uuid.uuid4().hex

    def one(i):
        sbx = Sandbox.create(timeout=300, metadata={"tag": tag})
        sbx.files.write("/tmp/mine.txt", f"box {i}")
        r = sbx.commands.run(
            "python3 -c 'import os; print(os.urandom(16).hex())'; echo $E2B_SANDBOX_ID; cat /tmp/mine.txt"
        )
        return sbx, r.stdout.split("\n")

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    try:
        randoms = [out[0] for _, out in results]
        assert len(set(randoms)) == 20, "two sandboxes drew the same random bytes"
        for i, (sbx, out) in enumerate(results):
            assert out[1] == sbx.sandbox_id, "the sandbox knows its own id"
            assert out[2] == f"box {i}"
        listed = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert len(listed) == 20
    finally:
        for sbx, _ in results:
            sbx.kill()


def test_a_paused_sandbox_whose_local_copy_is_gone_resumes_from_the_store(node_factory, monkeypatch):
    """kill -9 the node with a sandbox paused, then wipe the node's local
    snapshot copies (a replaced disk, a cleaned cache): the restarted node
    still lists it paused and resumes it, memory and files, from the object
    store it was published to."""
    import pathlib
    import shutil

    from conftest import point_sdk_at

    first = node_factory(kill_on_exit=False)
    point_sdk_at(monkeypatch, first.url, first.key)
    sbx = Sandbox.create(timeout=300)
    sbx.files.write("/tmp/which.txt", "from the store")
    pid = sbx.commands.run("sleep 3600 >/dev/null 2>&1 & echo $!").stdout.strip()
    assert sbx.pause()
    first.crash()
    snapshots = pathlib.Path(first.data) / "snapshots"
    wiped = [d for d in snapshots.iterdir()]
    assert wiped, "the pause left a local copy"
    for d in wiped:
        shutil.rmtree(d)

    second = node_factory()
    point_sdk_at(monkeypatch, second.url, first.key)
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.files.read("/tmp/which.txt") == "from the store"
    assert resumed.commands.run(f"kill -0 {pid} && echo alive").stdout == "alive\n"
    assert resumed.kill()


def test_node_restart_keeps_paused_sandboxes(node_factory, monkeypatch):
    """kill -9 the node with one sandbox paused and one running: the new
    node lists both, resumes the paused one with its files."""
    from conftest import point_sdk_at

    first = node_factory(kill_on_exit=False)
    point_sdk_at(monkeypatch, first.url, first.key)
    paused = Sandbox.create(timeout=300)
    running = Sandbox.create(timeout=300)
    paused.files.write("/tmp/which.txt", "the paused one")
    assert paused.pause()
    first.crash()

    second = node_factory()
    point_sdk_at(monkeypatch, second.url, first.key)
    assert Sandbox.get_info(paused.sandbox_id).state == SandboxState.PAUSED
    assert Sandbox.get_info(running.sandbox_id).state == SandboxState.RUNNING
    sbx = Sandbox.connect(paused.sandbox_id)
    assert sbx.files.read("/tmp/which.txt") == "the paused one"
    assert Sandbox.connect(running.sandbox_id).commands.run("echo up").stdout == "up\n"
    assert sbx.kill()
    assert Sandbox.kill(running.sandbox_id)
