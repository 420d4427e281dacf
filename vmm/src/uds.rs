//! Listening Unix sockets that appear only once they accept connections.
//!
//! `bind(2)` creates the socket's file and `listen(2)` follows: between the
//! two, a client that waited for the file to appear (the node, the tests,
//! a user's script) gets ECONNREFUSED. So the listener is bound under a
//! temporary name beside the path, set listening, and renamed into place
//! with `RENAME_NOREPLACE`: the path exists only as a listening socket, and
//! a path already in use is refused, as `bind` would refuse it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// A listening socket at `path`, which must not exist.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "the path exists already",
        ));
    }
    let staging = staging_path(path);
    // A crash between bind and rename leaves this behind; it is ours.
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    if let Err(e) = rename_noreplace(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

/// `<path>.new`, beside the final path (a rename does not cross
/// directories).
fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
    };
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_socket_appears_listening_and_a_taken_path_is_refused() {
        let dir = std::env::temp_dir().join(format!("smuds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let listener = listen(&path).unwrap();
        UnixStream::connect(&path).expect("connectable as soon as it exists");
        assert!(listener.accept().is_ok());
        assert!(!staging_path(&path).exists(), "no staging name left");
        let e = listen(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // A staging file left by a crash does not stand in the way.
        let other = dir.join("v.sock");
        std::fs::write(staging_path(&other), b"stale").unwrap();
        let _other = listen(&other).unwrap();
        UnixStream::connect(&other).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
