//! What a root disk image must be for the sandmesh guest.
//!
//! The guest kernel mounts `/dev/vda` as ext4 and runs
//! `/usr/local/sbin/sandmesh-init`, which starts envd. An image without
//! them boots to a kernel panic or to a guest that never answers, and the
//! caller learns only that envd did not come up. So an image is checked
//! before a VM is built on it: an ext4 superblock, labelled
//! [`ROOTFS_LABEL`] — the label every image we make carries (`cargo xtask`
//! guest images, template builds) and a foreign image (a distribution's
//! cloud image, another VMM's rootfs) does not.

use std::io::Read;
use std::path::Path;

/// The ext4 volume label of every sandmesh guest image
/// (`mkfs.ext4 -L sandmesh-root`).
pub const ROOTFS_LABEL: &str = "sandmesh-root";

/// The superblock is at byte 1024; its fields used here.
const SUPERBLOCK: usize = 1024;
const MAGIC_OFFSET: usize = SUPERBLOCK + 0x38;
const LABEL_OFFSET: usize = SUPERBLOCK + 0x78;
const LABEL_LEN: usize = 16;
const EXT_MAGIC: u16 = 0xef53;

/// Why an image is not a sandmesh guest root disk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootfsImageError {
    #[error("cannot read the root disk image: {0}")]
    Read(String),
    #[error(
        "the root disk image is not an ext4 filesystem (no superblock); the microvm runtime boots \
         the ext4 image that `cargo xtask guest` or a template build makes"
    )]
    NotExt4,
    #[error(
        "the root disk image is labelled {0:?}, not {ROOTFS_LABEL:?}: it is not a sandmesh guest \
         image (those carry sandmesh-init and envd); build one with `cargo xtask guest` or a \
         template build"
    )]
    Foreign(String),
}

/// Check the image at `path`.
pub fn check_image(path: &Path) -> Result<(), RootfsImageError> {
    let mut head = Vec::with_capacity(2048);
    std::fs::File::open(path)
        .and_then(|f| f.take(2048).read_to_end(&mut head))
        .map_err(|e| RootfsImageError::Read(format!("{}: {e}", path.display())))?;
    check_superblock(&head)
}

/// Check the first 2 KiB of an image.
pub fn check_superblock(head: &[u8]) -> Result<(), RootfsImageError> {
    if head.len() < LABEL_OFFSET + LABEL_LEN {
        return Err(RootfsImageError::NotExt4);
    }
    let magic = u16::from_le_bytes([head[MAGIC_OFFSET], head[MAGIC_OFFSET + 1]]);
    if magic != EXT_MAGIC {
        return Err(RootfsImageError::NotExt4);
    }
    let raw = &head[LABEL_OFFSET..LABEL_OFFSET + LABEL_LEN];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
    let label = String::from_utf8_lossy(&raw[..end]);
    if label != ROOTFS_LABEL {
        return Err(RootfsImageError::Foreign(label.into_owned()));
    }
    Ok(())
}

/// A `len`-byte image that passes [`check_image`] and holds no
/// filesystem: the stand-in disk of tests whose tiny guests never mount
/// it.
pub fn stand_in_image(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len.max(2048)];
    b[MAGIC_OFFSET..MAGIC_OFFSET + 2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    b[LABEL_OFFSET..LABEL_OFFSET + ROOTFS_LABEL.len()].copy_from_slice(ROOTFS_LABEL.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(magic: u16, label: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 2048];
        b[MAGIC_OFFSET..MAGIC_OFFSET + 2].copy_from_slice(&magic.to_le_bytes());
        b[LABEL_OFFSET..LABEL_OFFSET + label.len()].copy_from_slice(label);
        b
    }

    #[test]
    fn ours_is_accepted() {
        assert_eq!(
            check_superblock(&image(EXT_MAGIC, b"sandmesh-root")),
            Ok(())
        );
        assert_eq!(check_superblock(&stand_in_image(4096)), Ok(()));
    }

    #[test]
    fn foreign_images_are_refused_by_name() {
        assert_eq!(check_superblock(&[]), Err(RootfsImageError::NotExt4));
        assert_eq!(check_superblock(&[0; 4096]), Err(RootfsImageError::NotExt4));
        assert_eq!(
            check_superblock(&image(0x1234, b"sandmesh-root")),
            Err(RootfsImageError::NotExt4)
        );
        let err = check_superblock(&image(EXT_MAGIC, b"cloudimg-rootfs")).unwrap_err();
        assert_eq!(err, RootfsImageError::Foreign("cloudimg-rootfs".into()));
        assert!(err.to_string().contains("cargo xtask guest"), "{err}");
        // A 16-byte label has no terminating zero; a prefix is not ours.
        assert!(check_superblock(&image(EXT_MAGIC, b"sandmesh-rootfs!")).is_err());
        assert!(check_superblock(&image(EXT_MAGIC, b"sandmesh")).is_err());
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = check_image(Path::new("/nonexistent/rootfs.ext4")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/rootfs.ext4"),
            "{err}"
        );
    }
}
