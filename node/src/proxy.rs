//! Sandbox traffic: HTTP requests for a port inside a sandbox, told apart
//! from REST calls by the `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers
//! (what the SDK sends with `E2B_SANDBOX_URL`) or by a Host
//! `<port>-<sandboxID>.<domain>`. Each request is forwarded over a fresh
//! stream from `runtime.connect(id, port)`, bodies streamed both ways.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Request, Response, StatusCode, header};

use actors::runtime::{BoxStream, SandboxId};
use actors::sandbox::http::send_until;
use schema::envd::ENVD_PORT;

use crate::http::{closing, error_response};
use actors::sandbox::SandboxError;
use actors::service::Sandboxes;

pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// Where a request for sandbox traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
}

/// `Ok(None)`: a REST call. `Err`: sandbox traffic with a bad port.
pub fn target(headers: &HeaderMap, domain: Option<&str>) -> Result<Option<Target>, String> {
    if let Some(id) = headers.get(SANDBOX_ID_HEADER) {
        let id = id.to_str().map_err(|_| "bad E2b-Sandbox-Id header")?;
        let port = headers
            .get(SANDBOX_PORT_HEADER)
            .ok_or("E2b-Sandbox-Id without E2b-Sandbox-Port")?
            .to_str()
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or("E2b-Sandbox-Port is not a port number")?;
        return Ok(Some(Target {
            sandbox_id: id.to_owned(),
            port,
        }));
    }
    let (Some(domain), Some(host)) = (domain, headers.get(header::HOST)) else {
        return Ok(None);
    };
    let host = host.to_str().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let Some(label) = host.strip_suffix(domain).and_then(|h| h.strip_suffix('.')) else {
        return Ok(None);
    };
    let Some((port, id)) = label.split_once('-') else {
        return Ok(None);
    };
    match port.parse::<u16>() {
        Ok(port) if !id.is_empty() && !id.contains('.') => Ok(Some(Target {
            sandbox_id: id.to_owned(),
            port,
        })),
        _ => Ok(None),
    }
}

/// A signed `/files` URL (`download_url()`/`upload_url()`): no sandbox
/// headers, the sandbox is the one whose envd access token makes the
/// signature valid. `None`: not a signed file URL. `Some(None)`: signed,
/// but no token matches. `tokens` is `(sandbox id, token)`.
pub fn signed_file_target<'a>(
    method: &axum::http::Method,
    path: &str,
    query: Option<&str>,
    tokens: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<Option<Target>> {
    if path != "/files" {
        return None;
    }
    let pairs = crate::http::query_pairs(query?);
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let signature = get("signature")?;
    let op = if method == axum::http::Method::GET {
        "read"
    } else {
        "write"
    };
    let file = get("path").unwrap_or("");
    let user = get("username").unwrap_or("");
    let exp = get("signature_expiration");
    let found = tokens
        .into_iter()
        .find(|(_, token)| schema::envd::file_signature(file, op, user, token, exp) == signature)
        .map(|(id, _)| Target {
            sandbox_id: id.to_owned(),
            port: ENVD_PORT,
        });
    Some(found)
}

/// [`signed_file_target`] over this node's sandboxes.
pub fn local_signed_target(
    sandboxes: &Sandboxes,
    method: &axum::http::Method,
    path: &str,
    query: Option<&str>,
) -> Option<Option<Target>> {
    let records = sandboxes.list();
    let tokens = records
        .iter()
        .map(|r| (r.id.as_str(), r.envd_access_token.as_str()));
    signed_file_target(method, path, query, tokens)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those named by `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(n);
    }
}

/// Why sandbox traffic cannot reach its port: the message of the 502 the
/// client gets (the SDK maps a 502 whose message says "was not found" to
/// SandboxNotRunningException) and the metric outcome.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub message: String,
    pub outcome: &'static str,
    /// Whether the sandbox is unknown here (as opposed to paused, or its
    /// port closed).
    pub not_found: bool,
}

fn not_found(sandboxes: &Sandboxes, id: &str) -> Refusal {
    let why = match sandboxes.not_found(id) {
        SandboxError::Lost(_, reason) => format!(" (it was lost: {reason})"),
        _ => String::new(),
    };
    Refusal {
        message: format!("The sandbox {id} was not found{why}"),
        outcome: "not_found",
        not_found: true,
    }
}

/// A fresh stream to port `port` of sandbox `id` on this node, and the
/// watch that turns `true` when the sandbox is paused or killed (the
/// stream must then be cut).
pub async fn open_local(
    sandboxes: &Sandboxes,
    id: &str,
    port: u16,
) -> Result<(BoxStream, tokio::sync::watch::Receiver<bool>), Refusal> {
    let paused = |id: &str| Refusal {
        message: format!("The sandbox {id} is paused: resume it with Sandbox.connect() first"),
        outcome: "paused",
        not_found: false,
    };
    let cut = match sandboxes.route(id) {
        Ok((_, cut)) => cut,
        // Created with autoResume: the request itself wakes it (E2B's
        // auto-resume), and goes through once it runs.
        Err(SandboxError::Paused(_)) => match sandboxes.wake(id).await {
            Ok(false) => return Err(paused(id)),
            Ok(true) => match sandboxes.route(id) {
                Ok((_, cut)) => cut,
                Err(SandboxError::Paused(_)) => return Err(paused(id)),
                Err(_) => return Err(not_found(sandboxes, id)),
            },
            Err(SandboxError::NotFound(_) | SandboxError::Lost(..)) => {
                return Err(not_found(sandboxes, id));
            }
            Err(e) => {
                return Err(Refusal {
                    message: format!("The sandbox {id} is paused and resuming it failed: {e}"),
                    outcome: "resume_failed",
                    not_found: false,
                });
            }
        },
        Err(_) => return Err(not_found(sandboxes, id)),
    };
    let Ok(sid) = SandboxId::new(id.to_owned()) else {
        return Err(not_found(sandboxes, id));
    };
    match sandboxes.runtime().connect(&sid, port).await {
        Ok(stream) => Ok((stream, cut)),
        Err(e) => {
            tracing::debug!(sandbox = %sid, port, "connect failed: {e}");
            // Gone between the lookup and the connect?
            if sandboxes.get(id).is_none() {
                return Err(not_found(sandboxes, id));
            }
            Err(Refusal {
                message: format!("The sandbox {id} is running but port {port} is not open: {e}"),
                outcome: "unreachable",
                not_found: false,
            })
        }
    }
}

/// `body`, counting its bytes into the proxy metric as they stream.
fn counted<B>(
    body: B,
    direction: &'static str,
) -> impl hyper::body::Body<Data = bytes::Bytes, Error = B::Error> + Send + 'static
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
{
    use http_body_util::BodyExt;
    let counter = metrics::counter!(crate::metrics::PROXY_BYTES, "direction" => direction);
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.increment(data.len() as u64);
        }
        frame
    })
}

/// Forward `req` to `target`.
pub async fn forward(sandboxes: &Sandboxes, target: Target, req: Request<Body>) -> Response<Body> {
    match open_local(sandboxes, &target.sandbox_id, target.port).await {
        Ok((stream, cut)) => relay(stream, Some(cut), target, req).await,
        Err(r) => {
            metrics::counter!(crate::metrics::PROXY_REQUESTS, "outcome" => r.outcome).increment(1);
            closing(error_response(StatusCode::BAD_GATEWAY, r.message))
        }
    }
}

/// Send `req` for `target` over `stream` (to the sandbox port, or to the
/// owner node that pipes it there) and relay the answer, bodies streamed
/// both ways.
pub async fn relay(
    stream: BoxStream,
    cut: Option<tokio::sync::watch::Receiver<bool>>,
    target: Target,
    mut req: Request<Body>,
) -> Response<Body> {
    let id = &target.sandbox_id;
    strip_hop_by_hop(req.headers_mut());
    // Only path and query go upstream (origin form).
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = pq.parse().unwrap_or_else(|_| "/".parse().unwrap());
    *req.version_mut() = axum::http::Version::HTTP_11;
    let req = req.map(|b| Body::new(counted(b, "to_sandbox")));
    match send_until(stream, req, cut).await {
        Ok(resp) => {
            metrics::counter!(crate::metrics::PROXY_REQUESTS, "outcome" => "forwarded")
                .increment(1);
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            closing_if_502(Response::from_parts(
                parts,
                Body::new(counted(body, "from_sandbox")),
            ))
        }
        Err(e) => closing(error_response(
            StatusCode::BAD_GATEWAY,
            format!(
                "The sandbox {id} did not answer on port {}: {e}",
                target.port
            ),
        )),
    }
}

fn closing_if_502(resp: Response<Body>) -> Response<Body> {
    if resp.status() == StatusCode::BAD_GATEWAY {
        closing(resp)
    } else {
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn routing() {
        let t = target(
            &h(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49983")]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            t,
            Target {
                sandbox_id: "abc".into(),
                port: 49983
            }
        );
        assert!(target(&h(&[("E2b-Sandbox-Id", "abc")]), None).is_err());
        assert!(
            target(
                &h(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "x")]),
                None
            )
            .is_err()
        );
        assert_eq!(
            target(&h(&[("host", "127.0.0.1:3000")]), None).unwrap(),
            None
        );
        let dom = Some("sandmesh.test");
        assert_eq!(
            target(&h(&[("host", "49983-abc.sandmesh.test:3000")]), dom).unwrap(),
            Some(Target {
                sandbox_id: "abc".into(),
                port: 49983
            })
        );
        assert_eq!(
            target(&h(&[("host", "api.sandmesh.test")]), dom).unwrap(),
            None
        );
        assert_eq!(
            target(&h(&[("host", "49983-abc.other.test")]), dom).unwrap(),
            None
        );
    }

    #[test]
    fn signed_urls_find_their_sandbox() {
        use axum::http::Method;
        let tokens = [("one", "tok-one"), ("two", "tok-abc")];
        let two = Some(Some(Target {
            sandbox_id: "two".into(),
            port: ENVD_PORT,
        }));
        // As the SDK encodes it (`quote`: `/` stays, `+` is %2B).
        let read =
            "path=%2Fhome%2Fuser%2Fa.txt&signature=v1_shr9/90N2wWSS66f1qgDcvlx1JHMJsE3NbhNt/Eyd6c";
        assert_eq!(
            signed_file_target(&Method::GET, "/files", Some(read), tokens),
            two
        );
        // The same signature does not allow a write.
        assert_eq!(
            signed_file_target(&Method::POST, "/files", Some(read), tokens),
            Some(None)
        );
        let write = "path=/home/user/a.txt&signature=v1_oANDgUnEKQTTHW3LjZXnOBgMhzBg8GO6vbMmJmnB%2BXk&signature_expiration=1795420838";
        assert_eq!(
            signed_file_target(&Method::POST, "/files", Some(write), tokens),
            two
        );
        // A wrong expiration or username breaks it.
        let bad = write.replace("1795420838", "1795420839");
        assert_eq!(
            signed_file_target(&Method::POST, "/files", Some(&bad), tokens),
            Some(None)
        );
        let user = format!("{read}&username=root");
        assert_eq!(
            signed_file_target(&Method::GET, "/files", Some(&user), tokens),
            Some(None)
        );
        let sig = schema::envd::file_signature("/a b", "read", "root", "tok-one", None);
        let q = format!(
            "path=%2Fa%20b&username=root&signature={}",
            sig.replace('+', "%2B")
        );
        assert_eq!(
            signed_file_target(&Method::GET, "/files", Some(&q), tokens),
            Some(Some(Target {
                sandbox_id: "one".into(),
                port: ENVD_PORT
            }))
        );
        // Not signed file URLs: REST as before.
        assert_eq!(
            signed_file_target(&Method::GET, "/files", Some("path=/x"), tokens),
            None
        );
        assert_eq!(
            signed_file_target(&Method::GET, "/files", None, tokens),
            None
        );
        assert_eq!(
            signed_file_target(&Method::GET, "/sandboxes", Some(read), tokens),
            None
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut m = h(&[
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("x-access-token", "t"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m.contains_key("x-access-token") && m.contains_key("content-type"));
    }
}
