//! Mesh transport benchmark over loopback QUIC, for `cargo xtask bench`:
//! prints one JSON line per figure (`samples_ns` or `value`).
//!
//! - `mesh rpc ping round trip`: a Ping call on a warm connection.
//! - `mesh rpc 16 KiB REST echo`: a forwarded REST call, 16 KiB each way.
//! - `mesh connect + first call`: a fresh endpoint's handshake (mTLS) and
//!   first call.
//! - `mesh raw stream throughput`: one raw stream, 256 MiB one way, best
//!   and median of 3 (MB/s).
//!
//! Both ends run in this process on one tokio runtime, so the figures
//! include both sides' CPU: on two cores they are a floor for what two
//! hosts get.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh::transport::IncomingStream;
use mesh::{
    ClusterCa, Handler, NodeInfo, NodeState, Peer, Request, Response, Transport, TransportConfig,
};
use schema::mesh::{RestRequest, RestResponse, StreamHeader};
use tokio::io::AsyncWriteExt;

struct Bench {
    info: NodeInfo,
}

impl Handler for Bench {
    async fn request(&self, _peer: Peer, request: Request) -> Response {
        match request {
            Request::Ping { sent_unix_ms } => Response::Pong {
                info: self.info.clone(),
                unix_ms: sent_unix_ms,
            },
            Request::Rest(r) => Response::Rest(RestResponse {
                status: 200,
                headers: r.headers,
                body: r.body,
            }),
            Request::WhoSigned { .. } => Response::SignedBy { sandbox_id: None },
        }
    }

    async fn stream(&self, _peer: Peer, stream: IncomingStream) {
        let Ok((mut send, mut recv)) = stream.accept().await else {
            return;
        };
        let mut total = 0u64;
        while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
            total += chunk.bytes.len() as u64;
        }
        let _ = send.write_all(&total.to_be_bytes()).await;
        let _ = send.finish();
    }
}

fn bind(ca: &ClusterCa, id: &str) -> Transport {
    Transport::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &ca.issue(id).expect("issue"),
        &ca.trust_root(),
        TransportConfig::default(),
        Arc::new(Bench {
            info: NodeInfo {
                id: id.into(),
                generation: 1,
                quic_addr: "127.0.0.1:1".parse().expect("addr"),
                rest_addr: "127.0.0.1:2".parse().expect("addr"),
                state: NodeState::Ready,
                free_vcpus: 2,
                free_memory_mib: 4096,
                sandboxes: 0,
                max_sandboxes: 64,
                templates: vec!["base".into()],
            },
        }),
    )
    .expect("bind")
}

fn row(name: &str, samples: &[Duration]) {
    let ns: Vec<String> = samples.iter().map(|d| d.as_nanos().to_string()).collect();
    println!(
        "{{\"name\":\"{name}\",\"runtime\":\"mesh\",\"samples_ns\":[{}]}}",
        ns.join(",")
    );
}

async fn time_calls(a: &Transport, b: SocketAddr, request: &Request, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.call(b, "node-b", request).await.expect("call");
        samples.push(t.elapsed());
    }
    samples
}

async fn stream_mb_per_s(a: &Transport, b: SocketAddr, total: u64) -> f64 {
    let header = StreamHeader {
        sandbox_id: "bench".into(),
        port: 1,
    };
    let (mut send, mut recv) = a.open_stream(b, "node-b", &header).await.expect("open");
    let chunk = vec![0xa5u8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        send.write_all(&chunk).await.expect("write");
        sent += chunk.len() as u64;
    }
    send.shutdown().await.expect("finish");
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await.expect("count");
    assert_eq!(u64::from_be_bytes(count), sent);
    sent as f64 / 1e6 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ca = ClusterCa::generate().expect("ca");
    let a = bind(&ca, "node-a");
    let b = bind(&ca, "node-b");
    let b_addr = b.local_addr().expect("addr");

    let ping = Request::Ping { sent_unix_ms: 0 };
    time_calls(&a, b_addr, &ping, 200).await; // warm up
    row(
        "mesh rpc ping round trip",
        &time_calls(&a, b_addr, &ping, 2000).await,
    );

    let rest = Request::Rest(RestRequest {
        method: "POST".into(),
        path: "/sandboxes/x/timeout".into(),
        query: String::new(),
        headers: vec![],
        body: vec![1; 16 * 1024],
    });
    row(
        "mesh rpc 16 KiB REST echo",
        &time_calls(&a, b_addr, &rest, 1000).await,
    );

    let mut connects = Vec::new();
    for _ in 0..50 {
        let fresh = bind(&ca, "node-c");
        let t = Instant::now();
        fresh.call(b_addr, "node-b", &ping).await.expect("call");
        connects.push(t.elapsed());
        fresh.close().await;
    }
    row("mesh connect + first call", &connects);

    let mut rates = Vec::new();
    for _ in 0..3 {
        rates.push(stream_mb_per_s(&a, b_addr, 256 << 20).await);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "{{\"name\":\"mesh raw stream throughput (256 MiB, median of 3)\",\"runtime\":\"mesh\",\"value\":\"{:.0} MB/s (best {:.0})\"}}",
        rates[1], rates[2]
    );
    a.close().await;
    b.close().await;
}
