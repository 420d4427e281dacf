//! The Connect protocol layer as a client sees it (envd as a host process).

mod common;

use common::Envd;
use serde_json::json;

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    let envd = Envd::start();
    let (status, body) = envd.unary("process.Process/NoSuchMethod", json!({})).await;
    assert_eq!(status, 501);
    assert_eq!(body["code"], "unimplemented");
}

#[tokio::test]
async fn access_token_is_required_once_init_sets_one() {
    let envd = Envd::start();
    let init = envd
        .http
        .post(format!("{}/init", envd.url))
        .json(&json!({"accessToken": "s3cret", "envVars": {"A": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status().as_u16(), 204);
    let health = envd
        .http
        .get(format!("{}/health", envd.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 204, "health needs no token");
    let envs = envd
        .http
        .get(format!("{}/envs", envd.url))
        .send()
        .await
        .unwrap();
    assert_eq!(envs.status().as_u16(), 401);
    let body: serde_json::Value = envs.json().await.unwrap();
    assert_eq!(body["code"], 401);
    assert!(body["message"].as_str().unwrap().contains("access token"));
    let envs = envd
        .http
        .get(format!("{}/envs", envd.url))
        .header("x-access-token", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(envs.status().as_u16(), 200);
    assert_eq!(
        envs.json::<serde_json::Value>().await.unwrap(),
        json!({"A": "1"})
    );
    let wrong = envd
        .http
        .get(format!("{}/envs", envd.url))
        .header("x-access-token", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
}

#[tokio::test]
async fn malformed_init_is_a_clear_400() {
    let envd = Envd::start();
    let resp = envd
        .http
        .post(format!("{}/init", envd.url))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], 400);
}

#[tokio::test]
async fn init_entropy_is_checked() {
    let envd = Envd::start();
    let init = |body: serde_json::Value| {
        envd.http
            .post(format!("{}/init", envd.url))
            .json(&body)
            .send()
    };
    // 64 bytes of base64: accepted (a host-process envd does not touch the
    // host's RNG; in a guest it reseeds the kernel's).
    let seed = "A".repeat(86) + "==";
    let r = init(serde_json::json!({ "entropy": seed })).await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    for bad in ["", "not base64!", &"A".repeat(1024)] {
        let r = init(serde_json::json!({ "entropy": bad })).await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("entropy"));
    }
}

#[tokio::test]
async fn metrics_report_the_guest() {
    let envd = Envd::start();
    let m: serde_json::Value = envd
        .http
        .get(format!("{}/metrics", envd.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(m["cpu_count"].as_u64().unwrap() >= 1, "{m}");
    assert!(
        m["mem_total"].as_u64().unwrap() > m["mem_used"].as_u64().unwrap(),
        "{m}"
    );
    assert!(
        m["disk_total"].as_u64().unwrap() >= m["disk_used"].as_u64().unwrap(),
        "{m}"
    );
    assert!(m["disk_total"].as_u64().unwrap() > 0, "{m}");
    let pct = m["cpu_used_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{m}");
    assert!(m["ts"].as_i64().unwrap() > 1_700_000_000, "{m}");
}

#[tokio::test]
async fn unsupported_content_type_is_415_with_a_hint() {
    let envd = Envd::start();
    let resp = envd
        .http
        .post(format!("{}/process.Process/List", envd.url))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("application/json"),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_messages_are_invalid_argument_and_envd_survives() {
    let envd = Envd::start();
    // Malformed JSON in a unary call.
    let (status, body) = envd
        .unary(
            "process.Process/List",
            serde_json::Value::String("{".into()),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    // A truncated envelope on a streaming call.
    let resp = envd
        .http
        .post(format!("{}/process.Process/Start", envd.url))
        .header("content-type", "application/connect+json")
        .body(vec![0u8, 0, 0, 0, 50, b'{'])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes[0], 2, "only an end-of-stream frame");
    let end: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument", "{end}");
    // Garbage protobuf in a unary call.
    let resp = envd
        .http
        .post(format!("{}/process.Process/List", envd.url))
        .header("content-type", "application/proto")
        .body(vec![0xff, 0xff, 0xff])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // Still serving.
    let health = envd
        .http
        .get(format!("{}/health", envd.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 204);
}

/// Clients that speak HTTP/2 without TLS (prior knowledge) get the same API.
#[tokio::test]
async fn serves_http2_cleartext() {
    let envd = Envd::start();
    // (Envd::start installed the rustls provider reqwest needs.)
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2.get(format!("{}/health", envd.url)).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 204);
    let resp = h2
        .post(format!("{}/process.Process/List", envd.url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.json::<serde_json::Value>().await.unwrap().is_object());
}

#[tokio::test]
async fn sync_needs_the_token_and_answers_204() {
    let envd = Envd::start();
    let sync = |token: Option<&str>| {
        let mut req = envd.http.post(format!("{}/sync", envd.url));
        if let Some(t) = token {
            req = req.header("x-access-token", t);
        }
        req.send()
    };
    assert_eq!(sync(None).await.unwrap().status().as_u16(), 204);
    let init = envd
        .http
        .post(format!("{}/init", envd.url))
        .json(&json!({"accessToken": "s3cret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status().as_u16(), 204);
    assert_eq!(sync(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(sync(Some("s3cret")).await.unwrap().status().as_u16(), 204);
    let get = envd
        .http
        .get(format!("{}/sync", envd.url))
        .header("x-access-token", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405, "only POST syncs");
}
