//! `POST /files` with an arbitrary multipart body, through envd's real
//! router: malformed parts, odd filenames (paths) and truncated bodies must
//! give an error response, never a panic, and never a file outside the root.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Env {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    _root: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let root = tempfile::tempdir().expect("temp root");
        for d in ["etc", "tmp", "root", "home/user"] {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .expect("passwd");
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
        let state = Arc::new(envd::State::new(envd::paths::Root::new(root.path()), false));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Env { rt, app: envd::router(state), _root: root }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let req = Request::post("/files?username=root")
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(Body::from(data.to_vec()))
        .expect("request");
    let response = env.rt.block_on(env.app.clone().oneshot(req)).expect("infallible");
    assert!(response.status().as_u16() < 500 || response.status().as_u16() == 507);
});
