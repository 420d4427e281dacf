//! Directory watches on inotify, for `WatchDir` (streamed) and
//! `CreateWatcher` (polled).
//!
//! Events are mapped as fsnotify (which upstream envd uses) maps them:
//! create/moved-to → CREATE, moved-from → RENAME, attrib → CHMOD,
//! modify → WRITE, delete → REMOVE; `name` is relative to the watched
//! directory. A recursive watch adds every subdirectory, including ones
//! created (or moved in) later, and reports what a new directory already
//! holds when its watch is added (so a quick `mkdir d && touch d/f` is seen).
//!
//! An upload that replaces a file writes a temporary file beside it and
//! renames it over the file (so readers never see it half written; see
//! `files.rs`). Upstream writes in place, so its watchers see only events
//! of the file's own name: here the temporary file's events are hidden and
//! its rename over the file is reported as a WRITE of the file.
//! Entries go only with CREATE, WRITE and CHMOD (as upstream: the path of a
//! REMOVE or RENAME may already hold another file).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::ffi::OsString;
use std::io;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use schema::envd::filesystem::{EventType, FilesystemEvent};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use super::entry::{Names, entry_info};
use super::metadata::MetadataStore;
use crate::connect::ConnectError;
use crate::files::is_upload_temp;
use crate::paths::Root;

/// What to watch.
pub struct Spec {
    pub root: Root,
    /// For the metadata of event entries.
    pub metadata: Arc<MetadataStore>,
    /// The watched directory, as a guest path and as a host path.
    pub guest: PathBuf,
    pub host: PathBuf,
    pub recursive: bool,
    pub include_entry: bool,
}

/// Where events go: a stream (waits for the reader) or a poll buffer
/// (`lossy`: drops events while the buffer is full).
pub struct Sink {
    pub tx: mpsc::Sender<FilesystemEvent>,
    pub lossy: bool,
}

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// Set the watches up (blocking: it walks the tree when recursive).
pub fn setup(spec: &Spec) -> Result<(Inotify, HashMap<WatchDescriptor, PathBuf>), ConnectError> {
    let inotify = Inotify::init()
        .map_err(|e| ConnectError::internal(format!("creating an inotify instance: {e}")))?;
    let mut watches = inotify.watches();
    let mut dirs = HashMap::new();
    let wd = watches
        .add(&spec.host, mask() | WatchMask::ONLYDIR)
        .map_err(|e| ConnectError::from_io(&e, &spec.guest.display().to_string()))?;
    dirs.insert(wd, spec.host.clone());
    if spec.recursive {
        add_tree(&mut watches, &mut dirs, &spec.host, &mut |_| {});
    }
    Ok((inotify, dirs))
}

/// Watch every directory below `dir` (not following symlinks); `found` is
/// called with each entry met.
fn add_tree(
    watches: &mut Watches,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    dir: &Path,
    found: &mut dyn FnMut(&Path),
) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        found(&path);
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(wd) = watches.add(&path, mask() | WatchMask::ONLYDIR | WatchMask::DONT_FOLLOW)
            {
                dirs.insert(wd, path.clone());
            }
            add_tree(watches, dirs, &path, found);
        }
    }
}

/// An inotify event, owned.
struct RawEvent {
    wd: WatchDescriptor,
    mask: EventMask,
    cookie: u32,
    name: Option<OsString>,
}

/// Every event the kernel has queued so far (the fd is non-blocking).
fn read_pending(inotify: &mut Inotify, buf: &mut [u8]) -> io::Result<Vec<RawEvent>> {
    let mut out = Vec::new();
    loop {
        match inotify.read_events(buf) {
            Ok(events) => out.extend(events.map(|e| RawEvent {
                wd: e.wd,
                mask: e.mask,
                cookie: e.cookie,
                name: e.name.map(|n| n.to_owned()),
            })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// A request to handle every event queued so far, answered when done
/// (`GetWatcherEvents` sends one, so what happened before it is in its answer).
pub type SyncRequest = oneshot::Sender<()>;

/// Run the watch until the sink's reader goes away.
pub async fn run(
    spec: Spec,
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    sink: Sink,
    mut sync: Option<mpsc::Receiver<SyncRequest>>,
) {
    let watches = inotify.watches();
    // SAFETY: the Inotify owns its fd for its whole life, and `as_raw_fd`
    // always returns that fd.
    let fd = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) };
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("registering the inotify fd: {}", e.into_parts().1);
            return;
        }
    };
    let mut w = Watcher {
        names: Names::new(&spec.root, spec.metadata.clone()),
        spec,
        watches,
        dirs,
        sink,
        dropped: 0,
        upload_renames: VecDeque::new(),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let events = tokio::select! {
            _ = w.sink.tx.closed() => return,
            req = async { sync.as_mut()?.recv().await }, if sync.is_some() => {
                let Some(reply) = req else {
                    sync = None;
                    continue;
                };
                let events = read_pending(fd.get_mut(), &mut buf);
                let done = match events {
                    Ok(events) => w.handle_all(events).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(());
                done
            }
            guard = fd.readable_mut() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!("waiting for inotify events: {e}");
                        return;
                    }
                };
                let events = read_pending(guard.get_inner_mut(), &mut buf);
                guard.clear_ready();
                match events {
                    Ok(events) => w.handle_all(events).await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = events {
            if e.kind() != io::ErrorKind::BrokenPipe {
                tracing::warn!(dir = %w.spec.guest.display(), "watch ended: {e}");
            }
            return;
        }
    }
}

struct Watcher {
    spec: Spec,
    watches: Watches,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    names: Names,
    sink: Sink,
    dropped: u64,
    /// Cookies of upload temporaries moved away (a few are plenty: the
    /// MOVED_TO of a rename follows its MOVED_FROM).
    upload_renames: VecDeque<u32>,
}

/// Upload cookies remembered at most.
const UPLOAD_RENAMES_KEPT: usize = 64;

impl Watcher {
    /// Map and deliver events; `BrokenPipe` once the reader is gone.
    async fn handle_all(&mut self, events: Vec<RawEvent>) -> io::Result<()> {
        for ev in events {
            for (path, ty) in self.map(ev) {
                self.emit(path, ty).await?;
            }
        }
        Ok(())
    }

    /// What one inotify event means, as (host path, type) pairs.
    fn map(&mut self, ev: RawEvent) -> Vec<(PathBuf, EventType)> {
        let m = ev.mask;
        if m.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!(dir = %self.spec.guest.display(), "inotify queue overflowed; events were lost");
            return Vec::new();
        }
        if m.contains(EventMask::IGNORED) {
            self.dirs.remove(&ev.wd);
            return Vec::new();
        }
        let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
            return Vec::new();
        };
        let host = match &ev.name {
            Some(n) => dir.join(n),
            // Events about a watched directory itself: its parent's watch
            // reports them, except for the watched directory.
            None if dir == self.spec.host => dir,
            None => return Vec::new(),
        };
        if ev.name.as_deref().is_some_and(is_upload_temp) {
            // An upload's temporary file: hidden, but its rename over the
            // uploaded file is that file's WRITE.
            if m.contains(EventMask::MOVED_FROM) {
                if self.upload_renames.len() == UPLOAD_RENAMES_KEPT {
                    self.upload_renames.pop_front();
                }
                self.upload_renames.push_back(ev.cookie);
            }
            return Vec::new();
        }
        if m.contains(EventMask::MOVED_TO)
            && let Some(i) = self.upload_renames.iter().position(|c| *c == ev.cookie)
        {
            self.upload_renames.remove(i);
            return vec![(host, EventType::Write)];
        }
        let mut types = Vec::new();
        if m.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            types.push(EventType::Create);
        }
        if m.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
            types.push(EventType::Rename);
        }
        if m.contains(EventMask::ATTRIB) {
            types.push(EventType::Chmod);
        }
        if m.contains(EventMask::MODIFY) {
            types.push(EventType::Write);
        }
        if m.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
            types.push(EventType::Remove);
        }
        let mut events: Vec<(PathBuf, EventType)> =
            types.into_iter().map(|t| (host.clone(), t)).collect();
        if self.spec.recursive && m.contains(EventMask::ISDIR) {
            if m.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                if let Ok(wd) = self
                    .watches
                    .add(&host, mask() | WatchMask::ONLYDIR | WatchMask::DONT_FOLLOW)
                {
                    self.dirs.insert(wd, host.clone());
                }
                add_tree(&mut self.watches, &mut self.dirs, &host, &mut |p| {
                    events.push((p.to_path_buf(), EventType::Create))
                });
            } else if m.contains(EventMask::MOVED_FROM) {
                // The moved directory's watches would report under stale paths.
                let gone: Vec<_> = self
                    .dirs
                    .iter()
                    .filter(|(_, p)| p.starts_with(&host))
                    .map(|(wd, _)| wd.clone())
                    .collect();
                for wd in gone {
                    self.dirs.remove(&wd);
                    let _ = self.watches.remove(wd);
                }
            }
        }
        events
    }

    async fn emit(&mut self, path: PathBuf, ty: EventType) -> io::Result<()> {
        let rel = path.strip_prefix(&self.spec.host).unwrap_or(&path);
        let name = if rel.as_os_str().is_empty() {
            ".".to_owned()
        } else {
            rel.display().to_string()
        };
        let carries_entry = matches!(ty, EventType::Create | EventType::Write | EventType::Chmod);
        let entry = if self.spec.include_entry && carries_entry {
            let guest = self.spec.guest.join(rel);
            entry_info(&self.spec.root, &mut self.names, &guest, &path).ok()
        } else {
            None
        };
        let event = FilesystemEvent {
            name,
            r#type: ty as i32,
            entry,
        };
        let gone = || io::Error::from(io::ErrorKind::BrokenPipe);
        if self.sink.lossy {
            match self.sink.tx.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped += 1;
                    if self.dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped = self.dropped,
                            "watcher buffer full; dropping events"
                        );
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone()),
            }
        } else if self.sink.tx.send(event).await.is_err() {
            return Err(gone());
        }
        Ok(())
    }
}
