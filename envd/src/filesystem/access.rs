//! Unix permission checks for the user a request acts for.
//!
//! envd runs as root but acts for the requesting user: before touching a
//! path for a non-root user it checks what that user could do by the mode
//! bits (owner, group incl. supplementary groups, other; the sticky bit),
//! and what it creates it hands to that user.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::connect::ConnectError;
use crate::paths::Root;
use crate::users::{self, User};

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

/// What `user` may do below `root`.
pub struct Access<'a> {
    root: &'a Root,
    user: &'a User,
    groups: Vec<u32>,
}

impl<'a> Access<'a> {
    pub fn new(root: &'a Root, user: &'a User) -> Self {
        let mut groups = if user.is_root() {
            Vec::new()
        } else {
            users::supplementary_groups(root.host_root(), &user.name)
        };
        groups.push(user.gid);
        Self { root, user, groups }
    }

    pub fn user(&self) -> &User {
        self.user
    }

    /// Whether the mode bits of `meta` grant `want` (R, W, X or'ed) to the user.
    pub fn allows(&self, meta: &Metadata, want: u32) -> bool {
        if self.user.is_root() {
            return true;
        }
        let mode = meta.mode();
        let bits = if meta.uid() == self.user.uid {
            (mode >> 6) & 7
        } else if self.groups.contains(&meta.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }

    fn denied(&self, what: &str, guest: &Path) -> ConnectError {
        ConnectError::permission_denied(format!(
            "user {:?} may not {what} {}",
            self.user.name,
            guest.display()
        ))
    }

    /// Every existing ancestor directory of `guest` must be searchable.
    pub fn traverse(&self, guest: &Path) -> Result<(), ConnectError> {
        if self.user.is_root() {
            return Ok(());
        }
        let Some(parent) = guest.parent() else {
            return Ok(());
        };
        // The served root's own mode is the host's business (a host-process
        // envd may serve a 0700 scratch directory): `/` is searchable.
        let mut parts = parent.components().skip(1);
        let Some(first) = parts.next() else {
            return Ok(());
        };
        let mut dir = Path::new("/").join(first);
        loop {
            match std::fs::metadata(self.root.to_host(&dir)) {
                Ok(meta) if meta.is_dir() => {
                    if !self.allows(&meta, X) {
                        return Err(self.denied("access", guest));
                    }
                }
                // A missing (or non-directory) ancestor: the operation itself reports it.
                _ => return Ok(()),
            }
            match parts.next() {
                Some(c) => dir.push(c),
                None => return Ok(()),
            }
        }
    }

    /// The user may reach `guest` and the mode bits of `guest` (followed if
    /// a symlink) grant `want`. A missing path passes: the operation reports it.
    pub fn check(&self, guest: &Path, want: u32, what: &str) -> Result<(), ConnectError> {
        if self.user.is_root() {
            return Ok(());
        }
        self.traverse(guest)?;
        if guest.parent().is_none() {
            // `/` as a guest sees it: root's, rwxr-xr-x (see `traverse`).
            return if want & W != 0 {
                Err(self.denied(what, guest))
            } else {
                Ok(())
            };
        }
        match std::fs::metadata(self.root.to_host(guest)) {
            Ok(meta) if !self.allows(&meta, want) => Err(self.denied(what, guest)),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ConnectError::from_io(&e, &guest.display().to_string())),
        }
    }

    /// The user may create and remove entries in directory `dir`.
    pub fn check_write_dir(&self, dir: &Path) -> Result<(), ConnectError> {
        self.check(dir, W | X, "write into")
    }

    /// The user may remove or rename `guest` out of its directory
    /// (write access to the directory, and the sticky bit's ownership rule).
    pub fn check_unlink(&self, guest: &Path) -> Result<(), ConnectError> {
        if self.user.is_root() {
            return Ok(());
        }
        let parent = guest.parent().unwrap_or(Path::new("/"));
        self.check_write_dir(parent)?;
        let (Ok(pmeta), Ok(meta)) = (
            std::fs::metadata(self.root.to_host(parent)),
            std::fs::symlink_metadata(self.root.to_host(guest)),
        ) else {
            return Ok(());
        };
        let sticky = pmeta.mode() & libc::S_ISVTX != 0;
        if sticky && meta.uid() != self.user.uid && pmeta.uid() != self.user.uid {
            return Err(self.denied("remove or rename", guest));
        }
        Ok(())
    }

    /// Remove `guest` recursively only if every directory inside is one the
    /// user could empty (read, write and search).
    pub fn check_remove_tree(&self, guest: &Path) -> Result<(), ConnectError> {
        if self.user.is_root() {
            return Ok(());
        }
        let host = self.root.to_host(guest);
        let mut stack = vec![(guest.to_path_buf(), host)];
        while let Some((g, h)) = stack.pop() {
            let meta = match std::fs::symlink_metadata(&h) {
                Ok(m) => m,
                Err(_) => continue,
            };
            if !meta.is_dir() {
                continue;
            }
            if !self.allows(&meta, R | W | X) {
                return Err(self.denied("remove the contents of", &g));
            }
            if let Ok(rd) = std::fs::read_dir(&h) {
                for e in rd.flatten() {
                    stack.push((g.join(e.file_name()), e.path()));
                }
            }
        }
        Ok(())
    }

    /// Create directory `dir` and its missing ancestors (like `mkdir -p`),
    /// owned by the user. The nearest existing ancestor must be writable.
    pub fn ensure_dirs(&self, dir: &Path) -> Result<(), ConnectError> {
        let mut missing = Vec::new();
        let mut cur = dir.to_path_buf();
        loop {
            match std::fs::metadata(self.root.to_host(&cur)) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => {
                    return Err(ConnectError::invalid_argument(format!(
                        "{} exists and is not a directory",
                        cur.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(cur.clone());
                    if !cur.pop() {
                        break;
                    }
                }
                Err(e) => return Err(ConnectError::from_io(&e, &cur.display().to_string())),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        self.check_write_dir(&cur)?;
        for d in missing.iter().rev() {
            let host = self.root.to_host(d);
            match std::fs::create_dir(&host) {
                Ok(()) => self
                    .chown(&host)
                    .map_err(|e| ConnectError::from_io(&e, &d.display().to_string()))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ConnectError::from_io(&e, &d.display().to_string())),
            }
        }
        Ok(())
    }

    /// Hand `host` (not following a symlink) to the user. Only root may
    /// chown; an envd not running as root (a developer's) keeps its own.
    pub fn chown(&self, host: &Path) -> io::Result<()> {
        match std::os::unix::fs::lchown(host, Some(self.user.uid), Some(self.user.gid)) {
            // SAFETY: geteuid has no preconditions.
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    && unsafe { libc::geteuid() } != 0 =>
            {
                Ok(())
            }
            r => r,
        }
    }
}
