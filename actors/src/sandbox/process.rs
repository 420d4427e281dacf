//! Commands the node runs in a sandbox itself (template builds): envd's
//! `process.Process/Start` over the runtime's stream, in the Connect
//! protocol's JSON streaming form, the same call the SDK's
//! `commands.run` makes.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BytesMut};
use http_body_util::{BodyExt, Full};

use super::http::send;
use crate::runtime::{ENVD_PORT, Runtime, SandboxId};

/// A command for [`run`].
#[derive(Debug, Clone)]
pub struct Command<'a> {
    /// A shell script, run by `/bin/bash -c`.
    pub script: &'a str,
    pub user: &'a str,
    /// The working directory; envd's default (the user's home) when `None`.
    pub cwd: Option<&'a str>,
    pub envs: &'a BTreeMap<String, String>,
    /// envd kills the process when this passes (`Connect-Timeout-Ms`);
    /// `None`: it may run for the sandbox's life.
    pub timeout: Option<Duration>,
}

/// Which stream a piece of output came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub exit_code: i32,
    /// envd's status text (`exit status 1`, `signal: killed`).
    pub status: String,
}

const FLAG_END_STREAM: u8 = 0x02;

fn envelope(json: &serde_json::Value) -> bytes::Bytes {
    let body = json.to_string();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body.as_bytes());
    out.into()
}

/// Run `cmd` in sandbox `id` (envd access token `token`) to its end,
/// handing its output to `on_output` as it comes. With `wait: false`,
/// returns `Ok(None)` as soon as envd has started it (the process keeps
/// running in the sandbox).
pub async fn run(
    runtime: &dyn Runtime,
    id: &SandboxId,
    token: &str,
    cmd: &Command<'_>,
    wait: bool,
    mut on_output: impl FnMut(Output, &[u8]),
) -> Result<Option<Ended>, String> {
    let mut process = serde_json::json!({
        "cmd": "/bin/bash",
        "args": ["-c", cmd.script],
        "envs": cmd.envs,
    });
    if let Some(cwd) = cmd.cwd {
        process["cwd"] = cwd.into();
    }
    let body = envelope(&serde_json::json!({ "process": process, "stdin": false }));
    let user = base64::engine::general_purpose::STANDARD.encode(format!("{}:", cmd.user));
    let stream = runtime
        .connect(id, ENVD_PORT)
        .await
        .map_err(|e| format!("connecting to envd: {e}"))?;
    let mut req = hyper::Request::post("/process.Process/Start")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/connect+json")
        .header("Connect-Protocol-Version", "1");
    if let Some(t) = cmd.timeout {
        // The Connect protocol allows at most 10 digits.
        let ms = t.as_millis().clamp(1, 9_999_999_999);
        req = req.header("Connect-Timeout-Ms", ms.to_string());
    }
    let req = req
        .header("X-Access-Token", token)
        .header(hyper::header::AUTHORIZATION, format!("Basic {user}"))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = send(stream, req).await.map_err(|e| format!("envd: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!(
            "envd refused the command ({status}): {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut buf = BytesMut::new();
    let mut ended = None;
    loop {
        // Whole envelopes first.
        while buf.len() >= 5 {
            let flags = buf[0];
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len);
            let json: serde_json::Value = serde_json::from_slice(&msg)
                .map_err(|e| format!("envd sent a message that is not JSON: {e}"))?;
            if flags & FLAG_END_STREAM != 0 {
                // An error after the end event (a deadline) changes
                // nothing: the command ended.
                return match (ended, json.get("error")) {
                    (Some(ended), _) => Ok(Some(ended)),
                    (None, Some(err)) => Err(format!(
                        "envd: {}",
                        err.get("message")
                            .and_then(|m| m.as_str())
                            .unwrap_or("error")
                    )),
                    (None, None) => {
                        Err("envd ended the stream before the command ended".to_owned())
                    }
                };
            }
            let event = &json["event"];
            if event.get("start").is_some() && !wait {
                return Ok(None);
            }
            if let Some(data) = event.get("data") {
                for (key, which) in [("stdout", Output::Stdout), ("stderr", Output::Stderr)] {
                    if let Some(s) = data.get(key).and_then(|v| v.as_str())
                        && let Ok(bytes) = b64.decode(s)
                    {
                        on_output(which, &bytes);
                    }
                }
            }
            if let Some(end) = event.get("end") {
                ended = Some(Ended {
                    // proto3 JSON leaves zero values out: no exitCode is 0.
                    exit_code: end["exitCode"].as_i64().unwrap_or(0) as i32,
                    status: end["status"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(format!("envd's stream broke: {e}")),
            None => {
                return ended
                    .map(Some)
                    .ok_or_else(|| "envd closed the stream before the command ended".to_owned());
            }
        }
    }
}

/// Write `bytes` to `path` in sandbox `id` as `user` (envd's `POST /files`).
pub async fn write_file(
    runtime: &dyn Runtime,
    id: &SandboxId,
    token: &str,
    path: &str,
    user: &str,
    bytes: bytes::Bytes,
) -> Result<(), String> {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("path", path)
        .append_pair("username", user)
        .finish();
    let path_and_query = format!("/files?{query}");
    super::envd::post(
        runtime,
        id,
        token,
        &path_and_query,
        "application/octet-stream",
        bytes,
    )
    .await
    .map_err(|e| format!("writing {path} through envd: {e}"))
}

/// Set envd's defaults (`POST /init`): environment variables every
/// process gets, the user and working directory of commands that name
/// none. A template build sets them last, so that its snapshot carries
/// them to every sandbox made from it.
pub async fn set_defaults(
    runtime: &dyn Runtime,
    id: &SandboxId,
    token: &str,
    env: &BTreeMap<String, String>,
    user: &str,
    workdir: &str,
) -> Result<(), String> {
    let body = serde_json::json!({
        "envVars": env,
        "defaultUser": user,
        "defaultWorkdir": workdir,
    });
    super::envd::post(
        runtime,
        id,
        token,
        "/init",
        "application/json",
        bytes::Bytes::from(body.to_string()),
    )
    .await
    .map_err(|e| format!("envd refused the defaults: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_connect_framed() {
        let e = envelope(&serde_json::json!({"a": 1}));
        assert_eq!(e[0], 0);
        assert_eq!(
            u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize,
            e.len() - 5
        );
        assert_eq!(&e[5..], br#"{"a":1}"#);
    }
}
