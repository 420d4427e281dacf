//! `filesystem.Filesystem` as the E2B SDK drives it (envd as a host process).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::{ConnectStream, Envd, Frame, basic_user, chown};
use serde_json::{Value, json};

const FS: &str = "filesystem.Filesystem";

async fn call(envd: &Envd, method: &str, req: Value) -> (u16, Value) {
    envd.unary(&format!("{FS}/{method}"), req).await
}

async fn call_as(envd: &Envd, user: &str, method: &str, req: Value) -> (u16, Value) {
    envd.unary_with(
        &format!("{FS}/{method}"),
        req,
        &[("authorization", &basic_user(user))],
    )
    .await
}

fn write(envd: &Envd, guest: &str, data: &str) {
    let host = envd.host(guest);
    std::fs::create_dir_all(host.parent().unwrap()).unwrap();
    std::fs::write(&host, data).unwrap();
}

#[tokio::test]
async fn stat_reports_entries_as_upstream() {
    let envd = Envd::start();
    write(&envd, "/home/user/a.txt", "hello");
    let host = envd.host("/home/user/a.txt");
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o644)).unwrap();
    chown(&host, 1000, 1000);

    let (status, body) = call(&envd, "Stat", json!({"path": "/home/user/a.txt"})).await;
    assert_eq!(status, 200, "{body}");
    let e = &body["entry"];
    assert_eq!(e["name"], "a.txt");
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["path"], "/home/user/a.txt");
    assert_eq!(e["size"], "5", "int64 is a JSON string");
    assert_eq!(e["mode"], 0o644);
    assert_eq!(e["permissions"], "-rw-r--r--");
    assert_eq!(e["owner"], "user");
    assert_eq!(e["group"], "user");
    assert!(
        e["modifiedTime"].as_str().is_some_and(|t| t.contains('T')),
        "RFC 3339: {e}"
    );
    assert!(e.get("symlinkTarget").is_none());
    assert!(e.get("isSymlink").is_none(), "false is omitted");

    // Relative paths are relative to the user's home.
    let (_, rel) = call(&envd, "Stat", json!({"path": "a.txt"})).await;
    assert_eq!(rel["entry"]["path"], "/home/user/a.txt");

    let (_, dir) = call(&envd, "Stat", json!({"path": "/home/user"})).await;
    assert_eq!(dir["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(
        dir["entry"]["permissions"].as_str().unwrap().chars().next(),
        Some('d')
    );
    let (_, tmp) = call(&envd, "Stat", json!({"path": "/tmp"})).await;
    assert_eq!(
        tmp["entry"]["permissions"], "dtrwxrwxrwx",
        "Go's FileMode.String()"
    );
    assert_eq!(tmp["entry"]["mode"], 0o777);

    // Relative: an absolute target would name a host path in host-process mode.
    std::os::unix::fs::symlink("a.txt", envd.host("/home/user/link")).unwrap();
    let (_, link) = call(&envd, "Stat", json!({"path": "/home/user/link"})).await;
    let l = &link["entry"];
    assert_eq!(
        l["type"], "FILE_TYPE_FILE",
        "a symlink reports its target's type"
    );
    // Upstream never sets isSymlink: the SDK would then say `symlink`
    // where E2B's says `file`.
    assert!(l.get("isSymlink").is_none(), "{l}");
    assert_eq!(l["symlinkTarget"], "/home/user/a.txt");
    assert_eq!(l["mode"], 0o644);
    assert_eq!(l["permissions"], "Lrwxrwxrwx", "the link's own mode string");
    std::fs::create_dir(envd.host("/home/user/d")).unwrap();
    std::os::unix::fs::symlink("d", envd.host("/home/user/dlink")).unwrap();
    std::os::unix::fs::symlink("nowhere", envd.host("/home/user/broken")).unwrap();
    let (_, list) = call(&envd, "ListDir", json!({"path": "/home/user"})).await;
    let find = |name: &str| {
        list["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} listed: {list}"))
    };
    assert_eq!(find("link")["type"], "FILE_TYPE_FILE");
    assert_eq!(find("link")["symlinkTarget"], "/home/user/a.txt");
    assert_eq!(find("dlink")["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(find("dlink")["symlinkTarget"], "/home/user/d");
    assert!(find("dlink").get("isSymlink").is_none());
    // A dangling link: no type (upstream's unknown), the link's own path.
    let broken = find("broken");
    assert!(broken.get("type").is_none(), "{broken}");
    assert_eq!(broken["symlinkTarget"], "/home/user/broken");
    assert!(find("a.txt").get("symlinkTarget").is_none());

    let (status, body) = call(&envd, "Stat", json!({"path": "/home/user/missing"})).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn make_dir_creates_parents_for_the_user() {
    let envd = Envd::start();
    let (status, body) = call(&envd, "MakeDir", json!({"path": "/home/user/x/y/z"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entry"]["path"], "/home/user/x/y/z");
    assert_eq!(body["entry"]["name"], "z");
    assert_eq!(body["entry"]["owner"], "user");
    for d in ["/home/user/x", "/home/user/x/y", "/home/user/x/y/z"] {
        let m = std::fs::metadata(envd.host(d)).unwrap();
        assert!(m.is_dir());
        assert_eq!(
            (m.uid(), m.gid()),
            (1000, 1000),
            "{d} belongs to the default user"
        );
    }

    let (status, body) = call(&envd, "MakeDir", json!({"path": "/home/user/x/y/z"})).await;
    assert_eq!(status, 409);
    assert_eq!(
        body["code"], "already_exists",
        "the SDK's make_dir returns False on it"
    );

    write(&envd, "/home/user/file", "");
    let (status, body) = call(&envd, "MakeDir", json!({"path": "/home/user/file"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "invalid_argument");

    let (status, _) = call_as(&envd, "root", "MakeDir", json!({"path": "/root/made"})).await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::metadata(envd.host("/root/made")).unwrap().uid(), 0);
}

#[tokio::test]
async fn move_renames_and_creates_destination_parents() {
    let envd = Envd::start();
    write(&envd, "/home/user/src.txt", "data");
    let (status, body) = call(
        &envd,
        "Move",
        json!({"source": "/home/user/src.txt", "destination": "/home/user/new/dir/dst.txt"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["path"], "/home/user/new/dir/dst.txt");
    assert_eq!(body["entry"]["name"], "dst.txt");
    assert_eq!(body["entry"]["size"], "4");
    assert!(!envd.host("/home/user/src.txt").exists());
    assert_eq!(
        std::fs::read_to_string(envd.host("/home/user/new/dir/dst.txt")).unwrap(),
        "data"
    );
    assert_eq!(
        std::fs::metadata(envd.host("/home/user/new"))
            .unwrap()
            .uid(),
        1000
    );

    // Directories move too.
    let (status, _) = call(
        &envd,
        "Move",
        json!({"source": "/home/user/new", "destination": "/home/user/moved"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(envd.host("/home/user/moved/dir/dst.txt").exists());

    let (status, body) = call(
        &envd,
        "Move",
        json!({"source": "/home/user/nope", "destination": "/home/user/x"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn list_dir_honours_depth_and_sorts_by_path() {
    let envd = Envd::start();
    write(&envd, "/home/user/d/b.txt", "b");
    write(&envd, "/home/user/d/a/inner.txt", "i");
    write(&envd, "/home/user/d/a/deeper/x", "x");
    write(&envd, "/home/user/d/c", "c");

    let paths = |body: &Value| -> Vec<String> {
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = call(
        &envd,
        "ListDir",
        json!({"path": "/home/user/d", "depth": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        paths(&body),
        ["/home/user/d/a", "/home/user/d/b.txt", "/home/user/d/c"]
    );
    assert_eq!(body["entries"][0]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entries"][1]["type"], "FILE_TYPE_FILE");
    assert_eq!(body["entries"][1]["name"], "b.txt");

    let (_, body0) = call(&envd, "ListDir", json!({"path": "/home/user/d"})).await;
    assert_eq!(paths(&body0), paths(&body), "depth 0 lists direct children");

    let (_, body) = call(
        &envd,
        "ListDir",
        json!({"path": "/home/user/d", "depth": 2}),
    )
    .await;
    assert_eq!(
        paths(&body),
        [
            "/home/user/d/a",
            "/home/user/d/a/deeper",
            "/home/user/d/a/inner.txt",
            "/home/user/d/b.txt",
            "/home/user/d/c"
        ]
    );
    let (_, body) = call(&envd, "ListDir", json!({"path": "d", "depth": 10})).await;
    assert_eq!(paths(&body).len(), 6);

    let (status, body) = call(&envd, "ListDir", json!({"path": "/home/user/d/c"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "invalid_argument");
    let (status, body) = call(&envd, "ListDir", json!({"path": "/home/user/none"})).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn remove_deletes_files_and_trees() {
    let envd = Envd::start();
    write(&envd, "/home/user/f", "x");
    write(&envd, "/home/user/tree/a/b/c", "x");
    write(&envd, "/home/user/roots/a/b", "x");
    for d in [
        "/home/user/tree",
        "/home/user/tree/a",
        "/home/user/tree/a/b",
    ] {
        chown(&envd.host(d), 1000, 1000);
    }
    let (status, body) = call(&envd, "Remove", json!({"path": "/home/user/f"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({}));
    assert!(!envd.host("/home/user/f").exists());
    let (status, _) = call(&envd, "Remove", json!({"path": "/home/user/tree"})).await;
    assert_eq!(status, 200);
    assert!(!envd.host("/home/user/tree").exists());
    // The user cannot empty a directory of root's (as `rm -r` could not); root can.
    let (status, body) = call(&envd, "Remove", json!({"path": "/home/user/roots"})).await;
    assert_eq!(status, 403, "{body}");
    assert!(envd.host("/home/user/roots/a/b").exists());
    let (status, _) = call_as(&envd, "root", "Remove", json!({"path": "/home/user/roots"})).await;
    assert_eq!(status, 200);
    // Nothing to remove is success, as upstream's `os.RemoveAll` answers.
    let (status, body) = call(&envd, "Remove", json!({"path": "/home/user/f"})).await;
    assert_eq!((status, body), (200, json!({})));
    write(&envd, "/home/user/plain", "x");
    let (status, body) = call(&envd, "Remove", json!({"path": "/home/user/plain/below"})).await;
    assert_eq!((status, body), (200, json!({})), "below a file");
    let (status, _) = call(&envd, "Remove", json!({"path": "/home/user/no/such/dir"})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_user_is_held_to_unix_permissions() {
    let envd = Envd::start();
    std::fs::set_permissions(envd.host("/root"), std::fs::Permissions::from_mode(0o700)).unwrap();
    write(&envd, "/root/secret", "s");
    write(&envd, "/etc/conf", "c");

    let denied = |(status, body): (u16, Value)| {
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["code"], "permission_denied");
    };
    denied(call(&envd, "MakeDir", json!({"path": "/root/mine"})).await);
    denied(call(&envd, "Stat", json!({"path": "/root/secret"})).await);
    denied(call(&envd, "ListDir", json!({"path": "/root"})).await);
    denied(call(&envd, "Remove", json!({"path": "/etc/conf"})).await);
    denied(
        call(
            &envd,
            "Move",
            json!({"source": "/etc/conf", "destination": "/home/user/conf"}),
        )
        .await,
    );
    denied(
        call(
            &envd,
            "Move",
            json!({"source": "/home/user", "destination": "/etc/user"}),
        )
        .await,
    );
    denied(call(&envd, "MakeDir", json!({"path": "/etc/new"})).await);
    denied(call(&envd, "Stat", json!({"path": "/../../etc/passwd"})).await);
    denied(call_as(&envd, "root", "Stat", json!({"path": "../../../x"})).await);
    assert!(envd.host("/etc/conf").exists());

    // The sticky /tmp: others' files cannot be removed.
    write(&envd, "/tmp/roots", "r");
    denied(call(&envd, "Remove", json!({"path": "/tmp/roots"})).await);
    let (status, _) = call(&envd, "MakeDir", json!({"path": "/tmp/users"})).await;
    assert_eq!(status, 200);
    assert_eq!(
        std::fs::metadata(envd.host("/tmp/users")).unwrap().uid(),
        1000
    );
    let (status, _) = call(&envd, "Remove", json!({"path": "/tmp/users"})).await;
    assert_eq!(status, 200);

    // The served directory's own mode (a 0700 scratch dir here) is not the guest's `/`.
    std::fs::set_permissions(envd.root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (status, body) = call(&envd, "Stat", json!({"path": "/home/user"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(&envd, "ListDir", json!({"path": "/"})).await;
    assert_eq!(status, 200);
    denied(call(&envd, "MakeDir", json!({"path": "/top"})).await);

    // root may do all of it.
    let (status, _) = call_as(&envd, "root", "Stat", json!({"path": "/root/secret"})).await;
    assert_eq!(status, 200);
    let (status, _) = call_as(&envd, "root", "Remove", json!({"path": "/etc/conf"})).await;
    assert_eq!(status, 200);

    // An unknown user is refused.
    let (status, _) = call_as(&envd, "nobody", "Stat", json!({"path": "/tmp"})).await;
    assert_eq!(status, 400);
}

/// The next filesystem event of a watch stream (skipping keepalives).
async fn next_event(stream: &mut ConnectStream) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event within 10 s")
            .expect("the stream goes on");
        match frame {
            Frame::Message(m) if m.get("keepalive").is_some() => continue,
            Frame::Message(m) => return m["filesystem"].clone(),
            Frame::End(e) => panic!("stream ended: {e}"),
        }
    }
}

/// Read events until one matches (name, type); returns it.
async fn expect_event(stream: &mut ConnectStream, name: &str, ty: &str) -> Value {
    loop {
        let ev = next_event(stream).await;
        if ev["name"] == name && ev["type"] == ty {
            return ev;
        }
    }
}

#[tokio::test]
async fn watch_dir_streams_events() {
    let envd = Envd::start();
    std::fs::create_dir_all(envd.host("/home/user/w")).unwrap();
    let mut stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": "/home/user/w", "includeEntry": true}),
            &[],
        )
        .await;
    match stream.next().await.unwrap() {
        Frame::Message(m) => assert_eq!(m, json!({"start": {}}), "the first message is start"),
        f => panic!("{f:?}"),
    }
    let f = envd.host("/home/user/w/f.txt");
    std::fs::write(&f, "1").unwrap();
    let ev = expect_event(&mut stream, "f.txt", "EVENT_TYPE_CREATE").await;
    assert_eq!(ev["entry"]["path"], "/home/user/w/f.txt");
    assert_eq!(ev["entry"]["type"], "FILE_TYPE_FILE");
    expect_event(&mut stream, "f.txt", "EVENT_TYPE_WRITE").await;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    expect_event(&mut stream, "f.txt", "EVENT_TYPE_CHMOD").await;
    std::fs::rename(&f, envd.host("/home/user/w/g.txt")).unwrap();
    expect_event(&mut stream, "f.txt", "EVENT_TYPE_RENAME").await;
    expect_event(&mut stream, "g.txt", "EVENT_TYPE_CREATE").await;
    std::fs::remove_file(envd.host("/home/user/w/g.txt")).unwrap();
    let ev = expect_event(&mut stream, "g.txt", "EVENT_TYPE_REMOVE").await;
    assert!(ev.get("entry").is_none(), "a removed file has no entry");

    // Not recursive: events in subdirectories are not reported.
    std::fs::create_dir(envd.host("/home/user/w/sub")).unwrap();
    expect_event(&mut stream, "sub", "EVENT_TYPE_CREATE").await;
    std::fs::write(envd.host("/home/user/w/sub/inner"), "x").unwrap();
    std::fs::write(envd.host("/home/user/w/marker"), "x").unwrap();
    let ev = next_event(&mut stream).await;
    assert_eq!(ev["name"], "marker", "sub/inner is not watched: {ev}");
}

#[tokio::test]
async fn recursive_watch_follows_new_subdirectories() {
    let envd = Envd::start();
    std::fs::create_dir_all(envd.host("/home/user/r/existing")).unwrap();
    let mut stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": "/home/user/r", "recursive": true}),
            &[],
        )
        .await;
    assert!(matches!(stream.next().await.unwrap(), Frame::Message(m) if m.get("start").is_some()));
    std::fs::write(envd.host("/home/user/r/existing/a"), "x").unwrap();
    let ev = expect_event(&mut stream, "existing/a", "EVENT_TYPE_CREATE").await;
    assert!(ev.get("entry").is_none(), "no entry unless asked");
    std::fs::create_dir_all(envd.host("/home/user/r/new/deeper")).unwrap();
    std::fs::write(envd.host("/home/user/r/new/deeper/b"), "x").unwrap();
    expect_event(&mut stream, "new", "EVENT_TYPE_CREATE").await;
    expect_event(&mut stream, "new/deeper/b", "EVENT_TYPE_CREATE").await;
    std::fs::write(envd.host("/home/user/r/new/c"), "x").unwrap();
    expect_event(&mut stream, "new/c", "EVENT_TYPE_CREATE").await;
}

#[tokio::test]
async fn watch_dir_refuses_missing_paths_and_files_and_sends_keepalives() {
    let envd = Envd::start();
    let stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": "/home/user/nope"}),
            &[],
        )
        .await;
    let (msgs, end) = stream.collect().await;
    assert!(msgs.is_empty());
    assert_eq!(end["error"]["code"], "not_found");
    write(&envd, "/home/user/file", "x");
    let (_, end) = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": "/home/user/file"}),
            &[],
        )
        .await
        .collect()
        .await;
    assert_eq!(end["error"]["code"], "invalid_argument");
    std::fs::set_permissions(envd.host("/root"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (_, end) = envd
        .stream(&format!("{FS}/WatchDir"), json!({"path": "/root"}), &[])
        .await
        .collect()
        .await;
    assert_eq!(end["error"]["code"], "permission_denied");

    let mut stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": "/home/user"}),
            &[("keepalive-ping-interval", "1")],
        )
        .await;
    assert!(matches!(stream.next().await.unwrap(), Frame::Message(m) if m.get("start").is_some()));
    let frame = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(frame, Frame::Message(ref m) if m == &json!({"keepalive": {}})),
        "{frame:?}"
    );
}

#[tokio::test]
async fn polled_watchers_buffer_events_until_drained() {
    let envd = Envd::start();
    std::fs::create_dir_all(envd.host("/home/user/p")).unwrap();
    let (status, body) = call(
        &envd,
        "CreateWatcher",
        json!({"path": "/home/user/p", "recursive": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["watcherId"].as_str().unwrap().to_owned();
    assert!(id.len() >= 16);

    std::fs::write(envd.host("/home/user/p/a"), "1").unwrap();
    std::fs::create_dir(envd.host("/home/user/p/sub")).unwrap();
    std::fs::write(envd.host("/home/user/p/sub/b"), "2").unwrap();
    std::fs::remove_file(envd.host("/home/user/p/a")).unwrap();

    let mut events = Vec::new();
    let wanted = [
        ("a", "EVENT_TYPE_CREATE"),
        ("a", "EVENT_TYPE_WRITE"),
        ("sub", "EVENT_TYPE_CREATE"),
        ("sub/b", "EVENT_TYPE_CREATE"),
        ("a", "EVENT_TYPE_REMOVE"),
    ];
    let has = |events: &Vec<Value>, (n, t): (&str, &str)| {
        events.iter().any(|e| e["name"] == n && e["type"] == t)
    };
    for _ in 0..100 {
        let (status, body) = call(&envd, "GetWatcherEvents", json!({"watcherId": id})).await;
        assert_eq!(status, 200, "{body}");
        events.extend(body["events"].as_array().cloned().unwrap_or_default());
        if wanted.iter().all(|w| has(&events, *w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in wanted {
        assert!(has(&events, w), "missing {w:?} in {events:?}");
    }
    // Drained: nothing new is pending.
    let (_, body) = call(&envd, "GetWatcherEvents", json!({"watcherId": id})).await;
    assert!(
        body["events"].as_array().is_none_or(|a| a.is_empty()),
        "{body}"
    );

    let (status, _) = call(&envd, "RemoveWatcher", json!({"watcherId": id})).await;
    assert_eq!(status, 200);
    let (status, body) = call(&envd, "GetWatcherEvents", json!({"watcherId": id})).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");
    let (status, _) = call(&envd, "RemoveWatcher", json!({"watcherId": id})).await;
    assert_eq!(status, 404);
    let (status, body) = call(
        &envd,
        "CreateWatcher",
        json!({"path": "/home/user/missing"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn polled_watcher_includes_entries_when_asked() {
    let envd = Envd::start();
    let (_, body) = call(
        &envd,
        "CreateWatcher",
        json!({"path": "/home/user", "includeEntry": true}),
    )
    .await;
    let id = body["watcherId"].as_str().unwrap().to_owned();
    std::fs::write(envd.host("/home/user/e.txt"), "abc").unwrap();
    for _ in 0..100 {
        let (_, body) = call(&envd, "GetWatcherEvents", json!({"watcherId": id})).await;
        if let Some(ev) = body["events"].as_array().and_then(|a| a.first()).cloned() {
            assert_eq!(ev["name"], "e.txt");
            assert_eq!(ev["type"], "EVENT_TYPE_CREATE");
            assert_eq!(ev["entry"]["path"], "/home/user/e.txt");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no event");
}
