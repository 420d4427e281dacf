//! Test harness shared by envd's API tests: a real envd process serving a
//! scratch root directory, and a small Connect JSON client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bytes::{Buf, Bytes, BytesMut};
use serde_json::Value;

/// A running envd serving a scratch root (`/etc/passwd` with `root` and
/// `user` (uid 1000, home `/home/user` owned by 1000), `/tmp`).
pub struct Envd {
    child: Child,
    pub url: String,
    pub root: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envd {
    /// The envd built from this checkout.
    pub fn start() -> Self {
        Self::start_binary(Path::new(env!("CARGO_BIN_EXE_envd")))
    }

    /// Another envd binary (e.g. the one packaged into the guest rootfs).
    /// This checkout's envd with extra command-line arguments.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_binary_with(Path::new(env!("CARGO_BIN_EXE_envd")), args)
    }

    pub fn start_binary(binary: &Path) -> Self {
        Self::start_binary_with(binary, &[])
    }

    fn start_binary_with(binary: &Path, args: &[&str]) -> Self {
        let root = tempfile::Builder::new()
            .prefix("envd-root-")
            .tempdir()
            .unwrap();
        let r = root.path();
        for d in ["etc", "tmp", "home/user", "root"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
        chown(&r.join("home/user"), 1000, 1000);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();

        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--no-vsock", "--root"])
            .arg(r)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start envd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("envd listening on tcp ")
            .unwrap_or_else(|| panic!("unexpected readiness line {line:?}"))
            .to_owned();
        // reqwest refuses to build a client without a rustls provider (see
        // the workspace Cargo.toml); another test may have installed it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Envd {
            child,
            url: format!("http://{addr}"),
            root,
            http: reqwest::Client::new(),
        }
    }

    /// The envd process's id (to read its `/proc` status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Host path of a guest path.
    pub fn host(&self, guest: &str) -> PathBuf {
        self.root.path().join(guest.trim_start_matches('/'))
    }

    /// A unary Connect call with the JSON codec; returns (HTTP status, body JSON).
    pub async fn unary(&self, method: &str, req: Value) -> (u16, Value) {
        self.unary_with(method, req, &[]).await
    }

    pub async fn unary_with(
        &self,
        method: &str,
        req: Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}/{method}", self.url))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .body(req.to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        let json = serde_json::from_slice(&body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
        (status, json)
    }

    /// Open a server-streaming Connect call with the JSON codec.
    pub async fn stream(
        &self,
        method: &str,
        req: Value,
        headers: &[(&str, &str)],
    ) -> ConnectStream {
        let mut r = self
            .http
            .post(format!("{}/{method}", self.url))
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .body(envelope(0, req.to_string().as_bytes()));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "streams answer 200");
        ConnectStream {
            resp,
            buf: BytesMut::new(),
        }
    }
}

/// One frame of a Connect stream.
#[derive(Debug)]
pub enum Frame {
    Message(Value),
    /// The end-of-stream JSON (`{}` or `{"error": ...}`).
    End(Value),
}

pub struct ConnectStream {
    resp: reqwest::Response,
    buf: BytesMut,
}

impl ConnectStream {
    /// The next frame, or `None` at the end of the HTTP body.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len);
                    let v: Value = serde_json::from_slice(&payload).unwrap();
                    return Some(if flags & 2 != 0 {
                        Frame::End(v)
                    } else {
                        Frame::Message(v)
                    });
                }
            }
            match self.resp.chunk().await.unwrap() {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return None,
            }
        }
    }

    /// Every remaining message, and the end-of-stream JSON.
    pub async fn collect(mut self) -> (Vec<Value>, Value) {
        let mut msgs = Vec::new();
        while let Some(f) = self.next().await {
            match f {
                Frame::Message(v) => msgs.push(v),
                Frame::End(v) => return (msgs, v),
            }
        }
        panic!("stream ended without an end-of-stream message; got {msgs:?}");
    }
}

pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

/// `Authorization: Basic` for `user`, as the SDK sends it.
pub fn basic_user(user: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}
