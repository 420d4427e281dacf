//! A Connect protocol server (unary, server-streaming and client-streaming
//! RPCs; JSON and protobuf codecs) on axum.
//!
//! Why by hand: the E2B SDK speaks Connect with the JSON codec over
//! HTTP/1.1, and envd's messages are prost types (in `schema`) with pbjson's
//! canonical JSON. The protocol surface we need is small — envelope framing,
//! the error JSON, `Connect-Timeout-Ms` — and owning it keeps the types ours.

mod envelope;
mod error;

pub use envelope::{Decoder, Envelope, FLAG_END_STREAM, MAX_MESSAGE, encode};
pub use error::{Code, ConnectError};

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Messages the server can carry: prost (binary) and pbjson (JSON).
pub trait Message:
    prost::Message + Default + Serialize + DeserializeOwned + Send + 'static
{
}
impl<T: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static> Message for T {}

/// A boxed stream of RPC messages (or the error that ends it).
pub type MessageStream<T> = Pin<Box<dyn Stream<Item = Result<T, ConnectError>> + Send>>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Context, Codec, Body) -> BoxFuture<Response> + Send + Sync>;

/// The codec of a call, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    fn decode<T: Message>(self, bytes: &[u8]) -> Result<T, ConnectError> {
        match self {
            Codec::Json => serde_json::from_slice(if bytes.is_empty() { b"{}" } else { bytes })
                .map_err(|e| {
                    ConnectError::invalid_argument(format!("malformed JSON message: {e}"))
                }),
            Codec::Proto => T::decode(bytes).map_err(|e| {
                ConnectError::invalid_argument(format!("malformed protobuf message: {e}"))
            }),
        }
    }

    fn encode<T: Message>(self, msg: &T) -> Vec<u8> {
        match self {
            // Serializing generated types into a Vec cannot fail.
            Codec::Json => serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
            Codec::Proto => msg.encode_to_vec(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Proto => "proto",
        }
    }
}

/// What a handler knows about its call besides the message.
#[derive(Debug, Clone)]
pub struct Context {
    pub headers: HeaderMap,
    /// From `Connect-Timeout-Ms`: when the client stops waiting.
    pub deadline: Option<Instant>,
    /// From `Keepalive-Ping-Interval` (seconds): how often a quiet stream
    /// sends a keepalive message.
    pub keepalive: Option<Duration>,
}

impl Context {
    fn from_headers(headers: HeaderMap) -> Result<Self, ConnectError> {
        let deadline = match headers.get("connect-timeout-ms") {
            None => None,
            Some(v) => {
                let ms: u64 = v
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .filter(|ms| *ms > 0 && s_len_ok(v.as_bytes()))
                    .ok_or_else(|| {
                        ConnectError::invalid_argument("invalid Connect-Timeout-Ms header")
                    })?;
                Some(Instant::now() + Duration::from_millis(ms))
            }
        };
        let keepalive = headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        Ok(Self {
            headers,
            deadline,
            keepalive,
        })
    }

    /// The user named by `Authorization: Basic base64(user:)`, as the SDK sends it.
    pub fn basic_user(&self) -> Result<Option<String>, ConnectError> {
        let Some(value) = self.headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let bad = || ConnectError::new(Code::Unauthenticated, "malformed Authorization header");
        let value = value.to_str().map_err(|_| bad())?;
        let Some(encoded) = value.strip_prefix("Basic ") else {
            return Err(bad());
        };
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
        Ok((!user.is_empty()).then(|| user.to_owned()))
    }

    /// Time left before the deadline, if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// The Connect spec allows at most 10 digits.
fn s_len_ok(v: &[u8]) -> bool {
    v.len() <= 10
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

/// A set of RPC methods, served under `/<package.Service>/<Method>`.
#[derive(Default)]
pub struct Router {
    methods: HashMap<String, (Kind, Handler)>,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a unary method at `path` (`package.Service/Method`).
    pub fn unary<Req, Resp, F, Fut>(mut self, path: &str, f: F) -> Self
    where
        Req: Message,
        Resp: Message,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, ConnectError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |ctx, codec, body| {
            let f = f.clone();
            Box::pin(async move {
                let result = async {
                    let bytes = read_body(body, MAX_MESSAGE).await?;
                    let req: Req = codec.decode(&bytes)?;
                    with_deadline(ctx.deadline, f(ctx, req)).await
                }
                .await;
                match result {
                    Ok(resp) => (
                        [(
                            header::CONTENT_TYPE,
                            format!("application/{}", codec.name()),
                        )],
                        codec.encode(&resp),
                    )
                        .into_response(),
                    Err(e) => e.into_response(),
                }
            })
        });
        self.methods.insert(path.to_owned(), (Kind::Unary, handler));
        self
    }

    /// Add a server-streaming method: one request, a stream of responses.
    pub fn server_stream<Req, Resp, F, Fut>(mut self, path: &str, f: F) -> Self
    where
        Req: Message,
        Resp: Message,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<MessageStream<Resp>, ConnectError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |ctx, codec, body| {
            let f = f.clone();
            Box::pin(async move {
                let deadline = ctx.deadline;
                let opened = async {
                    let mut inbound = envelopes(body);
                    let first = inbound.next().await.ok_or_else(|| {
                        ConnectError::invalid_argument("stream request has no message")
                    })??;
                    let req: Req = codec.decode(&first.payload)?;
                    drain_after_first(inbound).await?;
                    with_deadline(deadline, f(ctx, req)).await
                }
                .await;
                stream_response(codec, deadline, opened)
            })
        });
        self.methods
            .insert(path.to_owned(), (Kind::ServerStream, handler));
        self
    }

    /// Add a client-streaming method: a stream of requests, one response.
    pub fn client_stream<Req, Resp, F, Fut>(mut self, path: &str, f: F) -> Self
    where
        Req: Message,
        Resp: Message,
        F: Fn(Context, MessageStream<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, ConnectError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |ctx, codec, body| {
            let f = f.clone();
            Box::pin(async move {
                let deadline = ctx.deadline;
                let requests: MessageStream<Req> = Box::pin(
                    envelopes(body)
                        .take_while(|e| {
                            let end = matches!(e, Ok(env) if env.flags & FLAG_END_STREAM != 0);
                            std::future::ready(!end)
                        })
                        .map(move |e| e.and_then(|env| codec.decode(&env.payload))),
                );
                let result = with_deadline(deadline, f(ctx, requests)).await;
                let single: Result<MessageStream<Resp>, ConnectError> = result.map(|resp| {
                    Box::pin(futures_util::stream::iter([Ok(resp)])) as MessageStream<Resp>
                });
                stream_response(codec, deadline, single)
            })
        });
        self.methods
            .insert(path.to_owned(), (Kind::ClientStream, handler));
        self
    }

    /// Merge another set of methods into this one.
    pub fn merge(mut self, other: Router) -> Self {
        self.methods.extend(other.methods);
        self
    }

    /// Serve a request whose path is `/<package.Service>/<Method>`.
    pub async fn call(&self, req: Request) -> Response {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let Some((kind, handler)) = self.methods.get(&path) else {
            return ConnectError::unimplemented(format!("unknown RPC method /{path}"))
                .into_response();
        };
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let streaming = *kind != Kind::Unary;
        let codec = match (streaming, content_type.as_str()) {
            (false, "application/json") => Codec::Json,
            (false, "application/proto") => Codec::Proto,
            (true, "application/connect+json") => Codec::Json,
            (true, "application/connect+proto") => Codec::Proto,
            _ => {
                let want = if streaming {
                    "application/connect+json or application/connect+proto"
                } else {
                    "application/json or application/proto"
                };
                return (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    [(header::CONTENT_TYPE, "application/json")],
                    ConnectError::invalid_argument(format!(
                        "unsupported content type {content_type:?} for /{path}: use {want}"
                    ))
                    .to_json()
                    .to_string(),
                )
                    .into_response();
            }
        };
        for h in ["content-encoding", "connect-content-encoding"] {
            if let Some(enc) = req.headers().get(h)
                && enc.as_bytes() != b"identity"
            {
                let err = ConnectError::unimplemented(format!(
                    "{h} {enc:?} is not supported; use identity"
                ));
                return err.into_response();
            }
        }
        let (parts, body) = req.into_parts();
        let ctx = match Context::from_headers(parts.headers) {
            Ok(ctx) => ctx,
            Err(e) => return e.into_response(),
        };
        handler(ctx, codec, body).await
    }
}

/// Read a whole (unary) body, refusing more than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ConnectError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("request body exceeds {limit} bytes"),
        )),
        Err(e) => Err(ConnectError::new(
            Code::Canceled,
            format!("reading request body: {e}"),
        )),
    }
}

/// After the one message of a server-streaming request: read the rest of
/// the body (its end, normally already here). A request body left unread
/// makes hyper close the connection after the response, and closing a
/// socket with unread bytes sends a TCP reset, which can destroy the end of
/// our own response before the client has read it (seen through the node's
/// proxy as "unexpected EOF during chunk size line"). A second message is
/// refused; a body that stays open is drained in the background.
async fn drain_after_first(
    mut inbound: Pin<Box<dyn Stream<Item = Result<Envelope, ConnectError>> + Send>>,
) -> Result<(), ConnectError> {
    match tokio::time::timeout(std::time::Duration::from_secs(1), inbound.next()).await {
        Ok(None) => Ok(()),
        Ok(Some(Ok(_))) => Err(ConnectError::invalid_argument(
            "a server-streaming request carries exactly one message",
        )),
        Ok(Some(Err(e))) => Err(e),
        Err(_) => {
            tokio::spawn(async move { while let Some(Ok(_)) = inbound.next().await {} });
            Ok(())
        }
    }
}

/// The envelopes of a streaming request body, as they arrive.
fn envelopes(body: Body) -> Pin<Box<dyn Stream<Item = Result<Envelope, ConnectError>> + Send>> {
    let frames = body.into_data_stream();
    Box::pin(futures_util::stream::unfold(
        (frames, Decoder::default(), false),
        |(mut frames, mut decoder, done)| async move {
            if done {
                return None;
            }
            loop {
                match decoder.next_envelope() {
                    Ok(Some(env)) => return Some((Ok(env), (frames, decoder, false))),
                    Ok(None) => {}
                    Err(e) => return Some((Err(e), (frames, decoder, true))),
                }
                match frames.next().await {
                    Some(Ok(chunk)) => decoder.push(&chunk),
                    Some(Err(e)) => {
                        let err =
                            ConnectError::new(Code::Canceled, format!("reading request: {e}"));
                        return Some((Err(err), (frames, decoder, true)));
                    }
                    None => {
                        return match decoder.finish() {
                            Ok(()) => None,
                            Err(e) => Some((Err(e), (frames, decoder, true))),
                        };
                    }
                }
            }
        },
    ))
}

async fn with_deadline<T>(
    deadline: Option<Instant>,
    fut: impl Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match deadline {
        None => fut.await,
        Some(d) => tokio::time::timeout_at(d.into(), fut)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::new(
                    Code::DeadlineExceeded,
                    "deadline exceeded",
                ))
            }),
    }
}

/// A streaming response: HTTP 200, one envelope per message, then the
/// end-of-stream message (`{}` or `{"error": ...}`).
fn stream_response<T: Message>(
    codec: Codec,
    deadline: Option<Instant>,
    opened: Result<MessageStream<T>, ConnectError>,
) -> Response {
    let body_stream = async_stream_body(codec, deadline, opened);
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            format!("application/connect+{}", codec.name()),
        )
        .body(Body::from_stream(body_stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn async_stream_body<T: Message>(
    codec: Codec,
    deadline: Option<Instant>,
    opened: Result<MessageStream<T>, ConnectError>,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    enum State<T> {
        Streaming(MessageStream<T>),
        End(Option<ConnectError>),
        Done,
    }
    let start = match opened {
        Ok(s) => State::Streaming(s),
        Err(e) => State::End(Some(e)),
    };
    let sleep = deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into())));
    futures_util::stream::unfold((start, sleep), move |(state, mut sleep)| async move {
        match state {
            State::Streaming(mut s) => {
                let next = match sleep.as_mut() {
                    Some(sl) => tokio::select! {
                        item = s.next() => item,
                        _ = sl => Some(Err(ConnectError::new(Code::DeadlineExceeded, "deadline exceeded"))),
                    },
                    None => s.next().await,
                };
                match next {
                    Some(Ok(msg)) => Some((
                        Ok(encode(0, &codec.encode(&msg))),
                        (State::Streaming(s), sleep),
                    )),
                    Some(Err(e)) => Some((Ok(end_stream(codec, Some(&e))), (State::Done, sleep))),
                    None => Some((Ok(end_stream(codec, None)), (State::Done, sleep))),
                }
            }
            State::End(err) => Some((Ok(end_stream(codec, err.as_ref())), (State::Done, sleep))),
            State::Done => None,
        }
    })
}

/// The end-of-stream message. Connect sends it as JSON whatever the codec.
fn end_stream(_codec: Codec, err: Option<&ConnectError>) -> Bytes {
    let json = match err {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.to_json() }),
    };
    encode(FLAG_END_STREAM, json.to_string().as_bytes())
}

/// Insert `keepalive()` into `stream` whenever it has been quiet for
/// `interval`; the timer restarts after every message.
pub fn with_keepalive<T: Send + 'static>(
    stream: MessageStream<T>,
    interval: Option<Duration>,
    keepalive: fn() -> T,
) -> MessageStream<T> {
    let Some(interval) = interval else {
        return stream;
    };
    Box::pin(futures_util::stream::unfold(
        stream,
        move |mut s| async move {
            match tokio::time::timeout(interval, s.next()).await {
                Ok(Some(item)) => Some((item, s)),
                Ok(None) => None,
                Err(_) => Some((Ok(keepalive()), s)),
            }
        },
    ))
}
