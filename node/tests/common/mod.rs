//! The harness of the node's API tests: a node in this process on
//! 127.0.0.1:0 with a fresh data dir and the real gvisor runtime over the
//! built guest root tree, and helpers to call it.
#![allow(dead_code)]

pub mod envd;

use std::path::PathBuf;

use actors::runtime::select::RuntimeChoice;
use actors::service::Config;
use base64::Engine;
use node::server::{Node, NodeOptions, start};
use schema::guest::{GuestArtifacts, REQUIRE_ENV};
use serde_json::{Value, json};

pub struct TestNode {
    pub node: Node,
    pub key: String,
    pub data: PathBuf,
    pub http: reqwest::Client,
}

impl TestNode {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.node.addr)
    }

    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("X-API-KEY", &self.key)
    }

    /// A request for port 49983 of sandbox `id`, routed by headers.
    pub fn envd(&self, method: reqwest::Method, id: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("E2b-Sandbox-Id", id)
            .header("E2b-Sandbox-Port", "49983")
    }

    /// Run `script` with `/bin/sh -c` through envd's Connect
    /// `process.Process/Start`, via the proxy. Returns the HTTP status and
    /// the stdout the process printed.
    pub async fn run(&self, id: &str, token: Option<&str>, script: &str) -> (u16, String) {
        let body = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}).to_string();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        let mut req = self
            .envd(reqwest::Method::POST, id, "/process.Process/Start")
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header("authorization", "Basic cm9vdDo=")
            .body(frame);
        if let Some(t) = token {
            req = req.header("X-Access-Token", t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let mut stdout = String::new();
        let mut b = &bytes[..];
        let b64 = base64::engine::general_purpose::STANDARD;
        while status == 200 && b.len() >= 5 {
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            let msg: Value = serde_json::from_slice(&b[5..5 + len]).unwrap();
            if b[0] & 2 != 0 {
                assert!(msg.get("error").is_none(), "Process/Start failed: {msg}");
            } else if let Some(out) = msg["event"]["data"]["stdout"].as_str() {
                stdout += &String::from_utf8_lossy(&b64.decode(out).unwrap());
            }
            b = &b[5 + len..];
        }
        (status, stdout)
    }

    pub async fn create(&self, body: Value) -> reqwest::Response {
        self.api(reqwest::Method::POST, "/v2/sandboxes")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /sandboxes/{id}/pause`.
    pub fn pause(&self, id: &str) -> impl Future<Output = reqwest::Response> + Send + 'static {
        let req = self
            .api(reqwest::Method::POST, &format!("/sandboxes/{id}/pause"))
            .send();
        async move { req.await.unwrap() }
    }

    /// `POST /sandboxes/{id}/resume` (no body: the default timeout).
    pub async fn resume(&self, id: &str) -> reqwest::Response {
        self.api(reqwest::Method::POST, &format!("/sandboxes/{id}/resume"))
            .send()
            .await
            .unwrap()
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill(&self, id: &str) -> reqwest::Response {
        self.api(reqwest::Method::DELETE, &format!("/sandboxes/{id}"))
            .send()
            .await
            .unwrap()
    }
}

/// A node with templates `base` (2 vCPUs, 512 MiB) and `small` (1 vCPU,
/// 256 MiB), `max_sandboxes` as given, domain `sandmesh.test`.
pub async fn node_with(test: &str, max_sandboxes: usize) -> Option<TestNode> {
    node_on_store(test, max_sandboxes, None, None).await
}

/// [`node_with`] publishing to `object_store` (`None`: its own, in its
/// data directory), its templates over `rootfs` (`None`: the built guest
/// root tree).
pub async fn node_on_store(
    test: &str,
    max_sandboxes: usize,
    object_store: Option<actors::objects::StoreUrl>,
    rootfs: Option<&std::path::Path>,
) -> Option<TestNode> {
    let required = std::env::var_os(REQUIRE_ENV).is_some();
    let mut artifacts = GuestArtifacts::for_test(test)?;
    if let Some(dir) = rootfs {
        artifacts.rootfs_dir = dir.to_owned();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            !required,
            "{test}: the node tests need root (gvisor runtime)"
        );
        eprintln!("SKIP {test}: needs root (gvisor runtime: network namespaces, mounts)");
        return None;
    }
    let data = std::env::temp_dir().join(format!("smh-node-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let node = match start(NodeOptions {
        data_dir: data.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        runtime: RuntimeChoice::Gvisor,
        runsc: None,
        templates: vec![
            actors::template_cache::TemplateSpec {
                name: "base".into(),
                rootfs_dir: artifacts.rootfs_dir.clone(),
                rootfs_image: Some(artifacts.rootfs_image.clone()),
                limits: Default::default(),
            },
            actors::template_cache::TemplateSpec {
                name: "small".into(),
                rootfs_dir: artifacts.rootfs_dir,
                rootfs_image: None,
                limits: actors::runtime::Limits {
                    vcpus: 1,
                    memory_mib: 256,
                },
            },
        ],
        guest_kernel: None,
        config: Config {
            max_sandboxes,
            domain: Some("sandmesh.test".into()),
            ..Config::default()
        },
        mesh: None,
        object_store,
    })
    .await
    {
        Ok(n) => n,
        Err(e) if !required && e.to_string().contains("runsc is not installed") => {
            eprintln!("SKIP {test}: {e}");
            return None;
        }
        Err(e) => panic!("{test}: starting the node: {e:#}"),
    };
    let key = node.sandboxes.store().create_api_key().unwrap();
    // reqwest refuses to build a client without a rustls provider (see
    // the workspace Cargo.toml); another test may have installed it.
    let _ = rustls::crypto::ring::default_provider().install_default();

    Some(TestNode {
        node,
        key,
        data,
        http: reqwest::Client::new(),
    })
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Best effort: kill whatever the test left, then the data dir.
        let rt = self.node.sandboxes.runtime().clone();
        let _ = std::thread::spawn(move || {
            let Ok(tokio) = tokio::runtime::Runtime::new() else {
                return;
            };
            tokio.block_on(async {
                if let Ok(list) = rt.list().await {
                    for r in list {
                        let _ = rt.kill(&r.id).await;
                    }
                }
            });
        })
        .join();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(self.data.to_str().unwrap()) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(m)
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The built guest root tree at `dest` (hard links: nothing is copied
/// but the one file changed), whose gVisor init first writes `mib` MiB of
/// random bytes to `/dev/shm/ballast`: a template booted from it holds
/// that much memory its sandboxes leave as it was — as a real template's
/// loaded runtime or caches are. The built tree's own guest is ~8 MiB of
/// memory that any request to envd changes in a few dozen places spread
/// over all of it, so no 1 MiB chunk of a sandbox's image need survive
/// unchanged (`objects::chunks`); random, so that its chunks can only be
/// found in a snapshot that holds the same ballast, never within one.
pub fn rootfs_with_ballast(test: &str, dest: &std::path::Path, mib: u32) -> Option<PathBuf> {
    let artifacts = GuestArtifacts::for_test(test)?;
    let _ = std::fs::remove_dir_all(dest);
    let linked = std::process::Command::new("cp")
        .arg("-al")
        .arg(&artifacts.rootfs_dir)
        .arg(dest)
        .status()
        .unwrap();
    if !linked.success() {
        // Another file system than the artifacts': copy it.
        let _ = std::fs::remove_dir_all(dest);
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&artifacts.rootfs_dir)
            .arg(dest)
            .status()
            .unwrap();
        assert!(
            copied.success(),
            "copying the guest root to {}",
            dest.display()
        );
    }
    // The OCI bundle's init (actors' `runtime::gvisor::bundle::INIT`).
    let init = dest.join("usr/local/sbin/sandmesh-gvisor-init");
    let script = std::fs::read_to_string(&init).unwrap();
    let (shebang, rest) = script.split_once('\n').unwrap();
    let ballast = format!(
        "{shebang}\nhead -c {} /dev/urandom > /dev/shm/ballast\n{rest}",
        u64::from(mib) << 20
    );
    // A hard link: replace the file, never write through it into the
    // built tree.
    std::fs::remove_file(&init).unwrap();
    std::fs::write(&init, ballast).unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Some(dest.to_owned())
}

/// Host pids of runsc processes of sandbox `id`.
pub fn runsc_pids(id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("runsc") && cmd.contains(id) {
                pids.push(pid);
            }
        }
    }
    pids
}

pub async fn json_error(resp: reqwest::Response, status: u16) -> String {
    assert_eq!(resp.status().as_u16(), status);
    let body: Value = resp.json().await.expect("error bodies are JSON");
    assert_eq!(body["code"], status, "{body}");
    body["message"].as_str().expect("a message").to_owned()
}

/// [`node_with`] capacity 2.
pub async fn node(test: &str) -> Option<TestNode> {
    node_with(test, 2).await
}
