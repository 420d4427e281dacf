//! `sandmesh-interpreter`: the code interpreter of the `code-interpreter-v1`
//! template (E2B's port 49999). See `envd::interpreter`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sandmesh-interpreter",
    about = "Runs code in Jupyter kernels for E2B's run_code (port 49999): the start command of the code-interpreter-v1 template"
)]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0:49999")]
    listen: SocketAddr,
    /// envd, asked to check each execution's access token and for the
    /// sandbox's environment variables; "none" to run without envd.
    #[arg(long, default_value = "http://127.0.0.1:49983")]
    envd: String,
    /// Working directory of contexts created without one.
    #[arg(long, default_value = "/home/user")]
    cwd: String,
    /// Where kernels' connection files and logs go.
    #[arg(long, default_value = "/tmp/sandmesh-interpreter")]
    runtime_dir: PathBuf,
    /// Languages whose default context is started before the server
    /// answers (so a template snapshot holds them running).
    #[arg(long, value_delimiter = ',', default_value = "python")]
    preload: Vec<String>,
    /// Most output one execution sends, in MiB; the rest is dropped.
    #[arg(long, default_value_t = 32)]
    max_output_mb: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    envd::interpreter::serve(envd::interpreter::Config {
        listen: args.listen,
        envd: (args.envd != "none").then_some(args.envd),
        default_cwd: args.cwd,
        runtime_dir: args.runtime_dir,
        preload: args.preload,
        max_output: args.max_output_mb * 1024 * 1024,
    })
    .await
}
