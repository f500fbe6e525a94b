//! Fault tolerance with real node processes: a worker killed with SIGKILL mid-run, the node that
//! received the submission killed mid-run and then restarted with its data directory. In every
//! case the evaluation completes with exactly the counts of a fault-free run, nothing is counted
//! twice, and `/stats` `all` never decreases on any node.

mod common;
mod node_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use node_common::{get, module_counts, sleepy_expected, stats_all};
use serde_json::Value;

/// The two tests kill nodes and rely on failure detection: run them one at a time, so that six
/// node processes and their pytest runs do not compete for the CI machine's two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MODULES: usize = 6;
const TESTS: usize = 3;
const SLEEP_S: f64 = 2.0;

/// Expected `/stats` `all` passed/failed of one sleepy evaluation.
fn sleepy_totals() -> (u64, u64) {
    sleepy_expected(MODULES, TESTS).values().fold((0, 0), |(p, f), c| (p + c[0], f + c[1]))
}

/// Polls until some module of `id` is running on `worker` (or on any node when `None`).
async fn wait_running_on(http: SocketAddr, id: u64, worker: Option<SocketAddr>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, r) = get(http, &format!("/evaluation/{id}")).await;
        let running = r["projects"]["sleepy"]["modules"].as_object().is_some_and(|mods| {
            mods.values().any(|m| {
                m["status"] == "running"
                    && worker.is_none_or(|w| m["node"].as_str() == Some(w.to_string().as_str()))
            })
        });
        if running {
            return r;
        }
        assert!(Instant::now() < deadline, "no module of {id} running on {worker:?}: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records `/stats` `all` of the given nodes and checks it never decreased.
struct Monotonic {
    last: Vec<(u64, u64, u64, u64)>,
}

impl Monotonic {
    async fn check(&mut self, https: &[SocketAddr]) {
        for (i, h) in https.iter().enumerate() {
            let (_, s) = get(*h, "/stats").await;
            let now = stats_all(&s);
            if let Some(prev) = self.last.get(i) {
                assert!(
                    now.0 >= prev.0 && now.1 >= prev.1 && now.2 >= prev.2 && now.3 >= prev.3,
                    "/stats all decreased on {h}: {prev:?} -> {now:?}"
                );
                self.last[i] = now;
            } else {
                self.last.push(now);
            }
        }
    }
}

async fn finish_watching(http: SocketAddr, id: u64, watch: &[SocketAddr], mono: &mut Monotonic) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        mono.check(watch).await;
        let (_, r) = get(http, &format!("/evaluation/{id}")).await;
        if r["status"] == "finished" {
            return r;
        }
        assert!(Instant::now() < deadline, "evaluation {id} did not finish: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sleepy_zip(dir: &std::path::Path) -> Vec<u8> {
    let root = dir.join("sleepy");
    node_common::sleepy_project(&root, MODULES, TESTS, SLEEP_S);
    node_common::zip_projects(&[("sleepy", root)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let zip = sleepy_zip(dir.path());
    let mut c = node_common::cluster(3, &dir.path().join("nodes"), &[]).await;
    let id = node_common::submit_zip(c.nodes[0].http, &zip).await;
    let victim = c.nodes[2].udp;
    let at_kill = wait_running_on(c.nodes[0].http, id, Some(victim)).await;
    c.kill9(2);
    let interrupted: Vec<String> = at_kill["projects"]["sleepy"]["modules"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, m)| m["status"] == "running" && m["node"].as_str() == Some(victim.to_string().as_str()))
        .map(|(name, _)| name.clone())
        .collect();
    let watch = [c.nodes[0].http, c.nodes[1].http];
    let mut mono = Monotonic { last: Vec::new() };
    let r = finish_watching(c.nodes[1].http, id, &watch, &mut mono).await;
    assert_eq!(module_counts(&r)["sleepy"], sleepy_expected(MODULES, TESTS), "{r}");
    assert!(!interrupted.is_empty());
    for m in &interrupted {
        let node = r["projects"]["sleepy"]["modules"][m]["node"].as_str().unwrap();
        assert_ne!(node, victim.to_string(), "{m} was rerun on a surviving node: {r}");
    }
    let (p, f) = sleepy_totals();
    assert_eq!(
        (r["summary"]["total_passed"].as_u64(), r["summary"]["total_failed"].as_u64()),
        (Some(p), Some(f))
    );
    // Replicated totals: each module counted once on every surviving node.
    let deadline = Instant::now() + Duration::from_secs(10);
    for h in watch {
        loop {
            let (_, s) = get(h, "/stats").await;
            if stats_all(&s) == (p, f, 1, 1) {
                break;
            }
            assert!(Instant::now() < deadline, "{h}: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    mono.check(&watch).await;
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responsible_node_killed_mid_run_then_restarted() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let zip = sleepy_zip(dir.path());
    let mut c = node_common::cluster(3, &dir.path().join("nodes"), &[]).await;
    let entry = c.nodes[0].udp;
    let id = node_common::submit_zip(c.nodes[0].http, &zip).await;
    node_common::wait_executed(c.nodes[1].http, id, 1, Duration::from_secs(120)).await;
    wait_running_on(c.nodes[1].http, id, None).await;
    c.kill9(0);
    let watch = [c.nodes[1].http, c.nodes[2].http];
    let mut mono = Monotonic { last: Vec::new() };
    let r = finish_watching(c.nodes[2].http, id, &watch, &mut mono).await;
    assert_eq!(module_counts(&r)["sleepy"], sleepy_expected(MODULES, TESTS), "{r}");
    assert_ne!(r["node"].as_str(), Some(entry.to_string().as_str()), "a surviving node took over: {r}");
    let (p, f) = sleepy_totals();

    // The killed node comes back with its data directory: it serves the evaluation and the
    // totals (from its store, then brought up to date by replication), nothing counted twice.
    c.restart(0, Some(1)).expect("restart node");
    c.wait_mesh(Duration::from_secs(30)).await.expect("mesh after restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = get(c.nodes[0].http, "/stats").await;
        let (_, rep) = get(c.nodes[0].http, &format!("/evaluation/{id}")).await;
        if stats_all(&s) == (p, f, 1, 1) && rep["status"] == "finished" {
            assert_eq!(module_counts(&rep)["sleepy"], sleepy_expected(MODULES, TESTS), "{rep}");
            break;
        }
        assert!(Instant::now() < deadline, "restarted node: {s} / {rep}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let all = [c.nodes[0].http, c.nodes[1].http, c.nodes[2].http];
    mono.check(&watch).await;
    for h in all {
        let (_, s) = get(h, "/stats").await;
        assert_eq!(stats_all(&s), (p, f, 1, 1), "{h}: {s}");
    }
    c.shutdown();
}
