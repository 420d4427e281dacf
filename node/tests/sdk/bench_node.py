"""Benchmarks of a sandmesh node driven by the unmodified E2B SDK and its
REST API (run by `cargo xtask bench`, not by pytest).

Starts `sandmesh node --runtime gvisor` on a fresh data dir and prints one
JSON object per line, as xtask's bench reader expects:
`{"name", "runtime", "samples_ns": [...]}` or `{"name", "runtime", "value"}`.

The runtime's own figures come from the node's log of each sandbox
(`GET /sandboxes/{id}/logs`, the "sandbox created" entry): the runtime's
create (restore + envd healthy) and its raw `runsc restore`, measured for
the very same creates.
"""

import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

REPO = pathlib.Path(__file__).parents[3]
SANDMESH = os.environ.get("SANDMESH_BIN", str(REPO / "target/release/sandmesh"))
RUNTIME = "gvisor"


def emit_timed(name, seconds):
    print(json.dumps({"name": name, "runtime": RUNTIME, "samples_ns": [int(s * 1e9) for s in seconds]}), flush=True)


def emit_value(name, value):
    print(json.dumps({"name": name, "runtime": RUNTIME, "value": value}), flush=True)


def p50(xs):
    return statistics.median(xs)


class Node:
    """A node on `data`. `key`: an API key to accept (a new one when None);
    `ip`, `seeds`: where it listens and which gossip addresses it joins."""

    def __init__(self, data, key=None, ip="127.0.0.1", seeds=(), extra=(), env=None):
        self.data = data
        os.makedirs(data, exist_ok=True)
        if key is None:
            key = subprocess.run(
                [SANDMESH, "apikey", "create", "--data-dir", data], check=True, capture_output=True, text=True
            ).stdout.strip()
        else:
            subprocess.run([SANDMESH, "apikey", "add", "--data-dir", data], input=key + "\n", check=True,
                           capture_output=True, text=True)
        self.key = key
        self.log = open(os.path.join(data, "node.log"), "w")
        cmd = [SANDMESH, "node", "--data-dir", data, "--listen", f"{ip}:0", "--runtime", RUNTIME,
               "--kill-sandboxes-on-exit", "--max-sandboxes", "100"]
        for seed in seeds:
            cmd += ["--seed", seed]
        cmd += list(extra)
        env = dict(os.environ, **(env or {}))
        # Template builds trust what this host trusts (an intercepting egress
        # proxy's CA is in the host's bundle), as the SDK tests do.
        if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
            env.setdefault("SANDMESH_BUILD_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise SystemExit(f"the node did not start: {line!r} (log: {data}/node.log)")
        self.url = "http://" + line.rsplit(" ", 1)[1]
        # "gossip on ADDR as node ID"
        words = self.proc.stdout.readline().split()
        self.gossip, self.node_id = words[2], words[-1]
        self.http = httpx.Client(base_url=self.url, headers={"X-API-KEY": self.key}, timeout=120)

    def created_event(self, sandbox_id):
        logs = self.http.get(f"/sandboxes/{sandbox_id}/logs").json()
        for e in logs["logEntries"]:
            if e["message"] == "sandbox created":
                return e["fields"]
        raise SystemExit(f"no create event for {sandbox_id}")

    def kill(self, sandbox_id):
        self.http.delete(f"/sandboxes/{sandbox_id}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sdk_create(node):
    """Sandbox.create through the SDK, 20 times, against the runtime's own
    create of the same sandboxes."""
    from e2b import Sandbox

    sdk, runtime = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        sbx = Sandbox.create()
        sdk.append(time.perf_counter() - t0)
        runtime.append(int(node.created_event(sbx.sandbox_id)["ready_after_us"]) / 1e6)
        sbx.kill()
    emit_timed("node: SDK Sandbox.create() -> returns", sdk)
    emit_timed("node: the runtime's own create of the same sandboxes (restore -> envd healthy)", runtime)
    emit_value("node: SDK create / runtime create, p50 ratio (budget <= 1.15)", f"{p50(sdk) / p50(runtime):.2f}x")


def sdk_run_true(node):
    """commands.run("true") through the SDK and the node's proxy, against
    the runtime's direct exec (`runsc exec`)."""
    from e2b import Sandbox

    sbx = Sandbox.create()
    try:
        sbx.commands.run("true")  # warm the SDK's connection
        runs = []
        for _ in range(100):
            t0 = time.perf_counter()
            sbx.commands.run("true")
            runs.append(time.perf_counter() - t0)
        root = os.path.join(node.data, "run", "runsc")
        direct = []
        for _ in range(20):
            t0 = time.perf_counter()
            subprocess.run(
                # The node's own runsc (`cargo xtask bench` pins one with
                # SANDMESH_RUNSC); exec joins the sandbox on its platform.
                ["ip", "netns", "exec", f"smh-{sbx.sandbox_id}", os.environ.get("SANDMESH_RUNSC") or "runsc",
                 f"--root={root}", "exec", sbx.sandbox_id, "/bin/true"],
                check=True, capture_output=True,
            )
            direct.append(time.perf_counter() - t0)
    finally:
        sbx.kill()
    emit_timed('node: SDK commands.run("true") round trip', runs)
    emit_timed("gvisor: direct `runsc exec <id> /bin/true`", direct)
    emit_value(
        'node: SDK commands.run("true") minus direct runsc exec, p50',
        f"{(p50(runs) - p50(direct)) * 1000:+.1f} ms",
    )


def rest_create(node):
    """POST /v2/sandboxes until envd answers (the create returns then), 50
    times, against the raw `runsc restore` of the same creates."""
    rest, raw = [], []
    for _ in range(50):
        t0 = time.perf_counter()
        r = node.http.post("/v2/sandboxes", json={"templateID": "base"})
        rest.append(time.perf_counter() - t0)
        r.raise_for_status()
        sandbox_id = r.json()["sandboxID"]
        raw.append(int(node.created_event(sandbox_id)["runtime_start_us"]) / 1e6)
        node.kill(sandbox_id)
    emit_timed("node: REST create from the template snapshot -> envd answers (budget 250 ms)", rest)
    emit_timed("gvisor: raw `runsc restore` of the same creates", raw)
    emit_value("node: REST create / raw restore, p50 ratio", f"{p50(rest) / p50(raw):.2f}x")


def pause_dirty(node):
    """Pause time and snapshot size of a 512 MiB sandbox whose process
    dirtied 50 MiB (random bytes: nothing to compress away)."""
    from e2b import Sandbox

    took, sizes, resumed = [], [], []
    for _ in range(5):
        sbx = Sandbox.create(timeout=300)
        sbx.commands.run(
            "python3 -c \"import os,time; b=bytearray(os.urandom(50<<20)); open('/tmp/dirty','w').close(); time.sleep(3600)\"",
            background=True,
        )
        while sbx.commands.run("test -e /tmp/dirty && echo y || true").stdout.strip() != "y":
            time.sleep(0.1)
        t0 = time.perf_counter()
        assert sbx.pause()
        took.append(time.perf_counter() - t0)
        logs = node.http.get(f"/sandboxes/{sbx.sandbox_id}/logs").json()["logEntries"]
        sizes.append(int([e for e in logs if e["message"] == "sandbox paused"][-1]["fields"]["snapshot_bytes"]))
        t0 = time.perf_counter()
        Sandbox.connect(sbx.sandbox_id)
        resumed.append(time.perf_counter() - t0)
        node.kill(sbx.sandbox_id)
    emit_timed("node: pause of a 512 MiB sandbox that dirtied 50 MiB (SDK pause())", took)
    emit_timed("node: resume of that sandbox (SDK Sandbox.connect())", resumed)
    emit_value("node: snapshot size of that sandbox", f"{p50(sizes) / (1 << 20):.1f} MiB (median of 5)")


def published_fields(node, sandbox_id):
    """(upload ms, uploaded, deduplicated, data chunks) of the sandbox's last
    pause, from its "published" log field ("... 9 uploaded, 3 deduplicated,
    0 zero of 12 chunks; 2221527 bytes sent in 62 ms")."""
    logs = node.http.get(f"/sandboxes/{sandbox_id}/logs").json()["logEntries"]
    text = [e for e in logs if e["message"] == "sandbox paused"][-1]["fields"]["published"]
    words = text.replace(",", "").replace(";", "").split()
    before = lambda w: int(words[words.index(w) - 1])
    total = int(words[words.index("of") + 1])
    return before("ms") / 1000, before("uploaded"), before("deduplicated"), total - before("zero")


def pause_to_store(node):
    """Pause with the snapshot published to the node's object store (the
    default file:// one) against the same pause's local part, resume from
    the store (local copy removed) against a local resume, and the dedup of
    a second pause of the same sandbox."""
    from e2b import Sandbox

    pauses, local_parts, local_resumes, store_resumes, dedup = [], [], [], [], []
    snapshots = pathlib.Path(node.data) / "snapshots"
    for _ in range(5):
        sbx = Sandbox.create(timeout=300)
        sbx.commands.run("sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &", background=False)
        for second in (False, True):
            t0 = time.perf_counter()
            assert sbx.pause()
            took = time.perf_counter() - t0
            upload, uploaded, deduplicated, data = published_fields(node, sbx.sandbox_id)
            if second:
                dedup.append(deduplicated / max(data, 1))
            else:
                pauses.append(took)
                local_parts.append(took - upload)
            from_store = second
            if from_store:
                for d in snapshots.iterdir():
                    shutil.rmtree(d)
            t0 = time.perf_counter()
            Sandbox.connect(sbx.sandbox_id)
            (store_resumes if from_store else local_resumes).append(time.perf_counter() - t0)
        node.kill(sbx.sandbox_id)
    emit_timed("node: pause with the snapshot published to the object store (file://)", pauses)
    emit_timed("node: the same pauses without their upload", local_parts)
    emit_value("node: pause to the store / local pause, p50 ratio (goal <= 1.3x)",
               f"{p50(pauses) / p50(local_parts):.2f}x")
    emit_timed("node: resume from the local copy", local_resumes)
    emit_timed("node: resume from the object store (local copy removed)", store_resumes)
    emit_value("node: resume from the store / local resume, p50 ratio (goal <= 1.3x)",
               f"{p50(store_resumes) / p50(local_resumes):.2f}x")
    emit_value("node: dedup of a second pause of the same sandbox (chunks shared / data chunks)",
               f"{p50(dedup) * 100:.0f} % (median of 5)")


def resume_elsewhere(node):
    """Two nodes sharing one bucket of a real S3 server on loopback
    (s3s-fs, SANDMESH_S3S_FS): pause to S3, resume on the same node, and
    resume through the other node after the first was killed with -9 (the
    other takes the sandbox over from the store, fetches and restores it)."""
    from e2b import Sandbox

    binary = os.environ.get("SANDMESH_S3S_FS")
    if not binary:
        print("bench_node: resume_elsewhere skipped: no SANDMESH_S3S_FS", file=sys.stderr, flush=True)
        return
    base = tempfile.mkdtemp(prefix="smh-bench-s3-")
    root = os.path.join(base, "s3")
    os.makedirs(os.path.join(root, "bench"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s3 = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", "bench",
                           "--secret-key", "bench-secret", root], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
    extra = ["--object-store", f"s3://bench?endpoint=http://127.0.0.1:{port}&region=us-east-1"]
    keeper_dir, mover_dir = os.path.join(base, "keeper"), os.path.join(base, "mover")
    subprocess.run([SANDMESH, "cluster", "init", "--data-dir", keeper_dir, "--node-id", "keeper"],
                   check=True, capture_output=True, text=True)
    token = subprocess.run([SANDMESH, "cluster", "join-token", "--data-dir", keeper_dir, "--node-id", "mover"],
                           check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([SANDMESH, "cluster", "join", "--data-dir", mover_dir, "--token", token],
                   check=True, capture_output=True, text=True)
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if time.monotonic() > deadline:
            raise SystemExit("s3s-fs did not listen")
        time.sleep(0.05)
    # The keeper is drained: every create lands on the mover, which is
    # the node killed each round.
    keeper = Node(keeper_dir, key=node.key, ip="127.0.0.3", extra=extra, env=env)
    keeper.http.post("/node/drain").raise_for_status()
    mover = None

    def start_mover():
        m = Node(mover_dir, key=node.key, ip="127.0.0.4", seeds=[keeper.gossip], extra=extra, env=env)
        wait_view(keeper, lambda v: v.get("mover") == ("ready", True), "the mover ready")
        return m

    def wait_view(n, check, what):
        deadline = time.monotonic() + 60
        while True:
            view = {x["nodeID"]: (x["state"], x["verified"] and x["actors"])
                    for x in n.http.get("/cluster").json()["nodes"]}
            if check(view):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"waiting for {what}: {view}")
            time.sleep(0.1)

    def point(n):
        os.environ.update(E2B_API_URL=n.url, E2B_SANDBOX_URL=n.url)

    pauses, local, elsewhere, prefetched = [], [], [], []
    try:
        for eager in [False] * 5 + [True] * 5:
            mover = start_mover()
            point(keeper)
            for attempt in range(50):
                try:
                    sbx = Sandbox.create(timeout=300)
                    break
                except Exception:
                    # The keeper's actor session with the new mover opens
                    # a moment after gossip shows it ready.
                    if attempt == 49:
                        raise
                    time.sleep(0.2)
            sbx.commands.run("sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &")
            t0 = time.perf_counter()
            assert sbx.pause()
            pauses.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Sandbox.connect(sbx.sandbox_id)
            local.append(time.perf_counter() - t0)
            assert sbx.pause()
            if eager:
                # A ready keeper takes the sandbox over as soon as it sees
                # the mover dead, and fetches its snapshot then.
                keeper.http.delete("/node/drain").raise_for_status()
            mover.proc.kill()
            mover.proc.wait()
            wait_view(keeper, lambda v: v.get("mover", ("dead",))[0] == "dead", "the mover dead")
            if eager:
                time.sleep(3)
            t0 = time.perf_counter()
            moved = Sandbox.connect(sbx.sandbox_id)
            (prefetched if eager else elsewhere).append(time.perf_counter() - t0)
            moved.commands.run("true")
            moved.kill()
            keeper.http.post("/node/drain").raise_for_status()
        mover = start_mover()
    finally:
        point(node)
        for n in (mover, keeper):
            if n is not None:
                n.stop()
        s3.kill()
        s3.wait()
        shutil.rmtree(base, ignore_errors=True)
    emit_timed("store: pause to an S3 store (s3s-fs on loopback)", pauses)
    emit_timed("store: resume on the same node (local copy)", local)
    emit_timed("store: resume through another node after its node was killed -9 (take-over, fetch from S3, restore)",
               elsewhere)
    emit_value("store: resume on another node / local resume, p50 ratio (goal <= 1.3x)",
               f"{p50(elsewhere) / p50(local):.2f}x")
    emit_timed("store: resume through another node 3 s after its node was killed -9 (a ready survivor took it over "
               "and fetched it meanwhile)", prefetched)
    emit_value("store: resume on the survivor that took it over / local resume, p50 ratio",
               f"{p50(prefetched) / p50(local):.2f}x")


def sustained_creates(node, seconds=30, workers=4):
    """Creates per second over `seconds`, `workers` clients each creating
    and killing in a loop."""
    done = []
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def worker():
        client = httpx.Client(base_url=node.url, headers={"X-API-KEY": node.key}, timeout=120)
        while time.monotonic() < stop_at:
            r = client.post("/v2/sandboxes", json={"templateID": "base"})
            if r.status_code == 201:
                with lock:
                    done.append(time.monotonic())
                client.delete(f"/sandboxes/{r.json()['sandboxID']}")

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker) for _ in range(workers)]:
            f.result()
    elapsed = time.monotonic() - t0
    emit_value(
        f"node: creates per second sustained over {seconds} s ({workers} clients, create + kill)",
        f"{len(done) / elapsed:.1f}/s ({len(done)} creates)",
    )


def cluster_hop(node):
    """The cost of the mesh hop: the same sandboxes used through their
    owner and through a second node that forwards over QUIC. The second
    node is drained, so every create through it lands on the owner."""
    from e2b import Sandbox

    other_dir = os.path.join(os.path.dirname(node.data), "second")
    token = subprocess.run([SANDMESH, "cluster", "join-token", "--data-dir", node.data, "--node-id", "second"],
                           check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([SANDMESH, "cluster", "join", "--data-dir", other_dir, "--token", token],
                   check=True, capture_output=True, text=True)
    other = Node(other_dir, key=node.key, ip="127.0.0.2", seeds=[node.gossip])
    try:
        other.http.post("/node/drain").raise_for_status()
        deadline = time.monotonic() + 30
        while True:
            states = {n["nodeID"]: n["state"] for n in node.http.get("/cluster").json()["nodes"]}
            verified = {n["nodeID"]: n["verified"] for n in other.http.get("/cluster").json()["nodes"]}
            if states.get("second") == "draining" and verified.get(node.node_id):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the second node did not join: {states}")
            time.sleep(0.2)

        def point(n):
            os.environ.update(E2B_API_URL=n.url, E2B_SANDBOX_URL=n.url)

        creates = {"owner": [], "hop": []}
        for _ in range(10):
            for via, n in (("owner", node), ("hop", other)):
                point(n)
                t0 = time.perf_counter()
                sbx = Sandbox.create()
                creates[via].append(time.perf_counter() - t0)
                # Ids no longer name the owner: the REST view's clientID does.
                owner = node.http.get(f"/sandboxes/{sbx.sandbox_id}").json()["clientID"]
                assert owner == node.node_id, (sbx.sandbox_id, owner)
                sbx.kill()
        point(node)
        sbx = Sandbox.create(timeout=600)
        try:
            sbx.commands.run("head -c 64M /dev/urandom > /tmp/big")
            runs = {"owner": [], "hop": []}
            reads = {"owner": [], "hop": []}
            for via, n in (("owner", node), ("hop", other)):
                point(n)
                handle = Sandbox.connect(sbx.sandbox_id)
                handle.commands.run("true")
                for _ in range(50):
                    t0 = time.perf_counter()
                    handle.commands.run("true")
                    runs[via].append(time.perf_counter() - t0)
                for _ in range(3):
                    t0 = time.perf_counter()
                    data = handle.files.read("/tmp/big", format="bytes")
                    reads[via].append(time.perf_counter() - t0)
                    assert len(data) == 64 << 20
        finally:
            point(node)
            sbx.kill()
    finally:
        other.stop()
    emit_timed("cluster: SDK Sandbox.create() through the owner", creates["owner"])
    emit_timed("cluster: SDK Sandbox.create() through another node (placement + QUIC hop)", creates["hop"])
    emit_value("cluster: create through another node / through the owner, p50 ratio",
               f"{p50(creates['hop']) / p50(creates['owner']):.2f}x")
    emit_timed('cluster: SDK commands.run("true") through the owner', runs["owner"])
    emit_timed('cluster: SDK commands.run("true") through another node', runs["hop"])
    emit_value('cluster: commands.run("true") through another node / through the owner, p50 ratio',
               f"{p50(runs['hop']) / p50(runs['owner']):.2f}x")
    for via, label in (("owner", "the owner"), ("hop", "another node (raw QUIC stream)")):
        emit_value(f"cluster: 64 MiB download (SDK files.read) through {label}",
                   f"{64 / p50(reads[via]):.0f} MB/s (median of 3)")


def user_template_create(node):
    """Creates from a user template (built with Template.build: files, env,
    a running start command) against creates from base, interleaved in the
    same run, 20 each, through REST."""
    from e2b import Template

    template = (
        Template()
        .from_template("base")
        .run_cmd("head -c 20M /dev/urandom > /home/user/data.bin")
        .set_envs({"BENCH": "1"})
        .set_start_cmd("sleep infinity", "true")
    )
    t0 = time.perf_counter()
    Template.build(template, "bench-user-template")
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    Template.build(template, "bench-user-template")
    rebuild = time.perf_counter() - t0
    user, base = [], []
    for _ in range(20):
        for name, samples in (("bench-user-template", user), ("base", base)):
            t0 = time.perf_counter()
            r = node.http.post("/v2/sandboxes", json={"templateID": name})
            samples.append(time.perf_counter() - t0)
            r.raise_for_status()
            node.kill(r.json()["sandboxID"])
    emit_timed("node: REST create from a user template (Template.build) -> envd answers", user)
    emit_timed("node: REST create from base, same run", base)
    emit_value("node: create from a user template / from base, p50 ratio (goal <= 1.1)", f"{p50(user) / p50(base):.2f}x")
    emit_value("node: Template.build of that template, first / again with every layer cached",
               f"{build:.1f} s / {rebuild:.1f} s = {build / rebuild:.1f}x")


def code_interpreter(node):
    """e2b-code-interpreter: the code-interpreter-v1 template built as
    `cargo xtask up` builds it, then 20 x (Sandbox.create() + the first
    run_code) and 20 trivial run_code round trips in one sandbox."""
    from e2b_code_interpreter import Sandbox

    t0 = time.perf_counter()
    subprocess.run(
        [SANDMESH, "template", "build", "--if-missing", "--url", node.url, "--api-key", node.key,
         "--alias", "code-interpreter-v1", "--memory-mb", "1024",
         "-f", str(REPO / "node/templates/code-interpreter-v1/Dockerfile")],
        check=True, capture_output=True, text=True,
    )
    build = time.perf_counter() - t0
    creates, firsts = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        sbx = Sandbox.create()
        t1 = time.perf_counter()
        result = sbx.run_code("x = 40 + 2\nx")
        t2 = time.perf_counter()
        if result.text != "42":
            raise SystemExit(f"run_code answered {result!r}")
        creates.append(t1 - t0)
        firsts.append(t2 - t1)
        sbx.kill()
    sbx = Sandbox.create()
    try:
        trips = []
        for _ in range(20):
            t0 = time.perf_counter()
            sbx.run_code("1")
            trips.append(time.perf_counter() - t0)
    finally:
        sbx.kill()
    emit_timed("code interpreter: Sandbox.create() of code-interpreter-v1 -> returns", creates)
    emit_timed("code interpreter: the first run_code after Sandbox.create() (kernel already running)", firsts)
    emit_timed("code interpreter: a trivial run_code('1') round trip", trips)
    emit_value("code interpreter: building code-interpreter-v1 (pip install through the build proxy)", f"{build:.1f} s")


def main():
    if os.geteuid() != 0:
        raise SystemExit("bench_node needs root (gvisor runtime)")
    base = tempfile.mkdtemp(prefix="smh-bench-node-")
    data = os.path.join(base, "first")
    node = Node(data)
    for var in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
        os.environ.pop(var, None)
    os.environ.update(E2B_API_URL=node.url, E2B_SANDBOX_URL=node.url, E2B_API_KEY=node.key,
                      NO_PROXY="127.0.0.1,localhost")
    try:
        only = os.environ.get("SANDMESH_BENCH_ONLY")
        for bench in (sdk_create, sdk_run_true, rest_create, user_template_create, code_interpreter, pause_dirty,
                      pause_to_store, resume_elsewhere, sustained_creates, cluster_hop):
            if only and bench.__name__ not in only.split(","):
                continue
            print(f"bench_node: {bench.__name__}", file=sys.stderr, flush=True)
            bench(node)
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
