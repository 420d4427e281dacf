//! `sandmesh`: the one binary every host runs.
//!
//! Subcommands arrive with their issues; each one that is listed works:
//! `node` (and `node drain`), `status`, `cluster init|join-token|join`,
//! `apikey create|add`, `template build`, `vmm`, `kernel check`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sandmesh",
    version,
    about = "Secure, fast, self-hostable microVM sandboxes, compatible with the E2B SDKs",
    long_about = "Secure, fast, self-hostable microVM sandboxes, compatible with the E2B SDKs.\n\n\
                  Every host of a sandmesh cluster runs this same binary."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: the E2B-compatible REST API and the sandbox-traffic
    /// proxy on one port, with this host's sandboxes, as a member of the
    /// cluster (`--seed` joins one; without, it starts its own).
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        command: Option<NodeCommand>,
        #[command(flatten)]
        args: Box<NodeArgs>,
    },
    /// Show the cluster as a node sees it: nodes, state, capacity,
    /// sandboxes, templates.
    Status {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The cluster's certificates: every node needs one signed by the
    /// cluster CA to join.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// API keys for the REST API (stored hashed in the data directory).
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// The object store the nodes publish snapshots to: list what is in
    /// it, collect garbage. Works with every node down.
    #[command(subcommand)]
    Store(StoreCommand),
    /// User templates: build one from a Dockerfile on a node.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Guest kernel tools.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Run one microVM (normally started by the node): boots the kernel
    /// with the root disk, serves vsock and the control socket, and exits
    /// when the guest resets or powers off (status 0) or is shut down.
    Vmm(VmmArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Stop placing new sandboxes on a node (its running sandboxes stay);
    /// `--undo` makes it ready again. Kept across restarts of the node.
    Drain {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Make the node ready again.
        #[arg(long)]
        undo: bool,
    },
}

/// How an operator command reaches a node.
#[derive(clap::Args)]
struct RemoteArgs {
    /// REST address of the node to ask.
    #[arg(long, env = "SANDMESH_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// An API key of the cluster.
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: String,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Make a new cluster: its CA (`<data-dir>/cluster/ca-key.pem`: keep it
    /// safe) and this node's certificate. A node started with no cluster
    /// and no --seed does this itself.
    Init {
        #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
        data_dir: PathBuf,
        /// This node's id (default: the host name).
        #[arg(long, env = "SANDMESH_NODE_ID")]
        node_id: Option<String>,
    },
    /// Issue a certificate for a new node and print it as a join token
    /// (run where the cluster was initialised). The token holds the new
    /// node's private key: pass it over a secure channel, once.
    JoinToken {
        #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
        data_dir: PathBuf,
        /// Id of the node that will join (a DNS label of at most 40).
        #[arg(long)]
        node_id: String,
    },
    /// Install a join token on the new node (into `<data-dir>/cluster`);
    /// then start it with `sandmesh node --seed HOST:PORT`.
    Join {
        #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
        data_dir: PathBuf,
        #[arg(long, env = "SANDMESH_JOIN_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Where the node keeps its state (sled, runtime state, snapshots).
    #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
    data_dir: PathBuf,
    /// Address of the REST API and the sandbox proxy.
    #[arg(long, env = "SANDMESH_LISTEN", default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Sandbox runtime: `auto` uses microVMs where KVM runs guest kernels
    /// natively and gVisor elsewhere, and logs which and why.
    #[arg(long, value_enum, default_value_t = RuntimeArg::Auto)]
    runtime: RuntimeArg,
    /// Root tree of the `base` template. Default: the one `cargo xtask
    /// guest` built (its manifest, `SANDMESH_GUEST_ARTIFACTS`).
    #[arg(long, env = "SANDMESH_BASE_ROOTFS")]
    base_rootfs: Option<PathBuf>,
    /// Another template (repeatable): `NAME=ROOT_DIR[,cpu=N][,memory-mb=N]`.
    /// Every sandbox from it gets those resources (default 2 vCPUs and
    /// 512 MiB). Naming `base` here replaces the default base template.
    #[arg(long = "template", value_name = "SPEC")]
    templates: Vec<actors::template_cache::TemplateSpec>,
    /// Domain of sandbox URLs (`<port>-<sandboxID>.<domain>`) returned to
    /// the SDK; unset, the SDK uses its own E2B_DOMAIN / E2B_SANDBOX_URL.
    #[arg(long, env = "SANDMESH_DOMAIN")]
    domain: Option<String>,
    /// Timeout of a sandbox whose create names none, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    default_timeout: u64,
    /// Longest timeout a create or set_timeout may ask for, in seconds.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    max_timeout: u64,
    /// Sandboxes this node runs at most; creates beyond it get 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_sandboxes: u64,
    /// Guest kernel of the microvm runtime. Default: the one `cargo xtask
    /// guest` built.
    #[arg(long, env = "SANDMESH_KERNEL")]
    kernel: Option<PathBuf>,
    /// gVisor's runsc for the gvisor runtime. Default: `runsc` on PATH.
    /// Use a release of 2024-07-29 or later (older ones fail `ls` in
    /// sandboxes); `cargo xtask up` fetches one.
    #[arg(long, env = "SANDMESH_RUNSC")]
    runsc: Option<PathBuf>,
    /// Kill every sandbox when the node stops (SIGTERM/Ctrl-C). By default
    /// sandboxes outlive the node and a restarted node re-adopts them.
    #[arg(long)]
    kill_sandboxes_on_exit: bool,
    /// This node's id in the cluster; it ends every sandbox id made here.
    /// Default: the id in `<data-dir>/cluster`, else the host name.
    #[arg(long, env = "SANDMESH_NODE_ID")]
    node_id: Option<String>,
    /// Gossip address of a cluster member to join through (repeatable).
    /// Without, the node starts (or keeps) its own cluster.
    #[arg(
        long = "seed",
        value_name = "HOST:PORT",
        env = "SANDMESH_SEEDS",
        value_delimiter = ','
    )]
    seeds: Vec<String>,
    /// UDP address of cluster gossip. Default: the --listen host, port
    /// 7946 (a free port when --listen's port is 0).
    #[arg(long, env = "SANDMESH_GOSSIP_LISTEN")]
    gossip_listen: Option<std::net::SocketAddr>,
    /// UDP address of the mesh's QUIC transport. Default: the --listen
    /// host, port 7947 (a free port when --listen's port is 0).
    #[arg(long, env = "SANDMESH_QUIC_LISTEN")]
    quic_listen: Option<std::net::SocketAddr>,
    /// The address other nodes reach this one at. Default: the --listen
    /// host (give it when listening on 0.0.0.0).
    #[arg(long, env = "SANDMESH_ADVERTISE")]
    advertise: Option<std::net::IpAddr>,
    /// Where paused sandboxes' snapshots are published (a resume fetches
    /// from it when the node's local copy is gone): `file:///DIR` or
    /// `s3://BUCKET[/PREFIX]?endpoint=URL&region=R` (credentials from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). Default:
    /// `<data-dir>/objects`, which only this node reads.
    #[arg(long, env = "SANDMESH_OBJECT_STORE", value_name = "URL")]
    object_store: Option<actors::objects::StoreUrl>,
    /// Longest a template build may run, in seconds; its sandbox is
    /// killed then and the build fails.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(10..))]
    build_timeout: u64,
    /// The most a template build may write to its sandbox's disk, in MiB;
    /// the build fails beyond it.
    #[arg(long, default_value_t = 10240, value_parser = clap::value_parser!(u64).range(1..))]
    build_disk_mb: u64,
    /// Largest upload of a template build's COPY files, in MiB (413 beyond).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_template_upload_mb: u64,
    /// CA certificates (PEM) that template build steps trust besides the
    /// template's own: for hosts whose egress goes through a
    /// TLS-intercepting proxy. Build steps reach the internet through the
    /// node (an HTTP proxy in the build sandbox's network).
    #[arg(long, env = "SANDMESH_BUILD_CA_BUNDLE", value_name = "PEM")]
    build_ca_bundle: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RuntimeArg {
    Auto,
    Microvm,
    Gvisor,
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Create an API key and print it (only its hash is stored: keep it).
    Create {
        #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
        data_dir: PathBuf,
    },
    /// Accept an existing key too (read from standard input): every node of
    /// a cluster needs the keys its clients use.
    Add {
        #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct VmmArgs {
    /// Restore the microVM snapshotted in this directory instead of booting
    /// a kernel (the snapshot fixes vCPUs, memory, kernel and disk).
    #[arg(long, conflicts_with_all = ["kernel", "vcpus", "memory_mib", "cmdline_extra", "guest_cid"])]
    restore: Option<PathBuf>,
    /// Uncompressed x86-64 ELF vmlinux.
    #[arg(long, required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Root filesystem image (never written: writes go to the overlay).
    /// With --restore (jailed only): the snapshot's base image, when the
    /// snapshot was taken jailed (it then saved the jail's /rootfs).
    #[arg(long, required_unless_present = "restore")]
    rootfs: Option<PathBuf>,
    /// Copy-on-write overlay for the root disk (created; a temporary file
    /// removed at exit when absent; one that exists with its .map beside
    /// it is booted onto as it is). With --restore: this VM's copy of the
    /// snapshot's overlay, its .map beside it (the snapshot's own when
    /// absent; needed with --jail-dir).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// vCPUs (1..=16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    vcpus: u8,
    /// Guest memory in MiB (128..=32768).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(128..=32768))]
    memory_mib: u64,
    /// Appended to the kernel command line.
    #[arg(long, allow_hyphen_values = true)]
    cmdline_extra: Option<String>,
    /// Host unix socket of the guest's vsock (`CONNECT <port>`); guest
    /// connections to host port P go to `<path>_<P>`.
    #[arg(long)]
    vsock_uds: PathBuf,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..0xffff_ffff))]
    guest_cid: u64,
    /// Control socket (schema::vmm protocol).
    #[arg(long)]
    control: PathBuf,
    /// Where the serial console goes.
    #[arg(long)]
    console_log: PathBuf,
    /// Jail the VMM (needs root): its own mount, PID, IPC, UTS and network
    /// namespaces, `pivot_root` into `<DIR>/root`, --uid/--gid, a seccomp
    /// allowlist, and a cgroup with a CPU quota of --vcpus CPUs and
    /// --memory-mib plus 128 MiB. DIR must not exist; it is created and
    /// removed at exit. --control and --vsock-uds must then be plain file
    /// names: the sockets appear at `<DIR>/root/<name>`. Snapshots the
    /// jailed VMM takes go to paths inside the jail (`/snap` is
    /// `<DIR>/root/snap`) and are removed with DIR: move them out before
    /// the VMM ends. With --restore, the snapshot (and its diff chain's
    /// bases) is mounted read-only into the jail.
    #[arg(long, value_name = "DIR")]
    jail_dir: Option<PathBuf>,
    /// The unprivileged user the jailed VMM runs as.
    #[arg(long, requires = "jail_dir")]
    uid: Option<u32>,
    /// The unprivileged group the jailed VMM runs as.
    #[arg(long, requires = "jail_dir")]
    gid: Option<u32>,
    /// Jail without a cgroup (no CPU or memory limit).
    #[arg(long, requires = "jail_dir")]
    no_cgroup: bool,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// List the snapshots: paused sandboxes (and the node that holds
    /// each), user snapshots; size and age. Then the sandboxes recorded
    /// running, and where.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete the chunks no snapshot refers to any more. Nodes do this
    /// hourly; this is for a store no node runs against.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        /// Keep unreferenced chunks younger than this many seconds (an
        /// upload in flight has chunks but no manifest yet).
        #[arg(long, default_value_t = 7200)]
        grace_secs: u64,
    },
}

#[derive(clap::Args)]
struct StoreArgs {
    /// The store, as given to `sandmesh node --object-store` (credentials
    /// for s3:// from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "SANDMESH_OBJECT_STORE", value_name = "URL")]
    object_store: Option<actors::objects::StoreUrl>,
    /// Without --object-store: the node data directory whose default
    /// store (`<data-dir>/objects`) to use.
    #[arg(long, env = "SANDMESH_DATA_DIR", default_value = "./.sandmesh")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Build a template from a Dockerfile (E2B's mapping: RUN, COPY/ADD of
    /// local files, ENV, ARG, WORKDIR, USER, CMD/ENTRYPOINT; one FROM):
    /// upload the COPY sources the node lacks, start the build, follow its
    /// log until it is ready or failed.
    Build {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        args: node::template_cli::BuildArgs,
    },
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Check that a kernel image can be booted by the sandmesh VMM: an
    /// uncompressed x86-64 ELF vmlinux with the options the guest needs.
    Check {
        /// Path to the vmlinux.
        vmlinux: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Kernel(KernelCommand::Check { vmlinux }) => kernel_check(&vmlinux),
        Command::Vmm(args) => vmm_run(args),
        Command::Node {
            command: Some(NodeCommand::Drain { remote, undo }),
            ..
        } => {
            remote_run(|| async move { node::ops::drain(&remote.url, &remote.api_key, undo).await })
        }
        Command::Node {
            command: None,
            args,
        } => node_run(*args),
        Command::Status { remote, json } => {
            remote_run(
                || async move { node::ops::status(&remote.url, &remote.api_key, json).await },
            )
        }
        Command::Cluster(c) => cluster_command(c),
        Command::Store(StoreCommand::Ls { store }) => remote_run(|| async move {
            let objects = node::store_cli::open(store.object_store, &store.data_dir)?;
            node::store_cli::list(&objects).await
        }),
        Command::Store(StoreCommand::Gc { store, grace_secs }) => remote_run(|| async move {
            let objects = node::store_cli::open(store.object_store, &store.data_dir)?;
            node::store_cli::gc(&objects, std::time::Duration::from_secs(grace_secs)).await
        }),
        Command::Template(TemplateCommand::Build { remote, args }) => remote_run(|| async move {
            node::template_cli::build(&remote.url, &remote.api_key, &args).await
        }),
        Command::Apikey(ApikeyCommand::Create { data_dir }) => apikey_create(&data_dir),
        Command::Apikey(ApikeyCommand::Add { data_dir }) => apikey_add(&data_dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn kernel_check(path: &std::path::Path) -> Result<()> {
    use vmm::guest_kernel::{check_elf, embedded_config, missing_required};
    let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let elf = check_elf(&image)?;
    println!(
        "{}: x86-64 ELF executable, entry {:#x}",
        path.display(),
        elf.entry
    );
    let config = embedded_config(&image)?;
    let missing = missing_required(vmm::guest_kernel::REQUIRED_FRAGMENT, &config);
    if !missing.is_empty() {
        bail!(
            "the kernel lacks options the sandmesh guest needs:\n  {}",
            missing.join("\n  ")
        );
    }
    println!("every option the guest needs is set");
    Ok(())
}

fn vmm_run(args: VmmArgs) -> Result<()> {
    use vmm::vstate::exit::ExitReason;
    let jail = match args.jail_dir {
        Some(dir) => {
            let (Some(uid), Some(gid)) = (args.uid, args.gid) else {
                bail!(
                    "--jail-dir needs --uid and --gid: the unprivileged user and group the VMM runs as"
                );
            };
            Some(vmm::jail::JailConfig {
                dir,
                uid,
                gid,
                cgroup: (!args.no_cgroup)
                    .then(|| vmm::jail::CgroupLimits::for_vm(args.vcpus, args.memory_mib)),
            })
        }
        None => None,
    };
    if let Some(snapshot) = args.restore {
        // The runner sizes a restore's cgroup by the snapshot.
        let cfg = vmm::runner::RestoreConfig {
            snapshot,
            overlay: args.overlay,
            rootfs: args.rootfs,
            vsock_uds: args.vsock_uds,
            control: args.control,
            console_log: args.console_log,
            jail,
        };
        return match vmm::runner::restore(&cfg)? {
            ExitReason::Reset | ExitReason::Poweroff | ExitReason::Stopped => Ok(()),
            other => bail!("the guest stopped abnormally: {other:?}"),
        };
    }
    // clap requires both without --restore.
    let (Some(kernel), Some(rootfs)) = (args.kernel, args.rootfs) else {
        bail!("--kernel and --rootfs are required (or --restore)");
    };
    let cfg = vmm::runner::VmmConfig {
        kernel,
        rootfs,
        overlay: args.overlay,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        cmdline_extra: args.cmdline_extra,
        vsock_uds: args.vsock_uds,
        guest_cid: args.guest_cid,
        control: args.control,
        console_log: args.console_log,
        jail,
    };
    match vmm::runner::run(&cfg)? {
        ExitReason::Reset | ExitReason::Poweroff | ExitReason::Stopped => Ok(()),
        other => bail!("the guest stopped abnormally: {other:?}"),
    }
}

/// Run an operator command against a node and print what it returns.
fn remote_run<F, Fut>(f: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(f())?;
    println!("{}", out.trim_end());
    Ok(())
}

/// The host name as a node id: lowercase, other characters as '-'.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut id: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(schema::mesh::MAX_NODE_ID_LEN)
        .collect();
    id = id.trim_matches('-').to_owned();
    if schema::mesh::validate_node_id(&id).is_ok() {
        id
    } else {
        "node".into()
    }
}

fn cluster_command(c: ClusterCommand) -> Result<()> {
    use node::cluster::certs;
    match c {
        ClusterCommand::Init { data_dir, node_id } => {
            let dir = certs::cluster_dir(&data_dir);
            let id = node_id.unwrap_or_else(default_node_id);
            certs::init(&dir, &id)?;
            println!(
                "made a new cluster in {}: this node is {id}.
Add a node: `sandmesh cluster join-token --node-id NAME` here, `sandmesh cluster join --token TOKEN` there.",
                dir.display()
            );
        }
        ClusterCommand::JoinToken { data_dir, node_id } => {
            println!(
                "{}",
                certs::join_token(&certs::cluster_dir(&data_dir), &node_id)?
            );
        }
        ClusterCommand::Join { data_dir, token } => {
            let dir = certs::cluster_dir(&data_dir);
            let id = certs::join(&dir, token.trim())?;
            println!(
                "installed the certificate of node {id} in {}.
Start it with `sandmesh node --data-dir {} --seed HOST:7946`.",
                dir.display(),
                data_dir.display()
            );
        }
    }
    Ok(())
}

fn apikey_add(data_dir: &std::path::Path) -> Result<()> {
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .context("reading the key from standard input")?;
    let store = open_store(data_dir)?;
    store.add_api_key(key.trim())?;
    println!("added");
    Ok(())
}

fn open_store(data_dir: &std::path::Path) -> Result<actors::store::Store> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    actors::store::Store::open(data_dir).with_context(|| {
        format!(
            "opening {} (is a node running on it? stop it first)",
            data_dir.display()
        )
    })
}

/// How this node joins the mesh: its certificate (a new cluster's when it
/// has none and names no seed) and addresses.
fn mesh_options(args: &NodeArgs) -> Result<node::cluster::MeshOptions> {
    use node::cluster::certs;
    let dir = certs::cluster_dir(&args.data_dir);
    let files = match certs::load(&dir)? {
        Some(files) => files,
        None if !args.seeds.is_empty() => bail!(
            "this node has no cluster certificate in {}: on the node where the cluster was made, run `sandmesh cluster join-token --node-id {}`, then here `sandmesh cluster join --token TOKEN`",
            dir.display(),
            args.node_id.clone().unwrap_or_else(default_node_id)
        ),
        None => {
            let id = args.node_id.clone().unwrap_or_else(default_node_id);
            certs::init(&dir, &id)?;
            tracing::info!(node = %id, "made a new cluster (CA in {}); add nodes with `sandmesh cluster join-token`", dir.display());
            certs::load(&dir)?.context("the cluster just made cannot be read back")?
        }
    };
    if let Some(id) = &args.node_id
        && *id != files.node_id
    {
        bail!(
            "--node-id {id} but the certificate in {} is node {}'s: drop --node-id, or use another --data-dir",
            dir.display(),
            files.node_id
        );
    }
    let ip = args.listen.ip();
    let advertise = match args.advertise {
        Some(a) => a,
        None if ip.is_unspecified() => {
            tracing::warn!(
                "--listen is {ip}: advertising 127.0.0.1; give --advertise so that other hosts can reach this node"
            );
            std::net::IpAddr::from([127, 0, 0, 1])
        }
        None => ip,
    };
    let port = |p: u16| if args.listen.port() == 0 { 0 } else { p };
    Ok(node::cluster::MeshOptions {
        gossip_listen: args
            .gossip_listen
            .unwrap_or_else(|| std::net::SocketAddr::new(ip, port(7946))),
        quic_listen: args
            .quic_listen
            .unwrap_or_else(|| std::net::SocketAddr::new(ip, port(7947))),
        advertise,
        seeds: args.seeds.clone(),
        files,
    })
}

fn apikey_create(data_dir: &std::path::Path) -> Result<()> {
    let store = open_store(data_dir)?;
    println!("{}", store.create_api_key()?);
    Ok(())
}

fn node_run(args: NodeArgs) -> Result<()> {
    use actors::runtime::select::RuntimeChoice;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.default_timeout > args.max_timeout {
        anyhow::bail!(
            "--default-timeout {} is longer than --max-timeout {}",
            args.default_timeout,
            args.max_timeout
        );
    }
    let mesh = mesh_options(&args)?;
    let mut templates = args.templates;
    let manifest = std::env::var_os(schema::guest::ARTIFACTS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/sandmesh-guest-artifacts.json"));
    let artifacts = schema::guest::GuestArtifacts::load(&manifest).ok();
    let base = match (args.base_rootfs, &artifacts) {
        _ if templates.iter().any(|t| t.name == "base") => None,
        (Some(dir), _) => Some((dir, None)),
        (None, Some(a)) => Some((a.rootfs_dir.clone(), Some(a.rootfs_image.clone()))),
        (None, None) => anyhow::bail!(
            "no --base-rootfs given and no guest artifacts found at {} (build them with `cargo xtask guest`)",
            manifest.display()
        ),
    };
    if let Some((dir, image)) = base {
        templates.insert(
            0,
            actors::template_cache::TemplateSpec {
                name: "base".into(),
                rootfs_dir: dir,
                rootfs_image: image,
                limits: actors::runtime::Limits::default(),
            },
        );
    }
    let guest_kernel = args
        .kernel
        .or_else(|| artifacts.as_ref().map(|a| a.kernel.clone()));
    let mut names = std::collections::HashSet::new();
    if let Some(t) = templates.iter().find(|t| !names.insert(t.name.clone())) {
        anyhow::bail!("template {:?} is given twice", t.name);
    }
    let config = actors::service::Config {
        default_timeout: std::time::Duration::from_secs(args.default_timeout),
        max_timeout: std::time::Duration::from_secs(args.max_timeout),
        domain: args.domain,
        max_sandboxes: args.max_sandboxes as usize,
        builds: actors::service::BuildOptions {
            timeout: std::time::Duration::from_secs(args.build_timeout),
            max_disk: args.build_disk_mb << 20,
            max_upload: args.max_template_upload_mb << 20,
            ca_bundle: args.build_ca_bundle.clone(),
        },
        ..Default::default()
    };
    let runtime = match args.runtime {
        RuntimeArg::Auto => RuntimeChoice::Auto,
        RuntimeArg::Microvm => RuntimeChoice::Microvm,
        RuntimeArg::Gvisor => RuntimeChoice::Gvisor,
    };
    let config = actors::service::Config {
        node_id: mesh.files.node_id.clone(),
        ..config
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let node = node::server::start(node::server::NodeOptions {
            data_dir: args.data_dir,
            listen: args.listen,
            runtime,
            templates,
            guest_kernel,
            runsc: args.runsc,
            config,
            mesh: Some(mesh),
            object_store: args.object_store,
        })
        .await?;
        // Machine-readable readiness lines (tests and scripts wait for the
        // first; the second says where other nodes join: `--seed`).
        println!("listening on {}", node.addr);
        if let Some(gossip) = node.cluster.gossip_addr() {
            println!("gossip on {gossip} as node {}", node.cluster.node_id());
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = node.server => r??,
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if args.kill_sandboxes_on_exit {
            let runtime = node.sandboxes.runtime();
            for r in runtime.list().await? {
                if let Err(e) = runtime.kill(&r.id).await {
                    eprintln!("killing sandbox {}: {e}", r.id);
                }
            }
        }
        node.cluster.shutdown().await;
        Ok(())
    })
}
