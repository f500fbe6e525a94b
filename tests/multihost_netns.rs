//! Nodes on separate hosts with their own IP addresses: each node runs in its own Linux network
//! namespace on a bridge, binds 0.0.0.0 and advertises its host's address (one detects it).
//! - 3 hosts: a zip of corpus projects gives the manifest's counts per module; `/network` and
//!   `/stats` list the advertised addresses on every node; a host unplugged mid-run (and its node
//!   killed) changes no count. Join and failover times across hosts are printed (README figures).
//! - NAT: a node on a private network behind a router, reachable only through the router's
//!   forwarded ports (DNAT), joins, runs tasks and delivers results, and is responsible for an
//!   evaluation whose results the other node delivers to it.
//!
//! Python environments are built on the test's host before any namespace exists (there is no
//! package index inside). The tests skip, saying why, when not root or without `ip`.

mod common;
mod multihost_common;
mod node_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cdtester::corpus;
use cdtester::demo::{LocalCluster, Placement};
use multihost_common::Lab;
use serde_json::Value;

/// Corpus projects: base environment only (no install step), 13 modules.
const PROJECTS: &[&str] = &["toml", "tabulate", "colorama"];

fn skip() -> bool {
    match multihost_common::unavailable() {
        Some(why) => {
            eprintln!("skipping the multi-host tests: {why}");
            true
        }
        None => false,
    }
}

fn python() -> PathBuf {
    cdtester_runners::local::resolve_python(None).expect("python3")
}

/// Every node: the shared environments, one worker, local runner allowed beyond loopback (the
/// API listens on 0.0.0.0; these are the test's own projects).
fn cluster(dir: &Path) -> LocalCluster {
    let env = [
        ("CDT_RUNNER__LOCAL__VENV_DIR", common::cache_dir().join("venvs").to_string_lossy().into_owned()),
        ("CDT_LOG", "info,cdtester::core=warn".into()),
        ("CDT_RUNNER__WORKERS", "1".into()),
        ("CDT_RUNNER__LOCAL__ALLOW_REMOTE_SUBMISSIONS", "true".into()),
    ];
    let env = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    LocalCluster::new(common::cdtester_bin(), dir.to_path_buf(), env)
}

/// Builds, outside the namespaces, the environments the projects under `roots` need (a
/// `cdtester run` of each, with the nodes' environment folder).
fn prepare_environments(data: &Path, roots: &[PathBuf]) {
    for root in roots {
        let out = common::output(common::cdtester(data).arg("run").arg(root));
        assert!(out.status.success(), "preparing {}: {}", root.display(), common::describe(&out));
    }
}

fn expected(p: &corpus::CorpusProject) -> BTreeMap<String, [u64; 6]> {
    p.expected_alone()
        .into_iter()
        .map(|(m, c)| (m, [c.passed, c.failed, c.skipped, c.error, c.xfailed, c.xpassed]))
        .collect()
}

fn sorted(list: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = list.into_iter().collect();
    v.sort();
    v
}

/// `/network` of the node at `http`, as sorted lists (empty while it does not answer).
async fn network(http: SocketAddr) -> BTreeMap<String, Vec<String>> {
    let got = node_common::client().get_json::<Value>(http, "/network", Duration::from_secs(5)).await;
    got.ok()
        .as_ref()
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, peers)| {
                    let peers = peers.as_array().into_iter().flatten().filter_map(Value::as_str);
                    (k.clone(), sorted(peers.map(String::from)))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The full mesh of `addrs` as `/network` shows it.
fn mesh(addrs: &[String]) -> BTreeMap<String, Vec<String>> {
    addrs.iter().map(|a| (a.clone(), sorted(addrs.iter().filter(|o| *o != a).cloned()))).collect()
}

/// Polls until every node in `https` shows `want` as `/network`; returns the time it took.
async fn wait_network(
    https: &[SocketAddr],
    want: &BTreeMap<String, Vec<String>>,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for h in https {
            all &= network(*h).await == *want;
        }
        if all {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "/network never became {want:?}: {:?}", network(https[0]).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/stats` node addresses of the node at `http`.
async fn stats_nodes(http: SocketAddr) -> Vec<String> {
    let (_, v) = node_common::get(http, "/stats").await;
    sorted(
        v["nodes"].as_array().into_iter().flatten().filter_map(|n| n["address"].as_str().map(String::from)),
    )
}

/// Which node ran each module of a finished report.
fn module_nodes(report: &Value) -> BTreeSet<String> {
    report["projects"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(_, p)| p["modules"].as_object().into_iter().flatten())
        .filter_map(|(_, m)| m["node"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_with_their_own_addresses_give_the_corpus_counts_through_a_host_loss() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = corpus::shipped().expect("manifest");
    let mut projects = Vec::new();
    for name in PROJECTS {
        let p = manifest.iter().find(|p| p.name == *name).expect("corpus project").clone();
        let sdist = corpus::fetch(&p, &python(), &common::corpus_cache()).expect("fetch sdist");
        let root = corpus::unpack(&p, &sdist, &dir.path().join("src")).expect("unpack");
        projects.push((p, root));
    }
    let roots: Vec<PathBuf> = projects.iter().map(|(_, r)| r.clone()).collect();
    prepare_environments(&dir.path().join("prep"), &roots);

    let mut lab = Lab::new(1);
    let mut places: Vec<Placement> = Vec::new();
    for i in 1..=3u8 {
        let ns = lab.host(&format!("h{i}"), 10 + i);
        let ip = lab.ip(10 + i);
        // h3 advertises nothing: it detects its address (the interface routing to h1).
        places.push(Lab::placement(&ns, SocketAddr::new(ip, 7000), SocketAddr::new(ip, 8000), i != 3));
    }
    let addrs: Vec<String> = places.iter().map(|p| p.udp_at.to_string()).collect();
    let https: Vec<SocketAddr> = places.iter().map(|p| p.http_at).collect();
    let mut c = cluster(&dir.path().join("nodes"));
    c.start_at(places[0].clone()).expect("start h1");
    c.start_at(places[1].clone()).expect("start h2");
    c.wait_mesh(Duration::from_secs(60)).await.expect("h1 and h2 mesh");
    let started = Instant::now();
    c.start_at(places[2].clone()).expect("start h3");
    while network(https[2]).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "h3 never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let up = started.elapsed();
    let join = wait_network(&https, &mesh(&addrs), Duration::from_secs(60)).await;
    eprintln!(
        "MEASURED join across hosts: h3 answers HTTP {} ms after its start, then every node's /network \
         is the full mesh {} ms later",
        up.as_millis(),
        join.as_millis()
    );
    for h in &https {
        assert_eq!(
            stats_nodes(*h).await,
            sorted(addrs.clone()),
            "/stats on {h} lists the advertised addresses"
        );
    }

    let list: Vec<(&str, PathBuf)> = projects.iter().map(|(p, r)| (p.name.as_str(), r.clone())).collect();
    let id = node_common::submit_zip(https[0], &node_common::zip_projects(&list)).await;
    node_common::wait_executed(https[0], id, 3, Duration::from_secs(300)).await;
    // h2 dies mid-run: unplugged (nothing it sends arrives) and its node killed.
    lab.unplug("h2");
    let cut = Instant::now();
    c.kill9(1);
    let survivors = [addrs[0].clone(), addrs[2].clone()];
    let failover = wait_network(&[https[0], https[2]], &mesh(&survivors), Duration::from_secs(30)).await;
    eprintln!(
        "MEASURED failover across hosts: h2 unplugged -> gone from both survivors' /network after {} ms",
        failover.as_millis()
    );
    let report = node_common::wait_finished(https[2], id, Duration::from_secs(600)).await;
    eprintln!("evaluation finished {:.1} s after the cut", cut.elapsed().as_secs_f64());
    let got = node_common::module_counts(&report);
    for (p, _) in &projects {
        assert_eq!(
            got.get(&p.name),
            Some(&expected(p)),
            "{}: counts differ from the manifest: {report}",
            p.name
        );
    }
    let ran = module_nodes(&report);
    assert!(ran.iter().all(|n| addrs.contains(n)), "modules ran on advertised addresses only: {ran:?}");
    for h in [https[0], https[2]] {
        assert_eq!(stats_nodes(h).await, sorted(survivors.clone()), "/stats on {h} after the loss");
        assert_eq!(network(h).await, mesh(&survivors));
    }
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_nat_reachable_only_through_forwarded_ports_works_both_ways() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_root, b_root) = (dir.path().join("a/sleepy"), dir.path().join("b/sleepy"));
    node_common::sleepy_project(&a_root, 6, 3, 1.0);
    node_common::sleepy_project(&b_root, 6, 3, 1.0);
    prepare_environments(&dir.path().join("prep"), std::slice::from_ref(&a_root));

    let mut lab = Lab::new(2);
    let h1 = lab.host("h1", 11);
    lab.host("r", 20);
    let hidden = lab.host_behind_nat("b", "r", 17000, 18000);
    let router = lab.ip(20);
    let first =
        Lab::placement(&h1, SocketAddr::new(lab.ip(11), 7000), SocketAddr::new(lab.ip(11), 8000), true);
    let natted =
        Lab::placement(&hidden, SocketAddr::new(router, 17000), SocketAddr::new(router, 18000), true);
    let addrs = [first.udp_at.to_string(), natted.udp_at.to_string()];
    let https = [first.http_at, natted.http_at];
    let mut c = cluster(&dir.path().join("nodes"));
    c.start_at(first).expect("start h1");
    c.start_at(natted).expect("start the node behind NAT");
    wait_network(&https, &mesh(&addrs), Duration::from_secs(60)).await;
    for h in https {
        assert_eq!(stats_nodes(h).await, sorted(addrs.clone()));
    }

    // One evaluation submitted to each node in turn: the other node runs some of its modules
    // and delivers their results (to the node behind NAT through its forwarded HTTP port).
    let want = node_common::sleepy_expected(6, 3);
    for (to, root, other) in [(0, a_root, 1), (1, b_root, 0)] {
        let id = node_common::submit_zip(https[to], &node_common::zip_projects(&[("sleepy", root)])).await;
        let report = node_common::wait_finished(https[other], id, Duration::from_secs(300)).await;
        assert_eq!(node_common::module_counts(&report)["sleepy"], want, "{report}");
        assert_eq!(report["node"].as_str(), Some(addrs[to].as_str()), "responsible node: {report}");
        assert!(
            module_nodes(&report).contains(&addrs[other]),
            "{} ran tasks for {}: {report}",
            addrs[other],
            addrs[to]
        );
    }
    assert_eq!(network(https[0]).await, mesh(&addrs), "still one network");
    c.shutdown();
}
