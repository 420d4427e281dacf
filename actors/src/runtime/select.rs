//! Which runtime a node uses: `--runtime auto|microvm|gvisor`.
//!
//! `auto` asks KVM whether it runs guest kernel mode natively
//! ([`vmm::probe`]): where it does, sandboxes are microVMs; where it only
//! emulates it (nested PVM) or is missing, gVisor. The choice and its reason
//! are logged by the node and reported per sandbox.

use std::path::Path;
use std::sync::Arc;

use super::gvisor::GvisorRuntime;
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

/// The reason the microvm runtime cannot be used on this host, if any.
fn microvm_unavailable() -> Option<String> {
    let probe = vmm::probe::probe_kvm();
    if !probe.native {
        return Some(probe.reason);
    }
    // The VMM boots guests, but the runtime that drives `sandmesh vmm`
    // processes behind the contract has not landed yet: say so rather
    // than pretend.
    Some(format!(
        "{}, but the microvm runtime is not part of this build yet",
        probe.reason
    ))
}

/// Open the runtime `choice` names, keeping its state under `data_dir`.
pub fn select(choice: RuntimeChoice, data_dir: &Path) -> Result<Selected> {
    match choice {
        RuntimeChoice::Microvm => Err(RuntimeError::Unavailable {
            runtime: RuntimeKind::Microvm,
            reason: microvm_unavailable().unwrap_or_default(),
        }),
        RuntimeChoice::Gvisor => Ok(Selected {
            runtime: Arc::new(GvisorRuntime::new(data_dir)?),
            reason: "gvisor was requested (--runtime gvisor)".into(),
        }),
        RuntimeChoice::Auto => {
            let why_not_microvm = microvm_unavailable().unwrap_or_default();
            match GvisorRuntime::new(data_dir) {
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
