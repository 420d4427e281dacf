//! The namespaces of the jailed VMM other than its PID namespace (which
//! [`super::process`] makes with the fork).

use super::JailError;

/// The hostname the jailed VMM sees (its own UTS namespace).
pub const HOSTNAME: &str = "sandmesh-vmm";

/// New mount, network, IPC and UTS namespaces for the calling process:
/// mounts it makes are its own, it has no network interface but a down
/// loopback, and no System V IPC object of the host is reachable.
pub fn unshare_rest() -> Result<(), JailError> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(JailError::last_os(
            "unshare the mount, network, IPC and UTS namespaces",
        ));
    }
    Ok(())
}

/// Stop mount events propagating to or from the host: what the jail
/// mounts (and the pivot) must not show up in the host's namespace.
pub fn make_mounts_private() -> Result<(), JailError> {
    // SAFETY: valid NUL-terminated strings; null source, fstype and data
    // are allowed for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(JailError::last_os("make the jail's mounts private"));
    }
    Ok(())
}

/// Name the UTS namespace, so nothing of the host's name shows.
pub fn set_hostname() -> Result<(), JailError> {
    // SAFETY: the pointer and length describe HOSTNAME.
    if unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) } != 0 {
        return Err(JailError::last_os("sethostname"));
    }
    Ok(())
}
