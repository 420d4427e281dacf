//! Dropping root: the jailed VMM keeps no capability, no group, and no way
//! to gain privileges back.

use super::JailError;

/// Become `uid`/`gid` for good.
///
/// The capability bounding set is emptied first (that needs
/// `CAP_SETPCAP`, so while still root), and the ambient set cleared; then
/// supplementary groups, gid and uid (real, effective and saved, so there is
/// no way back). A uid change from 0 to non-zero clears the permitted and
/// effective capabilities (no `SECBIT_KEEP_CAPS` is set). `no_new_privs`
/// makes a later execve unable to grant anything (and allows the
/// unprivileged seccomp install). The result is checked, not assumed.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY (all calls below): prctl/setgroups/setres[ug]id/getres[ug]id
    // with integer arguments or pointers to live locals.
    unsafe {
        // Old kernels lack ambient capabilities (EINVAL): nothing to clear.
        let rc = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::last_os("clear the ambient capabilities"));
        }
        // Capabilities are numbered from 0; EINVAL marks the end.
        for cap in 0..=63 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(JailError::last_os("drop the capability bounding set"));
            }
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(JailError::last_os("setgroups([])"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(JailError::last_os("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(JailError::last_os("setresuid"));
        }
        let (mut r, mut e, mut s) = (0, 0, 0);
        libc::getresuid(&mut r, &mut e, &mut s);
        let (mut rg, mut eg, mut sg) = (0, 0, 0);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
        if [r, e, s] != [uid; 3] || [rg, eg, sg] != [gid; 3] || libc::setuid(0) == 0 {
            return Err(JailError::Sys {
                what: "drop privileges",
                source: std::io::Error::other("the ids did not change for good"),
            });
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(JailError::last_os("PR_SET_NO_NEW_PRIVS"));
        }
    }
    Ok(())
}
