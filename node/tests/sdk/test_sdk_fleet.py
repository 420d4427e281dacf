"""A fleet sharing one S3 bucket, driven by the unmodified E2B SDK.

Three `sandmesh node` processes on 127.0.0.1-3 publish snapshots to one
bucket of a real S3 server on loopback (s3s-fs, SANDMESH_S3S_FS, which
`cargo xtask test` installs): a paused sandbox survives its node, a
snapshot taken on one node starts sandboxes on another, and a store
outage fails a pause cleanly.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile

import httpx
import pytest
from e2b import Sandbox

from conftest import (
    COUNTER,
    NodeProcess,
    _check_can_run,
    _skip_or_fail,
    counter,
    init_cluster,
    join_cluster,
    point_sdk_at,
    wait_for,
)

BUCKET = "sandmesh"
ACCESS_KEY = "sandmesh-fleet-test"
SECRET_KEY = "sandmesh-fleet-test-secret"



class S3Server:
    """s3s-fs serving `root` (one directory per bucket) on a free port."""

    def __init__(self, root):
        binary = os.environ.get("SANDMESH_S3S_FS")
        if not binary:
            _skip_or_fail("no S3 server: set SANDMESH_S3S_FS (cargo xtask test does)")
        self.binary, self.root = binary, root
        os.makedirs(os.path.join(root, BUCKET), exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None
        self.start()

    def start(self):
        log = open(self.root + ".log", "a")
        self.proc = subprocess.Popen(
            [self.binary, "--host", "127.0.0.1", "--port", str(self.port),
             "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, self.root],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        wait_for("s3s-fs listening", self._listening)

    def _listening(self):
        assert self.proc.poll() is None, f"s3s-fs exited: {open(self.root + '.log').read()}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def url(self):
        return f"s3://{BUCKET}?endpoint=http://127.0.0.1:{self.port}&region=us-east-1"

    def objects(self, prefix):
        """Object names under `prefix` in the bucket (s3s-fs keeps them as files)."""
        top = os.path.join(self.root, BUCKET, prefix)
        return sorted(
            os.path.relpath(os.path.join(d, f), os.path.join(self.root, BUCKET))
            for d, _, files in os.walk(top)
            for f in files
        )


def rest(node, method, path, body=None):
    r = httpx.request(method, node.url + path, json=body, headers={"X-API-KEY": node.key}, timeout=60)
    return r.status_code, (r.json() if r.content else None)


@pytest.fixture(scope="module")
def fleet():
    _check_can_run()
    base = tempfile.mkdtemp(prefix="smh-sdk-fleet-")
    s3 = S3Server(os.path.join(base, "s3"))
    dirs = [os.path.join(base, f"n{i}") for i in range(3)]
    nodes = []
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    extra = ["--object-store", s3.url()]
    try:
        init_cluster(dirs[0], "n0")
        for i in (1, 2):
            join_cluster(dirs[0], dirs[i], f"n{i}")
        first = NodeProcess(dirs[0], ip="127.0.0.1", extra=extra, env=env)
        nodes.append(first)
        for i in (1, 2):
            nodes.append(
                NodeProcess(dirs[i], key=first.key, ip=f"127.0.0.{i + 1}",
                            seeds=[first.gossip], extra=extra, env=env)
            )

        def all_ready():
            views = [rest(n, "GET", "/cluster")[1] for n in nodes]
            return all(
                sorted((x["nodeID"], x["state"], x["verified"] and x["actors"]) for x in v["nodes"])
                == [("n0", "ready", True), ("n1", "ready", True), ("n2", "ready", True)]
                for v in views
            )

        wait_for("three ready, verified nodes", all_ready)
        yield s3, nodes
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.stop()
        s3.stop()
        shutil.rmtree(base, ignore_errors=True)


def owner(nodes, sandbox_id):
    return rest(nodes[0], "GET", f"/sandboxes/{sandbox_id}")[1]["clientID"]


def node_named(nodes, node_id):
    return next(n for n in nodes if n.node_id == node_id)


def drained(nodes, which):
    """Drain the nodes in `which` (a set of ids) and undrain the others."""
    for n in nodes:
        rest(n, "DELETE" if n.node_id not in which else "POST", "/node/drain")
    wait_for(
        f"{sorted(which)} draining in every view",
        lambda: all(
            {x["nodeID"]: x["state"] for x in rest(n, "GET", "/cluster")[1]["nodes"]}
            == {m.node_id: ("draining" if m.node_id in which else "ready") for m in nodes}
            for n in nodes
        ),
    )


def test_a_store_outage_fails_a_pause_cleanly_and_it_works_once_back(fleet, monkeypatch):
    s3, nodes = fleet
    point_sdk_at(monkeypatch, nodes[0].url, nodes[0].key)
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.files.write("/home/user/kept.txt", "before the outage")
        before = s3.objects("snapshots")
        s3.stop()
        status, body = rest(nodes[0], "POST", f"/sandboxes/{sbx.sandbox_id}/pause")
        assert status == 503, (status, body)
        assert body["code"] == 503 and "keeps running" in body["message"], body
        # Running, its files intact, and nothing of the failed pause listed.
        assert sbx.is_running()
        assert sbx.files.read("/home/user/kept.txt") == "before the outage"
        s3.start()
        assert s3.objects("snapshots") == before
        assert sbx.pause()
        sbx.connect()
        assert sbx.files.read("/home/user/kept.txt") == "before the outage"
    finally:
        sbx.kill()


def test_a_snapshot_starts_sandboxes_on_another_node_and_forks_are_independent(fleet, monkeypatch):
    s3, nodes = fleet
    point_sdk_at(monkeypatch, nodes[0].url, nodes[0].key)
    drained(nodes, {"n0", "n2"})
    sbx = Sandbox.create(timeout=300)
    made = []
    try:
        assert owner(nodes, sbx.sandbox_id) == "n1"
        sbx.files.write("/home/user/note.txt", "from the source")
        sbx.files.write("/tmp/counter.py", COUNTER)
        sbx.commands.run("python3 /tmp/counter.py", background=True, timeout=0)
        pid, secret, n = counter(sbx)
        snap = sbx.create_snapshot()
        assert any(o.startswith(f"snapshots/user-snapshots/{snap.snapshot_id}/") for o in s3.objects("snapshots"))

        # Created on another node, which fetches the snapshot from S3.
        drained(nodes, {"n0", "n1"})
        copy = Sandbox.create(snap.snapshot_id, timeout=120)
        made.append(copy)
        assert owner(nodes, copy.sandbox_id) == "n2"
        assert copy.files.read("/home/user/note.txt") == "from the source"
        assert counter(copy)[:2] == (pid, secret)

        # Three forks of the source, on its node; the source unchanged.
        drained(nodes, {"n0"})
        forks = sbx.fork(count=3, timeout=120)
        made.extend(f for f in forks if isinstance(f, Sandbox))
        assert all(isinstance(f, Sandbox) for f in forks), forks
        assert len({f.sandbox_id for f in forks} | {sbx.sandbox_id}) == 4
        for i, f in enumerate(forks):
            assert counter(f)[:2] == (pid, secret)
            f.files.write("/home/user/note.txt", f"fork {i}")
        assert [f.files.read("/home/user/note.txt") for f in forks] == ["fork 0", "fork 1", "fork 2"]
        assert sbx.files.read("/home/user/note.txt") == "from the source"
        assert counter(sbx, after=n)[:2] == (pid, secret)
        assert Sandbox.delete_snapshot(snap.snapshot_id)
    finally:
        for s in made:
            s.kill()
        sbx.kill()
        drained(nodes, {"n0"})


def test_a_paused_sandbox_survives_kill_9_of_its_node(fleet, monkeypatch):
    s3, nodes = fleet
    point_sdk_at(monkeypatch, nodes[0].url, nodes[0].key)
    drained(nodes, {"n0"})
    sbx = Sandbox.create(timeout=300)
    sandbox_id = sbx.sandbox_id
    home = owner(nodes, sandbox_id)
    assert home in ("n1", "n2")
    sbx.files.write("/home/user/note.txt", "written on " + home)
    sbx.files.write("/tmp/counter.py", COUNTER)
    sbx.commands.run("python3 /tmp/counter.py", background=True, timeout=0)
    pid, secret, n = counter(sbx)
    assert sbx.pause()
    node_named(nodes, home).crash()
    wait_for(
        f"n0 to see {home} dead",
        lambda: {x["nodeID"]: x["state"] for x in rest(nodes[0], "GET", "/cluster")[1]["nodes"]}[home]
        == "dead",
    )

    # Through n0, which never had it: resumed on a survivor from S3.
    resumed = Sandbox.connect(sandbox_id, timeout=120)
    try:
        assert resumed.sandbox_id == sandbox_id
        now = owner(nodes, sandbox_id)
        assert now != home, now
        assert resumed.files.read("/home/user/note.txt") == "written on " + home
        got = counter(resumed, after=n)
        assert got[:2] == (pid, secret), (got, pid, secret)
    finally:
        resumed.kill()
