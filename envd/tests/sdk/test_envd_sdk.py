"""Wire compatibility of envd with the official, unmodified E2B Python SDK:
commands, PTY, files and watching, exactly as SDK users call them."""

import time

import pytest
from e2b import AsyncSandbox, CommandExitException, FilesystemEventType, PtySize, Sandbox
from e2b.exceptions import NotFoundException


def test_commands_run_output_exit_code_user_env_cwd(envd):
    sbx = Sandbox.create()
    r = sbx.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    assert sbx.commands.run("id -u").stdout.strip() == "1000"
    assert sbx.commands.run("id -u", user="root").stdout.strip() == "0"
    assert sbx.commands.run("echo $GREETING", envs={"GREETING": "hello"}).stdout == "hello\n"
    (envd / "home/user/sub").mkdir()
    assert sbx.commands.run("pwd", cwd="/home/user/sub").stdout.strip().endswith("/home/user/sub")
    with pytest.raises(CommandExitException) as exc:
        sbx.commands.run("echo partial; exit 7")
    assert exc.value.exit_code == 7
    assert exc.value.stdout == "partial\n"


def test_background_command_list_stdin_kill(envd):
    sbx = Sandbox.create()
    handle = sbx.commands.run("cat", background=True, stdin=True)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(handle.pid, "ping\n")
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "ping\n"

    sleeper = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sbx.commands.kill(999999) is False


def test_pty_round_trip_and_resize(envd):
    sbx = Sandbox.create()
    out = bytearray()
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(handle.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(handle.pid, b"stty size; echo $((6*7)); exit\n")
    handle.wait(on_pty=lambda data: out.extend(data))
    text = out.decode(errors="replace")
    assert "30 100" in text and "42" in text, text


def test_files_write_read_list_rename_remove(envd):
    sbx = Sandbox.create()
    info = sbx.files.write("notes/a.txt", "hello files")
    assert info.path == "/home/user/notes/a.txt"
    assert sbx.files.read("notes/a.txt") == "hello files"
    assert sbx.files.read("/home/user/notes/a.txt", format="bytes") == b"hello files"
    assert (envd / "home/user/notes/a.txt").stat().st_uid == 1000
    sbx.files.write_files([
        {"path": "/home/user/many/1.txt", "data": "one"},
        {"path": "/home/user/many/2.txt", "data": b"two"},
    ])
    names = sorted(e.name for e in sbx.files.list("/home/user/many"))
    assert names == ["1.txt", "2.txt"]
    assert sbx.files.exists("/home/user/many/1.txt")
    assert not sbx.files.exists("/home/user/nope")
    assert sbx.files.make_dir("/home/user/newdir") is True
    assert sbx.files.make_dir("/home/user/newdir") is False
    moved = sbx.files.rename("/home/user/many/1.txt", "/home/user/newdir/1.txt")
    assert moved.path == "/home/user/newdir/1.txt"
    stat = sbx.files.get_info("/home/user/newdir/1.txt")
    assert stat.size == 3 and stat.owner == "user"
    sbx.files.remove("/home/user/newdir")
    assert not sbx.files.exists("/home/user/newdir/1.txt")
    with pytest.raises(NotFoundException):
        sbx.files.read("/home/user/missing.txt")


def test_watch_dir_polling(envd):
    sbx = Sandbox.create()
    sbx.files.make_dir("/home/user/watched")
    handle = sbx.files.watch_dir("/home/user/watched")
    sbx.files.write("/home/user/watched/new.txt", "x")
    events = []
    for _ in range(50):
        events += handle.get_new_events()
        if any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in events):
            break
        time.sleep(0.1)
    handle.stop()
    assert any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in events), events


@pytest.mark.asyncio
async def test_watch_dir_streaming_async(envd):
    sbx = await AsyncSandbox.create()
    await sbx.files.make_dir("/home/user/stream")
    seen = []

    def on_event(e):
        seen.append(e)

    handle = await sbx.files.watch_dir("/home/user/stream", on_event, recursive=True)
    await sbx.files.write("/home/user/stream/sub/deep.txt", "x")
    for _ in range(50):
        if any(e.name.endswith("deep.txt") for e in seen):
            break
        await __import__("asyncio").sleep(0.1)
    await handle.stop()
    assert any(e.name.endswith("deep.txt") for e in seen), seen
