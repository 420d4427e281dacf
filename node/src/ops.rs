//! Operator commands that talk to a running node over its REST API:
//! `sandmesh status` and `sandmesh node drain`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::cluster::admin::ClusterStatus;

/// How long an operator command waits for the node.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `host:port` of a node URL (`http://host:port` or `host:port`).
fn authority(url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.starts_with("https://") || url.starts_with("https://") {
        bail!("{url}: the node serves plain HTTP; use http://");
    }
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        bail!("{url} is not a node address: want http://HOST:PORT");
    }
    Ok(authority.to_owned())
}

/// One REST call; returns the status and body.
async fn call(url: &str, method: &str, path: &str, api_key: &str) -> Result<(u16, Vec<u8>)> {
    let authority = authority(url)?;
    let io = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(&authority))
        .await
        .with_context(|| format!("connecting to {authority}: timed out"))?
        .with_context(|| {
            format!("connecting to the node at {authority} (is it running? see --url)")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", &authority)
        .header("x-api-key", api_key)
        .body(Full::new(bytes::Bytes::new()))?;
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .context("the node did not answer in time")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

fn api_error(status: u16, body: &[u8]) -> anyhow::Error {
    let message = serde_json::from_slice::<schema::e2b::ApiError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    if status == 401 {
        anyhow::anyhow!(
            "the node refused the API key ({message}): pass --api-key or set E2B_API_KEY"
        )
    } else {
        anyhow::anyhow!("the node answered {status}: {message}")
    }
}

/// `GET /cluster`.
pub async fn cluster_status(url: &str, api_key: &str) -> Result<ClusterStatus> {
    let (status, body) = call(url, "GET", "/cluster?ping=true", api_key).await?;
    if status != 200 {
        return Err(api_error(status, &body));
    }
    serde_json::from_slice(&body)
        .context("the node's /cluster answer is not what this sandmesh expects")
}

/// `sandmesh status`: the table (or the JSON with `json`).
pub async fn status(url: &str, api_key: &str, json: bool) -> Result<String> {
    let s = cluster_status(url, api_key).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&s)?);
    }
    Ok(table(&s))
}

/// The human form of a cluster status.
pub fn table(s: &ClusterStatus) -> String {
    let mut rows = vec![[
        "NODE".to_owned(),
        "STATE".into(),
        "SANDBOXES".into(),
        "FREE MEMORY".into(),
        "CPUS".into(),
        "REST".into(),
        "PING".into(),
        "TEMPLATES".into(),
    ]];
    for n in &s.nodes {
        rows.push([
            if n.is_self {
                format!("{} *", n.node_id)
            } else {
                n.node_id.clone()
            },
            if n.verified || n.state == "dead" {
                n.state.clone()
            } else {
                format!("{} (unverified)", n.state)
            },
            format!("{}/{}", n.sandboxes, n.max_sandboxes),
            format!("{} MiB", n.free_memory_mib),
            n.free_vcpus.to_string(),
            n.rest_address.clone(),
            match (n.is_self, n.rtt_ms) {
                (true, _) => "-".into(),
                (false, Some(ms)) => format!("{ms:.1} ms"),
                (false, None) => "no answer".into(),
            },
            if n.templates.is_empty() {
                "-".into()
            } else {
                n.templates.join(",")
            },
        ]);
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let live = s.nodes.iter().filter(|n| n.state != "dead").count();
    let mut out = format!(
        "cluster {} — {} node(s), {live} live (* answered)\n",
        s.cluster_id.as_deref().unwrap_or("(no mesh)"),
        s.nodes.len()
    );
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for n in &s.nodes {
        if let Some(offset) = n.clock_offset_ms.filter(|o| o.abs() >= CLOCK_SKEW_WARN_MS) {
            out.push_str(&format!(
                "warning: {}'s clock is {:.1} s {} {}'s: sandbox times (startedAt, endAt) come from their owner's clock\n",
                n.node_id,
                offset.unsigned_abs() as f64 / 1000.0,
                if offset > 0 { "ahead of" } else { "behind" },
                s.node_id
            ));
        }
    }
    out
}

/// Clock offsets from this much on are pointed out by `sandmesh status`.
pub const CLOCK_SKEW_WARN_MS: i64 = 1000;

/// `sandmesh node drain` (or `--undo`): returns the node's new state.
pub async fn drain(url: &str, api_key: &str, undo: bool) -> Result<String> {
    let method = if undo { "DELETE" } else { "POST" };
    let (status, body) = call(url, method, "/node/drain", api_key).await?;
    if status != 200 {
        return Err(api_error(status, &body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(format!(
        "node {} is {}",
        v["nodeID"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::admin::NodeStatus;

    #[test]
    fn urls() {
        assert_eq!(
            authority("http://127.0.0.1:3000/").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(authority("127.0.0.1:3000").unwrap(), "127.0.0.1:3000");
        assert!(authority("https://x:1").is_err());
        assert!(authority("http://x:1/path").is_err());
    }

    #[test]
    fn table_lines_up() {
        let node = |id: &str, me: bool, state: &str| NodeStatus {
            node_id: id.into(),
            generation: 1,
            state: state.into(),
            is_self: me,
            rest_address: "127.0.0.1:3000".into(),
            quic_address: "127.0.0.1:7947".into(),
            gossip_address: "127.0.0.1:7946".into(),
            protocol_version: 2,
            free_vcpus: 2,
            free_memory_mib: 1024,
            sandboxes: 1,
            max_sandboxes: 64,
            templates: vec!["base".into()],
            verified: true,
            actors: true,
            rtt_ms: (!me).then_some(0.4),
            clock_offset_ms: (!me).then_some(-2500),
        };
        let t = table(&ClusterStatus {
            cluster_id: Some("sandmesh-x".into()),
            node_id: "a".into(),
            nodes: vec![node("a", true, "ready"), node("node-b", false, "dead")],
        });
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("2 node(s), 1 live"), "{t}");
        assert!(lines[1].starts_with("NODE    STATE"), "{t}");
        assert!(lines[2].starts_with("a *     ready"), "{t}");
        assert!(lines[3].starts_with("node-b  dead"), "{t}");
        assert!(lines[2].contains(" -  "), "{t}");
        assert!(lines[3].contains("0.4 ms"), "{t}");
        assert!(
            lines[4].starts_with("warning: node-b's clock is 2.5 s behind a's"),
            "{t}"
        );
    }
}
