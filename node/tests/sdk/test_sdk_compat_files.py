"""Filesystem behaviours of E2B's envd that the unmodified SDK (and E2B's
own test suite) relies on, through a sandmesh node on the gvisor runtime
(issue 23): symlinks report their target's type, upload metadata come back
in every entry (and survive pause/resume), removing a missing path is not
an error, and watchers see an upload as E2B's envd shows it. One sandbox
serves the module; the pause test makes its own."""

import asyncio
import time
import uuid

import pytest
from e2b import AsyncSandbox, FilesystemEventType, Sandbox
from e2b.sandbox.filesystem.filesystem import FileType

from conftest import module_sandbox


@pytest.fixture(scope="module")
def sbx(node):
    with module_sandbox(node) as box:
        yield box


def fresh(prefix):
    """A directory name of the user's home no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def drain(handle, want, timeout=10.0):
    """Events of a polled watch until `want(events)` holds (or the timeout)."""
    events = []
    deadline = time.time() + timeout
    while True:
        events += handle.get_new_events()
        if want(events) or time.time() > deadline:
            return events
        time.sleep(0.2)


def test_symlinks_report_their_targets_type_and_path(sbx):
    d = fresh("links")
    sbx.files.write(f"{d}/target.txt", "pointed at")
    sbx.files.make_dir(f"{d}/subdir")
    sbx.commands.run(
        "ln -s target.txt file-link && ln -s subdir dir-link && ln -s nowhere dangling",
        cwd=f"/home/user/{d}",
    )

    info = sbx.files.get_info(f"{d}/file-link")
    assert info.type == FileType.FILE
    assert info.symlink_target == f"/home/user/{d}/target.txt"
    assert info.name == "file-link" and info.path == f"/home/user/{d}/file-link"
    info = sbx.files.get_info(f"{d}/dir-link")
    assert info.type == FileType.DIR
    assert info.symlink_target == f"/home/user/{d}/subdir"

    listed = {e.name: e for e in sbx.files.list(d)}
    assert listed["file-link"].type == FileType.FILE
    assert listed["file-link"].symlink_target == f"/home/user/{d}/target.txt"
    assert listed["dir-link"].type == FileType.DIR
    assert listed["target.txt"].symlink_target is None
    assert listed["subdir"].symlink_target is None
    # A dangling link has no type E2B's envd could name (so the SDK's list
    # leaves it out), and its own path as its target.
    assert "dangling" not in listed
    info = sbx.files.get_info(f"{d}/dangling")
    assert info.type is None
    assert info.symlink_target == f"/home/user/{d}/dangling"


@pytest.mark.parametrize("octet_stream", [False, True], ids=["multipart", "octet-stream"])
def test_write_metadata_comes_back_in_every_entry(sbx, octet_stream):
    d = fresh("meta")
    written = sbx.files.write(
        f"{d}/doc.txt",
        "with metadata",
        metadata={"Author": "ada", "purpose": "compat"},
        use_octet_stream=octet_stream,
    )
    expected = {"author": "ada", "purpose": "compat"}  # keys lowercased
    assert written.metadata == expected
    assert sbx.files.get_info(f"{d}/doc.txt").metadata == expected
    assert [e.metadata for e in sbx.files.list(d)] == [expected]

    renamed = sbx.files.rename(f"{d}/doc.txt", f"{d}/moved/doc.txt")
    assert renamed.metadata == expected
    assert sbx.files.get_info(f"{d}/moved/doc.txt").metadata == expected
    sbx.files.rename(f"{d}/moved", f"{d}/moved-dir")
    assert sbx.files.get_info(f"{d}/moved-dir/doc.txt").metadata == expected
    sbx.commands.run(f"ln -s moved-dir/doc.txt {d}/link")
    assert sbx.files.get_info(f"{d}/link").metadata == expected

    # An upload replaces the metadata set whole.
    again = sbx.files.write(
        f"{d}/moved-dir/doc.txt", "new", metadata={"v": "2"}, use_octet_stream=octet_stream
    )
    assert again.metadata == {"v": "2"}
    assert sbx.files.get_info(f"{d}/moved-dir/doc.txt").metadata == {"v": "2"}
    plain = sbx.files.write(f"{d}/moved-dir/doc.txt", "plain", use_octet_stream=octet_stream)
    assert plain.metadata is None
    assert sbx.files.get_info(f"{d}/moved-dir/doc.txt").metadata is None

    # A removed file's metadata do not pass to a new file at its path.
    sbx.files.write(f"{d}/gone.txt", "x", metadata={"k": "v"}, use_octet_stream=octet_stream)
    sbx.files.remove(f"{d}/gone.txt")
    sbx.commands.run(f"echo new > /home/user/{d}/gone.txt")
    assert sbx.files.get_info(f"{d}/gone.txt").metadata is None


def test_write_files_puts_the_metadata_on_every_file(sbx):
    d = fresh("meta-many")
    infos = sbx.files.write_files(
        [
            {"path": f"{d}/a.txt", "data": "a"},
            {"path": f"{d}/nested/b.txt", "data": b"b"},
        ],
        metadata={"batch": "42"},
    )
    assert [i.metadata for i in infos] == [{"batch": "42"}, {"batch": "42"}]
    for path in (f"{d}/a.txt", f"{d}/nested/b.txt"):
        assert sbx.files.get_info(path).metadata == {"batch": "42"}
    # Files written without metadata have none.
    assert sbx.files.write(f"{d}/none.txt", "x").metadata is None
    assert sbx.files.get_info(f"{d}/none.txt").metadata is None


def test_metadata_survive_pause_and_resume(sdk_env):
    box = Sandbox.create(timeout=120)
    sandbox_id = box.sandbox_id
    try:
        box.files.write("/home/user/kept.txt", "x", metadata={"stage": "before"})
        box.files.write("/tmp/kept.txt", "y", metadata={"where": "tmp"})
        assert box.pause() is True
        box = Sandbox.connect(sandbox_id, timeout=120)
        assert box.files.get_info("/home/user/kept.txt").metadata == {"stage": "before"}
        assert box.files.get_info("/tmp/kept.txt").metadata == {"where": "tmp"}
        # And the store keeps working after the resume.
        box.files.rename("/home/user/kept.txt", "/home/user/after.txt")
        assert box.files.get_info("/home/user/after.txt").metadata == {"stage": "before"}
    finally:
        Sandbox.kill(sandbox_id)


def test_removing_a_missing_path_is_not_an_error(sbx):
    d = fresh("absent")
    sbx.files.remove(d)
    sbx.files.remove(f"{d}/deeper/still")
    sbx.files.write(f"{d}.txt", "a file")
    sbx.files.remove(f"{d}.txt/below-a-file")
    sbx.files.remove(f"{d}.txt")
    assert not sbx.files.exists(f"{d}.txt")


def test_writing_a_new_file_into_a_watched_directory(sbx):
    d = fresh("watch-new")
    sbx.files.make_dir(d)
    handle = sbx.files.watch_dir(d)
    try:
        sbx.files.write(f"{d}/new.txt", "fresh")
        events = drain(handle, lambda ev: len(ev) >= 3, timeout=3)
        assert [(e.type, e.name) for e in events] == [
            (FilesystemEventType.CREATE, "new.txt"),
            (FilesystemEventType.CHMOD, "new.txt"),
            (FilesystemEventType.WRITE, "new.txt"),
        ]
    finally:
        handle.stop()


def test_overwriting_a_watched_file_shows_a_write_of_it(sbx):
    d = fresh("watch-over")
    sbx.files.make_dir(d)
    sbx.files.write(f"{d}/w.txt", "first")
    handle = sbx.files.watch_dir(d, include_entry=True)
    try:
        sbx.files.write(f"{d}/w.txt", "second and longer")
        events = drain(
            handle, lambda ev: any(e.type == FilesystemEventType.WRITE for e in ev)
        )
        writes = [e for e in events if e.type == FilesystemEventType.WRITE]
        assert writes and all(e.name == "w.txt" for e in writes), events
        assert writes[-1].entry is not None
        assert writes[-1].entry.path == f"/home/user/{d}/w.txt"
        assert writes[-1].entry.type == FileType.FILE
        assert writes[-1].entry.size == len("second and longer")
        # Nothing but the file itself shows.
        time.sleep(0.5)
        events += handle.get_new_events()
        assert {e.name for e in events} == {"w.txt"}, events
    finally:
        handle.stop()


def test_streamed_watch_of_an_overwrite(sbx):
    """The async SDK streams WatchDir; it sees the same."""
    d = fresh("watch-stream")
    sbx.files.make_dir(d)
    sbx.files.write(f"{d}/s.txt", "first")

    async def run():
        asbx = await AsyncSandbox.connect(sbx.sandbox_id)
        seen = []
        handle = await asbx.files.watch_dir(d, on_event=seen.append)
        try:
            await asbx.files.write(f"{d}/s.txt", "second")
            deadline = time.time() + 10
            while not any(e.type == FilesystemEventType.WRITE for e in seen):
                assert time.time() < deadline, f"no WRITE event: {seen}"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        finally:
            await handle.stop()
        return seen

    seen = asyncio.run(run())
    assert {e.name for e in seen} == {"s.txt"}, seen


def test_recursive_watch_of_a_directory_made_just_before(sbx):
    d = fresh("watch-rec")
    sbx.files.remove(d)  # nothing there: not an error
    sbx.files.make_dir(f"{d}/nested")
    handle = sbx.files.watch_dir(d, recursive=True)
    try:
        sbx.files.write(f"{d}/nested/file.txt", "deep")
        events = drain(handle, lambda ev: len(ev) >= 3, timeout=3)
        assert [(e.type, e.name) for e in events] == [
            (FilesystemEventType.CREATE, "nested/file.txt"),
            (FilesystemEventType.CHMOD, "nested/file.txt"),
            (FilesystemEventType.WRITE, "nested/file.txt"),
        ]
    finally:
        handle.stop()
