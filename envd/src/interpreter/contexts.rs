//! Contexts: a kernel each, with its language and working directory, and
//! the default context of each language that calls without a context use.
//!
//! An execution holds its context's lock from start to end, so a context
//! runs one piece of code at a time, in order (as E2B's server does).
//! Restart and removal must not wait behind a runaway loop: they kill the
//! kernel's process group first (its id is kept outside the lock), which
//! ends the running execution, and then take the lock.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};

use runtimelib::KernelspecDir;
use serde::Serialize;
use tokio::sync::Mutex;

use super::kernel::{Kernel, KernelError};

/// The languages E2B's SDK names, and the kernelspec that runs each.
/// `typescript` and `javascript` share Deno's kernel (it runs both).
const LANGUAGES: &[(&str, &str)] = &[
    ("python", "python3"),
    ("bash", "bash"),
    ("javascript", "deno"),
    ("typescript", "deno"),
    ("r", "ir"),
    ("java", "java"),
];

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("unknown language '{language}'; this sandbox runs: {supported}")]
    UnknownLanguage { language: String, supported: String },
    #[error("context '{0}' not found")]
    NotFound(String),
    #[error("the working directory '{0}' does not exist in the sandbox")]
    NoSuchDirectory(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// What `/contexts` answers about a context (E2B's `Context`).
#[derive(Debug, Clone, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

pub struct Context {
    pub info: ContextInfo,
    kernelspec: KernelspecDir,
    /// The running kernel's process group, readable without the lock.
    pgid: AtomicI32,
    pub slot: Mutex<Slot>,
}

/// What an execution holds while it runs.
pub struct Slot {
    /// None after the kernel died and could not be started again.
    pub kernel: Option<Kernel>,
    /// The sandbox's environment variables (envd's `/envs`) as last set in
    /// this kernel; None until the first execution sets them.
    pub global_envs: Option<HashMap<String, String>>,
}

impl Context {
    pub fn language(&self) -> &str {
        &self.info.language
    }

    /// Starts a new kernel in the slot (after a death or a restart).
    pub async fn respawn(&self, slot: &mut Slot, runtime_dir: &Path) -> Result<(), KernelError> {
        if let Some(old) = slot.kernel.take() {
            old.kill().await;
        }
        slot.global_envs = None;
        let kernel = Kernel::start(
            &self.kernelspec,
            Path::new(&self.info.cwd),
            runtime_dir,
            &self.info.id,
        )
        .await?;
        self.pgid.store(kernel.pgid(), Ordering::SeqCst);
        slot.kernel = Some(kernel);
        Ok(())
    }

    /// Kills the kernel's processes without waiting for the lock.
    fn kill_now(&self) {
        let pgid = self.pgid.load(Ordering::SeqCst);
        if pgid > 1 {
            // SAFETY: signals the kernel's own process group.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

pub struct Contexts {
    kernelspecs: BTreeMap<String, KernelspecDir>,
    contexts: SyncMutex<HashMap<String, Arc<Context>>>,
    /// Language to the id of its default context; the async lock makes two
    /// first calls of a language start one kernel, not two.
    defaults: Mutex<HashMap<String, String>>,
    pub runtime_dir: PathBuf,
    pub default_cwd: String,
}

impl Contexts {
    /// Finds the installed kernelspecs (the Jupyter data directories).
    pub async fn discover(runtime_dir: PathBuf, default_cwd: String) -> Self {
        let mut kernelspecs = BTreeMap::new();
        for spec in runtimelib::list_kernelspecs().await {
            kernelspecs.entry(spec.kernel_name.clone()).or_insert(spec);
        }
        Contexts {
            kernelspecs,
            contexts: SyncMutex::new(HashMap::new()),
            defaults: Mutex::new(HashMap::new()),
            runtime_dir,
            default_cwd,
        }
    }

    /// The languages this sandbox has a kernel for.
    pub fn supported(&self) -> Vec<&'static str> {
        LANGUAGES
            .iter()
            .filter(|(_, kernel)| self.kernelspecs.contains_key(*kernel))
            .map(|(language, _)| *language)
            .collect()
    }

    fn kernelspec(&self, language: &str) -> Result<&KernelspecDir, ContextError> {
        LANGUAGES
            .iter()
            .find(|(l, _)| *l == language)
            .and_then(|(_, kernel)| self.kernelspecs.get(*kernel))
            .ok_or_else(|| ContextError::UnknownLanguage {
                language: language.to_owned(),
                supported: self.supported().join(", "),
            })
    }

    /// Starts a context: a new kernel of `language` in `cwd`.
    pub async fn create(
        &self,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<Arc<Context>, ContextError> {
        let language = normalize(language);
        let kernelspec = self.kernelspec(&language)?.clone();
        let cwd = match cwd {
            Some(c) if !c.is_empty() => c.to_owned(),
            _ => self.default_cwd.clone(),
        };
        if !tokio::fs::metadata(&cwd)
            .await
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            return Err(ContextError::NoSuchDirectory(cwd));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let context = Arc::new(Context {
            info: ContextInfo {
                id: id.clone(),
                language,
                cwd,
            },
            kernelspec,
            pgid: AtomicI32::new(0),
            slot: Mutex::new(Slot {
                kernel: None,
                global_envs: None,
            }),
        });
        {
            let mut slot = context.slot.lock().await;
            context.respawn(&mut slot, &self.runtime_dir).await?;
        }
        self.lock().insert(id, context.clone());
        Ok(context)
    }

    /// The context calls of `language` without a context id use, started
    /// on first use.
    pub async fn default_for(&self, language: Option<&str>) -> Result<Arc<Context>, ContextError> {
        let language = normalize(language);
        self.kernelspec(&language)?;
        let mut defaults = self.defaults.lock().await;
        if let Some(context) = defaults.get(&language).and_then(|id| self.get(id)) {
            return Ok(context);
        }
        let context = self.create(Some(&language), None).await?;
        defaults.insert(language, context.info.id.clone());
        Ok(context)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.lock().get(id).cloned()
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        let mut list: Vec<ContextInfo> = self.lock().values().map(|c| c.info.clone()).collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// A fresh kernel for the context: its state is gone, its id stays.
    pub async fn restart(&self, id: &str) -> Result<(), ContextError> {
        let context = self
            .get(id)
            .ok_or_else(|| ContextError::NotFound(id.into()))?;
        context.kill_now();
        let mut slot = context.slot.lock().await;
        context.respawn(&mut slot, &self.runtime_dir).await?;
        Ok(())
    }

    pub async fn remove(&self, id: &str) -> Result<(), ContextError> {
        let context = self
            .lock()
            .remove(id)
            .ok_or_else(|| ContextError::NotFound(id.into()))?;
        self.defaults
            .lock()
            .await
            .retain(|_, default| default != id);
        context.kill_now();
        let mut slot = context.slot.lock().await;
        if let Some(kernel) = slot.kernel.take() {
            kernel.kill().await;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Context>>> {
        self.contexts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// E2B's language names: none is Python, `js`/`ts` are short forms.
pub fn normalize(language: Option<&str>) -> String {
    let language = language.unwrap_or("").trim().to_lowercase();
    match language.as_str() {
        "" => "python".into(),
        "js" => "javascript".into(),
        "ts" => "typescript".into(),
        _ => language,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_names_are_normalized_as_e2b_does() {
        assert_eq!(normalize(None), "python");
        assert_eq!(normalize(Some(" Python ")), "python");
        assert_eq!(normalize(Some("JS")), "javascript");
        assert_eq!(normalize(Some("ts")), "typescript");
        assert_eq!(normalize(Some("bash")), "bash");
    }
}
