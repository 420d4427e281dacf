//! Running external commands: plainly, or with a progress line for long builds.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

/// Run `cargo <args>` in `root` with extra environment, inheriting the terminal.
pub fn cargo(root: &Path, args: &[&str], env: &[(&str, String)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    status(&mut cmd)
}

/// Run a command with inherited stdio; fail with its command line on error.
pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("command failed ({st}): {shown}");
    }
    Ok(())
}

/// Run a command with output captured; return stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "command failed ({}): {shown}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a long command with its output going to `log`, showing a progress
/// line: `label`, the number of output lines matching `is_step`, and the
/// elapsed time. On failure the log's tail is printed.
pub fn with_progress(
    cmd: &mut Command,
    label: &str,
    log: &Path,
    is_step: impl Fn(&str) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let mut log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{elapsed_precise}] {pos} steps  {wide_msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(250));
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // No terminal (CI): print a line every so often instead of redrawing.
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    // Merge stderr into the same stream of lines.
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let stdout = child.stdout.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut steps = 0u64;
    let mut last_report = Instant::now();
    for line in rx {
        writeln!(log_file, "{line}")?;
        if is_step(&line) {
            steps += 1;
            bar.set_position(steps);
            bar.set_message(line.trim().to_owned());
        }
        if bar.is_hidden() && last_report.elapsed() >= Duration::from_secs(30) {
            println!(
                "  {label}: {steps} steps, {:.0}s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let _ = out_thread.join();
    let _ = err_thread.join();
    let st = child.wait()?;
    bar.finish_and_clear();
    if !st.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for l in tail.into_iter().rev() {
            eprintln!("  | {l}");
        }
        bail!(
            "{label} failed ({st}) after {:.0}s: {shown}; full log above and in {}",
            started.elapsed().as_secs_f64(),
            log.display()
        );
    }
    let took = started.elapsed();
    println!(
        "  {label}: done, {steps} steps in {:.1}s",
        took.as_secs_f64()
    );
    Ok(took)
}
