"""The unmodified E2B SDK against a sandmesh node (REST API + proxy)."""

import time
import uuid

import pytest
from e2b import (
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxNotRunningException,
    SandboxQuery,
)


def test_create_run_files_list_kill(sdk_env):
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(metadata={"suite": "sdk", "tag": tag}, envs={"GREETING": "hello"})
    try:
        # E2B's shape: 20 lowercase alphanumerics, no owner in it (the
        # cluster's registry knows where a sandbox is).
        assert len(sbx.sandbox_id) == 20 and sbx.sandbox_id.isalnum()
        assert sbx.sandbox_id == sbx.sandbox_id.lower()
        assert sbx.is_running()

        r = sbx.commands.run("echo hi")
        assert r.exit_code == 0
        assert r.stdout == "hi\n"
        assert sbx.commands.run("echo $GREETING").stdout == "hello\n"

        sbx.files.write("/tmp/sdk.txt", "written through the node")
        assert sbx.files.read("/tmp/sdk.txt") == "written through the node"

        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata["tag"] == tag

        listed = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]

        sbx.set_timeout(600)
    finally:
        assert sbx.kill()
    assert not sbx.is_running()
    assert Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items() == []


def test_wrong_api_key_is_an_authentication_error(sdk_env, monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "e2b_not_a_key")
    with pytest.raises(AuthenticationException):
        Sandbox.create()


def test_node_restart_keeps_sandboxes(node_factory, monkeypatch):
    """kill -9 the node: a new node on the same data dir re-adopts the
    sandboxes, with their files, tokens and metadata."""
    from conftest import point_sdk_at

    first = node_factory(kill_on_exit=False)
    point_sdk_at(monkeypatch, first.url, first.key)
    tag = uuid.uuid4().hex
    boxes = [Sandbox.create(metadata={"tag": tag, "n": str(i)}) for i in range(3)]
    for i, sbx in enumerate(boxes):
        sbx.files.write("/tmp/restart.txt", f"sandbox {i}")
    first.crash()

    second = node_factory()
    # The first node's key is in sled too.
    point_sdk_at(monkeypatch, second.url, first.key)
    listed = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
    assert sorted(s.sandbox_id for s in listed) == sorted(b.sandbox_id for b in boxes)
    for i, old in enumerate(boxes):
        sbx = Sandbox.connect(old.sandbox_id)
        assert sbx.files.read("/tmp/restart.txt") == f"sandbox {i}"
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert sbx.kill()


def test_deadline_and_not_found(sdk_env):
    """set_timeout really kills at the deadline; calls for a gone sandbox
    raise the SDK's not-found / not-running exceptions."""
    sbx = Sandbox.create()
    sbx.set_timeout(2)
    deadline = time.time() + 20
    while sbx.is_running():
        assert time.time() < deadline, "the sandbox outlived its timeout"
        time.sleep(0.25)
    with pytest.raises(NotFoundException):
        sbx.get_info()
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo too late")
    assert not sbx.kill()
