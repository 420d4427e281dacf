//! What envd knows about its sandbox: the root it serves and what `/init` set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::connect::ConnectError;
use crate::filesystem::metadata::MetadataStore;
use crate::paths::Root;
use crate::users::{self, User};

/// Shared by every handler; cheap to reach through an `Arc`.
pub struct State {
    pub root: Root,
    /// Whether `/init` may set the wall clock (true in a guest only).
    pub set_clock: bool,
    /// Where file metadata are kept (xattrs, else envd's own store).
    pub metadata: Arc<MetadataStore>,
    init: RwLock<Init>,
}

/// Set by `POST /init` (the node sends it at create and after restore).
#[derive(Debug, Clone)]
pub struct Init {
    /// Sandbox environment variables, merged under each process's own.
    pub env_vars: HashMap<String, String>,
    /// When set, every request must carry it (`X-Access-Token`) or a
    /// signature made with it.
    pub access_token: Option<String>,
    /// The user a request runs as when it names none.
    pub default_user: String,
    /// The working directory of processes that name none (else the user's home).
    pub default_workdir: Option<PathBuf>,
}

impl Default for Init {
    fn default() -> Self {
        Self {
            env_vars: HashMap::new(),
            access_token: None,
            default_user: "user".into(),
            default_workdir: None,
        }
    }
}

impl State {
    pub fn new(root: Root, set_clock: bool) -> Self {
        Self {
            metadata: Arc::new(MetadataStore::new(root.clone(), true)),
            root,
            set_clock,
            init: RwLock::new(Init::default()),
        }
    }

    /// Keep file metadata in envd's store only, never in xattrs (what a
    /// gVisor root does by itself; lets tests on any filesystem cover it).
    pub fn without_xattr_metadata(mut self) -> Self {
        self.metadata = Arc::new(MetadataStore::new(self.root.clone(), false));
        self
    }

    /// A copy of the current init state.
    pub fn init(&self) -> Init {
        self.init.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update_init(&self, f: impl FnOnce(&mut Init)) {
        f(&mut self.init.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// The user a request runs as: the one it names, else the default user.
    pub fn user(&self, requested: Option<&str>) -> Result<User, ConnectError> {
        let name = match requested {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => self.init().default_user,
        };
        users::lookup(self.root.host_root(), &name)
    }
}
