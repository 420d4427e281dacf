//! Which runtime a node uses: `--runtime auto|microvm|gvisor`.
//!
//! `auto` asks KVM whether it runs guest kernel mode natively
//! ([`vmm::probe`]): where it does, sandboxes are microVMs; where it only
//! emulates it (nested PVM) or is missing, gVisor. The choice and its reason
//! are logged by the node and reported per sandbox.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::gvisor::GvisorRuntime;
use super::microvm::{MicrovmConfig, MicrovmRuntime};
use super::{Result, Runtime, RuntimeError, RuntimeKind};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeChoice {
    Auto,
    Microvm,
    Gvisor,
}

/// The runtime a node will use, and why.
pub struct Selected {
    pub runtime: Arc<dyn Runtime>,
    pub reason: String,
}

/// The microvm runtime, or why it cannot run here.
fn microvm(
    data_dir: &Path,
    config: Option<MicrovmConfig>,
) -> std::result::Result<MicrovmRuntime, String> {
    let probe = vmm::probe::probe_kvm();
    if !probe.native {
        return Err(probe.reason);
    }
    let config = config.ok_or_else(|| {
        format!(
            "{}, but no guest kernel was given (build it with `cargo xtask guest` or pass --kernel)",
            probe.reason
        )
    })?;
    MicrovmRuntime::new(data_dir, config).map_err(|e| format!("{}, but {e}", probe.reason))
}

/// Open the runtime `choice` names, keeping its state under `data_dir`.
/// `microvm` is what the microvm runtime needs (kernel, VMM binary);
/// `runsc` the gvisor runtime's binary (`None`: `$SANDMESH_RUNSC`, else
/// `runsc` on `PATH`).
pub fn select(
    choice: RuntimeChoice,
    data_dir: &Path,
    microvm_config: Option<MicrovmConfig>,
    runsc: Option<PathBuf>,
) -> Result<Selected> {
    match choice {
        RuntimeChoice::Microvm => match microvm(data_dir, microvm_config) {
            Ok(rt) => Ok(Selected {
                runtime: Arc::new(rt),
                reason: "microvm was requested (--runtime microvm)".into(),
            }),
            Err(reason) => Err(RuntimeError::Unavailable {
                runtime: RuntimeKind::Microvm,
                reason,
            }),
        },
        RuntimeChoice::Gvisor => Ok(Selected {
            runtime: Arc::new(GvisorRuntime::with_runsc(data_dir, runsc)?),
            reason: "gvisor was requested (--runtime gvisor)".into(),
        }),
        RuntimeChoice::Auto => {
            let why_not_microvm = match microvm(data_dir, microvm_config) {
                Ok(rt) => {
                    return Ok(Selected {
                        runtime: Arc::new(rt),
                        reason: "microvm, because KVM runs guest kernels natively here".into(),
                    });
                }
                Err(reason) => reason,
            };
            match GvisorRuntime::with_runsc(data_dir, runsc) {
                Ok(gvisor) => Ok(Selected {
                    runtime: Arc::new(gvisor),
                    reason: format!("gvisor, because microvm is unavailable: {why_not_microvm}"),
                }),
                Err(gvisor_err) => Err(RuntimeError::Unavailable {
                    runtime: RuntimeKind::Gvisor,
                    reason: format!(
                        "no runtime can run here. microvm: {why_not_microvm}. gvisor: {gvisor_err}"
                    ),
                }),
            }
        }
    }
}
