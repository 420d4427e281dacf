//! HTTP/1.1 over a stream into a sandbox (`runtime.connect(id, port)`):
//! how the actors call envd (`/init`, `/metrics`) and how the node's proxy
//! forwards sandbox traffic, one request per stream.

use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::runtime::BoxStream;

/// Send one HTTP/1.1 request over `stream` and return the response head;
/// the body streams from the connection, which closes when it is done.
pub async fn send<B>(
    stream: BoxStream,
    req: Request<B>,
) -> Result<Response<hyper::body::Incoming>, hyper::Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    send_until(stream, req, None).await
}

/// [`send`], with the connection reset as soon as `cut` turns `true` (the
/// sandbox is being paused or killed), whatever is still streaming.
pub async fn send_until<B>(
    stream: BoxStream,
    req: Request<B>,
    cut: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<Response<hyper::body::Incoming>, hyper::Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let cut = async move {
            match cut {
                Some(mut cut) => {
                    // An error: the sender is gone (the sandbox is).
                    let _ = cut.wait_for(|c| *c).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!("sandbox connection ended: {e}");
            },
            // Dropping `conn` drops the stream: a reset.
            () = cut => tracing::debug!("sandbox connection cut (pause or kill)"),
        }
    });
    // Dropping `sender` after this lets the connection close once the
    // response body is read.
    sender.send_request(req).await
}
