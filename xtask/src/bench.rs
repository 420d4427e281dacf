//! `cargo xtask bench`: benchmarks, written to `BENCHMARKS.md`.
//!
//! Each benchmark reports median and p95 over its samples, with the machine
//! and the date. Benchmarks are never tests: nothing here fails on a slow
//! figure; the budgets are compared by reading the report.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use schema::guest::GuestArtifacts;

pub struct Sampled {
    pub name: String,
    pub runtime: String,
    pub samples: Vec<Duration>,
}

impl Sampled {
    fn percentile(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        let idx = ((s.len() as f64 - 1.0) * p).round() as usize;
        s[idx]
    }
}

/// One line of BENCHMARKS.md: a timed figure, or a single value.
enum Row {
    Timed(Sampled),
    Value {
        name: String,
        runtime: String,
        value: String,
    },
}

/// The node driven by the unmodified E2B SDK (`node/tests/sdk/bench_node.py`)
/// on the release `sandmesh` binary.
fn node_bench(root: &Path, manifest_path: &Path, python: &Path, s3s_fs: &Path) -> Result<Vec<Row>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run::status(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "node",
    ]))?;
    println!("bench node/tests/sdk/bench_node.py");
    let out = crate::run::output(
        Command::new(python)
            .current_dir(root)
            .arg("node/tests/sdk/bench_node.py")
            .env("SANDMESH_BIN", root.join("target/release/sandmesh"))
            .env(schema::guest::ARTIFACTS_ENV, manifest_path)
            .env(crate::s3s_fs::S3S_FS_ENV, s3s_fs)
            .stderr(Stdio::inherit()),
    )?;
    parse_rows(&out).context("reading bench_node.py")
}

/// Benchmark programs elsewhere in the workspace (run in release with the
/// artifact manifest); each prints JSON lines, see [`parse_rows`].
const PROGRAMS: &[(&str, &str)] = &[
    ("actors", "bench_gvisor"),
    ("vmm", "bench_restore"),
    ("mesh", "bench_mesh"),
];

pub fn run(
    root: &Path,
    manifest_path: &Path,
    manifest: &GuestArtifacts,
    python: &Path,
    s3s_fs: &Path,
    report: &Path,
) -> Result<()> {
    let envd = manifest.rootfs_dir.join("usr/local/bin/envd");
    let mut rows = vec![
        Row::Timed(envd_cold_start(&envd, 30)?),
        Row::Timed(envd_health_round_trip(&envd, 2000)?),
    ];
    for (package, example) in PROGRAMS {
        println!("bench {package}/{example}");
        let out = crate::run::output(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(root)
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "--package",
                    package,
                    "--example",
                    example,
                ])
                .env(schema::guest::ARTIFACTS_ENV, manifest_path)
                .stderr(Stdio::inherit()),
        )?;
        rows.extend(parse_rows(&out).with_context(|| format!("reading {package}/{example}"))?);
    }
    rows.extend(node_bench(root, manifest_path, python, s3s_fs)?);
    let mut md = String::from("# Benchmarks\n\n");
    md += &format!("- machine: {}\n", machine());
    md += &format!("- date: {}\n", date());
    md += "- written by `cargo xtask bench`; budgets are in DESIGN.md section 7\n\n";
    md += "| benchmark | runtime | samples | median | p95 |\n|---|---|---|---|---|\n";
    for r in &rows {
        let line = row_line(r);
        print!("{line}");
        md += &line;
    }
    // The L1 section is written by `--nested` alone (minutes of emulation):
    // kept as it was.
    if let Some(section) = std::fs::read_to_string(report)
        .ok()
        .and_then(|old| old.find(NESTED_HEADING).map(|i| old[i..].to_owned()))
    {
        md += "\n";
        md += &section;
    }
    std::fs::write(report, md).with_context(|| format!("writing {}", report.display()))?;
    println!("wrote {}", report.display());
    Ok(())
}

const NESTED_HEADING: &str = "## Linux microVMs inside the emulated L1 host";

/// `cargo xtask bench --nested`: `bench_restore` (the bare VM set-up to a
/// first guest instruction) and `bench_linux` (our guest booted and
/// restored to envd) run in one L1 (`nested.rs`), and the figures go to
/// BENCHMARKS.md's L1 section with their ratios: everything in L1 runs
/// under TCG, so only ratios between figures of the same run mean
/// something.
pub fn nested(
    root: &Path,
    manifest_path: &Path,
    manifest: &GuestArtifacts,
    firecracker: Option<&Path>,
    report: &Path,
) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run::status(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "vmm",
        "--example",
        "bench_restore",
        "--example",
        "bench_linux",
    ]))?;
    let cache = crate::cache::Cache::open()?;
    let l1 = crate::nested::build(&cache, false)?;
    let run_dir = root.join("target/nested/bench");
    let examples = root.join("target/release/examples");
    let mut script = format!(
        "export {env}='{manifest}'\n\
         '{ex}/bench_restore' > '{out}/restore.jsonl' || exit 1\n\
         '{ex}/bench_linux' > '{out}/linux.jsonl' || exit 1\n",
        env = schema::guest::ARTIFACTS_ENV,
        manifest = manifest_path.display(),
        ex = examples.display(),
        out = run_dir.display(),
    );
    if let Some(fc) = firecracker {
        let fc = std::path::absolute(fc)?;
        if !fc.is_file() {
            bail!("no Firecracker binary at {}", fc.display());
        }
        // The same guest, kernel command line and shape as bench_linux.
        script += &format!(
            "FC_BIN='{fc}' KERNEL='{kernel}' ROOTFS='{rootfs}' N=5 \
             BOOT_ARGS='{cmdline}' bash '{sh}' > '{out}/firecracker.jsonl' || exit 1\n",
            fc = fc.display(),
            kernel = manifest.kernel.display(),
            rootfs = manifest.rootfs_image.display(),
            cmdline = vmm::runner::BASE_CMDLINE,
            sh = root.join("xtask/bench/firecracker.sh").display(),
            out = run_dir.display(),
        );
    }
    let started = Instant::now();
    let code = crate::nested::run_in(
        &l1,
        &crate::nested::RunSpec {
            script: &script,
            cwd: root,
            timeout: Duration::from_secs(1500),
            run_dir: &run_dir,
            cpus: 1,
            memory_mib: 6144,
        },
    )?
    .code;
    if code != 0 {
        bail!("the benchmarks failed in L1 (status {code}); see the l1| lines above");
    }
    let read = |f: &str| -> Result<Vec<Row>> {
        let text = std::fs::read_to_string(run_dir.join(f))
            .with_context(|| format!("reading {f} from L1"))?;
        parse_rows(&text)
    };
    let tiny = read("restore.jsonl")?;
    let linux = read("linux.jsonl")?;
    let fc = match firecracker {
        Some(_) => read("firecracker.jsonl")?,
        None => Vec::new(),
    };
    let timed = |rows: &[Row], prefix: &str| -> Option<Duration> {
        rows.iter().find_map(|r| match r {
            Row::Timed(s) if s.name.starts_with(prefix) => Some(s.percentile(0.5)),
            _ => None,
        })
    };
    let setup = timed(&tiny, "vmm cold start").context("bench_restore gave no cold start")?;
    let tiny_restore =
        timed(&tiny, "vmm restore tiny guest, fresh").context("bench_restore gave no restore")?;
    let boot = timed(&linux, "microvm: boot").context("bench_linux gave no boot")?;
    let restore = timed(&linux, "microvm: restore").context("bench_linux gave no restore")?;
    let ratio = |a: Duration, b: Duration| {
        let r = a.as_secs_f64() / b.as_secs_f64();
        if r < 10.0 {
            format!("{r:.1}x")
        } else {
            format!("{r:.0}x")
        }
    };
    let mut md = format!(
        "{NESTED_HEADING}\n\n- machine: {} running QEMU {} TCG (`-cpu {}`, 1 vCPU, 6 GiB), \
         L1 kernel {}, `kvm_amd vgif=0`\n- date: {}; L1 run {:.0} s\n\
         - written by `cargo xtask bench --nested`. Everything below runs emulated, so \
         only the ratios are comparable with a real host. {}\n\n\
         | benchmark | runtime | samples | median | p95 |\n|---|---|---|---|---|\n",
        machine(),
        crate::nested::qemu_version().unwrap_or_else(|_| "?".into()),
        crate::nested::L1_CPU,
        l1.kernel_version,
        date(),
        started.elapsed().as_secs_f64(),
        match firecracker {
            Some(_) =>
                "Firecracker (built from its source for this measurement only, \
                        glibc build without its seccomp filter, never part of this \
                        repository) boots and loads the same guest in the same L1: \
                        each sample from its process launch through its API calls \
                        (curl), ours from `runner::run` / `runner::restore` in a \
                        running process.",
            None =>
                "Firecracker was not run beside ours this time \
                     (`--firecracker BIN` runs it).",
        },
    );
    let mut rows: Vec<Row> = tiny
        .into_iter()
        .filter(|r| matches!(r, Row::Timed(s) if s.name.starts_with("vmm cold start") || s.name.starts_with("vmm restore tiny guest, fresh")))
        .collect();
    rows.extend(linux);
    rows.push(Row::Value {
        name: "boot -> envd / bare VM set-up to first instruction, p50 ratio".into(),
        runtime: "microvm".into(),
        value: ratio(boot, setup),
    });
    rows.push(Row::Value {
        name: "restore -> envd / bare VM set-up to first instruction, p50 ratio".into(),
        runtime: "microvm".into(),
        value: ratio(restore, setup),
    });
    rows.push(Row::Value {
        name: "restore -> envd / tiny-guest restore in a fresh process, p50 ratio".into(),
        runtime: "microvm".into(),
        value: ratio(restore, tiny_restore),
    });
    rows.push(Row::Value {
        name: "boot -> envd / restore -> envd, p50 ratio".into(),
        runtime: "microvm".into(),
        value: ratio(boot, restore),
    });
    if let (Some(fc_boot), Some(fc_load)) = (
        timed(&fc, "firecracker: boot"),
        timed(&fc, "firecracker: snapshot load"),
    ) {
        let fine = |a: Duration, b: Duration| format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64());
        rows.extend(fc);
        rows.push(Row::Value {
            name: "ours / Firecracker: boot -> envd, p50 ratio".into(),
            runtime: "microvm".into(),
            value: fine(boot, fc_boot),
        });
        rows.push(Row::Value {
            name: "ours / Firecracker: restore (snapshot load) -> envd, p50 ratio".into(),
            runtime: "microvm".into(),
            value: fine(restore, fc_load),
        });
    }
    for r in &rows {
        let line = row_line(r);
        print!("{line}");
        md += &line;
    }
    let old = std::fs::read_to_string(report).unwrap_or_default();
    let head = match old.find(NESTED_HEADING) {
        Some(i) => old[..i].trim_end().to_owned(),
        None => old.trim_end().to_owned(),
    };
    std::fs::write(report, format!("{head}\n\n{md}"))
        .with_context(|| format!("writing {}", report.display()))?;
    println!("wrote {}", report.display());
    Ok(())
}

fn row_line(r: &Row) -> String {
    match r {
        Row::Timed(r) => format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            r.runtime,
            r.samples.len(),
            fmt(r.percentile(0.5)),
            fmt(r.percentile(0.95))
        ),
        Row::Value {
            name,
            runtime,
            value,
        } => format!("| {name} | {runtime} | - | {value} | - |\n"),
    }
}

/// `{"name", "runtime", "samples_ns": [..]}` or `{"name", "runtime", "value"}`
/// per line; other lines are ignored (a program may log to stdout).
fn parse_rows(out: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {k} in {line}"))
        };
        let (name, runtime) = (text("name")?, text("runtime")?);
        if let Some(samples) = v["samples_ns"].as_array() {
            let samples: Vec<Duration> = samples
                .iter()
                .filter_map(|s| s.as_u64())
                .map(Duration::from_nanos)
                .collect();
            if samples.is_empty() {
                bail!("no samples in {line}");
            }
            rows.push(Row::Timed(Sampled {
                name,
                runtime,
                samples,
            }));
        } else {
            rows.push(Row::Value {
                name,
                runtime,
                value: text("value")?,
            });
        }
    }
    Ok(rows)
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

/// Spawn of the packaged (static) envd until `GET /health` answers 204.
fn envd_cold_start(envd: &Path, n: usize) -> Result<Sampled> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let mut child = Command::new(envd)
            .args(["--listen", "127.0.0.1:0", "--no-vsock"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", envd.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("envd listening on tcp ")
            .map(str::to_owned);
        let result = addr
            .context("envd printed no readiness line")
            .and_then(|addr| {
                let mut conn = TcpStream::connect(&addr)?;
                health(&mut conn)
            });
        samples.push(started.elapsed());
        let _ = child.kill();
        let _ = child.wait();
        result?;
    }
    Ok(Sampled {
        name: "envd spawn -> /health 204".into(),
        runtime: "host process".into(),
        samples,
    })
}

/// One keep-alive connection, `GET /health` after `GET /health`.
fn envd_health_round_trip(envd: &Path, n: usize) -> Result<Sampled> {
    let mut child = Command::new(envd)
        .args(["--listen", "127.0.0.1:0", "--no-vsock"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("envd listening on tcp ")
        .unwrap_or_default()
        .to_owned();
    let run = || -> Result<Vec<Duration>> {
        let mut conn = TcpStream::connect(&addr)?;
        conn.set_nodelay(true)?;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            health(&mut conn)?;
            samples.push(started.elapsed());
        }
        Ok(samples)
    };
    let samples = run();
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sampled {
        name: "envd GET /health round trip (keep-alive)".into(),
        runtime: "host process".into(),
        samples: samples?,
    })
}

/// Send one `GET /health` and read the response head (204 has no body).
fn health(conn: &mut TcpStream) -> Result<()> {
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: envd\r\n\r\n")?;
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            bail!("envd closed the connection");
        }
        buf.push(byte[0]);
    }
    if !buf.starts_with(b"HTTP/1.1 204") {
        bail!("unexpected response: {}", String::from_utf8_lossy(&buf));
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0));
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB")
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
