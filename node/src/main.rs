//! `sandmesh`: the one binary every host runs.
//!
//! Subcommands arrive with their issues; each one that is listed works:
//! `node`, `apikey create`, `vmm`, `kernel check`.

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
    /// proxy on one port, with this host's sandboxes.
    Node(NodeArgs),
    /// API keys for the REST API (stored hashed in the data directory).
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// Guest kernel tools.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Run one microVM (normally started by the node): boots the kernel
    /// with the root disk, serves vsock and the control socket, and exits
    /// when the guest resets or powers off (status 0) or is shut down.
    Vmm(VmmArgs),
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
    templates: Vec<node::templates::TemplateSpec>,
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
    /// Kill every sandbox when the node stops (SIGTERM/Ctrl-C). By default
    /// sandboxes outlive the node and a restarted node re-adopts them.
    #[arg(long)]
    kill_sandboxes_on_exit: bool,
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
    /// removed at exit when absent). With --restore: this VM's copy of the
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
        Command::Node(args) => node_run(args),
        Command::Apikey(ApikeyCommand::Create { data_dir }) => apikey_create(&data_dir),
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

fn apikey_create(data_dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let store = node::store::Store::open(data_dir).with_context(|| {
        format!(
            "opening {} (is a node running on it? stop it first)",
            data_dir.display()
        )
    })?;
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
            node::templates::TemplateSpec {
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
    let config = node::sandboxes::Config {
        default_timeout: std::time::Duration::from_secs(args.default_timeout),
        max_timeout: std::time::Duration::from_secs(args.max_timeout),
        domain: args.domain,
        max_sandboxes: args.max_sandboxes as usize,
        ..Default::default()
    };
    let runtime = match args.runtime {
        RuntimeArg::Auto => RuntimeChoice::Auto,
        RuntimeArg::Microvm => RuntimeChoice::Microvm,
        RuntimeArg::Gvisor => RuntimeChoice::Gvisor,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let node = node::server::start(node::server::NodeOptions {
            data_dir: args.data_dir,
            listen: args.listen,
            runtime,
            templates,
            guest_kernel,
            config,
        })
        .await?;
        // Machine-readable readiness line (tests and scripts wait for it).
        println!("listening on {}", node.addr);
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
        Ok(())
    })
}
