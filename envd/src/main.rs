//! `envd`: serve the envd API on TCP and vsock.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use envd::paths::Root;
use schema::envd::ENVD_PORT;
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

#[derive(Parser)]
#[command(
    name = "envd",
    version,
    about = "sandmesh in-sandbox agent (E2B envd API)"
)]
struct Args {
    /// TCP address to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ENVD_PORT)))]
    listen: SocketAddr,
    /// vsock port to listen on (the host reaches microVM guests this way).
    #[arg(long, default_value_t = u32::from(ENVD_PORT))]
    vsock_port: u32,
    /// Do not listen on vsock (host processes, gVisor sandboxes).
    #[arg(long)]
    no_vsock: bool,
    /// Directory served as the sandbox's `/` (a host-process envd for tests
    /// serves a copy of the root filesystem; in a guest this is `/`).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Let `POST /init` set the wall clock (in a guest, where envd owns it).
    #[arg(long)]
    set_clock: bool,
    /// Where upload metadata are kept: `auto` (the file's `user.e2b.*`
    /// xattrs where the filesystem takes them, else envd's store) or `file`
    /// (envd's store only; tests of the gVisor behaviour on any host).
    #[arg(long, value_enum, default_value_t = MetadataMode::Auto)]
    metadata_store: MetadataMode,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MetadataMode {
    Auto,
    File,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let root = std::fs::canonicalize(&args.root)
        .with_context(|| format!("root directory {}", args.root.display()))?;
    let mut state = envd::State::new(Root::new(root), args.set_clock);
    if matches!(args.metadata_store, MetadataMode::File) {
        state = state.without_xattr_metadata();
    }
    let state = Arc::new(state);
    let app = envd::router(state);

    let tcp = envd::listener::ThreadedTcpListener::bind(args.listen)
        .with_context(|| format!("binding TCP {}", args.listen))?;
    let tcp_addr = axum::serve::Listener::local_addr(&tcp)?;
    let mut servers = tokio::task::JoinSet::new();
    let tcp_app = app.clone();
    servers.spawn(async move { axum::serve(tcp, tcp_app).await.context("serving TCP") });
    tracing::info!(%tcp_addr, "envd serving on TCP");

    if !args.no_vsock {
        // A host without a vsock transport (or a gVisor sandbox) cannot bind;
        // TCP still serves, so this is a warning, not a failure.
        match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, args.vsock_port)) {
            Ok(vsock) => {
                tracing::info!(port = args.vsock_port, "envd serving on vsock");
                servers
                    .spawn(async move { axum::serve(vsock, app).await.context("serving vsock") });
            }
            Err(e) => tracing::warn!(
                port = args.vsock_port,
                "vsock unavailable, serving TCP only: {e}"
            ),
        }
    }
    // Machine-readable readiness line, printed once every listener is up:
    // tests and the node wait for it.
    println!("envd listening on tcp {tcp_addr}");
    match servers.join_next().await {
        Some(result) => result.context("server task panicked")?,
        None => Ok(()),
    }
}
