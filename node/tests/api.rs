//! The node's E2B REST API and sandbox-traffic proxy, end to end: a node in
//! this process on 127.0.0.1:0 with a fresh data dir and the real gvisor
//! runtime over the built guest root tree.
//!
//! Needs root, `runsc` and the guest artifacts (`SANDMESH_GUEST_ARTIFACTS`);
//! without them it prints `SKIP <test>: <reason>`, except under `cargo xtask
//! test` (`SANDMESH_REQUIRE_ARTIFACTS`), where it fails.

mod common;

use std::time::{Duration, Instant};

use common::{json_error, node, runsc_pids};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2b_api_end_to_end() {
    let Some(t) = node("e2b_api_end_to_end").await else {
        return;
    };
    use reqwest::Method as M;

    // ---- auth: every REST call needs a valid key
    let r = t.http.get(t.url("/v2/sandboxes")).send().await.unwrap();
    assert!(json_error(r, 401).await.contains("X-API-KEY"));
    let r = t
        .http
        .get(t.url("/v2/sandboxes"))
        .header("X-API-KEY", "e2b_wrong")
        .send()
        .await
        .unwrap();
    json_error(r, 401).await;
    let r = t.api(M::GET, "/v2/sandboxes").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!([]));

    // ---- bad inputs: clear JSON errors, nothing created
    let r = t
        .api(M::POST, "/v2/sandboxes")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(json_error(r, 400).await.contains("malformed JSON"));
    let r = t
        .api(M::POST, "/v2/sandboxes")
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .unwrap();
    json_error(r, 413).await;
    let r = t.create(json!({"timeout": 10})).await;
    assert!(json_error(r, 400).await.contains("templateID"));
    let r = t.create(json!({"templateID": "no-such-template"})).await;
    assert!(json_error(r, 404).await.contains("no-such-template"));
    let r = t.create(json!({"templateID": "base", "timeout": -1})).await;
    assert!(json_error(r, 400).await.contains("timeout"));
    let r = t
        .create(json!({"templateID": "base", "timeout": 86_401}))
        .await;
    json_error(r, 400).await;
    let r = t
        .api(M::GET, "/sandboxes/nosuchsandbox")
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;
    let r = t
        .api(M::DELETE, "/sandboxes/nosuchsandbox")
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;
    let r = t
        .envd(M::GET, "nosuchsandbox", "/health")
        .send()
        .await
        .unwrap();
    assert!(json_error(r, 502).await.contains("was not found"));
    assert!(t.node.sandboxes.runtime().list().await.unwrap().is_empty());

    // ---- create, with metadata and env vars
    let started = Instant::now();
    let r = t
        .create(json!({"templateID": "base", "timeout": 120, "secure": true,
            "allow_internet_access": false, "autoPause": false,
            "metadata": {"suite": "api", "who": "a b&c"}, "envVars": {"GREETING": "hello"}}))
        .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let sbx: Value = r.json().await.unwrap();
    eprintln!("create took {:?}", started.elapsed());
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    // E2B's shape: 20 lowercase alphanumerics; the owner is not in it
    // (the cluster's registry knows it), it is the clientID.
    assert_eq!(id.len(), 20, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(sbx["templateID"], "base");
    assert_eq!(sbx["envdVersion"], schema::envd::ENVD_VERSION);
    assert_eq!(sbx["clientID"], "local");
    assert_eq!(sbx["domain"], "sandmesh.test");
    assert_eq!(
        sbx["runtime"], "gvisor",
        "the create response names the runtime"
    );

    // ---- sandbox traffic through the proxy
    let r = t.envd(M::GET, &id, "/health").send().await.unwrap();
    assert_eq!(r.status(), 204);
    // ... and by Host `<port>-<id>.<domain>`
    let r = t
        .http
        .get(t.url("/health"))
        .header("host", format!("49983-{id}.sandmesh.test"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, out) = t.run(&id, Some(&token), "echo hi $GREETING").await;
    assert_eq!((status, out.as_str()), (200, "hi hello\n"));
    let (status, _) = t.run(&id, None, "echo hi").await;
    assert_eq!(
        status, 401,
        "envd must refuse a call without the access token"
    );
    let r = t
        .http
        .get(t.url("/health"))
        .header("E2b-Sandbox-Id", &id)
        .header("E2b-Sandbox-Port", "1")
        .send()
        .await
        .unwrap();
    assert!(json_error(r, 502).await.contains("not open"));

    // ---- get
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let detail: Value = r.json().await.unwrap();
    assert_eq!(detail["state"], "running");
    assert_eq!(detail["runtime"], "gvisor");
    assert_eq!(detail["cpuCount"], 2);
    assert_eq!(detail["memoryMB"], 512);
    assert_eq!(detail["metadata"]["who"], "a b&c");
    assert_eq!(detail["envdAccessToken"], token.as_str());
    let end_at = detail["endAt"].as_str().unwrap().to_owned();
    assert!(end_at.ends_with('Z') && *end_at > *detail["startedAt"].as_str().unwrap());

    // ---- a second, short-lived sandbox: its deadline kills it
    let r = t.create(json!({"templateID": "base", "timeout": 3})).await;
    assert_eq!(r.status(), 201);
    let short: Value = r.json().await.unwrap();
    let short_id = short["sandboxID"].as_str().unwrap().to_owned();

    // ---- capacity (2 on this node): a third create is refused, not queued
    let r = t.create(json!({"templateID": "base"})).await;
    assert!(json_error(r, 429).await.contains("capacity"));

    // ---- list: metadata filter (SDK encoding), state, pagination
    let r = t
        .api(
            M::GET,
            "/v2/sandboxes?metadata=who%3Da%252520b%252526c%26suite%3Dapi",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: Vec<Value> = r.json().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["sandboxID"], id.as_str());
    assert_eq!(listed[0]["state"], "running");
    let r = t
        .api(M::GET, "/v2/sandboxes?metadata=suite%3Dother")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 0);
    let r = t
        .api(M::GET, "/v2/sandboxes?state=paused")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 0);
    let r = t.api(M::GET, "/v2/sandboxes?limit=1").send().await.unwrap();
    let next = r.headers()["x-next-token"].to_str().unwrap().to_owned();
    let page1: Vec<Value> = r.json().await.unwrap();
    let r = t
        .api(M::GET, "/v2/sandboxes")
        .query(&[("limit", "1"), ("nextToken", next.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("x-next-token").is_none());
    let page2: Vec<Value> = r.json().await.unwrap();
    assert_eq!((page1.len(), page2.len()), (1, 1));
    assert_ne!(page1[0]["sandboxID"], page2[0]["sandboxID"]);
    let r = t.api(M::GET, "/sandboxes").send().await.unwrap();
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 2);
    // E2B's order: newest first by default, `asc` the reverse; the pages
    // above came in the default order.
    let order = |q: &'static str| {
        let req = t.api(M::GET, q);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Vec<Value>>()
                .await
                .unwrap()
                .iter()
                .map(|v| v["sandboxID"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let desc = order("/v2/sandboxes").await;
    let mut asc = order("/v2/sandboxes?order=asc").await;
    assert_eq!(
        desc,
        [
            page1[0]["sandboxID"].as_str().unwrap(),
            page2[0]["sandboxID"].as_str().unwrap()
        ]
    );
    asc.reverse();
    assert_eq!(asc, desc);
    assert_eq!(order("/v2/sandboxes?order=desc").await, desc);
    assert!(order("/v2/sandboxes?template=other").await.is_empty());
    assert_eq!(order("/v2/sandboxes?template=base").await.len(), 2);
    assert_eq!(
        order("/v2/sandboxes?startedAfter=2000-01-01T00%3A00%3A00%2B02%3A00").await,
        desc
    );
    assert!(
        order("/v2/sandboxes?startedAfter=2999-01-01T00%3A00%3A00Z")
            .await
            .is_empty()
    );
    let r = t
        .api(M::GET, "/v2/sandboxes?order=up")
        .send()
        .await
        .unwrap();
    assert!(json_error(r, 400).await.contains("order"));

    // ---- Template.exists: GET /templates/aliases/{alias}
    let r = t
        .api(M::GET, "/templates/aliases/base")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"templateID": "base", "public": false})
    );
    let r = t
        .api(M::GET, "/templates/aliases/no-such-template")
        .send()
        .await
        .unwrap();
    assert!(json_error(r, 404).await.contains("not found"));

    // ---- timeout: moved by /timeout, only extended by connect
    let r = t
        .api(M::POST, &format!("/sandboxes/{id}/timeout"))
        .json(&json!({"timeout": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let get = |id: String| {
        let req = t.api(M::GET, &format!("/sandboxes/{id}"));
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let end_600 = get(id.clone()).await["endAt"].as_str().unwrap().to_owned();
    assert!(end_600 > end_at, "{end_600} should be after {end_at}");
    let r = t
        .api(M::POST, &format!("/sandboxes/{id}/timeout"))
        .json(&json!({"timeout": -5}))
        .send()
        .await
        .unwrap();
    json_error(r, 400).await;
    let r = t
        .api(M::POST, &format!("/v2/sandboxes/{id}/connect"))
        .json(&json!({"timeout": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["sandboxID"], id.as_str());
    assert_eq!(again["envdAccessToken"], token.as_str());
    assert_eq!(
        get(id.clone()).await["endAt"],
        end_600.as_str(),
        "connect must not shorten"
    );
    let r = t
        .api(M::POST, "/v2/sandboxes/nosuchsandbox/connect")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;

    // ---- pause: saved and stopped, listed as paused, traffic refused
    let (status, _) = t
        .run(&id, Some(&token), "echo before-pause > /tmp/kept")
        .await;
    assert_eq!(status, 200);
    let r = t
        .api(M::POST, &format!("/sandboxes/{id}/pause"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    assert_eq!(get(id.clone()).await["state"], "paused");
    let r = t
        .api(M::GET, "/v2/sandboxes?state=paused")
        .send()
        .await
        .unwrap();
    let paused: Vec<Value> = r.json().await.unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0]["sandboxID"], id.as_str());
    let r = t.pause(&id).await;
    assert!(json_error(r, 409).await.contains("already paused"));
    let r = t.envd(M::GET, &id, "/health").send().await.unwrap();
    assert!(json_error(r, 502).await.contains("paused"));
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/metrics"))
        .send()
        .await
        .unwrap();
    json_error(r, 409).await;
    assert!(
        !t.node
            .sandboxes
            .runtime()
            .list()
            .await
            .unwrap()
            .iter()
            .any(|r| r.id.as_str() == id),
        "a paused sandbox runs nothing"
    );

    // ---- resume through connect: same id, token, files and env
    let r = t
        .api(M::POST, &format!("/v2/sandboxes/{id}/connect"))
        .json(&json!({"timeout": 120}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let resumed: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "connect resumes a paused sandbox: {resumed}");
    assert_eq!(resumed["envdAccessToken"], token.as_str());
    assert_eq!(get(id.clone()).await["state"], "running");
    let (status, out) = t
        .run(&id, Some(&token), "cat /tmp/kept; echo $GREETING")
        .await;
    assert_eq!((status, out.as_str()), (200, "before-pause\nhello\n"));
    let r = t.resume(&id).await;
    assert!(json_error(r, 409).await.contains("already running"));
    let r = t
        .api(M::POST, "/sandboxes/nosuchsandbox/pause")
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;

    // ---- the short sandbox died at its deadline
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = t
            .api(M::GET, &format!("/sandboxes/{short_id}"))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the 3 s sandbox is still alive");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = t.envd(M::GET, &short_id, "/health").send().await.unwrap();
    assert!(json_error(r, 502).await.contains("was not found"));

    // ---- runtime crash: kill -9 one sandbox's runsc processes. It is
    // reported gone with the reason and cleaned up; the other keeps working.
    let r = t.create(json!({"templateID": "base"})).await;
    assert_eq!(r.status(), 201);
    let victim = r.json::<Value>().await.unwrap()["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let pids = runsc_pids(&victim);
    assert!(!pids.is_empty(), "no runsc process of {victim}");
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let r = t
            .api(M::GET, &format!("/sandboxes/{victim}"))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            break json_error(r, 404).await;
        }
        assert!(
            Instant::now() < deadline,
            "the crashed sandbox is still listed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(reason.contains("lost"), "{reason}");
    let r = t.envd(M::GET, &victim, "/health").send().await.unwrap();
    assert!(json_error(r, 502).await.contains("was not found"));
    let (status, out) = t.run(&id, Some(&token), "echo still here").await;
    assert_eq!((status, out.as_str()), (200, "still here\n"));
    assert!(runsc_pids(&victim).is_empty());
    let ids: Vec<String> = t
        .node
        .sandboxes
        .runtime()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(
        ids,
        vec![id.clone()],
        "the crashed sandbox was not cleaned up"
    );

    // ---- kill
    let r = t.kill(&id).await;
    assert_eq!(r.status(), 204);
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;
    let r = t.kill(&id).await;
    json_error(r, 404).await;
    let r = t.envd(M::GET, &id, "/health").send().await.unwrap();
    assert!(json_error(r, 502).await.contains("was not found"));

    // ---- metrics: no key needed; the counts of what happened above
    let r = t.http.get(t.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for needle in [
        "sandmesh_sandboxes{state=\"running\"} 0",
        "sandmesh_sandbox_creates_total{result=\"ok\"} 3",
        "sandmesh_sandbox_pauses_total{result=\"ok\"} 1",
        "sandmesh_sandbox_resume_seconds_count 1",
        "sandmesh_sandbox_create_seconds_bucket",
        "sandmesh_sandboxes_lost_total 1",
        "sandmesh_sandboxes_timed_out_total 1",
        "sandmesh_proxy_bytes_total{direction=\"from_sandbox\"}",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle:?}:\n{text}");
    }

    // Nothing is left: not in the runtime, not in sled.
    assert!(t.node.sandboxes.runtime().list().await.unwrap().is_empty());
    assert!(t.node.sandboxes.store().sandboxes().unwrap().is_empty());
}
