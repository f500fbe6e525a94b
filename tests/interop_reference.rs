//! A mixed network with real nodes of the earlier Python implementation. Runs only when a
//! checkout of the public repository ThiagoAVicente/Distributed-Pytest is given
//! (`REFERENCE_CHECKOUT=<dir>`) together with a Python that has its requirements
//! (`REFERENCE_PYTHON=<python>`, e.g. a venv with pytest==8.3.5, requests==2.32.3,
//! Flask==3.1.0); otherwise it says so and passes without running. The reference's code is never
//! part of this repository: `tests/interop/reference_launcher.py` starts it with its HTTP port
//! taken from `API_PORT` (upstream hard-codes 10000).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free udp port")
}

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free tcp port")
}

struct Reference {
    checkout: PathBuf,
    python: PathBuf,
}

impl Reference {
    fn from_env() -> Option<Reference> {
        let checkout = PathBuf::from(std::env::var_os("REFERENCE_CHECKOUT")?);
        let python = PathBuf::from(std::env::var_os("REFERENCE_PYTHON")?);
        Some(Reference { checkout, python })
    }

    /// A reference node at `udp`/`http`, joining `join` (or founding a network).
    fn start(&self, dir: &Path, udp: SocketAddr, http: SocketAddr, join: Option<SocketAddr>) -> Proc {
        std::fs::create_dir_all(dir).expect("node dir");
        let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/reference_launcher.py");
        let log = std::fs::File::create(dir.join("node.log")).expect("log");
        // The reference runs bare `python` and `pytest` from PATH: its interpreter's folder first.
        let bin = self.python.parent().map(Path::to_path_buf).unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .expect("PATH");
        let child = Command::new(&self.python)
            .arg(launcher)
            .env("PATH", path)
            .arg(&self.checkout)
            .env("NODE_PORT", udp.port().to_string())
            .env("OUTSIDE_IP", "127.0.0.1")
            .env("OUTSIDE_PORT", udp.port().to_string())
            .env("API_PORT", http.port().to_string())
            .env("HOST", join.map_or("0".to_string(), |j| j.to_string()))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a reference node");
        Proc { child }
    }
}

fn cdtester_node(dir: &Path, udp: SocketAddr, http: SocketAddr, join: SocketAddr) -> Proc {
    std::fs::create_dir_all(dir).expect("node dir");
    let log = std::fs::File::create(dir.join("node.log")).expect("log");
    let child = common::cdtester(&dir.join("data"))
        .args(["node", "--insecure", "--bind", &udp.to_string(), "--http", &http.to_string()])
        .args(["--join", &join.to_string()])
        .env("CDT_LOG", "info")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start cdtester node");
    Proc { child }
}

/// `GET /network` with a plain HTTP/1.0 request (the reference's Flask dev server and cdtester
/// both answer it).
fn network(http: SocketAddr) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&http, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /network HTTP/1.0\r\nHost: {http}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

/// The node at `key` as `view` lists it, with the nodes it talks to.
fn lists(view: &Value, key: &str, others: &[&str]) -> bool {
    view[key].as_array().is_some_and(|a| others.iter().all(|o| a.iter().any(|x| x == o)))
}

#[test]
fn mixed_network_of_reference_and_cdtester_nodes_stays_whole_for_60_s() {
    let Some(reference) = Reference::from_env() else {
        eprintln!("skipped: set REFERENCE_CHECKOUT and REFERENCE_PYTHON to run reference nodes");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let (u1, h1, u2, h2, u3, h3) = (free_udp(), free_tcp(), free_udp(), free_tcp(), free_udp(), free_tcp());
    let _r1 = reference.start(&tmp.path().join("r1"), u1, h1, None);
    std::thread::sleep(Duration::from_secs(2));
    let _r2 = reference.start(&tmp.path().join("r2"), u2, h2, Some(u1));
    std::thread::sleep(Duration::from_secs(2));
    let _c = cdtester_node(&tmp.path().join("c"), u3, h3, u1);

    let (s1, s2, s3) = (u1.to_string(), u2.to_string(), u3.to_string());
    let start = Instant::now();
    let mut whole_since: Option<Duration> = None;
    let mut broken = Vec::new();
    while start.elapsed() < Duration::from_secs(70) {
        let mine = network(h3).unwrap_or(Value::Null);
        let theirs = [network(h1).unwrap_or(Value::Null), network(h2).unwrap_or(Value::Null)];
        let whole = lists(&mine, &s3, &[&s1, &s2])
            && lists(&theirs[0], &s1, &[&s2, &s3])
            && lists(&theirs[1], &s2, &[&s1, &s3]);
        match (whole, whole_since) {
            (true, None) => whole_since = Some(start.elapsed()),
            (false, Some(_)) => broken.push((start.elapsed(), mine, theirs)),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(tmp.path().join("c/node.log")).unwrap_or_default();
    let joined = whole_since.unwrap_or_else(|| panic!("the network never became whole:\n{log}"));
    assert!(joined < Duration::from_secs(10), "whole only after {joined:?}");
    assert!(broken.is_empty(), "membership broke after {joined:?}: {broken:?}\n{log}");
    assert!(!log.contains("peer down"), "a reference node was declared failed:\n{log}");
}

/// The test projects: `projects` folders of `modules` modules each; every module has two
/// passing tests and one failing, and sleeps `sleep` seconds (so that work spreads).
fn projects(root: &Path, projects: usize, modules: usize, sleep: f64) {
    for p in 0..projects {
        for m in 0..modules {
            let text = format!(
                "import time\n\ndef test_a():\n    time.sleep({sleep})\n\ndef test_b():\n    assert 1 == 1\n\ndef test_c():\n    assert {p} == {m} + 100\n"
            );
            common::write_file(root, &format!("proj{p}/tests/test_p{p}_m{m}.py"), &text);
        }
    }
}

/// What [`setup`] prepares: the reference, a temporary folder, the zip and its counts.
type Setup = (Reference, tempfile::TempDir, Vec<u8>, (u64, u64));

/// The reference from the environment (or `None`: the test is skipped), a temporary folder and
/// the zip of `n` projects of `modules` modules sleeping `sleep` s (see [`projects`]) with plain
/// pytest's counts for it.
fn setup(n: usize, modules: usize, sleep: f64) -> Option<Setup> {
    let Some(reference) = Reference::from_env() else {
        eprintln!("skipped: set REFERENCE_CHECKOUT and REFERENCE_PYTHON to run reference nodes");
        return None;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("src");
    projects(&src, n, modules, sleep);
    let expected = plain_pytest(&reference.python, &src);
    let per_module = (2 * n * modules) as u64;
    assert_eq!(expected, (per_module, per_module / 2), "plain pytest");
    let zip = zip_of(&src);
    Some((reference, tmp, zip, expected))
}

/// Plain pytest's (passed, failed) for the projects under `root`, run with the reference's
/// interpreter.
fn plain_pytest(python: &Path, root: &Path) -> (u64, u64) {
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root)
        .output()
        .expect("pytest");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.contains("passed") || l.contains("failed")).unwrap_or_default();
    let count = |what: &str| {
        last.split(", ")
            .filter_map(|part| part.trim_matches(|c: char| c == '=' || c == ' ').split_once(' '))
            .find(|(_, w)| w.starts_with(what))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    };
    (count("passed"), count("failed"))
}

/// The zip of the folders under `root`, one top-level folder per project.
fn zip_of(root: &Path) -> Vec<u8> {
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .expect("read")
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    dirs.sort();
    cdtester::fetch::pack_projects(&dirs).expect("zip")
}

/// Polls `GET /evaluation/<id>` on `http` until the evaluation has an end time; the report and
/// when it ended.
fn finished(http: SocketAddr, id: &str, limit: Duration) -> Option<(Value, Duration)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some((200, v)) = common::http_call(http, "GET", &format!("/evaluation/{id}"), None)
            && v["end_time"].is_number()
        {
            return Some((v, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// (passed, failed) of a report: the reference's summary, or cdtester's.
fn totals(report: &Value) -> (u64, u64) {
    let s = &report["summary"];
    match (s["total_passed"].as_u64(), s["total_failed"].as_u64()) {
        (Some(p), Some(f)) => (p, f),
        _ => (s["passed"].as_u64().unwrap_or(0), s["failed"].as_u64().unwrap_or(0)),
    }
}

/// A network of reference nodes (and a cdtester node when `with_cdtester`), started in `dir`;
/// HTTP addresses, reference nodes first.
fn network_of(
    reference: &Reference,
    dir: &Path,
    refs: usize,
    with_cdtester: bool,
) -> (Vec<Proc>, Vec<SocketAddr>, Vec<SocketAddr>) {
    let (mut procs, mut https, mut udps) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..refs {
        let (u, h) = (free_udp(), free_tcp());
        procs.push(reference.start(&dir.join(format!("r{i}")), u, h, udps.first().copied()));
        https.push(h);
        udps.push(u);
        std::thread::sleep(Duration::from_secs(2));
    }
    if with_cdtester {
        let (u, h) = (free_udp(), free_tcp());
        procs.push(cdtester_node(&dir.join("c"), u, h, udps[0]));
        https.push(h);
        udps.push(u);
    }
    wait_whole(&https, &udps);
    (procs, https, udps)
}

/// Reference node r0, then a cdtester node joining it, then reference node r1 joining the
/// cdtester node, which mints r1's id: the cdtester node is older than r1, so it wins the
/// election for r0. HTTP addresses in the order r0, r1, cdtester.
fn network_via_cdtester(reference: &Reference, dir: &Path) -> (Vec<Proc>, Vec<SocketAddr>) {
    let (u0, h0, uc, hc, u1, h1) = (free_udp(), free_tcp(), free_udp(), free_tcp(), free_udp(), free_tcp());
    let r0 = reference.start(&dir.join("r0"), u0, h0, None);
    std::thread::sleep(Duration::from_secs(2));
    let c = cdtester_node(&dir.join("c"), uc, hc, u0);
    std::thread::sleep(Duration::from_secs(2));
    let r1 = reference.start(&dir.join("r1"), u1, h1, Some(uc));
    let https = vec![h0, h1, hc];
    wait_whole(&https, &[u0, u1, uc]);
    (vec![r0, r1, c], https)
}

/// Waits (at most 20 s) until every node's `/network` lists every other.
fn wait_whole(https: &[SocketAddr], udps: &[SocketAddr]) {
    let all: Vec<String> = udps.iter().map(|u| u.to_string()).collect();
    let whole = || {
        https.iter().zip(&all).all(|(h, me)| {
            let view = network(*h).unwrap_or(Value::Null);
            let others: Vec<&str> = all.iter().filter(|a| *a != me).map(String::as_str).collect();
            lists(&view, me, &others)
        })
    };
    let start = Instant::now();
    while !whole() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn zips_submitted_to_reference_and_cdtester_nodes_finish_with_plain_pytest_counts() {
    let Some((reference, tmp, zip, expected)) = setup(2, 4, 1.0) else { return };

    // Reference-only network: the time to compare with.
    let (only, https, _) = network_of(&reference, &tmp.path().join("only"), 3, false);
    let id = common::submit_zip(https[0], &zip);
    let (report, alone) =
        finished(https[0], &id, Duration::from_secs(180)).expect("reference-only run finished");
    assert_eq!(totals(&report), expected, "{report}");
    drop(only);

    // Mixed: 2 reference nodes and 1 cdtester node; a zip submitted to a reference node.
    let dir = tmp.path().join("mixed");
    let (_mixed, https, _) = network_of(&reference, &dir, 2, true);
    let id = common::submit_zip(https[0], &zip);
    let (report, mixed) = finished(https[0], &id, Duration::from_secs(180)).expect("mixed run finished");
    assert_eq!(totals(&report), expected, "{report}");
    // cdtester shows the same evaluation, from the reference's CACHE_UPDATEs.
    let (mine, _) = finished(https[2], &id, Duration::from_secs(15)).expect("cdtester shows it finished");
    assert_eq!(mine["summary"], report["summary"]);
    assert_eq!(mine["projects"], report["projects"]);
    let log = std::fs::read_to_string(dir.join("c/node.log")).unwrap_or_default();
    let ran = log.matches("reference module ran").count();
    assert!(ran > 0, "the cdtester node ran none of the reference's modules:\n{log}");
    assert!(!log.contains("peer down"), "a reference node was declared failed:\n{log}");
    eprintln!(
        "zip to a reference node: 3 reference nodes {alone:?}, 2 reference + 1 cdtester {mixed:?} (cdtester ran {ran} of 8 modules)"
    );

    // A zip submitted to the cdtester node.
    let cid = common::submit_zip(https[2], &zip);
    let (mine, by_cdtester) =
        finished(https[2], &cid, Duration::from_secs(300)).expect("cdtester's run finished");
    assert_eq!(totals(&mine), expected, "{mine}");
    let by_reference = mine.to_string().matches("run by a reference worker").count();
    eprintln!(
        "zip to the cdtester node: {by_cdtester:?} (reference workers ran {by_reference} of 8 modules)"
    );
    for r in [dir.join("r0/node.log"), dir.join("r1/node.log")] {
        let text = std::fs::read_to_string(&r).unwrap_or_default();
        assert!(!text.contains("Traceback"), "a reference node crashed:\n{text}");
        // Its request log shows the project fetched from the cdtester node, never an internal call.
        assert!(text.contains("GET /file/"), "{text}");
        assert!(!text.contains("/internal/"), "a cdtester-only call reached a reference node:\n{text}");
    }
}

/// Kills a process at once (SIGKILL), as a crash would.
fn kill9(p: &mut Proc) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

/// Submits `zip` to node `owner` of a network (processes and HTTP addresses; `dir` holds the
/// nodes' folders), kills it once a module has finished and waits for node `watch[0]` to finish
/// the evaluation with `expected` counts, and for the other `watch` nodes to show it so; the
/// time from the kill to the end on `watch[0]`.
fn kill_owner(
    network: (Vec<Proc>, Vec<SocketAddr>),
    dir: &Path,
    zip: &[u8],
    expected: (u64, u64),
    owner: usize,
    watch: &[usize],
) -> Duration {
    let (mut procs, https) = network;
    // Let the reference nodes learn every node's status (their failure checker needs it).
    std::thread::sleep(Duration::from_secs(6));
    let id = common::submit_zip(https[owner], zip);
    // Mid-run: once a module has finished (the reference publishes its modules only after
    // discovering them all; an owner killed before that leaves nothing to recover).
    let path = format!("/evaluation/{id}");
    let started = common::wait_until(Duration::from_secs(120), || {
        common::http_call(https[owner], "GET", &path, None)
            .is_some_and(|(_, v)| v["summary"]["executed"].as_u64().is_some_and(|n| n >= 1))
    });
    assert!(started, "no module finished: {:?}", common::http_call(https[owner], "GET", &path, None));
    kill9(&mut procs[owner]);
    let killed = Instant::now();
    let (report, _) = finished(https[watch[0]], &id, Duration::from_secs(240)).unwrap_or_else(|| {
        let logs: Vec<String> = ["r0", "r1", "r2", "c"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}\n{}",
                    std::fs::read_to_string(dir.join(n).join("node.log")).unwrap_or_default()
                )
            })
            .collect();
        panic!(
            "never finished: {:?}\n{}",
            common::http_call(https[watch[0]], "GET", &path, None),
            logs.join("\n")
        )
    });
    let took = killed.elapsed();
    assert_eq!(totals(&report), expected, "{report}");
    for &other in &watch[1..] {
        let (theirs, _) = finished(https[other], &id, Duration::from_secs(15))
            .expect("the other survivor shows it finished");
        assert_eq!(totals(&theirs), expected, "{theirs}");
    }
    took
}

#[test]
fn a_killed_reference_owner_is_recovered_by_the_mixed_survivors_with_exact_counts() {
    let Some((reference, tmp, zip, expected)) = setup(2, 5, 3.0) else { return };
    let dir = tmp.path().join("only");
    let (procs, https, _) = network_of(&reference, &dir, 3, false);
    let only = kill_owner((procs, https), &dir, &zip, expected, 0, &[1]);
    let dir = tmp.path().join("mixed");
    let (procs, https, _) = network_of(&reference, &dir, 2, true);
    let mixed = kill_owner((procs, https), &dir, &zip, expected, 0, &[1, 2]);
    eprintln!(
        "reference owner killed after its first module, finished after the kill: 3 reference nodes {only:?}, 2 reference + 1 cdtester {mixed:?}"
    );
}

#[test]
fn a_killed_cdtester_owner_is_recovered_by_reference_nodes_with_exact_counts() {
    let Some((reference, tmp, zip, expected)) = setup(2, 5, 3.0) else { return };
    let dir = tmp.path().join("mixed");
    let (procs, https, _) = network_of(&reference, &dir, 2, true);
    let took = kill_owner((procs, https), &dir, &zip, expected, 2, &[0]);
    eprintln!(
        "cdtester owner killed after its first module: the reference nodes finished {took:?} after the kill"
    );
}

#[test]
fn a_cdtester_node_that_wins_the_election_for_a_killed_reference_owner_finishes_its_evaluation() {
    let Some((reference, tmp, zip, expected)) = setup(2, 5, 3.0) else { return };
    // Reference only, the same zip: 2 nodes, the owner killed.
    let dir = tmp.path().join("only");
    let (procs, https, _) = network_of(&reference, &dir, 2, false);
    let only = kill_owner((procs, https), &dir, &zip, expected, 0, &[1]);
    // 1 reference owner + 1 cdtester node: the cdtester node is the only survivor.
    let dir = tmp.path().join("alone");
    let (procs, https, _) = network_of(&reference, &dir, 1, true);
    let alone = kill_owner((procs, https), &dir, &zip, expected, 0, &[1]);
    let log = std::fs::read_to_string(dir.join("c/node.log")).unwrap_or_default();
    assert!(log.contains("taking over a reference node's evaluations"), "{log}");
    // The cdtester node older than the surviving reference node: it wins the election, hands
    // modules to the reference node, and both show the evaluation finished.
    let dir = tmp.path().join("via");
    let via = kill_owner(network_via_cdtester(&reference, &dir), &dir, &zip, expected, 0, &[2, 1]);
    let log = std::fs::read_to_string(dir.join("c/node.log")).unwrap_or_default();
    assert!(log.contains("taking over a reference node's evaluations"), "{log}");
    let r1 = std::fs::read_to_string(dir.join("r1/node.log")).unwrap_or_default();
    assert!(!r1.contains("Traceback"), "the reference node crashed:\n{r1}");
    let handed = log.matches("owned reference task handed out").count();
    eprintln!(
        "reference owner killed after its first module, finished after the kill: 2 reference nodes {only:?}; \
         1 cdtester node alone {alone:?}; cdtester winner + 1 reference node {via:?} (modules handed to the \
         reference node: {handed})"
    );
}
