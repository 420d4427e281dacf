"""E2B behaviours a user's code relies on beyond the basic calls (issue 23),
through the unmodified SDK: `Sandbox.list()` order, filters and paging over
running and paused sandboxes; `Template.exists`; the base template's
`python`, `boot_id` and `sudo`; auto-resume of a paused sandbox by traffic.
"""

import re
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from e2b import CommandExitException, Sandbox, SandboxQuery, SandboxState, Template

from conftest import module_sandbox


@pytest.fixture(scope="module")
def sbx(node):
    with module_sandbox(node, metadata={"suite": "compat-api"}) as box:
        yield box


@pytest.fixture
def made(sdk_env):
    """Sandboxes a test creates, killed after it."""
    boxes = []
    yield boxes
    for b in boxes:
        try:
            b.kill()
        except Exception:
            pass


def ids(infos):
    return [i.sandbox_id for i in infos]


def all_pages(paginator):
    seen = []
    while paginator.has_next:
        seen.append(paginator.next_items())
    return seen


# ------------------------------------------------------------------ list


def test_list_is_newest_first_and_order_asc_reverses_it(made):
    tag = uuid.uuid4().hex
    for _ in range(3):
        made.append(Sandbox.create(metadata={"tag": tag}))
    query = SandboxQuery(metadata={"tag": tag})
    newest_first = list(reversed(ids(made)))

    assert ids(Sandbox.list(query=query).next_items()) == newest_first
    assert ids(Sandbox.list(query=query, order="desc").next_items()) == newest_first
    assert ids(Sandbox.list(query=query, order="asc").next_items()) == ids(made)


def test_paging_covers_running_and_paused_in_order(made):
    tag = uuid.uuid4().hex
    for _ in range(3):
        made.append(Sandbox.create(metadata={"tag": tag}))
    assert made[1].pause() is True
    query = SandboxQuery(metadata={"tag": tag})

    for order, want in (("desc", list(reversed(made))), ("asc", made)):
        paginator = Sandbox.list(query=query, limit=1, order=order)
        pages = all_pages(paginator)
        assert [len(p) for p in pages] == [1, 1, 1], order
        assert paginator.next_token is None
        flat = [i for p in pages for i in p]
        assert ids(flat) == ids(want), order
        states = {i.sandbox_id: i.state for i in flat}
        assert states[made[1].sandbox_id] == SandboxState.PAUSED
        assert states[made[0].sandbox_id] == SandboxState.RUNNING

    # A state filter pages the same way.
    running = Sandbox.list(
        query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.RUNNING]), limit=1
    )
    assert ids(i for p in all_pages(running) for i in p) == [made[2].sandbox_id, made[0].sandbox_id]
    paused = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED]))
    assert ids(paused.next_items()) == [made[1].sandbox_id]


def test_started_after_is_inclusive_and_any_offset_works(sbx):
    started = sbx.get_info().started_at
    query = lambda after: SandboxQuery(metadata={"suite": "compat-api"}, started_after=after)  # noqa: E731

    assert sbx.sandbox_id in ids(Sandbox.list(query=query(started)).next_items())
    # The same instant written with another UTC offset.
    elsewhere = started.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert sbx.sandbox_id in ids(Sandbox.list(query=query(elsewhere)).next_items())
    later = started + timedelta(seconds=1)
    assert sbx.sandbox_id not in ids(Sandbox.list(query=query(later)).next_items())


def test_template_filter(sbx):
    template = sbx.get_info().template_id
    by = lambda t: SandboxQuery(metadata={"suite": "compat-api"}, template=t)  # noqa: E731

    assert sbx.sandbox_id in ids(Sandbox.list(query=by(template)).next_items())
    assert Sandbox.list(query=by("no-such-template")).next_items() == []
    # A tag cannot narrow a list of sandboxes: refused, as E2B does.
    with pytest.raises(Exception, match="tag"):
        Sandbox.list(query=by(f"{template}:v1")).next_items()


def test_bad_list_queries_are_json_400s(sdk_env):
    url, key = sdk_env
    for query in ("order=sideways", "startedAfter=yesterday", "nextToken=garbage"):
        r = httpx.get(f"{url}/v2/sandboxes?{query}", headers={"X-API-KEY": key})
        assert r.status_code == 400, query
        assert r.json()["code"] == 400 and r.json()["message"], query


# ------------------------------------------------------------- templates


def test_template_exists(sdk_env):
    assert Template.exists("base") is True
    assert Template.exists("base:default") is True
    assert Template.exists(f"nonexistent-{uuid.uuid4()}") is False
    assert Template.exists("base:no-such-tag") is False


def test_template_alias_answers_e2b_shapes(sdk_env):
    url, key = sdk_env
    r = httpx.get(f"{url}/templates/aliases/base", headers={"X-API-KEY": key})
    assert r.status_code == 200
    assert r.json() == {"templateID": "base", "public": False}
    r = httpx.get(f"{url}/templates/aliases/nope-{uuid.uuid4().hex}", headers={"X-API-KEY": key})
    assert r.status_code == 404
    assert r.json()["code"] == 404 and "not found" in r.json()["message"]
    r = httpx.get(f"{url}/templates/aliases/base", headers={"X-API-KEY": "e2b_wrong"})
    assert r.status_code == 401


# ------------------------------------------------------- the base template


def test_python_is_a_command(sbx):
    r = sbx.commands.run("python --version && python -c 'print(6 * 7)'")
    assert r.stdout.startswith("Python 3.") and r.stdout.endswith("42\n"), r.stdout


UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\n$")


def test_ls_and_stat_work(sbx):
    """`ls` and `stat` are what a user types first. runsc 2022-12 (Debian
    12's) answers coreutils' statx with EINVAL and fails both on every path;
    `cargo xtask` runs the pinned runsc 2024-07 (xtask/src/runsc.rs)."""
    r = sbx.commands.run("ls -ld / /tmp /home/user && ls / && stat -c %n /")
    assert r.exit_code == 0, r.stderr


def test_boot_id_is_per_sandbox_and_survives_pause(made):
    a, b = Sandbox.create(), Sandbox.create()
    made += [a, b]
    boot = "/proc/sys/kernel/random/boot_id"
    first = a.files.read(boot)
    assert UUID.match(first), repr(first)
    assert a.commands.run(f"cat {boot}", user="user").stdout == first
    assert b.files.read(boot) != first

    assert a.pause() is True
    again = Sandbox.connect(a.sandbox_id)
    assert again.files.read(boot) == first
    # sudo's daemon (gvisor) came back with the sandbox.
    assert again.commands.run("sudo -n id -u").stdout == "0\n"


def test_sudo_as_the_default_user(sbx):
    # runsc 2022-12 runs no setuid program (no_new_privs is always set
    # there): sudo then goes through the root daemon sandmesh-sudod.
    assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
    assert sbx.commands.run("id -u").stdout == "1000\n"
    # Standard streams, exit status and `-u` are sudo's own.
    assert sbx.commands.run("echo piped | sudo -n cat").stdout == "piped\n"
    r = sbx.commands.run("sudo -n sh -c 'echo out; echo err >&2; exit 3'", background=True).wait
    with pytest.raises(CommandExitException) as e:
        r()
    assert (e.value.exit_code, e.value.stdout, e.value.stderr) == (3, "out\n", "err\n")
    assert sbx.commands.run("sudo -n -u nobody id -un").stdout == "nobody\n"
    assert sbx.commands.run("sudo -n touch /root/made && sudo -n test -O /root/made && echo root").stdout == "root\n"


def test_sudo_refuses_users_sudoers_does_not_allow(sbx):
    sbx.commands.run("id other >/dev/null 2>&1 || useradd -m other", user="root")
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("sudo -n id -u", user="other")
    assert "not allowed" in e.value.stderr or "may not run sudo" in e.value.stderr, e.value.stderr
    assert e.value.stdout == ""


# ------------------------------------------------------------ auto-resume


def health(url, sandbox_id):
    return httpx.get(
        f"{url}/health",
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"},
        timeout=60,
    )


def test_traffic_resumes_a_paused_auto_resume_sandbox(made, sdk_env):
    url, _ = sdk_env
    box = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause", "auto_resume": True})
    made.append(box)
    assert box.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    box.files.write("/tmp/kept", "kept")
    assert box.pause() is True
    assert Sandbox.get_info(box.sandbox_id).state == SandboxState.PAUSED

    # An SDK call that is sandbox traffic (envd's /files) wakes it.
    assert box.files.read("/tmp/kept") == "kept"
    info = Sandbox.get_info(box.sandbox_id)
    assert info.state == SandboxState.RUNNING
    # It lives the create's timeout again.
    assert info.end_at - datetime.now(timezone.utc) > timedelta(seconds=200)

    # Paused again: a bare HTTP request to a port does it too.
    assert box.pause() is True
    assert health(url, box.sandbox_id).status_code == 204
    assert Sandbox.get_info(box.sandbox_id).state == SandboxState.RUNNING


def test_without_auto_resume_traffic_to_a_paused_sandbox_is_refused(made, sdk_env):
    url, _ = sdk_env
    box = Sandbox.create(timeout=300)
    made.append(box)
    assert box.get_info().lifecycle == {"on_timeout": "kill", "auto_resume": False}
    assert box.pause() is True
    r = health(url, box.sandbox_id)
    assert r.status_code == 502 and "paused" in r.json()["message"]
    assert Sandbox.get_info(box.sandbox_id).state == SandboxState.PAUSED


def test_filesystem_only_auto_pause_cannot_auto_resume(sdk_env):
    url, key = sdk_env
    for body, says in (
        ({"autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}}, "autoResume"),
        ({"autoPauseMemory": False}, "autoPause"),
    ):
        r = httpx.post(
            f"{url}/v2/sandboxes",
            json={"templateID": "base", **body},
            headers={"X-API-KEY": key},
        )
        assert r.status_code == 400, body
        assert says in r.json()["message"], r.json()
