//! The egress of a build sandbox: an HTTP proxy the node serves inside the
//! sandbox's own network (the runtime's [`host_listener`]), so that `RUN
//! apt-get install` and `pip install` reach package mirrors while the
//! sandbox itself still has no route anywhere.
//!
//! Build steps get `http_proxy`/`https_proxy` pointing here. `CONNECT
//! host:port` is tunnelled (TLS stays end to end), any other request in
//! absolute form (`GET http://host/path`: apt) is forwarded. A destination
//! that resolves to an address of the host or of a private network
//! (loopback, RFC 1918, link-local, CGNAT, unique-local, multicast,
//! unspecified) is refused with 403: a build must not reach the node's API,
//! a cloud metadata service or another machine of the operator's network.
//!
//! Connections into the sandbox end with a reset, never a FIN from this
//! side: gVisor (2022-12) cannot checkpoint a sandbox holding a TCP
//! connection in any state but closed, and the build checkpoints its
//! sandbox after every step.
//!
//! [`host_listener`]: crate::runtime::Runtime::host_listener

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the proxy may connect to `ip`: only globally routable unicast.
pub fn allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                // 0.0.0.0/8, 100.64.0.0/10 (CGNAT), 192.0.0.0/24, 240.0.0.0/4.
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return allowed(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local, fe80::/10 link-local.
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Resolve `host:port` and connect to the first allowed address.
async fn connect_out(host: &str, port: u16) -> Result<TcpStream, (StatusCode, String)> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("resolving {host}: {e}")))?
        .collect();
    let Some(addr) = addrs.iter().copied().find(|a| allowed(a.ip())) else {
        return Err((
            StatusCode::FORBIDDEN,
            format!("{host} is not a public address; builds reach only the internet"),
        ));
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("{host}:{port}: {e}"))),
        Err(_) => Err((
            StatusCode::GATEWAY_TIMEOUT,
            format!("{host}:{port}: no answer"),
        )),
    }
}

fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

async fn handle(req: Request<Incoming>, alive: Alive) -> Result<Response<ProxyBody>, hyper::Error> {
    if req.method() == Method::CONNECT {
        let Some(authority) = req.uri().authority().cloned() else {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "CONNECT needs host:port".into(),
            ));
        };
        let port = authority.port_u16().unwrap_or(443);
        let upstream = match connect_out(authority.host(), port).await {
            Ok(s) => s,
            Err((status, msg)) => return Ok(text(status, msg)),
        };
        tokio::spawn(async move {
            let Alive(_held, mut cut) = alive;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let mut client = TokioIo::new(upgraded);
                    let mut upstream = upstream;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                }
                Err(e) => tracing::debug!("build proxy: CONNECT upgrade failed: {e}"),
            }
        });
        return Ok(Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        ));
    }
    // A plain HTTP request in absolute form.
    let uri = req.uri().clone();
    let (Some(host), Some("http")) = (uri.host(), uri.scheme_str()) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "this proxy forwards http://host/... requests and CONNECT".into(),
        ));
    };
    let host = host.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let upstream = match connect_out(&host, port).await {
        Ok(s) => s,
        Err((status, msg)) => return Ok(text(status, msg)),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    parts.headers.remove("proxy-connection");
    parts.headers.remove("proxy-authorization");
    if !parts.headers.contains_key(hyper::header::HOST)
        && let Ok(v) = hyper::header::HeaderValue::from_str(&host)
    {
        parts.headers.insert(hyper::header::HOST, v);
    }
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    Ok(resp.map(|b| b.boxed()))
}

/// A connection into the sandbox whose shutdown sends nothing: hyper and
/// `copy_bidirectional` shut a stream down (a FIN) before they drop it, and
/// a guest that closed first would then sit in TIME_WAIT, which gVisor
/// neither saves nor leaves on a reset. Dropped, the stream resets (zero
/// linger).
struct NoFin(TcpStream);

impl tokio::io::AsyncRead for NoFin {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NoFin {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // Flush what is written, send no FIN.
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
}

/// Held by every task that holds a connection into the sandbox, with the
/// signal that cuts it.
#[derive(Clone)]
struct Alive(std::sync::Arc<()>, watch::Receiver<bool>);

/// Serve the proxy on `listener` until `stop` turns true; then reset every
/// connection still open and return once all are closed (the sandbox can
/// be checkpointed then).
pub async fn serve(listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let (cut_tx, cut_rx) = watch::channel(false);
    let alive = Alive(std::sync::Arc::new(()), cut_rx);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("build proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A reset on close, never a FIN (see the module documentation).
        let _ = stream.set_zero_linger();
        let stream = NoFin(stream);
        let alive = alive.clone();
        tokio::spawn(async move {
            let mut cut = alive.1.clone();
            let for_requests = alive.clone();
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| handle(req, for_requests.clone())),
                )
                .with_upgrades();
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!("build proxy connection: {e}");
                },
                _ = cut.wait_for(|c| *c) => {}
            }
            drop(alive);
        });
    }
    drop(listener);
    let _ = cut_tx.send(true);
    // Every connection task holds a clone; ours is the last.
    while std::sync::Arc::strong_count(&alive.0) > 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_allowed() {
        for ip in [
            "127.0.0.1",
            "10.0.2.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!allowed(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in ["203.0.113.80", "151.101.0.223", "2a04:4e42::223"] {
            assert!(allowed(ip.parse().unwrap()), "{ip} must be allowed");
        }
    }

    #[tokio::test]
    async fn the_proxy_refuses_the_host_itself() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(listener, stop));
        let mut s = TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!(
                "CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: x\r\n\r\n",
                addr.port()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0; 512];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        s.write_all(b"GET http://localhost:1/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        let _ = stop_tx.send(true);
    }
}
