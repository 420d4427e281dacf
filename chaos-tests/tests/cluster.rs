//! Multi-node tests: real `sandmesh node` processes on 127.0.0.1..3 (see
//! the harness in `chaos_tests`). Each test starts its own cluster.

use std::time::{Duration, Instant};

use chaos_tests::{Cluster, Method, StatusCode, node_ids, node_in, owner_in, sandmesh, wait_until};
use serde_json::json;

/// How long gossip gets to converge after the nodes started.
const CONVERGE: Duration = Duration::from_secs(30);
/// The longest a dead node may take to be declared dead by every peer.
const DEAD_WITHIN: Duration = Duration::from_secs(5);

/// Wait until node `viewer` shows node `id` in `state`; the time it took.
async fn wait_state(
    c: &Cluster,
    viewer: usize,
    id: &str,
    state: &str,
    timeout: Duration,
) -> Duration {
    match wait_until(timeout, || async {
        c.seen(viewer, id).await.is_some_and(|(s, _)| s == state)
    })
    .await
    {
        Ok(t) => t,
        Err(_) => panic!(
            "{}: node {} did not show {id} {state} within {timeout:?}; it shows {:?}",
            c.test,
            c.nodes[viewer].id,
            c.cluster_view(viewer).await
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_gossip_detect_death_and_rejoin() {
    let test = "three_nodes_gossip_detect_death_and_rejoin";
    let Some(mut c) = Cluster::start(test, 3).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    let (_, gen_before) = c.seen(0, "n2").await.expect("n0 lists n2");

    // kill -9 n2: both others must call it dead, quickly.
    c.kill9(2);
    let killed = Instant::now();
    let r = wait_until(Duration::from_secs(30), || async {
        for i in [0, 1] {
            if c.seen(i, "n2").await.is_none_or(|(s, _)| s != "dead") {
                return false;
            }
        }
        true
    })
    .await;
    let took = killed.elapsed();
    assert!(
        r.is_ok(),
        "{test}: n0 and n1 did not both show n2 dead within 30 s: n0 sees {:?}, n1 sees {:?}",
        c.seen(0, "n2").await,
        c.seen(1, "n2").await
    );
    eprintln!("{test}: n2 killed -> dead on n0 and n1 in {took:?}");
    assert!(
        took <= DEAD_WITHIN,
        "{test}: dead detection took {took:?}, more than {DEAD_WITHIN:?}"
    );

    // Creates while n2 is dead never go there.
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = c.create(0).await;
        assert_ne!(
            c.owner(&id),
            "n2",
            "{test}: sandbox {id} was placed on the dead node n2"
        );
        assert!(
            ["n0", "n1"].contains(&c.owner(&id).as_str()),
            "{test}: sandbox {id} is not on n0 or n1"
        );
        ids.push(id);
    }
    for id in &ids {
        let s = c.delete(0, id).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{test}: deleting {id}");
    }

    // Restarted, n2 comes back ready with a newer generation.
    let restarted = Instant::now();
    c.restart(2);
    let startup = restarted.elapsed();
    let back = Instant::now();
    let r = wait_until(Duration::from_secs(30), || async {
        for i in [0, 1] {
            match c.seen(i, "n2").await {
                Some((s, g)) if s == "ready" && g > gen_before => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    let took = back.elapsed();
    assert!(
        r.is_ok(),
        "{test}: restarted n2 not ready with a generation > {gen_before} on n0 and n1 within 30 s: n0 sees {:?}, n1 sees {:?}",
        c.seen(0, "n2").await,
        c.seen(1, "n2").await
    );
    eprintln!(
        "{test}: n2 restarted: process start -> readiness line {startup:?}, readiness line -> ready with a newer generation on n0 and n1 {took:?}"
    );
    assert!(
        took <= Duration::from_secs(10),
        "{test}: rejoin took {took:?}, more than 10 s"
    );
    // And it sees the whole cluster again itself.
    c.wait_converged(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_moves_creates_elsewhere() {
    let test = "drain_moves_creates_elsewhere";
    let Some(c) = Cluster::start(test, 3).await else {
        return;
    };
    let mut c = c;
    c.wait_converged(CONVERGE).await;
    let url1 = c.url(1);
    let key = c.key.clone();
    let out = tokio::task::block_in_place(|| {
        sandmesh(&["node", "drain", "--url", &url1, "--api-key", &key], None)
    });
    assert!(
        out.contains("n1") && out.contains("draining"),
        "{test}: `sandmesh node drain` printed {out:?}"
    );
    wait_state(&c, 0, "n1", "draining", Duration::from_secs(10)).await;
    wait_state(&c, 2, "n1", "draining", Duration::from_secs(10)).await;

    let mut ids = Vec::new();
    for _ in 0..6 {
        let id = c.create(1).await;
        assert_ne!(
            c.owner(&id),
            "n1",
            "{test}: {id} was placed on the draining n1"
        );
        ids.push(id);
    }
    let (status, list) = c.get(1, "/sandboxes").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{test}: GET /sandboxes via n1: {list}"
    );
    let listed: Vec<&str> = list
        .as_array()
        .unwrap_or_else(|| panic!("{test}: GET /sandboxes is not an array: {list}"))
        .iter()
        .filter_map(|s| s["sandboxID"].as_str())
        .collect();
    for id in &ids {
        assert!(
            listed.contains(&id.as_str()),
            "{test}: GET /sandboxes via n1 lacks {id}: it lists {listed:?}"
        );
    }

    let table = tokio::task::block_in_place(|| {
        sandmesh(&["status", "--url", &url1, "--api-key", &key], None)
    });
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().next() == Some("n1") && l.contains("draining")),
        "{test}: `sandmesh status` does not show n1 draining:\n{table}"
    );
    let js = tokio::task::block_in_place(|| {
        sandmesh(
            &["status", "--url", &url1, "--api-key", &key, "--json"],
            None,
        )
    });
    let v: serde_json::Value = serde_json::from_str(&js)
        .unwrap_or_else(|e| panic!("{test}: `sandmesh status --json` is not JSON ({e}):\n{js}"));
    assert_eq!(
        node_in(&v, "n1").map(|(s, _)| s),
        Some("draining".into()),
        "{test}: status --json: {v}"
    );
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{test}: {v}");
    // The answering node pinged the two others over the mesh; one host,
    // one clock.
    for n in v["nodes"].as_array().unwrap() {
        if n["self"] == true {
            assert!(n.get("rttMs").is_none(), "{test}: {n}");
            continue;
        }
        assert!(
            n["rttMs"].as_f64().is_some_and(|ms| ms > 0.0),
            "{test}: {n}"
        );
        assert!(
            n["clockOffsetMs"].as_i64().is_some_and(|o| o.abs() < 1000),
            "{test}: {n}"
        );
    }

    let out = tokio::task::block_in_place(|| {
        sandmesh(
            &["node", "drain", "--url", &url1, "--api-key", &key, "--undo"],
            None,
        )
    });
    assert!(
        out.contains("ready"),
        "{test}: `sandmesh node drain --undo` printed {out:?}"
    );
    wait_state(&c, 0, "n1", "ready", Duration::from_secs(10)).await;
    ids.push(c.create(1).await);
    for id in &ids {
        let s = c.delete(1, id).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{test}: deleting {id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_owner_is_a_clear_503_and_traffic_through_a_non_owner_works() {
    let test = "dead_owner_is_a_clear_503_and_traffic_through_a_non_owner_works";
    let Some(mut c) = Cluster::start(test, 3).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    for i in [0, 1] {
        let (s, b) = c.send(c.api(i, Method::POST, "/node/drain")).await;
        assert_eq!(s, StatusCode::OK, "{test}: POST /node/drain on n{i}: {b}");
    }
    wait_state(&c, 0, "n0", "draining", Duration::from_secs(10)).await;
    wait_state(&c, 0, "n1", "draining", Duration::from_secs(10)).await;
    let id = c.create(0).await;
    assert_eq!(
        c.owner(&id),
        "n2",
        "{test}: with n0 and n1 draining, {id} is not on n2"
    );
    for i in [0, 1] {
        let (s, b) = c.send(c.api(i, Method::DELETE, "/node/drain")).await;
        assert_eq!(s, StatusCode::OK, "{test}: DELETE /node/drain on n{i}: {b}");
    }

    // Through the non-owners.
    let (s, b) = c.get(0, &format!("/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{test}: GET /sandboxes/{id} via n0: {b}");
    assert_eq!(b["sandboxID"], id.as_str(), "{test}: {b}");
    let (s, b) = c
        .send(c.sandbox_traffic(0, Method::GET, &id, 49983, "/health"))
        .await;
    assert!(
        s == StatusCode::NO_CONTENT || s == StatusCode::OK,
        "{test}: envd /health of {id} via n0 answered {s}: {b}"
    );
    let (s, b) = c
        .send(
            c.api(1, Method::POST, &format!("/sandboxes/{id}/timeout"))
                .json(&json!({"timeout": 60})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{test}: set timeout via n1: {b}");

    // The owner dies: a clear 503, not a hang.
    c.kill9(2);
    let dead_after = wait_state(&c, 0, "n2", "dead", Duration::from_secs(30)).await;
    eprintln!("{test}: n0 saw n2 dead {dead_after:?} after the kill");
    let asked = Instant::now();
    let resp = c
        .api(0, Method::GET, &format!("/sandboxes/{id}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{test}: GET /sandboxes/{id} of a dead owner via n0: {e:?}"));
    let took = asked.elapsed();
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{test}: GET of a sandbox on the dead n2 via n0 answered {status}: {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{test}: the 503 body is not JSON ({e}): {text}"));
    assert!(
        body["code"].is_number(),
        "{test}: 503 body without code: {body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("dead")),
        "{test}: 503 message does not say dead: {body}"
    );
    eprintln!("{test}: 503 for the dead owner's sandbox in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "{test}: the 503 took {took:?}"
    );

    let (s, b) = c.get(0, "/sandboxes/abcdefghij012345-nobody").await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "{test}: GET of a sandbox of a never-member node: {b}"
    );

    // Clean up: bring n2 back and remove the sandbox it kept.
    c.restart(2);
    wait_state(&c, 0, "n2", "ready", Duration::from_secs(20)).await;
    let s = c.delete(0, &id).await;
    eprintln!("{test}: deleting {id} after n2's restart: {s}");
}

/// Pause on its node, kill -9 that node: a survivor takes the paused
/// sandbox over from the object store (listed, connectable, memory and
/// files intact), a sandbox that was running there is reported lost and
/// can be killed, and the old node, back, drops its stale copies.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_sandbox_outlives_its_node_and_resumes_on_another() {
    let test = "a_paused_sandbox_outlives_its_node_and_resumes_on_another";
    let Some(mut c) = Cluster::start(test, 3).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    // Both sandboxes on n2: the others drain meanwhile.
    for i in [0, 1] {
        let (s, b) = c.send(c.api(i, Method::POST, "/node/drain")).await;
        assert_eq!(s, StatusCode::OK, "{test}: POST /node/drain on n{i}: {b}");
    }
    wait_state(&c, 0, "n0", "draining", Duration::from_secs(10)).await;
    wait_state(&c, 0, "n1", "draining", Duration::from_secs(10)).await;
    let sbx = c.create_sandbox(0).await;
    let running = c.create(0).await;
    for i in [0, 1] {
        let (s, b) = c.send(c.api(i, Method::DELETE, "/node/drain")).await;
        assert_eq!(s, StatusCode::OK, "{test}: DELETE /node/drain on n{i}: {b}");
    }
    let id = sbx["sandboxID"].as_str().unwrap_or_default().to_owned();
    let token = sbx["envdAccessToken"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (gone, owner, via) = (2, "n2".to_owned(), 0);
    assert_eq!(
        (c.owner(&id), c.owner(&running)),
        (owner.clone(), owner.clone())
    );
    // The running one is recorded in the store (after its create answered).
    let claims = c.dir.join("objects/claims");
    let recorded = wait_until(Duration::from_secs(10), || async {
        claims.join(&running).is_dir()
    })
    .await;
    assert!(
        recorded.is_ok(),
        "{test}: {running} has no claim in the store"
    );
    let (s, out) = c
        .run(
            via,
            &id,
            &token,
            "echo kept > /tmp/kept; \
             sh -c 'while :; do sleep 0.2; done' >/dev/null 2>&1 & echo $! > /tmp/loop.pid",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{test}: run in {id} via n{via}: {out}");
    let (s, b) = c
        .send(c.api(via, Method::POST, &format!("/sandboxes/{id}/pause")))
        .await;
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "{test}: pause of {id} via n{via}: {b}"
    );

    // Its node dies; a survivor takes the paused sandbox over by itself.
    c.kill9(gone);
    wait_state(&c, 1, &owner, "dead", Duration::from_secs(30)).await;
    wait_state(&c, via, &owner, "dead", Duration::from_secs(30)).await;
    let taken = wait_until(Duration::from_secs(30), || async {
        let (s, b) = c.get(via, &format!("/sandboxes/{id}")).await;
        s == StatusCode::OK && b["state"] == "paused"
    })
    .await;
    let (s, b) = c.get(via, &format!("/sandboxes/{id}")).await;
    assert!(
        taken.is_ok(),
        "{test}: {id} was not listed paused by a survivor after {owner} died: {s} {b}\n{}",
        c.log_tails(30)
    );
    eprintln!(
        "{test}: {id} taken over {:?} after {owner} was seen dead",
        taken.ok()
    );
    let (s, listed) = c.get(via, "/v2/sandboxes?state=paused").await;
    assert_eq!(s, StatusCode::OK, "{test}: {listed}");
    assert!(
        listed
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["sandboxID"] == id.as_str())),
        "{test}: {id} is not in the paused list: {listed}"
    );

    // The one that was running is lost with its node: said so, and a kill
    // frees what the cluster keeps of it.
    let (s, b) = c.get(via, &format!("/sandboxes/{running}")).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{test}: {running} via n{via}: {b}"
    );
    assert!(
        b["message"].as_str().is_some_and(|m| m.contains("lost")),
        "{test}: {b}"
    );
    let s = c.delete(via, &running).await;
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "{test}: kill of the lost {running}"
    );
    assert!(!claims.join(&running).exists(), "{test}: its claims stayed");
    let (s, b) = c.get(via, &format!("/sandboxes/{running}")).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "{test}: {running} after its kill: {b}"
    );

    // Connect resumes it on its new node, from the store.
    let (s, b) = c
        .send(
            c.api(via, Method::POST, &format!("/sandboxes/{id}/connect"))
                .json(&json!({"timeout": 120})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "{test}: connect to {id} via n{via}: {b}"
    );
    assert_eq!(b["sandboxID"], id.as_str(), "{test}: {b}");
    assert_ne!(owner_in(&b), owner, "{test}: resumed on the dead node? {b}");
    let (s, out) = c
        .run(
            via,
            &id,
            &token,
            "cat /tmp/kept; kill -0 $(cat /tmp/loop.pid) && echo alive",
        )
        .await;
    assert_eq!(
        (s, out.as_str()),
        (StatusCode::OK, "kept\nalive\n"),
        "{test}: the file and the process came back"
    );

    // The old node comes back: its copy is stale and goes; calls through
    // it reach the sandbox where it runs now.
    c.restart(gone);
    wait_state(&c, via, &owner, "ready", Duration::from_secs(30)).await;
    let log = c.nodes[gone].log_tail(400);
    assert_eq!(
        log.matches("dropping this node's copy").count(),
        2,
        "{test}: {owner} kept a stale copy of {id} or {running}:\n{log}"
    );
    let reached = wait_until(Duration::from_secs(10), || async {
        let (s, b) = c.get(gone, &format!("/sandboxes/{id}")).await;
        s == StatusCode::OK && b["state"] == "running"
    })
    .await;
    assert!(
        reached.is_ok(),
        "{test}: {id} via the restarted {owner}: {:?}",
        c.get(gone, &format!("/sandboxes/{id}")).await
    );
    let s = c.delete(gone, &id).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{test}: delete {id} via {owner}");
    let (s, b) = c.get(via, &format!("/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{test}: {id} after its kill: {b}");
    let claims = c.dir.join("objects/claims").join(&id);
    assert!(
        !claims.exists(),
        "{test}: the kill left {}",
        claims.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn node_of_another_cluster_cannot_join() {
    let test = "node_of_another_cluster_cannot_join";
    let Some(mut c) = Cluster::start(test, 2).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    let s = c.start_stranger("stranger");
    // Gossip has had plenty of rounds to let it in, were it let in.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..3 {
        let v0 = c.cluster_view(0).await.expect("n0 answers /cluster");
        let ids0 = node_ids(&v0);
        assert_eq!(ids0, ["n0", "n1"], "{test}: n0's view: {v0}");
        let vs = c
            .cluster_view(s)
            .await
            .expect("the stranger answers /cluster");
        let idss = node_ids(&vs);
        assert_eq!(idss, ["stranger"], "{test}: the stranger's view: {vs}");
        assert_ne!(
            v0["clusterID"], vs["clusterID"],
            "{test}: two CAs, one cluster id"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_seed_node_serves_alone() {
    let test = "unreachable_seed_node_serves_alone";
    let Some(mut c) = Cluster::start(test, 1).await else {
        return;
    };
    // A port nobody listens on: the seed never answers.
    let ip = chaos_tests::node_ip(1);
    let dead_seed = std::net::SocketAddr::new(ip, chaos_tests::free_udp_port(ip));
    let lonely = c.start_joined("lonely", dead_seed);
    let v = c
        .cluster_view(lonely)
        .await
        .expect("the node answers /cluster");
    let ids = node_ids(&v);
    assert_eq!(ids, ["lonely"], "{test}: {v}");
    // It serves alone: a create through it lands on it.
    let id = c.create(lonely).await;
    assert_eq!(c.owner(&id), "lonely", "{test}: {id}");
    assert_eq!(c.delete(lonely, &id).await, StatusCode::NO_CONTENT);
    // And says why it is alone, in a line an operator can act on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = c.nodes[lonely].log_tail(200);
        if log.contains("no mesh peer reachable") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no 'no mesh peer reachable' line in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_node_id_newest_wins_and_the_older_stands_aside() {
    let test = "a_duplicate_node_id_newest_wins_and_the_older_stands_aside";
    let Some(mut c) = Cluster::start(test, 2).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    let (_, old_generation) = c.seen(0, "n1").await.expect("n0 sees n1");
    let twin = c.start_twin(1);
    // n0 lists one n1: the newer process.
    let took = wait_until(Duration::from_secs(15), || async {
        c.seen(0, "n1")
            .await
            .is_some_and(|(state, generation)| state == "ready" && generation > old_generation)
    })
    .await;
    if took.is_err() {
        panic!(
            "{test}: n0 never took the twin as n1: {:?}",
            c.cluster_view(0).await
        );
    }
    let v0 = c.cluster_view(0).await.expect("n0 answers");
    let n1_rows = v0["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["nodeID"] == "n1")
        .count();
    assert_eq!(n1_rows, 1, "{test}: {v0}");
    // The older process sees itself superseded: unhealthy, so no node
    // places a sandbox there, and it says why.
    let stood_aside = wait_until(Duration::from_secs(15), || async {
        c.cluster_view(1).await.is_some_and(|v| {
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["self"] == true && n["state"] == "unhealthy")
        })
    })
    .await;
    if stood_aside.is_err() {
        panic!(
            "{test}: the older n1 never stood aside: {:?}",
            c.cluster_view(1).await
        );
    }
    assert!(
        c.nodes[1].log_tail(400).contains("same id"),
        "{test}: the older n1 did not log why:\n{}",
        c.nodes[1].log_tail(40)
    );
    assert!(c.nodes[twin].is_running(), "{test}: the twin died");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_gossip_member_gets_no_sandboxes() {
    let test = "a_forged_gossip_member_gets_no_sandboxes";
    let Some(mut c) = Cluster::start(test, 2).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    let view = c.cluster_view(0).await.expect("n0 answers");
    let cluster_id = view["clusterID"].as_str().expect("a cluster id").to_owned();
    // Gossip is unauthenticated and the cluster id is no secret: a member
    // with no certificate, claiming all the room in the world and the
    // template, at a QUIC address where nothing answers.
    let ip = chaos_tests::node_ip(2);
    let nowhere = std::net::SocketAddr::new(ip, chaos_tests::free_udp_port(ip));
    let gossip = std::net::SocketAddr::new(ip, chaos_tests::free_udp_port(ip));
    let info = schema::mesh::NodeInfo {
        id: "forger".into(),
        generation: mesh::membership::unix_millis(),
        quic_addr: nowhere,
        rest_addr: nowhere,
        state: schema::mesh::NodeState::Ready,
        free_vcpus: 4096,
        free_memory_mib: 1 << 40,
        sandboxes: 0,
        max_sandboxes: 100_000,
        templates: vec!["base".into()],
    };
    let mut config = mesh::membership::MembershipConfig::new(&cluster_id, "forger", gossip);
    config.seeds = vec![c.nodes[0].gossip.to_string()];
    let forger = mesh::membership::Membership::start(config, &info)
        .await
        .expect("the forged member gossips");
    let listed = wait_until(Duration::from_secs(15), || async {
        c.cluster_view(0).await.is_some_and(|v| {
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["nodeID"] == "forger" && n["verified"] == false)
        })
    })
    .await;
    assert!(
        listed.is_ok(),
        "{test}: n0 never listed the forger as unverified: {:?}",
        c.cluster_view(0).await
    );
    // Creates go to the real nodes, without first trying the forger.
    for _ in 0..3 {
        let started = Instant::now();
        let id = c.create(0).await;
        assert!(
            ["n0", "n1"].contains(&c.owner(&id).as_str()),
            "{test}: {id} placed off the real nodes"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{test}: a create took {:?} (a dial to the forger on the way?)",
            started.elapsed()
        );
        assert_eq!(c.delete(0, &id).await, StatusCode::NO_CONTENT);
    }
    // Nor does the list wait on it or report it missing.
    let resp = c
        .api(0, Method::GET, "/sandboxes")
        .send()
        .await
        .expect("GET /sandboxes");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get("x-sandmesh-unreachable-nodes").is_none(),
        "{test}: the list asked the forger"
    );
    forger.shutdown().await;
}

/// Every answer of `results` with `status`, as (status, body).
fn with_status(results: &[(StatusCode, serde_json::Value)], status: StatusCode) -> usize {
    results.iter().filter(|(s, _)| *s == status).count()
}

type Answers = tokio::task::JoinSet<(StatusCode, serde_json::Value)>;

/// `n` concurrent creates spread over the nodes `via` (round robin).
async fn concurrent_creates(
    c: &Cluster,
    n: usize,
    via: &[usize],
) -> Vec<(StatusCode, serde_json::Value)> {
    answers(start_creates(c, n, via)).await
}

/// Start `n` creates spread over the nodes `via` (round robin).
fn start_creates(c: &Cluster, n: usize, via: &[usize]) -> Answers {
    let mut set = tokio::task::JoinSet::new();
    for k in 0..n {
        let req = c
            .api(via[k % via.len()], Method::POST, "/sandboxes")
            .json(&json!({"templateID": "base", "timeout": 120}));
        set.spawn(async move {
            match req.send().await {
                Ok(r) => {
                    let status = r.status();
                    let body = r.json::<serde_json::Value>().await.unwrap_or_default();
                    (status, body)
                }
                Err(e) => (StatusCode::IM_A_TEAPOT, json!(format!("no answer: {e}"))),
            }
        });
    }
    set
}

async fn answers(mut set: Answers) -> Vec<(StatusCode, serde_json::Value)> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("a create task"));
    }
    out
}

/// Placement reserves a slot on the chosen node's placement actor (a
/// remote actor call over the mesh's QUIC) before the create is sent, so
/// 200 creates at once through all three nodes of a cluster with room for
/// 6 make exactly 6 sandboxes, two per node, and 194 clean 429s.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_fill_the_cluster_exactly() {
    let test = "concurrent_creates_fill_the_cluster_exactly";
    let Some(mut c) = Cluster::start_with_capacity(test, 3, 2).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;

    // A create through a non-owner against one through the owner: both
    // reserve first (the owner's own placement actor, or a peer's over
    // the actor session), then create. Placement ranks a tie by node id,
    // so creates through n0 and n1 alike land on n0.
    let mut through_owner = Vec::new();
    let mut through_other = Vec::new();
    for k in 0..10 {
        let via = k % 2;
        let started = Instant::now();
        let id = c.create(via).await;
        let took = started.elapsed();
        if c.owner(&id) == c.nodes[via].id {
            through_owner.push(took);
        } else {
            through_other.push(took);
        }
        assert_eq!(c.delete(0, &id).await, StatusCode::NO_CONTENT);
    }
    through_owner.sort();
    through_other.sort();
    if !through_owner.is_empty() && !through_other.is_empty() {
        let owner_p50 = through_owner[through_owner.len() / 2];
        let other_p50 = through_other[through_other.len() / 2];
        eprintln!(
            "{test}: create p50 through the owner {owner_p50:?} ({} runs), through a non-owner {other_p50:?} ({} runs): ratio {:.2}",
            through_owner.len(),
            through_other.len(),
            other_p50.as_secs_f64() / owner_p50.as_secs_f64()
        );
    }

    let started = Instant::now();
    let results = concurrent_creates(&c, 200, &[0, 1, 2]).await;
    eprintln!(
        "{test}: 200 concurrent creates answered in {:?}",
        started.elapsed()
    );
    let created: Vec<String> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .filter_map(|(_, b)| b["sandboxID"].as_str().map(str::to_owned))
        .collect();
    let owners: Vec<&str> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, b)| owner_in(b))
        .collect();
    let refused = with_status(&results, StatusCode::TOO_MANY_REQUESTS);
    let others: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s != StatusCode::CREATED && *s != StatusCode::TOO_MANY_REQUESTS)
        .take(5)
        .collect();
    assert!(
        created.len() == 6 && refused == 194,
        "{test}: {} created, {refused} refused with 429, others (first 5): {others:?}",
        created.len()
    );
    for (s, body) in &results {
        if *s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["code"], 429, "{test}: a 429 without its JSON: {body}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{test}: a 429 without a message: {body}"
            );
        }
    }
    for node in ["n0", "n1", "n2"] {
        let on = owners.iter().filter(|o| **o == node).count();
        assert_eq!(on, 2, "{test}: {on} sandboxes on {node}: {created:?}");
    }
    for id in &created {
        assert_eq!(
            c.delete(1, id).await,
            StatusCode::NO_CONTENT,
            "{test}: deleting {id}"
        );
    }
}

/// A node killed while creates are being placed on it: every caller gets
/// an answer (a sandbox, a 429 or a 503 naming what failed), never a hang,
/// and no slot stays held on the nodes that live on (a reservation whose
/// create never came lapses).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_placement_leaks_nothing() {
    let test = "a_node_killed_mid_placement_leaks_nothing";
    let Some(mut c) = Cluster::start_with_capacity(test, 3, 2).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    let creates = start_creates(&c, 30, &[0, 1]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::task::block_in_place(|| c.kill9(2));
    let results = answers(creates).await;
    for (s, body) in &results {
        assert!(
            [
                StatusCode::CREATED,
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::SERVICE_UNAVAILABLE
            ]
            .contains(s),
            "{test}: a create answered {s}: {body}"
        );
        if *s != StatusCode::CREATED {
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{test}: {s} without a message: {body}"
            );
        }
    }
    let mut ids: Vec<String> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .filter(|(_, b)| owner_in(b) != "n2")
        .filter_map(|(_, b)| b["sandboxID"].as_str().map(str::to_owned))
        .collect();
    eprintln!(
        "{test}: {} created on n0/n1, {} 429, {} 503",
        ids.len(),
        with_status(&results, StatusCode::TOO_MANY_REQUESTS),
        with_status(&results, StatusCode::SERVICE_UNAVAILABLE)
    );
    if let Some((_, body)) = results
        .iter()
        .find(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
    {
        eprintln!("{test}: a 503 said: {body}");
    }
    // Once n2 is dead and any reservation that lost its create lapsed,
    // n0 and n1 have exactly their 4 slots between them.
    wait_state(&c, 0, "n2", "dead", Duration::from_secs(30)).await;
    wait_state(&c, 1, "n2", "dead", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let more = concurrent_creates(&c, 20, &[0, 1]).await;
    for (s, body) in &more {
        assert!(
            *s == StatusCode::CREATED || *s == StatusCode::TOO_MANY_REQUESTS,
            "{test}: after the kill a create answered {s}: {body}"
        );
    }
    ids.extend(
        more.iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .filter_map(|(_, b)| b["sandboxID"].as_str().map(str::to_owned)),
    );
    assert_eq!(
        ids.len(),
        4,
        "{test}: n0 and n1 should hold exactly 4 sandboxes: {ids:?}"
    );
    for id in &ids {
        assert_eq!(
            c.delete(0, id).await,
            StatusCode::NO_CONTENT,
            "{test}: deleting {id}"
        );
    }
}

/// Drain (`true`) or make ready (`false`) node `i`, and wait until node
/// `viewer` sees it so.
async fn set_drain(c: &Cluster, i: usize, drain: bool, viewer: usize) {
    let method = if drain { Method::POST } else { Method::DELETE };
    let (s, b) = c.send(c.api(i, method, "/node/drain")).await;
    assert_eq!(s, StatusCode::OK, "{}: drain {drain} on n{i}: {b}", c.test);
    let state = if drain { "draining" } else { "ready" };
    wait_state(c, viewer, &c.nodes[i].id, state, Duration::from_secs(10)).await;
}

/// A sandbox made on one node is found from the others at once — the
/// registry's miss fallback covers the moment before the process groups
/// sync — and its calls and traffic reach it; an id of the old shape
/// (`<16>-<node id>`) that the registry does not know still routes by its
/// suffix.
#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_made_on_one_node_is_found_from_another_at_once() {
    let test = "a_sandbox_made_on_one_node_is_found_from_another_at_once";
    let Some(mut c) = Cluster::start(test, 3).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    // Everything lands on n1.
    set_drain(&c, 0, true, 1).await;
    set_drain(&c, 2, true, 1).await;
    let mut ids = Vec::new();
    for k in 0..4 {
        let id = c.create(1).await;
        assert_eq!(c.owner(&id), "n1", "{test}: {id}");
        assert!(
            id.len() == 20
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{test}: {id} is not of E2B's shape"
        );
        // At once, from the two other nodes, alternately first.
        let (first, second) = if k % 2 == 0 { (2, 0) } else { (0, 2) };
        for via in [first, second] {
            let (s, b) = c.get(via, &format!("/sandboxes/{id}")).await;
            assert_eq!(
                s,
                StatusCode::OK,
                "{test}: GET {id} via n{via} right after its create on n1: {b}"
            );
            assert_eq!(b["clientID"], "n1", "{test}: {b}");
        }
        let (s, b) = c
            .send(c.sandbox_traffic(first, Method::GET, &id, 49983, "/health"))
            .await;
        assert!(
            s == StatusCode::NO_CONTENT || s == StatusCode::OK,
            "{test}: envd /health of {id} via n{first}: {s} {b}"
        );
        ids.push(id);
    }
    // Every call on a sandbox, through a non-owner.
    let id = &ids[0];
    let (s, b) = c
        .send(
            c.api(2, Method::POST, &format!("/sandboxes/{id}/timeout"))
                .json(&json!({"timeout": 90})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{test}: timeout via n2: {b}");
    let (s, b) = c
        .send(c.api(0, Method::POST, &format!("/sandboxes/{id}/refreshes")))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{test}: refresh via n0: {b}");
    let (s, b) = c.get(2, &format!("/sandboxes/{id}/logs")).await;
    assert_eq!(s, StatusCode::OK, "{test}: logs via n2: {b}");
    assert!(b["logs"].is_array(), "{test}: {b}");
    let (s, b) = c.get(0, &format!("/sandboxes/{id}/metrics")).await;
    assert_eq!(s, StatusCode::OK, "{test}: metrics via n0: {b}");
    // Unknown ids, new shape and old: a clear 404 (asked around first).
    let (s, b) = c.get(0, "/sandboxes/zzzzzzzzzzzzzzzzzzzz").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{test}: unknown id: {b}");
    assert_eq!(b["code"], 404, "{test}: {b}");
    // An old-style id names its node: n2's answer (a 404 from n2, since
    // it has no such sandbox) — and once n2 is dead, a 503 naming it.
    let old = "abcdefghij012345-n2";
    let (s, b) = c.get(0, &format!("/sandboxes/{old}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{test}: old id on n2: {b}");
    c.kill9(2);
    wait_state(&c, 0, "n2", "dead", Duration::from_secs(30)).await;
    let (s, b) = c.get(0, &format!("/sandboxes/{old}")).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{test}: old id of the dead n2: {b}"
    );
    assert!(
        b["message"]
            .as_str()
            .is_some_and(|m| m.contains("n2") && m.contains("dead")),
        "{test}: {b}"
    );
    for id in &ids {
        assert_eq!(
            c.delete(0, id).await,
            StatusCode::NO_CONTENT,
            "{test}: {id}"
        );
    }
}

/// A call carried to a sandbox's owner (a remote actor call to its
/// directory) when the owner is killed mid-call: the caller answers a
/// clear 503 naming the node within moments, not a hang; a sandbox on a
/// surviving node keeps working and that node's slots are all there (no
/// reservation leaked); the restarted owner's actor session is dialled
/// again and its sandbox answers.
#[tokio::test(flavor = "multi_thread")]
async fn an_owner_killed_mid_call_is_a_clear_error_and_nothing_leaks() {
    let test = "an_owner_killed_mid_call_is_a_clear_error_and_nothing_leaks";
    let Some(mut c) = Cluster::start(test, 3).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    // S1 on n1, S2 on n2; n0 (the caller) owns nothing.
    set_drain(&c, 0, true, 1).await;
    set_drain(&c, 2, true, 0).await;
    let s1 = c.create(0).await;
    assert_eq!(c.owner(&s1), "n1", "{test}: {s1}");
    set_drain(&c, 2, false, 0).await;
    set_drain(&c, 1, true, 0).await;
    let s2 = c.create(0).await;
    assert_eq!(c.owner(&s2), "n2", "{test}: {s2}");
    set_drain(&c, 1, false, 0).await;

    // A pause of S1 through n0 (seconds: the guest is quieted, then
    // saved), and n1 killed while it runs.
    let pause = c
        .api(0, Method::POST, &format!("/sandboxes/{s1}/pause"))
        .timeout(Duration::from_secs(60))
        .send();
    let started = Instant::now();
    let call = tokio::spawn(async move {
        let r = pause.await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::block_in_place(|| c.kill9(1));
    let killed = Instant::now();
    let (resp, answered) = call.await.expect("the call's task");
    let resp = resp.unwrap_or_else(|e| panic!("{test}: the pause got no answer: {e:?}"));
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    eprintln!(
        "{test}: the pause answered {status} {:?} after the kill ({:?} after it was sent): {text}",
        answered.saturating_duration_since(killed),
        answered - started
    );
    assert!(
        answered > killed,
        "{test}: the pause was over before the kill ({status} {text}): nothing was cut"
    );
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{test}: a pause whose owner was killed mid-call answered {status}: {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{test}: the 503 is not JSON ({e}): {text}"));
    assert_eq!(body["code"], 503, "{test}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("n1")),
        "{test}: the 503 does not name n1: {body}"
    );
    let took = answered - killed;
    assert!(
        took < Duration::from_secs(10),
        "{test}: the caller waited {took:?} after the owner died"
    );

    // The surviving owner's sandbox works through n0.
    let (s, b) = c.get(0, &format!("/sandboxes/{s2}")).await;
    assert_eq!(s, StatusCode::OK, "{test}: GET {s2} via n0: {b}");
    let (s, b) = c
        .send(c.sandbox_traffic(0, Method::GET, &s2, 49983, "/health"))
        .await;
    assert!(
        s == StatusCode::NO_CONTENT || s == StatusCode::OK,
        "{test}: envd /health of {s2} via n0: {s} {b}"
    );
    // n2 has all its slots: S2 and 3 more (n0 drains, n1 is dead).
    set_drain(&c, 0, true, 2).await;
    wait_state(&c, 0, "n1", "dead", Duration::from_secs(30)).await;
    let more = concurrent_creates(&c, 6, &[0]).await;
    let made: Vec<String> = more
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .filter_map(|(_, b)| b["sandboxID"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        made.len(),
        3,
        "{test}: n2 should take exactly 3 more: {more:?}"
    );
    for id in &made {
        assert_eq!(
            c.delete(0, id).await,
            StatusCode::NO_CONTENT,
            "{test}: {id}"
        );
    }
    set_drain(&c, 0, false, 2).await;

    // n1 back: the actor session is dialled again, its sandbox answers
    // (running, or paused, or lost by the cut pause: an answer, not a
    // 503 and not a hang).
    c.restart(1);
    c.wait_converged(CONVERGE).await;
    let (s, b) = c.get(0, &format!("/sandboxes/{s1}")).await;
    eprintln!("{test}: after n1's restart, {s1} is {s}: {b}");
    assert!(
        s == StatusCode::OK || s == StatusCode::NOT_FOUND,
        "{test}: GET {s1} after n1's restart: {s} {b}"
    );
    let _ = c.delete(0, &s1).await;
    assert_eq!(
        c.delete(0, &s2).await,
        StatusCode::NO_CONTENT,
        "{test}: {s2}"
    );
}

/// A mesh peer that takes no calls: enough to open sessions from.
struct Caller;

impl mesh::transport::Handler for Caller {
    async fn request(
        &self,
        _peer: mesh::transport::Peer,
        _request: schema::mesh::Request,
    ) -> schema::mesh::Response {
        schema::mesh::Response::Error {
            kind: schema::mesh::ErrorKind::Unavailable,
            message: "a test caller".into(),
        }
    }
    async fn stream(&self, _peer: mesh::transport::Peer, stream: mesh::transport::IncomingStream) {
        stream
            .reject(schema::mesh::ErrorKind::Unavailable, "a test caller")
            .await
    }
}

/// A transport for `identity` under `root`, on a loopback address of ours.
fn caller(
    identity: &mesh::tls::NodeIdentity,
    root: &mesh::tls::TrustRoot,
) -> mesh::transport::Transport {
    let ip = chaos_tests::node_ip(7);
    mesh::transport::Transport::bind(
        std::net::SocketAddr::new(ip, 0),
        identity,
        root,
        mesh::transport::TransportConfig::default(),
        std::sync::Arc::new(Caller),
    )
    .expect("binding the test caller")
}

/// The bad-input half of the actor sessions: a node of this cluster that
/// speaks another actor protocol (another ractor_cluster or message set),
/// and a peer with no certificate of this cluster, are both refused, the
/// first with a log line that names it and both protocols; the node's own
/// sessions carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_of_another_actor_protocol_or_cluster_is_refused_by_name() {
    let test = "a_peer_of_another_actor_protocol_or_cluster_is_refused_by_name";
    let Some(mut c) = Cluster::start(test, 2).await else {
        return;
    };
    c.wait_converged(CONVERGE).await;
    // A genuine member's certificate ("a0" sorts before n0, so it is the
    // side that opens sessions), issued by the cluster's own join token.
    let dir = c.dir.join("a0");
    tokio::task::block_in_place(|| {
        let d0 = c.nodes[0].data_dir.to_str().expect("utf-8").to_owned();
        let token = sandmesh(
            &[
                "cluster",
                "join-token",
                "--data-dir",
                &d0,
                "--node-id",
                "a0",
            ],
            None,
        );
        sandmesh(
            &[
                "cluster",
                "join",
                "--data-dir",
                dir.to_str().expect("utf-8"),
                "--token",
                token.trim(),
            ],
            None,
        );
    });
    let files = dir.join("cluster");
    let root = mesh::tls::TrustRoot::load(&files.join(mesh::tls::CA_CERT_FILE)).expect("ca.pem");
    let identity = mesh::tls::NodeIdentity::load(&files, "a0").expect("a0's identity");
    let member = caller(&identity, &root);

    let bogus = "ractor_cluster-0.0.1+sandmesh-0";
    let header = schema::mesh::SessionHeader {
        node_id: "a0".into(),
        actor_protocol: bogus.into(),
    };
    let opened = member.open_session(c.nodes[0].quic, "n0", &header).await;
    let err = match opened {
        Ok(_) => panic!("{test}: n0 took an actor session of protocol {bogus}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("a0") && err.contains(bogus),
        "{test}: the refusal does not name the node and its protocol: {err}"
    );
    let logged = wait_until(Duration::from_secs(5), || async {
        let log = c.nodes[0].log_tail(400);
        log.lines()
            .any(|l| l.contains("actor session refused") && l.contains("a0") && l.contains(bogus))
    })
    .await;
    assert!(
        logged.is_ok(),
        "{test}: n0 logged no refusal naming a0 and {bogus}:\n{}",
        c.nodes[0].log_tail(40)
    );

    // A certificate of another cluster never gets past the handshake.
    let stranger_ca = mesh::tls::ClusterCa::generate().expect("a CA");
    let stranger = caller(
        &stranger_ca.issue("a1").expect("a certificate"),
        &stranger_ca.trust_root(),
    );
    let header = schema::mesh::SessionHeader {
        node_id: "a1".into(),
        actor_protocol: schema::mesh::ACTOR_PROTOCOL.into(),
    };
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        stranger.open_session(c.nodes[0].quic, "n0", &header),
    )
    .await
    .expect("a handshake with a stranger ends");
    assert!(
        refused.is_err(),
        "{test}: n0 took an actor session from a peer of another cluster"
    );

    // n0 and n1 still work together: a create through n1 is placed by
    // actor calls and a call on it through the other node succeeds.
    let id = c.create(1).await;
    let other = if c.owner(&id) == "n0" { 1 } else { 0 };
    let resp = c
        .api(other, Method::GET, &format!("/sandboxes/{id}"))
        .send()
        .await
        .expect("GET through the non-owner");
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{test}: a call on {id} through a non-owner"
    );
    assert_eq!(c.delete(0, &id).await, StatusCode::NO_CONTENT);
}
