//! envd as a host process answers `GET /health` on TCP, and so does the
//! envd packaged into the guest root filesystem.

mod common;

use common::Envd;

async fn status(envd: &Envd, path: &str) -> u16 {
    envd.http
        .get(format!("{}{path}", envd.url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn health_answers_204_and_unknown_paths_404() {
    let envd = Envd::start();
    assert_eq!(status(&envd, "/health").await, 204);
    assert_eq!(status(&envd, "/no-such-route").await, 404);
}

/// The envd in the guest root filesystem (statically linked, built by
/// `cargo xtask guest`) is the one the manifest names, and it runs.
#[tokio::test]
async fn packaged_guest_envd_answers_health() {
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
    let envd = Envd::start_binary(&in_rootfs);
    assert_eq!(status(&envd, "/health").await, 204);
}
