//! A copy-on-write disk: a read-only base image and a per-VM sparse
//! overlay.
//!
//! - The base (the template's root filesystem, shared by every sandbox) is
//!   opened `O_RDONLY` and never written.
//! - The overlay is a sparse file of the image's size; cluster `i`
//!   ([`CLUSTER_SIZE`] bytes) lives at the same offset as in the base, so an
//!   overlay holds only the clusters the guest wrote.
//! - A bitmap says which clusters are in the overlay. It is kept in memory
//!   and written by [`CowDisk::flush`] (the guest's FLUSH) to a sidecar
//!   `<overlay>.map` — atomically: a temporary file, fsync, rename — after
//!   the overlay's data is synced. A crash therefore loses at most the
//!   writes since the last flush, which is what a disk without a flush may
//!   do; it never exposes a cluster marked present whose data is not there.
//! - A write that covers a whole cluster goes straight to the overlay; a
//!   partial write to a cluster not yet in the overlay first copies that
//!   cluster from the base.
//!
//! Sidecar format (little-endian): magic `SMCOWMAP`, version `u32`,
//! cluster size `u32`, image size `u64`, then the bitmap as `u64` words.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::BlockBackend;

/// Overlay granularity.
pub const CLUSTER_SIZE: u64 = 4096;
const MAP_MAGIC: &[u8; 8] = b"SMCOWMAP";
const MAP_VERSION: u32 = 1;
const MAP_HEADER_LEN: usize = 8 + 4 + 4 + 8;

/// Errors opening a copy-on-write disk.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("cannot open base image {path}: {source}")]
    Base { path: PathBuf, source: io::Error },
    #[error("base image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    BaseSize { path: PathBuf, size: u64 },
    #[error("cannot open overlay {path}: {source}")]
    Overlay { path: PathBuf, source: io::Error },
    #[error("cannot read overlay map {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("overlay map {path} does not match the base image: {reason}")]
    MapMismatch { path: PathBuf, reason: &'static str },
}

/// Where an overlay lives: the overlay file and its cluster map. This is
/// what a snapshot records to find the disk again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CowPaths {
    pub base: PathBuf,
    pub overlay: PathBuf,
    pub map: PathBuf,
}

impl CowPaths {
    /// The map beside the overlay: `<overlay>.map`.
    pub fn new(base: impl Into<PathBuf>, overlay: impl Into<PathBuf>) -> Self {
        let overlay = overlay.into();
        let mut map = overlay.clone().into_os_string();
        map.push(".map");
        Self {
            base: base.into(),
            overlay,
            map: map.into(),
        }
    }
}

/// A base image plus a sparse overlay.
#[derive(Debug)]
pub struct CowDisk {
    paths: CowPaths,
    base: File,
    overlay: File,
    size: u64,
    /// One bit per cluster: set when the cluster is in the overlay.
    bitmap: Vec<u64>,
    /// The bitmap changed since the last flush.
    dirty: bool,
}

fn clusters(size: u64) -> u64 {
    size.div_ceil(CLUSTER_SIZE)
}

impl CowDisk {
    fn open_base(path: &Path) -> Result<(File, u64), CowError> {
        let base = File::open(path).map_err(|source| CowError::Base {
            path: path.to_owned(),
            source,
        })?;
        let size = base
            .metadata()
            .map_err(|source| CowError::Base {
                path: path.to_owned(),
                source,
            })?
            .len();
        if !size.is_multiple_of(512) {
            return Err(CowError::BaseSize {
                path: path.to_owned(),
                size,
            });
        }
        Ok((base, size))
    }

    /// A fresh, empty overlay over `paths.base` (an existing overlay and
    /// map at those paths are replaced).
    pub fn create(paths: CowPaths) -> Result<Self, CowError> {
        let (base, size) = Self::open_base(&paths.base)?;
        let overlay_err = |source| CowError::Overlay {
            path: paths.overlay.clone(),
            source,
        };
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&paths.overlay)
            .map_err(overlay_err)?;
        overlay.set_len(size).map_err(overlay_err)?;
        let words = clusters(size).div_ceil(64) as usize;
        let mut disk = Self {
            paths,
            base,
            overlay,
            size,
            bitmap: vec![0; words],
            dirty: true,
        };
        disk.write_map().map_err(|source| CowError::Map {
            path: disk.paths.map.clone(),
            source,
        })?;
        Ok(disk)
    }

    /// An existing overlay and its map (after a restart or a snapshot
    /// restore).
    pub fn open(paths: CowPaths) -> Result<Self, CowError> {
        let (base, size) = Self::open_base(&paths.base)?;
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths.overlay)
            .map_err(|source| CowError::Overlay {
                path: paths.overlay.clone(),
                source,
            })?;
        let map_err = |source| CowError::Map {
            path: paths.map.clone(),
            source,
        };
        let mismatch = |reason| CowError::MapMismatch {
            path: paths.map.clone(),
            reason,
        };
        let mut raw = Vec::new();
        File::open(&paths.map)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(map_err)?;
        let words = clusters(size).div_ceil(64) as usize;
        if raw.len() != MAP_HEADER_LEN + 8 * words {
            return Err(mismatch("wrong length"));
        }
        let (header, body) = raw.split_at(MAP_HEADER_LEN);
        if &header[0..8] != MAP_MAGIC {
            return Err(mismatch("bad magic"));
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&header[r]);
            u64::from_le_bytes(b)
        };
        if word(8..12) != u64::from(MAP_VERSION) {
            return Err(mismatch("unknown version"));
        }
        if word(12..16) != CLUSTER_SIZE {
            return Err(mismatch("different cluster size"));
        }
        if word(16..24) != size {
            return Err(mismatch("different image size"));
        }
        let overlay_len = overlay
            .metadata()
            .map_err(|source| CowError::Overlay {
                path: paths.overlay.clone(),
                source,
            })?
            .len();
        if overlay_len != size {
            return Err(mismatch("overlay has a different size"));
        }
        let bitmap = body
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Self {
            paths,
            base,
            overlay,
            size,
            bitmap,
            dirty: false,
        })
    }

    pub fn paths(&self) -> &CowPaths {
        &self.paths
    }

    /// Clusters held by the overlay.
    pub fn overlay_clusters(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn present(&self, cluster: u64) -> bool {
        self.bitmap
            .get((cluster / 64) as usize)
            .is_some_and(|w| w & (1 << (cluster % 64)) != 0)
    }

    fn mark(&mut self, cluster: u64) {
        if let Some(w) = self.bitmap.get_mut((cluster / 64) as usize) {
            *w |= 1 << (cluster % 64);
            self.dirty = true;
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access beyond the end of the disk",
            )),
        }
    }

    /// Write the bitmap to the sidecar, atomically.
    fn write_map(&mut self) -> io::Result<()> {
        let mut raw = Vec::with_capacity(MAP_HEADER_LEN + 8 * self.bitmap.len());
        raw.extend_from_slice(MAP_MAGIC);
        raw.extend_from_slice(&MAP_VERSION.to_le_bytes());
        raw.extend_from_slice(&(CLUSTER_SIZE as u32).to_le_bytes());
        raw.extend_from_slice(&self.size.to_le_bytes());
        for w in &self.bitmap {
            raw.extend_from_slice(&w.to_le_bytes());
        }
        let mut tmp = self.paths.map.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp)?;
        f.write_all(&raw)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.paths.map)?;
        if let Some(dir) = self
            .paths
            .map
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            // Make the rename itself durable.
            File::open(dir)?.sync_all()?;
        }
        self.dirty = false;
        Ok(())
    }
}

impl BlockBackend for CowDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let cluster = pos / CLUSTER_SIZE;
            let in_cluster = (CLUSTER_SIZE - pos % CLUSTER_SIZE) as usize;
            let n = in_cluster.min(buf.len() - done);
            let file = if self.present(cluster) {
                &self.overlay
            } else {
                &self.base
            };
            file.read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let cluster = pos / CLUSTER_SIZE;
            let start = cluster * CLUSTER_SIZE;
            // The last cluster may be short.
            let end = (start + CLUSTER_SIZE).min(self.size);
            let n = ((end - pos) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            if self.present(cluster) || (pos == start && pos + n as u64 == end) {
                self.overlay.write_all_at(data, pos)?;
            } else {
                // Copy-on-write: the whole cluster from the base, patched.
                let mut whole = vec![0u8; (end - start) as usize];
                self.base.read_exact_at(&mut whole, start)?;
                let at = (pos - start) as usize;
                whole[at..at + n].copy_from_slice(data);
                self.overlay.write_all_at(&whole, start)?;
            }
            self.mark(cluster);
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.overlay.sync_data()?;
        if self.dirty {
            self.write_map()?;
        }
        Ok(())
    }

    fn cow_paths(&self) -> Option<&CowPaths> {
        Some(&self.paths)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// xorshift64*: a small seeded generator for property-style tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sandmesh-cow-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn make_base(dir: &Path, size: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let mut rng = Rng(seed);
        let data: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
        let path = dir.join("base.img");
        std::fs::write(&path, &data).expect("base");
        (path, data)
    }

    #[test]
    fn random_reads_and_writes_match_a_model() {
        let dir = temp_dir("model");
        // 10.5 clusters: the last cluster is short.
        let size = 10 * CLUSTER_SIZE as usize + 2048;
        let (base_path, mut model) = make_base(&dir, size, 7);
        let base_before = std::fs::metadata(&base_path).expect("meta");
        let base_bytes = model.clone();
        let paths = CowPaths::new(&base_path, dir.join("overlay"));
        let mut disk = CowDisk::create(paths.clone()).expect("create");
        assert_eq!(disk.size(), size as u64);
        let mut rng = Rng(0x5eed);
        for round in 0..2000 {
            let len = 1 + rng.below(3 * CLUSTER_SIZE) as usize;
            let len = len.min(size);
            let off = rng.below((size - len + 1) as u64) as usize;
            if rng.below(2) == 0 {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                disk.write_at(off as u64, &data).expect("write");
                model[off..off + len].copy_from_slice(&data);
            } else {
                let mut got = vec![0u8; len];
                disk.read_at(off as u64, &mut got).expect("read");
                assert_eq!(got, model[off..off + len], "round {round} at {off}+{len}");
            }
            if round % 500 == 499 {
                disk.flush().expect("flush");
            }
        }
        // Out of range: refused, nothing written.
        assert!(disk.write_at(size as u64 - 1, &[0, 0]).is_err());
        assert!(disk.read_at(u64::MAX, &mut [0]).is_err());
        disk.flush().expect("flush");
        drop(disk);

        // Reopened from the overlay and its map: the same bytes.
        let mut disk = CowDisk::open(paths).expect("open");
        let mut all = vec![0u8; size];
        disk.read_at(0, &mut all).expect("read all");
        assert_eq!(all, model);

        // The base is untouched, contents and mtime.
        assert_eq!(std::fs::read(&base_path).expect("base"), base_bytes);
        let base_after = std::fs::metadata(&base_path).expect("meta");
        assert_eq!(base_before.mtime(), base_after.mtime());
        assert_eq!(base_before.mtime_nsec(), base_after.mtime_nsec());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn overlay_stays_sparse_for_a_small_write() {
        let dir = temp_dir("sparse");
        let base_path = dir.join("base.img");
        let size = 256u64 << 20;
        // A large sparse base; its content is zeros.
        File::create(&base_path)
            .and_then(|f| f.set_len(size))
            .expect("base");
        let paths = CowPaths::new(&base_path, dir.join("overlay"));
        let mut disk = CowDisk::create(paths.clone()).expect("create");
        disk.write_at(100 << 20, b"hello").expect("write");
        disk.flush().expect("flush");
        assert_eq!(disk.overlay_clusters(), 1);
        let meta = std::fs::metadata(&paths.overlay).expect("meta");
        assert_eq!(meta.len(), size);
        // st_blocks counts 512-byte units: a few pages at most.
        assert!(meta.blocks() * 512 <= 64 * 1024, "{} blocks", meta.blocks());
        let mut got = [0u8; 7];
        disk.read_at((100 << 20) - 1, &mut got).expect("read");
        assert_eq!(&got, b"\0hello\0");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unflushed_clusters_revert_to_the_base_and_bad_maps_are_refused() {
        let dir = temp_dir("map");
        let (base_path, base) = make_base(&dir, 4 * CLUSTER_SIZE as usize, 3);
        let paths = CowPaths::new(&base_path, dir.join("overlay"));
        let mut disk = CowDisk::create(paths.clone()).expect("create");
        disk.write_at(0, &[1; 10]).expect("write");
        disk.flush().expect("flush");
        disk.write_at(CLUSTER_SIZE, &[2; 10]).expect("write");
        drop(disk); // no flush: the second write's cluster is not mapped
        let mut disk = CowDisk::open(paths.clone()).expect("open");
        let mut got = vec![0u8; 2 * CLUSTER_SIZE as usize];
        disk.read_at(0, &mut got).expect("read");
        assert_eq!(got[..10], [1; 10]);
        assert_eq!(got[10..], base[10..2 * CLUSTER_SIZE as usize]);
        drop(disk);

        // A map for another image size.
        let mut raw = std::fs::read(&paths.map).expect("map");
        raw[16] ^= 1;
        std::fs::write(&paths.map, &raw).expect("map");
        assert!(matches!(
            CowDisk::open(paths.clone()),
            Err(CowError::MapMismatch { .. })
        ));
        std::fs::write(&paths.map, &raw[..5]).expect("map");
        assert!(matches!(
            CowDisk::open(paths),
            Err(CowError::MapMismatch { .. })
        ));
        // A base that is not whole sectors.
        std::fs::write(dir.join("odd"), [0u8; 1000]).expect("odd");
        assert!(matches!(
            CowDisk::create(CowPaths::new(dir.join("odd"), dir.join("o2"))),
            Err(CowError::BaseSize { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
