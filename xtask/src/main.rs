//! `cargo xtask`: every developer task of sandmesh behind one command.
//!
//! - `up`: install what is missing, build the guest artifacts (cached), build
//!   the `sandmesh` binary, and start a one-node cluster.
//! - `test`: the whole test suite, exactly what CI runs.
//! - `bench`: the benchmarks; writes `BENCHMARKS.md`.
//! - `guest`: build (or rebuild) the guest kernel, envd and root filesystem.
//! - `nested`: run a command on an L1 host whose KVM boots Linux guests
//!   (QEMU's software emulation with nested SVM; see `nested.rs`).

mod bench;
mod cache;
mod deps;
mod envd;
mod fuzz;
mod kernel;
mod nested;
mod python;
mod rootfs;
mod run;
mod runsc;
mod s3s_fs;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use schema::guest::{ARTIFACTS_ENV, ArtifactKeys, GuestArtifacts, REQUIRE_ENV};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sandmesh developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing packages, build the guest artifacts and start a one-node cluster.
    Up,
    /// Run every test: unit, integration, artifact checks (what CI runs).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run the benchmarks and write BENCHMARKS.md.
    Bench {
        /// Only the Linux microVM benchmarks, inside the emulated L1 host
        /// (see `cargo xtask nested`): boot and restore to envd against
        /// the bare VM set-up there. Rewrites that section of BENCHMARKS.md
        /// and keeps the rest.
        #[arg(long)]
        nested: bool,
        /// With --nested: also boot and snapshot-load the same guest with
        /// this Firecracker binary (built from source for measurement
        /// only, never part of this repository) in the same L1.
        #[arg(long, requires = "nested")]
        firecracker: Option<PathBuf>,
    },
    /// Fuzz the parsers of untrusted bytes (libFuzzer via cargo-fuzz).
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Run a command on an emulated L1 host whose KVM boots Linux guests
    /// (QEMU TCG with nested SVM), with this host's files, as root.
    Nested {
        /// Kill L1 after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// vCPUs of L1 (see nested.rs for what was measured).
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory of L1 in MiB.
        #[arg(long, default_value_t = 6144)]
        memory_mib: u32,
        /// The command and its arguments (after `--`), run in the current
        /// directory.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build the guest artifacts (kernel, envd, root filesystem) into the cache.
    Guest {
        /// Rebuild even when the cache holds an artifact with the same inputs.
        #[arg(long)]
        force: bool,
        /// Size of the ext4 root filesystem image (sparse), e.g. 2G or 1536M.
        #[arg(long, default_value = rootfs::DEFAULT_IMAGE_SIZE)]
        image_size: String,
    },
}

fn main() -> std::process::ExitCode {
    match run_task(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(cli: Cli) -> Result<()> {
    let root = workspace_root();
    let invoked_in = std::env::current_dir()?;
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Up => up(&root),
        Task::Test { cargo_args } => test(&root, &cargo_args),
        Task::Bench {
            nested,
            firecracker,
        } => bench(&root, nested, firecracker.as_deref()),
        Task::Fuzz { seconds, targets } => {
            let targets = if targets.is_empty() {
                fuzz::TARGETS.iter().map(|(t, _)| t.to_string()).collect()
            } else {
                targets
            };
            fuzz::run(&cache::Cache::open()?, &root, &targets, seconds)
        }
        Task::Nested {
            timeout,
            cpus,
            memory_mib,
            command,
        } => {
            let l1 = nested::build(&cache::Cache::open()?, false)?;
            let script = command
                .iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" ");
            let code = nested::run_in(
                &l1,
                &nested::RunSpec {
                    script: &script,
                    cwd: &invoked_in,
                    timeout: std::time::Duration::from_secs(timeout),
                    run_dir: &root.join("target/nested/run"),
                    cpus,
                    memory_mib,
                },
            )?
            .code;
            if code != 0 {
                anyhow::bail!("the command exited with status {code} in L1");
            }
            Ok(())
        }
        Task::Guest { force, image_size } => {
            guest(&root, force, &image_size)?;
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where `cargo xtask` writes the manifest of this checkout's guest artifacts.
fn manifest_path(root: &Path) -> PathBuf {
    root.join("target").join("sandmesh-guest-artifacts.json")
}

/// Build (or find in the cache) every guest artifact and write the manifest.
fn guest(root: &Path, force: bool, image_size: &str) -> Result<GuestArtifacts> {
    let started = Instant::now();
    deps::ensure(deps::GUEST_BUILD)?;
    let cache = cache::Cache::open()?;
    println!("guest artifacts cache: {}", cache.root().display());
    let kernel = kernel::build(&cache, root, force)?;
    let envd = envd::build(&cache, root, force)?;
    let base = rootfs::build_base(&cache, root, force)?;
    let rootfs = rootfs::build(&cache, root, &base, &envd, image_size, force)?;
    let manifest = GuestArtifacts {
        kernel: kernel.vmlinux,
        kernel_config: kernel.config,
        rootfs_dir: rootfs.tree,
        rootfs_image: rootfs.image,
        envd: envd.binary,
        keys: ArtifactKeys {
            kernel: kernel.key,
            rootfs_base: base.key,
            envd: envd.key,
            rootfs: rootfs.key,
        },
    };
    std::fs::create_dir_all(root.join("target"))?;
    let path = manifest_path(root);
    manifest
        .store(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "guest artifacts ready in {:.1}s (manifest {})",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(manifest)
}

fn up(root: &Path) -> Result<()> {
    deps::ensure(deps::TEST)?;
    let manifest = guest(root, false, rootfs::DEFAULT_IMAGE_SIZE)?;
    runsc::provide(&cache::Cache::open()?)?;
    run::cargo(root, &["build", "--release", "--package", "node"], &[])?;
    let sandmesh = root.join("target/release/sandmesh");
    let data_dir = root.join(".sandmesh");
    std::fs::create_dir_all(&data_dir)?;
    // One key, made on the first start and kept (owner-only) so every `up`
    // prints the same environment; the node itself stores only its hash.
    let key_file = data_dir.join("xtask-api-key");
    let key = match std::fs::read_to_string(&key_file) {
        Ok(k) if !k.trim().is_empty() => k.trim().to_owned(),
        _ => {
            let key = run::output(
                std::process::Command::new(&sandmesh)
                    .args(["apikey", "create", "--data-dir"])
                    .arg(&data_dir),
            )?
            .trim()
            .to_owned();
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_file)?
                .write_all(key.as_bytes())?;
            key
        }
    };
    let listen = "127.0.0.1:3000";
    println!();
    println!(
        "Starting a one-node sandmesh on http://{listen} (data in {}).",
        data_dir.display()
    );
    println!("Point the E2B SDK at it (in another shell):");
    println!();
    println!("  export E2B_API_URL=http://{listen}");
    println!("  export E2B_SANDBOX_URL=http://{listen}");
    println!("  export E2B_API_KEY={key}");
    println!();
    println!(
        "See the cluster with `{} status --api-key {key}`; add hosts as README.md's \"A cluster\" says.",
        sandmesh.display()
    );
    println!(
        "Ctrl-C stops the node; its sandboxes keep running and the next `cargo xtask up` re-adopts them."
    );
    let mut node = std::process::Command::new(&sandmesh)
        .args(["node", "--listen", listen, "--data-dir"])
        .arg(&data_dir)
        .arg("--base-rootfs")
        .arg(&manifest.rootfs_dir)
        .spawn()
        .context("starting the node")?;
    // The template `e2b-code-interpreter` creates by default, built once
    // into the node's store (later `up`s find it and skip).
    if wait_for_port(listen, &mut node)? {
        // Built over this root filesystem already: keep it. Over another
        // (the guest was rebuilt since), its memory image no longer
        // restores: build it again.
        let built_over = data_dir.join("xtask-code-interpreter-root");
        let same_root =
            std::fs::read_to_string(&built_over).is_ok_and(|k| k.trim() == manifest.keys.rootfs);
        let built = std::process::Command::new(&sandmesh)
            .args(["template", "build"])
            .args(same_root.then_some("--if-missing"))
            .arg("--url")
            .arg(format!("http://{listen}"))
            .args(["--api-key", &key, "--alias", CODE_INTERPRETER])
            .args(["--memory-mb", CODE_INTERPRETER_MEMORY_MB, "-f"])
            .arg(root.join(CODE_INTERPRETER_DOCKERFILE))
            .status();
        if built.as_ref().is_ok_and(|s| s.success()) {
            std::fs::write(&built_over, &manifest.keys.rootfs)?;
        } else {
            eprintln!(
                "warning: building the {CODE_INTERPRETER} template failed (above); the node runs, \
                 but e2b-code-interpreter's Sandbox.create() will answer 404 until it is built"
            );
        }
    }
    let status = node.wait()?;
    if !status.success() {
        bail!("the node exited: {status}");
    }
    Ok(())
}

/// The code interpreter's template: its name and recipe.
const CODE_INTERPRETER: &str = "code-interpreter-v1";
const CODE_INTERPRETER_DOCKERFILE: &str = "node/templates/code-interpreter-v1/Dockerfile";
/// Python with pandas and matplotlib loaded, a bash kernel and a Deno
/// kernel (~290 MiB by itself) together need more than 512 MiB.
const CODE_INTERPRETER_MEMORY_MB: &str = "1024";

/// Waits until something listens on `addr`; false if `node` exited first.
fn wait_for_port(addr: &str, node: &mut std::process::Child) -> Result<bool> {
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while Instant::now() < deadline {
        if node.try_wait()?.is_some() {
            return Ok(false);
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(false)
}

fn test(root: &Path, cargo_args: &[String]) -> Result<()> {
    let started = Instant::now();
    deps::ensure(deps::TEST)?;
    guest(root, false, rootfs::DEFAULT_IMAGE_SIZE)?;
    runsc::provide(&cache::Cache::open()?)?;
    // The S3 server of the snapshot store's integration test.
    let s3s_fs = s3s_fs::provide(&cache::Cache::open()?)?;
    let manifest = manifest_path(root);
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if !cargo_args.is_empty() {
        args.push("--");
        args.extend(cargo_args.iter().map(String::as_str));
    }
    let env = [
        (ARTIFACTS_ENV, manifest.to_string_lossy().into_owned()),
        // Under xtask the artifacts are built, so their checks must not skip.
        (REQUIRE_ENV, "1".to_string()),
        (s3s_fs::S3S_FS_ENV, s3s_fs.to_string_lossy().into_owned()),
    ];
    run::cargo(root, &args, &env)?;

    // The official E2B SDK against envd (built by `cargo test` above).
    let cache = cache::Cache::open()?;
    let python = python::sdk_python(&cache, root)?;
    let envd_bin = root
        .join("target/debug/envd")
        .to_string_lossy()
        .into_owned();
    python::pytest(&python, root, "envd/tests/sdk", &[("ENVD_BIN", envd_bin)])?;
    // The official E2B SDK against a real `sandmesh node` (gvisor runtime).
    let sandmesh_bin = root
        .join("target/debug/sandmesh")
        .to_string_lossy()
        .into_owned();
    python::pytest(
        &python,
        root,
        "node/tests/sdk",
        &[
            ("SANDMESH_BIN", sandmesh_bin),
            (ARTIFACTS_ENV, manifest.to_string_lossy().into_owned()),
            (REQUIRE_ENV, "1".to_string()),
            // The fleet tests share one bucket of a real S3 server.
            (s3s_fs::S3S_FS_ENV, s3s_fs.to_string_lossy().into_owned()),
        ],
    )?;

    // Linux microVMs: the tests that need KVM to run guest kernels, on the
    // emulated L1 host with nested SVM where this machine's KVM cannot run
    // them (where it can, they ran natively above).
    if std::env::var(NESTED_ENV).is_ok_and(|v| v == "0") {
        println!("nested microVM suite skipped: {NESTED_ENV}=0");
    } else if vmm::probe::probe_kvm().native {
        println!(
            "nested microVM suite skipped: KVM runs guest kernels on this host, so the \
             Linux microVM tests ran natively above"
        );
    } else {
        nested_suite(root, &manifest)?;
    }

    // A short fuzz run of every target: they build, and the seeds and a few
    // seconds of mutation find no crash. Longer runs: `cargo xtask fuzz`.
    let targets: Vec<String> = fuzz::TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    fuzz::run(&cache, root, &targets, 10)?;

    println!(
        "cargo xtask test: all suites passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `0` skips the nested microVM suite in `cargo xtask test`.
const NESTED_ENV: &str = "SANDMESH_NESTED";

/// The integration tests that boot Linux in our VMM, run inside L1 (see
/// `nested.rs`) where KVM runs guest kernels, required not to skip there.
const NESTED_TESTS: &[(&str, &str)] = &[("node", "microvm_runtime"), ("node", "microvm_linux")];

/// The E2B SDK tests run in L1 against `sandmesh node --runtime auto`
/// (which picks microvm there): create, commands, files, list, kill,
/// deadlines, pause/resume.
const NESTED_SDK_TESTS: &[&str] = &[
    "node/tests/sdk/test_sdk_node.py::test_create_run_files_list_kill",
    "node/tests/sdk/test_sdk_node.py::test_deadline_and_not_found",
    "node/tests/sdk/test_sdk_pause.py::test_pause_resume_keeps_memory_and_files_50_times",
];

fn nested_suite(root: &Path, manifest: &Path) -> Result<()> {
    let started = Instant::now();
    let cache = cache::Cache::open()?;
    let l1 = nested::build(&cache, false)?;
    let mut script = format!(
        // One vCPU per guest: 2-vCPU guests triple-faulted in L1 before
        // vgif=0 and are not re-measured (ARCHITECTURE.md, "The L1 host").
        "export {ARTIFACTS_ENV}='{}' {REQUIRE_ENV}=1 SANDMESH_REQUIRE_NATIVE_KVM=1 \
         SANDMESH_TEST_VCPUS=1 RUST_BACKTRACE=1\n",
        manifest.display()
    );
    for (package, test) in NESTED_TESTS {
        let exe = test_executable(root, package, test)?;
        // cargo runs a test binary in its package's directory.
        script += &format!(
            "echo '== {package}/{test}'; cd '{}' && '{}' --test-threads 1 --nocapture || exit 1\n",
            root.join(package).display(),
            exe.display()
        );
    }
    let artifacts = GuestArtifacts::load(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let python = python::sdk_python(&cache, root)?;
    script += &format!(
        "echo '== E2B SDK on sandmesh node --runtime auto'; cd '{}' && \
         SANDMESH_BIN='{}' SANDMESH_RUNTIME=auto SANDMESH_SDK_PAUSE_CYCLES=3 SANDMESH_SDK_STATE_TIMEOUT=180 \
         SANDMESH_NODE_ARGS='--template base={},cpu=1,image={}' \
         '{}' -m pytest -p no:cacheprovider -q -rs {} || exit 1\n",
        root.display(),
        root.join("target/debug/sandmesh").display(),
        artifacts.rootfs_dir.display(),
        artifacts.rootfs_image.display(),
        python.display(),
        NESTED_SDK_TESTS.join(" ")
    );
    let spec = nested::RunSpec {
        script: &script,
        cwd: root,
        timeout: std::time::Duration::from_secs(1500),
        run_dir: &root.join("target/nested/test"),
        cpus: 1,
        memory_mib: 6144,
    };
    let mut ran = nested::run_in(&l1, &spec)?;
    if ran.code != 0 && ran.stalls > 0 {
        // L1 stopped with QEMU idle and its console silent (see
        // `nested::StallWatch` and ARCHITECTURE.md, "The L1 host"): the
        // emulator lost a wakeup. That is not a verdict on our code, so
        // the suite runs once more on a fresh L1; a failure without a
        // stall, or a second failure, fails the run.
        println!(
            "the nested suite failed on an L1 that stalled {} time(s) (records: \
             target/nested/test/stall-*.txt); running it once more on a fresh L1",
            ran.stalls
        );
        let rerun_dir = root.join("target/nested/test-rerun");
        ran = nested::run_in(
            &l1,
            &nested::RunSpec {
                run_dir: &rerun_dir,
                ..spec
            },
        )?;
    }
    if ran.code != 0 {
        anyhow::bail!(
            "the nested microVM suite failed in L1 (status {}); see the l1| lines above",
            ran.code
        );
    }
    println!(
        "nested microVM suite passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The path of an integration test's binary, built by the `cargo test` before.
fn test_executable(root: &Path, package: &str, test: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run::output(std::process::Command::new(cargo).current_dir(root).args([
        "test",
        "--no-run",
        "--message-format=json",
        "--package",
        package,
        "--test",
        test,
    ]))?;
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == *test)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no test binary {package}/{test}"))
}

fn bench(root: &Path, nested: bool, firecracker: Option<&Path>) -> Result<()> {
    let manifest = guest(root, false, rootfs::DEFAULT_IMAGE_SIZE)?;
    if nested {
        return bench::nested(
            root,
            &manifest_path(root),
            &manifest,
            firecracker,
            &root.join("BENCHMARKS.md"),
        );
    }
    runsc::provide(&cache::Cache::open()?)?;
    // The S3 server of the cross-node resume benchmark.
    let s3s_fs = s3s_fs::provide(&cache::Cache::open()?)?;
    let python = python::sdk_python(&cache::Cache::open()?, root)?;
    bench::run(
        root,
        &manifest_path(root),
        &manifest,
        &python,
        &s3s_fs,
        &root.join("BENCHMARKS.md"),
    )
}
