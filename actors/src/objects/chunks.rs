//! Chunks: the unit of storage and of deduplication.
//!
//! A chunk is named by the SHA-256 of its *uncompressed* bytes, so the same
//! 4 MiB of guest memory has one name whatever the zstd level or version
//! that compressed it, and a reader can check every byte it restores
//! against the name it asked for. It is stored zstd-compressed.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::manifest::{Entry, Manifest};

/// Size of every chunk but a file's last. 4 MiB: big enough that a 512 MiB
/// memory file is 128 requests, small enough that a changed page uploads
/// little and eight chunks in flight stay under 64 MiB of memory.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// zstd's default level: on guest memory it is several times faster than
/// the upload it saves, and decompression speed hardly depends on it.
const ZSTD_LEVEL: i32 = 3;

/// The name of a chunk: SHA-256 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// The name of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Parse 64 lowercase hex digits, the form used in object names and
    /// manifests. Uppercase is refused so that one chunk has one name.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut id = [0u8; 32];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(Self(id))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::from_hex(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("chunk id {text:?} is not 64 lowercase hex digits"))
        })
    }
}

/// Chunks known to be in the store already, so an upload need not ask the
/// store about them: the chunks of the manifests the new snapshot most
/// likely shares memory with (its template's snapshot, earlier snapshots of
/// the same sandbox). A chunk in here is trusted to exist — the caller keeps
/// those manifests (and so, through GC, their chunks) alive for the upload.
#[derive(Debug, Default, Clone)]
pub struct KnownChunks(HashSet<ChunkId>);

impl KnownChunks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every chunk some file of `manifests` refers to.
    pub fn from_manifests<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> Self {
        let mut known = Self::new();
        for manifest in manifests {
            known.add_manifest(manifest);
        }
        known
    }

    pub fn add_manifest(&mut self, manifest: &Manifest) {
        self.0.extend(manifest_chunks(manifest));
    }

    pub fn insert(&mut self, id: ChunkId) {
        self.0.insert(id);
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.0.contains(id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The (non-zero) chunks a manifest refers to, with repeats.
pub(crate) fn manifest_chunks(manifest: &Manifest) -> impl Iterator<Item = ChunkId> + '_ {
    manifest.entries.iter().flat_map(|entry| match entry {
        Entry::File { chunks, .. } => chunks.iter().flatten().copied().collect::<Vec<_>>(),
        Entry::Dir { .. } => Vec::new(),
    })
}

/// Whether `data` is all zero bytes: such chunks are recorded, never
/// stored, and restored as holes.
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in u128 words: this runs over every byte of a memory file.
    // SAFETY: any bit pattern is a valid u128.
    let (head, words, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The stored form of a chunk.
pub(crate) fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(data, ZSTD_LEVEL)
}

/// Why a stored chunk could not be turned back into its bytes. Every case
/// means the object is not what its name promises.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("not a zstd frame of at most {limit} bytes: {source}")]
    Zstd { limit: u64, source: std::io::Error },
    #[error("it holds {got} bytes where {expected} were expected")]
    Length { got: u64, expected: u64 },
    #[error("its bytes hash to {got}")]
    Hash { got: ChunkId },
}

/// Decompress a stored chunk that must hold `expected_len` bytes named
/// `id`. The output buffer is bounded by `expected_len`, so a hostile or
/// corrupt object cannot make us allocate more than a chunk.
pub(crate) fn decode(
    id: &ChunkId,
    stored: &[u8],
    expected_len: u64,
) -> Result<Vec<u8>, DecodeError> {
    let limit = usize::try_from(expected_len).unwrap_or(usize::MAX);
    let data = zstd::bulk::decompress(stored, limit).map_err(|source| DecodeError::Zstd {
        limit: expected_len,
        source,
    })?;
    if data.len() as u64 != expected_len {
        return Err(DecodeError::Length {
            got: data.len() as u64,
            expected: expected_len,
        });
    }
    let got = ChunkId::of(&data);
    if got != *id {
        return Err(DecodeError::Hash { got });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex_and_refuse_other_spellings() {
        let id = ChunkId::of(b"hello");
        assert_eq!(
            id.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex(&id.to_hex().to_uppercase()), None);
        assert_eq!(ChunkId::from_hex(&id.to_hex()[1..]), None);
        assert_eq!(ChunkId::from_hex(&format!("{}0", id.to_hex())), None);
        assert_eq!(ChunkId::from_hex(&"g".repeat(64)), None);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ChunkId>("\"../../etc\"").is_err());
    }

    #[test]
    fn zero_detection_checks_every_byte_whatever_the_alignment() {
        let mut buf = vec![0u8; 4099];
        for start in 0..3 {
            assert!(is_zero(&buf[start..]));
        }
        for pos in [0, 1, 15, 16, 2048, 4097, 4098] {
            buf[pos] = 1;
            for start in 0..=1 {
                if pos >= start {
                    assert!(!is_zero(&buf[start..]), "byte {pos} from {start}");
                }
            }
            buf[pos] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn decode_checks_frame_length_and_hash() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id = ChunkId::of(&data);
        let stored = compress(&data).unwrap();
        assert_eq!(decode(&id, &stored, data.len() as u64).unwrap(), data);

        // Not zstd at all.
        assert!(matches!(
            decode(&id, b"garbage", data.len() as u64),
            Err(DecodeError::Zstd { .. })
        ));
        // More bytes than the manifest allows: refused without allocating them.
        assert!(matches!(
            decode(&id, &stored, 10),
            Err(DecodeError::Zstd { .. })
        ));
        // Fewer bytes than expected.
        assert!(matches!(
            decode(&id, &stored, data.len() as u64 + 1),
            Err(DecodeError::Length { .. })
        ));
        // Right length, other bytes.
        let mut other = data.clone();
        other[7] ^= 1;
        let err = decode(&id, &compress(&other).unwrap(), data.len() as u64).unwrap_err();
        assert!(matches!(err, DecodeError::Hash { got } if got == ChunkId::of(&other)));
    }
}
