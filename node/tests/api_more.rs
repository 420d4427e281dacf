//! More of the node's API, end to end on the real gvisor runtime (see
//! `common`): templates and their limits, sandbox logs and metrics, the
//! OpenAPI document, 200 concurrent creates against a full node, and the
//! node supervisor replacing a failed sandbox supervisor.
//!
//! In its own test binary: the Prometheus counters are per process, and
//! `api.rs` checks exact counts.

mod common;

use std::time::{Duration, Instant};

use actors::objects::ClaimState;
use common::{json_error, node, node_with};
use reqwest::Method as M;
use serde_json::{Value, json};

fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("MemTotal in /proc/meminfo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn templates_limits_logs_metrics_and_openapi() {
    let Some(t) = node("templates_limits_logs_metrics_and_openapi").await else {
        return;
    };

    // ---- the OpenAPI document: public, generated from the handlers
    let r = t.http.get(t.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for path in [
        "/v2/sandboxes",
        "/sandboxes/{id}",
        "/sandboxes/{id}/logs",
        "/sandboxes/{id}/metrics",
        "/templates",
        "/templates/{id}",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi.json lacks {path}");
    }
    for schema in [
        "NewSandbox",
        "Sandbox",
        "SandboxDetail",
        "TemplateInfo",
        "ApiError",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "openapi.json lacks schema {schema}"
        );
    }
    let required = &doc["components"]["schemas"]["NewSandbox"]["required"];
    assert_eq!(required, &json!(["templateID"]), "serde names are used");

    // ---- templates: list and get, with their limits
    let r = t.api(M::GET, "/templates").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let list: Vec<Value> = r.json().await.unwrap();
    let names: Vec<&str> = list
        .iter()
        .map(|t| t["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "small"]);
    assert_eq!(
        (list[0]["cpuCount"].as_u64(), list[0]["memoryMB"].as_u64()),
        (Some(2), Some(512))
    );
    assert_eq!(
        (list[1]["cpuCount"].as_u64(), list[1]["memoryMB"].as_u64()),
        (Some(1), Some(256))
    );
    for t in &list {
        assert_eq!(t["buildStatus"], "ready");
        assert_eq!(t["buildID"].as_str().unwrap().len(), 36);
        assert_eq!(t["envdVersion"], schema::envd::ENVD_VERSION);
        assert!(t["createdBy"].is_null() && t["lastSpawnedAt"].is_null());
        assert_eq!(t["spawnCount"], 0);
    }
    let r = t.api(M::GET, "/templates/small").send().await.unwrap();
    let small: Value = r.json().await.unwrap();
    assert_eq!(small["builds"][0]["buildID"], small["buildID"]);
    assert_eq!(small["builds"][0]["status"], "ready");
    let r = t.api(M::GET, "/templates/nope").send().await.unwrap();
    assert!(json_error(r, 404).await.contains("base, small"));

    // ---- a sandbox from `small` gets small's resources
    let r = t
        .create(json!({"templateID": "small", "timeout": 120}))
        .await;
    assert_eq!(r.status(), 201);
    let sbx: Value = r.json().await.unwrap();
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    let detail: Value = r.json().await.unwrap();
    assert_eq!(
        (detail["cpuCount"].as_u64(), detail["memoryMB"].as_u64()),
        (Some(1), Some(256))
    );
    let (status, meminfo) = t.run(&id, Some(&token), "cat /proc/meminfo").await;
    assert_eq!(status, 200);
    let kib = mem_total_kib(&meminfo);
    assert!(
        kib <= 256 * 1024,
        "a 256 MiB sandbox's guest sees {kib} KiB of memory"
    );
    let r = t.api(M::GET, "/templates/small").send().await.unwrap();
    let small: Value = r.json().await.unwrap();
    assert_eq!(small["spawnCount"], 1);
    assert!(small["lastSpawnedAt"].is_string());

    // ---- logs: lifecycle events and the console
    let r = t
        .api(M::POST, &format!("/sandboxes/{id}/timeout"))
        .json(&json!({"timeout": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/logs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let logs: Value = r.json().await.unwrap();
    let entries = logs["logEntries"].as_array().unwrap();
    let created = entries
        .iter()
        .find(|e| e["message"] == "sandbox created")
        .unwrap_or_else(|| panic!("no create event in {logs}"));
    assert_eq!(created["fields"]["template"], "small");
    assert_eq!(created["level"], "info");
    assert!(entries.iter().any(|e| e["message"] == "timeout set"));
    assert!(
        entries.iter().any(|e| e["fields"]["source"] == "console"
            && e["message"].as_str().unwrap().contains("envd")),
        "envd's console output is in the log: {logs}"
    );
    assert_eq!(logs["logs"].as_array().unwrap().len(), entries.len());
    let stamps: Vec<&str> = entries
        .iter()
        .map(|e| e["timestamp"].as_str().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/logs?limit=1"))
        .send()
        .await
        .unwrap();
    let last: Value = r.json().await.unwrap();
    assert_eq!(last["logEntries"].as_array().unwrap().len(), 1);
    assert_eq!(last["logEntries"][0], *entries.last().unwrap());
    let r = t
        .api(
            M::GET,
            &format!("/v2/sandboxes/{id}/logs?direction=backward&limit=2&search=timeout"),
        )
        .send()
        .await
        .unwrap();
    let v2: Value = r.json().await.unwrap();
    assert_eq!(v2["logs"].as_array().unwrap().len(), 1, "{v2}");
    assert_eq!(v2["logs"][0]["message"], "timeout set");
    let r = t
        .api(M::GET, &format!("/v2/sandboxes/{id}/logs?level=error"))
        .send()
        .await
        .unwrap();
    let v2: Value = r.json().await.unwrap();
    assert!(
        v2["logs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["level"] == "error"),
        "{v2}"
    );
    let r = t
        .api(
            M::GET,
            &format!("/v2/sandboxes/{id}/logs?direction=sideways"),
        )
        .send()
        .await
        .unwrap();
    assert!(json_error(r, 400).await.contains("direction"));
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/logs?limit=0"))
        .send()
        .await
        .unwrap();
    json_error(r, 400).await;
    let r = t
        .api(M::GET, "/sandboxes/nosuchsandbox/logs")
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;

    // ---- metrics: the guest's own view, one sample per call
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Vec<Value> = r.json().await.unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    let total = m[0]["memTotal"].as_u64().unwrap();
    assert_eq!(total / 1024, kib, "envd reports the guest's MemTotal");
    assert!(m[0]["memUsed"].as_u64().unwrap() > 0);
    for key in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(!m[0][key].is_null(), "metric lacks {key}: {m:?}");
    }
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 2);
    let future = m[0]["timestampUnix"].as_i64().unwrap() + 3600;
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/metrics?start={future}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 0);
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/metrics?start=soon"))
        .send()
        .await
        .unwrap();
    json_error(r, 400).await;
    let r = t
        .api(M::GET, "/sandboxes/nosuchsandbox/metrics")
        .send()
        .await
        .unwrap();
    json_error(r, 404).await;

    let r = t.kill(&id).await;
    assert_eq!(r.status(), 204);
}

/// 200 creates at once against a node with room for 2: two sandboxes, 198
/// clear 429s, and nothing half-made anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_beyond_capacity_are_refused_cleanly() {
    let Some(t) = node_with("concurrent_creates_beyond_capacity_are_refused_cleanly", 2).await
    else {
        return;
    };
    let started = Instant::now();
    let creates = (0..200).map(|_| {
        let req = t
            .api(M::POST, "/v2/sandboxes")
            .json(&json!({"templateID": "base", "timeout": 120}));
        async move {
            let r = req.send().await.expect("the node answers every create");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("a JSON body"))
        }
    });
    let results = futures_join_all(creates).await;
    eprintln!("200 concurrent creates answered in {:?}", started.elapsed());
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!((ok.len(), refused.len()), (2, 198), "{results:?}");
    for body in refused {
        assert_eq!(body["code"], 429);
        assert!(body["message"].as_str().unwrap().contains("capacity"));
    }
    let runtime = t.node.sandboxes.runtime();
    assert_eq!(runtime.list().await.unwrap().len(), 2);
    assert_eq!(t.node.sandboxes.store().sandboxes().unwrap().len(), 2);
    for body in ok {
        let id = body["sandboxID"].as_str().unwrap();
        let r = t.kill(id).await;
        assert_eq!(r.status(), 204);
    }
    assert!(runtime.list().await.unwrap().is_empty());
    assert!(t.node.sandboxes.store().sandboxes().unwrap().is_empty());
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a create task"));
    }
    out
}

/// A bug that makes the sandbox supervisor fail does not touch the
/// sandboxes: the node supervisor starts a new one, which takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_sandbox_supervisor_is_replaced_and_sandboxes_live_on() {
    let Some(t) = node("a_failed_sandbox_supervisor_is_replaced_and_sandboxes_live_on").await
    else {
        return;
    };
    let r = t
        .create(json!({"templateID": "base", "timeout": 120}))
        .await;
    assert_eq!(r.status(), 201);
    let sbx: Value = r.json().await.unwrap();
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();

    let supervisor = t.node.sandboxes.node_supervisor();
    supervisor
        .cast(actors::node_supervisor::NodeMsg::FailSandboxSupervisor)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let restarts =
            ractor::call!(supervisor, actors::node_supervisor::NodeMsg::Restarts).unwrap();
        if restarts == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no restart after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, out) = t.run(&id, Some(&token), "echo alive").await;
    assert_eq!((status, out.as_str()), (200, "alive\n"));
    let r = t.api(M::GET, "/v2/sandboxes").send().await.unwrap();
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 1);
    // The new supervisor's sweep works: a sandbox created now, then
    // killed under the node, is found lost.
    let r = t
        .create(json!({"templateID": "base", "timeout": 120}))
        .await;
    assert_eq!(r.status(), 201);
    let victim = r.json::<Value>().await.unwrap()["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    for pid in common::runsc_pids(&victim) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = t
            .api(M::GET, &format!("/sandboxes/{victim}"))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            assert!(json_error(r, 404).await.contains("lost"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lost sandbox was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = t.kill(&id).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    assert!(t.node.sandboxes.runtime().list().await.unwrap().is_empty());
}

/// The runtime killed in the middle of a pause: the sandbox is either
/// paused with a complete snapshot (the kill came too late) or reported
/// lost with nothing left; never a half-written snapshot that a resume
/// would later restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runtime_killed_during_pause_leaves_no_half_snapshot() {
    let Some(t) = node("runtime_killed_during_pause_leaves_no_half_snapshot").await else {
        return;
    };
    let snapshots = t.data.join("snapshots");
    let mut outcomes = Vec::new();
    for round in 0..3 {
        let r = t
            .create(json!({"templateID": "base", "timeout": 120}))
            .await;
        assert_eq!(r.status(), 201);
        let sbx: Value = r.json().await.unwrap();
        let id = sbx["sandboxID"].as_str().unwrap().to_owned();
        let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
        let (status, _) = t.run(&id, Some(&token), "echo kept > /tmp/kept").await;
        assert_eq!(status, 200);
        let pause = tokio::spawn(t.pause(&id));
        // Kill runsc as soon as the snapshot directory appears (a little
        // later each round, to land at different points of the save).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let started = std::fs::read_dir(&snapshots)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(&id))
                })
                .unwrap_or(false);
            if started || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(20 * round)).await;
        for pid in common::runsc_pids(&id) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let r = pause.await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        if status == 204 {
            // Saved before the kill: it must resume whole.
            let r = t.resume(&id).await;
            assert_eq!(r.status(), 201, "{:?}", r.text().await);
            let (status, out) = t.run(&id, Some(&token), "cat /tmp/kept").await;
            assert_eq!((status, out.as_str()), (200, "kept\n"));
            let r = t.kill(&id).await;
            assert_eq!(r.status(), 204);
            outcomes.push("saved before the kill");
        } else {
            // Cut short: clearly failed, nothing half-written left.
            assert!(status == 404 || status == 500, "{status} {body}");
            let r = t
                .api(M::GET, &format!("/sandboxes/{id}"))
                .send()
                .await
                .unwrap();
            let msg = json_error(r, 404).await;
            assert!(msg.contains("lost"), "{msg}");
            let r = t.resume(&id).await;
            json_error(r, 404).await;
            outcomes.push("lost");
        }
        let left: Vec<String> = std::fs::read_dir(&snapshots)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "snapshot leftovers: {left:?}");
    }
    eprintln!("outcomes: {outcomes:?}");
    assert!(t.node.sandboxes.runtime().list().await.unwrap().is_empty());
    assert!(t.node.sandboxes.store().sandboxes().unwrap().is_empty());
}

/// The `published` field of each "sandbox paused" event of sandbox `id`.
async fn pause_events(t: &common::TestNode, id: &str) -> Vec<String> {
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}/logs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let logs: Value = r.json().await.unwrap();
    logs["logEntries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message"] == "sandbox paused")
        .map(|e| e["fields"]["published"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The number before `word` in a "published" field ("… 3 deduplicated").
fn count_before(text: &str, word: &str) -> u64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.trim_end_matches(',') == word)
        .unwrap_or_else(|| panic!("no {word:?} in {text:?}"));
    words[at - 1]
        .parse()
        .unwrap_or_else(|_| panic!("no count before {word:?} in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_sandboxes_are_published_and_resume_from_the_object_store() {
    let Some(t) = node("paused_sandboxes_are_published_and_resume_from_the_object_store").await
    else {
        return;
    };
    let objects_dir = t.data.join("objects");
    let objects = actors::objects::SnapshotStore::open(
        &actors::objects::StoreUrl::Local {
            dir: objects_dir.clone(),
        },
        &Default::default(),
    )
    .unwrap();
    let r = t
        .create(json!({"templateID": "base", "timeout": 300}))
        .await;
    assert_eq!(r.status(), 201);
    let sbx: Value = r.json().await.unwrap();
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    // A file, and a process whose life proves memory came back. And
    // 16 MiB of random bytes in /tmp (a tmpfs: guest memory) that no later
    // step changes: the rest of this guest is ~8 MiB that each resume and
    // request changes in a few dozen places spread over all of it, so
    // without it whether the second pause shares a ~1 MiB chunk with the
    // first is chance (it shared none in about half the runs).
    let (status, _) = t
        .run(
            &id,
            Some(&token),
            "echo kept > /tmp/kept; head -c 16777216 /dev/urandom > /tmp/ballast; \
             sh -c 'while :; do sleep 0.2; done' >/dev/null 2>&1 & echo $! > /tmp/loop.pid",
        )
        .await;
    assert_eq!(status, 200);
    let prefix = format!("sandboxes/{id}");

    // ---- pause publishes; the local copy is only a cache
    let resume = |t: &common::TestNode| {
        t.api(M::POST, &format!("/sandboxes/{id}/resume"))
            .json(&json!({"timeout": 300}))
            .send()
    };
    let r = t.pause(&id).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let published = objects.list(&prefix).await.unwrap();
    assert_eq!(published.len(), 1, "{published:?}");
    let first = pause_events(&t, &id).await;
    assert!(count_before(&first[0], "uploaded") > 0, "{first:?}");
    let snapshots = t.data.join("snapshots");
    for e in std::fs::read_dir(&snapshots).unwrap().flatten() {
        std::fs::remove_dir_all(e.path()).unwrap();
    }
    let r = resume(&t).await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let alive = "cat /tmp/kept; kill -0 $(cat /tmp/loop.pid) && echo alive";
    let (status, out) = t.run(&id, Some(&token), alive).await;
    assert_eq!((status, out.as_str()), (200, "kept\nalive\n"));

    // ---- a second pause shares chunks with the first (content-defined
    // chunks: gVisor's image is a packed stream, so fixed-size chunks
    // would all shift), and replaces it
    let r = t.pause(&id).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let events = pause_events(&t, &id).await;
    let second = events.last().unwrap();
    eprintln!("second pause: {second}");
    assert!(
        count_before(second, "deduplicated") > 0,
        "the second pause deduplicates against the first: {second}"
    );
    let now = objects.list(&prefix).await.unwrap();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, published, "the new snapshot replaced the old");
    let r = resume(&t).await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);

    // ---- the store is down: the pause fails clearly, the sandbox runs on
    let away = t.data.join("objects.away");
    std::fs::rename(&objects_dir, &away).unwrap();
    std::fs::write(&objects_dir, b"not a directory").unwrap();
    let r = t.pause(&id).await;
    let msg = json_error(r, 503).await;
    assert!(msg.contains("keeps running"), "{msg}");
    let (status, out) = t.run(&id, Some(&token), alive).await;
    assert_eq!((status, out.as_str()), (200, "kept\nalive\n"));
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    let detail: Value = r.json().await.unwrap();
    assert_eq!(detail["state"], "running", "{detail}");
    // The store is back: pausing works again.
    std::fs::remove_file(&objects_dir).unwrap();
    std::fs::rename(&away, &objects_dir).unwrap();
    let r = t.pause(&id).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let r = resume(&t).await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let (status, out) = t.run(&id, Some(&token), alive).await;
    assert_eq!((status, out.as_str()), (200, "kept\nalive\n"));

    // ---- the store records who holds the sandbox, and how
    let running = objects.claim(&id).await.unwrap().expect("a claim");
    assert_eq!(running.state, ClaimState::Running, "{running:?}");
    let r = t.pause(&id).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let paused = objects.claim(&id).await.unwrap().expect("a claim");
    assert_eq!(
        (paused.state, paused.epoch, paused.node.as_str()),
        (ClaimState::Paused, running.epoch + 1, running.node.as_str())
    );
    assert_eq!(paused.snapshot, objects.list(&prefix).await.unwrap().pop());
    // What an operator sees of it.
    let ls = std::process::Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .args(["store", "ls", "--object-store"])
        .arg(format!("file://{}", objects_dir.display()))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with(paused.snapshot.as_deref().unwrap_or("?")))
        .unwrap_or_else(|| panic!("sandmesh store ls does not list the snapshot:\n{table}"));
    assert!(
        line.contains(&format!("{id} (paused on {})", running.node)) && line.contains("pause"),
        "{line}"
    );

    // ---- another node took it over while this one was cut off: this
    // node's copy is stale; its resume says so and drops the copy
    objects
        .write_claim(
            &id,
            Some(paused.epoch),
            ClaimState::Paused,
            "elsewhere",
            paused.snapshot.as_deref(),
        )
        .await
        .unwrap();
    let msg = json_error(resume(&t).await.unwrap(), 409).await;
    assert!(msg.contains("held by node elsewhere"), "{msg}");
    assert_eq!(
        std::fs::read_dir(&snapshots).unwrap().count(),
        0,
        "the stale local copy is gone"
    );

    // ---- that node is no member of this cluster: the next call for the
    // sandbox takes it over from the store, and it resumes here whole
    let r = t
        .api(M::GET, &format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let detail: Value = r.json().await.unwrap();
    assert_eq!(detail["state"], "paused", "{detail}");
    assert_eq!(
        objects.claim(&id).await.unwrap().unwrap().node,
        running.node
    );
    let r = resume(&t).await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let (status, out) = t.run(&id, Some(&token), alive).await;
    assert_eq!((status, out.as_str()), (200, "kept\nalive\n"));

    // ---- kill takes its published snapshots with it
    let r = t.kill(&id).await;
    assert_eq!(r.status(), 204);
    assert!(objects.list(&prefix).await.unwrap().is_empty());
    assert_eq!(objects.claim(&id).await.unwrap(), None);
}

/// A node publishes the template snapshots it prepared to the object
/// store; a node that starts later on the same store fetches them instead
/// of booting its templates, creates from them, and its pauses do not send
/// again what a sandbox did not change of its template.
#[tokio::test]
async fn template_snapshots_are_published_and_a_later_node_fetches_them() {
    let test = "template_snapshots_are_published_and_a_later_node_fetches_them";
    let store_dir = std::env::temp_dir().join(format!("smh-template-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store_dir);
    let url = actors::objects::StoreUrl::Local {
        dir: store_dir.clone(),
    };
    let objects = actors::objects::SnapshotStore::open(&url, &Default::default()).unwrap();
    // Templates that hold memory their sandboxes do not change: without
    // it whether a pause shares a chunk with its template is chance.
    let rootfs_dir =
        std::env::temp_dir().join(format!("smh-template-rootfs-{}", std::process::id()));
    let Some(rootfs) = common::rootfs_with_ballast(test, &rootfs_dir, 16) else {
        return;
    };
    let metric = |text: &str, source: &str| -> u64 {
        let line = format!("sandmesh_template_snapshots_total{{source=\"{source}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let scrape = |t: &common::TestNode| {
        let req = t.http.get(t.url("/metrics")).send();
        async move { req.await.unwrap().text().await.unwrap() }
    };
    let fetched;
    {
        let Some(a) = common::node_on_store(test, 2, Some(url.clone()), Some(&rootfs)).await else {
            return;
        };
        // Published in the background (base and small).
        let started = Instant::now();
        while objects.list("templates").await.unwrap().len() < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the node did not publish its template snapshots: {:?}",
                objects.list("templates").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fetched = metric(&scrape(&a).await, "fetched");
    }
    let Some(b) = common::node_on_store(&format!("{test}-b"), 2, Some(url), Some(&rootfs)).await
    else {
        return;
    };
    // One metrics recorder per process, which every test's node counts
    // into; only this test's nodes share a store, so only b fetches.
    let text = scrape(&b).await;
    assert_eq!(metric(&text, "fetched"), fetched + 2, "{text}");

    let r = b
        .create(json!({"templateID": "base", "timeout": 120}))
        .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let sbx: Value = r.json().await.unwrap();
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    let token = sbx["envdAccessToken"].as_str().unwrap().to_owned();
    let (status, out) = b
        .run(&id, Some(&token), "echo from-a-fetched-template")
        .await;
    assert_eq!((status, out.as_str()), (200, "from-a-fetched-template\n"));
    let r = b.pause(&id).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let first = pause_events(&b, &id).await;
    eprintln!("first pause: {}", first[0]);
    assert!(
        count_before(&first[0], "deduplicated") > 0,
        "the first pause deduplicates against the template: {first:?}"
    );
    let r = b.kill(&id).await;
    assert_eq!(r.status(), 204);
    drop(b);
    let _ = std::fs::remove_dir_all(&store_dir);
    let _ = std::fs::remove_dir_all(&rootfs_dir);
}
