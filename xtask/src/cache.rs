//! The guest artifact cache: outside the checkout, keyed by input hashes.
//!
//! Every entry is a directory `<cache>/<kind>/<key>/`. It is built under a
//! temporary name in the same directory and renamed into place only when
//! complete, so a failed or interrupted build never leaves a half-written
//! artifact that a later run would trust.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// How many entries of one kind survive garbage collection.
const KEEP_PER_KIND: usize = 3;

pub struct Cache {
    root: PathBuf,
}

/// A finished, published cache entry.
pub struct Entry {
    pub dir: PathBuf,
    pub key: String,
}

impl Cache {
    /// `$SANDMESH_CACHE`, else `$XDG_CACHE_HOME/sandmesh`, else `~/.cache/sandmesh`.
    pub fn open() -> Result<Self> {
        let root = if let Some(dir) = std::env::var_os("SANDMESH_CACHE") {
            PathBuf::from(dir)
        } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(dir).join("sandmesh")
        } else {
            let home = std::env::var_os("HOME")
                .context("neither SANDMESH_CACHE, XDG_CACHE_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cache").join("sandmesh")
        };
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating cache directory {}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Return the entry `kind/key`, building it with `build` if it is absent
    /// (or if `force`). `build` fills the directory it is given.
    pub fn get_or_build(
        &self,
        kind: &str,
        key: &str,
        force: bool,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Entry> {
        let kind_dir = self.root.join(kind);
        let dir = kind_dir.join(key);
        if dir.is_dir() && !force {
            println!("cached  {kind:<12} {key}");
            return Ok(Entry {
                dir,
                key: key.to_owned(),
            });
        }
        std::fs::create_dir_all(&kind_dir)?;
        let tmp = kind_dir.join(format!(".tmp-{key}-{}", std::process::id()));
        remove_dir_all_if_exists(&tmp)?;
        std::fs::create_dir_all(&tmp)?;
        println!("build   {kind:<12} {key}");
        if let Err(err) = build(&tmp) {
            // Keep nothing that a later run could mistake for a finished artifact.
            let _ = remove_dir_all_if_exists(&tmp);
            return Err(err.context(format!("building {kind} (no cache entry was written)")));
        }
        if dir.exists() {
            remove_dir_all_if_exists(&dir)?;
        }
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("publishing {} as {}", tmp.display(), dir.display()))?;
        self.collect_garbage(kind, key);
        Ok(Entry {
            dir,
            key: key.to_owned(),
        })
    }

    /// Remove stale temporaries and all but the newest entries of `kind`.
    fn collect_garbage(&self, kind: &str, keep: &str) {
        let Ok(read) = std::fs::read_dir(self.root.join(kind)) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = read
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != keep)
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, path) in entries.into_iter().skip(KEEP_PER_KIND - 1) {
            // A temporary of a concurrent build is young; only old ones go.
            let _ = remove_dir_all_if_exists(&path);
        }
    }
}

pub fn remove_dir_all_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// A cache key: the first 16 hex digits of SHA-256 over labelled inputs.
#[derive(Default)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    pub fn new(kind: &str) -> Self {
        let mut h = Self(Sha256::new());
        h.text("kind", kind);
        h
    }

    pub fn text(&mut self, label: &str, value: &str) -> &mut Self {
        self.bytes(label, value.as_bytes())
    }

    pub fn bytes(&mut self, label: &str, value: &[u8]) -> &mut Self {
        // Length-prefix both parts so no two input lists hash alike.
        for part in [label.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    /// Hash a file's contents under its path relative to `base`.
    pub fn file(&mut self, base: &Path, path: &Path) -> Result<&mut Self> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let rel = path.strip_prefix(base).unwrap_or(path);
        Ok(self.bytes(&rel.to_string_lossy(), &data))
    }

    /// Hash every file below `dir` (sorted, so the order is stable).
    pub fn tree(&mut self, base: &Path, dir: &Path) -> Result<&mut Self> {
        let mut files = Vec::new();
        collect_files(dir, &mut files)?;
        files.sort();
        for f in files {
            self.file(base, &f)?;
        }
        Ok(self)
    }

    pub fn finish(&self) -> String {
        hex::encode(&self.0.clone().finalize()[..8])
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if ty.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keys_depend_on_every_input_and_on_the_split_between_them() {
        let a = KeyHasher::new("k").text("x", "ab").text("y", "c").finish();
        let b = KeyHasher::new("k").text("x", "a").text("y", "bc").finish();
        let c = KeyHasher::new("k").text("x", "ab").text("y", "c").finish();
        assert_ne!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn failed_build_leaves_nothing_and_success_is_reused() {
        let root = scratch("atomic");
        let cache = Cache { root: root.clone() };
        let err = cache
            .get_or_build("kernel", "k1", false, |dir| {
                std::fs::write(dir.join("vmlinux"), b"half")?;
                anyhow::bail!("compiler exploded")
            })
            .err()
            .expect("the build failed");
        assert!(format!("{err:#}").contains("compiler exploded"));
        let left: Vec<_> = std::fs::read_dir(root.join("kernel")).unwrap().collect();
        assert!(left.is_empty(), "a failed build left {left:?}");

        let mut builds = 0;
        for _ in 0..2 {
            let entry = cache
                .get_or_build("kernel", "k1", false, |dir| {
                    builds += 1;
                    std::fs::write(dir.join("vmlinux"), b"elf")?;
                    Ok(())
                })
                .unwrap();
            assert_eq!(std::fs::read(entry.dir.join("vmlinux")).unwrap(), b"elf");
        }
        assert_eq!(builds, 1, "the second call must hit the cache");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn garbage_collection_keeps_the_newest_entries() {
        let root = scratch("gc");
        let cache = Cache { root: root.clone() };
        for i in 0..5 {
            cache
                .get_or_build("rootfs", &format!("k{i}"), false, |_| Ok(()))
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut left: Vec<_> = std::fs::read_dir(root.join("rootfs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["k2", "k3", "k4"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
