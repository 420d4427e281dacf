//! Chunks: the unit of storage and of deduplication.
//!
//! Files are cut at content-defined boundaries (FastCDC, 2020 variant): a
//! cut falls where a rolling hash of the last bytes matches a mask, so it
//! depends on the bytes around it, not on its offset. Bytes inserted or
//! removed early in a file (a gVisor checkpoint is a packed stream whose
//! sections change size from one pause to the next) move the cuts near the
//! change only; later chunks keep their bytes and so their names. Fixed
//! 4 MiB chunks shared nothing between two such checkpoints.
//!
//! A chunk is named by the SHA-256 of its *uncompressed* bytes, so the same
//! bytes of guest memory have one name whatever the zstd level or version
//! that compressed them, and a reader can check every byte it restores
//! against the name it asked for. It is stored zstd-compressed.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;

use fastcdc::v2020::FastCDC;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::manifest::{ChunkRef, Entry, Manifest};

/// Smallest chunk but a file's last. Below this the rolling hash is not
/// even consulted, which bounds the request count: no run of bytes can
/// make an upload send more than one chunk per 256 KiB.
pub const CHUNK_MIN: u32 = 256 << 10;
/// The size cuts aim for. The granularity of deduplication: a change
/// costs about two chunks, ~2 MiB, where fixed 4 MiB chunks cost 4 MiB and
/// an insertion cost the whole rest of the file. Smaller would dedup finer
/// but multiply requests (each a round trip to S3) and manifest entries;
/// 1 MiB keeps a 512 MiB memory file at ~512 requests at most, and its
/// zero regions, which are never stored, cost none.
pub const CHUNK_AVG: u32 = 1 << 20;
/// Largest chunk. A run of bytes that never matches the mask (zeros do
/// not) is cut here, so a zero region becomes 4 MiB zero chunks. Also the
/// memory bound: a reader decompresses a chunk into a buffer of at most
/// this size, and eight chunks in flight stay under 64 MiB.
pub const CHUNK_MAX: u32 = 4 << 20;

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
        Entry::File { chunks, .. } => chunks.iter().filter_map(|c| c.id).collect::<Vec<_>>(),
        _ => Vec::new(),
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

/// Cut the first `size` bytes of `file` into content-defined chunks and
/// name them: the first pass of an upload. Zero chunks get no name. The
/// whole file is read (holes as zeros) with `pread`, so the upload's own
/// reads need no shared position and a file that grew since it was
/// scanned is cut at its scanned size. Memory: one window of
/// 2 × [`CHUNK_MAX`], whatever the file size.
///
/// The chunker is `fastcdc`'s slice `FastCDC::cut`, over the window, not
/// its `StreamCDC`: that one copies every chunk out byte by byte in
/// generic code, which is compiled at the caller's (debug) optimization
/// level and made a 64 MiB file take most of a second in tests. A cut is
/// asked for only with [`CHUNK_MAX`] bytes ahead of it (or the range's
/// end), since `cut` never looks further: the cuts are those of each data
/// range as one stream. Holes of at least [`HOLE_MIN`] are zero chunks of
/// up to [`CHUNK_MAX`], never read.
///
/// A file shorter than `size` (it shrank since it was scanned) is an
/// `UnexpectedEof` error.
pub(crate) fn cut_file(file: &File, size: u64) -> std::io::Result<Vec<ChunkRef>> {
    let mut refs = Vec::new();
    for (start, end, data) in extents(file, size)? {
        if data {
            cut_range(file, start, end, &mut refs)?;
        } else {
            // A hole: zero chunks, nothing read.
            let mut left = end - start;
            while left > 0 {
                let len = left.min(u64::from(CHUNK_MAX));
                refs.push(ChunkRef { id: None, len });
                left -= len;
            }
        }
    }
    Ok(refs)
}

/// Holes shorter than this are read as zeros with the data around them,
/// so that content-defined cuts are not broken up by every small hole.
const HOLE_MIN: u64 = CHUNK_MAX as u64;

/// `[start, end, holds data]` ranges covering `0..size` in order: the
/// file's holes of at least [`HOLE_MIN`] (`SEEK_DATA`/`SEEK_HOLE`), so a
/// sparse memory file of a microVM costs reads of what it holds only.
/// One data range where the file system cannot tell.
fn extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let Ok(pos) = libc::off_t::try_from(pos) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor this File owns; no memory involved.
        let r = unsafe { libc::lseek(fd, pos, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            // No data after `pos`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    };
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s.min(size),
            Ok(None) => break,
            // The file system keeps no holes: all data.
            Err(_) => return Ok(vec![(0, size, true)]),
        };
        let end = match seek(start, libc::SEEK_HOLE) {
            Ok(Some(e)) => e.min(size),
            Ok(None) | Err(_) => size,
        };
        if end <= start {
            break;
        }
        match data.last_mut() {
            Some(last) if start - last.1 < HOLE_MIN => last.1 = end,
            _ => data.push((start, end)),
        }
        pos = end;
    }
    let mut out = Vec::new();
    let mut at = 0;
    for (start, end) in data {
        // A leading hole shorter than HOLE_MIN is read too.
        let start = if at == 0 && start < HOLE_MIN {
            0
        } else {
            start
        };
        if start > at {
            out.push((at, start, false));
        }
        out.push((start, end, true));
        at = end;
    }
    if at < size {
        // A trailing hole shorter than HOLE_MIN is read with the data.
        match out.last_mut() {
            Some(last) if size - at < HOLE_MIN => last.1 = size,
            _ => out.push((at, size, false)),
        }
    }
    Ok(out)
}

/// Cut bytes `start..end` of `file` at content-defined boundaries.
fn cut_range(
    file: &File,
    start_at: u64,
    end_at: u64,
    refs: &mut Vec<ChunkRef>,
) -> std::io::Result<()> {
    const WINDOW: usize = 2 * CHUNK_MAX as usize;
    let span = end_at - start_at;
    let mut buf = vec![0u8; WINDOW.min(usize::try_from(span).unwrap_or(WINDOW))];
    // Bytes of the file before `buf[0]`; `buf[start..filled]` is not cut yet.
    let mut base = start_at;
    let (mut start, mut filled) = (0usize, 0usize);
    loop {
        // Refill: keep what is not cut yet, read up to the window or the end.
        buf.copy_within(start..filled, 0);
        base += start as u64;
        filled -= start;
        start = 0;
        while filled < buf.len() && base + (filled as u64) < end_at {
            let want = usize::try_from(end_at - base - filled as u64)
                .unwrap_or(usize::MAX)
                .min(buf.len() - filled);
            let got = file.read_at(&mut buf[filled..filled + want], base + filled as u64)?;
            if got == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("read {} of {end_at} bytes", base + filled as u64),
                ));
            }
            filled += got;
        }
        let at_end = base + filled as u64 == end_at;
        if start == filled {
            return Ok(());
        }
        let cdc = FastCDC::new(&buf[..filled], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        while start < filled && (at_end || filled - start >= CHUNK_MAX as usize) {
            let (_, end) = cdc.cut(start, filled - start);
            let data = &buf[start..end];
            refs.push(ChunkRef {
                id: (!is_zero(data)).then(|| ChunkId::of(data)),
                len: data.len() as u64,
            });
            start = end;
        }
    }
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
    use crate::objects::tests::noise;

    #[test]
    fn holes_are_zero_chunks_and_never_read() {
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 * MIB).unwrap();
        file.write_all_at(&noise(1, MIB as usize), 0).unwrap();
        file.write_all_at(&noise(2, MIB as usize), 40 * MIB)
            .unwrap();
        let ranges = extents(&file, 64 * MIB).unwrap();
        assert_eq!(
            ranges,
            [
                (0, MIB, true),
                (MIB, 40 * MIB, false),
                (40 * MIB, 41 * MIB, true),
                (41 * MIB, 64 * MIB, false)
            ]
        );
        let refs = cut_file(&file, 64 * MIB).unwrap();
        assert_eq!(refs.iter().map(|r| r.len).sum::<u64>(), 64 * MIB);
        let zero: u64 = refs.iter().filter(|r| r.id.is_none()).map(|r| r.len).sum();
        assert_eq!(zero, 62 * MIB);
        // The data chunks are those of the data alone.
        let data: Vec<ChunkId> = refs.iter().filter_map(|r| r.id).collect();
        let alone = tempfile::tempfile().unwrap();
        alone.write_all_at(&noise(1, MIB as usize), 0).unwrap();
        let first: Vec<ChunkId> = cut_file(&alone, MIB)
            .unwrap()
            .iter()
            .filter_map(|r| r.id)
            .collect();
        assert_eq!(data[..first.len()], first[..]);
        // A file system without holes, or a file without any: one range.
        let dense = tempfile::tempfile().unwrap();
        dense.write_all_at(&noise(3, 3 * MIB as usize), 0).unwrap();
        assert_eq!(extents(&dense, 3 * MIB).unwrap(), [(0, 3 * MIB, true)]);
        let empty = tempfile::tempfile().unwrap();
        empty.set_len(8 * MIB).unwrap();
        assert_eq!(extents(&empty, 8 * MIB).unwrap(), [(0, 8 * MIB, false)]);
    }
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

    fn cut_bytes(data: &[u8]) -> Vec<ChunkRef> {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, data).unwrap();
        cut_file(&file, data.len() as u64).unwrap()
    }

    #[test]
    fn cuts_respect_the_sizes_and_cover_the_file() {
        let data = noise(1, 20 << 20);
        let refs = cut_bytes(&data);
        assert_eq!(refs.iter().map(|r| r.len).sum::<u64>(), data.len() as u64);
        let (last, rest) = refs.split_last().unwrap();
        assert!(last.len <= u64::from(CHUNK_MAX));
        for r in rest {
            assert!(
                (u64::from(CHUNK_MIN)..=u64::from(CHUNK_MAX)).contains(&r.len),
                "{r:?}"
            );
        }
        // Around the average: neither fixed at the maximum nor tiny.
        assert!((8..=60).contains(&refs.len()), "{} chunks", refs.len());
        let mut offset = 0;
        for r in &refs {
            let bytes = &data[offset..offset + r.len as usize];
            assert_eq!(r.id, Some(ChunkId::of(bytes)));
            offset += r.len as usize;
        }
        // The same bytes, the same cuts.
        assert_eq!(cut_bytes(&data), refs);
        assert!(cut_bytes(&[]).is_empty());
    }

    #[test]
    fn the_windowed_cuts_are_those_of_fastcdc_over_the_whole_stream() {
        // Noise, a zero region, noise again: cuts in all three, and across
        // many window refills.
        let mut data = noise(5, 9 << 20);
        data.extend(std::iter::repeat_n(0u8, 11 << 20));
        data.extend(noise(6, (7 << 20) + 12345));
        let ours: Vec<u64> = cut_bytes(&data).iter().map(|r| r.len).collect();
        let reference: Vec<u64> =
            fastcdc::v2020::StreamCDC::new(&data[..], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                .map(|c| c.unwrap().length as u64)
                .collect();
        assert_eq!(ours, reference);
    }

    #[test]
    fn zeros_are_cut_at_the_maximum_and_not_named() {
        let max = u64::from(CHUNK_MAX);
        let file = tempfile::tempfile().unwrap();
        file.set_len(2 * max + 5).unwrap();
        let refs = cut_file(&file, 2 * max + 5).unwrap();
        let lens: Vec<u64> = refs.iter().map(|r| r.len).collect();
        assert_eq!(lens, [max, max, 5]);
        assert!(refs.iter().all(|r| r.id.is_none()));
    }

    #[test]
    fn an_insertion_changes_only_the_chunks_around_it() {
        let data = noise(2, 20 << 20);
        let mut inserted = data[..1000].to_vec();
        inserted.extend_from_slice(&noise(3, 100));
        inserted.extend_from_slice(&data[1000..]);
        let before: HashSet<ChunkId> = cut_bytes(&data).iter().filter_map(|r| r.id).collect();
        let after = cut_bytes(&inserted);
        let new = after
            .iter()
            .filter(|r| !before.contains(&r.id.unwrap()))
            .count();
        assert!(new <= 2, "{new} of {} chunks are new", after.len());
    }

    #[test]
    fn a_file_shorter_than_its_scanned_size_is_an_early_eof() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &noise(4, 1000)).unwrap();
        let err = cut_file(&file, 1001).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // A file that grew is cut at its scanned size.
        let refs = cut_file(&file, 999).unwrap();
        assert_eq!(refs.iter().map(|r| r.len).sum::<u64>(), 999);
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
