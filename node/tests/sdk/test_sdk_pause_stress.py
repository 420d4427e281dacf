"""Pause and resume under a loaded host: no pause may yield a snapshot that
does not resume.

Each of 50 sandboxes runs a process whose state lives only in its memory
(a secret and a counter, as in test_sdk_pause.py), is paused while the
host's CPUs are saturated by burners and while a client keeps calling into
the sandbox (so connections open and close around the checkpoint), then
resumed: the same process, the same secret, a counter that carries on.

A pause is allowed to be *refused* (409, the sandbox keeps running, the
SDK raises): then the sandbox must still answer and a later pause must
work. What is never allowed is a pause that says yes and leaves a snapshot
that cannot be resumed.
"""

import concurrent.futures
import multiprocessing
import os
import threading
import time

from e2b import Sandbox, SandboxState

from conftest import COUNTER, counter

SANDBOXES = 50
AT_ONCE = 5


def _burn(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def _caller(sbx, stop, errors):
    """Keep opening connections into the sandbox until told to stop; errors
    while it is paused or being paused are expected and ignored."""
    while not stop.is_set():
        try:
            sbx.commands.run("true", request_timeout=5)
        except Exception as e:  # noqa: BLE001 - any failure during a pause is fine
            errors.append(type(e).__name__)
            time.sleep(0.01)


def _cycle(i):
    sbx = Sandbox.create(timeout=600, metadata={"suite": "pause-stress"})
    sandbox_id = sbx.sandbox_id
    try:
        sbx.files.write("/tmp/counter.py", COUNTER)
        sbx.commands.run("python3 /tmp/counter.py", background=True, timeout=0)
        pid, secret, n = counter(sbx, timeout=60)

        refused = 0
        for attempt in range(10):
            stop, errors = threading.Event(), []
            caller = threading.Thread(target=_caller, args=(Sandbox.connect(sandbox_id), stop, errors))
            caller.start()
            time.sleep(0.05 * (i % 4))
            try:
                paused = sbx.pause()
            except Exception as e:  # noqa: BLE001 - a refused pause is a clean failure
                paused = e
            finally:
                stop.set()
                caller.join()
            if paused is True:
                break
            # Refused (the SDK answers False to a 409): the sandbox must
            # still be running, with its process.
            refused += 1
            assert paused is False, f"sandbox {i}: pause failed uncleanly: {paused!r}"
            state = Sandbox.get_info(sandbox_id).state
            assert state == SandboxState.RUNNING, f"sandbox {i}: a refused pause left it {state}"
            pid2, secret2, n = counter(sbx, after=n, timeout=60)
            assert (pid2, secret2) == (pid, secret), f"sandbox {i}: a refused pause restarted the process"
        else:
            raise AssertionError(f"sandbox {i}: 10 pauses in a row refused")

        sbx = Sandbox.connect(sandbox_id, timeout=600)
        pid2, secret2, n2 = counter(sbx, after=n, timeout=60)
        assert (pid2, secret2) == (pid, secret), f"sandbox {i}: the process restarted across the pause"
        return refused
    finally:
        Sandbox.kill(sandbox_id)


def test_fifty_pauses_on_a_loaded_host_all_resume(sdk_env):
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for b in burners:
        b.start()
    try:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=AT_ONCE) as pool:
            refused = list(pool.map(_cycle, range(SANDBOXES)))
        print(
            f"{SANDBOXES} sandboxes paused and resumed under load in {time.monotonic() - t0:.0f} s; "
            f"{sum(refused)} pauses refused cleanly and retried"
        )
    finally:
        stop.set()
        for b in burners:
            b.join(timeout=5)
            if b.is_alive():
                b.kill()


BUSY = r'''
import os
i = 0
while True:
    i += 1
    if i % 500000 == 0:
        with open('/tmp/busy.tmp', 'w') as f:
            f.write(f"{os.getpid()} {i}")
        os.replace('/tmp/busy.tmp', '/tmp/busy')
'''


def test_hundred_pauses_of_a_busy_guest_all_resume(sdk_env):
    """A CPU-bound process beside envd, paused and resumed 100 times on a
    host with its CPUs saturated. This is the case that lost sandboxes for
    good (one save in 6 to 200 restored to a crashed or hung envd) until
    issue 14's cause was found: gVisor's restore re-delivers epoll events of
    registrations deleted before the checkpoint, which tokio took for
    pointers to freed memory (see ARCHITECTURE.md, gvisor runtime, and
    envd/vendor/mio/PATCHES.md)."""
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for b in burners:
        b.start()
    try:
        _hundred_pauses()
    finally:
        stop.set()
        for b in burners:
            b.join(timeout=5)
            if b.is_alive():
                b.kill()


def _hundred_pauses():
    sbx = Sandbox.create(timeout=900, metadata={"suite": "pause-busy"})
    sandbox_id = sbx.sandbox_id
    try:
        sbx.files.write("/tmp/busy.py", BUSY)
        sbx.commands.run("python3 /tmp/busy.py", background=True, timeout=0)
        time.sleep(2)
        pid, n = sbx.commands.run("cat /tmp/busy").stdout.split()
        for cycle in range(100):
            assert sbx.pause() is True, f"cycle {cycle}: pause refused"
            sbx = Sandbox.connect(sandbox_id, timeout=900)
            time.sleep(0.3)
            pid2, n2 = sbx.commands.run("cat /tmp/busy").stdout.split()
            assert pid2 == pid and int(n2) >= int(n), f"cycle {cycle}: the process restarted"
            n = n2
    finally:
        Sandbox.kill(sandbox_id)
