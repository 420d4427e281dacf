//! Paths as the sandbox sees them, mapped onto the host filesystem.
//!
//! envd serves a root directory (`/` in a guest; a prefix when it runs as a
//! host process for tests). A request path is resolved as E2B's envd does:
//! relative paths (and `~`) are relative to the user's home, `..` is
//! resolved lexically, and no resolution may leave the root.

use std::path::{Component, Path, PathBuf};

use crate::connect::ConnectError;
use crate::users::User;

/// The served root: guest paths live below `host_root`.
#[derive(Debug, Clone)]
pub struct Root {
    host_root: PathBuf,
}

impl Root {
    pub fn new(host_root: impl Into<PathBuf>) -> Self {
        Self {
            host_root: host_root.into(),
        }
    }

    pub fn host_root(&self) -> &Path {
        &self.host_root
    }

    /// Resolve a request path for `user` to (guest path, host path).
    ///
    /// Empty means the home directory. A path that climbs above `/` is
    /// refused with `permission_denied` rather than silently clamped.
    pub fn resolve(&self, user: &User, path: &str) -> Result<(PathBuf, PathBuf), ConnectError> {
        if path.contains('\0') {
            return Err(ConnectError::invalid_argument("path contains a NUL byte"));
        }
        let requested = if path.is_empty() || path == "~" {
            user.home.clone()
        } else if let Some(rest) = path.strip_prefix("~/") {
            user.home.join(rest)
        } else if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            user.home.join(path)
        };
        let mut guest = PathBuf::from("/");
        for c in requested.components() {
            match c {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    if !guest.pop() || guest.as_os_str().is_empty() {
                        return Err(ConnectError::permission_denied(format!(
                            "path {path:?} leaves the sandbox's root"
                        )));
                    }
                }
                Component::Normal(n) => guest.push(n),
            }
        }
        let host = self.to_host(&guest);
        Ok((guest, host))
    }

    /// The host path of a guest path (which must be absolute and normalized).
    pub fn to_host(&self, guest: &Path) -> PathBuf {
        let rel = guest.strip_prefix("/").unwrap_or(guest);
        if rel.as_os_str().is_empty() {
            self.host_root.clone()
        } else {
            self.host_root.join(rel)
        }
    }

    /// The guest path of a host path below the root, if it is below it.
    pub fn to_guest(&self, host: &Path) -> Option<PathBuf> {
        let rel = host.strip_prefix(&self.host_root).ok()?;
        Some(Path::new("/").join(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
        }
    }

    #[test]
    fn resolves_like_e2b() {
        let root = Root::new("/srv/sbx");
        let r = |p: &str| {
            root.resolve(&user(), p)
                .map(|(g, h)| (g.display().to_string(), h.display().to_string()))
        };
        assert_eq!(
            r("").unwrap(),
            ("/home/user".into(), "/srv/sbx/home/user".into())
        );
        assert_eq!(r("a.txt").unwrap().0, "/home/user/a.txt");
        assert_eq!(r("~/x/../y").unwrap().0, "/home/user/y");
        assert_eq!(
            r("/etc/./hosts").unwrap(),
            ("/etc/hosts".into(), "/srv/sbx/etc/hosts".into())
        );
        assert_eq!(r("/").unwrap(), ("/".into(), "/srv/sbx".into()));
        assert_eq!(r("../../x").unwrap().0, "/x");
        let escape = r("/../etc/passwd").unwrap_err();
        assert_eq!(escape.code, crate::connect::Code::PermissionDenied);
        assert_eq!(
            r("../../../x").unwrap_err().code,
            crate::connect::Code::PermissionDenied
        );
        assert_eq!(
            r("a\0b").unwrap_err().code,
            crate::connect::Code::InvalidArgument
        );
        assert_eq!(
            root.to_guest(Path::new("/srv/sbx/home/user/a")).unwrap(),
            Path::new("/home/user/a")
        );
        assert_eq!(root.to_guest(Path::new("/elsewhere")), None);
    }
}
