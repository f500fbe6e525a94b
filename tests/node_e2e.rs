//! End to end on 3 real node processes on 127.0.0.1: a zip of 3 corpus projects plus a git URL
//! (file://) give exactly the corpus manifest's run-alone counts per module; /stats and /network
//! have the exact shapes and agree across nodes; two evaluations submitted at once to different
//! nodes both finish with the right counts.

mod common;
mod node_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cdtester::corpus;
use hyper::StatusCode;
use node_common::{get, get_raw, module_counts, stats_all};

/// Corpus projects used here: no extra test dependencies, no install step, few seconds each.
const ZIPPED: &[&str] = &["toml", "tabulate", "colorama"];
const VIA_GIT: &str = "six";

fn python() -> std::path::PathBuf {
    cdtester_runners::local::resolve_python(None).expect("python3")
}

fn expected(p: &corpus::CorpusProject) -> BTreeMap<String, [u64; 6]> {
    p.expected_alone()
        .into_iter()
        .map(|(m, c)| (m, [c.passed, c.failed, c.skipped, c.error, c.xfailed, c.xpassed]))
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// A git repository (one commit) with a copy of `src` (a fresh copy: the unpacked sdist keeps
/// its archive's owner, which libgit2 refuses to open).
fn git_repo_of(src: &Path, dir: &Path) -> String {
    copy_tree(src, dir);
    let repo = git2::Repository::init(dir).expect("git init");
    let mut index = repo.index().expect("index");
    index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).expect("git add");
    let tree = repo.find_tree(index.write_tree().expect("write tree")).expect("tree");
    let sig = git2::Signature::now("cdtester", "tests@example.com").expect("signature");
    repo.commit(Some("HEAD"), &sig, &sig, "corpus project", &tree, &[]).expect("commit");
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_zip_and_git_url_match_the_manifest_on_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let projects = corpus::shipped().expect("manifest");
    let pick = |name: &str| projects.iter().find(|p| p.name == name).expect("corpus project").clone();
    let src = dir.path().join("src");
    let mut zipped = Vec::new();
    for name in ZIPPED {
        let p = pick(name);
        let sdist = corpus::fetch(&p, &python(), &common::corpus_cache()).expect("fetch sdist");
        let root = corpus::unpack(&p, &sdist, &src).expect("unpack");
        zipped.push((p, root));
    }
    let six = pick(VIA_GIT);
    let sdist = corpus::fetch(&six, &python(), &common::corpus_cache()).expect("fetch sdist");
    let six_root = corpus::unpack(&six, &sdist, &dir.path().join("unpacked")).expect("unpack");
    let url = git_repo_of(&six_root, &dir.path().join("git").join("six"));

    // Local git URLs over HTTP only because this operator enables them explicitly.
    let mut c =
        node_common::cluster(3, &dir.path().join("nodes"), &[("CDT_INTAKE__ALLOW_LOCAL_URLS", "true")]).await;
    let started = Instant::now();
    let list: Vec<(&str, std::path::PathBuf)> =
        zipped.iter().map(|(p, r)| (p.name.as_str(), r.clone())).collect();
    let zip_id = node_common::submit_zip(c.nodes[0].http, &node_common::zip_projects(&list)).await;
    let (s, v) = node_common::submit_urls(c.nodes[1].http, std::slice::from_ref(&url)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let git_id = v["eval_id"].as_u64().expect("eval id");

    let zip_report = node_common::wait_finished(c.nodes[2].http, zip_id, Duration::from_secs(600)).await;
    let git_report = node_common::wait_finished(c.nodes[0].http, git_id, Duration::from_secs(600)).await;
    eprintln!("both evaluations finished in {:.1} s", started.elapsed().as_secs_f64());

    let got = module_counts(&zip_report);
    for (p, _) in &zipped {
        assert_eq!(
            got.get(&p.name),
            Some(&expected(p)),
            "{}: per-module counts differ from the manifest",
            p.name
        );
    }
    let got = module_counts(&git_report);
    assert_eq!(got.get("six"), Some(&expected(&six)), "six via git: {git_report}");
    assert_eq!(git_report["projects"]["six"]["url"].as_str(), Some(url.as_str()));
    // The work was spread: more than one node ran modules.
    let runners: std::collections::BTreeSet<String> = zip_report["projects"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| {
            p["modules"].as_object().unwrap().values().map(|m| m["node"].as_str().unwrap().to_string())
        })
        .collect();
    assert!(runners.len() >= 2, "all modules ran on {runners:?}");
    let graded = zip_report["summary"]["grade"].as_f64().expect("overall grade");
    assert!((0.0..=20.0).contains(&graded));

    // /stats: exact shape; `all` equal on every node once replicated, and equal to the sums.
    let total_passed: u64 =
        [&zip_report, &git_report].iter().map(|r| r["summary"]["total_passed"].as_u64().unwrap()).sum();
    let total_failed: u64 =
        [&zip_report, &git_report].iter().map(|r| r["summary"]["total_failed"].as_u64().unwrap()).sum();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut alls = Vec::new();
        for n in &c.nodes {
            let raw = get_raw(n.http, "/stats").await;
            node_common::assert_stats_shape(&raw);
            alls.push(stats_all(&serde_json::from_str(&raw).unwrap()));
        }
        if alls.iter().all(|a| *a == (total_passed, total_failed, 4, 2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/stats all disagree: {alls:?}, want {:?}",
            (total_passed, total_failed, 4, 2)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, stats) = get(c.nodes[0].http, "/stats").await;
    let nodes = stats["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{stats}");
    let per_node_passed: u64 = nodes.iter().map(|n| n["passed"].as_u64().unwrap()).sum();
    assert_eq!(per_node_passed, total_passed, "per-node passes add up to the total: {stats}");
    let per_node_modules: u64 = nodes.iter().map(|n| n["modules"].as_u64().unwrap()).sum();
    let modules: usize =
        zipped.iter().map(|(p, _)| p.expected_alone().len()).sum::<usize>() + six.expected_alone().len();
    assert_eq!(per_node_modules, modules as u64, "{stats}");

    // /network: every node maps to the two others.
    let (s, net) = get(c.nodes[1].http, "/network").await;
    assert_eq!(s, StatusCode::OK);
    let map = net.as_object().unwrap();
    assert_eq!(map.len(), 3, "{net}");
    for n in &c.nodes {
        let mut peers: Vec<String> =
            map[&n.udp.to_string()].as_array().unwrap().iter().map(|p| p.as_str().unwrap().into()).collect();
        peers.sort();
        let mut want: Vec<String> =
            c.nodes.iter().filter(|o| o.udp != n.udp).map(|o| o.udp.to_string()).collect();
        want.sort();
        assert_eq!(peers, want, "{net}");
    }
    // Every node lists both evaluations.
    for n in &c.nodes {
        let (_, ids) = get(n.http, "/evaluation").await;
        let ids: Vec<u64> = ids.as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
        assert!(ids.contains(&zip_id) && ids.contains(&git_id), "{ids:?}");
    }
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_evaluations_at_once_on_different_nodes_both_finish() {
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("examples");
    cdtester::demo::write_examples(&examples).unwrap();
    let sleepy = dir.path().join("sleepy");
    node_common::sleepy_project(&sleepy, 4, 4, 0.5);
    let mut c = node_common::cluster(3, &dir.path().join("nodes"), &[]).await;
    let zip_a = node_common::zip_projects(&[
        ("calc", examples.join("calc")),
        ("strs", examples.join("strs")),
        ("shapes", examples.join("shapes")),
    ]);
    let zip_b = node_common::zip_projects(&[("sleepy", sleepy)]);
    let (a, b) = tokio::join!(
        node_common::submit_zip(c.nodes[0].http, &zip_a),
        node_common::submit_zip(c.nodes[1].http, &zip_b)
    );
    let (ra, rb) = tokio::join!(
        node_common::wait_finished(c.nodes[2].http, a, Duration::from_secs(300)),
        node_common::wait_finished(c.nodes[2].http, b, Duration::from_secs(300))
    );
    let got = module_counts(&ra);
    assert_eq!(got["calc"]["tests/test_add.py"], [2, 1, 0, 0, 0, 0], "{ra}");
    assert_eq!(got["calc"]["tests/test_sub.py"], [1, 1, 0, 0, 0, 0], "{ra}");
    assert_eq!(got["strs"]["tests/test_upper.py"], [2, 1, 1, 0, 0, 0], "{ra}");
    assert_eq!(got["strs"]["tests/test_fixture_error.py"], [1, 0, 0, 1, 0, 0], "{ra}");
    assert_eq!(got["shapes"]["tests/test_area.py"], [3, 0, 0, 0, 1, 0], "{ra}");
    assert_eq!(ra["projects"]["calc"]["grade"].as_f64(), Some(12.0), "{ra}");
    assert_eq!(ra["projects"]["shapes"]["grade"].as_f64(), Some(20.0), "{ra}");
    assert_eq!(ra["summary"]["grade"].as_f64(), Some(14.67), "{ra}");
    let fixture = &ra["projects"]["strs"]["modules"]["tests/test_fixture_error.py"]["tests"];
    let failing: Vec<&serde_json::Value> =
        fixture.as_array().unwrap().iter().filter(|t| t["outcome"] == "error").collect();
    assert!(failing[0]["message"].as_str().is_some_and(|m| m.contains("fixture setup fails")), "{fixture}");
    assert_eq!(module_counts(&rb)["sleepy"], node_common::sleepy_expected(4, 4), "{rb}");
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_module_runs_in_chunks_once_its_duration_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("slowmod");
    let mut slow = String::from("import time\n\n");
    for i in 0..8 {
        let body = if i == 5 { "assert 1 == 2" } else { "assert True" };
        slow.push_str(&format!("def test_{i}():\n    time.sleep(0.6)\n    {body}\n\n"));
    }
    common::write_file(&proj, "tests/test_slow.py", &slow);
    common::write_file(&proj, "tests/test_fast.py", "def test_ok():\n    pass\n");
    let zip = node_common::zip_projects(&[("slowmod", proj)]);
    let mut c = node_common::cluster(3, &dir.path().join("nodes"), &[]).await;
    let http = c.nodes[0].http;
    let want = [7, 1, 0, 0, 0, 0];
    // First run: the module runs whole and its duration is remembered.
    let first = node_common::submit_zip(http, &zip).await;
    let r1 = node_common::wait_finished(http, first, Duration::from_secs(180)).await;
    assert_eq!(module_counts(&r1)["slowmod"]["tests/test_slow.py"], want, "{r1}");
    // Second run: split into chunks spread over the nodes, same counts.
    let second = node_common::submit_zip(http, &zip).await;
    let r2 = node_common::wait_finished(http, second, Duration::from_secs(180)).await;
    assert_eq!(module_counts(&r2)["slowmod"]["tests/test_slow.py"], want, "{r2}");
    assert_eq!(module_counts(&r2)["slowmod"]["tests/test_fast.py"], [1, 0, 0, 0, 0, 0], "{r2}");
    let (_, rec) = node_common::get_internal(&c, 0, &format!("/internal/evaluation/{second}")).await;
    let chunks = rec["projects"][0]["state"]["chunks"]["tests/test_slow.py"].as_u64().unwrap_or(0);
    assert!(chunks >= 2, "not chunked: {rec}");
    let tests = r2["projects"]["slowmod"]["modules"]["tests/test_slow.py"]["tests"].as_array().unwrap().len();
    assert_eq!(tests, 8, "{r2}");
    c.shutdown();
}
