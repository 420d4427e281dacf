//! The code interpreter: E2B's port-49999 server (`Sandbox.run_code` of
//! `e2b-code-interpreter`), in the `code-interpreter-v1` template.
//!
//! Code runs in Jupyter kernels (ipykernel for Python, bash_kernel, Deno for
//! JavaScript/TypeScript) spoken to directly over ZeroMQ; a context is one
//! kernel. The default Python context is started before the server answers
//! `/health`, so a template built with this server as its start command is
//! snapshotted with the kernel already running: the first `run_code` of a
//! sandbox pays no kernel start.
//!
//! - [`kernel`]: one kernel process and its channels; an execution.
//! - [`contexts`]: contexts, default contexts per language, restart, removal.
//! - [`envs`]: per-call environment variables as code, per language.
//! - [`output`]: E2B's answer lines, and the bound on one execution's output.
//! - [`http`]: the routes.

pub mod contexts;
pub mod envs;
pub mod http;
pub mod kernel;
pub mod output;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

/// How the server is run (the `sandmesh-interpreter` flags).
pub struct Config {
    pub listen: SocketAddr,
    pub envd: Option<String>,
    pub default_cwd: String,
    pub runtime_dir: PathBuf,
    /// Languages whose default context starts before the server answers.
    pub preload: Vec<String>,
    pub max_output: usize,
}

/// Starts the preloaded contexts, then serves until the process ends.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let contexts = contexts::Contexts::discover(config.runtime_dir, config.default_cwd).await;
    tracing::info!(languages = ?contexts.supported(), "kernels found");
    for language in &config.preload {
        let started = std::time::Instant::now();
        contexts
            .default_for(Some(language))
            .await
            .with_context(|| format!("starting the default {language} context"))?;
        tracing::info!(%language, took = ?started.elapsed(), "default context ready");
    }
    let server = Arc::new(http::Server {
        contexts,
        envd: config.envd,
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .context("building the HTTP client")?,
        max_output: config.max_output,
    });
    // Accepting on a thread keeps the listener out of epoll, which gVisor's
    // checkpoint needs (see `crate::listener`).
    let listener = crate::listener::ThreadedTcpListener::bind(config.listen)
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(listen = %config.listen, "code interpreter serving");
    axum::serve(
        listener,
        http::router(server).into_make_service_with_connect_info::<http::Peer>(),
    )
    .await
    .context("serving")
}
