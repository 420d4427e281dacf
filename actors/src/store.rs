//! The node's local state in sled (`<data_dir>/sled`): API keys (only their
//! SHA-256) and one record per sandbox, so that a restarted node can
//! re-adopt the sandboxes its runtime still runs.
//!
//! It lives with the actors because they write the sandbox records. The
//! API keys and the drain flag, which only the node reads, stay in the
//! same [`Store`] rather than in a node-side store of their own: sled lets
//! one process open a database once (it locks the directory), so a split
//! would hand the one `sled::Db` across the crate boundary to save a few
//! lines of key handling, and give the node a second type to open, pass
//! and flush for the same file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const API_KEYS: &str = "api_keys";
const SANDBOXES: &str = "sandboxes";
/// Key in the default tree, present while the node is drained.
const DRAINING: &[u8] = b"draining";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an API key must be at least 16 printable ASCII characters")]
    WeakKey,
    #[error("opening the node database {path}: {source} (is another node using this data dir?)")]
    Open { path: String, source: sled::Error },
    #[error("node database: {0}")]
    Db(#[from] sled::Error),
    #[error("node database record {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// A sandbox as the node remembers it. The env vars are not kept (envd has
/// them; they may hold secrets); the envd access token is, since a
/// re-adopted sandbox must keep answering the SDK that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub template: String,
    pub metadata: BTreeMap<String, String>,
    pub envd_access_token: String,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When the timeout kills it, milliseconds since the Unix epoch.
    pub end_at_ms: u64,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// `gvisor` or `microvm`.
    pub runtime: String,
    pub state: RecordState,
    /// At the deadline: pause (E2B `autoPause`) rather than kill.
    #[serde(default)]
    pub auto_pause: bool,
    /// Traffic through the node's proxy resumes it when paused (E2B
    /// `autoResume`).
    #[serde(default)]
    pub auto_resume: bool,
    /// The create's timeout in seconds (0: it named none): how long an
    /// auto-resumed sandbox lives, as E2B gives it the create's timeout.
    #[serde(default)]
    pub timeout_secs: u64,
    /// The snapshot of a paused sandbox (and, while `Pausing`, where it is
    /// being written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// The name in the object store of the sandbox's latest pause snapshot
    /// (`sandboxes/<id>/<ms>`): what a resume fetches when the local copy
    /// is gone, and what the next pause deduplicates against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_object: Option<String>,
    /// The epoch of the sandbox's claim in the object store that this
    /// node wrote last (`objects::claims`): a resume counts only while
    /// the store's claim is still that one. `None`: never claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_epoch: Option<u64>,
    /// The user template or snapshot the sandbox was created from, which
    /// the API shows as its `templateID` (`template` is the node template
    /// under it, what the runtime restores over). `None`: `template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// `runtime.create` was called and has not returned: after a crash,
    /// the leftovers must be killed.
    Creating,
    Running,
    /// `runtime.checkpoint` was called and has not returned: after a
    /// crash, the snapshot counts only if its manifest was written.
    Pausing,
    /// Saved in `snapshot_dir`; nothing runs.
    Paused,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    keys: sled::Tree,
    sandboxes: sled::Tree,
}

/// `n` random bytes from the OS.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, StoreError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(b)
}

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("sled");
        let db = sled::open(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            keys: db.open_tree(API_KEYS)?,
            sandboxes: db.open_tree(SANDBOXES)?,
            db,
        })
    }

    /// A new API key (`e2b_` + 40 hex digits); only its hash is stored.
    pub fn create_api_key(&self) -> Result<String, StoreError> {
        let key = format!("e2b_{}", hex::encode(random_bytes(20)?));
        self.add_api_key(&key)?;
        Ok(key)
    }

    /// Accept `key` too (its hash is stored). Every node of a cluster
    /// needs the keys its clients use: any node may be asked, and the
    /// owner of a sandbox checks the key again on a forwarded call.
    pub fn add_api_key(&self, key: &str) -> Result<(), StoreError> {
        if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(StoreError::WeakKey);
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            .to_string();
        self.keys.insert(key_hash(key), created.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether the node was drained (`sandmesh node drain`): it stays
    /// drained across restarts until it is made ready again.
    pub fn draining(&self) -> Result<bool, StoreError> {
        Ok(self.db.get(DRAINING)?.is_some())
    }

    pub fn set_draining(&self, draining: bool) -> Result<(), StoreError> {
        if draining {
            self.db.insert(DRAINING, b"1")?;
        } else {
            self.db.remove(DRAINING)?;
        }
        self.db.flush()?;
        Ok(())
    }

    pub fn verify_api_key(&self, key: &str) -> Result<bool, StoreError> {
        Ok(!key.is_empty() && self.keys.contains_key(key_hash(key))?)
    }

    pub fn api_key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn put_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(rec).expect("a record serializes");
        self.sandboxes.insert(rec.id.as_bytes(), value)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn remove_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.sandboxes.remove(id.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.sandboxes.iter() {
            let (k, v) = kv?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("smh-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn api_keys_are_hashed_and_survive_reopen() {
        let dir = tmp("keys");
        let key = {
            let s = Store::open(&dir).unwrap();
            let key = s.create_api_key().unwrap();
            assert!(key.starts_with("e2b_") && key.len() == 44, "{key}");
            assert!(s.verify_api_key(&key).unwrap());
            assert!(!s.verify_api_key("e2b_wrong").unwrap());
            assert!(!s.verify_api_key("").unwrap());
            // The key itself is nowhere in the database.
            for kv in s.keys.iter() {
                let (k, v) = kv.unwrap();
                assert!(!String::from_utf8_lossy(&k).contains(&key[4..]));
                assert!(!String::from_utf8_lossy(&v).contains(&key[4..]));
            }
            key
        };
        let s = Store::open(&dir).unwrap();
        assert!(s.verify_api_key(&key).unwrap());
        assert_eq!(s.api_key_count(), 1);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sandbox_records_round_trip() {
        let dir = tmp("sbx");
        let rec = SandboxRecord {
            id: "abc".into(),
            template: "base".into(),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            envd_access_token: "tok".into(),
            started_at_ms: 1,
            end_at_ms: 2,
            vcpus: 2,
            memory_mib: 512,
            runtime: "gvisor".into(),
            state: RecordState::Running,
            auto_pause: false,
            auto_resume: false,
            timeout_secs: 0,
            snapshot_dir: None,
            snapshot_object: None,
            claim_epoch: None,
            template_name: Some("code-interpreter-v1".into()),
        };
        {
            let s = Store::open(&dir).unwrap();
            s.put_sandbox(&rec).unwrap();
        }
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.sandboxes().unwrap(), vec![rec]);
        s.remove_sandbox("abc").unwrap();
        assert!(s.sandboxes().unwrap().is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
