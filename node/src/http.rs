//! HTTP pieces every part of the node's front uses — the REST API, the
//! sandbox-traffic proxy, the cluster front and admin routes: the JSON
//! error answer, answers that close the connection, and query strings.
//!
//! A leaf: it imports nothing of the node, so that the modules that share
//! these helpers do not import each other for them.

use axum::body::Body;
use axum::http::{Response, StatusCode, header};
use axum::response::IntoResponse;

/// A JSON error response (`{code, message}`, the shape the SDK parses).
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let body = schema::e2b::ApiError {
        code: status.as_u16(),
        message: message.into(),
    };
    (status, axum::Json(body)).into_response()
}

/// An answer given without reading the request's body (which may still
/// be streaming in): ask the client not to reuse the connection, which
/// the server closes after such an answer, so that its next request does
/// not race that close ("connection closed before message completed").
pub fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

/// Percent-decode once (`+` is a space, as in form encoding).
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k=v&...` pairs of a query string, each part decoded once.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2", false), "a%2");
        assert_eq!(percent_decode("%zz", false), "%zz");
        assert_eq!(percent_decode("a+b%20c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
    }
}

/// A request extension: the create may take over the slot that placement
/// reserved on this node under this token (`actors::service::
/// RESERVATION_TTL`). Set only on calls from the cluster front (an
/// extension, so no client can set it), from [`RESERVATION_HEADER`].
#[derive(Debug, Clone, Copy)]
pub struct Reservation(pub u64);

/// The mesh header that carries a [`Reservation`] from the node that
/// placed a create to the node that serves it; removed from clients'
/// requests.
pub const RESERVATION_HEADER: &str = "x-sandmesh-reservation";
