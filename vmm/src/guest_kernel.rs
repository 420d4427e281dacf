//! What a guest kernel image must be for direct 64-bit entry.
//!
//! The VMM loads an uncompressed ELF `vmlinux` (no bzImage decompressor, no
//! firmware), so before anything is mapped into guest memory the image is
//! checked to be a 64-bit little-endian x86-64 executable. The kernel's own
//! configuration travels inside the image (`CONFIG_IKCONFIG`), which lets us
//! check the options the guest needs on the artifact itself rather than on a
//! file that could disagree with it.

use std::io::Read;

/// The kernel config fragment of the sandmesh guest (`vmm/guest/kernel.config`);
/// its `# required` lines are what [`missing_required`] checks.
pub const REQUIRED_FRAGMENT: &str = include_str!("../guest/kernel.config");

/// Why an image cannot be booted by the VMM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelImageError {
    #[error("kernel image is too short to be an ELF file ({0} bytes)")]
    TooShort(usize),
    #[error(
        "kernel image is not an ELF file (no \\x7fELF magic); pass an uncompressed vmlinux, not a bzImage"
    )]
    NotElf,
    #[error("kernel image is not a 64-bit little-endian ELF file")]
    Not64BitLittleEndian,
    #[error("kernel image is for ELF machine {0}, not x86-64 (62)")]
    WrongMachine(u16),
    #[error("kernel image is ELF type {0}, not an executable (2)")]
    NotExecutable(u16),
    #[error("kernel image has no embedded configuration (build it with CONFIG_IKCONFIG=y)")]
    NoEmbeddedConfig,
    #[error("kernel image's embedded configuration is corrupt: {0}")]
    CorruptEmbeddedConfig(String),
}

/// The facts of an ELF kernel image the loader relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfInfo {
    /// Entry point (a physical or virtual address; the loader resolves it).
    pub entry: u64,
    pub program_headers: u16,
}

const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

/// Check that `image` is an x86-64 ELF64 executable and return its entry point.
pub fn check_elf(image: &[u8]) -> Result<ElfInfo, KernelImageError> {
    if image.len() < 64 {
        return Err(KernelImageError::TooShort(image.len()));
    }
    if &image[..4] != b"\x7fELF" {
        return Err(KernelImageError::NotElf);
    }
    // EI_CLASS = 2 (64-bit), EI_DATA = 1 (little endian).
    if image[4] != 2 || image[5] != 1 {
        return Err(KernelImageError::Not64BitLittleEndian);
    }
    let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
    let e_type = u16_at(16);
    let e_machine = u16_at(18);
    if e_machine != EM_X86_64 {
        return Err(KernelImageError::WrongMachine(e_machine));
    }
    if e_type != ET_EXEC {
        return Err(KernelImageError::NotExecutable(e_type));
    }
    let mut entry = [0u8; 8];
    entry.copy_from_slice(&image[24..32]);
    Ok(ElfInfo {
        entry: u64::from_le_bytes(entry),
        program_headers: u16_at(56),
    })
}

/// The `.config` text embedded in a kernel image by `CONFIG_IKCONFIG`
/// (a gzip stream between the markers `IKCFG_ST` and `IKCFG_ED`).
pub fn embedded_config(image: &[u8]) -> Result<String, KernelImageError> {
    const START: &[u8] = b"IKCFG_ST";
    let start = find(image, START).ok_or(KernelImageError::NoEmbeddedConfig)? + START.len();
    let mut text = String::new();
    // The gzip stream ends by itself; reading stops at its trailer.
    flate2::read::GzDecoder::new(&image[start..])
        .read_to_string(&mut text)
        .map_err(|e| KernelImageError::CorruptEmbeddedConfig(e.to_string()))?;
    Ok(text)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One option a config fragment insists on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `CONFIG_X=value` marked `# required`.
    Set { name: String, value: String },
    /// `# CONFIG_X is not set`: must not be enabled.
    Unset { name: String },
}

/// The requirements of a config fragment: every `CONFIG_X=v # required`
/// line, and every `# CONFIG_X is not set` line.
pub fn requirements(fragment: &str) -> Vec<Requirement> {
    fragment
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                return name.starts_with("CONFIG_").then(|| Requirement::Unset {
                    name: name.to_owned(),
                });
            }
            let (setting, comment) = line.split_once('#')?;
            if comment.trim() != "required" {
                return None;
            }
            let (name, value) = setting.trim().split_once('=')?;
            Some(Requirement::Set {
                name: name.to_owned(),
                value: value.to_owned(),
            })
        })
        .collect()
}

/// The requirements of `fragment` that `config` (a full `.config`) breaks,
/// each described in a line.
pub fn missing_required(fragment: &str, config: &str) -> Vec<String> {
    let value_of = |name: &str| {
        config.lines().find_map(|l| {
            let (n, v) = l.split_once('=')?;
            (n == name).then(|| v.to_owned())
        })
    };
    requirements(fragment)
        .into_iter()
        .filter_map(|req| match req {
            Requirement::Set { name, value } => match value_of(&name) {
                Some(v) if v == value => None,
                Some(v) => Some(format!("{name}={v}, but {value} is required")),
                None => Some(format!("{name} is not set, but {value} is required")),
            },
            Requirement::Unset { name } => match value_of(&name) {
                Some(v) if v != "n" => Some(format!("{name}={v}, but it must not be set")),
                _ => None,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_header(class: u8, machine: u16, kind: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[16..18].copy_from_slice(&kind.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[24..32].copy_from_slice(&0x0100_0000u64.to_le_bytes());
        h[56..58].copy_from_slice(&5u16.to_le_bytes());
        h
    }

    #[test]
    fn accepts_an_x86_64_executable() {
        let info = check_elf(&elf_header(2, 62, 2)).unwrap();
        assert_eq!(
            info,
            ElfInfo {
                entry: 0x0100_0000,
                program_headers: 5
            }
        );
    }

    #[test]
    fn rejects_what_cannot_be_booted() {
        assert_eq!(check_elf(b"\x7fELF"), Err(KernelImageError::TooShort(4)));
        let mut bz = elf_header(2, 62, 2);
        bz[..4].copy_from_slice(b"MZ\0\0");
        assert_eq!(check_elf(&bz), Err(KernelImageError::NotElf));
        assert_eq!(
            check_elf(&elf_header(1, 62, 2)),
            Err(KernelImageError::Not64BitLittleEndian)
        );
        assert_eq!(
            check_elf(&elf_header(2, 183, 2)),
            Err(KernelImageError::WrongMachine(183))
        );
        assert_eq!(
            check_elf(&elf_header(2, 62, 3)),
            Err(KernelImageError::NotExecutable(3))
        );
    }

    #[test]
    fn extracts_the_embedded_config() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"CONFIG_VIRTIO=y\n").unwrap();
        let mut image = b"junk...IKCFG_ST".to_vec();
        image.extend(gz.finish().unwrap());
        image.extend(b"IKCFG_ED more junk");
        assert_eq!(embedded_config(&image).unwrap(), "CONFIG_VIRTIO=y\n");
        assert_eq!(
            embedded_config(b"no config here"),
            Err(KernelImageError::NoEmbeddedConfig)
        );
        assert!(matches!(
            embedded_config(b"IKCFG_STnot gzip"),
            Err(KernelImageError::CorruptEmbeddedConfig(_))
        ));
    }

    #[test]
    fn checks_required_and_forbidden_options() {
        let fragment = "# comment\nCONFIG_A=y # required\nCONFIG_B=y\nCONFIG_N=32 # required\n# CONFIG_MODULES is not set\n";
        assert_eq!(requirements(fragment).len(), 3);
        let good = "CONFIG_A=y\nCONFIG_N=32\n# CONFIG_MODULES is not set\n";
        assert!(missing_required(fragment, good).is_empty());
        let bad = "CONFIG_N=64\nCONFIG_MODULES=y\n";
        assert_eq!(
            missing_required(fragment, bad),
            [
                "CONFIG_A is not set, but y is required",
                "CONFIG_N=64, but 32 is required",
                "CONFIG_MODULES=y, but it must not be set",
            ]
        );
    }

    #[test]
    fn the_checked_in_fragment_has_requirements() {
        let reqs = requirements(REQUIRED_FRAGMENT);
        for needed in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_IKCONFIG",
        ] {
            assert!(
                reqs.iter()
                    .any(|r| matches!(r, Requirement::Set { name, .. } if name == needed)),
                "{needed} is not marked required"
            );
        }
    }
}
