//! envd as a host process answers `GET /health` on TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Envd(Child);

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `binary` on an ephemeral port; return the process and its address.
fn start(binary: &str) -> (Envd, String) {
    let mut child = Command::new(binary)
        .args(["--listen", "127.0.0.1:0", "--no-vsock"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start envd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("envd listening on tcp ")
        .unwrap_or_else(|| panic!("unexpected readiness line {line:?}"))
        .to_owned();
    (Envd(child), addr)
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: envd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn health_answers_204_and_unknown_paths_404() {
    let (_envd, addr) = start(env!("CARGO_BIN_EXE_envd"));
    let health = get(&addr, "/health");
    assert!(health.starts_with("HTTP/1.1 204"), "{health}");
    let missing = get(&addr, "/no-such-route");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}

/// The envd packaged into the guest root filesystem (statically linked,
/// built by `cargo xtask guest`) runs and answers too.
#[test]
fn packaged_guest_envd_answers_health() {
    let Some(manifest) =
        schema::guest::GuestArtifacts::for_test("packaged_guest_envd_answers_health")
    else {
        return;
    };
    let in_rootfs = manifest.rootfs_dir.join("usr/local/bin/envd");
    assert_eq!(
        std::fs::read(&in_rootfs).unwrap(),
        std::fs::read(&manifest.envd).unwrap(),
        "the rootfs carries a different envd than the manifest names"
    );
    let (_envd, addr) = start(in_rootfs.to_str().unwrap());
    let health = get(&addr, "/health");
    assert!(health.starts_with("HTTP/1.1 204"), "{health}");
}
