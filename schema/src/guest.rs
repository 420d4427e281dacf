//! The manifest of built guest artifacts.
//!
//! `cargo xtask` builds the guest kernel, envd and the base root filesystem
//! into a cache keyed by their inputs, and writes this manifest so that the
//! node and the test suites find the exact artifacts of this checkout
//! without knowing how the cache is laid out.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable naming the manifest file (`cargo xtask` sets it).
pub const ARTIFACTS_ENV: &str = "SANDMESH_GUEST_ARTIFACTS";

/// When set, tests that need the guest artifacts fail instead of skipping.
pub const REQUIRE_ENV: &str = "SANDMESH_REQUIRE_ARTIFACTS";

/// Where the built guest artifacts are, and the cache keys they were built under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestArtifacts {
    /// Uncompressed ELF `vmlinux` for direct 64-bit entry.
    pub kernel: PathBuf,
    /// The `.config` the kernel was built with.
    pub kernel_config: PathBuf,
    /// The base root filesystem as a directory tree (used by the gvisor runtime).
    pub rootfs_dir: PathBuf,
    /// The same tree packed as a sparse ext4 image (used by the microvm runtime).
    pub rootfs_image: PathBuf,
    /// The statically linked envd binary installed in the root filesystem.
    pub envd: PathBuf,
    /// Input hash of each artifact, for logs and cache inspection.
    pub keys: ArtifactKeys,
}

/// Input hashes (hex) of the cached artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactKeys {
    pub kernel: String,
    pub rootfs_base: String,
    pub envd: String,
    pub rootfs: String,
}

/// Why a manifest could not be read.
#[derive(Debug)]
pub enum ManifestError {
    Io(PathBuf, std::io::Error),
    Parse(PathBuf, serde_json::Error),
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(p, e) => write!(
                f,
                "cannot read guest artifact manifest {}: {e} (run `cargo xtask guest` to build it)",
                p.display()
            ),
            Self::Parse(p, e) => write!(
                f,
                "guest artifact manifest {} is not valid: {e} (rebuild it with `cargo xtask guest`)",
                p.display()
            ),
        }
    }
}

impl std::error::Error for ManifestError {}

impl GuestArtifacts {
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ManifestError::Io(path.to_owned(), e))?;
        serde_json::from_str(&text).map_err(|e| ManifestError::Parse(path.to_owned(), e))
    }

    /// The manifest named by [`ARTIFACTS_ENV`], if the variable is set.
    pub fn from_env() -> Option<Result<Self, ManifestError>> {
        let path = std::env::var_os(ARTIFACTS_ENV)?;
        Some(Self::load(Path::new(&path)))
    }

    /// For tests that check built artifacts: the manifest, or `None` (with a
    /// printed reason) when none was built. Under `cargo xtask test`
    /// (`SANDMESH_REQUIRE_ARTIFACTS` set) a missing or broken manifest is a
    /// failure, never a skip.
    pub fn for_test(test: &str) -> Option<Self> {
        let required = std::env::var_os(REQUIRE_ENV).is_some();
        match Self::from_env() {
            Some(Ok(manifest)) => Some(manifest),
            Some(Err(e)) => panic!("{test}: {e}"),
            None if required => panic!("{test}: {REQUIRE_ENV} is set but {ARTIFACTS_ENV} is not"),
            None => {
                eprintln!("SKIP {test}: guest artifacts are not built (run `cargo xtask test`)");
                None
            }
        }
    }

    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_reports_bad_files() {
        let dir = std::env::temp_dir().join(format!("sandmesh-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("artifacts.json");
        let manifest = GuestArtifacts {
            kernel: "/c/kernel/vmlinux".into(),
            kernel_config: "/c/kernel/config".into(),
            rootfs_dir: "/c/rootfs/tree".into(),
            rootfs_image: "/c/rootfs/rootfs.ext4".into(),
            envd: "/c/envd/envd".into(),
            keys: ArtifactKeys {
                kernel: "k".into(),
                rootfs_base: "b".into(),
                envd: "e".into(),
                rootfs: "r".into(),
            },
        };
        manifest.store(&path).unwrap();
        assert_eq!(GuestArtifacts::load(&path).unwrap(), manifest);

        std::fs::write(&path, "{ not json").unwrap();
        let err = GuestArtifacts::load(&path).unwrap_err();
        assert!(matches!(err, ManifestError::Parse(..)), "{err}");
        assert!(err.to_string().contains("cargo xtask guest"));

        let err = GuestArtifacts::load(&dir.join("missing.json")).unwrap_err();
        assert!(matches!(err, ManifestError::Io(..)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
