//! `filesystem.Filesystem`: stat, list, make, move, remove and watch paths,
//! as E2B's envd does, acting for the requesting user.
//!
//! Every path in requests and responses is a guest path; `State::root`
//! maps it to the host (the same in a guest).

pub mod access;
pub mod entry;
pub mod metadata;
mod watch;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use schema::envd::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, EntryInfo, FilesystemEvent,
    GetWatcherEventsRequest, GetWatcherEventsResponse, ListDirRequest, ListDirResponse,
    MakeDirRequest, MakeDirResponse, MoveRequest, MoveResponse, RemoveRequest, RemoveResponse,
    RemoveWatcherRequest, RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest,
    WatchDirResponse, watch_dir_response,
};
use tokio::sync::mpsc;

use self::access::{Access, R, X};
use self::entry::{Names, entry_info};
use crate::State;
use crate::connect::{self, ConnectError, Context, MessageStream};
use crate::users::User;

const SERVICE: &str = "filesystem.Filesystem";
/// Events a polled watcher keeps until `GetWatcherEvents` drains them.
const WATCHER_BUFFER: usize = 8192;
/// Events a streamed watch queues ahead of a slow reader.
const STREAM_BUFFER: usize = 256;

struct Service {
    state: Arc<State>,
    watchers: Mutex<HashMap<String, Poller>>,
}

/// A `CreateWatcher` watch: its buffered events and its task.
struct Poller {
    rx: mpsc::Receiver<FilesystemEvent>,
    sync: mpsc::Sender<watch::SyncRequest>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn router(state: Arc<State>) -> connect::Router {
    let svc = Arc::new(Service {
        state,
        watchers: Mutex::new(HashMap::new()),
    });
    let r = connect::Router::new();
    let r = unary(r, &svc, "Stat", |s, u, req: StatRequest| s.stat(u, req));
    let r = unary(r, &svc, "MakeDir", |s, u, req: MakeDirRequest| {
        s.make_dir(u, req)
    });
    let r = unary(r, &svc, "Move", |s, u, req: MoveRequest| s.move_(u, req));
    let r = unary(r, &svc, "ListDir", |s, u, req: ListDirRequest| {
        s.list_dir(u, req)
    });
    let r = unary(r, &svc, "Remove", |s, u, req: RemoveRequest| {
        s.remove(u, req)
    });
    let s = svc.clone();
    let r = r.server_stream(
        &format!("{SERVICE}/WatchDir"),
        move |ctx: Context, req: WatchDirRequest| {
            let s = s.clone();
            async move { s.watch_dir(ctx, req).await }
        },
    );
    let s = svc.clone();
    let r = r.unary(
        &format!("{SERVICE}/CreateWatcher"),
        move |ctx: Context, req: CreateWatcherRequest| {
            let s = s.clone();
            async move { s.create_watcher(ctx, req).await }
        },
    );
    let s = svc.clone();
    let r = r.unary(
        &format!("{SERVICE}/GetWatcherEvents"),
        move |_ctx: Context, req: GetWatcherEventsRequest| {
            let s = s.clone();
            async move { s.get_watcher_events(req).await }
        },
    );
    let s = svc;
    r.unary(
        &format!("{SERVICE}/RemoveWatcher"),
        move |_ctx: Context, req: RemoveWatcherRequest| {
            let s = s.clone();
            async move { s.remove_watcher(req) }
        },
    )
}

/// Register a unary method whose work is blocking filesystem calls made
/// for the request's user.
fn unary<Req, Resp>(
    r: connect::Router,
    svc: &Arc<Service>,
    method: &str,
    f: fn(&Service, &User, Req) -> Result<Resp, ConnectError>,
) -> connect::Router
where
    Req: connect::Message,
    Resp: connect::Message,
{
    let svc = svc.clone();
    r.unary(
        &format!("{SERVICE}/{method}"),
        move |ctx: Context, req: Req| {
            let svc = svc.clone();
            async move {
                let user = svc.user(&ctx)?;
                tokio::task::spawn_blocking(move || f(&svc, &user, req))
                    .await
                    .map_err(|e| ConnectError::internal(format!("filesystem task failed: {e}")))?
            }
        },
    )
}

fn io_err(e: &io::Error, guest: &Path) -> ConnectError {
    ConnectError::from_io(e, &guest.display().to_string())
}

/// A path that is not there: missing, or below something that is not a
/// directory (`os.RemoveAll` treats both as nothing to do).
fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

fn not_found(guest: &Path) -> ConnectError {
    ConnectError::not_found(format!("path {} does not exist", guest.display()))
}

impl Service {
    fn user(&self, ctx: &Context) -> Result<User, ConnectError> {
        self.state.user(ctx.basic_user()?.as_deref())
    }

    fn resolve(&self, user: &User, path: &str) -> Result<(PathBuf, PathBuf), ConnectError> {
        self.state.root.resolve(user, path)
    }

    fn names(&self) -> Names {
        Names::new(&self.state.root, self.state.metadata.clone())
    }

    fn entry(&self, guest: &Path, host: &Path) -> Result<EntryInfo, ConnectError> {
        entry_info(&self.state.root, &mut self.names(), guest, host).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                not_found(guest)
            } else {
                io_err(&e, guest)
            }
        })
    }

    fn stat(&self, user: &User, req: StatRequest) -> Result<StatResponse, ConnectError> {
        let (guest, host) = self.resolve(user, &req.path)?;
        Access::new(&self.state.root, user).traverse(&guest)?;
        Ok(StatResponse {
            entry: Some(self.entry(&guest, &host)?),
        })
    }

    fn make_dir(&self, user: &User, req: MakeDirRequest) -> Result<MakeDirResponse, ConnectError> {
        let (guest, host) = self.resolve(user, &req.path)?;
        let access = Access::new(&self.state.root, user);
        access.traverse(&guest)?;
        match std::fs::metadata(&host) {
            Ok(m) if m.is_dir() => {
                return Err(ConnectError::new(
                    connect::Code::AlreadyExists,
                    format!("directory {} already exists", guest.display()),
                ));
            }
            Ok(_) => {
                return Err(ConnectError::invalid_argument(format!(
                    "path {} already exists and is not a directory",
                    guest.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&e, &guest)),
        }
        access.ensure_dirs(&guest)?;
        Ok(MakeDirResponse {
            entry: Some(self.entry(&guest, &host)?),
        })
    }

    fn move_(&self, user: &User, req: MoveRequest) -> Result<MoveResponse, ConnectError> {
        let (src_guest, src_host) = self.resolve(user, &req.source)?;
        let (dst_guest, dst_host) = self.resolve(user, &req.destination)?;
        let access = Access::new(&self.state.root, user);
        access.traverse(&src_guest)?;
        if std::fs::symlink_metadata(&src_host).is_err() {
            return Err(not_found(&src_guest));
        }
        if src_guest == Path::new("/") {
            return Err(ConnectError::invalid_argument("cannot move /"));
        }
        access.check_unlink(&src_guest)?;
        let dst_parent = dst_guest.parent().unwrap_or(Path::new("/"));
        access.ensure_dirs(dst_parent)?;
        access.check_write_dir(dst_parent)?;
        if std::fs::symlink_metadata(&dst_host).is_ok() {
            access.check_unlink(&dst_guest)?;
        }
        let stored = self.state.metadata.before_move(&src_host);
        std::fs::rename(&src_host, &dst_host).map_err(|e| {
            ConnectError::from_io(
                &e,
                &format!("moving {} to {}", src_guest.display(), dst_guest.display()),
            )
        })?;
        // Metadata in envd's store follow the file, as xattrs do.
        if let Some(key) = stored {
            self.state.metadata.moved(&key, &dst_host);
        }
        Ok(MoveResponse {
            entry: Some(self.entry(&dst_guest, &dst_host)?),
        })
    }

    fn list_dir(&self, user: &User, req: ListDirRequest) -> Result<ListDirResponse, ConnectError> {
        let depth = req.depth.max(1);
        let (guest, host) = self.resolve(user, &req.path)?;
        let access = Access::new(&self.state.root, user);
        open_dir(&access, &guest, &host, "list")?;
        let mut names = self.names();
        let mut entries = Vec::new();
        self.walk(&access, &mut names, &guest, &host, depth, &mut entries)?;
        Ok(ListDirResponse { entries })
    }

    /// Depth-first, each directory in name order (as Go's `WalkDir`); does
    /// not follow symlinks below the listed directory.
    fn walk(
        &self,
        access: &Access,
        names: &mut Names,
        guest: &Path,
        host: &Path,
        depth: u32,
        out: &mut Vec<EntryInfo>,
    ) -> Result<(), ConnectError> {
        let rd = std::fs::read_dir(host).map_err(|e| io_err(&e, guest))?;
        let mut children: Vec<_> = rd.flatten().collect();
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let (g, h) = (guest.join(child.file_name()), child.path());
            let Ok(meta) = std::fs::symlink_metadata(&h) else {
                continue;
            };
            out.push(entry::from_metadata(&self.state.root, names, &g, &h, &meta));
            if depth > 1 && meta.is_dir() && access.allows(&meta, R | X) {
                self.walk(access, names, &g, &h, depth - 1, out)?;
            }
        }
        Ok(())
    }

    /// Remove a file or a tree. A path that does not exist is already
    /// removed: upstream's `os.RemoveAll` answers it with success, and the
    /// SDK (`files.remove`) then raises nothing.
    fn remove(&self, user: &User, req: RemoveRequest) -> Result<RemoveResponse, ConnectError> {
        let (guest, host) = self.resolve(user, &req.path)?;
        let access = Access::new(&self.state.root, user);
        access.traverse(&guest)?;
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(e) if is_missing(&e) => return Ok(RemoveResponse {}),
            Err(e) => return Err(io_err(&e, &guest)),
        };
        if guest == Path::new("/") {
            return Err(ConnectError::invalid_argument("cannot remove /"));
        }
        access.check_unlink(&guest)?;
        let stored = self.state.metadata.before_remove(&host);
        let removed = if meta.is_dir() {
            access.check_remove_tree(&guest)?;
            std::fs::remove_dir_all(&host)
        } else {
            std::fs::remove_file(&host)
        };
        match removed {
            Ok(()) => {}
            // Removed by someone else meanwhile: as good as done.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&e, &guest)),
        }
        if let Some(key) = stored {
            self.state.metadata.removed(&key);
        }
        Ok(RemoveResponse {})
    }

    /// Resolve and check a watch request, and set its watches up.
    async fn start_watch(
        self: &Arc<Self>,
        ctx: &Context,
        req: WatchDirRequest,
        sink: watch::Sink,
        sync: Option<mpsc::Receiver<watch::SyncRequest>>,
    ) -> Result<tokio::task::JoinHandle<()>, ConnectError> {
        let WatchDirRequest {
            path,
            recursive,
            include_entry,
            allow_network_mounts,
        } = req;
        let user = self.user(ctx)?;
        let svc = self.clone();
        let (spec, inotify, dirs) = tokio::task::spawn_blocking(move || {
            let (guest, host) = svc.resolve(&user, &path)?;
            let access = Access::new(&svc.state.root, &user);
            open_dir(&access, &guest, &host, "watch")?;
            if !allow_network_mounts && is_network_mount(&host) {
                return Err(ConnectError::invalid_argument(format!(
                    "cannot watch {}: it is on a network filesystem (set allow_network_mounts)",
                    guest.display()
                )));
            }
            let spec = watch::Spec {
                root: svc.state.root.clone(),
                metadata: svc.state.metadata.clone(),
                guest,
                host,
                recursive,
                include_entry,
            };
            let (inotify, dirs) = watch::setup(&spec)?;
            Ok::<_, ConnectError>((spec, inotify, dirs))
        })
        .await
        .map_err(|e| ConnectError::internal(format!("watch setup failed: {e}")))??;
        Ok(tokio::spawn(watch::run(spec, inotify, dirs, sink, sync)))
    }

    async fn watch_dir(
        self: Arc<Self>,
        ctx: Context,
        req: WatchDirRequest,
    ) -> Result<MessageStream<WatchDirResponse>, ConnectError> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let sink = watch::Sink { tx, lossy: false };
        self.start_watch(&ctx, req, sink, None).await?;
        let start = WatchDirResponse {
            event: Some(watch_dir_response::Event::Start(
                watch_dir_response::StartEvent {},
            )),
        };
        // The watch task ends when this stream (and so `rx`) is dropped.
        let events = futures_util::stream::unfold(rx, |mut rx| async move {
            let ev = rx.recv().await?;
            let msg = WatchDirResponse {
                event: Some(watch_dir_response::Event::Filesystem(ev)),
            };
            Some((Ok(msg), rx))
        });
        let events: MessageStream<WatchDirResponse> = Box::pin(events);
        let events = connect::with_keepalive(events, ctx.keepalive, || WatchDirResponse {
            event: Some(watch_dir_response::Event::Keepalive(
                watch_dir_response::KeepAlive {},
            )),
        });
        Ok(Box::pin(futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok(start)]),
            events,
        )))
    }

    async fn create_watcher(
        self: Arc<Self>,
        ctx: Context,
        req: CreateWatcherRequest,
    ) -> Result<CreateWatcherResponse, ConnectError> {
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
        let sink = watch::Sink { tx, lossy: true };
        let (sync, sync_rx) = mpsc::channel(4);
        let task = self
            .start_watch(&ctx, as_watch_request(req), sink, Some(sync_rx))
            .await?;
        let id = watcher_id()?;
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Poller { rx, sync, task });
        Ok(CreateWatcherResponse { watcher_id: id })
    }

    async fn get_watcher_events(
        &self,
        req: GetWatcherEventsRequest,
    ) -> Result<GetWatcherEventsResponse, ConnectError> {
        let not_found =
            || ConnectError::not_found(format!("watcher {:?} not found", req.watcher_id));
        // Have the watch handle what the kernel queued so far: an event of a
        // change made before this call is in its answer.
        let sync = {
            let watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            watchers
                .get(&req.watcher_id)
                .ok_or_else(not_found)?
                .sync
                .clone()
        };
        let (reply, done) = tokio::sync::oneshot::channel();
        if sync.send(reply).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), done).await;
        }
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let poller = watchers.get_mut(&req.watcher_id).ok_or_else(|| {
            ConnectError::not_found(format!("watcher {:?} not found", req.watcher_id))
        })?;
        let mut events = Vec::new();
        while let Ok(ev) = poller.rx.try_recv() {
            events.push(ev);
        }
        Ok(GetWatcherEventsResponse { events })
    }

    fn remove_watcher(
        &self,
        req: RemoveWatcherRequest,
    ) -> Result<RemoveWatcherResponse, ConnectError> {
        let removed = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.watcher_id);
        match removed {
            Some(_) => Ok(RemoveWatcherResponse {}),
            None => Err(ConnectError::not_found(format!(
                "watcher {:?} not found",
                req.watcher_id
            ))),
        }
    }
}

/// `CreateWatcher` asks for what `WatchDir` does.
fn as_watch_request(req: CreateWatcherRequest) -> WatchDirRequest {
    WatchDirRequest {
        path: req.path,
        recursive: req.recursive,
        include_entry: req.include_entry,
        allow_network_mounts: req.allow_network_mounts,
    }
}

/// A random watcher id (32 hex digits).
fn watcher_id() -> Result<String, ConnectError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ConnectError::internal(format!("random id: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `host` is on NFS, CIFS/SMB or FUSE (upstream refuses to watch
/// those unless asked: inotify does not see remote changes).
fn is_network_mount(host: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(p) = std::ffi::CString::new(host.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(p.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const NETWORK: [i64; 5] = [0x6969, 0xFF53_4D42, 0x517B, 0xFE53_4D42, 0x6573_5546];
    NETWORK.contains(&(st.f_type as i64))
}

/// Check that `guest` is an existing directory the user may read and search
/// (for listing or watching it): `not_found`, `invalid_argument` for a
/// non-directory, `permission_denied` otherwise.
fn open_dir(
    access: &Access<'_>,
    guest: &Path,
    host: &Path,
    what: &str,
) -> Result<(), ConnectError> {
    access.traverse(guest)?;
    let meta = std::fs::metadata(host).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            not_found(guest)
        } else {
            io_err(&e, guest)
        }
    })?;
    if !meta.is_dir() {
        return Err(ConnectError::invalid_argument(format!(
            "path {} is not a directory",
            guest.display()
        )));
    }
    access.check(guest, R | X, what)
}
