"""Templates built by users with the unmodified E2B SDK (`Template.build`).

A build runs its steps in a gVisor build sandbox (packages come through
the node's egress proxy), saves a layer after each step that changes
files, and publishes the finished sandbox (start command running) to the
object store; `Sandbox.create(name)` restores it.
"""

import time
import uuid

import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def build(template, name, **kw):
    """Template.build, with its log lines; returns (info, lines, seconds)."""
    lines = []
    started = time.monotonic()
    info = Template.build(
        template, name, on_build_logs=lambda e: lines.append(e.message), **kw
    )
    return info, lines, time.monotonic() - started


@pytest.fixture
def context(tmp_path):
    d = tmp_path / "context"
    (d / "local" / "dir" / "sub").mkdir(parents=True)
    (d / "local" / "dir" / "hello.txt").write_text("hello from the build context\n")
    (d / "local" / "dir" / "sub" / "deep.txt").write_text("deep\n")
    return d


def test_a_template_with_packages_files_env_workdir_and_start_command(sdk_env, context):
    name = unique("tpl")
    template = (
        Template(file_context_path=str(context))
        .from_template("base")
        .apt_install(["jq"])
        .pip_install(["requests"])
        .copy("local/dir", "/app")
        .set_envs({"GREETING": "hi there", "MODE": "template"})
        .set_workdir("/app")
        .set_start_cmd(
            "python3 -m http.server 8123 --bind 127.0.0.1",
            "curl -sf http://127.0.0.1:8123/ > /dev/null",
        )
    )
    info, lines, took = build(template, name)
    print(f"first build: {took:.1f}s")
    assert info.template_id == name
    assert any("[1/" in line for line in lines), lines
    assert Template.exists(name)

    sbx = Sandbox.create(name, timeout=120)
    try:
        assert sbx.commands.run("""echo '{"a": {"b": 42}}' | jq .a.b""").stdout == "42\n"
        out = sbx.commands.run("python3 -c 'import requests; print(requests.__name__)'")
        assert out.stdout == "requests\n"
        assert sbx.files.read("/app/hello.txt") == "hello from the build context\n"
        assert sbx.files.read("/app/sub/deep.txt") == "deep\n"
        # Owned by the user the steps ran as, so the sandbox's user can write.
        assert sbx.commands.run("stat -c %U /app/hello.txt").stdout == "user\n"
        assert sbx.commands.run("echo $GREETING/$MODE").stdout == "hi there/template\n"
        assert sbx.commands.run("pwd").stdout == "/app\n"
        # The start command was running when the template was saved, and
        # is in every sandbox made from it.
        page = sbx.commands.run("curl -sf http://127.0.0.1:8123/").stdout
        assert "hello.txt" in page
        # E2B's base promise: passwordless sudo for `user` (gVisor runs no
        # setuid program; sudo goes through sandmesh-sudod).
        assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
        assert sbx.commands.run("sudo -n apt-get --version").stdout.startswith("apt ")
    finally:
        sbx.kill()

    import httpx

    url, key = sdk_env
    listed = httpx.get(f"{url}/templates", headers={"X-API-Key": key}).json()
    assert name in [t["templateID"] for t in listed]


def test_a_second_build_reuses_the_layers_of_unchanged_steps(sdk_env):
    name = unique("cache")

    def template(last):
        return (
            Template()
            .from_template("base")
            .run_cmd("date +%s%N > /home/user/built-at; sleep 2")
            .run_cmd(f"echo {last} > /home/user/last")
        )

    _, first_lines, first = build(template("one"), name)
    assert not any("CACHED" in line for line in first_lines), first_lines
    _, lines, second = build(template("two"), name)
    print(f"first build {first:.1f}s, second (one step changed) {second:.1f}s")
    assert any(line.startswith("CACHED [1/2]") for line in lines), lines
    assert not any(line.startswith("CACHED [2/2]") for line in lines), lines

    sbx = Sandbox.create(name, timeout=60)
    try:
        assert sbx.files.read("/home/user/last") == "two\n"
        stamp = sbx.files.read("/home/user/built-at")
    finally:
        sbx.kill()
    # skip_cache runs every step again.
    _, lines, _ = build(template("two"), name, skip_cache=True)
    assert not any("CACHED" in line for line in lines), lines
    sbx = Sandbox.create(name, timeout=60)
    try:
        assert sbx.files.read("/home/user/built-at") != stamp
    finally:
        sbx.kill()


def test_a_failing_step_fails_the_build_with_its_log_and_serves_nothing(sdk_env):
    name = unique("broken")
    template = (
        Template()
        .from_template("base")
        .run_cmd("echo this step is about to fail; exit 1")
        .run_cmd("echo never runs")
    )
    lines = []
    with pytest.raises(BuildException) as err:
        Template.build(template, name, on_build_logs=lambda e: lines.append(e.message))
    assert "exit code 1" in str(err.value)
    assert any("this step is about to fail" in line for line in lines), lines
    assert not any("never runs" == line for line in lines), lines
    assert not Template.exists(name)
    with pytest.raises(Exception) as err:
        Sandbox.create(name, timeout=30)
    assert "not found" in str(err.value).lower()


def test_bad_builds_are_refused_with_clear_errors(sdk_env):
    import http.client

    import httpx

    url, key = sdk_env
    headers = {"X-API-Key": key}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        r = c.post("/v3/templates", json={"name": unique("bad")})
        assert r.status_code == 202, r.text
        ids = r.json()
        start = f"/v2/templates/{ids['templateID']}/builds/{ids['buildID']}"
        r = c.post(start, json={"fromTemplate": "base", "steps": [{"type": "ADD", "args": ["x", "/y"]}]})
        assert r.status_code == 400
        assert "unknown step type \"ADD\"" in r.json()["message"]
        r = c.post(start, json={"fromTemplate": "base", "steps": [
            {"type": "COPY", "args": ["../secret", "/y"], "filesHash": "a" * 64}]})
        assert r.status_code == 400
        assert "escapes the build context" in r.json()["message"]
        r = c.post(start, json={"fromTemplate": "no-such-template", "steps": []})
        assert r.status_code == 404
        r = c.post(start, content="{not json")
        assert r.status_code == 400
        assert r.json()["code"] == 400
        # An unknown build, a reserved name, a malformed name.
        r = c.get(f"/templates/{ids['templateID']}/builds/{uuid.uuid4()}/status")
        assert r.status_code == 404
        assert c.post("/v3/templates", json={"name": "base"}).status_code == 400
        assert c.post("/v3/templates", json={"name": "Not Valid"}).status_code == 400
        # An upload larger than the node takes is refused before it is read.
        r = c.get(f"/templates/{ids['templateID']}/files/{'b' * 64}")
        assert r.status_code == 201 and r.json()["present"] is False
        up = r.json()
        assert up["url"].startswith(url)
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        conn.putrequest("PUT", up["url"].removeprefix(url))
        for k, v in {**up["headers"], "Content-Length": str(2 << 40)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
        assert "larger than this node takes" in resp.read().decode()
        conn.close()
        r = c.get(f"/templates/{ids['templateID']}/files/not-a-hash")
        assert r.status_code == 400
        assert c.get("/templates/aliases/no-such-template-at-all").status_code == 404


DOCKERFILE = """\
FROM debian:bookworm
RUN apt-get update && apt-get install -y jq
RUN pip install requests
COPY local/dir /app
ENV GREETING="hi there"
WORKDIR /app
RUN echo {variant} > /app/variant
CMD ["python3", "-m", "http.server", "8123", "--bind", "127.0.0.1"]
"""


def cli_build(node, context, name):
    """`sandmesh template build` of `context`; (output, seconds)."""
    from conftest import SANDMESH
    import subprocess

    url, key = node
    started = time.monotonic()
    r = subprocess.run(
        [SANDMESH, "template", "build", "--url", url, "--api-key", key, "--alias", name,
         "--ready-cmd", "curl -sf http://127.0.0.1:8123/ > /dev/null", str(context)],
        capture_output=True, text=True, timeout=900,
    )
    took = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr, took


def test_the_same_template_from_a_dockerfile_with_the_cli(sdk_env, context):
    name = unique("docker")
    (context / "Dockerfile").write_text(DOCKERFILE.format(variant="one"))
    out, first = cli_build(sdk_env, context, name)
    assert "FROM debian:bookworm" in out and "mapped to template base" in out, out
    (context / "Dockerfile").write_text(DOCKERFILE.format(variant="two"))
    out, second = cli_build(sdk_env, context, name)
    print(f"Dockerfile build {first:.1f}s, again with the last RUN changed {second:.1f}s "
          f"({first / second:.1f}x faster)")
    # Every step before the changed one came from the layer cache.
    for n in range(1, 8):
        assert f"CACHED [{n}/" in out, out
    assert "CACHED [8/" not in out, out
    assert first / second >= 2, (first, second)

    sbx = Sandbox.create(name, timeout=120)
    try:
        assert sbx.commands.run("jq --version").exit_code == 0
        assert sbx.commands.run("python3 -c 'import requests'").exit_code == 0
        assert sbx.files.read("/app/hello.txt") == "hello from the build context\n"
        # Docker's COPY: owned by root unless --chown says otherwise.
        assert sbx.commands.run("stat -c %U /app/hello.txt").stdout == "root\n"
        assert sbx.files.read("/app/variant") == "two\n"
        assert sbx.commands.run("echo $GREETING").stdout == "hi there\n"
        assert "hello.txt" in sbx.commands.run("curl -sf http://127.0.0.1:8123/").stdout
    finally:
        sbx.kill()


def test_a_malformed_dockerfile_is_refused_with_its_line(sdk_env, context):
    from conftest import SANDMESH
    import subprocess

    url, key = sdk_env
    (context / "Dockerfile").write_text("FROM debian:bookworm\nRUN true\nFOOBAR x\n")
    r = subprocess.run(
        [SANDMESH, "template", "build", "--url", url, "--api-key", key, "--alias", unique("bad"),
         str(context)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert 'line 3: unknown instruction "FOOBAR"' in r.stderr, r.stderr
    (context / "Dockerfile").write_text("FROM debian:bookworm\nCOPY ../outside /x\n")
    r = subprocess.run(
        [SANDMESH, "template", "build", "--url", url, "--api-key", key, "--alias", unique("bad"),
         str(context)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "line 2" in r.stderr, r.stderr


def test_a_build_out_of_time_or_disk_stops_cleanly(monkeypatch, tmp_path):
    """A node with small build limits: the step is stopped, the build
    fails saying which limit, its sandbox is gone, nothing is served."""
    from conftest import NodeProcess, point_sdk_at

    node = NodeProcess(tmp_path / "node", extra=["--build-timeout", "15", "--build-disk-mb", "64"])
    try:
        point_sdk_at(monkeypatch, node.url, node.key)
        cases = [
            ("disk", "head -c 400M /dev/zero > /home/user/big; sleep 600", "ran out of disk"),
            ("time", "sleep 600", "ran out of time"),
        ]
        for what, script, said in cases:
            name = unique(f"limit-{what}")
            started = time.monotonic()
            with pytest.raises(BuildException) as err:
                Template.build(Template().from_template("base").run_cmd(script), name)
            assert said in str(err.value), err.value
            assert time.monotonic() - started < 120
            assert not Template.exists(name)
            # The build sandbox is gone with the build.
            assert Sandbox.list().next_items() == []
    finally:
        node.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Debian's docker-registry on loopback, holding `debian:bookworm`: an
    image of our own Debian tree (without envd and the init, which a build
    adds), pushed with skopeo."""
    import json
    import os
    import shutil
    import socket
    import subprocess

    from conftest import ARTIFACTS

    reg, skopeo = shutil.which("docker-registry"), shutil.which("skopeo")
    if not (reg and skopeo):
        msg = "docker-registry and skopeo are needed (cargo xtask test installs them)"
        if os.environ.get("SANDMESH_REQUIRE_ARTIFACTS"):
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {d / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([reg, "serve", str(d / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "docker-registry did not listen"
                time.sleep(0.1)
        tree = json.load(open(ARTIFACTS))["rootfs_dir"]
        subprocess.run(
            ["tar", "-C", tree, "--exclude=./usr/local/bin/envd",
             "--exclude=./usr/local/sbin/sandmesh-*", "--exclude=./dev",
             "-cf", str(d / "debian.tar"), "."], check=True)
        subprocess.run(
            [skopeo, "copy", "--quiet", "--dest-tls-verify=false", "--dest-compress-format", "zstd",
             "--dest-compress-level", "1", f"tarball:{d / 'debian.tar'}",
             f"docker://127.0.0.1:{port}/debian:bookworm"], check=True, timeout=300)
        (d / "debian.tar").unlink()
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def test_a_template_from_an_image_in_a_registry_served_by_another_node(registry, monkeypatch, tmp_path):
    """FROM 127.0.0.1:<port>/debian:bookworm: the image is pulled (envd
    and the E2B user added), built on, and a second node of the same
    object store creates sandboxes from the template (fetching the image's
    root from the store)."""
    from conftest import NodeProcess, point_sdk_at

    store = f"file://{tmp_path / 'objects'}"
    builder = NodeProcess(tmp_path / "a", extra=["--object-store", store])
    other = None
    try:
        point_sdk_at(monkeypatch, builder.url, builder.key)
        name = unique("from-registry")
        lines = []
        template = (
            Template()
            .from_image(f"{registry}/debian:bookworm")
            .run_cmd("cat /etc/debian_version > /home/user/version")
        )
        Template.build(template, name, on_build_logs=lambda e: lines.append(e.message))
        assert any(line.startswith(f"pulled {registry}/debian:bookworm") for line in lines), lines

        other = NodeProcess(tmp_path / "b", key=builder.key, extra=["--object-store", store])
        point_sdk_at(monkeypatch, other.url, other.key)
        sbx = Sandbox.create(name, timeout=60)
        try:
            assert sbx.commands.run("cat /home/user/version").stdout.startswith("12.")
            assert sbx.commands.run("whoami").stdout == "user\n"
            assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
        finally:
            sbx.kill()

        # An image the registry does not have: the build fails naming it.
        point_sdk_at(monkeypatch, builder.url, builder.key)
        with pytest.raises(BuildException) as err:
            Template.build(Template().from_image(f"{registry}/no/such:image").run_cmd("true"),
                           unique("missing"))
        assert "not found" in str(err.value), err.value
    finally:
        builder.stop()
        if other:
            other.stop()


def test_a_template_over_another_build_of_its_root_is_refused_saying_what_to_do(monkeypatch, tmp_path):
    """A template's saved memory restores only over the root tree it was
    built over: a node whose `base` is another build of the guest (as after
    `cargo xtask guest` rebuilt it) refuses to create from it, saying to
    build it again, instead of starting a sandbox that dies at once."""
    import json
    import subprocess

    from conftest import ARTIFACTS, NodeProcess, point_sdk_at
    from e2b import SandboxException

    root = json.loads(open(ARTIFACTS).read())["rootfs_dir"]
    other_root = tmp_path / "root"
    subprocess.run(["cp", "-al", root, str(other_root)], check=True)
    build_id = other_root / "etc/sandmesh-build-id"
    build_id.unlink()  # a hard link: never write through it
    build_id.write_text("another-build-of-the-guest\n")
    store = f"file://{tmp_path / 'objects'}"
    builder = NodeProcess(tmp_path / "a", extra=["--object-store", store])
    other = None
    try:
        point_sdk_at(monkeypatch, builder.url, builder.key)
        name = unique("root-build")
        Template.build(Template().from_template("base").run_cmd("echo hi > /home/user/hi"), name)
        other = NodeProcess(tmp_path / "b", key=builder.key,
                            extra=["--object-store", store, "--base-rootfs", str(other_root)])
        point_sdk_at(monkeypatch, other.url, other.key)
        with pytest.raises(SandboxException, match="another build of its root.*build it again"):
            Sandbox.create(name, timeout=60)
        point_sdk_at(monkeypatch, builder.url, builder.key)
        sbx = Sandbox.create(name, timeout=60)
        try:
            assert sbx.commands.run("cat /home/user/hi").stdout == "hi\n"
        finally:
            sbx.kill()
    finally:
        builder.stop()
        if other:
            other.stop()


def test_tags_name_builds_and_move_between_them(sdk_env):
    name = unique("tags")

    def template(which):
        return Template().from_template("base").run_cmd(f"echo {which} > /home/user/which")

    def which(ref):
        sbx = Sandbox.create(ref, timeout=60)
        try:
            return sbx.files.read("/home/user/which").strip()
        finally:
            sbx.kill()

    first = Template.build(template("one"), f"{name}:v1")
    second = Template.build(template("two"), name, tags=["v2"])
    tags = {t.tag: t.build_id for t in Template.get_tags(name)}
    assert tags == {"default": second.build_id, "v1": first.build_id, "v2": second.build_id}
    assert Template.exists(f"{name}:v1") and not Template.exists(f"{name}:nope")
    assert which(name) == "two"
    assert which(f"{name}:v1") == "one"

    assigned = Template.assign_tags(f"{name}:v1", ["stable"])
    assert assigned.build_id == first.build_id
    assert which(f"{name}:stable") == "one"
    Template.remove_tags(name, ["stable"])
    with pytest.raises(Exception) as err:
        Sandbox.create(f"{name}:stable", timeout=30)
    assert "not found" in str(err.value).lower()
    assert [t.tag for t in Template.get_tags("base")] == ["default"]

    import httpx

    url, key = sdk_env
    for path in (f"/v2/templates/{name}", f"/templates/{name}"):
        r = httpx.patch(url + path, json={"public": True}, headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["names"] == [name], r.text
    r = httpx.patch(f"{url}/v2/templates/no-such-one", json={"public": True}, headers={"X-API-Key": key})
    assert r.status_code == 404
    # Deleted: every build and tag; nothing to create from.
    assert httpx.delete(f"{url}/templates/{name}", headers={"X-API-Key": key}).status_code == 204
    assert not Template.exists(name)
    assert not Template.exists(f"{name}:v1")


def test_a_build_asked_of_one_node_is_started_and_followed_through_another(monkeypatch, tmp_path):
    """Two nodes of one cluster and one object store, behind an imagined
    balancer: the build is requested of the first, started and followed
    through the second (which carries those calls to the first, where the
    build runs), and sandboxes come from either."""
    import httpx

    from conftest import NodeProcess, init_cluster, join_cluster, point_sdk_at, wait_for

    store = f"file://{tmp_path / 'objects'}"
    dirs = [tmp_path / "n0", tmp_path / "n1"]
    init_cluster(dirs[0], "n0")
    join_cluster(dirs[0], dirs[1], "n1")
    first = NodeProcess(dirs[0], ip="127.0.0.1", extra=["--object-store", store])
    second = None
    try:
        second = NodeProcess(dirs[1], key=first.key, ip="127.0.0.2", seeds=[first.gossip],
                             extra=["--object-store", store])
        headers = {"X-API-Key": first.key}
        a = httpx.Client(base_url=first.url, headers=headers, timeout=60)
        b = httpx.Client(base_url=second.url, headers=headers, timeout=60)

        def both_ready():
            view = b.get("/cluster").json()
            return sorted((n["nodeID"], n["state"], n["verified"]) for n in view["nodes"]) == [
                ("n0", "ready", True), ("n1", "ready", True)]

        wait_for("two ready, verified nodes", both_ready)
        name = unique("balanced")
        ids = a.post("/v3/templates", json={"name": name}).json()
        path = f"/templates/{ids['templateID']}/builds/{ids['buildID']}"
        r = b.post(f"/v2{path}", json={"fromTemplate": "base", "steps": [
            {"type": "RUN", "args": ["echo built-on-n0 > /home/user/where", "user"], "force": False}]})
        assert r.status_code == 202, r.text

        def ready():
            status = b.get(f"{path}/status").json()
            assert status["status"] != "error", status
            return status["status"] == "ready"

        wait_for("the build ready, as the second node reports it", ready, timeout=120)
        logs = b.get(f"{path}/status", params={"logsOffset": 0}).json()["logEntries"]
        assert any("[1/1]" in e["message"] for e in logs), logs
        for node in (first, second):
            point_sdk_at(monkeypatch, node.url, node.key)
            sbx = Sandbox.create(name, timeout=60)
            try:
                assert sbx.files.read("/home/user/where") == "built-on-n0\n"
            finally:
                sbx.kill()
    finally:
        first.stop()
        if second:
            second.stop()


def test_a_build_sandbox_is_not_listed_as_the_users(sdk_env):
    import httpx

    url, key = sdk_env
    before = {s.sandbox_id for s in Sandbox.list().next_items()}
    info = Template.build_in_background(
        Template().from_template("base").run_cmd("echo started; sleep 5"), unique("hidden"))
    deadline = time.monotonic() + 60
    while True:
        status = Template.get_build_status(info, logs_offset=0)
        if any(e.message == "started" for e in status.log_entries):
            break
        assert status.status.value in ("waiting", "building") and time.monotonic() < deadline, status
        time.sleep(0.2)
    # Running (the node counts it) but not the user's to list.
    metrics = httpx.get(f"{url}/metrics").text
    running = [line for line in metrics.splitlines() if line.startswith('sandmesh_sandboxes{state="running"}')]
    assert running and float(running[0].split()[-1]) >= 1, running
    assert {s.sandbox_id for s in Sandbox.list().next_items()} == before
    while Template.get_build_status(info).status.value == "building":
        time.sleep(0.5)
    assert Template.get_build_status(info).status.value == "ready"
