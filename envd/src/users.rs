//! Guest users: who a process or file operation runs as.
//!
//! Read from `<root>/etc/passwd` and `<root>/etc/group` on each lookup
//! (they are tiny, and users may add accounts at run time). No NSS: envd is
//! linked statically and must not depend on the guest's C library.

use std::path::{Path, PathBuf};

use crate::connect::ConnectError;

/// A user account of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Home directory as the guest sees it.
    pub home: PathBuf,
    pub shell: String,
}

impl User {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Look `name` up in `<root>/etc/passwd`.
pub fn lookup(root: &Path, name: &str) -> Result<User, ConnectError> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))
        .map_err(|e| ConnectError::internal(format!("reading /etc/passwd: {e}")))?;
    passwd
        .lines()
        .find_map(|line| parse_passwd_line(line).filter(|u| u.name == name))
        .ok_or_else(|| {
            ConnectError::invalid_argument(format!("user {name:?} does not exist in the sandbox"))
        })
}

/// The name of the user with `uid`, or the number as text.
pub fn user_name(root: &Path, uid: u32) -> String {
    std::fs::read_to_string(root.join("etc/passwd"))
        .ok()
        .and_then(|p| {
            p.lines()
                .find_map(|l| parse_passwd_line(l).filter(|u| u.uid == uid))
        })
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// The name of the group with `gid`, or the number as text.
pub fn group_name(root: &Path, gid: u32) -> String {
    std::fs::read_to_string(root.join("etc/group"))
        .ok()
        .and_then(|g| {
            g.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let _pw = f.next()?;
                (f.next()?.parse::<u32>().ok()? == gid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| gid.to_string())
}

/// Supplementary groups of `user` from `<root>/etc/group`.
pub fn supplementary_groups(root: &Path, user: &str) -> Vec<u32> {
    std::fs::read_to_string(root.join("etc/group"))
        .map(|g| {
            g.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    let members = f.get(3)?;
                    members
                        .split(',')
                        .any(|m| m == user)
                        .then(|| f.get(2)?.parse().ok())?
                })
                .collect()
        })
        .unwrap_or_default()
}

fn parse_passwd_line(line: &str) -> Option<User> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || line.starts_with('#') {
        return None;
    }
    Some(User {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: PathBuf::from(f[5]),
        shell: f[6].to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accounts_and_groups() {
        let root = std::env::temp_dir().join(format!("envd-users-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken line\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nsudo:x:27:user\nuser:x:1000:\n",
        )
        .unwrap();
        let user = lookup(&root, "user").unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_path()),
            (1000, 1000, Path::new("/home/user"))
        );
        assert!(lookup(&root, "root").unwrap().is_root());
        let missing = lookup(&root, "nobody").unwrap_err();
        assert_eq!(missing.code, crate::connect::Code::InvalidArgument);
        assert_eq!(user_name(&root, 1000), "user");
        assert_eq!(user_name(&root, 4242), "4242");
        assert_eq!(group_name(&root, 27), "sudo");
        assert_eq!(supplementary_groups(&root, "user"), [27]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
