//! The Python environment of the SDK compatibility suites: a virtualenv
//! with the official E2B SDKs pinned in `xtask/sdk-requirements.txt`,
//! cached like the guest artifacts (keyed by the pins and the interpreter).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::cache::{Cache, KeyHasher};
use crate::run;

pub fn requirements(root: &Path) -> PathBuf {
    root.join("xtask/sdk-requirements.txt")
}

/// The venv's interpreter (use `python -m pytest`: a venv moved into the
/// cache keeps working through its interpreter, not through script shebangs).
pub fn sdk_python(cache: &Cache, root: &Path) -> Result<PathBuf> {
    let python_version = run::output(Command::new("python3").arg("--version"))?;
    let reqs = requirements(root);
    let key = KeyHasher::new("python")
        .text("python", python_version.trim())
        .file(root, &reqs)?
        .finish();
    let entry = cache.get_or_build("python", &key, false, |out| {
        run::status(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(out.join("venv")),
        )?;
        run::status(
            Command::new(out.join("venv/bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&reqs),
        )
    })?;
    Ok(entry.dir.join("venv/bin/python"))
}

/// Run one pytest suite directory with `env`.
pub fn pytest(python: &Path, root: &Path, suite: &str, env: &[(&str, String)]) -> Result<()> {
    let mut cmd = Command::new(python);
    cmd.current_dir(root)
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", suite]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    println!("pytest {suite}");
    run::status(&mut cmd)
}
