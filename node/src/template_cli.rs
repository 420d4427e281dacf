//! `sandmesh template build`: a Dockerfile built into a template by a node,
//! over E2B's template build API, as the Python SDK's `Template.build`
//! (`e2b/template_sync/main.py`, `build_api.py`) does it:
//!
//! 1. `POST /v3/templates {name, cpuCount, memoryMB}` -> template and
//!    build ids;
//! 2. for each COPY step, `GET /templates/{id}/files/{hash}`; when the
//!    files are not `present`, `PUT` a tar.gz of them to the `url` it
//!    returns, with its `headers` and an explicit Content-Length;
//! 3. `POST /v2/templates/{id}/builds/{buildID}` with the steps;
//! 4. `GET /templates/{id}/builds/{buildID}/status?logsOffset=N` every
//!    200 ms, printing each new log entry, until `ready` or `error`.
//!
//! The files of a COPY step are chosen as the SDK's
//! `get_all_files_in_path` chooses them: the source (a path or a glob with
//! `*`, `?`, `[...]` and `**`, relative to the context) and, for a
//! directory, everything under it, less what `.dockerignore` excludes;
//! symlinks are not followed. The hash ([`files_hash`]) and the archive
//! ([`write_tar_gz`]) are the SDK's too, so the same context gives the same
//! hash (and hits the same cache) from either client.

use std::collections::BTreeSet;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use schema::dockerfile::{CopySource, Dockerfile};
use schema::e2b::{ApiError, TemplateBuildStatus};
use schema::template::{BuildLogEntry, BuildRequest, BuildRequestAnswer, BuildStatus, FileUpload};
use sha2::{Digest, Sha256};

/// How often the build status is asked for (the SDK's
/// `_logs_refresh_frequency`).
const POLL: Duration = Duration::from_millis(200);
/// One API call (not the upload).
const TIMEOUT: Duration = Duration::from_secs(60);
/// An upload (the SDK's `FILE_UPLOAD_TIMEOUT_SECONDS`).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// `sandmesh template build`'s own arguments (the node's address and API
/// key come with the command's other remote arguments).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct BuildArgs {
    /// The Dockerfile (default: `CONTEXT/Dockerfile`, or `./Dockerfile`).
    #[arg(short = 'f', long = "file", value_name = "DOCKERFILE")]
    pub file: Option<PathBuf>,
    /// Name of the template: `name` or `name:tag`.
    #[arg(long, visible_alias = "name", value_name = "NAME")]
    pub alias: String,
    /// vCPUs of each sandbox made from the template.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub cpu: Option<u32>,
    /// Memory of each sandbox made from the template, in MiB.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_mb: Option<u64>,
    /// Rebuild every step, ignoring the layer cache.
    #[arg(long)]
    pub skip_cache: bool,
    /// A command that succeeds once the CMD/ENTRYPOINT is ready; the
    /// template is saved then (default for a Dockerfile with a CMD: E2B's
    /// `sleep 20`).
    #[arg(long, value_name = "COMMAND")]
    pub ready_cmd: Option<String>,
    /// Build only when no template of this name (and tag) exists yet: for
    /// set-up scripts run again and again (`cargo xtask up`, Ansible).
    #[arg(long)]
    pub if_missing: bool,
    /// The directory COPY sources are relative to (default: the
    /// Dockerfile's directory).
    pub context: Option<PathBuf>,
}

impl BuildArgs {
    /// The Dockerfile and the context directory.
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        match (&self.file, &self.context) {
            (Some(f), Some(c)) => (f.clone(), c.clone()),
            (Some(f), None) => {
                let dir = f.parent().filter(|p| !p.as_os_str().is_empty());
                (f.clone(), dir.unwrap_or(Path::new(".")).to_path_buf())
            }
            (None, Some(c)) => (c.join("Dockerfile"), c.clone()),
            (None, None) => (PathBuf::from("Dockerfile"), PathBuf::from(".")),
        }
    }
}

/// Read and convert the Dockerfile, and hash each COPY step's files.
pub fn prepare(dockerfile: &Path, context: &Path, skip_cache: bool) -> Result<Dockerfile> {
    let text = std::fs::read_to_string(dockerfile)
        .with_context(|| format!("reading {}", dockerfile.display()))?;
    let mut d = schema::dockerfile::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dockerfile.display()))?;
    if !context.is_dir() {
        bail!("the build context {} is not a directory", context.display());
    }
    let ignore = Ignore::new(&read_dockerignore(context)?);
    for c in &d.copies {
        let files =
            step_files(context, &c.src, &ignore).map_err(|e| copy_error(dockerfile, c, e))?;
        let hash = files_hash(context, &c.src, &c.dest, &files)
            .map_err(|e| copy_error(dockerfile, c, e))?;
        d.start.steps[c.step].files_hash = Some(hash);
    }
    d.start.force = skip_cache;
    Ok(d)
}

fn copy_error(dockerfile: &Path, c: &CopySource, e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: line {}: COPY {}: {e:#}",
        dockerfile.display(),
        c.line,
        c.src
    )
}

/// The patterns of `CONTEXT/.dockerignore` (comments and blank lines
/// dropped), none when it is absent.
pub fn read_dockerignore(context: &Path) -> Result<Vec<String>> {
    let path = context.join(".dockerignore");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
        .collect())
}

/// `.dockerignore` patterns: relative to the context, a match on a
/// directory excludes what is under it, `!` re-includes, the last matching
/// pattern decides.
#[derive(Debug, Default)]
pub struct Ignore {
    /// (negated, pattern segments).
    patterns: Vec<(bool, Vec<String>)>,
}

impl Ignore {
    pub fn new(lines: &[String]) -> Self {
        let patterns = lines
            .iter()
            .filter_map(|l| {
                let (neg, p) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l.as_str()),
                };
                let segs = normalize(p);
                (!segs.is_empty()).then_some((neg, segs))
            })
            .collect();
        Self { patterns }
    }

    /// Whether `rel` (`a/b`, relative to the context) is excluded.
    pub fn matches(&self, rel: &str) -> bool {
        let path: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for (neg, pat) in &self.patterns {
            // The path or one of its parents.
            let hit = (1..=path.len()).any(|n| glob_segments(pat, &path[..n]));
            if hit {
                excluded = !neg;
            }
        }
        excluded
    }

    /// Whether an excluded directory may hold re-included paths (so it
    /// must be walked anyway).
    fn may_match_under(&self) -> bool {
        self.patterns.iter().any(|(neg, _)| *neg)
    }
}

/// Path segments with `.` dropped, `..` applied and a leading `/` ignored.
fn normalize(p: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_owned()),
        }
    }
    out
}

/// A glob over path segments: `**` is any number of segments.
fn glob_segments(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => {
            (0..=path.len()).any(|skip| glob_segments(rest, &path[skip..]))
        }
        Some((p, rest)) => match path.split_first() {
            Some((s, tail)) => glob_one(p.as_bytes(), s.as_bytes()) && glob_segments(rest, tail),
            None => false,
        },
    }
}

/// One segment: `*`, `?`, `[a-z]`, `[!x]`/`[^x]`, `\x`.
fn glob_one(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(pi + 1),
            Some(b'[') => class(&p[pi..], s[si])
                .map(|(ok, len)| ok.then_some(pi + len))
                .unwrap_or(
                    // An unclosed `[` matches itself.
                    (s[si] == b'[').then_some(pi + 1),
                ),
            Some(b'\\') if pi + 1 < p.len() => (p[pi + 1] == s[si]).then_some(pi + 2),
            Some(&c) => (c == s[si]).then_some(pi + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                si += 1;
            }
            (None, Some((sp, ss))) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at the start of `p`: (matches, its length).
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut ok = false;
    let mut first = true;
    loop {
        let &x = p.get(i)?;
        if x == b']' && !first {
            return Some((ok != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&y| y != b']') {
            ok |= (x..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            ok |= x == c;
            i += 1;
        }
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The files of a COPY step, relative to the context (`.` for the context
/// itself), directories included, sorted as the SDK sorts them.
pub fn step_files(context: &Path, src: &str, ignore: &Ignore) -> Result<Vec<String>> {
    schema::dockerfile::check_source(src).map_err(anyhow::Error::msg)?;
    let segs = normalize(src);
    let rel_of = |segs: &[String]| {
        if segs.is_empty() {
            ".".to_owned()
        } else {
            segs.join("/")
        }
    };
    let mut matches: Vec<String> = Vec::new();
    if segs.iter().any(|s| has_glob(s)) {
        // Walk from the longest plain prefix, matching every path.
        let fixed = segs.iter().take_while(|s| !has_glob(s)).count();
        let pat = &segs[fixed..];
        let base = rel_of(&segs[..fixed]);
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(context.join(&dir)) else {
                continue;
            };
            for e in entries {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                let rel = if dir == "." {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                let parts: Vec<&str> = rel.split('/').skip(fixed).collect();
                if glob_segments(pat, &parts) {
                    matches.push(rel.clone());
                }
                if e.file_type()?.is_dir() {
                    stack.push(rel);
                }
            }
        }
    } else {
        let rel = rel_of(&segs);
        if std::fs::symlink_metadata(context.join(&rel)).is_ok() {
            matches.push(rel);
        }
    }
    // Parents before their children.
    matches.sort_by_key(|m| {
        if m == "." {
            0
        } else {
            m.matches('/').count() + 1
        }
    });
    let mut files = BTreeSet::new();
    let mut walked: Vec<String> = Vec::new();
    for rel in matches {
        let under_walked = walked.iter().any(|w| {
            w == "."
                || rel
                    .strip_prefix(w.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        });
        if under_walked || (rel != "." && ignore.matches(&rel)) {
            continue;
        }
        let meta = std::fs::symlink_metadata(context.join(&rel))?;
        files.insert(sort_key(&rel));
        if meta.is_dir() {
            walk(context, &rel, ignore, &mut files)?;
            walked.push(rel);
        }
    }
    if files.is_empty() {
        bail!(
            "no files in the build context {} match it",
            context.display()
        );
    }
    Ok(files.into_iter().map(from_sort_key).collect())
}

/// The SDK sorts absolute paths: the context itself first.
fn sort_key(rel: &str) -> String {
    if rel == "." {
        String::new()
    } else {
        rel.to_owned()
    }
}

fn from_sort_key(k: String) -> String {
    if k.is_empty() { ".".into() } else { k }
}

fn walk(context: &Path, dir: &str, ignore: &Ignore, files: &mut BTreeSet<String>) -> Result<()> {
    let entries = std::fs::read_dir(context.join(dir))
        .with_context(|| format!("reading {}", context.join(dir).display()))?;
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if dir == "." {
            name
        } else {
            format!("{dir}/{name}")
        };
        let ignored = ignore.matches(&rel);
        if !ignored {
            files.insert(rel.clone());
        }
        if e.file_type()?.is_dir() && (!ignored || ignore.may_match_under()) {
            walk(context, &rel, ignore, files)?;
        }
    }
    Ok(())
}

/// Lowercase hex SHA-256, as the SDK's `calculate_files_hash` computes it:
/// `COPY {src} {dest}`, then for each file in [`step_files`]' order its
/// relative path, its `st_mode` in decimal, its size in decimal (not for a
/// directory), and then a symlink's target or a regular file's content.
/// Owners and times are left out so that a hash is the same on every
/// machine.
pub fn files_hash(context: &Path, src: &str, dest: &str, files: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("COPY {src} {dest}"));
    let mut buf = vec![0u8; 1 << 20];
    for rel in files {
        let path = context.join(rel);
        h.update(rel.as_bytes());
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        h.update(meta.mode().to_string());
        if !meta.is_dir() {
            h.update(meta.size().to_string());
        }
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            h.update(target.as_os_str().as_encoded_bytes());
        } else if meta.is_file() {
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// A gzipped tar of `files` (from [`step_files`]), each under its path
/// relative to the context, not recursing and not following symlinks (the
/// SDK's `tar_file_stream`).
pub fn write_tar_gz<W: Write>(context: &Path, files: &[String], out: W) -> Result<W> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    for rel in files {
        if rel == "." {
            // The context itself: its entries carry everything.
            continue;
        }
        tar.append_path_with_name(context.join(rel), rel)
            .with_context(|| format!("archiving {rel}"))?;
    }
    Ok(tar.into_inner()?.finish()?)
}

/// The node's REST API.
struct Api {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl Api {
    fn new(url: &str, api_key: &str) -> Result<Self> {
        // The workspace's reqwest has rustls without a provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let mut base = url.trim_end_matches('/').to_owned();
        if !base.contains("://") {
            base = format!("http://{base}");
        }
        Ok(Self {
            http,
            base,
            api_key: api_key.to_owned(),
        })
    }

    /// One request to the node: its status and body, whatever the status.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("x-api-key", &self.api_key)
            .timeout(TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "{method} {path}: reaching the node at {} (see --url)",
                self.base
            )
        })?;
        let status = resp.status();
        Ok((status, resp.bytes().await?))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T> {
        let (status, bytes) = self.send(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &bytes));
        }
        if bytes.is_empty() {
            // `POST .../builds/{id}` answers 202 with no body.
            return serde_json::from_slice(b"null")
                .with_context(|| format!("{method} {path}: an empty answer"));
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!("{method} {path}: the answer is not what this sandmesh expects")
        })
    }

    /// The id of the template `alias` names, if it exists.
    async fn existing_template(&self, alias: &str) -> Result<Option<String>> {
        let path = format!(
            "/templates/aliases/{}",
            alias
                .replace('%', "%25")
                .replace('/', "%2F")
                .replace(':', "%3A")
        );
        let (status, bytes) = self.send(reqwest::Method::GET, &path, None::<&()>).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &bytes));
        }
        let answer: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("GET {path}: the answer is not JSON"))?;
        Ok(Some(
            answer["templateID"].as_str().unwrap_or(alias).to_owned(),
        ))
    }

    /// PUT a file to an upload link, with its headers and a Content-Length
    /// (no chunked encoding: S3 presigned URLs refuse it).
    async fn upload(&self, link: &FileUpload, file: std::fs::File, len: u64) -> Result<()> {
        let Some(url) = &link.url else {
            bail!("the node gave no upload link");
        };
        let url = if url.starts_with('/') {
            format!("{}{url}", self.base)
        } else {
            url.clone()
        };
        let mut req = self.http.put(&url).timeout(UPLOAD_TIMEOUT);
        for (k, v) in link.headers.iter().flatten() {
            if !k.eq_ignore_ascii_case("content-length") {
                req = req.header(k, v);
            }
        }
        let resp = req
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::from(tokio::fs::File::from_std(file)))
            .send()
            .await
            .context("uploading the files")?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status.as_u16(), &body));
        }
        Ok(())
    }
}

/// E2B's error body, `{code, message}`; anything else as text.
fn api_error(status: u16, body: &[u8]) -> anyhow::Error {
    let message = serde_json::from_slice::<ApiError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    if status == 401 {
        anyhow::anyhow!(
            "the node refused the API key ({message}): pass --api-key or set E2B_API_KEY"
        )
    } else {
        anyhow::anyhow!("{message} (HTTP {status})")
    }
}

/// A line above the spinner; on standard error when there is no spinner
/// (not a terminal), where indicatif would drop it.
fn say(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

fn print_entry(pb: &indicatif::ProgressBar, e: &BuildLogEntry) {
    let level = serde_json::to_value(e.level)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    say(pb, format!("{} {:<5} {}", e.timestamp, level, e.message));
}

/// `sandmesh template build`: what it prints at the end.
pub async fn build(url: &str, api_key: &str, args: &BuildArgs) -> Result<String> {
    let started = Instant::now();
    let (dockerfile, context) = args.paths();
    let mut d = prepare(&dockerfile, &context, args.skip_cache)?;
    if let Some(ready) = &args.ready_cmd {
        d.start.ready_cmd = Some(ready.clone());
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(Duration::from_millis(100));
    for w in &d.warnings {
        say(&pb, format!("warning: {}: {w}", dockerfile.display()));
    }
    let api = Api::new(url, api_key)?;
    if args.if_missing
        && let Some(id) = api.existing_template(&args.alias).await?
    {
        pb.finish_and_clear();
        println!("template {} exists (id {id}); nothing to build", args.alias);
        return Ok(id);
    }

    pb.set_message(format!("requesting a build of {}", args.alias));
    let answer: BuildRequestAnswer = api
        .call(
            reqwest::Method::POST,
            "/v3/templates",
            Some(&BuildRequest {
                name: Some(args.alias.clone()),
                cpu_count: args.cpu,
                memory_mb: args.memory_mb,
                ..Default::default()
            }),
        )
        .await?;
    let id = answer.template_id.clone();
    let build_id = answer.build_id.clone();
    say(&pb, format!("template {id}, build {build_id}"));

    let ignore = Ignore::new(&read_dockerignore(&context)?);
    for c in &d.copies {
        let step = &d.start.steps[c.step];
        let hash = step.files_hash.as_deref().unwrap_or_default();
        let link: FileUpload = api
            .call(
                reqwest::Method::GET,
                &format!("/templates/{}/files/{hash}", path_param(&id)),
                None::<&()>,
            )
            .await?;
        // The SDK uploads when the node has a link and either lacks the
        // files or the step forces it.
        let upload = link.url.is_some() && (!link.present || step.force_upload == Some(true));
        if !upload {
            say(
                &pb,
                format!("skipping upload of '{}', already cached", c.src),
            );
            continue;
        }
        pb.set_message(format!("uploading '{}'", c.src));
        let files = step_files(&context, &c.src, &ignore)?;
        let mut tmp = write_tar_gz(&context, &files, tempfile::tempfile()?)?;
        let len = tmp.stream_position()?;
        tmp.rewind()?;
        api.upload(&link, tmp, len)
            .await
            .with_context(|| format!("uploading '{}'", c.src))?;
        say(&pb, format!("uploaded '{}' ({len} bytes)", c.src));
    }

    pb.set_message("starting the build");
    let _: serde_json::Value = api
        .call(
            reqwest::Method::POST,
            &format!(
                "/v2/templates/{}/builds/{}",
                path_param(&id),
                path_param(&build_id)
            ),
            Some(&d.start),
        )
        .await?;

    pb.set_message("building");
    let mut offset = 0usize;
    loop {
        let status: BuildStatus = api
            .call(
                reqwest::Method::GET,
                &format!(
                    "/templates/{}/builds/{}/status?logsOffset={offset}",
                    path_param(&id),
                    path_param(&build_id)
                ),
                None::<&()>,
            )
            .await?;
        offset += status.log_entries.len();
        for e in &status.log_entries {
            print_entry(&pb, e);
        }
        match status.status {
            TemplateBuildStatus::Building | TemplateBuildStatus::Waiting => {
                tokio::time::sleep(POLL).await;
                continue;
            }
            TemplateBuildStatus::Ready | TemplateBuildStatus::Error => {
                // At most 100 entries an answer: drain the rest.
                let mut last = status.log_entries.len();
                while last > 0 {
                    let more: BuildStatus = api
                        .call(
                            reqwest::Method::GET,
                            &format!(
                                "/templates/{}/builds/{}/status?logsOffset={offset}",
                                path_param(&id),
                                path_param(&build_id)
                            ),
                            None::<&()>,
                        )
                        .await?;
                    offset += more.log_entries.len();
                    last = more.log_entries.len();
                    for e in &more.log_entries {
                        print_entry(&pb, e);
                    }
                }
                pb.finish_and_clear();
                if status.status == TemplateBuildStatus::Ready {
                    return Ok(format!(
                        "built template {} (id {id}), build {build_id}, in {:.1} s",
                        args.alias,
                        started.elapsed().as_secs_f64()
                    ));
                }
                let reason = status
                    .reason
                    .unwrap_or(schema::template::BuildStatusReason {
                        message: "the build failed".into(),
                        step: None,
                        log_entries: vec![],
                    });
                let mut msg = reason.message.clone();
                if let Some(step) = &reason.step {
                    msg = format!("step {step}: {msg}");
                }
                for e in &reason.log_entries {
                    msg.push_str(&format!("\n  {} {}", e.timestamp, e.message));
                }
                bail!("building {} failed: {msg}", args.alias);
            }
        }
    }
}

/// A path segment, percent-encoded as the SDK's `encode_path_param` does.
fn path_param(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BuildArgs,
    }

    fn args(argv: &[&str]) -> BuildArgs {
        Cli::try_parse_from(std::iter::once("build").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn arguments() {
        let a = args(&[
            "-f",
            "dir/Dockerfile.dev",
            "--alias",
            "web",
            "--cpu",
            "2",
            "--memory-mb",
            "1024",
            "--skip-cache",
        ]);
        assert_eq!(a.alias, "web");
        assert_eq!(
            (a.cpu, a.memory_mb, a.skip_cache),
            (Some(2), Some(1024), true)
        );
        assert_eq!(a.paths(), ("dir/Dockerfile.dev".into(), "dir".into()));
        let a = args(&["--name", "web:v1", "ctx"]);
        assert_eq!(a.alias, "web:v1");
        assert_eq!(a.paths(), ("ctx/Dockerfile".into(), "ctx".into()));
        let a = args(&["-f", "Dockerfile", "--alias", "x"]);
        assert_eq!(a.paths(), ("Dockerfile".into(), ".".into()));
        let a = args(&["-f", "a/Dockerfile", "--alias", "x", "b"]);
        assert_eq!(a.paths(), ("a/Dockerfile".into(), "b".into()));
        assert!(
            Cli::try_parse_from(["build", "ctx"]).is_err(),
            "--alias is required"
        );
        assert!(Cli::try_parse_from(["build", "--alias", "x", "--cpu", "0"]).is_err());
    }

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("app/sub")).unwrap();
        std::fs::create_dir_all(p.join("app/node_modules/x")).unwrap();
        std::fs::write(p.join("app/main.py"), "print(1)\n").unwrap();
        std::fs::write(p.join("app/sub/util.py"), "x = 2\n").unwrap();
        std::fs::write(p.join("app/node_modules/x/i.js"), "1").unwrap();
        std::fs::write(p.join("app/keep.log"), "k").unwrap();
        std::fs::write(p.join("app/drop.log"), "d").unwrap();
        std::fs::write(p.join("other.txt"), "o").unwrap();
        std::os::unix::fs::symlink("main.py", p.join("app/link.py")).unwrap();
        std::fs::write(
            p.join(".dockerignore"),
            "# c\n**/node_modules\n*.log\n!app/keep.log\napp/*.log\n!app/keep.log\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn step_files_are_the_sources_less_dockerignore() {
        let dir = context();
        let ignore = Ignore::new(&read_dockerignore(dir.path()).unwrap());
        let files = step_files(dir.path(), "./app", &ignore).unwrap();
        assert_eq!(
            files,
            [
                "app",
                "app/keep.log",
                "app/link.py",
                "app/main.py",
                "app/sub",
                "app/sub/util.py"
            ]
        );
        let files = step_files(dir.path(), "app/**/*.py", &ignore).unwrap();
        assert_eq!(files, ["app/link.py", "app/main.py", "app/sub/util.py"]);
        let files = step_files(dir.path(), "*.txt", &ignore).unwrap();
        assert_eq!(files, ["other.txt"]);
        assert!(step_files(dir.path(), "nothing*", &ignore).is_err());
        let e = step_files(dir.path(), "app/../../x", &ignore).unwrap_err();
        assert!(e.to_string().contains("outside the build context"), "{e}");
        assert!(step_files(dir.path(), "/etc", &ignore).is_err());
    }

    #[test]
    fn the_tar_holds_exactly_the_step_files_relative_to_the_context() {
        let dir = context();
        let ignore = Ignore::new(&read_dockerignore(dir.path()).unwrap());
        let files = step_files(dir.path(), "app", &ignore).unwrap();
        let gz = write_tar_gz(dir.path(), &files, Vec::new()).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let name = e
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_owned();
            if name == "app/link.py" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
                assert_eq!(e.link_name().unwrap().unwrap().to_str(), Some("main.py"));
            }
            names.push(name);
        }
        assert_eq!(names, files);
    }

    #[test]
    fn the_hash_is_stable_and_follows_the_files() {
        let dir = context();
        let ignore = Ignore::default();
        let hash = |src: &str, dest: &str| {
            let files = step_files(dir.path(), src, &ignore).unwrap();
            files_hash(dir.path(), src, dest, &files).unwrap()
        };
        let h = hash("app", "/app");
        assert_eq!(h.len(), 64);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(h, hash("app", "/app"));
        assert_ne!(h, hash("app", "/srv"));
        std::fs::write(dir.path().join("app/sub/util.py"), "x = 3\n").unwrap();
        assert_ne!(h, hash("app", "/app"));
        // Only the mode: still a change.
        let h = hash("other.txt", "/o");
        let f = dir.path().join("other.txt");
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_ne!(h, hash("other.txt", "/o"));
    }

    #[test]
    fn the_hash_is_the_python_sdks() {
        // `calculate_files_hash("d", "/app/", ctx, [], False)` of e2b 2.63
        // on this tree gave this hash.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("f"), "hi\n").unwrap();
        std::os::unix::fs::symlink("f", d.join("l")).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let files = step_files(dir.path(), "d", &Ignore::default()).unwrap();
        assert_eq!(files, ["d", "d/f", "d/l"]);
        assert_eq!(
            files_hash(dir.path(), "d", "/app/", &files).unwrap(),
            "2f32930859cf62ef65844feb2bf38ccdd7b48d2bf8c5c1f7405f3630db243628"
        );
    }

    #[test]
    fn prepare_hashes_copy_steps_and_refuses_escapes() {
        let dir = context();
        let df = dir.path().join("Dockerfile");
        std::fs::write(&df, "FROM debian\nCOPY app /app\nRUN true\n").unwrap();
        let d = prepare(&df, dir.path(), true).unwrap();
        assert!(d.start.force);
        let copy = &d.start.steps[d.copies[0].step];
        assert_eq!(copy.kind, "COPY");
        assert_eq!(copy.files_hash.as_ref().map(String::len), Some(64));
        std::fs::write(&df, "FROM debian\n\nCOPY ../x /app\n").unwrap();
        let e = prepare(&df, dir.path(), false).unwrap_err().to_string();
        assert!(
            e.ends_with("line 3: COPY source \"../x\" is outside the build context"),
            "{e}"
        );
        std::fs::write(&df, "FROM debian\nCOPY missing /app\n").unwrap();
        let e = prepare(&df, dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("line 2: COPY missing: no files"), "{e}");
    }

    #[test]
    fn globs() {
        let g = |p: &str, s: &str| glob_one(p.as_bytes(), s.as_bytes());
        assert!(g("*.py", "a.py") && !g("*.py", "a.pyc") && g("a?c", "abc"));
        assert!(g("[a-c]x", "bx") && !g("[!a-c]x", "bx") && g("*", ".hidden"));
        let ig = Ignore::new(&["/build".into(), "docs/**/*.md".into()]);
        assert!(ig.matches("build") && ig.matches("build/x/y"));
        assert!(
            ig.matches("docs/a.md") && ig.matches("docs/x/y/a.md") && !ig.matches("docs/a.txt")
        );
        assert_eq!(path_param("a b/c"), "a%20b%2Fc");
    }
}
