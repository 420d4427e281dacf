"""The unmodified E2B SDK against a three-node cluster, through a node that
owns none of the sandboxes: every REST call and every byte of sandbox
traffic crosses the mesh (QUIC) to the owner.

Three real `sandmesh node` processes on 127.0.0.1-3, joined through the
first one's gossip address. The first node (the one the SDK talks to) is
drained, so placement puts every sandbox on the other two.
"""

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import uuid

import httpx
import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery, SandboxState

from conftest import NodeProcess, _check_can_run, init_cluster, join_cluster, point_sdk_at, wait_for


def rest(node, method, path, body=None):
    req = urllib.request.Request(
        node.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-API-KEY": node.key, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def cluster():
    _check_can_run()
    base = tempfile.mkdtemp(prefix="smh-sdk-cluster-")
    dirs = [os.path.join(base, f"n{i}") for i in range(3)]
    nodes = []
    try:
        init_cluster(dirs[0], "n0")
        for i in (1, 2):
            join_cluster(dirs[0], dirs[i], f"n{i}")
        first = NodeProcess(dirs[0], ip="127.0.0.1")
        nodes.append(first)
        for i in (1, 2):
            nodes.append(
                NodeProcess(dirs[i], key=first.key, ip=f"127.0.0.{i + 1}", seeds=[first.gossip])
            )

        def all_ready():
            views = [rest(n, "GET", "/cluster") for n in nodes]
            return all(
                # verified over mTLS, and each node's placement actor
                # reachable over its actor session (creates reserve there)
                sorted((x["nodeID"], x["state"], x["verified"] and x["actors"]) for x in v["nodes"])
                == [("n0", "ready", True), ("n1", "ready", True), ("n2", "ready", True)]
                for v in views
            ) and views

        wait_for("three ready, verified nodes with actor sessions in every node's view", all_ready)
        assert rest(first, "POST", "/node/drain")["state"] == "draining"
        wait_for(
            "n0 seen draining by the others",
            lambda: all(
                {x["nodeID"]: x["state"] for x in rest(n, "GET", "/cluster")["nodes"]}["n0"]
                == "draining"
                for n in nodes[1:]
            ),
        )
        yield nodes
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def via_non_owner(cluster, monkeypatch):
    """The SDK pointed at n0, which owns no sandbox."""
    point_sdk_at(monkeypatch, cluster[0].url, cluster[0].key)
    return cluster


def owner(nodes, sandbox_id):
    """The node that owns a sandbox: its `clientID`, as any node reports it
    (the id itself does not name it)."""
    assert "-" not in sandbox_id, sandbox_id
    return rest(nodes[0], "GET", f"/sandboxes/{sandbox_id}")["clientID"]


def test_core_cases_through_a_non_owner(via_non_owner):
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(metadata={"suite": "cluster", "tag": tag}, envs={"GREETING": "hello"})
    try:
        assert owner(via_non_owner, sbx.sandbox_id) in ("n1", "n2")
        assert sbx.is_running()

        r = sbx.commands.run("echo $GREETING; echo err >&2")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "hello\n", "err\n")
        lines = []
        sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.1; done", on_stdout=lines.append)
        assert "".join(lines) == "line1\nline2\nline3\n"

        sbx.files.write("/tmp/x.txt", "through the mesh")
        assert sbx.files.read("/tmp/x.txt") == "through the mesh"
        assert "x.txt" in [e.name for e in sbx.files.list("/tmp")]

        # 8 MiB each way through the QUIC pipe, checked end to end.
        blob = os.urandom(8 << 20)
        sbx.files.write("/tmp/blob", blob)
        r = sbx.commands.run("sha256sum /tmp/blob")
        assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        assert sbx.files.read("/tmp/blob", format="bytes") == blob

        # Signed URLs name no sandbox: n0 asks the other nodes whose it is.
        up = sbx.upload_url("/tmp/signed.txt")
        assert httpx.post(up, files={"file": ("f.txt", b"signed upload")}).status_code == 200
        assert httpx.get(sbx.download_url("/tmp/signed.txt")).content == b"signed upload"
        forged = sbx.download_url("/tmp/signed.txt").replace("signature=v1_", "signature=v1_0")
        assert httpx.get(forged).status_code == 401

        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata["tag"] == tag
        listed = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        sbx.set_timeout(600)
    finally:
        assert sbx.kill()
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)

    # n0's metrics count what it sent over the mesh.
    with urllib.request.urlopen(via_non_owner[0].url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    for kind in ("create", "sandbox", "list", "traffic", "signed"):
        assert f'sandmesh_mesh_forwards_total{{kind="{kind}",outcome="ok"}}' in text, kind
    assert 'sandmesh_mesh_members{state="ready"} 2' in text
    assert 'sandmesh_mesh_members{state="draining"} 1' in text


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_100_mib_each_way_through_a_non_owner_in_constant_memory(via_non_owner):
    front = via_non_owner[0]
    sbx = Sandbox.create(timeout=300)
    try:
        before = peak_rss_mib(front.proc.pid)
        blob = os.urandom(100 << 20)
        sbx.files.write("/tmp/up", blob)
        assert sbx.commands.run("sha256sum /tmp/up").stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        del blob
        sbx.commands.run("head -c 100M /dev/urandom > /tmp/down")
        want = sbx.commands.run("sha256sum /tmp/down").stdout.split()[0]
        digest, size = hashlib.sha256(), 0
        for chunk in sbx.files.read("/tmp/down", format="stream"):
            digest.update(chunk)
            size += len(chunk)
        assert (size, digest.hexdigest()) == (100 << 20, want)
        grew = peak_rss_mib(front.proc.pid) - before
        print(f"peak RSS of the forwarding node grew {grew:.1f} MiB for 100 MiB each way")
        # Buffering either body whole would take 100 MiB or more.
        assert grew < 32, f"the forwarding node's peak RSS grew {grew:.0f} MiB"
    finally:
        sbx.kill()


def test_list_merges_every_node_and_pages(via_non_owner):
    tag = uuid.uuid4().hex
    made = [Sandbox.create(metadata={"tag": tag}, timeout=300) for _ in range(4)]
    try:
        assert {owner(via_non_owner, s.sandbox_id) for s in made} <= {"n1", "n2"}
        paginator = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=3)
        seen = paginator.next_items()
        assert len(seen) == 3 and paginator.has_next
        seen += paginator.next_items()
        assert not paginator.has_next
        # E2B's order, cluster-wide: newest first across both owners, and
        # `order="asc"` the exact reverse, page after page.
        created = [s.sandbox_id for s in made]
        assert [s.sandbox_id for s in seen] == created[::-1]
        paginator = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=3, order="asc")
        asc = paginator.next_items() + paginator.next_items()
        assert not paginator.has_next
        assert [s.sandbox_id for s in asc] == created
    finally:
        for s in made:
            s.kill()


def test_pause_and_resume_through_a_non_owner(via_non_owner):
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.commands.run("echo kept > /tmp/kept")
        assert sbx.pause() is True
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        again = Sandbox.connect(sbx.sandbox_id, timeout=300)
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        assert again.files.read("/tmp/kept") == "kept\n"
    finally:
        sbx.kill()
