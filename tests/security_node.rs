//! Security regressions of issue 9 at the node level, each attacking real `cdtester node`
//! processes on 127.0.0.1 the way an attacker would: forged and replayed internal HTTP calls,
//! forged results, hostile replicated records, a node-killing task, nodes started without a
//! secret, an API listening beyond loopback, and what an evaluation leaves behind.

mod common;
mod node_common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdtester::demo::LocalCluster;
use cdtester::eval::{EvalRecord, ProjectState};
use cdtester::ids::{EvalId, ProjectId};
use cdtester::peer_http::auth::{CallParts, MAC_HEADER, NODE_HEADER, NONCE_HEADER, Secret, TIME_HEADER};
use cdtester::peer_http::client::HttpClient;
use cdtester::wire::TaskResultData;
use hyper::{Method, StatusCode};
use node_common::{get, get_internal, module_counts, stats_all, wait_finished};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INSECURE: (&str, &str) = ("CDT_NODE__INSECURE", "true");

// ---------------------------------------------------------------------------------- helpers

/// One raw HTTP/1.1 request, bytes as the attacker writes them: status and body.
async fn raw(
    http: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    // `Host` is the target unless the caller sends its own (a replay keeps the captured one).
    let host = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")).map(|(_, v)| v.clone());
    let host = host.unwrap_or_else(|| http.to_string());
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(http).await.expect("connect");
    stream.write_all(req.as_bytes()).await.expect("write request");
    stream.write_all(body).await.expect("write body");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("answer within 30 s")
        .expect("read answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status =
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The headers a member `caller` signs a call with (as of `at_ms`, or now).
fn signature(
    secret: &str,
    (method, host, path): (&str, SocketAddr, &str),
    caller: SocketAddr,
    body: &[u8],
    at_ms: Option<u64>,
) -> Vec<(&'static str, String)> {
    let secret = Secret::new(Some(secret));
    let caller = caller.to_string();
    let host = host.to_string();
    let call = CallParts { method, host: &host, path, caller: &caller, body };
    let sig = match at_ms {
        Some(t) => secret.sign_at(&call, t),
        None => secret.sign(&call),
    }
    .expect("a secret signs");
    vec![
        (NODE_HEADER, caller.clone()),
        (TIME_HEADER, sig.time_ms.to_string()),
        (NONCE_HEADER, sig.nonce),
        (MAC_HEADER, sig.mac),
    ]
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A client that claims to be `me` (signing with `secret` when given).
fn claiming(me: SocketAddr, secret: Option<&str>) -> HttpClient {
    HttpClient::new(Secret::new(secret), Some(me.to_string()))
}

/// Status and JSON body of a call, non-2xx answers included.
async fn send_as(
    client: &HttpClient,
    http: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let body = body.map(|b| ("application/json", b));
    match client.send(method, http, path, body, Duration::from_secs(30)).await {
        Ok(r) => (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null)),
        Err(cdtester::peer_http::client::ClientError::Status { status, body, .. }) => {
            (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
        }
        Err(e) => panic!("{path} on {http}: {e}"),
    }
}

/// A project whose `modules` modules each sleep `secs` and then fail all of their `tests` tests.
fn failing_project(root: &Path, modules: usize, tests: usize, secs: f64) {
    for m in 0..modules {
        let mut text = format!("import time\n\ntime.sleep({secs})\n\n");
        for i in 0..tests {
            text.push_str(&format!("def test_{i}():\n    assert {i} == -1\n\n"));
        }
        common::write_file(root, &format!("tests/test_f{m}.py"), &text);
    }
}

/// A zip of one all-failing project named `victim` (and, when `second`, a passing one `other`).
fn victim_zip(dir: &Path, secs: f64, second: bool) -> Vec<u8> {
    let victim = dir.join("victim");
    failing_project(&victim, 2, 3, secs);
    let mut projects = vec![("victim", victim)];
    if second {
        let other = dir.join("other");
        common::write_file(&other, "tests/test_ok.py", "def test_ok():\n    assert True\n");
        projects.push(("other", other));
    }
    node_common::zip_projects(&projects)
}

/// `/stats` and `/evaluation/{id}` of every node.
async fn snapshot(c: &LocalCluster, id: u64) -> Vec<(Value, Value)> {
    let mut out = Vec::new();
    for n in &c.nodes {
        let (_, stats) = get(n.http, "/stats").await;
        let (_, report) = get(n.http, &format!("/evaluation/{id}")).await;
        out.push((stats, report));
    }
    out
}

/// Waits until every node reports `id` finished with the same counts (replication done).
async fn wait_replicated(c: &LocalCluster, id: u64) -> Value {
    let report = wait_finished(c.nodes[0].http, id, Duration::from_secs(180)).await;
    for n in &c.nodes[1..] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, r) = get(n.http, &format!("/evaluation/{id}")).await;
            if r["status"] == "finished" && module_counts(&r) == module_counts(&report) {
                break;
            }
            assert!(Instant::now() < deadline, "{} never got evaluation {id}: {r}", n.http);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The whole record (header too: versions, running tasks) is the same on every node.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/internal/evaluation/{id}");
        let mut copies = Vec::new();
        for i in 0..c.nodes.len() {
            copies.push(get_internal(c, i, &path).await.1);
        }
        if copies.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        assert!(Instant::now() < deadline, "records of {id} never converged: {copies:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report
}

/// The stored record of `id` (a member's signed GET).
async fn record(c: &LocalCluster, id: u64) -> EvalRecord {
    record_at(c, 0, id).await
}

/// The record of `id` as node `i` stores it.
async fn record_at(c: &LocalCluster, i: usize, id: u64) -> EvalRecord {
    let (status, v) = get_internal(c, i, &format!("/internal/evaluation/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).expect("an evaluation record")
}

/// `rec` as an attacker rewrites it: every result replaced by one passing test, the project's
/// runner set to `local` with huge limits, and the content hash set to `hash`.
fn forge(rec: &EvalRecord, hash: &str) -> EvalRecord {
    let mut forged = rec.clone();
    for r in forged.results.values_mut() {
        r.attempt = String::new();
        r.report.tests.truncate(1);
        for t in &mut r.report.tests {
            t.outcome = cdtester_runner_api::Outcome::Passed;
        }
    }
    for p in &mut forged.projects {
        p.content_hash = hash.to_string();
        if let ProjectState::Ready { runner, limits, .. } = &mut p.state {
            *runner = "local".into();
            limits.timeout_s = 1_000_000;
            limits.memory_mb = 1_000_000;
        }
    }
    forged
}

/// sha256 of the archive `GET /file/<project>` serves (with `client`'s credentials).
async fn served_hash(client: &HttpClient, http: SocketAddr, project: &str) -> String {
    let r = client
        .send(Method::GET, http, &format!("/file/{project}"), None, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("GET /file/{project}: {e}"));
    assert!(!String::from_utf8_lossy(&r.body).contains("root:"), "a host file was served");
    hex::encode(sha2::Sha256::digest(&r.body))
}

/// A free UDP and TCP port on `ip`.
fn free_ports(ip: [u8; 4]) -> (u16, u16) {
    let udp = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap().local_addr().unwrap().port();
    let tcp = TcpListener::bind(SocketAddr::from((ip, 0))).unwrap().local_addr().unwrap().port();
    (udp, tcp)
}

/// A `cdtester node` started by hand (for what `LocalCluster` does not do), killed on drop.
struct Node {
    child: Child,
    udp: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
}

impl Node {
    /// Starts a node with its own data dir under `dir`, HTTP API on `http_ip`, joining `join`.
    fn start(
        dir: &Path,
        name: &str,
        http_ip: [u8; 4],
        join: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> Node {
        let (udp, tcp) = free_ports(http_ip);
        let data = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let mut cmd = node_cmd(&data, udp, SocketAddr::from((http_ip, tcp)), join, env);
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("start cdtester node");
        Node {
            child,
            udp: SocketAddr::from(([127, 0, 0, 1], udp)),
            http: SocketAddr::from(([127, 0, 0, 1], tcp)),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the API answers.
    async fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = node_common::client();
        while client.send(Method::GET, self.http, "/network", None, Duration::from_secs(2)).await.is_err() {
            assert!(matches!(self.child.try_wait(), Ok(None)), "node exited: {}", self.log());
            assert!(Instant::now() < deadline, "node API not up: {}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn peers(&self) -> Vec<String> {
        let (_, net) = get(self.http, "/network").await;
        serde_json::from_value(net[self.udp.to_string()].clone()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cdtester node` isolated from the environment the tests run in: no inherited secret or mode.
fn node_cmd(
    data: &Path,
    udp: u16,
    http: SocketAddr,
    join: Option<SocketAddr>,
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = common::cdtester(data);
    cmd.env_remove("CDT_NODE__SECRET")
        .env_remove("CDT_NODE__INSECURE")
        .env("CDT_LOG", "info,cdtester::core=warn")
        .env("CDT_RUNNER__WORKERS", "1")
        .arg("node")
        .arg("--bind")
        .arg(format!("127.0.0.1:{udp}"))
        .arg("--http")
        .arg(http.to_string());
    if let Some(j) = join {
        cmd.arg("--join").arg(j.to_string());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs a command that must exit on its own within 30 s.
fn exits(mut cmd: Command) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("still running after 30 s:\n{}", common::describe(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Polls `GET /evaluation/{id}` until `done` holds for the report.
async fn wait_report(
    http: SocketAddr,
    id: u64,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, r) = get(http, &format!("/evaluation/{id}")).await;
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "evaluation {id}: {what} not reached after {timeout:?}: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------- H1

/// H1 with the default (secret) configuration: a stranger's forged record (runner `local`,
/// replaced results, a content hash naming a host file) is refused unsigned, with a member's
/// address but no MAC, and signed with a wrong secret; nothing any node stores changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_forged_replicate_without_the_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let zip = victim_zip(dir.path(), 0.0, false);
    let c = node_common::cluster(2, &dir.path().join("nodes"), &[]).await;
    let secret = c.secret().expect("closed by default").to_string();
    let id = node_common::submit_zip(c.nodes[0].http, &zip).await;
    wait_replicated(&c, id).await;
    let before = snapshot(&c, id).await;
    let real = record(&c, id).await;
    let body = serde_json::to_vec(&vec![forge(&real, "../../etc/passwd")]).unwrap();
    let member = c.nodes[1].udp;
    let path = "/internal/replicate";
    let attempts: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("unsigned", vec![]),
        ("member address without a MAC", vec![(NODE_HEADER, member.to_string())]),
        (
            "signed with a wrong secret",
            signature("not-the-secret", ("POST", c.nodes[0].http, path), member, &body, None),
        ),
        (
            "the secret's MAC of another body",
            signature(
                &secret,
                ("POST", c.nodes[0].http, path),
                member,
                &serde_json::to_vec(&vec![real.clone()]).unwrap(),
                None,
            ),
        ),
    ];
    for n in &c.nodes {
        for (what, headers) in &attempts {
            let (status, answer) = raw(n.http, "POST", path, headers, &body).await;
            assert_eq!(status, 403, "{what} on {}: {answer}", n.http);
        }
    }
    assert_eq!(snapshot(&c, id).await, before, "a refused record changed something");
    let member_client = claiming(c.nodes[0].udp, Some(&secret));
    for n in &c.nodes {
        for p in &real.projects {
            assert_eq!(served_hash(&member_client, n.http, p.id.as_str()).await, p.content_hash);
        }
    }
}

/// H1 in an insecure network (`CDT_NODE__INSECURE=true`): the forged record, sent from
/// 127.0.0.1 claiming to be the responsible member, can neither replace results nor lower
/// `/stats`, a bad content hash is refused whole, and `GET /file` serves only the real archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_insecure_forged_records_cannot_replace_results_or_name_host_files() {
    let dir = tempfile::tempdir().unwrap();
    let zip = victim_zip(dir.path(), 0.0, false);
    let c = node_common::cluster(2, &dir.path().join("nodes"), &[INSECURE]).await;
    assert!(c.secret().is_none());
    let id = node_common::submit_zip(c.nodes[0].http, &zip).await;
    wait_replicated(&c, id).await;
    let before = snapshot(&c, id).await;
    let real = record(&c, id).await;
    let owner: SocketAddr = real.responsible.socket();
    let attacker = claiming(owner, None);
    // A brand-new evaluation naming host files, and one with a CR/LF project id.
    let mut fresh = forge(&real, "/etc/passwd");
    fresh.id = EvalId::new(id + 1000).unwrap();
    for (i, p) in fresh.projects.iter_mut().enumerate() {
        p.id = ProjectId::of(fresh.id, i);
    }
    for (i, n) in c.nodes.iter().enumerate() {
        // Each node gets forgeries of its own copy: the responsible node may still bump its
        // header after the copies converged, and a replica merging that newer (real) header
        // from a forgery would say nothing about what a forgery can change.
        let own = record_at(&c, i, id).await;
        let variants: Vec<(&str, EvalRecord)> = vec![
            ("relative host path as content hash", forge(&own, "../../etc/passwd")),
            ("results replaced, other valid hash", forge(&own, &"f".repeat(64))),
            ("results replaced, real hash", forge(&own, &own.projects[0].content_hash)),
            ("new evaluation with an absolute path", fresh.clone()),
        ];
        for (what, rec) in &variants {
            let body = serde_json::to_vec(&vec![rec]).unwrap();
            let (status, v) =
                send_as(&attacker, n.http, Method::POST, "/internal/replicate", Some(body)).await;
            assert_eq!((status, &v["merged"]), (StatusCode::OK, &json!(0)), "{what} on {}: {v}", n.http);
        }
    }
    let after = snapshot(&c, id).await;
    for ((s0, r0), (s1, r1)) in before.iter().zip(&after) {
        assert_eq!(r1, r0, "stored results changed");
        assert_eq!(s1, s0, "/stats changed");
        let (p0, f0, ..) = stats_all(s0);
        let (p1, f1, ..) = stats_all(s1);
        assert!(p1 >= p0 && f1 >= f0, "/stats all went down: {s0} -> {s1}");
    }
    // Without a secret archives are public: a cdtester peer (its claimed address matching the
    // connection's source) gets the stored archive, byte for byte the submitted one.
    let peer = claiming(c.nodes[1].udp, None);
    for n in &c.nodes {
        for p in &real.projects {
            assert_eq!(served_hash(&peer, n.http, p.id.as_str()).await, p.content_hash);
        }
        let (status, v) = get(n.http, &format!("/evaluation/{}", fresh.id)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        let (status, v) = get(n.http, &format!("/file/{}-0", fresh.id)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    }
}

// ---------------------------------------------------------------------------------- H2

/// A forged `POST /task` body: all of the module's tests passed, delivered by `worker`.
fn forged_result(eval: u64, project: &str, module: &str, worker: SocketAddr) -> Vec<u8> {
    let post = cdtester::app::TaskPost {
        result: TaskResultData {
            task_id: format!("{project}::{module}"),
            passed: 3,
            failed: 0,
            time: 0.1,
            project_id: project.to_string(),
            module: module.to_string(),
            ip: worker.ip().to_string(),
            port: worker.port().to_string(),
        },
        eval_id: Some(EvalId::new(eval).unwrap()),
        attempt: "0".repeat(32),
        report: Some(cdtester_runner_api::ModuleReport {
            module: module.to_string(),
            tests: (0..3)
                .map(|i| cdtester_runner_api::TestResult {
                    nodeid: format!("{module}::test_{i}"),
                    outcome: cdtester_runner_api::Outcome::Passed,
                    duration: 0.01,
                    message: None,
                    attempts: Vec::new(),
                })
                .collect(),
            duration: 0.1,
            note: None,
            output: None,
            output_truncated: false,
        }),
        error: None,
    };
    serde_json::to_vec(&post).unwrap()
}

/// Waits until the victim project's modules are known; returns (project id, module paths).
async fn victim_modules(http: SocketAddr, id: u64) -> (String, Vec<String>) {
    let r = wait_report(http, id, "modules known", Duration::from_secs(120), |r| {
        r["projects"]["victim"]["modules"].as_object().is_some_and(|m| !m.is_empty())
    })
    .await;
    let p = &r["projects"]["victim"];
    (p["id"].as_str().unwrap().to_string(), p["modules"].as_object().unwrap().keys().cloned().collect())
}

fn assert_real_grade(r: &Value) {
    let p = &r["projects"]["victim"];
    assert_eq!((p["total_passed"].as_u64(), p["total_failed"].as_u64()), (Some(0), Some(6)), "{r}");
    assert_eq!(p["grade"].as_f64(), Some(0.0), "a forged result counted: {r}");
}

/// H2 with a secret: forged results for a failing project, unsigned or signed with a wrong
/// secret, are refused with 403 and the project keeps its real grade 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_forged_task_results_without_the_secret_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let zip = victim_zip(dir.path(), 2.0, false);
    let c = node_common::cluster(1, &dir.path().join("nodes"), &[]).await;
    let node = &c.nodes[0];
    let id = node_common::submit_zip(node.http, &zip).await;
    let (project, modules) = victim_modules(node.http, id).await;
    for m in &modules {
        // Claiming to be the node itself, the worker its tasks run on.
        let body = forged_result(id, &project, m, node.udp);
        let (status, v) = raw(node.http, "POST", "/task", &[], &body).await;
        assert_eq!(status, 403, "unsigned: {v}");
        let headers = signature("not-the-secret", ("POST", node.http, "/task"), node.udp, &body, None);
        let (status, v) = raw(node.http, "POST", "/task", &headers, &body).await;
        assert_eq!(status, 403, "wrong secret: {v}");
    }
    assert_real_grade(&wait_finished(node.http, id, Duration::from_secs(120)).await);
}

/// H2 in an insecure network: a forged result is refused with 403 unless it comes from the
/// worker the task is assigned to: a stranger's address and another member's are both refused,
/// and the project keeps its real grade 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_insecure_results_only_from_the_assigned_worker() {
    let dir = tempfile::tempdir().unwrap();
    let zip = victim_zip(dir.path(), 5.0, false);
    let c = node_common::cluster(2, &dir.path().join("nodes"), &[INSECURE]).await;
    let http = c.nodes[0].http;
    let id = node_common::submit_zip(http, &zip).await;
    let (project, modules) = victim_modules(http, id).await;
    let stranger_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let stranger = stranger_socket.local_addr().unwrap();
    let members = [c.nodes[0].udp, c.nodes[1].udp];
    let running = wait_report(http, id, "a module running", Duration::from_secs(120), |r| {
        r["projects"]["victim"]["modules"].as_object().unwrap().values().any(|m| m["status"] == "running")
    })
    .await;
    // A running module stays assigned to its worker while it sleeps: the other member may not
    // deliver it. Nobody but a worker it is handed to may deliver any module: not a stranger.
    let mut members_tried = 0;
    for m in &modules {
        let on = running["projects"]["victim"]["modules"][m]["node"].as_str().map(str::to_string);
        let mut posers = vec![stranger];
        if let Some(on) = &on {
            posers.extend(members.iter().filter(|a| a.to_string() != *on));
            members_tried += 1;
        }
        for poser in posers {
            let body = forged_result(id, &project, m, poser);
            let (status, v) = send_as(&claiming(poser, None), http, Method::POST, "/task", Some(body)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{m} posted as {poser}: {v}");
            assert!(v["error"].as_str().is_some_and(|e| e.contains("not assigned")), "{v}");
        }
    }
    assert!(members_tried > 0, "{running}");
    assert_real_grade(&wait_finished(http, id, Duration::from_secs(120)).await);
}

// ---------------------------------------------------------------------------------- M1

/// M1: a captured signed call cannot be replayed, used minutes later, or moved to another path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m1_captured_internal_calls_cannot_be_replayed_or_moved() {
    let dir = tempfile::tempdir().unwrap();
    let zip = victim_zip(dir.path(), 0.0, true);
    let c = node_common::cluster(2, &dir.path().join("nodes"), &[]).await;
    let secret = c.secret().unwrap().to_string();
    let (http, member) = (c.nodes[0].http, c.nodes[0].udp);
    let id = node_common::submit_zip(http, &zip).await;
    let report = wait_finished(http, id, Duration::from_secs(120)).await;
    wait_replicated(&c, id).await;

    // Captured on its way to node 1, replayed to node 0 (another member): refused there, and
    // still good once at node 1.
    let path = format!("/internal/evaluation/{id}");
    let mut to_other = signature(&secret, ("GET", c.nodes[1].http, &path), member, b"", None);
    to_other.push(("Host", c.nodes[1].http.to_string()));
    let (status, body) = raw(http, "GET", &path, &to_other, b"").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("signed for another node"), "{body}");
    let (status, body) = raw(c.nodes[1].http, "GET", &path, &to_other, b"").await;
    assert_eq!(status, 200, "{body}");

    // Captured once, replayed.
    let captured = signature(&secret, ("GET", http, &path), member, b"", None);
    let (status, body) = raw(http, "GET", &path, &captured, b"").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw(http, "GET", &path, &captured, b"").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("replayed"), "{body}");

    // Signed five minutes ago (a capture used later).
    let old = signature(&secret, ("GET", http, &path), member, b"", Some(now_ms() - 300_000));
    let (status, body) = raw(http, "GET", &path, &old, b"").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("away from this node's clock"), "{body}");

    // A MAC for GET /file/<a> used for /file/<b>, then (valid) for /file/<a>.
    let a = report["projects"]["victim"]["id"].as_str().unwrap();
    let b = report["projects"]["other"]["id"].as_str().unwrap();
    let for_a = signature(&secret, ("GET", http, &format!("/file/{a}")), member, b"", None);
    let (status, body) = raw(http, "GET", &format!("/file/{b}"), &for_a, b"").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("invalid cluster MAC"), "{body}");
    let (status, body) = raw(http, "GET", &format!("/file/{a}"), &for_a, b"").await;
    assert_eq!(status, 200, "the captured MAC was valid for its own path: {body}");
    // And for another method on the same path.
    let for_get = signature(&secret, ("GET", http, "/internal/replicate"), member, b"[]", None);
    let (status, body) = raw(http, "POST", "/internal/replicate", &for_get, b"[]").await;
    assert_eq!(status, 403, "{body}");
}

// ---------------------------------------------------------------------------------- L1

/// L1 / closed by default: an empty secret is a configuration error; a node starting a network
/// without one generates it (0600 file) and prints the join command; a joiner without it is
/// refused; with it, it joins; with a wrong one, it never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_closed_by_default_and_empty_secret_is_an_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();

    let (udp, tcp) = free_ports([127, 0, 0, 1]);
    let http = SocketAddr::from(([127, 0, 0, 1], tcp));
    let out = exits(node_cmd(&dir.path().join("empty"), udp, http, None, &[("CDT_NODE__SECRET", "")]));
    assert!(!out.status.success(), "{}", common::describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("node.secret") && stderr.contains("empty"), "{}", common::describe(&out));

    let mut first = Node::start(dir.path(), "first", [127, 0, 0, 1], None, &[]);
    first.wait_up().await;
    let file = dir.path().join("first").join(cdtester::node_cmd::SECRET_FILE);
    let secret = std::fs::read_to_string(&file).expect("generated secret file");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret file mode {mode:o}");
    assert!(secret.len() >= 32, "{secret}");
    let log = first.log();
    let printed = log
        .split("CDT_NODE__SECRET=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no join command printed: {log}"));
    assert_eq!(printed, secret.trim());
    assert!(log.contains(&format!("--join {}", first.udp)), "{log}");

    let (udp, tcp) = free_ports([127, 0, 0, 1]);
    let http = SocketAddr::from(([127, 0, 0, 1], tcp));
    let out = exits(node_cmd(&dir.path().join("nosecret"), udp, http, Some(first.udp), &[]));
    assert!(!out.status.success(), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs its cluster secret"),
        "{}",
        common::describe(&out)
    );

    let mut joiner =
        Node::start(dir.path(), "joiner", [127, 0, 0, 1], Some(first.udp), &[("CDT_NODE__SECRET", printed)]);
    let mut wrong = Node::start(
        dir.path(),
        "wrong",
        [127, 0, 0, 1],
        Some(first.udp),
        &[("CDT_NODE__SECRET", "a-wrong-secret")],
    );
    joiner.wait_up().await;
    wrong.wait_up().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(first.peers().await.contains(&joiner.udp.to_string())
        && joiner.peers().await.contains(&first.udp.to_string()))
    {
        assert!(Instant::now() < deadline, "the joiner with the secret did not join: {}", joiner.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Well past the time the right secret took (and the failure timeout): never joined.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (net_first, net_wrong) = (first.peers().await, wrong.peers().await);
    assert!(!net_first.contains(&wrong.udp.to_string()), "{net_first:?}");
    assert!(net_wrong.is_empty(), "the node with a wrong secret sees {net_wrong:?}");
    assert!(matches!(first.child.try_wait(), Ok(None)), "{}", first.log());
}

// ---------------------------------------------------------------------------------- L3

/// L3: a project id with CR/LF in `GET /file` gets a 4xx, never a 500, and a record carrying
/// such an id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_crlf_project_id_gets_4xx_never_500() {
    let dir = tempfile::tempdir().unwrap();
    let zip = victim_zip(dir.path(), 0.0, false);
    let c = node_common::cluster(1, &dir.path().join("nodes"), &[INSECURE]).await;
    let (http, me) = (c.nodes[0].http, c.nodes[0].udp);
    let id = node_common::submit_zip(http, &zip).await;
    wait_finished(http, id, Duration::from_secs(120)).await;
    let mut evil = record(&c, id).await;
    evil.id = EvalId::new(id + 1).unwrap();
    evil.projects.truncate(1);
    let mut evil = serde_json::to_value(&evil).unwrap();
    evil["projects"][0]["id"] = json!(format!("{}-0\r\nX-Evil: 1", id + 1));
    let body = serde_json::to_vec(&vec![evil]).unwrap();
    let (status, v) =
        send_as(&claiming(me, None), http, Method::POST, "/internal/replicate", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an invalid project id does not decode: {v}");
    for path in [
        format!("/file/{}-0%0d%0aX-Evil:%201", id + 1),
        format!("/file/{id}-0%0d%0a"),
        format!("/file/%0d%0a{id}-0"),
        "/file/%0D%0A%0D%0A".to_string(),
    ] {
        let (status, body) = raw(http, "GET", &path, &[], b"").await;
        assert!((400..500).contains(&status), "{path}: {status} {body}");
        assert!(!body.contains("X-Evil"), "{body}");
    }
}

// ---------------------------------------------------------------------------------- L2

/// L2: host paths (data directory, Python environments, temp and home folders) never reach a
/// client: a test that fails with its working directory and interpreter path in the message,
/// and a project that cannot be evaluated, are reported with placeholders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_host_paths_are_redacted_from_reports() {
    let dir = tempfile::tempdir().unwrap();
    let leaky = dir.path().join("leaky");
    common::write_file(
        &leaky,
        "tests/test_where.py",
        "import os, sys\n\ndef test_where():\n    assert False, 'at ' + os.getcwd() + ' by ' + sys.executable\n",
    );
    let empty = dir.path().join("empty");
    common::write_file(&empty, "README.md", "no tests here\n");
    let zip = node_common::zip_projects(&[("leaky", leaky), ("empty", empty)]);
    let c = node_common::cluster(1, &dir.path().join("nodes"), &[]).await;
    let id = node_common::submit_zip(c.nodes[0].http, &zip).await;
    let r = wait_finished(c.nodes[0].http, id, Duration::from_secs(120)).await;
    let text = r.to_string();
    let message = r["projects"]["leaky"]["modules"]["tests/test_where.py"]["tests"][0]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no failure message: {r}"));
    assert!(message.contains("at <") && message.contains("by <"), "{message}");
    assert_eq!(r["projects"]["empty"]["status"], "failed", "{r}");
    let venvs = common::cache_dir().join("venvs");
    let mut hidden = vec![dir.path().to_path_buf(), venvs, std::env::temp_dir()];
    hidden.extend(std::env::var_os("HOME").map(PathBuf::from));
    for path in hidden {
        for form in [Some(path.clone()), std::fs::canonicalize(&path).ok()].into_iter().flatten() {
            let form = form.to_string_lossy().into_owned();
            assert!(!text.contains(&form), "{form} in the report: {r}");
        }
    }
}

// ---------------------------------------------------------------------------------- M7

/// M7: a project rule that matches only a submitted project's name (which the submitter
/// chooses) does not route it to another runner; the same rule matching a URL would. Here the
/// rule names a runner this node does not have: had the name chosen it, the project would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m7_a_submitted_name_does_not_choose_the_runner() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cdtester.toml");
    std::fs::write(&config, "[[projects]]\npattern = \"trusted-*\"\nrunner = \"no-such-runner\"\n").unwrap();
    let proj = dir.path().join("trusted-by-name");
    common::write_file(&proj, "tests/test_ok.py", "def test_ok():\n    assert True\n");
    let zip = node_common::zip_projects(&[("trusted-by-name", proj)]);
    let config_env = config.to_string_lossy().into_owned();
    let c = node_common::cluster(1, &dir.path().join("nodes"), &[("CDT_CONFIG", &config_env)]).await;
    let id = node_common::submit_zip(c.nodes[0].http, &zip).await;
    let r = wait_finished(c.nodes[0].http, id, Duration::from_secs(120)).await;
    let p = &r["projects"]["trusted-by-name"];
    assert_eq!(p["status"], "finished", "the default runner ran it: {r}");
    assert_eq!(p["tests"]["passed"], 1, "{r}");
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("does not choose the runner"), "{log}");
}

// ---------------------------------------------------------------------------------- H6

/// H6: a task whose worker dies twice while running it (the node SIGKILLed mid-run, restarted,
/// resuming the task, SIGKILLed again) is recorded as crashed and not run a third time; the
/// rest of the evaluation finishes normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_a_task_that_kills_its_worker_twice_is_recorded_crashed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The slow module notes every start in a file anyone may write (the runner may drop privileges).
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o777)).unwrap();
    let runs = marks.join("slow-runs");
    let root = dir.path().join("poison");
    common::write_file(
        &root,
        "tests/test_fast.py",
        "def test_a():\n    assert True\n\ndef test_b():\n    assert True\n",
    );
    common::write_file(
        &root,
        "tests/test_slow.py",
        &format!(
            "import time\n\ndef test_slow():\n    with open({:?}, 'a') as f:\n        f.write('run\\n')\n    time.sleep(30)\n",
            runs.to_string_lossy()
        ),
    );
    let zip = node_common::zip_projects(&[("poison", root)]);
    let mut c = node_common::cluster(1, &dir.path().join("nodes"), &[]).await;
    let http = c.nodes[0].http;
    let id = node_common::submit_zip(http, &zip).await;
    let started = |n: usize| {
        let runs = runs.clone();
        move || std::fs::read_to_string(&runs).map(|s| s.lines().count()).unwrap_or(0) >= n
    };
    for kill in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !started(kill)() {
            assert!(Instant::now() < deadline, "the slow module did not start (run {kill})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.kill9(0);
        c.restart(0, None).expect("restart");
        c.wait_mesh(Duration::from_secs(30)).await.expect("node back");
    }
    let r = wait_finished(http, id, Duration::from_secs(120)).await;
    let modules = &r["projects"]["poison"]["modules"];
    assert_eq!(module_counts(&r)["poison"]["tests/test_fast.py"], [2, 0, 0, 0, 0, 0], "{r}");
    let note = modules["tests/test_slow.py"]["note"].as_str().unwrap_or_default();
    assert!(note.contains("crashed") && note.contains("killed its worker"), "{r}");
    assert_eq!(modules["tests/test_slow.py"]["status"], "finished", "{r}");
    // Not run a third time (give a wrongly resumed run time to start).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);
}

// ---------------------------------------------------------------------------------- local runner

/// Submits a passing project to `node` and waits for its evaluation to finish.
async fn submit_and_finish(node: &Node, dir: &Path) -> Value {
    let root = dir.join("hello");
    common::write_file(&root, "tests/test_hello.py", "def test_hi():\n    assert True\n");
    let zip = node_common::zip_projects(&[("hello", root)]);
    let id = node_common::submit_zip(node.http, &zip).await;
    wait_finished(node.http, id, Duration::from_secs(120)).await
}

/// H6/10: a node whose API listens on 0.0.0.0 refuses to run an HTTP-submitted project with the
/// local runner (which isolates nothing), and runs it once the operator allows it explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runner_refused_when_the_api_listens_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let venvs = common::cache_dir().join("venvs").to_string_lossy().into_owned();
    let env = [("CDT_RUNNER__LOCAL__VENV_DIR", venvs.as_str())];
    let mut refusing = Node::start(dir.path(), "refusing", [0, 0, 0, 0], None, &env);
    refusing.wait_up().await;
    let r = submit_and_finish(&refusing, dir.path()).await;
    let p = &r["projects"]["hello"];
    assert_eq!(p["status"], "failed", "{r}");
    assert!(p["error"].as_str().is_some_and(|e| e.contains("runner.local.allow_remote_submissions")), "{r}");
    drop(refusing);

    let allow = [env[0], ("CDT_RUNNER__LOCAL__ALLOW_REMOTE_SUBMISSIONS", "true")];
    let mut allowing = Node::start(dir.path(), "allowing", [0, 0, 0, 0], None, &allow);
    allowing.wait_up().await;
    let r = submit_and_finish(&allowing, dir.path()).await;
    assert_eq!(r["projects"]["hello"]["status"], "finished", "{r}");
    assert_eq!(module_counts(&r)["hello"]["tests/test_hello.py"], [1, 0, 0, 0, 0, 0], "{r}");
}

// ---------------------------------------------------------------------------------- M5

/// Every descendant of `pid` (walking /proc), with its command line.
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) else {
            continue;
        };
        if let Ok(ppid) = ppid.parse() {
            parent.insert(p, ppid);
        }
    }
    let mut out = Vec::new();
    for &p in parent.keys() {
        let mut at = p;
        while let Some(&up) = parent.get(&at) {
            if up == pid {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                out.push((p, String::from_utf8_lossy(&cmd).replace('\0', " ")));
                break;
            }
            if up <= 1 {
                break;
            }
            at = up;
        }
    }
    out
}

fn python_descendants(pid: u32) -> Vec<(u32, String)> {
    descendants(pid).into_iter().filter(|(_, cmd)| cmd.contains("python")).collect()
}

/// M5: after an evaluation finishes, the node releases its prepared projects: its python
/// processes (warm pytest servers) go back to zero, the extracted project trees are removed, and
/// archives past `node.cache_budget_mb` (0 here) are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m5_idle_prepared_projects_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sleepy");
    node_common::sleepy_project(&root, 3, 2, 0.5);
    let zip = node_common::zip_projects(&[("sleepy", root)]);
    let env = [("CDT_NODE__RELEASE_AFTER_S", "1"), ("CDT_NODE__CACHE_BUDGET_MB", "0")];
    let c = node_common::cluster(1, &dir.path().join("nodes"), &env).await;
    let (http, pid) = (c.nodes[0].http, c.nodes[0].pid().unwrap());
    let (projects, blobs) = (c.nodes[0].data_dir.join("projects"), c.nodes[0].data_dir.join("blobs"));
    let id = node_common::submit_zip(http, &zip).await;
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        most = most.max(python_descendants(pid).len());
        let (_, r) = get(http, &format!("/evaluation/{id}")).await;
        if r["status"] == "finished" {
            assert_eq!(module_counts(&r)["sleepy"], node_common::sleepy_expected(3, 2), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "not finished: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most > 0, "no python process was ever seen under the node");
    let finished = Instant::now();
    let deadline = finished + Duration::from_secs(15);
    loop {
        let left = python_descendants(pid);
        let files = |d: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(d)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let (trees, archives) = (files(&projects), files(&blobs));
        if left.is_empty() && trees.is_empty() && archives.is_empty() {
            eprintln!(
                "back to idle {:?} after the evaluation finished (peak {most} python processes)",
                finished.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "15 s after the evaluation: processes {left:?}, trees {trees:?}, archives {archives:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Opens `GET /evaluation/{id}/events` and reads the answer's status line; the connection stays
/// open (a held stream) until the returned socket is dropped.
async fn open_stream(http: SocketAddr, id: u64) -> (u16, tokio::net::TcpStream) {
    let mut stream = tokio::net::TcpStream::connect(http).await.expect("connect");
    let req =
        format!("GET /evaluation/{id}/events HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write request");
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut head))
        .await
        .expect("status within 30 s")
        .expect("read status");
    let status = String::from_utf8_lossy(&head[9..12]).parse().expect("status code");
    (status, stream)
}

/// M8: one client cannot queue unbounded work with small requests (submissions and reruns, each
/// minutes of test CPU) or hold every event stream of a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m8_one_client_cannot_queue_unbounded_work_or_hold_every_stream() {
    let dir = tempfile::tempdir().unwrap();
    let c = node_common::cluster(
        1,
        &dir.path().join("nodes"),
        &[("CDT_INTAKE__MAX_PENDING_PER_CLIENT", "2"), ("CDT_INTAKE__MAX_STREAMS_PER_CLIENT", "2")],
    )
    .await;
    let http = c.nodes[0].http;
    let zip = victim_zip(dir.path(), 1.0, false);
    let first = node_common::submit_zip(http, &zip).await;
    let second = node_common::submit_zip(http, &zip).await;
    let (ct, body) = cdtester::peer_http::client::multipart_file("file", "projects.zip", &zip);
    let (status, v) = node_common::call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "a third unfinished evaluation: {v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("intake.max_pending_per_client")), "{v}");

    let (s1, _held1) = open_stream(http, first).await;
    let (s2, held2) = open_stream(http, second).await;
    let (s3, _) = open_stream(http, first).await;
    assert_eq!((s1, s2, s3), (200, 200, 429), "two streams per client");
    drop(held2);

    // Finished evaluations free their places; reruns (no upload at all) count like submissions.
    wait_finished(http, first, Duration::from_secs(120)).await;
    wait_finished(http, second, Duration::from_secs(120)).await;
    let rerun = |id: u64| async move {
        let path = format!("/evaluation/{id}/rerun");
        node_common::call(http, Method::POST, &path, Some(("application/json", b"{}".to_vec()))).await
    };
    assert_eq!(rerun(first).await.0, StatusCode::OK);
    assert_eq!(rerun(first).await.0, StatusCode::OK);
    let (status, v) = rerun(first).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "a third unfinished rerun: {v}");
    // A freed stream place is reusable (the dropped connection's stream ends within a poll).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (status, _held) = open_stream(http, second).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the dropped stream's place was never given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
