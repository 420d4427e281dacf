//! Template builds: what a build is made of apart from the sandboxes it
//! runs in (those are [`crate::service`]'s, `builds.rs`).
//!
//! A build runs its steps in a **build sandbox** (gVisor: untrusted build
//! input never runs on the host), started from the template it builds on.
//! After each step that changes files (RUN, COPY, WORKDIR) the sandbox's
//! files are saved as a **layer**: a filesystem-only copy published to the
//! object store under `template-layers/<key>`, where the key hashes the
//! parent layer's key and the step ([`layer_key`]); ENV and USER change
//! only the [`BuildState`], which every layer records. A later build with
//! the same first steps starts from the last layer it finds (logged as
//! cached) instead of running them. At the end the start command is
//! started, the ready command awaited, and the whole sandbox (memory
//! included) is published as the template's build, from which creates
//! restore, on any node.

pub mod image;
pub mod proxy;

use std::collections::BTreeMap;

use schema::e2b::LogLevel;
use schema::template::{BuildLogEntry, Step, StepKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::rfc3339_ms;

/// What the steps so far have set: the user, directory and environment of
/// later steps and, at the end, of the template's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildState {
    pub user: String,
    pub workdir: String,
    pub env: BTreeMap<String, String>,
}

impl Default for BuildState {
    /// E2B's base template: commands run as `user` in its home.
    fn default() -> Self {
        Self {
            user: "user".into(),
            workdir: "/home/user".into(),
            env: BTreeMap::new(),
        }
    }
}

/// A step the API refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {index} ({kind}): {reason}")]
pub struct BadStep {
    /// 1-based.
    pub index: usize,
    pub kind: String,
    pub reason: String,
}

/// Longest argument of a step (a RUN script, a path).
const MAX_ARG: usize = 64 * 1024;

/// Check every step before anything runs: known kind, the arguments it
/// needs, a files hash for COPY.
pub fn check_steps(steps: &[Step]) -> Result<(), BadStep> {
    for (i, step) in steps.iter().enumerate() {
        let bad = |reason: String| BadStep {
            index: i + 1,
            kind: step.kind.clone(),
            reason,
        };
        let Some(kind) = StepKind::parse(&step.kind) else {
            return Err(bad(format!(
                "unknown step type {:?}: this node runs RUN, COPY, ENV, WORKDIR and USER",
                step.kind
            )));
        };
        if step.args.iter().any(|a| a.len() > MAX_ARG) {
            return Err(bad(format!("an argument is longer than {MAX_ARG} bytes")));
        }
        let n = step.args.len();
        let ok = match kind {
            StepKind::Run => (1..=2).contains(&n) && !step.args[0].trim().is_empty(),
            StepKind::Copy => (2..=4).contains(&n),
            StepKind::Env => n >= 2 && n % 2 == 0,
            StepKind::Workdir | StepKind::User => n == 1 && !step.args[0].is_empty(),
        };
        if !ok {
            return Err(bad(format!("wrong arguments {:?}", step.args)));
        }
        if kind == StepKind::Copy {
            let hash_ok = step.files_hash.as_deref().is_some_and(is_files_hash);
            if !hash_ok {
                return Err(bad("COPY needs filesHash, 64 lowercase hex digits".into()));
            }
            let src = &step.args[0];
            if src.starts_with('/') || src.split('/').any(|c| c == "..") {
                return Err(bad(format!(
                    "COPY source {src:?} escapes the build context: give a path inside it"
                )));
            }
        }
        if kind == StepKind::Env && step.args.iter().step_by(2).any(|k| !is_env_name(k)) {
            return Err(bad("ENV names are letters, digits and _".into()));
        }
        if kind == StepKind::User && !is_user_name(&step.args[0]) {
            return Err(bad(format!("invalid user {:?}", step.args[0])));
        }
    }
    Ok(())
}

/// A files hash as the SDK computes it: lowercase hex SHA-256.
pub fn is_files_hash(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_user_name(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Whether a step changes files (and so ends in a layer).
pub fn changes_files(kind: StepKind) -> bool {
    matches!(kind, StepKind::Run | StepKind::Copy | StepKind::Workdir)
}

/// The key of the layer after `step` on the layer `parent`: a hex SHA-256
/// of both (the step's kind, arguments and files hash; `force` is not part
/// of it: it decides whether the cache is read, not what a step makes).
pub fn layer_key(parent: &str, step: &Step) -> String {
    let mut h = Sha256::new();
    h.update(b"sandmesh layer v1\0");
    h.update(parent.as_bytes());
    h.update(b"\0");
    h.update(step.kind.as_bytes());
    for a in &step.args {
        h.update(b"\0");
        h.update((a.len() as u64).to_le_bytes());
        h.update(a.as_bytes());
    }
    h.update(b"\0");
    h.update(step.files_hash.as_deref().unwrap_or("").as_bytes());
    hex::encode(h.finalize())
}

/// The key every build on `root` starts from: the root template's
/// identity (its snapshot's object name: engine, build and limits) and,
/// for a build on a user template, that template's build.
pub fn root_key(root: &str, parent_build: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(b"sandmesh root v1\0");
    h.update(root.as_bytes());
    h.update(b"\0");
    h.update(parent_build.unwrap_or("").as_bytes());
    hex::encode(h.finalize())
}

/// `path` resolved against the working directory (E2B's `./src/`).
pub fn resolve(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        let base = workdir.trim_end_matches('/');
        let rest = path.strip_prefix("./").unwrap_or(path);
        if rest.is_empty() || rest == "." {
            format!("{base}/")
        } else {
            format!("{base}/{rest}")
        }
    }
}

/// Where a COPY step's tar is put in the build sandbox.
pub const COPY_ARCHIVE: &str = "/tmp/.sandmesh-copy.tar";

/// The script a COPY step runs as root: unpack the uploaded tar (gzipped
/// or not) into a staging directory, own and mode its files as asked, and
/// copy what `SRC` (a path or glob of the context) names to `DEST` as
/// Docker's COPY does: a directory's contents into `DEST`, a file to
/// `DEST` or into it when `DEST` ends with `/` or is a directory.
/// Arguments come as environment variables, never spliced into the text.
pub const COPY_SCRIPT: &str = r#"set -eu
stage=$(mktemp -d /tmp/.sandmesh-copy.XXXXXX)
trap 'rm -rf "$stage" "$ARCHIVE"' EXIT
tar -x -f "$ARCHIVE" -C "$stage" --no-same-owner
cd "$stage"
if [ -n "$OWNER" ]; then chown -R "$OWNER" "$stage"; fi
if [ -n "$MODE" ]; then chmod -R "$MODE" "$stage"; fi
shopt -s nullglob dotglob
IFS=
matches=( $SRC )
if [ ${#matches[@]} -eq 0 ]; then
  echo "COPY: $SRC matches nothing in the uploaded context" >&2
  exit 1
fi
created=
if [ ! -e "$DEST" ]; then created=1; fi
if [ ${#matches[@]} -gt 1 ] || [ "${DEST%/}" != "$DEST" ]; then mkdir -p "$DEST"; fi
for m in "${matches[@]}"; do
  if [ -d "$m" ]; then
    mkdir -p "$DEST"
    cp -a "$m"/. "$DEST"/
  elif [ -d "$DEST" ]; then
    cp -a "$m" "$DEST"/
  else
    mkdir -p "$(dirname "$DEST")"
    cp -a "$m" "$DEST"
  fi
done
if [ -n "$created" ] && [ -n "$OWNER" ] && [ -d "$DEST" ]; then chown "$OWNER" "$DEST"; fi
"#;

/// A build's log, as the status endpoint pages it.
#[derive(Debug, Default, Clone)]
pub struct BuildLog {
    pub entries: Vec<BuildLogEntry>,
    /// A partial line of command output not yet ended by a newline.
    partial: String,
}

/// Most entries a build keeps (the oldest are dropped past it, but the
/// offsets the SDK pages with stay valid: they count every entry).
pub const MAX_KEPT: usize = 20_000;

impl BuildLog {
    pub fn push(&mut self, level: LogLevel, step: &str, message: impl Into<String>) {
        if self.entries.len() >= MAX_KEPT {
            return;
        }
        self.entries.push(BuildLogEntry {
            timestamp: rfc3339_ms(crate::clock::now_ms()),
            message: message.into(),
            level,
            step: Some(step.to_owned()),
        });
    }

    /// Command output: one entry per line.
    pub fn output(&mut self, step: &str, bytes: &[u8]) {
        self.partial.push_str(&String::from_utf8_lossy(bytes));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = line.trim_end_matches(['\n', '\r']).to_owned();
            self.push(LogLevel::Info, step, line);
        }
        if self.partial.len() > 16 * 1024 {
            let line = std::mem::take(&mut self.partial);
            self.push(LogLevel::Info, step, line);
        }
    }

    /// The end of a command's output: what is left of a line.
    pub fn flush(&mut self, step: &str) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.push(LogLevel::Info, step, line);
        }
    }

    /// The last `n` entries of `step`.
    pub fn tail(&self, step: &str, n: usize) -> Vec<BuildLogEntry> {
        let of_step: Vec<&BuildLogEntry> = self
            .entries
            .iter()
            .filter(|e| e.step.as_deref() == Some(step))
            .collect();
        of_step[of_step.len().saturating_sub(n)..]
            .iter()
            .map(|e| (*e).clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: &str, args: &[&str]) -> Step {
        Step {
            kind: kind.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            files_hash: None,
            force: false,
            force_upload: None,
        }
    }

    #[test]
    fn steps_are_checked_before_anything_runs() {
        assert!(
            check_steps(&[step("RUN", &["echo hi", "root"]), step("ENV", &["A", "1"])]).is_ok()
        );
        let e = check_steps(&[step("RUN", &["true"]), step("ADD", &["x", "y"])]).unwrap_err();
        assert_eq!(e.index, 2);
        assert!(e.reason.contains("unknown step type \"ADD\""), "{e}");
        let e = check_steps(&[step("COPY", &["a", "/b"])]).unwrap_err();
        assert!(e.reason.contains("filesHash"), "{e}");
        let mut escape = step("COPY", &["../etc", "/b"]);
        escape.files_hash = Some("a".repeat(64));
        let e = check_steps(&[escape]).unwrap_err();
        assert!(e.reason.contains("escapes the build context"), "{e}");
        assert!(check_steps(&[step("ENV", &["A"])]).is_err());
        assert!(check_steps(&[step("ENV", &["1A", "x"])]).is_err());
        assert!(check_steps(&[step("USER", &["a b"])]).is_err());
    }

    #[test]
    fn layer_keys_chain_and_differ_by_step() {
        let root = root_key("templates/base/abc", None);
        let a = layer_key(&root, &step("RUN", &["echo a"]));
        assert_eq!(a, layer_key(&root, &step("RUN", &["echo a"])));
        assert_ne!(a, layer_key(&root, &step("RUN", &["echo b"])));
        // Argument boundaries count.
        assert_ne!(
            layer_key(&root, &step("ENV", &["AB", "C"])),
            layer_key(&root, &step("ENV", &["A", "BC"]))
        );
        let mut forced = step("RUN", &["echo a"]);
        forced.force = true;
        assert_eq!(a, layer_key(&root, &forced));
        assert_ne!(
            a,
            layer_key(
                &root_key("templates/base/other", None),
                &step("RUN", &["echo a"])
            )
        );
        assert_ne!(root, root_key("templates/base/abc", Some("build")));
    }

    #[test]
    fn relative_paths_resolve_against_the_workdir() {
        assert_eq!(resolve("/home/user", "./src/"), "/home/user/src/");
        assert_eq!(resolve("/app/", "x"), "/app/x");
        assert_eq!(resolve("/app", "/etc/x"), "/etc/x");
        assert_eq!(resolve("/app", "."), "/app/");
    }

    #[test]
    fn output_is_logged_by_line() {
        let mut log = BuildLog::default();
        log.output("1", b"one\ntw");
        log.output("1", b"o\nthree");
        log.flush("1");
        let lines: Vec<&str> = log.entries.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(lines, ["one", "two", "three"]);
        assert_eq!(log.tail("1", 2).len(), 2);
        assert!(log.tail("2", 2).is_empty());
    }
}
