"""Fixtures for driving a sandmesh node with the official E2B Python SDK.

The node (`sandmesh node --runtime gvisor`, or SANDMESH_RUNTIME: `cargo xtask
test` runs a subset with `auto`, i.e. microVMs, on its emulated L1 host, with
extra node arguments in SANDMESH_NODE_ARGS) runs the real runtime; the
unmodified SDK reaches its REST API through
E2B_API_URL and all sandbox traffic through E2B_SANDBOX_URL (routed by the
E2b-Sandbox-Id / E2b-Sandbox-Port headers the SDK then adds).

Needs root, runsc and the guest artifacts (SANDMESH_GUEST_ARTIFACTS, else
target/sandmesh-guest-artifacts.json). Without them the tests are skipped
with the reason, except when SANDMESH_REQUIRE_ARTIFACTS is set.
"""

import contextlib
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).parents[3]
SANDMESH = os.environ.get("SANDMESH_BIN", str(REPO / "target/debug/sandmesh"))
RUNTIME = os.environ.get("SANDMESH_RUNTIME", "gvisor")
ARTIFACTS = os.environ.get(
    "SANDMESH_GUEST_ARTIFACTS", str(REPO / "target/sandmesh-guest-artifacts.json")
)


def _skip_or_fail(reason):
    if os.environ.get("SANDMESH_REQUIRE_ARTIFACTS"):
        pytest.fail(reason)
    pytest.skip(reason)


def _check_can_run():
    if os.geteuid() != 0:
        _skip_or_fail("needs root (gvisor runtime: network namespaces, mounts)")
    if not os.path.exists(ARTIFACTS):
        _skip_or_fail(f"guest artifacts are not built ({ARTIFACTS}): run `cargo xtask guest`")
    if not os.path.exists(SANDMESH):
        _skip_or_fail(f"{SANDMESH} is not built: cargo build -p node")


HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class NodeProcess:
    """A node process on `data`; `url` and `key` once it serves, `gossip`
    (the address other nodes join through) and `node_id`.

    `key`: the API key to use (added to this node's keys); a new one when
    None. `ip`: the loopback address it listens on. `seeds`: gossip
    addresses of nodes to join (the data dir must then hold a cluster
    certificate: see `join_cluster`). `extra`: more node arguments; `env`:
    more environment variables."""

    def __init__(self, data, kill_on_exit=True, key=None, ip="127.0.0.1", seeds=(), extra=(), env=None):
        self.data = data
        env = dict(os.environ, SANDMESH_GUEST_ARTIFACTS=ARTIFACTS, **(env or {}))
        # Template build steps trust what this host trusts (a host whose
        # egress is a TLS-intercepting proxy adds its CA there).
        if os.path.exists(HOST_CA_BUNDLE):
            env.setdefault("SANDMESH_BUILD_CA_BUNDLE", HOST_CA_BUNDLE)
        if key is None:
            self.key = subprocess.run(
                [SANDMESH, "apikey", "create", "--data-dir", str(data)],
                check=True, capture_output=True, text=True, env=env,
            ).stdout.strip()
        else:
            subprocess.run(
                [SANDMESH, "apikey", "add", "--data-dir", str(data)],
                input=key + "\n", check=True, capture_output=True, text=True, env=env,
            )
            self.key = key
        cmd = [SANDMESH, "node", "--data-dir", str(data), "--listen", f"{ip}:0", "--runtime", RUNTIME]
        cmd += shlex.split(os.environ.get("SANDMESH_NODE_ARGS", ""))
        for seed in seeds:
            cmd += ["--seed", seed]
        cmd += list(extra)
        if kill_on_exit:
            cmd.append("--kill-sandboxes-on-exit")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on "), f"node did not start: {line!r}"
        self.url = "http://" + line.rsplit(" ", 1)[1]
        # "gossip on ADDR as node ID"
        words = self.proc.stdout.readline().split()
        assert words[:2] == ["gossip", "on"], f"no gossip line: {words!r}"
        self.gossip, self.node_id = words[2], words[-1]

    def stop(self):
        """SIGTERM (kills the sandboxes when started with kill_on_exit)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def crash(self):
        """kill -9: the sandboxes keep running."""
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def node():
    """A running node; yields (url, api_key)."""
    _check_can_run()
    data = tempfile.mkdtemp(prefix="smh-sdk-node-")
    n = NodeProcess(data)
    try:
        yield n.url, n.key
    finally:
        n.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def node_factory():
    """Start nodes on one data dir (for restart tests); all stopped after."""
    _check_can_run()
    data = tempfile.mkdtemp(prefix="smh-sdk-restart-")
    started = []

    def start(kill_on_exit=True):
        n = NodeProcess(data, kill_on_exit=kill_on_exit)
        started.append(n)
        return n

    yield start
    for n in started:
        if n.proc.poll() is None:
            n.stop()
    shutil.rmtree(data, ignore_errors=True)


def init_cluster(data, node_id):
    """Make a new cluster whose first node is `node_id` on `data`."""
    subprocess.run(
        [SANDMESH, "cluster", "init", "--data-dir", str(data), "--node-id", node_id],
        check=True, capture_output=True, text=True,
    )


def join_cluster(first_data, data, node_id):
    """Give the node on `data` a certificate of `first_data`'s cluster."""
    token = subprocess.run(
        [SANDMESH, "cluster", "join-token", "--data-dir", str(first_data), "--node-id", node_id],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    subprocess.run(
        [SANDMESH, "cluster", "join", "--data-dir", str(data)],
        env=dict(os.environ, SANDMESH_JOIN_TOKEN=token),
        check=True, capture_output=True, text=True,
    )


def point_sdk_at(monkeypatch, url, key):
    for var in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("E2B_API_URL", url)
    monkeypatch.setenv("E2B_SANDBOX_URL", url)
    monkeypatch.setenv("E2B_API_KEY", key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@contextlib.contextmanager
def module_sandbox(node, cls=None, **create):
    """One sandbox for a whole test module (`cls.create(**create)` on the
    session's node; `cls`: e2b's Sandbox unless given), killed at the
    module's end."""
    if cls is None:
        from e2b import Sandbox as cls

    url, key = node
    with pytest.MonkeyPatch.context() as mp:
        point_sdk_at(mp, url, key)
        box = cls.create(**create)
        try:
            yield box
        finally:
            box.kill()


@pytest.fixture
def sdk_env(node, monkeypatch):
    """The SDK's environment pointed at the node."""
    url, key = node
    point_sdk_at(monkeypatch, url, key)
    return url, key


# A process whose state lives only in its memory: a secret drawn at start
# and a counter, written out (atomically) every 50 ms. Tests start it with
# `python3 /tmp/counter.py` and read it with `counter`.
COUNTER = """
import os, time
secret = os.urandom(8).hex()
n = 0
while True:
    n += 1
    with open('/tmp/state.tmp', 'w') as f:
        f.write(f'{os.getpid()} {secret} {n}')
    os.replace('/tmp/state.tmp', '/tmp/state')
    time.sleep(0.05)
"""


def counter(sbx, after=0, timeout=15):
    """(pid, secret, n) of the COUNTER running in `sbx` once n > `after`;
    fails with the guest's processes after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        parts = sbx.commands.run("cat /tmp/state 2>/dev/null || true").stdout.split()
        if len(parts) == 3 and int(parts[2]) > after:
            return parts[0], parts[1], int(parts[2])
        if time.monotonic() > deadline:
            ps = sbx.commands.run("ps -eo pid,stat,wchan:20,etime,args || true").stdout
            raise AssertionError(f"counter not advancing past {after}: {parts}; processes:\n{ps}")
        time.sleep(0.1)


def wait_for(what, check, timeout=30):
    """`check()`'s first truthy answer, polled every 0.2 s for `timeout`
    seconds; fails naming `what` and the last answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: last saw {last!r}")
