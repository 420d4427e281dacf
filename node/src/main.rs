//! `sandmesh`: the one binary every host runs.
//!
//! Subcommands arrive with their issues (`node`, `vmm`, `status`, ...);
//! each one that is listed works.

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
