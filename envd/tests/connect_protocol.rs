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
