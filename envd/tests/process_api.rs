//! `process.Process` as the E2B SDK drives it, against a real envd process
//! serving a scratch root (these tests run as root, so envd can switch to
//! the `user` account, uid 1000).

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{ConnectStream, Envd, Frame, basic_user, envelope};
use serde_json::{Value, json};

/// Upper bound for anything a test waits for; reaching it is a failure.
const WAIT: Duration = Duration::from_secs(20);

fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

/// What a process stream delivered after its start event.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    pty: String,
    keepalives: usize,
    end: Option<Value>,
}

impl Output {
    /// Fold one message in; panics on anything but data/keepalive/end.
    fn add(&mut self, msg: &Value) {
        let event = &msg["event"];
        if let Some(data) = event.get("data") {
            for (key, out) in [
                ("stdout", &mut self.stdout),
                ("stderr", &mut self.stderr),
                ("pty", &mut self.pty),
            ] {
                if let Some(b) = data.get(key) {
                    out.push_str(&String::from_utf8_lossy(
                        &B64.decode(b.as_str().unwrap()).unwrap(),
                    ));
                }
            }
        } else if event.get("keepalive").is_some() {
            self.keepalives += 1;
        } else if let Some(end) = event.get("end") {
            assert!(self.end.is_none(), "a second end event: {msg}");
            self.end = Some(end.clone());
        } else {
            panic!("unexpected event {msg}");
        }
    }
}

async fn next_frame(s: &mut ConnectStream) -> Option<Frame> {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("stream stalled")
}

/// The first message, which must be `start{pid}`; returns the pid.
async fn expect_start(s: &mut ConnectStream) -> u32 {
    match next_frame(s).await {
        Some(Frame::Message(m)) => {
            let pid = m["event"]["start"]["pid"]
                .as_u64()
                .unwrap_or_else(|| panic!("first message is not start: {m}"));
            assert!(pid > 0);
            u32::try_from(pid).unwrap()
        }
        other => panic!("expected the start event, got {other:?}"),
    }
}

/// Read the rest of a stream: its events and the end-of-stream JSON.
async fn drain(s: &mut ConnectStream) -> (Output, Value) {
    let mut out = Output::default();
    loop {
        match next_frame(s).await {
            Some(Frame::Message(m)) => {
                assert!(out.end.is_none(), "message after the end event: {m}");
                out.add(&m);
            }
            Some(Frame::End(e)) => return (out, e),
            None => panic!("stream ended without end-of-stream; got {out:?}"),
        }
    }
}

/// Read until `done` holds for what has arrived.
async fn read_until(s: &mut ConnectStream, out: &mut Output, done: impl Fn(&Output) -> bool) {
    while !done(out) {
        match next_frame(s).await {
            Some(Frame::Message(m)) => out.add(&m),
            other => panic!("stream ended early ({other:?}); got {out:?}"),
        }
    }
}

/// `commands.run(cmd)` as the SDK sends it.
fn sdk_command(cmd: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}, "stdin": false})
}

/// Run a command to its end: (output, end-of-stream).
async fn run(envd: &Envd, req: Value, headers: &[(&str, &str)]) -> (u32, Output, Value) {
    let mut s = envd.stream("process.Process/Start", req, headers).await;
    let pid = expect_start(&mut s).await;
    let (out, eos) = drain(&mut s).await;
    (pid, out, eos)
}

async fn list_pids(envd: &Envd) -> Vec<u64> {
    let (status, body) = envd.unary("process.Process/List", json!({})).await;
    assert_eq!(status, 200, "{body}");
    body["processes"].as_array().map_or_else(Vec::new, |p| {
        p.iter().map(|p| p["pid"].as_u64().unwrap()).collect()
    })
}

/// Whether `pid` is gone from this host (not even a zombie).
fn reaped(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie reparented to some other reaper counts as dead too.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Let uid 1000 traverse the scratch root (a 0700 temp dir) down to its home.
fn open_root(envd: &Envd) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(envd.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn runs_a_command_like_the_sdk() {
    let envd = Envd::start();
    open_root(&envd);
    let (pid, out, eos) = run(&envd, sdk_command("echo hi; echo err >&2; exit 3"), &[]).await;
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(out.stderr, "err\n");
    let end = out.end.expect("end event");
    assert_eq!(end["exitCode"], 3);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 3");
    assert_eq!(end["error"], "exit status 3");
    assert_eq!(eos, json!({}));
    assert!(
        !list_pids(&envd).await.contains(&u64::from(pid)),
        "finished processes leave the table"
    );
    assert!(reaped(pid), "envd reaps its children");

    // Processes get default signal dispositions (envd itself ignores SIGPIPE).
    let (_, pipe, _) = run(
        &envd,
        sdk_command("yes | head -1 >/dev/null; echo ${PIPESTATUS[0]}"),
        &[],
    )
    .await;
    assert_eq!(pipe.stdout, "141\n", "yes dies of SIGPIPE");

    let (_, ok, _) = run(&envd, sdk_command("true"), &[]).await;
    let end = ok.end.unwrap();
    assert_eq!(
        end["exitCode"].as_i64().unwrap_or(0),
        0,
        "exit code 0 may be omitted: {end}"
    );
    assert!(end.get("error").is_none(), "no error on success: {end}");
}

#[tokio::test]
async fn runs_as_the_default_user_or_the_basic_auth_user() {
    let envd = Envd::start();
    open_root(&envd);
    std::fs::write(
        envd.host("/etc/group"),
        "root:x:0:\nuser:x:1000:\nextra:x:2000:user\n",
    )
    .unwrap();
    let (_, out, _) = run(
        &envd,
        sdk_command("id -u; id -G; echo $HOME $USER $LOGNAME"),
        &[],
    )
    .await;
    assert_eq!(out.stdout, "1000\n1000 2000\n/home/user user user\n");
    let root = basic_user("root");
    let (_, out, _) = run(
        &envd,
        sdk_command("id -u; echo $HOME $USER"),
        &[("authorization", &root)],
    )
    .await;
    assert_eq!(out.stdout, "0\n/root root\n");

    let nobody = basic_user("nobody");
    let mut s = envd
        .stream(
            "process.Process/Start",
            sdk_command("true"),
            &[("authorization", &nobody)],
        )
        .await;
    match next_frame(&mut s).await {
        Some(Frame::End(e)) => assert_eq!(e["error"]["code"], "invalid_argument", "{e}"),
        other => panic!("an unknown user cannot start processes: {other:?}"),
    }
}

#[tokio::test]
async fn envs_and_cwd_apply_and_a_missing_cwd_is_invalid() {
    let envd = Envd::start();
    open_root(&envd);
    let sub = envd.host("/home/user/sub");
    std::fs::create_dir(&sub).unwrap();
    common::chown(&sub, 1000, 1000);
    let mut req = sdk_command("echo $FOO; pwd");
    req["process"]["envs"] = json!({"FOO": "bar"});
    req["process"]["cwd"] = json!("sub");
    let (_, out, _) = run(&envd, req, &[]).await;
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("bar"));
    // envd serves a directory as `/` here: the process sees the host path.
    assert_eq!(
        lines.next().map(std::path::PathBuf::from),
        Some(sub.canonicalize().unwrap())
    );

    let (_, home, _) = run(&envd, sdk_command("pwd"), &[]).await;
    assert_eq!(
        home.stdout.trim(),
        envd.host("/home/user")
            .canonicalize()
            .unwrap()
            .to_str()
            .unwrap()
    );

    let mut missing = sdk_command("true");
    missing["process"]["cwd"] = json!("/no/such/dir");
    let mut s = envd.stream("process.Process/Start", missing, &[]).await;
    match next_frame(&mut s).await {
        Some(Frame::End(e)) => {
            assert_eq!(e["error"]["code"], "invalid_argument", "{e}");
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("/no/such/dir"),
                "{e}"
            );
        }
        other => panic!("a missing cwd fails the call: {other:?}"),
    }

    // The process enters its cwd as its user: a 0700 /root is closed to `user`.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(envd.host("/root"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut closed = sdk_command("true");
    closed["process"]["cwd"] = json!("/root");
    let mut s = envd.stream("process.Process/Start", closed, &[]).await;
    match next_frame(&mut s).await {
        Some(Frame::End(e)) => assert_eq!(e["error"]["code"], "permission_denied", "{e}"),
        other => panic!("a cwd the user may not enter fails the call: {other:?}"),
    }

    let mut s = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "/no/such/program"}}),
            &[],
        )
        .await;
    match next_frame(&mut s).await {
        Some(Frame::End(e)) => assert_eq!(e["error"]["code"], "invalid_argument", "{e}"),
        other => panic!("a missing executable fails the call: {other:?}"),
    }
}

#[tokio::test]
async fn large_output_arrives_whole_and_in_order() {
    let envd = Envd::start();
    open_root(&envd);
    let (_, out, _) = run(&envd, sdk_command("seq 1 200000; echo tail >&2"), &[]).await;
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected, "stdout differs from seq's output");
    assert_eq!(out.stderr, "tail\n");
}

#[tokio::test]
async fn init_env_vars_are_merged_under_the_call_envs() {
    let envd = Envd::start();
    open_root(&envd);
    let init = envd
        .http
        .post(format!("{}/init", envd.url))
        .json(&json!({"envVars": {"A": "init", "B": "init"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status().as_u16(), 204);
    let mut req = sdk_command("echo $A $B");
    req["process"]["envs"] = json!({"B": "call"});
    let (_, out, _) = run(&envd, req, &[]).await;
    assert_eq!(out.stdout, "init call\n");
}

#[tokio::test]
async fn background_process_survives_disconnect_and_can_be_reattached() {
    let envd = Envd::start();
    open_root(&envd);
    let mut req = sdk_command("echo started; sleep 30");
    req["tag"] = json!("bg");
    let mut s = envd.stream("process.Process/Start", req, &[]).await;
    let pid = expect_start(&mut s).await;
    let mut out = Output::default();
    read_until(&mut s, &mut out, |o| o.stdout == "started\n").await;
    drop(s); // the SDK's handle.disconnect()

    let (_, list) = envd.unary("process.Process/List", json!({})).await;
    let info = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("disconnecting does not kill the process: {list}"));
    assert_eq!(info["tag"], "bg");
    assert_eq!(info["config"]["cmd"], "/bin/bash");
    assert_eq!(info["config"]["args"][2], "echo started; sleep 30");
    assert!(!reaped(pid));

    let mut by_tag = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"tag": "bg"}}),
            &[],
        )
        .await;
    assert_eq!(expect_start(&mut by_tag).await, pid);
    let mut by_pid = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(expect_start(&mut by_pid).await, pid);

    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!((status, &body), (200, &json!({})));
    for s in [&mut by_tag, &mut by_pid] {
        let (out, eos) = drain(s).await;
        let end = out.end.expect("every attached client gets the end");
        assert_eq!(end["status"], "signal: killed");
        assert_eq!(end["exitCode"], -1);
        assert_eq!(eos, json!({}));
    }
    assert!(!list_pids(&envd).await.contains(&u64::from(pid)));
    eventually("the killed process to be reaped", || reaped(pid)).await;
}

#[tokio::test]
async fn signals_reach_the_whole_process_group() {
    let envd = Envd::start();
    open_root(&envd);
    let mut s = envd
        .stream(
            "process.Process/Start",
            sdk_command("sleep 300 & echo $!; wait"),
            &[],
        )
        .await;
    let pid = expect_start(&mut s).await;
    let mut out = Output::default();
    read_until(&mut s, &mut out, |o| o.stdout.ends_with('\n')).await;
    let grandchild: u32 = out.stdout.trim().parse().unwrap();
    assert!(!reaped(grandchild));
    let (status, _) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
        )
        .await;
    assert_eq!(status, 200);
    let (out, _) = drain(&mut s).await;
    assert_eq!(out.end.unwrap()["status"], "signal: terminated");
    eventually("the shell's background child to die with it", || {
        reaped(grandchild)
    })
    .await;
}

#[tokio::test]
async fn send_input_and_close_stdin() {
    let envd = Envd::start();
    open_root(&envd);
    let mut s = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "cat"}, "stdin": true}),
            &[],
        )
        .await;
    let pid = expect_start(&mut s).await;
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}}),
        )
        .await;
    assert_eq!((status, &body), (200, &json!({})));
    let mut out = Output::default();
    read_until(&mut s, &mut out, |o| o.stdout == "hello\n").await;

    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(b"x")}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("failed_precondition")),
        "{body}"
    );

    let (status, _) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(status, 200);
    let (rest, eos) = drain(&mut s).await;
    assert_eq!(
        rest.end.unwrap()["exited"],
        true,
        "EOF ends cat with exit 0"
    );
    assert_eq!(eos, json!({}));

    // A process started with stdin: false has no pipe to write to.
    let mut s = envd
        .stream("process.Process/Start", sdk_command("sleep 30"), &[])
        .await;
    let pid = expect_start(&mut s).await;
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "failed_precondition");
    assert!(
        body["message"].as_str().unwrap().contains("without stdin"),
        "{body}"
    );
    let (status, _) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(status, 200);
    let (out, _) = drain(&mut s).await;
    assert!(out.end.is_some());
}

#[tokio::test]
async fn stream_input_is_a_client_stream() {
    let envd = Envd::start();
    open_root(&envd);
    let mut s = envd
        .stream(
            "process.Process/Start",
            json!({"process": {"cmd": "cat"}, "stdin": true}),
            &[],
        )
        .await;
    let pid = expect_start(&mut s).await;

    // One chunk per envelope, as the SDK's chunked request body.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = [
        json!({"start": {"process": {"pid": pid}}}),
        json!({"data": {"input": {"stdin": b64(b"ab")}}}),
        json!({"keepalive": {}}),
        json!({"data": {"input": {"stdin": b64(b"c\n")}}}),
    ]
    .iter()
    .map(|m| Ok(envelope(0, m.to_string().as_bytes())))
    .collect();
    let resp = envd
        .http
        .post(format!("{}/process.Process/StreamInput", envd.url))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/connect+json");
    let body = resp.bytes().await.unwrap();
    let frames = split_envelopes(&body);
    assert_eq!(frames.len(), 2, "exactly one message, then end-of-stream");
    assert_eq!(
        (
            frames[0].0,
            serde_json::from_slice::<Value>(&frames[0].1).unwrap()
        ),
        (0, json!({}))
    );
    assert_eq!(
        (
            frames[1].0,
            serde_json::from_slice::<Value>(&frames[1].1).unwrap()
        ),
        (2, json!({}))
    );

    let mut out = Output::default();
    read_until(&mut s, &mut out, |o| o.stdout == "abc\n").await;
    envd.unary(
        "process.Process/CloseStdin",
        json!({"process": {"pid": pid}}),
    )
    .await;
    let (rest, _) = drain(&mut s).await;
    assert_eq!(rest.end.unwrap()["status"], "exit status 0");
}

#[tokio::test]
async fn pty_runs_an_interactive_shell_and_resizes() {
    let envd = Envd::start();
    open_root(&envd);
    // `pty.create()` as the SDK sends it.
    let req = json!({
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"],
                    "envs": {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}},
        "pty": {"size": {"cols": 80, "rows": 24}},
    });
    let mut s = envd.stream("process.Process/Start", req, &[]).await;
    let pid = expect_start(&mut s).await;
    let send = |data: &'static [u8]| {
        let envd = &envd;
        async move {
            let (status, body) = envd
                .unary(
                    "process.Process/SendInput",
                    json!({"process": {"pid": pid}, "input": {"pty": b64(data)}}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    let mut out = Output::default();
    send(b"stty size\n").await;
    read_until(&mut s, &mut out, |o| o.pty.contains("24 80")).await;
    // The typed line is echoed back, so look for what only the result has.
    send(b"echo $((6*7))-done\n").await;
    read_until(&mut s, &mut out, |o| o.pty.contains("42-done")).await;

    let (status, body) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
        )
        .await;
    assert_eq!((status, &body), (200, &json!({})));
    send(b"stty size\n").await;
    read_until(&mut s, &mut out, |o| o.pty.contains("30 100")).await;

    // PTY processes take pty input only and have no stdin to close.
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("failed_precondition"))
    );
    let (status, body) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("failed_precondition"))
    );

    send(b"exit\n").await;
    let (rest, eos) = drain(&mut s).await;
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "PTY output comes as pty data"
    );
    assert_eq!(rest.end.unwrap()["status"], "exit status 0");
    assert_eq!(eos, json!({}));
    assert!(reaped(pid));
}

#[tokio::test]
async fn update_needs_a_pty() {
    let envd = Envd::start();
    open_root(&envd);
    let mut s = envd
        .stream("process.Process/Start", sdk_command("sleep 30"), &[])
        .await;
    let pid = expect_start(&mut s).await;
    let (status, body) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 10, "rows": 10}}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("failed_precondition"))
    );
    envd.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    drain(&mut s).await;
}

#[tokio::test]
async fn unknown_processes_are_not_found() {
    let envd = Envd::start();
    let missing = json!({"pid": 4_000_000_000u32});
    for (method, req) in [
        (
            "SendSignal",
            json!({"process": missing, "signal": "SIGNAL_SIGKILL"}),
        ),
        (
            "SendInput",
            json!({"process": missing, "input": {"stdin": b64(b"x")}}),
        ),
        ("CloseStdin", json!({"process": missing})),
        (
            "Update",
            json!({"process": missing, "pty": {"size": {"cols": 1, "rows": 1}}}),
        ),
        (
            "SendSignal",
            json!({"process": {"tag": "nope"}, "signal": "SIGNAL_SIGTERM"}),
        ),
    ] {
        let (status, body) = envd.unary(&format!("process.Process/{method}"), req).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("not_found")),
            "{method}: {body}"
        );
    }
    let mut s = envd
        .stream("process.Process/Connect", json!({"process": missing}), &[])
        .await;
    match next_frame(&mut s).await {
        Some(Frame::End(e)) => assert_eq!(e["error"]["code"], "not_found"),
        other => panic!("Connect to an unknown pid: {other:?}"),
    }

    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": missing, "signal": "SIGNAL_UNSPECIFIED"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "no selector"
    );
}

#[tokio::test]
async fn connect_timeout_kills_the_process() {
    let envd = Envd::start();
    open_root(&envd);
    let mut s = envd
        .stream(
            "process.Process/Start",
            sdk_command("sleep 30"),
            &[("connect-timeout-ms", "1500")],
        )
        .await;
    let pid = expect_start(&mut s).await;
    let (out, eos) = drain(&mut s).await;
    match out.end {
        Some(end) => assert_eq!(end["status"], "signal: killed"),
        None => assert_eq!(eos["error"]["code"], "deadline_exceeded", "{eos}"),
    }
    eventually("the timed-out process to be killed", || reaped(pid)).await;
    let until = tokio::time::Instant::now() + WAIT;
    while list_pids(&envd).await.contains(&u64::from(pid)) {
        assert!(
            tokio::time::Instant::now() < until,
            "killed process stays listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn quiet_streams_get_keepalives() {
    let envd = Envd::start();
    open_root(&envd);
    let (_, out, _) = run(
        &envd,
        sdk_command("sleep 2.5; echo done"),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    assert!(out.keepalives >= 1, "{out:?}");
    assert_eq!(out.stdout, "done\n");
    assert!(out.end.is_some());
}

#[tokio::test]
async fn proto_codec_works_for_unary_and_streams() {
    use prost::Message;
    use schema::envd::process::{
        ListRequest, ListResponse, ProcessConfig, StartRequest, StartResponse, process_event,
    };
    let envd = Envd::start();
    open_root(&envd);

    let start = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/echo".into(),
            args: vec!["proto".into()],
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let resp = envd
        .http
        .post(format!("{}/process.Process/Start", envd.url))
        .header("content-type", "application/connect+proto")
        .header("connect-protocol-version", "1")
        .body(envelope(0, &start.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/connect+proto");
    let body = resp.bytes().await.unwrap();
    let frames = split_envelopes(&body);
    let (last_flags, last) = frames.last().unwrap();
    assert_eq!(
        (*last_flags, serde_json::from_slice::<Value>(last).unwrap()),
        (2, json!({}))
    );
    let events: Vec<process_event::Event> = frames[..frames.len() - 1]
        .iter()
        .map(|(flags, payload)| {
            assert_eq!(*flags, 0);
            StartResponse::decode(payload.as_slice())
                .unwrap()
                .event
                .unwrap()
                .event
                .unwrap()
        })
        .collect();
    assert!(matches!(events.first(), Some(process_event::Event::Start(s)) if s.pid > 0));
    let stdout: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            process_event::Event::Data(d) => match &d.output {
                Some(process_event::data_event::Output::Stdout(b)) => Some(b.to_vec()),
                _ => None,
            },
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(stdout, b"proto\n");
    assert!(
        matches!(events.last(), Some(process_event::Event::End(e)) if e.exited && e.exit_code == 0)
    );

    let mut bg = sdk_command("sleep 30");
    bg["tag"] = json!("proto-bg");
    let mut s = envd.stream("process.Process/Start", bg, &[]).await;
    let pid = expect_start(&mut s).await;
    let resp = envd
        .http
        .post(format!("{}/process.Process/List", envd.url))
        .header("content-type", "application/proto")
        .body(ListRequest {}.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/proto");
    let list = ListResponse::decode(resp.bytes().await.unwrap()).unwrap();
    let info = list
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .expect("listed");
    assert_eq!(info.tag.as_deref(), Some("proto-bg"));
    envd.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    drain(&mut s).await;
}

/// Split a whole Connect stream body into (flags, payload) envelopes.
fn split_envelopes(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated envelope");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    out
}
