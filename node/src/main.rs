//! `sandmesh`: the one binary every host runs.
//!
//! Subcommands arrive with their issues (`node`, `status`, ...); each one
//! that is listed works: `kernel check`, `vmm`.

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
    /// Guest kernel tools.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Run one microVM (normally started by the node): boots the kernel
    /// with the root disk, serves vsock and the control socket, and exits
    /// when the guest resets or powers off (status 0) or is shut down.
    Vmm(VmmArgs),
}

#[derive(clap::Args)]
struct VmmArgs {
    /// Uncompressed x86-64 ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Root filesystem image (never written: writes go to the overlay).
    #[arg(long)]
    rootfs: PathBuf,
    /// Copy-on-write overlay for the root disk (created; a temporary file
    /// removed at exit when absent).
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
    let cfg = vmm::runner::VmmConfig {
        kernel: args.kernel,
        rootfs: args.rootfs,
        overlay: args.overlay,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        cmdline_extra: args.cmdline_extra,
        vsock_uds: args.vsock_uds,
        guest_cid: args.guest_cid,
        control: args.control,
        console_log: args.console_log,
    };
    match vmm::runner::run(&cfg)? {
        ExitReason::Reset | ExitReason::Poweroff | ExitReason::Stopped => Ok(()),
        other => bail!("the guest stopped abnormally: {other:?}"),
    }
}
