//! Cluster and chaos tests: real `sandmesh node` processes on loopback
//! addresses (node `i` on `127.0.0.(i+1)`), formed into a cluster with the
//! operator commands (`cluster init`, `cluster join-token`, `cluster join`,
//! `apikey create|add`), then killed, drained and restarted while the tests
//! check what the REST API answers. No mocks: the nodes run gVisor
//! sandboxes over the built guest artifacts.
//!
//! The harness is [`Cluster`]. It needs root, `runsc` on `PATH`, the
//! `sandmesh` binary and the guest artifacts; without one of them
//! [`Cluster::start`] prints `SKIP <test>: <reason>` and returns `None`,
//! unless `SANDMESH_REQUIRE_ARTIFACTS` is set, then it panics (as the
//! node's own suites do).
//!
//! Tests must run on a multi-threaded tokio runtime
//! (`#[tokio::test(flavor = "multi_thread")]`): starting and stopping
//! processes blocks, inside [`tokio::task::block_in_place`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
pub use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Env: the `sandmesh` binary to run.
pub const BIN_ENV: &str = "SANDMESH_BIN";
/// Env: the guest artifacts manifest the nodes use.
pub const ARTIFACTS_ENV: &str = "SANDMESH_GUEST_ARTIFACTS";
/// Env: when set, a missing prerequisite fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "SANDMESH_REQUIRE_ARTIFACTS";

/// How long a node may take to print its readiness lines (it prepares a
/// template snapshot first).
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopping node gets after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(20);
/// Sandboxes each node runs at most (`--max-sandboxes`).
pub const MAX_SANDBOXES: u32 = 4;

/// The repository root (this crate's parent directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("chaos-tests has a parent directory")
        .to_path_buf()
}

/// The `sandmesh` binary: `$SANDMESH_BIN`, else `<repo>/target/debug/sandmesh`.
pub fn binary() -> PathBuf {
    std::env::var_os(BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/sandmesh"))
}

/// The guest artifacts manifest: `$SANDMESH_GUEST_ARTIFACTS`, else
/// `<repo>/target/sandmesh-guest-artifacts.json`.
pub fn artifacts() -> PathBuf {
    std::env::var_os(ARTIFACTS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/sandmesh-guest-artifacts.json"))
}

/// Why this machine cannot run the suite, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (gvisor runtime: network namespaces, mounts)".into());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("runsc").is_file()))
        .unwrap_or(false);
    if !on_path {
        return Some("runsc (gVisor) is not on PATH".into());
    }
    let bin = binary();
    if !bin.is_file() {
        return Some(format!(
            "no sandmesh binary at {} (build it: `cargo build -p node`, or set {BIN_ENV})",
            bin.display()
        ));
    }
    let a = artifacts();
    if !a.is_file() {
        return Some(format!(
            "no guest artifacts at {} (run `cargo xtask guest`, or set {ARTIFACTS_ENV})",
            a.display()
        ));
    }
    None
}

/// `None` when the suite can run here; else prints `SKIP` and returns
/// `Some(())`, or panics when [`REQUIRE_ENV`] is set.
fn skip(test: &str) -> Option<()> {
    let reason = missing_prerequisite()?;
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("{test}: {reason} ({REQUIRE_ENV} is set)");
    }
    eprintln!("SKIP {test}: {reason}");
    Some(())
}

/// The loopback address of node `i`: `127.0.0.(i+1)`.
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        u8::try_from(i + 1).expect("< 255 nodes"),
    ))
}

/// A UDP port free on `ip` now (bound, read and released).
pub fn free_udp_port(ip: IpAddr) -> u16 {
    UdpSocket::bind(SocketAddr::new(ip, 0))
        .and_then(|s| s.local_addr())
        .unwrap_or_else(|e| panic!("finding a free UDP port on {ip}: {e}"))
        .port()
}

/// Run a `sandmesh` operator command; panics unless it exits 0. Returns
/// its standard output.
pub fn sandmesh(args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clear_env(&mut cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", binary().display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .and_then(|()| pipe.write_all(b"\n"))
            .expect("writing to sandmesh's stdin");
    }
    let out = child.wait_with_output().expect("waiting for sandmesh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`sandmesh {}` failed ({}):\nstdout: {stdout}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Drop the variables the CLI reads as defaults, so that only the
/// harness's flags count.
fn clear_env(cmd: &mut Command) {
    for var in [
        "SANDMESH_DATA_DIR",
        "SANDMESH_LISTEN",
        "SANDMESH_NODE_ID",
        "SANDMESH_SEEDS",
        "SANDMESH_GOSSIP_LISTEN",
        "SANDMESH_QUIC_LISTEN",
        "SANDMESH_ADVERTISE",
        "SANDMESH_BASE_ROOTFS",
        "SANDMESH_DOMAIN",
        "SANDMESH_KERNEL",
        "SANDMESH_URL",
        "SANDMESH_JOIN_TOKEN",
        "E2B_API_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env(ARTIFACTS_ENV, artifacts());
}

/// One node of the cluster: its data dir, addresses and process.
pub struct Node {
    /// Its node id (`n0`, `n1`, ...).
    pub id: String,
    pub data_dir: PathBuf,
    /// Where its stderr goes (appended across restarts).
    pub log: PathBuf,
    /// The REST address (port picked by the node on its first start, then
    /// kept across restarts).
    pub rest: SocketAddr,
    pub gossip: SocketAddr,
    pub quic: SocketAddr,
    /// The gossip address it joins through, if any.
    pub seed: Option<SocketAddr>,
    child: Option<Child>,
}

impl Node {
    /// Whether its process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A cluster of `sandmesh node` processes, killed when dropped (SIGTERM,
/// then SIGKILL after [`TERM_GRACE`]), panicking or not. On a panic it
/// prints every node's log tail and keeps the directory.
pub struct Cluster {
    /// The test's name (in messages and the directory name).
    pub test: String,
    /// Data dirs and logs live here.
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// The cluster's API key (every node accepts it).
    pub key: String,
    /// `--max-sandboxes` of every node.
    pub max_sandboxes: u32,
    http: reqwest::Client,
    /// The owner (`clientID`) of every sandbox [`Cluster::create`] made:
    /// the id does not name it.
    owners: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Held while this cluster lives: see [`ONE_CLUSTER_AT_A_TIME`].
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// One cluster at a time per test binary, whatever `--test-threads` says:
/// two clusters of three nodes on a small machine starve each other's
/// gossip, and failure detection is timed.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Cluster {
    /// Start a cluster of `n` nodes `n0..n{n-1}`: `cluster init` on n0, a
    /// join token per other node, one API key on all; node 0 first, then
    /// the others with `--seed` node 0. Returns once every node printed its
    /// readiness lines (not once gossip converged: see
    /// [`Cluster::wait_converged`]). `None` when the machine cannot run the
    /// suite (see the crate doc).
    pub async fn start(test: &str, n: usize) -> Option<Self> {
        Self::start_with_capacity(test, n, MAX_SANDBOXES).await
    }

    /// [`Cluster::start`] with nodes that run at most `max_sandboxes` each.
    pub async fn start_with_capacity(test: &str, n: usize, max_sandboxes: u32) -> Option<Self> {
        if skip(test).is_some() {
            return None;
        }
        assert!(n >= 1);
        let turn = ONE_CLUSTER_AT_A_TIME.lock().await;
        let dir = std::env::temp_dir().join(format!("smh-chaos-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        // reqwest refuses to build a client without a rustls provider (see
        // the workspace Cargo.toml); another test may have installed it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cluster = Self {
            test: test.into(),
            dir,
            nodes: Vec::new(),
            key: String::new(),
            max_sandboxes,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("an HTTP client"),
            owners: Default::default(),
            _turn: turn,
        };
        tokio::task::block_in_place(|| {
            let d0 = cluster.dir.join("n0");
            let d0s = d0.to_str().expect("utf-8 path").to_owned();
            sandmesh(
                &["cluster", "init", "--data-dir", &d0s, "--node-id", "n0"],
                None,
            );
            cluster.key = sandmesh(&["apikey", "create", "--data-dir", &d0s], None)
                .trim()
                .to_owned();
            assert!(!cluster.key.is_empty(), "apikey create printed nothing");
            for i in 1..n {
                let id = format!("n{i}");
                let di = cluster.dir.join(&id);
                let dis = di.to_str().expect("utf-8 path");
                let token = sandmesh(
                    &[
                        "cluster",
                        "join-token",
                        "--data-dir",
                        &d0s,
                        "--node-id",
                        &id,
                    ],
                    None,
                );
                sandmesh(
                    &[
                        "cluster",
                        "join",
                        "--data-dir",
                        dis,
                        "--token",
                        token.trim(),
                    ],
                    None,
                );
                sandmesh(&["apikey", "add", "--data-dir", dis], Some(&cluster.key));
            }
            for i in 0..n {
                let seed = (i > 0).then(|| cluster.nodes[0].gossip);
                cluster.add_node(i, &format!("n{i}"), seed);
            }
        });
        Some(cluster)
    }

    /// Start a node of *another* cluster (its own `cluster init`, so its
    /// own CA and cluster id) as node index `nodes.len()`, with `--seed`
    /// node 0 and this cluster's API key. Returns its index.
    /// Add node `id`, a member of this cluster (join token from n0, the
    /// cluster's key), joining through `seed` (which need not answer).
    pub fn start_joined(&mut self, id: &str, seed: SocketAddr) -> usize {
        let i = self.nodes.len();
        tokio::task::block_in_place(|| {
            let d0 = self.dir.join("n0");
            let d0s = d0.to_str().expect("utf-8 path");
            let token = sandmesh(
                &["cluster", "join-token", "--data-dir", d0s, "--node-id", id],
                None,
            );
            let d = self.dir.join(id);
            let ds = d.to_str().expect("utf-8 path");
            sandmesh(
                &["cluster", "join", "--data-dir", ds, "--token", token.trim()],
                None,
            );
            sandmesh(&["apikey", "add", "--data-dir", ds], Some(&self.key));
            self.add_node(i, id, Some(seed));
        });
        i
    }

    /// Start a second process with node `i`'s identity (its certificate
    /// and id, another data dir and addresses), as when two hosts are
    /// given one id: the two must not both act as that node.
    pub fn start_twin(&mut self, i: usize) -> usize {
        let j = self.nodes.len();
        let id = self.nodes[i].id.clone();
        let data_dir = self.dir.join(format!("{id}-twin"));
        tokio::task::block_in_place(|| {
            let from = self.nodes[i].data_dir.join("cluster");
            let to = data_dir.join("cluster");
            std::fs::create_dir_all(&to).expect("creating the twin's cluster dir");
            for entry in std::fs::read_dir(&from).expect("reading the cluster dir") {
                let entry = entry.expect("a cluster dir entry");
                std::fs::copy(entry.path(), to.join(entry.file_name()))
                    .expect("copying a cluster file");
            }
            let ds = data_dir.to_str().expect("utf-8 path");
            sandmesh(&["apikey", "add", "--data-dir", ds], Some(&self.key));
            let ip = node_ip(j);
            let mut node = Node {
                id: id.clone(),
                data_dir: data_dir.clone(),
                log: self.dir.join(format!("{id}-twin.log")),
                rest: SocketAddr::new(ip, 0),
                gossip: SocketAddr::new(ip, free_udp_port(ip)),
                quic: SocketAddr::new(ip, free_udp_port(ip)),
                seed: Some(self.nodes[0].gossip),
                child: None,
            };
            self.spawn(&mut node);
            self.nodes.push(node);
        });
        j
    }

    pub fn start_stranger(&mut self, id: &str) -> usize {
        let i = self.nodes.len();
        tokio::task::block_in_place(|| {
            let d = self.dir.join(id);
            let ds = d.to_str().expect("utf-8 path");
            sandmesh(
                &["cluster", "init", "--data-dir", ds, "--node-id", id],
                None,
            );
            sandmesh(&["apikey", "add", "--data-dir", ds], Some(&self.key));
            let seed = self.nodes[0].gossip;
            self.add_node(i, id, Some(seed));
        });
        i
    }

    fn add_node(&mut self, i: usize, id: &str, seed: Option<SocketAddr>) {
        let ip = node_ip(i);
        let mut node = Node {
            id: id.into(),
            data_dir: self.dir.join(id),
            log: self.dir.join(format!("{id}.log")),
            rest: SocketAddr::new(ip, 0),
            gossip: SocketAddr::new(ip, free_udp_port(ip)),
            quic: SocketAddr::new(ip, free_udp_port(ip)),
            seed,
            child: None,
        };
        self.spawn(&mut node);
        self.nodes.push(node);
    }

    /// Start `node`'s process and wait for its readiness lines; fills in
    /// its REST address.
    fn spawn(&self, node: &mut Node) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("opening the node log");
        let mut cmd = Command::new(binary());
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--listen")
            .arg(node.rest.to_string())
            .args(["--runtime", "gvisor"])
            .arg("--gossip-listen")
            .arg(node.gossip.to_string())
            .arg("--quic-listen")
            .arg(node.quic.to_string())
            .arg("--max-sandboxes")
            .arg(self.max_sandboxes.to_string())
            .arg("--kill-sandboxes-on-exit")
            // One store for the cluster, as a fleet shares an S3 bucket:
            // a paused sandbox outlives its node.
            .arg("--object-store")
            .arg(format!("file://{}", self.dir.join("objects").display()));
        if let Some(seed) = node.seed {
            cmd.arg("--seed").arg(seed.to_string());
        }
        clear_env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting node {}: {e}", node.id));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads the node's stdout to its end, so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        node.child = Some(child);
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        let mut rest = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening on ") {
                        rest = Some(a.trim().parse::<SocketAddr>().unwrap_or_else(|e| {
                            panic!("node {}: bad REST address {a:?}: {e}", node.id)
                        }));
                    } else if let Some(rest_of) = line.strip_prefix("gossip on ") {
                        let want = format!("{} as node {}", node.gossip, node.id);
                        assert_eq!(
                            rest_of.trim(),
                            want,
                            "node {}: unexpected gossip line; log:\n{}",
                            node.id,
                            node.log_tail(40)
                        );
                        break;
                    }
                }
                Err(e) => panic!(
                    "node {} did not print `listening on` and `gossip on` within {:?} ({e}); log tail:\n{}",
                    node.id,
                    NODE_START_TIMEOUT,
                    node.log_tail(60)
                ),
            }
        }
        node.rest = rest.unwrap_or_else(|| {
            panic!("node {} printed `gossip on` before `listening on`", node.id)
        });
    }

    /// SIGKILL node `i` (no goodbye to the cluster) and reap it.
    pub fn kill9(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = writeln!(
            File::options().append(true).open(&node.log).unwrap(),
            "=== chaos-tests: node killed with SIGKILL ==="
        );
    }

    /// Start node `i` again with the same data dir, addresses and seed
    /// (kills it first if it still runs).
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].is_running() {
            self.kill9(i);
        }
        let mut node = std::mem::replace(
            &mut self.nodes[i],
            Node {
                id: String::new(),
                data_dir: PathBuf::new(),
                log: PathBuf::new(),
                rest: SocketAddr::new(node_ip(i), 0),
                gossip: SocketAddr::new(node_ip(i), 0),
                quic: SocketAddr::new(node_ip(i), 0),
                seed: None,
                child: None,
            },
        );
        let _ = writeln!(
            File::options().append(true).open(&node.log).unwrap(),
            "=== chaos-tests: restarting the node ==="
        );
        let rest = node.rest;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(|| self.spawn(&mut node))
        }));
        self.nodes[i] = node;
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        assert_eq!(self.nodes[i].rest, rest, "the REST address changed");
    }

    /// The node ids, in index order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.id.clone()).collect()
    }

    /// `http://<REST address of node i>`.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].rest)
    }

    /// A REST request to node `i`, with the API key.
    pub fn api(&self, i: usize, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url(i)))
            .header("X-API-KEY", &self.key)
    }

    /// A request to port `port` of sandbox `id` through node `i`, routed by
    /// the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers.
    pub fn sandbox_traffic(
        &self,
        i: usize,
        method: Method,
        id: &str,
        port: u16,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url(i)))
            .header("E2b-Sandbox-Id", id)
            .header("E2b-Sandbox-Port", port.to_string())
    }

    /// Send `req`; its status and body (JSON, or `Value::String` of the
    /// text when it is not JSON, `Null` when empty). Panics on a transport
    /// error.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: request failed: {e:?}", self.test));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    /// `GET path` on node `i`.
    pub async fn get(&self, i: usize, path: &str) -> (StatusCode, Value) {
        self.send(self.api(i, Method::GET, path)).await
    }

    /// `GET /cluster` on node `i`, `None` when it does not answer 200.
    pub async fn cluster_view(&self, i: usize) -> Option<Value> {
        let resp = self
            .api(i, Method::GET, "/cluster")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        resp.json().await.ok()
    }

    /// Node `id` in node `i`'s `GET /cluster`: `(state, generation)`.
    pub async fn seen(&self, i: usize, id: &str) -> Option<(String, u64)> {
        let view = self.cluster_view(i).await?;
        node_in(&view, id)
    }

    /// Wait until every running node lists exactly the running nodes, all
    /// `ready` and verified.
    pub async fn wait_converged(&mut self, timeout: Duration) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect();
        let ids: Vec<String> = running.iter().map(|&i| self.nodes[i].id.clone()).collect();
        let this = &*self;
        let r = wait_until(timeout, || async {
            for &i in &running {
                let Some(view) = this.cluster_view(i).await else {
                    return false;
                };
                let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
                let mut seen: Vec<String> = nodes
                    .iter()
                    // Ready, proven a member over mTLS (placement uses no
                    // other), and its placement actor reachable over the
                    // actor session (creates reserve through it).
                    .filter(|n| {
                        n["state"] == "ready" && n["verified"] == true && n["actors"] == true
                    })
                    .filter_map(|n| n["nodeID"].as_str().map(str::to_owned))
                    .collect();
                seen.sort();
                if seen != ids || nodes.len() != ids.len() {
                    return false;
                }
            }
            true
        })
        .await;
        if r.is_err() {
            let mut views = String::new();
            for &i in &running {
                views += &format!(
                    "\nnode {} sees: {}",
                    self.nodes[i].id,
                    self.cluster_view(i)
                        .await
                        .map_or("(no answer)".into(), |v| v.to_string())
                );
            }
            panic!(
                "{}: the cluster did not converge to {ids:?}, all ready, within {timeout:?}:{views}",
                self.test
            );
        }
    }

    /// `POST /sandboxes` of template `base` on node `i`; panics unless 201.
    /// Returns the sandbox id.
    pub async fn create(&self, i: usize) -> String {
        let body = self.create_sandbox(i).await;
        body["sandboxID"]
            .as_str()
            .unwrap_or_else(|| panic!("create answered no sandboxID: {body}"))
            .to_owned()
    }

    /// Create a sandbox (`base`, 120 s) via node `i`; the create's answer
    /// (`sandboxID`, `envdAccessToken`, ...). Remembers its owner.
    pub async fn create_sandbox(&self, i: usize) -> Value {
        let (status, body) = self
            .send(
                self.api(i, Method::POST, "/sandboxes")
                    .json(&serde_json::json!({"templateID": "base", "timeout": 120})),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}: create via {} answered {status}: {body}",
            self.test,
            self.nodes[i].id
        );
        let id = body["sandboxID"]
            .as_str()
            .unwrap_or_else(|| panic!("create answered no sandboxID: {body}"))
            .to_owned();
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, owner_in(&body).to_owned());
        body
    }

    /// Run `/bin/sh -c script` as root in sandbox `id` through node `i`
    /// (envd's `process.Process/Start`, with the sandbox's access token):
    /// the HTTP status and the process's stdout.
    pub async fn run(&self, i: usize, id: &str, token: &str, script: &str) -> (StatusCode, String) {
        let body =
            serde_json::json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}).to_string();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        let resp = self
            .sandbox_traffic(i, Method::POST, id, 49983, "/process.Process/Start")
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header("authorization", "Basic cm9vdDo=")
            .header("X-Access-Token", token)
            .body(frame)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: running {script:?} in {id}: {e:?}", self.test));
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let mut stdout = Vec::new();
        let mut b = &bytes[..];
        while status == StatusCode::OK && b.len() >= 5 {
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            let Some(msg) = b.get(5..5 + len) else { break };
            let msg: Value = serde_json::from_slice(msg).unwrap_or_default();
            if b[0] & 2 != 0 {
                assert!(
                    msg.get("error").is_none(),
                    "{}: Process/Start failed: {msg}",
                    self.test
                );
            } else if let Some(out) = msg["event"]["data"]["stdout"].as_str() {
                stdout.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(out)
                        .unwrap_or_default(),
                );
            }
            b = &b[5 + len..];
        }
        (status, String::from_utf8_lossy(&stdout).into_owned())
    }

    /// The node that owns sandbox `id`, made by [`Cluster::create`].
    pub fn owner(&self, id: &str) -> String {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("{}: {id} was not made by Cluster::create", self.test))
    }

    /// `DELETE /sandboxes/{id}` via node `i`; its status.
    pub async fn delete(&self, i: usize, id: &str) -> StatusCode {
        match self
            .api(i, Method::DELETE, &format!("/sandboxes/{id}"))
            .send()
            .await
        {
            Ok(r) => r.status(),
            Err(e) => {
                eprintln!("{}: deleting {id}: {e}", self.test);
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Every node's log tail.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "----- {} ({}) -----\n{}",
                    n.id,
                    n.log.display(),
                    n.log_tail(lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stop every node: SIGTERM, SIGKILL after [`TERM_GRACE`].
    fn stop_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = &n.child {
                // SAFETY: signalling our own child; its pid is not reaped yet.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        for n in &mut self.nodes {
            let Some(mut c) = n.child.take() else {
                continue;
            };
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!(
                            "{}: node {} ignored SIGTERM for {TERM_GRACE:?}: SIGKILL",
                            self.test, n.id
                        );
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "{}: FAILED; node logs (kept in {}):\n{}",
                self.test,
                self.dir.display(),
                self.log_tails(40)
            );
        }
        let stop = |c: &mut Self| c.stop_all();
        // block_in_place panics outside a multi-threaded runtime: stop
        // directly then.
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            tokio::task::block_in_place(|| stop(self));
        } else {
            stop(self);
        }
        if !panicking {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The node that made (owns) the sandbox of a create's or a GET's answer:
/// its `clientID` (sandbox ids do not name their node).
pub fn owner_in(body: &Value) -> &str {
    body["clientID"].as_str().unwrap_or("")
}

/// `(state, generation)` of node `id` in a `GET /cluster` answer.
pub fn node_in(view: &Value, id: &str) -> Option<(String, u64)> {
    let n = view["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["nodeID"] == id)?;
    Some((n["state"].as_str()?.to_owned(), n["generation"].as_u64()?))
}

/// The node ids listed in a `GET /cluster` answer, in its order.
pub fn node_ids(view: &Value) -> Vec<String> {
    view["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["nodeID"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Poll `f` every 100 ms until it returns true; the time it took, or
/// `Err(timeout)` when it never did.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> Result<Duration, Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(timeout);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
