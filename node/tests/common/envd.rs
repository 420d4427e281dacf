#![allow(dead_code)]
//! A minimal envd client for tests that talk to a sandbox's envd over a
//! raw stream (a runtime's `connect`, or a VMM's vsock socket): Connect
//! `process.Process/Start` (JSON, server streaming) and `GET /health`.
//! Shared by the gvisor runtime tests (`actors/tests`) and the microvm
//! tests here, so both speak to envd the same way.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a process started through envd printed, and its exit code.
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i64,
}

/// Bytes up to and including `end`, read one at a time (what follows
/// belongs to the body); `Err` with what came before EOF, an error, or a
/// pause longer than `limit`.
async fn read_through(
    s: &mut (impl AsyncRead + Unpin),
    end: &[u8],
    limit: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(end) {
        match tokio::time::timeout(limit, s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(buf),
        }
        buf.push(b[0]);
    }
    Ok(buf)
}

/// Read an HTTP/1.1 response head (through the blank line).
pub async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> String {
    match read_through(s, b"\r\n\r\n", Duration::from_secs(10)).await {
        Ok(head) => String::from_utf8_lossy(&head).into_owned(),
        Err(part) => panic!(
            "no complete response head (closed, failed or silent for 10 s): {:?}",
            String::from_utf8_lossy(&part)
        ),
    }
}

/// One chunk of a chunked body; empty at the end (or at EOF).
pub async fn read_chunk(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let Ok(line) = read_through(s, b"\r\n", Duration::from_secs(30)).await else {
        return Vec::new();
    };
    let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).unwrap_or(0);
    let mut data = vec![0u8; size + 2];
    s.read_exact(&mut data).await.unwrap();
    data.truncate(size);
    data
}

/// `GET /health` on a fresh stream to envd; the response's status line,
/// empty when none came (a guest still booting: callers poll).
pub async fn health(mut s: impl AsyncRead + AsyncWrite + Unpin) -> String {
    let request = b"GET /health HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n";
    if s.write_all(request).await.is_err() {
        return String::new();
    }
    match read_through(&mut s, b"\r\n\r\n", Duration::from_secs(10)).await {
        Ok(head) => String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        Err(_) => String::new(),
    }
}

/// Send a `process.Process/Start` request for `cmd args` as `user`,
/// without reading the answer (for a command that ends the guest).
pub async fn send_start(s: &mut (impl AsyncWrite + Unpin), user: &str, cmd: &str, args: &[&str]) {
    let body = serde_json::json!({ "process": { "cmd": cmd, "args": args } }).to_string();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body.as_bytes());
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    let head = format!(
        "POST /process.Process/Start HTTP/1.1\r\nHost: sandbox\r\ncontent-type: application/connect+json\r\n\
         connect-protocol-version: 1\r\nauthorization: Basic {auth}\r\ncontent-length: {}\r\n\r\n",
        frame.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&frame).await.unwrap();
}

/// Run `cmd args` as `user` through `process.Process/Start` on the stream
/// `s` to envd, and collect its events until the stream ends.
pub async fn run(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    user: &str,
    cmd: &str,
    args: &[&str],
) -> Ran {
    send_start(&mut s, user, cmd, args).await;
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "Process/Start answered {:?} (an envd older than process.Process? rebuild the guest artifacts)",
        head.lines().next()
    );
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let mut body = Vec::new();
    let mut ran = Ran {
        stdout: String::new(),
        stderr: String::new(),
        exit_code: i64::MIN,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        // Decode every complete envelope of the de-chunked body so far.
        let mut done = false;
        while body.len() >= 5 {
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            if body.len() < 5 + len {
                break;
            }
            let flags = body[0];
            let msg: serde_json::Value =
                serde_json::from_slice(&body[5..5 + len]).unwrap_or_default();
            body.drain(..5 + len);
            if flags & 2 != 0 {
                assert!(msg.get("error").is_none(), "Process/Start failed: {msg}");
                done = true;
                break;
            }
            let event = &msg["event"];
            if let Some(out) = event["data"]["stdout"].as_str() {
                ran.stdout += &String::from_utf8_lossy(&b64.decode(out).unwrap_or_default());
            }
            if let Some(err) = event["data"]["stderr"].as_str() {
                ran.stderr += &String::from_utf8_lossy(&b64.decode(err).unwrap_or_default());
            }
            if event.get("end").is_some() {
                ran.exit_code = event["end"]["exitCode"].as_i64().unwrap_or(0);
            }
        }
        if done {
            break;
        }
        let chunk = if chunked {
            read_chunk(&mut s).await
        } else {
            let mut b = vec![0u8; 4096];
            let n = s.read(&mut b).await.unwrap_or(0);
            b.truncate(n);
            b
        };
        if chunk.is_empty() {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    ran
}
