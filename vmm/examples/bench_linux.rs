//! Benchmark: the real guest (our vmlinux and rootfs image, from the
//! `SANDMESH_GUEST_ARTIFACTS` manifest) booted and restored by the VMM
//! library in this process, timed to envd's first `GET /health` 204 over
//! the hybrid vsock socket — what a sandbox create waits for. JSON lines
//! on stdout, the format `xtask/src/bench.rs` reads.
//!
//! - boot: from just before `runner::run` (which checks the inputs,
//!   creates the VM, loads the kernel, starts the vCPUs and the device
//!   event loop) to the 204;
//! - restore: the first boot is snapshotted (full, paused) once envd has
//!   answered; each sample restores it (`runner::restore`, copy-on-write
//!   memory, a copy of its disk overlay) to the 204.
//!
//! One vCPU and 512 MiB, unjailed (the jail's cost is measured apart).
//! `SANDMESH_BENCH_BOOTS` / `SANDMESH_BENCH_RESTORES` set the sample
//! counts (default 5 / 10). Where KVM does not run guest kernels (nested
//! PVM) it prints nothing on stdout and says why on stderr.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::runner::{RestoreConfig, VmmConfig};

const MEMORY_MIB: u64 = 512;
const ENVD_PORT: u16 = 49983;
const READY_TIMEOUT: Duration = Duration::from_secs(180);

fn json(name: &str, samples: &[Duration]) {
    let ns: Vec<String> = samples.iter().map(|d| d.as_nanos().to_string()).collect();
    println!(
        r#"{{"name":"{name}","runtime":"microvm","samples_ns":[{}]}}"#,
        ns.join(",")
    );
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// One `GET /health` through the VMM's vsock socket; `Ok(true)` on 204.
fn health_once(uds: &Path) -> std::io::Result<bool> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("CONNECT {ENVD_PORT}\n").as_bytes())?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Ok(false);
    }
    s.write_all(b"GET /health HTTP/1.1\r\nHost: envd\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    reader.read_to_string(&mut answer)?;
    Ok(answer.starts_with("HTTP/1.1 204"))
}

/// Poll envd until it answers 204, or fail with the console's tail.
fn wait_ready(uds: &Path, console: &Path, t0: Instant) -> Result<Duration, String> {
    loop {
        if let Ok(true) = health_once(uds) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > READY_TIMEOUT {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            let tail: String = text
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(format!(
                "envd did not answer in {READY_TIMEOUT:?}; console:\n{tail}"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn control(sock: &Path, request: schema::vmm::Request) -> Result<schema::vmm::Response, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("control socket: {e}"))?;
    schema::vmm::call(&mut s, request).map_err(|e| format!("control request: {e}"))
}

/// Stop the VM and wait for its thread.
fn stop(
    sock: &Path,
    vm: std::thread::JoinHandle<Result<vmm::vstate::exit::ExitReason, String>>,
) -> Result<(), String> {
    control(sock, schema::vmm::Request::Shutdown)?;
    vm.join()
        .map_err(|_| "the VM thread panicked".to_owned())?
        .map(|_| ())
}

fn copy_sparse(from: &Path, to: &Path) -> Result<(), String> {
    let ok = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(())
        .ok_or_else(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

fn bench(dir: &Path, kernel: PathBuf, rootfs: PathBuf) -> Result<(), String> {
    let boots = env_count("SANDMESH_BENCH_BOOTS", 5);
    let restores = env_count("SANDMESH_BENCH_RESTORES", 10);
    let snapshot = dir.join("snap");
    let mut boot_samples = Vec::new();
    let mut first_overlay = None;
    for i in 0..boots {
        let d = dir.join(format!("boot{i}"));
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        let cfg = VmmConfig {
            kernel: kernel.clone(),
            rootfs: rootfs.clone(),
            overlay: Some(d.join("overlay")),
            vcpus: 1,
            memory_mib: MEMORY_MIB,
            cmdline_extra: None,
            vsock_uds: d.join("v.sock"),
            guest_cid: 3,
            control: d.join("c.sock"),
            console_log: d.join("console.log"),
            jail: None,
        };
        let t0 = Instant::now();
        let run_cfg = cfg.clone();
        let vm = std::thread::spawn(move || vmm::runner::run(&run_cfg).map_err(|e| e.to_string()));
        let ready = wait_ready(&cfg.vsock_uds, &cfg.console_log, t0)?;
        eprintln!("bench_linux: boot {i}: envd answered after {ready:?}");
        boot_samples.push(ready);
        if i == 0 {
            let saved = control(
                &cfg.control,
                schema::vmm::Request::Snapshot {
                    dir: snapshot.display().to_string(),
                    kind: schema::vmm::SnapshotKind::Full,
                    resume: false,
                },
            )?;
            if !matches!(saved, schema::vmm::Response::Snapshot { .. }) {
                return Err(format!("snapshot refused: {saved:?}"));
            }
            first_overlay = Some(d.join("overlay"));
        }
        stop(&cfg.control, vm)?;
    }
    json(
        "microvm: boot -> envd /health 204 (Linux, 1 vCPU, 512 MiB)",
        &boot_samples,
    );

    let overlay = first_overlay.ok_or("no boot was snapshotted")?;
    let mut restore_samples = Vec::new();
    for i in 0..restores {
        let d = dir.join(format!("restore{i}"));
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        // Each VM writes its own copy of the snapshot's disk layer.
        copy_sparse(&overlay, &d.join("overlay"))?;
        copy_sparse(&overlay.with_extension("map"), &d.join("overlay.map"))?;
        let cfg = RestoreConfig {
            snapshot: snapshot.clone(),
            overlay: Some(d.join("overlay")),
            rootfs: None,
            vsock_uds: d.join("v.sock"),
            control: d.join("c.sock"),
            console_log: d.join("console.log"),
            jail: None,
        };
        let t0 = Instant::now();
        let run_cfg = cfg.clone();
        let vm =
            std::thread::spawn(move || vmm::runner::restore(&run_cfg).map_err(|e| e.to_string()));
        let ready = wait_ready(&cfg.vsock_uds, &cfg.console_log, t0)?;
        eprintln!("bench_linux: restore {i}: envd answered after {ready:?}");
        restore_samples.push(ready);
        stop(&cfg.control, vm)?;
    }
    json(
        "microvm: restore from snapshot -> envd /health 204 (same guest)",
        &restore_samples,
    );
    Ok(())
}

fn main() {
    let probe = vmm::probe::probe_kvm();
    if !probe.native {
        eprintln!("bench_linux: skipped: {}", probe.reason);
        return;
    }
    let Some(artifacts) = schema::guest::GuestArtifacts::for_test("bench_linux") else {
        eprintln!("bench_linux: skipped: no guest artifacts manifest");
        return;
    };
    let dir = std::env::temp_dir().join(format!("sandmesh-bench-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = bench(
        &dir,
        artifacts.kernel.clone(),
        artifacts.rootfs_image.clone(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        eprintln!("bench_linux: {e}");
        std::process::exit(1);
    }
}
