//! One port serving both the E2B REST API (authenticated with `X-API-KEY`)
//! and sandbox traffic (routed by header or Host, see [`crate::proxy`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;

use actors::runtime::select::{RuntimeChoice, select};
use actors::service::{Config, Sandboxes};
use actors::store::Store;
use actors::template_cache::TemplateSpec;

use crate::api::router;
use crate::cluster::{Cluster, MeshOptions};
use crate::http::{closing, error_response};
use crate::proxy;

#[derive(Clone)]
struct Front {
    sandboxes: Sandboxes,
    cluster: Cluster,
    store: Store,
    domain: Option<Arc<str>>,
}

/// The whole HTTP app of a node.
pub fn app(cluster: Cluster) -> Router {
    let sandboxes = cluster.sandboxes().clone();
    let front = Front {
        store: sandboxes.store().clone(),
        domain: sandboxes.config().domain.as_deref().map(Arc::from),
        sandboxes: sandboxes.clone(),
        cluster: cluster.clone(),
    };
    // `layer` wraps every route and the fallback, so every request passes
    // through `front` first.
    router(sandboxes)
        .merge(crate::cluster::admin::routes(cluster))
        .layer(middleware::from_fn_with_state(front, front_door))
}

async fn front_door(State(f): State<Front>, req: Request, next: Next) -> Response {
    match proxy::target(req.headers(), f.domain.as_deref()) {
        Err(msg) => error_response(StatusCode::BAD_REQUEST, msg),
        Ok(Some(target)) => crate::cluster::front::traffic(&f.cluster, target, req).await,
        Ok(None) if req.uri().path() == "/files" && req.uri().query().is_some() => {
            match proxy::local_signed_target(
                &f.sandboxes,
                req.method(),
                req.uri().path(),
                req.uri().query(),
            ) {
                Some(Some(target)) => proxy::forward(&f.sandboxes, target, req).await,
                Some(None) => {
                    let query = req.uri().query().unwrap_or("").to_owned();
                    match crate::cluster::front::find_signed(&f.cluster, req.method(), &query).await
                    {
                        Some(target) => {
                            crate::cluster::front::traffic(&f.cluster, target, req).await
                        }
                        None => closing(error_response(
                            StatusCode::UNAUTHORIZED,
                            "the signature matches no running sandbox",
                        )),
                    }
                }
                None => rest(&f, req, next).await,
            }
        }
        Ok(None) if req.uri().path() == "/metrics" && req.method() == axum::http::Method::GET => {
            members_gauge(&f.cluster).await;
            metrics_page(&f.sandboxes)
        }
        // The API's description is public, as the API's own docs are.
        Ok(None) if req.uri().path() == "/openapi.json" => next.run(req).await,
        Ok(None) => rest(&f, req, next).await,
    }
}

/// A REST call: check `X-API-KEY`, then serve it here or on the node
/// whose call it is.
async fn rest(f: &Front, req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if key.is_empty() {
        return error_response(StatusCode::UNAUTHORIZED, "missing X-API-KEY header");
    }
    match f.store.verify_api_key(key) {
        Ok(true) => crate::cluster::front::route(&f.cluster, req, next).await,
        Ok(false) => error_response(StatusCode::UNAUTHORIZED, "invalid API key"),
        Err(e) => {
            tracing::error!("checking an API key: {e}");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// Set the cluster members gauge (by state) for a scrape.
async fn members_gauge(cluster: &Cluster) {
    let mut counts = std::collections::BTreeMap::from([
        ("ready", 0u32),
        ("draining", 0),
        ("unhealthy", 0),
        ("dead", 0),
    ]);
    for m in cluster.members().await {
        let state = if m.live {
            m.info.state.as_str()
        } else {
            "dead"
        };
        *counts.entry(state).or_insert(0) += 1;
    }
    for (state, n) in counts {
        metrics::gauge!(crate::metrics::MESH_MEMBERS, "state" => state).set(f64::from(n));
    }
}

/// `GET /metrics`: Prometheus text.
fn metrics_page(sandboxes: &Sandboxes) -> Response {
    use axum::response::IntoResponse;
    let Some(handle) = crate::metrics::handle() else {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "another metrics recorder is installed in this process",
        );
    };
    let (running, creating, paused) = sandboxes.counts();
    metrics::gauge!(crate::metrics::SANDBOXES, "state" => "paused").set(paused as f64);
    metrics::gauge!(crate::metrics::SANDBOXES, "state" => "running").set(running as f64);
    metrics::gauge!(crate::metrics::SANDBOXES, "state" => "creating").set(creating as f64);
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub runtime: RuntimeChoice,
    /// The templates this node serves (`base` among them, normally the
    /// guest artifacts' root tree).
    pub templates: Vec<TemplateSpec>,
    /// The microvm runtime's guest kernel (`None`: microvm unavailable).
    pub guest_kernel: Option<PathBuf>,
    /// The gvisor runtime's runsc (`None`: `$SANDMESH_RUNSC`, else `PATH`).
    pub runsc: Option<PathBuf>,
    pub config: Config,
    /// Join a mesh; `None`: a cluster of one (tests, embedding).
    pub mesh: Option<MeshOptions>,
    /// Where paused sandboxes' snapshots are published (`None`:
    /// `file://<data_dir>/objects`, a store of this node alone).
    pub object_store: Option<actors::objects::StoreUrl>,
}

/// A started node.
pub struct Node {
    pub addr: SocketAddr,
    pub sandboxes: Sandboxes,
    pub cluster: Cluster,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// How often the node collects the object store's garbage, and the age
/// below which an unreferenced chunk is kept: an upload in progress has
/// not written its manifest yet, and an upload rewrites a chunk it finds
/// older than an hour (`StoreOptions::refresh_after`), so two hours cover
/// any upload shorter than one.
const OBJECT_GC_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
const OBJECT_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// Delete chunks no snapshot refers to any more (those of snapshots
/// replaced by a later pause, or of killed sandboxes), hourly. Every node
/// of a fleet sharing a store does this; the grace makes that safe.
fn spawn_object_gc(objects: actors::objects::SnapshotStore) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(OBJECT_GC_EVERY);
        // The first tick is immediate: let the node start first.
        every.tick().await;
        loop {
            every.tick().await;
            match objects.gc(OBJECT_GC_GRACE).await {
                Ok(stats) => tracing::info!(?stats, "object store garbage collected"),
                Err(e) => tracing::warn!("object store GC failed: {e}"),
            }
        }
    });
}

/// Open the state, pick the runtime, prepare the base template and serve.
pub async fn start(opts: NodeOptions) -> anyhow::Result<Node> {
    std::fs::create_dir_all(&opts.data_dir)?;
    // Install the recorder before anything records.
    crate::metrics::handle();
    let store = Store::open(&opts.data_dir)?;
    let microvm = match (&opts.guest_kernel, std::env::current_exe()) {
        (Some(kernel), Ok(vmm_bin)) => Some(actors::runtime::microvm::MicrovmConfig {
            vmm_bin,
            kernel: kernel.clone(),
            // `nobody`: the jailed VMMs own nothing on the host.
            confinement: actors::runtime::microvm::Confinement::Jailed {
                uid: 65534,
                gid: 65534,
            },
            ready_timeout: actors::runtime::microvm::READY_TIMEOUT,
        }),
        _ => None,
    };
    let selected = select(opts.runtime, &opts.data_dir, microvm, opts.runsc.clone())?;
    tracing::info!("runtime: {}", selected.reason);
    let store_url = match opts.object_store {
        Some(url) => url,
        None => actors::objects::StoreUrl::Local {
            dir: std::path::absolute(opts.data_dir.join("objects"))?,
        },
    };
    let objects = actors::objects::SnapshotStore::open(&store_url, &Default::default())
        .map_err(|e| anyhow::anyhow!("opening the object store {store_url}: {e}"))?;
    tracing::info!("object store: {store_url}");
    spawn_object_gc(objects.clone());
    let config = Config {
        snapshots_dir: opts.data_dir.join("snapshots"),
        objects: Some(objects),
        ..opts.config
    };
    let sandboxes = Sandboxes::start(selected.runtime, store, opts.templates, config).await?;
    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    // Peers reach the REST front at the advertised address.
    let rest_addr = match &opts.mesh {
        Some(m) if addr.ip().is_unspecified() => SocketAddr::new(m.advertise, addr.port()),
        _ => addr,
    };
    let cluster = Cluster::start(sandboxes.clone(), rest_addr, opts.mesh).await?;
    let app = app(cluster.clone());
    cluster.set_app(app.clone());
    // Other nodes' calls on this node's sandboxes are served through it.
    sandboxes.set_remote_front(crate::cluster::serve::PeerFront::new(&cluster));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Node {
        addr,
        sandboxes,
        cluster,
        server,
    })
}
