//! Benchmarks of the gvisor runtime, run by `cargo xtask bench`.
//!
//! Prints one JSON object per line: `{"name", "runtime", "samples_ns": [..]}`
//! for timed figures, `{"name", "runtime", "value"}` for single values.
//! Needs root, runsc and the guest artifacts (`SANDMESH_GUEST_ARTIFACTS`).

use std::time::Duration;

use actors::runtime::gvisor::GvisorRuntime;
use actors::runtime::{Limits, Runtime, SandboxId, Template, TemplateId};
use schema::guest::GuestArtifacts;
use serde_json::json;

const CREATES: usize = 20;
const IDLE: usize = 10;

fn timed(name: &str, samples: &[Duration]) {
    let ns: Vec<u128> = samples.iter().map(Duration::as_nanos).collect();
    println!(
        "{}",
        json!({ "name": name, "runtime": "gvisor", "samples_ns": ns })
    );
}

fn value(name: &str, value: String) {
    println!(
        "{}",
        json!({ "name": name, "runtime": "gvisor", "value": value })
    );
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let artifacts = GuestArtifacts::from_env()
        .ok_or("SANDMESH_GUEST_ARTIFACTS is not set (run through `cargo xtask bench`)")??;
    let data = std::env::temp_dir().join(format!("sandmesh-bench-gvisor-{}", std::process::id()));
    let rt = GvisorRuntime::new(&data)?;
    let base = Template {
        id: TemplateId::new("base")?,
        rootfs_dir: artifacts.rootfs_dir.clone(),
        rootfs_image: None,
        snapshot: None,
    };
    let template = rt.prepare_template(&base, Limits::default()).await?;

    // Create from the template snapshot until envd answers, and the raw
    // `runsc restore` inside each of those creates.
    let (mut ready, mut raw) = (Vec::new(), Vec::new());
    for i in 0..CREATES {
        let id = SandboxId::new(format!("bench-{i}"))?;
        let inst = rt.create(&id, &template, Limits::default()).await?;
        ready.push(inst.ready_after);
        raw.push(inst.runtime_start);
        rt.kill(&id).await?;
    }
    timed(
        "gvisor: create from template snapshot -> envd healthy",
        &ready,
    );
    timed("gvisor: raw `runsc restore` alone (same creates)", &raw);
    let ratio = median(ready).as_secs_f64() / median(raw).as_secs_f64().max(1e-9);
    value(
        "gvisor: create / raw restore, p50 ratio",
        format!("{ratio:.2}x"),
    );

    // Idle memory: IDLE sandboxes restored from the template, left alone.
    let before = mem_available();
    let mut ids = Vec::new();
    for i in 0..IDLE {
        let id = SandboxId::new(format!("idle-{i}"))?;
        rt.create(&id, &template, Limits::default()).await?;
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = mem_available();
    let mut pss = 0u64;
    let mut rss = 0u64;
    for id in &ids {
        let u = rt.usage(id).await?;
        pss += u.memory_pss_bytes;
        rss += u.memory_rss_bytes;
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    value(
        "gvisor: host memory per idle sandbox (PSS; RSS)",
        format!(
            "{:.1} MiB; {:.1} MiB (mean of {IDLE})",
            mib(pss / IDLE as u64),
            mib(rss / IDLE as u64)
        ),
    );
    let per_sandbox = before.saturating_sub(after) / IDLE as u64;
    let headroom = before.saturating_sub(2 << 30);
    let fit = headroom.checked_div(per_sandbox).unwrap_or(0);
    value(
        "gvisor: idle sandboxes that fit before 2 GiB free (estimate)",
        format!(
            "~{fit} ({:.1} MiB MemAvailable each, measured over {IDLE}; {:.1} GiB available at start)",
            mib(per_sandbox),
            before as f64 / (1u64 << 30) as f64
        ),
    );
    for id in &ids {
        rt.kill(id).await?;
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
