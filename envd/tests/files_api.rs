//! `GET /files` and `POST /files` as the E2B SDK uses them (envd as a host process).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use bytes::Bytes;
use common::Envd;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn files_url(envd: &Envd) -> String {
    format!("{}/files", envd.url)
}

async fn upload_raw(envd: &Envd, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = envd
        .http
        .post(files_url(envd))
        .query(&[("path", path)])
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn download(envd: &Envd, query: &[(&str, &str)]) -> reqwest::Response {
    envd.http
        .get(files_url(envd))
        .query(query)
        .send()
        .await
        .unwrap()
}

fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("envd-upload"))
        .collect()
}

#[tokio::test]
async fn octet_stream_upload_and_download_round_trip() {
    let envd = Envd::start();
    let (status, body) = upload_raw(&envd, "/home/user/dir/new/a.txt", "hello files").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!([{"name": "a.txt", "type": "file", "path": "/home/user/dir/new/a.txt"}])
    );
    let host = envd.host("/home/user/dir/new/a.txt");
    let meta = std::fs::metadata(&host).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1000, 1000),
        "owned by the default user"
    );
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert_eq!(
        std::fs::metadata(envd.host("/home/user/dir"))
            .unwrap()
            .uid(),
        1000,
        "parents too"
    );

    let resp = download(&envd, &[("path", "/home/user/dir/new/a.txt")]).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert!(
        resp.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("filename=\"a.txt\"")
    );
    assert_eq!(resp.headers()["content-length"], "11");
    assert_eq!(resp.text().await.unwrap(), "hello files");

    // Relative paths are relative to the user's home; replacing keeps the mode.
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, body) = upload_raw(&envd, "dir/new/a.txt", "replaced").await;
    assert_eq!(status, 200);
    assert_eq!(body[0]["path"], "/home/user/dir/new/a.txt");
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "replaced");
    assert_eq!(std::fs::metadata(&host).unwrap().mode() & 0o777, 0o600);

    // As root, in root's home.
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", "/root/r.bin"), ("username", "root")])
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 2])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        std::fs::metadata(envd.host("/root/r.bin")).unwrap().uid(),
        0
    );
    let resp = download(&envd, &[("path", "/root/r.bin"), ("username", "root")]).await;
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), [0, 1, 2]);
    assert!(temp_files(&envd.host("/home/user/dir/new")).is_empty());
}

#[tokio::test]
async fn multipart_uploads_several_files_by_file_name() {
    let envd = Envd::start();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"one".to_vec()).file_name("/home/user/m/one.txt"),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"two".to_vec()).file_name("m/sub/two.bin"),
        )
        .text("other", "ignored");
    let resp = envd
        .http
        .post(files_url(&envd))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!([
            {"name": "one.txt", "type": "file", "path": "/home/user/m/one.txt"},
            {"name": "two.bin", "type": "file", "path": "/home/user/m/sub/two.bin"},
        ])
    );
    assert_eq!(
        std::fs::read(envd.host("/home/user/m/one.txt")).unwrap(),
        b"one"
    );
    assert_eq!(
        std::fs::read(envd.host("/home/user/m/sub/two.bin")).unwrap(),
        b"two"
    );

    // A single file with ?path= (the file name is then ignored).
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"single".to_vec()).file_name("whatever"),
    );
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", "/tmp/single")])
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body[0]["path"], "/tmp/single");
    assert_eq!(std::fs::read(envd.host("/tmp/single")).unwrap(), b"single");

    // Two parts for one path are refused.
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"1".to_vec()).file_name("/tmp/dup"),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"2".to_vec()).file_name("/tmp/dup"),
        );
    let resp = envd
        .http
        .post(files_url(&envd))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Malformed bodies and unknown content types are 400 JSON errors.
    let resp = envd
        .http
        .post(files_url(&envd))
        .header("content-type", "multipart/form-data; boundary=xyz")
        .body("--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/bad\"\r\n\r\ntrunc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 400);
    assert!(!envd.host("/tmp/bad").exists(), "no partial file");
    assert!(temp_files(&envd.host("/tmp")).is_empty());
    let resp = envd
        .http
        .post(files_url(&envd))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn gzip_both_ways_and_metadata() {
    let envd = Envd::start();
    let data = "compressible ".repeat(10_000);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", "/home/user/z.txt")])
        .header("content-type", "application/octet-stream")
        .header("content-encoding", "gzip")
        .header("X-Metadata-Author", "mish")
        .header("x-metadata-purpose", "test")
        .body(gz)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body[0]["metadata"],
        json!({"author": "mish", "purpose": "test"})
    );
    assert_eq!(
        std::fs::read_to_string(envd.host("/home/user/z.txt")).unwrap(),
        data
    );

    // The metadata are the file's (as xattrs) and show in its EntryInfo.
    let (_, stat) = envd
        .unary(
            "filesystem.Filesystem/Stat",
            json!({"path": "/home/user/z.txt"}),
        )
        .await;
    assert_eq!(
        stat["entry"]["metadata"],
        json!({"author": "mish", "purpose": "test"})
    );

    let resp = envd
        .http
        .get(files_url(&envd))
        .query(&[("path", "/home/user/z.txt")])
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let compressed = resp.bytes().await.unwrap();
    assert!(compressed.len() < data.len() / 10);
    let mut out = String::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, data);

    // Metadata follow a rename, show in listings, and go with an overwrite.
    let (status, moved) = envd
        .unary(
            "filesystem.Filesystem/Move",
            json!({"source": "/home/user/z.txt", "destination": "/home/user/z2.txt"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        moved["entry"]["metadata"],
        json!({"author": "mish", "purpose": "test"})
    );
    let (_, list) = envd
        .unary(
            "filesystem.Filesystem/ListDir",
            json!({"path": "/home/user"}),
        )
        .await;
    assert_eq!(list["entries"][0]["metadata"]["author"], "mish");
    let (status, body) = upload_raw(&envd, "/home/user/z2.txt", "plain").await;
    assert_eq!(status, 200);
    assert!(body[0].get("metadata").is_none());
    let (_, stat) = envd
        .unary(
            "filesystem.Filesystem/Stat",
            json!({"path": "/home/user/z2.txt"}),
        )
        .await;
    assert!(stat["entry"].get("metadata").is_none(), "{stat}");

    // A corrupt gzip body fails without leaving anything behind.
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", "/home/user/corrupt")])
        .header("content-type", "application/octet-stream")
        .header("content-encoding", "gzip")
        .body(b"definitely not gzip".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(!envd.host("/home/user/corrupt").exists());
    assert!(temp_files(&envd.host("/home/user")).is_empty());
}

#[tokio::test]
async fn download_errors_are_json() {
    let envd = Envd::start();
    let resp = download(&envd, &[("path", "/home/user/missing")]).await;
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 404);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("/home/user/missing")
    );
    let resp = download(&envd, &[("path", "/home/user")]).await;
    assert_eq!(resp.status().as_u16(), 400);

    std::fs::write(envd.host("/root/secret"), "s").unwrap();
    std::fs::set_permissions(
        envd.host("/root/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let resp = download(&envd, &[("path", "/root/secret")]).await;
    assert_eq!(resp.status().as_u16(), 403);
    let resp = download(&envd, &[("path", "/../../etc/passwd")]).await;
    assert_eq!(resp.status().as_u16(), 403);
    let resp = download(&envd, &[("path", "/root/secret"), ("username", "root")]).await;
    assert_eq!(resp.status().as_u16(), 200);
    let resp = download(&envd, &[("path", "/tmp"), ("username", "nobody")]).await;
    assert_eq!(resp.status().as_u16(), 401);

    // The user may not write where Unix would not let them.
    let (status, body) = upload_raw(&envd, "/root/mine", "x").await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = upload_raw(&envd, "/etc/new/file", "x").await;
    assert_eq!(status, 403);
    assert!(!envd.host("/etc/new").exists());
    let (status, _) = upload_raw(&envd, "/home/user", "x").await;
    assert_eq!(status, 400, "a directory is not a file");
}

fn sign(path: &str, op: &str, user: &str, token: &str, exp: Option<i64>) -> String {
    use base64::Engine;
    let mut s = format!("{path}:{op}:{user}:{token}");
    if let Some(e) = exp {
        s.push_str(&format!(":{e}"));
    }
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(s.as_bytes()))
    )
}

#[tokio::test]
async fn signed_urls_stand_in_for_the_access_token() {
    let envd = Envd::start();
    std::fs::write(envd.host("/home/user/s.txt"), "signed").unwrap();
    let init = envd
        .http
        .post(format!("{}/init", envd.url))
        .json(&json!({"accessToken": "tok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status().as_u16(), 204);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let path = "/home/user/s.txt";

    let resp = download(&envd, &[("path", path)]).await;
    assert_eq!(resp.status().as_u16(), 401, "neither token nor signature");
    let resp = envd
        .http
        .get(files_url(&envd))
        .query(&[("path", path)])
        .header("x-access-token", "tok")
        .send()
        .await;
    assert_eq!(resp.unwrap().status().as_u16(), 200, "the token itself");

    let sig = sign(path, "read", "", "tok", None);
    let resp = download(&envd, &[("path", path), ("signature", &sig)]).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), "signed");

    let sig = sign(path, "read", "user", "tok", Some(now + 60));
    let exp = (now + 60).to_string();
    let resp = download(
        &envd,
        &[
            ("path", path),
            ("username", "user"),
            ("signature", &sig),
            ("signature_expiration", &exp),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);

    let resp = download(&envd, &[("path", path), ("signature", "v1_wrong")]).await;
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 401);
    // Signed for another user, another path, or writing: refused.
    let sig = sign(path, "read", "root", "tok", None);
    assert_eq!(
        download(&envd, &[("path", path), ("signature", &sig)])
            .await
            .status()
            .as_u16(),
        401
    );
    let sig = sign("/home/user/other", "read", "", "tok", None);
    assert_eq!(
        download(&envd, &[("path", path), ("signature", &sig)])
            .await
            .status()
            .as_u16(),
        401
    );
    let sig = sign(path, "write", "", "tok", None);
    assert_eq!(
        download(&envd, &[("path", path), ("signature", &sig)])
            .await
            .status()
            .as_u16(),
        401
    );

    let sig = sign(path, "read", "", "tok", Some(now - 10));
    let exp = (now - 10).to_string();
    let resp = download(
        &envd,
        &[
            ("path", path),
            ("signature", &sig),
            ("signature_expiration", &exp),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401, "expired");
    let body: Value = resp.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("expired"));

    // A signed multipart upload (what upload_url hands to third parties).
    let up = "/home/user/up.txt";
    let sig = sign(up, "write", "", "tok", None);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"third party".to_vec()).file_name("up.txt"),
    );
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", up), ("signature", &sig)])
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        std::fs::read_to_string(envd.host(up)).unwrap(),
        "third party"
    );
    let sig = sign(up, "read", "", "tok", None);
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", up), ("signature", &sig)])
        .header("content-type", "application/octet-stream")
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        401,
        "a read signature does not allow writing"
    );
    assert_eq!(
        std::fs::read_to_string(envd.host(up)).unwrap(),
        "third party"
    );
}

/// A deterministic pseudo-random body of `chunks` MiB, and its sha256.
fn generated(
    chunks: usize,
) -> (
    impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>,
    [u8; 32],
) {
    let chunk = |i: usize| -> Bytes {
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut v = Vec::with_capacity(1 << 20);
        while v.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        Bytes::from(v)
    };
    let mut h = Sha256::new();
    for i in 0..chunks {
        h.update(chunk(i));
    }
    let stream = futures_util::stream::iter((0..chunks).map(move |i| Ok(chunk(i))));
    (stream, h.finalize().into())
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn large_files_stream_without_buffering() {
    let envd = Envd::start();
    const MIB: usize = 100;
    let (body, digest) = generated(MIB);
    let (status, resp) = upload_raw(
        &envd,
        "/home/user/big.bin",
        reqwest::Body::wrap_stream(body),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        std::fs::metadata(envd.host("/home/user/big.bin"))
            .unwrap()
            .len(),
        (MIB << 20) as u64
    );

    let mut resp = download(&envd, &[("path", "/home/user/big.bin")]).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut h = Sha256::new();
    let mut n = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        n += chunk.len();
        h.update(&chunk);
    }
    assert_eq!(n, MIB << 20);
    assert_eq!(
        <[u8; 32]>::from(h.finalize()),
        digest,
        "the download is the upload"
    );

    // Multipart streams too.
    let (body, _) = generated(20);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(body))
            .file_name("/home/user/big2.bin"),
    );
    let resp = envd
        .http
        .post(files_url(&envd))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        std::fs::metadata(envd.host("/home/user/big2.bin"))
            .unwrap()
            .len(),
        20 << 20
    );

    let peak = peak_rss_kib(envd.pid());
    assert!(
        peak < 64 * 1024,
        "envd's peak RSS was {peak} KiB: a body was buffered"
    );
}

/// Start a raw upload to `path` whose body is fed through the returned sender.
fn feed_upload(
    envd: &Envd,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let req = envd
        .http
        .post(files_url(envd))
        .query(&[("path", path)])
        .header("content-type", "application/octet-stream")
        .body(body);
    (tx, tokio::spawn(req.send()))
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..250 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn an_aborted_upload_leaves_no_partial_file() {
    let envd = Envd::start();
    let dest = envd.host("/home/user/partial.bin");
    let (tx, req) = feed_upload(&envd, "/home/user/partial.bin");
    for _ in 0..4 {
        tx.send(Ok(Bytes::from(vec![7u8; 256 * 1024])))
            .await
            .unwrap();
    }
    eventually("envd writes the new file", || {
        std::fs::metadata(&dest).is_ok_and(|m| m.len() > 0)
    })
    .await;
    // The client fails mid-body: the request is aborted.
    tx.send(Err(std::io::Error::other("client gave up")))
        .await
        .unwrap();
    drop(tx);
    let _ = req.await.unwrap();
    eventually("the partial file is removed", || !dest.exists()).await;

    // Replacing a file: the old content stays until the new one is complete.
    std::fs::write(&dest, "old content").unwrap();
    let (tx, req) = feed_upload(&envd, "/home/user/partial.bin");
    for _ in 0..4 {
        tx.send(Ok(Bytes::from(vec![7u8; 256 * 1024])))
            .await
            .unwrap();
    }
    let dir = envd.host("/home/user");
    eventually("envd writes a temporary file", || {
        !temp_files(&dir).is_empty()
    })
    .await;
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "old content");
    tx.send(Err(std::io::Error::other("client gave up")))
        .await
        .unwrap();
    drop(tx);
    let _ = req.await.unwrap();
    eventually("the temporary file is removed", || {
        temp_files(&dir).is_empty()
    })
    .await;
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "old content");
}

/// Unmounts a scratch tmpfs when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn no_space_is_507_and_cleans_up() {
    let envd = Envd::start();
    let dir = envd.host("/home/user/small");
    std::fs::create_dir_all(&dir).unwrap();
    common::chown(&dir, 1000, 1000);
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs"])
        .arg(&dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a small tmpfs here");
        return;
    }
    let _mount = Mount(dir.clone());
    let (status, body) =
        upload_raw(&envd, "/home/user/small/too-big.bin", vec![1u8; 4 << 20]).await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["code"], 507);
    assert!(temp_files(&dir).is_empty(), "the temporary file is removed");
    assert!(!dir.join("too-big.bin").exists());
}

/// Names the filesystem refuses are the caller's error (400), not envd's
/// (found by the `files_multipart` fuzz target: a 300-byte name was a 500).
#[tokio::test]
async fn an_unwritable_name_is_a_client_error() {
    let envd = Envd::start();
    let long = format!("/home/user/{}", "n".repeat(300));
    let (status, body) = upload_raw(&envd, &long, b"x".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], 400);
    assert!(
        body["message"].as_str().unwrap_or("").contains("nnnn"),
        "{body}"
    );
    // A path through a regular file.
    let (status, _) = upload_raw(&envd, "/home/user/plain", b"x".to_vec()).await;
    assert_eq!(status, 200);
    let (status, body) = upload_raw(&envd, "/home/user/plain/inside", b"x".to_vec()).await;
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(temp_files(&envd.host("/home/user")).is_empty());
}

/// What the SDK's own watch tests expect: writing a new file shows as
/// exactly create, chmod (the chown), write on its name, already in the
/// first `GetWatcherEvents` after the upload returned.
#[tokio::test]
async fn an_upload_is_seen_by_watchers_as_upstream_shows_it() {
    let envd = Envd::start();
    std::fs::create_dir(envd.host("/home/user/watched")).unwrap();
    common::chown(&envd.host("/home/user/watched"), 1000, 1000);
    let (_, body) = envd
        .unary(
            "filesystem.Filesystem/CreateWatcher",
            json!({"path": "/home/user/watched"}),
        )
        .await;
    let id = body["watcherId"].as_str().unwrap().to_owned();
    let (status, _) = upload_raw(
        &envd,
        "/home/user/watched/w.txt",
        "This file will be watched.",
    )
    .await;
    assert_eq!(status, 200);
    let (_, body) = envd
        .unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
    assert_eq!(
        body["events"],
        json!([
            {"name": "w.txt", "type": "EVENT_TYPE_CREATE"},
            {"name": "w.txt", "type": "EVENT_TYPE_CHMOD"},
            {"name": "w.txt", "type": "EVENT_TYPE_WRITE"},
        ])
    );
}

/// Replacing a file goes through a temporary file and a rename (readers
/// never see it half written), but watchers see what upstream's in-place
/// write shows them: a WRITE of the file itself, nothing of the temporary.
#[tokio::test]
async fn replacing_a_file_shows_watchers_a_write_of_that_file_only() {
    let envd = Envd::start();
    let (status, _) = upload_raw(&envd, "/home/user/watched/w.txt", "first").await;
    assert_eq!(status, 200);
    let (_, body) = envd
        .unary(
            "filesystem.Filesystem/CreateWatcher",
            json!({"path": "/home/user/watched", "includeEntry": true}),
        )
        .await;
    let id = body["watcherId"].as_str().unwrap().to_owned();
    let (status, _) = upload_raw(&envd, "/home/user/watched/w.txt", "second, longer").await;
    assert_eq!(status, 200);
    let (_, body) = envd
        .unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{body}");
    assert_eq!(events[0]["name"], "w.txt");
    assert_eq!(events[0]["type"], "EVENT_TYPE_WRITE");
    assert_eq!(events[0]["entry"]["path"], "/home/user/watched/w.txt");
    assert_eq!(events[0]["entry"]["size"], "14");
    assert!(temp_files(&envd.host("/home/user/watched")).is_empty());

    // A file merely named like a temporary one is a file like any other.
    let (status, _) = upload_raw(&envd, "/home/user/watched/.x.envd-upload-tail", "y").await;
    assert_eq!(status, 200);
    let (_, body) = envd
        .unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
    assert_eq!(body["events"][0]["name"], ".x.envd-upload-tail", "{body}");
}

/// Upload metadata where the filesystem takes no user xattrs (gVisor's
/// root; forced here with `--metadata-store file`): envd's own store keeps
/// them, on both upload paths, through moves, and forgets them when the
/// file is replaced or removed.
#[tokio::test]
async fn metadata_live_in_envds_store_where_xattrs_are_not_taken() {
    let envd = Envd::start_with(&["--metadata-store", "file"]);
    let stat = |path: &'static str| {
        let envd = &envd;
        async move {
            let (status, body) = envd
                .unary("filesystem.Filesystem/Stat", json!({"path": path}))
                .await;
            assert_eq!(status, 200, "{body}");
            body["entry"]["metadata"].clone()
        }
    };
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", "/home/user/raw.txt")])
        .header("content-type", "application/octet-stream")
        .header("X-Metadata-Owner", "alice")
        .body("raw")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body[0]["metadata"], json!({"owner": "alice"}));
    assert_eq!(stat("/home/user/raw.txt").await, json!({"owner": "alice"}));
    let xattrs = std::process::Command::new("getfattr")
        .arg("-d")
        .arg(envd.host("/home/user/raw.txt"))
        .output();
    if let Ok(out) = xattrs {
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("user.e2b."),
            "not in xattrs"
        );
    }
    assert!(envd.host("/var/lib/envd/file-metadata.json").exists());

    // Multipart: the same metadata on every file of the request.
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"1".to_vec()).file_name("/home/user/m/a"),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"2".to_vec()).file_name("/home/user/m/b"),
        );
    let resp = envd
        .http
        .post(files_url(&envd))
        .header("x-metadata-batch", "7")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body[0]["metadata"], json!({"batch": "7"}));
    assert_eq!(body[1]["metadata"], json!({"batch": "7"}));
    let (_, list) = envd
        .unary(
            "filesystem.Filesystem/ListDir",
            json!({"path": "/home/user/m"}),
        )
        .await;
    assert_eq!(list["entries"][0]["metadata"], json!({"batch": "7"}));
    assert_eq!(list["entries"][1]["metadata"], json!({"batch": "7"}));

    // A move of the file, and of a directory above one, carries them.
    let (status, moved) = envd
        .unary(
            "filesystem.Filesystem/Move",
            json!({"source": "/home/user/raw.txt", "destination": "/home/user/moved.txt"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(moved["entry"]["metadata"], json!({"owner": "alice"}));
    let (status, _) = envd
        .unary(
            "filesystem.Filesystem/Move",
            json!({"source": "/home/user/m", "destination": "/home/user/n"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(stat("/home/user/n/b").await, json!({"batch": "7"}));
    // A symlink shows its target's.
    std::os::unix::fs::symlink("moved.txt", envd.host("/home/user/link")).unwrap();
    assert_eq!(stat("/home/user/link").await, json!({"owner": "alice"}));

    // An upload without metadata replaces the old ones with none.
    let (status, body) = upload_raw(&envd, "/home/user/n/a", "again").await;
    assert_eq!(status, 200);
    assert!(body[0].get("metadata").is_none(), "{body}");
    assert_eq!(stat("/home/user/n/a").await, Value::Null);
    // A removed file's do not pass to a new file at its path.
    let (status, _) = envd
        .unary(
            "filesystem.Filesystem/Remove",
            json!({"path": "/home/user/n"}),
        )
        .await;
    assert_eq!(status, 200);
    std::fs::create_dir(envd.host("/home/user/n")).unwrap();
    std::fs::write(envd.host("/home/user/n/b"), "new").unwrap();
    assert_eq!(stat("/home/user/n/b").await, Value::Null);

    // Keys longer than an xattr name may be are refused, as upstream does.
    let resp = envd
        .http
        .post(files_url(&envd))
        .query(&[("path", "/home/user/long.txt")])
        .header("content-type", "application/octet-stream")
        .header(format!("x-metadata-{}", "k".repeat(300)), "v")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 400);
    assert!(!envd.host("/home/user/long.txt").exists());
}
