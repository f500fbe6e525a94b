//! Conformance with the earlier Python implementation (`../shared/research/reference.md` §2-3):
//! a real `cdtester node` (open network, as mixing with reference nodes requires) driven with the
//! reference's exact datagrams by peers written here that behave like reference nodes: 4-byte
//! big-endian length, Python-`json.dumps`-shaped envelopes, string ids, no counters, heartbeats
//! every 3.5 s starting one period after the join. Every datagram the node sends back must
//! decode under the reference's rules.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The reference's heartbeat period (HEARTBEAT_INTERVAL / 2).
const REFERENCE_BEAT: Duration = Duration::from_millis(3_500);
/// Message names of the reference's catalogue (§2.3).
const CATALOGUE: &[&str] = &[
    "CACHE_UPDATE",
    "HEARTBEAT",
    "CONNECT",
    "CONNECT_REP",
    "TASK_ANNOUNCE",
    "TASK_REQUEST",
    "TASK_SEND",
    "TASK_CONFIRM",
    "PROJECT_ANNOUNCE",
    "RECOVERY_ELECTION",
    "EVALUATION_RESPONSIBILITY_UPDATE",
    "RECOVERY_ELECTION_REP",
    "RECOVERY_ELECTION_RESULT",
];

/// A peer that speaks like a reference node.
struct ReferencePeer {
    id: String,
    sock: UdpSocket,
    addr: SocketAddr,
    /// Every datagram received, decoded: (cmd, data).
    received: Vec<(String, Value)>,
}

impl ReferencePeer {
    fn new(id: &str) -> ReferencePeer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind a peer socket");
        sock.set_read_timeout(Some(Duration::from_millis(20))).expect("read timeout");
        let addr = sock.local_addr().expect("local addr");
        ReferencePeer { id: id.to_string(), sock, addr, received: Vec::new() }
    }

    fn send(&self, to: SocketAddr, cmd: &str, data: Value) {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let body = json!({"ip": "127.0.0.1", "port": self.addr.port(), "cmd": cmd, "data": data, "timestamp": stamp});
        // Python's json.dumps separators, as the reference sends them.
        let text = serde_json::to_string(&body).unwrap().replace("\":", "\": ").replace(",\"", ", \"");
        let mut datagram = (text.len() as u32).to_be_bytes().to_vec();
        datagram.extend_from_slice(text.as_bytes());
        self.sock.send_to(&datagram, to).expect("send");
    }

    fn heartbeat(&self, to: SocketAddr, peers: &BTreeMap<String, SocketAddr>) {
        let table: serde_json::Map<String, Value> =
            peers.iter().map(|(id, a)| (id.clone(), json!([a.ip().to_string(), a.port()]))).collect();
        self.send(to, "HEARTBEAT", json!({"id": self.id, "peers": table}));
    }

    /// Reads what has arrived, checking each datagram against the reference's decoder.
    fn drain(&mut self) {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
            self.received.push(reference_decode(&buf[..n]));
        }
    }

    fn got(&self, cmd: &str) -> Vec<&Value> {
        self.received.iter().filter(|(c, _)| c == cmd).map(|(_, d)| d).collect()
    }
}

/// The reference's decoder (§2.1-2.2): a 4-byte big-endian length, then exactly that many bytes
/// of JSON with a truthy `cmd` from the catalogue, a string `ip`, an integer `port`, an object
/// `data` and a numeric `timestamp`.
fn reference_decode(datagram: &[u8]) -> (String, Value) {
    assert!(datagram.len() >= 4, "short datagram");
    let len = u32::from_be_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
    assert_eq!(len + 4, datagram.len(), "length prefix does not match the body");
    let v: Value = serde_json::from_slice(&datagram[4..]).expect("the body is JSON");
    let cmd = v["cmd"].as_str().expect("cmd is a string").to_string();
    assert!(CATALOGUE.contains(&cmd.as_str()), "unknown cmd {cmd}");
    assert!(v["ip"].as_str().is_some_and(|s| !s.is_empty()), "ip: {v}");
    assert!(v["port"].as_u64().is_some_and(|p| p > 0), "port must be an integer: {v}");
    assert!(v["data"].is_object(), "data: {v}");
    assert!(v["timestamp"].is_number(), "timestamp: {v}");
    (cmd, v["data"].clone())
}

/// A running cdtester process in its own folder (its log is `node.log` there), killed on drop.
struct Spawned {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Spawned {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
}

struct Node {
    addr: SocketAddr,
    status: PathBuf,
    proc: Spawned,
}

impl Node {
    /// A membership node in open-network mode (reference peers cannot authenticate).
    fn start(join: Option<SocketAddr>) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port");
        let status = dir.path().join("status.json");
        let log = std::fs::File::create(dir.path().join("node.log")).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdtester"));
        cmd.args(["node", "--insecure", "--bind", &addr.to_string(), "--status-file"]).arg(&status);
        if let Some(j) = join {
            cmd.arg("--join").arg(j.to_string());
        }
        cmd.env_remove("CDT_CONFIG").env("CDT_NODE__DATA_DIR", dir.path().join("data"));
        cmd.current_dir(dir.path()).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("start cdtester node");
        Node { addr, status, proc: Spawned { child, dir } }
    }

    fn status(&self) -> Value {
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    fn id(&self) -> Option<String> {
        self.status()["id"].as_str().map(String::from)
    }

    /// Addresses of the live peers.
    fn peers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.status()["peers"]
            .as_object()
            .map(|m| m.values().filter_map(|a| a.as_str().map(String::from)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn log(&self) -> String {
        self.proc.log()
    }
}

/// `r` sends CONNECT to `to`; the CONNECT_REP (panics with `log()` when none comes in 5 s).
fn connect(r: &mut ReferencePeer, to: SocketAddr, log: impl Fn() -> String) -> Value {
    r.send(to, "CONNECT", json!({}));
    let answered = wait_until(Duration::from_secs(5), || {
        r.drain();
        !r.got("CONNECT_REP").is_empty()
    });
    assert!(answered, "no CONNECT_REP:\n{}", log());
    r.got("CONNECT_REP")[0].clone()
}

use common::wait_until;

/// Runs the reference peers' loop for `span`: each heartbeats `to` every 3.5 s (the first
/// `first` after the start), drains its socket and calls `check` every 100 ms. Returns when the
/// last heartbeat was sent.
fn beat_for(
    peers: &mut [ReferencePeer],
    to: SocketAddr,
    table: &BTreeMap<String, SocketAddr>,
    first: Duration,
    span: Duration,
    mut check: impl FnMut(Duration),
) -> Instant {
    let start = Instant::now();
    let mut next = start + first;
    let mut last = start;
    while start.elapsed() < span {
        if Instant::now() >= next {
            for p in peers.iter() {
                p.heartbeat(to, table);
            }
            last = Instant::now();
            next += REFERENCE_BEAT;
        }
        for p in peers.iter_mut() {
            p.drain();
        }
        check(start.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

#[test]
fn a_reference_node_joins_and_is_never_falsely_failed() {
    let node = Node::start(None);
    assert!(
        wait_until(Duration::from_secs(10), || node.id().is_some()),
        "node never started:\n{}",
        node.log()
    );
    let node_id = node.id().unwrap_or_default();
    let mut r = ReferencePeer::new("");
    let rep = connect(&mut r, node.addr, || node.log());
    assert_eq!(rep["id"], node_id.as_str(), "{rep}");
    assert!(rep["peers"].as_object().is_some_and(|m| m.is_empty()), "the joiner is not listed: {rep}");
    r.id = rep["given_id"].as_str().expect("given_id is a string").to_string();
    assert_eq!(r.id.len(), 21, "ids are 21-digit decimal strings like the reference's: {}", r.id);

    // The reference's first heartbeat comes 3.5 s after its join, then every 3.5 s.
    let me = r.addr.to_string();
    let table = BTreeMap::from([(node_id.clone(), node.addr)]);
    let mut missing = Vec::new();
    let last = beat_for(
        std::slice::from_mut(&mut r),
        node.addr,
        &table,
        REFERENCE_BEAT,
        Duration::from_secs(20),
        |t| {
            if !node.peers().contains(&me) {
                missing.push(t);
            }
        },
    );
    assert!(missing.is_empty(), "the reference peer was dropped at {missing:?}:\n{}", node.log());
    // The node heartbeats the reference peer with its reference-shaped table.
    let hbs = r.got("HEARTBEAT");
    assert!(hbs.len() >= 20, "{} heartbeats in 20 s", hbs.len());
    assert!(hbs.iter().all(|h| h["id"] == node_id.as_str() && h["peers"].is_object()), "{hbs:?}");

    // Silence: the reference peer is failed after the reference timeout (not the 2 s one).
    assert!(wait_until(Duration::from_secs(15), || !node.peers().contains(&me)), "never failed");
    let after = last.elapsed();
    assert!(after >= Duration::from_secs(7), "failed {after:?} after its last heartbeat");
}

/// The id reference node A gives the node in [`join_reference_nodes`].
const GIVEN: &str = "100000000000000000003";

/// A node joining reference node A, which lists reference node B (ids ...01 and ...02; the node
/// gets [`GIVEN`]).
fn join_reference_nodes() -> (ReferencePeer, ReferencePeer, Node) {
    let mut a = ReferencePeer::new("100000000000000000001");
    let b = ReferencePeer::new("100000000000000000002");
    let node = Node::start(Some(a.addr));
    let connected = wait_until(Duration::from_secs(10), || {
        a.drain();
        !a.got("CONNECT").is_empty()
    });
    assert!(connected, "no CONNECT:\n{}", node.log());
    let rep = json!({"peers": {b.id.clone(): ["127.0.0.1", b.addr.port()]}, "id": a.id, "given_id": GIVEN});
    a.send(node.addr, "CONNECT_REP", rep);
    assert!(wait_until(Duration::from_secs(5), || node.id().as_deref() == Some(GIVEN)), "{}", node.log());
    (a, b, node)
}

#[test]
fn a_node_joining_reference_nodes_keeps_them_between_their_heartbeats() {
    let (a, b, node) = join_reference_nodes();
    let given = GIVEN;

    let table =
        BTreeMap::from([(a.id.clone(), a.addr), (b.id.clone(), b.addr), (given.to_string(), node.addr)]);
    let (sa, sb) = (a.addr.to_string(), b.addr.to_string());
    let mut peers = [a, b];
    let mut dropped = Vec::new();
    beat_for(
        &mut peers,
        node.addr,
        &table,
        REFERENCE_BEAT - Duration::from_millis(100),
        Duration::from_secs(25),
        |t| {
            let now = node.peers();
            // A is a member from the join on; B is learned from A's table and counts once it
            // has talked to the node (its first heartbeat, 3.4 s in).
            let b_due = REFERENCE_BEAT + Duration::from_secs(1);
            if !now.contains(&sa) || (t > b_due && !now.contains(&sb)) {
                dropped.push((t, now));
            }
        },
    );
    assert!(dropped.is_empty(), "healthy reference peers dropped: {dropped:?}\n{}", node.log());
    for p in &peers {
        assert!(p.got("RECOVERY_ELECTION").is_empty(), "{} was told of an election", p.id);
        let hbs = p.got("HEARTBEAT");
        assert!(hbs.iter().any(|h| h["id"] == given), "{} got no heartbeat from the node", p.id);
    }
}

// ------------------------------------------------------------------ evaluation flows

mod common;

/// A full cdtester node (evaluations, HTTP API) in open-network mode, founding a network.
struct FullNode {
    udp: SocketAddr,
    http: SocketAddr,
    proc: Spawned,
}

impl FullNode {
    fn start() -> FullNode {
        FullNode::start_with(&[])
    }

    /// A node with extra environment (configuration keys).
    fn start_with(env: &[(&str, &str)]) -> FullNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let udp = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port");
        let http =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free port");
        let log = std::fs::File::create(dir.path().join("node.log")).expect("log file");
        let mut cmd = common::cdtester(&dir.path().join("data"));
        cmd.args(["node", "--insecure", "--bind", &udp.to_string(), "--http", &http.to_string()])
            .env("CDT_LOG", "info")
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("start cdtester node");
        let node = FullNode { udp, http, proc: Spawned { child, dir } };
        assert!(
            wait_until(Duration::from_secs(20), || http_get(http, "/network").is_some()),
            "{}",
            node.log()
        );
        node
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    /// Joins the reference peer `r` to the node (CONNECT / CONNECT_REP); the node's id.
    fn admit(&self, r: &mut ReferencePeer) -> String {
        let rep = connect(r, self.udp, || self.log());
        r.id = rep["given_id"].as_str().expect("given_id").to_string();
        rep["id"].as_str().expect("id").to_string()
    }
}

/// `GET path`: (status, JSON body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, Value)> {
    common::http_call(addr, "GET", path, None)
}

/// A request the fake owner's HTTP API received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    content_type: Option<String>,
    body: String,
}

/// The HTTP API of a reference owner: `GET /file/<project_id>` serves `zip` for `project_id`
/// (404 `{"error":"File not found"}` otherwise, as the reference), `POST /task` answers
/// `{"status":"success"}`; every request is recorded.
fn reference_api(
    project_id: String,
    zip: Vec<u8>,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    reference_api_while(project_id, zip, std::sync::Arc::new(AtomicBool::new(true)))
}

/// [`reference_api`] while `alive` holds; afterwards every connection is closed unanswered (a
/// dead node's port).
fn reference_api_while(
    project_id: String,
    zip: Vec<u8>,
    alive: std::sync::Arc<AtomicBool>,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind api");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if !alive.load(Ordering::SeqCst) {
                continue;
            }
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) =
                (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            let (mut len, mut content_type) = (0usize, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let (k, v) = h
                    .split_once(':')
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .unwrap_or_default();
                if k == "content-length" {
                    len = v.parse().unwrap_or(0);
                } else if k == "content-type" {
                    content_type = Some(v);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body).into_owned();
            log.lock().expect("log").push(Received {
                method: method.clone(),
                path: path.clone(),
                content_type,
                body,
            });
            let (status, ct, payload): (&str, &str, Vec<u8>) =
                if method == "GET" && path == format!("/file/{project_id}") {
                    ("200 OK", "application/zip", zip.clone())
                } else if method == "POST" && path == "/task" {
                    ("200 OK", "application/json", b"{\"status\":\"success\"}\n".to_vec())
                } else {
                    ("404 NOT FOUND", "application/json", b"{\"error\":\"File not found\"}\n".to_vec())
                };
            let mut conn = conn;
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                payload.len()
            );
            let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(&payload));
        }
    });
    (addr, seen)
}

/// A zip in the reference's `/file` layout: every entry under `<project_id>/`.
fn reference_zip(project_id: &str, files: &[(&str, &str)]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, text) in files {
        w.start_file(format!("{project_id}/{name}"), zip::write::SimpleFileOptions::default())
            .expect("entry");
        w.write_all(text.as_bytes()).expect("write");
    }
    w.finish().expect("zip").into_inner()
}

/// Heartbeats `to` from `r` every 3.5 s and calls `step` every 50 ms until it returns true or
/// `limit` passes; whether it did.
fn keep_alive_until(
    r: &mut ReferencePeer,
    to: SocketAddr,
    table: &BTreeMap<String, SocketAddr>,
    limit: Duration,
    mut step: impl FnMut(&mut ReferencePeer) -> bool,
) -> bool {
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < limit {
        if Instant::now() >= next {
            r.heartbeat(to, table);
            next += REFERENCE_BEAT;
        }
        r.drain();
        if step(r) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

const TEST_MODULE: &str =
    "def test_a():\n    assert True\n\ndef test_b():\n    assert 1 == 2\n\ndef test_c():\n    pass\n";

#[test]
fn a_node_works_for_a_reference_owner_like_a_reference_worker() {
    let node = FullNode::start();
    let mut r = ReferencePeer::new("");
    let node_id = node.admit(&mut r);
    let table = BTreeMap::from([(node_id.clone(), node.udp)]);
    let project_id = "1795512056.7615452179551203864886859797";
    let zip = reference_zip(project_id, &[("calc.py", "X = 1\n"), ("tests/test_calc.py", TEST_MODULE)]);
    let (api, seen) = reference_api(project_id.to_string(), zip);
    let info = |pid: &str, module: &str| {
        json!({"id": r.id, "info": {"project_id": pid, "module": module, "project_name": "calc",
            "api_port": api.port().to_string(), "eval_id": "1795512038648868597971", "url": null,
            "token": null, "type": "zip"}})
    };
    let (hostile, good) = (info("..", "test_calc.py"), info(project_id, "test_calc.py"));

    // TASK_ANNOUNCE is answered with TASK_REQUEST {"id"}.
    r.send(node.udp, "TASK_ANNOUNCE", json!({"id": r.id}));
    let asked = keep_alive_until(&mut r, node.udp, &table, Duration::from_secs(5), |r| {
        !r.got("TASK_REQUEST").is_empty()
    });
    assert!(asked, "no TASK_REQUEST:\n{}", node.log());
    assert_eq!(r.got("TASK_REQUEST")[0]["id"], node_id.as_str());

    // A hostile project id is neither fetched nor confirmed.
    r.send(node.udp, "TASK_SEND", hostile);
    keep_alive_until(&mut r, node.udp, &table, Duration::from_secs(2), |_| false);
    assert!(r.got("TASK_CONFIRM").is_empty(), "{:?}", r.got("TASK_CONFIRM"));

    // A reference task: fetched from /file, confirmed within the owner's 5 s, run, posted.
    let sent = Instant::now();
    r.send(node.udp, "TASK_SEND", good);
    let confirmed = keep_alive_until(&mut r, node.udp, &table, Duration::from_secs(5), |r| {
        !r.got("TASK_CONFIRM").is_empty()
    });
    assert!(confirmed, "no TASK_CONFIRM within 5 s:\n{}", node.log());
    assert_eq!(r.got("TASK_CONFIRM")[0]["task_id"], format!("{project_id}::test_calc.py"));
    let posted = |s: &std::sync::Mutex<Vec<Received>>| {
        s.lock().expect("log").iter().find(|q| q.path == "/task").cloned()
    };
    let done =
        keep_alive_until(&mut r, node.udp, &table, Duration::from_secs(240), |_| posted(&seen).is_some());
    assert!(done, "no POST /task after {:?}:\n{}", sent.elapsed(), node.log());
    let requests = seen.lock().expect("log").clone();
    assert_eq!(
        requests.iter().map(|q| (q.method.as_str(), q.path.as_str())).collect::<Vec<_>>(),
        [("GET", format!("/file/{project_id}").as_str()), ("POST", "/task")],
        "only the reference's calls"
    );
    let post = posted(&seen).expect("posted");
    assert_eq!(post.content_type.as_deref(), Some("application/json"), "exactly, as the reference requires");
    // The reference's body, keys in its order, `port` as a string.
    let keys = ["task_id", "passed", "failed", "time", "project_id", "module", "ip", "port"];
    let at: Vec<usize> = keys.iter().map(|k| post.body.find(&format!("\"{k}\"")).expect(k)).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "key order: {}", post.body);
    let body: Value = serde_json::from_str(&post.body).expect("JSON body");
    assert_eq!(body.as_object().map(|o| o.len()), Some(keys.len()), "{body}");
    assert_eq!(body["task_id"], format!("{project_id}::test_calc.py"));
    assert_eq!((body["passed"].as_u64(), body["failed"].as_u64()), (Some(2), Some(1)), "{body}");
    assert!(body["time"].is_f64(), "{body}");
    assert_eq!(
        (body["project_id"].as_str(), body["module"].as_str()),
        (Some(project_id), Some("test_calc.py"))
    );
    assert_eq!(body["ip"], "127.0.0.1");
    assert_eq!(body["port"], node.udp.port().to_string());
    assert!(!node.log().contains("/internal/"), "no cdtester-only call to a reference peer");
}

#[test]
fn evaluations_owned_by_reference_nodes_are_shown_from_their_cache_updates() {
    let node = FullNode::start();
    let mut r = ReferencePeer::new("");
    let node_id = node.admit(&mut r);
    let table = BTreeMap::from([(node_id, node.udp)]);
    let eval = "1795512038648868597971";
    let me = r.addr.to_string();
    let cache = |status: &str| {
        json!({"addr": me, "peers_ip": [node.udp.to_string()],
            "evaluations": {eval: {"projects": ["1795512056.76154521", "1795512056.76220421"], "start_time": 1795512056.7254164, "end_time": null}},
            "projects": {
                "1795512056.76154521": {"project_name": "calc", "node": me, "modules": {
                    "test_add.py": {"passed": 2, "failed": 1, "time": 0.144, "status": "finished"},
                    "test_sub.py": {"passed": 0, "failed": 0, "time": 0, "status": status}}},
                "1795512056.76220421": {"project_name": "strs", "node": me, "modules": {
                    "test_upper.py": {"passed": 2, "failed": 1, "time": 0.18, "status": "finished"}}}},
            "stats": {"failed": 0, "passed": 0, "projects": 0, "modules": 0, "evaluations": [], "submitted_evaluation": [eval]}})
    };
    r.send(node.udp, "CACHE_UPDATE", cache("running"));
    let listed = keep_alive_until(&mut r, node.udp, &table, Duration::from_secs(5), |_| {
        http_get(node.http, "/evaluation")
            .is_some_and(|(_, v)| v.as_array().is_some_and(|a| a.contains(&json!(eval))))
    });
    assert!(listed, "{:?}\n{}", http_get(node.http, "/evaluation"), node.log());
    let (status, report) = http_get(node.http, &format!("/evaluation/{eval}")).expect("report");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["id"], eval);
    assert_eq!(report["summary"]["executing"], 1);
    assert_eq!(report["projects"]["calc"]["score"], "--");
    // The module finishes: the last finished write wins, as on reference nodes.
    let mut done = cache("finished");
    done["projects"]["1795512056.76154521"]["modules"]["test_sub.py"] =
        json!({"passed": 2, "failed": 0, "time": 0.11, "status": "finished"});
    done["evaluations"][eval]["end_time"] = json!(1795512058.647059);
    r.send(node.udp, "CACHE_UPDATE", done);
    let finished = keep_alive_until(&mut r, node.udp, &table, Duration::from_secs(5), |_| {
        http_get(node.http, &format!("/evaluation/{eval}")).is_some_and(|(_, v)| v["end_time"].is_number())
    });
    assert!(finished, "{}", node.log());
    let (_, report) = http_get(node.http, &format!("/evaluation/{eval}")).expect("report");
    let summary = json!({"pass_percentage": 75.0, "fail_percentage": 25.0, "executed": 3, "executing": 0,
        "pending": 0, "time_elapsed": 0, "total_passed": 6, "total_failed": 2});
    assert_eq!(report["summary"], summary, "{report}");
    assert_eq!(report["projects"]["calc"]["score"], 16.0);
    assert_eq!(report["projects"]["strs"]["score"], 13.33);
    let (_, stats) = http_get(node.http, "/stats").expect("stats");
    assert_eq!(stats["all"], json!({"failed": 2, "passed": 6, "projects": 2, "evaluations": 1}), "{stats}");
}

#[test]
fn a_node_hands_work_to_a_reference_worker_in_the_references_terms() {
    // One slot, so that the node leaves modules for the worker.
    let node = FullNode::start_with(&[("CDT_RUNNER__WORKERS", "1")]);
    let mut w = ReferencePeer::new("");
    let node_id = node.admit(&mut w);
    let table = BTreeMap::from([(node_id, node.udp)]);
    let src = tempfile::tempdir().expect("tmp");
    let slow =
        TEST_MODULE.replace("def test_c():\n    pass", "def test_c():\n    import time; time.sleep(1)");
    for m in ["a", "b", "c", "d", "e"] {
        common::write_file(src.path(), &format!("calc/tests/test_{m}.py"), &slow);
    }
    common::write_file(src.path(), "calc/tests/sub/test_nested.py", TEST_MODULE);
    let zip = cdtester::fetch::pack_projects(&[("calc".into(), src.path().join("calc"))]).expect("zip");
    let eval = common::submit_zip(node.http, &zip);

    // The worker asks on TASK_ANNOUNCE, as a reference node does, until it gets a task.
    let mut asked = 0;
    let got_task = keep_alive_until(&mut w, node.udp, &table, Duration::from_secs(120), |w| {
        let announces = w.got("TASK_ANNOUNCE").len();
        if announces > asked {
            asked = announces;
            w.send(node.udp, "TASK_REQUEST", json!({"id": w.id}));
        }
        !w.got("TASK_SEND").is_empty()
    });
    assert!(got_task, "no TASK_SEND:\n{}", node.log());
    let position = |cmd: &str| w.received.iter().position(|(c, _)| c == cmd);
    assert!(position("PROJECT_ANNOUNCE") < position("TASK_SEND"), "PROJECT_ANNOUNCE first: {:?}", w.received);
    let send = w.got("TASK_SEND")[0].clone();
    let info = &send["info"];
    let (pid, module) = (
        info["project_id"].as_str().expect("pid").to_string(),
        info["module"].as_str().expect("module").to_string(),
    );
    assert!(
        ["test_a.py", "test_b.py", "test_c.py", "test_d.py", "test_e.py"].contains(&module.as_str()),
        "{send}"
    );
    assert_eq!(
        (&info["type"], &info["api_port"], &info["token"]),
        (&json!("zip"), &json!(node.http.port().to_string()), &Value::Null)
    );
    let announce = w.got("PROJECT_ANNOUNCE")[0].clone();
    let expected = json!({"project_id": pid, "api_port": node.http.port().to_string(), "project_name": "calc",
        "eval_id": eval, "url": null, "token": null, "type": 0});
    assert_eq!(announce, expected);

    // The project in the reference's layout, as its worker fetches it.
    let (status, head, body) =
        common::http_raw(node.http, "GET", &format!("/file/{pid}"), None).expect("file");
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("filename={pid}.zip")), "{head}");
    let archive = zip::ZipArchive::new(std::io::Cursor::new(body)).expect("a zip");
    let names: Vec<String> = archive.file_names().filter_map(|n| n.ok().map(|n| n.to_string())).collect();
    assert!(names.iter().all(|n| n.starts_with(&format!("{pid}/"))), "{names:?}");
    assert!(names.contains(&format!("{pid}/tests/{module}")), "{names:?}");

    // Confirm and post the reference's body: the node takes it for its own task.
    let task = format!("{pid}::{module}");
    w.send(node.udp, "TASK_CONFIRM", json!({"task_id": task}));
    std::thread::sleep(Duration::from_millis(300));
    let post = json!({"task_id": task, "passed": 2, "failed": 1, "time": 1.01, "project_id": pid, "module": module,
        "ip": "127.0.0.1", "port": w.addr.port().to_string()});
    let body = serde_json::to_vec(&post).expect("json");
    let answer = common::http_call(node.http, "POST", "/task", Some(("application/json", &body)));
    assert_eq!(answer, Some((200, json!({"status": "success"}))), "{}", node.log());

    let done = keep_alive_until(&mut w, node.udp, &table, Duration::from_secs(180), |_| {
        http_get(node.http, &format!("/evaluation/{eval}")).is_some_and(|(_, v)| v["end_time"].is_number())
    });
    assert!(done, "{:?}\n{}", http_get(node.http, &format!("/evaluation/{eval}")), node.log());
    let (_, report) = http_get(node.http, &format!("/evaluation/{eval}")).expect("report");
    assert_eq!(
        (&report["summary"]["total_passed"], &report["summary"]["total_failed"]),
        (&json!(12), &json!(6)),
        "{report}"
    );
    // Only whole modules directly under tests/ went to the worker.
    assert!(w.got("TASK_SEND").iter().all(|s| !s["info"]["module"].as_str().unwrap_or("/").contains('/')));
}

#[test]
fn elections_run_with_reference_nodes_in_both_directions() {
    let (mut a, b, node) = join_reference_nodes();
    let given = GIVEN;
    let table =
        BTreeMap::from([(a.id.clone(), a.addr), (b.id.clone(), b.addr), (given.to_string(), node.addr)]);
    // B heartbeats once, then dies; A keeps beating. The node detects B, starts an election with
    // A and, A having the smallest id, tells A it won.
    b.heartbeat(node.addr, &table);
    let b_addr = b.addr.to_string();
    let mut elected = false;
    beat_for(
        std::slice::from_mut(&mut a),
        node.addr,
        &table,
        Duration::ZERO,
        Duration::from_secs(20),
        |_| {},
    );
    for (cmd, data) in a.received.clone() {
        if cmd == "RECOVERY_ELECTION" && !elected {
            assert_eq!(data["candidate_id"], given, "{data}");
            assert_eq!(data["failed_node"], b.id.as_str(), "{data}");
            assert_eq!(data["failed_node_addr"], b_addr.as_str(), "{data}");
            assert!(data["timestamp"].is_f64() && data["extra"].is_object(), "{data}");
            elected = true;
        }
    }
    assert!(elected, "no RECOVERY_ELECTION for the dead reference node: {:?}\n{}", a.received, node.log());
    let results = a.got("RECOVERY_ELECTION_RESULT");
    assert_eq!(results.len(), 1, "{:?}\n{}", a.received, node.log());
    assert_eq!(results[0]["failed_node_id"], b.id.as_str());
    assert!(results[0]["evaluations"].is_object());

    // The other way: A runs an election for a node C; the node answers with its REP.
    let c = ("100000000000000000009", "127.0.0.1:9");
    let election = json!({"candidate_id": a.id, "failed_node": c.0, "timestamp": 1.0, "extra": {}, "failed_node_addr": c.1});
    a.send(node.addr, "RECOVERY_ELECTION", election);
    let replied = wait_until(Duration::from_secs(5), || {
        a.drain();
        !a.got("RECOVERY_ELECTION_REP").is_empty()
    });
    assert!(replied, "no RECOVERY_ELECTION_REP:\n{}", node.log());
    let rep = a.got("RECOVERY_ELECTION_REP")[0].clone();
    assert_eq!(rep, json!({"failed_node_id": c.0, "evaluations": {}, "node_id": given}));
}

/// One step of a reference owner's death scenario: heartbeats `to` from every peer in `beating`
/// when one is due (every 3.5 s from `*next`) and drains every peer.
fn pump(
    peers: &mut [&mut ReferencePeer],
    beating: &[bool],
    to: SocketAddr,
    table: &BTreeMap<String, SocketAddr>,
    next: &mut Instant,
) {
    if Instant::now() >= *next {
        for (p, beat) in peers.iter().zip(beating) {
            if *beat {
                p.heartbeat(to, table);
            }
        }
        *next += REFERENCE_BEAT;
    }
    for p in peers.iter_mut() {
        p.drain();
    }
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn a_node_that_wins_the_election_for_a_dead_reference_owner_finishes_its_evaluation() {
    // One slot, so that a reference worker gets a module of the taken-over evaluation too.
    let node = FullNode::start_with(&[("CDT_RUNNER__WORKERS", "1")]);
    let (mut a, mut b) = (ReferencePeer::new(""), ReferencePeer::new(""));
    let node_id = node.admit(&mut a);
    node.admit(&mut b);
    // The node founded the network and minted both ids after its own: it is the oldest, so the
    // election for A's failure (smallest live id) is the node's.
    assert!(node_id < b.id && node_id < a.id, "{node_id} {} {}", a.id, b.id);
    let table = BTreeMap::from([(node_id.clone(), node.udp)]);
    let (eval, pid) = ("1795512038648868597971", "1795512056.7615452179551203864886859797");
    let modules = ["test_m1.py", "test_m2.py", "test_m3.py", "test_m4.py"];
    let paths: Vec<String> = modules.iter().map(|m| format!("tests/{m}")).collect();
    // A's own task (test_m4.py) takes a while to import, so that A is dead before the node's
    // run of it ends, however fast the machine: its result then has no owner to go to but the
    // node itself (the counts stay those of every module).
    let slow = format!("import time\n\ntime.sleep(3)\n\n{TEST_MODULE}");
    let mut files: Vec<(&str, &str)> = paths
        .iter()
        .zip(modules)
        .map(|(p, m)| (p.as_str(), if m == "test_m4.py" { slow.as_str() } else { TEST_MODULE }))
        .collect();
    files.push(("calc.py", "X = 1\n"));
    let alive = std::sync::Arc::new(AtomicBool::new(true));
    let (api, seen) = reference_api_while(pid.to_string(), reference_zip(pid, &files), alive.clone());
    // A second project whose modules A never published (it died before discovering them).
    let pid2 = "1795512056.762204179551203864886859797";
    let files2 = [("tests/test_s1.py", TEST_MODULE), ("tests/sub/test_s2.py", TEST_MODULE)];
    let (api2, seen2) = reference_api_while(pid2.to_string(), reference_zip(pid2, &files2), alive.clone());

    // Reference owner A announces the project and publishes the evaluation (its CACHE_UPDATE):
    // test_m1.py finished by A (its true counts, 2 passed 1 failed), the others waiting.
    let announce = json!({"project_id": pid, "api_port": api.port().to_string(), "project_name": "calc",
        "eval_id": eval, "url": null, "token": null, "type": 0});
    a.send(node.udp, "PROJECT_ANNOUNCE", announce);
    let announce2 = json!({"project_id": pid2, "api_port": api2.port().to_string(), "project_name": "strs",
        "eval_id": eval, "url": null, "token": null, "type": 0});
    a.send(node.udp, "PROJECT_ANNOUNCE", announce2);
    let a_addr = a.addr.to_string();
    let waiting = json!({"passed": 0, "failed": 0, "time": 0, "status": "pending"});
    let cache = json!({"addr": a_addr, "peers_ip": [node.udp.to_string(), b.addr.to_string()],
        "evaluations": {eval: {"projects": [pid, pid2], "start_time": 1795512056.7254164, "end_time": null}},
        "projects": {pid: {"project_name": "calc", "node": a_addr, "modules": {
            "test_m1.py": {"passed": 2, "failed": 1, "time": 0.144, "status": "finished"},
            "test_m2.py": waiting, "test_m3.py": waiting, "test_m4.py": waiting}},
            pid2: {"project_name": "strs", "node": a_addr, "modules": {}}},
        "stats": {"failed": 1, "passed": 2, "projects": 1, "modules": 1, "evaluations": [eval], "submitted_evaluation": [eval]}});
    a.send(node.udp, "CACHE_UPDATE", cache);
    let listed = wait_until(Duration::from_secs(5), || {
        http_get(node.http, &format!("/evaluation/{eval}")).is_some_and(|(s, _)| s == 200)
    });
    assert!(listed, "{}", node.log());

    // A hands test_m4.py to the node, which confirms it; then A dies (no heartbeat, its HTTP
    // API answers no more).
    let mut next = Instant::now();
    a.send(node.udp, "TASK_ANNOUNCE", json!({"id": a.id}));
    let task = json!({"id": a.id, "info": {"project_id": pid, "module": "test_m4.py", "project_name": "calc",
        "api_port": api.port().to_string(), "eval_id": eval, "url": null, "token": null, "type": "zip"}});
    let start = Instant::now();
    let mut sent = false;
    let fetched2 = || seen2.lock().expect("log").iter().any(|q| q.path == format!("/file/{pid2}"));
    while (a.got("TASK_CONFIRM").is_empty() || !fetched2()) && start.elapsed() < Duration::from_secs(10) {
        if !sent && !a.got("TASK_REQUEST").is_empty() {
            a.send(node.udp, "TASK_SEND", task.clone());
            sent = true;
        }
        pump(&mut [&mut a, &mut b], &[true, true], node.udp, &table, &mut next);
    }
    assert!(!a.got("TASK_CONFIRM").is_empty(), "no TASK_CONFIRM for A's task:\n{}", node.log());
    assert!(fetched2(), "the second project was not prefetched:\n{}", node.log());
    alive.store(false, Ordering::SeqCst);

    // B, a reference node, answers the node's election for A and asks for work on its
    // TASK_ANNOUNCEs; it runs the module it gets (2 passed, 1 failed, as the module has) and
    // posts the reference's body to the `api_port` of the TASK_SEND.
    let report = |node: &FullNode| http_get(node.http, &format!("/evaluation/{eval}")).map(|(_, v)| v);
    let (mut answered, mut requested, mut posted) = (false, 0, None);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(240) {
        pump(&mut [&mut a, &mut b], &[false, true], node.udp, &table, &mut next);
        if !answered && let Some(el) = b.got("RECOVERY_ELECTION").first().cloned() {
            assert_eq!((&el["candidate_id"], &el["failed_node"]), (&json!(node_id), &json!(a.id)), "{el}");
            assert_eq!(el["failed_node_addr"], a_addr.as_str());
            assert_eq!(
                el["extra"],
                json!({eval: [pid, pid2]}),
                "the election carries A's unfinished evaluation"
            );
            let rep = json!({"failed_node_id": a.id, "evaluations": {}, "node_id": b.id});
            b.send(node.udp, "RECOVERY_ELECTION_REP", rep);
            answered = true;
        }
        let announces = b.got("TASK_ANNOUNCE").len();
        if posted.is_none() && announces > requested {
            requested = announces;
            b.send(node.udp, "TASK_REQUEST", json!({"id": b.id}));
        }
        if posted.is_none()
            && let Some(send) = b.got("TASK_SEND").first().cloned()
        {
            let info = &send["info"];
            assert_eq!(
                (&info["eval_id"], &info["type"], &info["api_port"]),
                (&json!(eval), &json!("zip"), &json!(node.http.port().to_string())),
                "{send}"
            );
            let project = info["project_id"].as_str().expect("project id").to_string();
            let module = info["module"].as_str().expect("module").to_string();
            // Either project may come first (the second one's modules are handed out once
            // discovered). Not A's task, which the node still runs (its result, for A, becomes the
            // node's own): a waiting module of the first project, or the next when the node's slot
            // freed first; or one of the second project's, by the reference's names.
            if project == pid {
                assert!(modules[1..3].contains(&module.as_str()), "{send}");
            } else {
                assert_eq!(project, pid2, "{send}");
                assert!(["test_s1.py", "test_s2.py"].contains(&module.as_str()), "{send}");
            }
            let task_id = format!("{project}::{module}");
            b.send(node.udp, "TASK_CONFIRM", json!({"task_id": task_id}));
            std::thread::sleep(Duration::from_millis(300));
            let body = json!({"task_id": task_id, "passed": 2, "failed": 1, "time": 0.2, "project_id": project,
                "module": module, "ip": "127.0.0.1", "port": b.addr.port().to_string()});
            let body = serde_json::to_vec(&body).expect("json");
            let answer = common::http_call(node.http, "POST", "/task", Some(("application/json", &body)));
            assert_eq!(answer, Some((200, json!({"status": "success"}))), "{}", node.log());
            posted = Some(module);
        }
        if report(&node).is_some_and(|v| v["end_time"].is_number()) {
            break;
        }
    }
    let report = report(&node).expect("report");
    assert!(report["end_time"].is_number(), "never finished: {report}\n{}", node.log());
    assert!(
        answered && posted.is_some(),
        "election answered {answered}, task posted {posted:?}\n{}",
        node.log()
    );

    // Exact counts: 6 modules of 2 passed and 1 failed (4 published, 2 discovered again), A's
    // result kept, each module once.
    let summary = json!({"pass_percentage": 66.67, "fail_percentage": 33.33, "executed": 6, "executing": 0,
        "pending": 0, "time_elapsed": 0, "total_passed": 12, "total_failed": 6});
    assert_eq!(report["summary"], summary, "{report}");
    let calc = &report["projects"]["calc"];
    assert_eq!((&calc["node"], &calc["score"]), (&json!(node.udp.to_string()), &json!(13.33)), "{report}");
    assert_eq!(calc["modules"]["test_m1.py"]["time"], 0.144, "A's result stays");
    let strs = &report["projects"]["strs"];
    let found: Vec<&String> = strs["modules"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
    assert_eq!(found, ["test_s1.py", "test_s2.py"], "the reference's names: file names under tests/");
    assert_eq!((&strs["node"], &strs["score"]), (&json!(node.udp.to_string()), &json!(13.33)), "{report}");
    let (_, stats) = http_get(node.http, "/stats").expect("stats");
    assert_eq!(stats["all"], json!({"failed": 6, "passed": 12, "projects": 2, "evaluations": 1}), "{stats}");

    // B was told, in the reference's messages: the new owner, then the finished evaluation.
    for p in [pid, pid2] {
        let update = json!({"project_id": p, "new_node": node.udp.to_string()});
        assert!(b.got("EVALUATION_RESPONSIBILITY_UPDATE").contains(&&update), "{:?}", b.received);
    }
    let published = wait_until(Duration::from_secs(10), || {
        b.drain();
        b.got("CACHE_UPDATE").iter().any(|c| {
            let (p, p2) = (&c["projects"][pid], &c["projects"][pid2]);
            c["evaluations"][eval]["end_time"].is_number()
                && p["node"] == node.udp.to_string()
                && modules.iter().all(|m| p["modules"][m]["status"] == "finished")
                && ["test_s1.py", "test_s2.py"].iter().all(|m| p2["modules"][m]["status"] == "finished")
        })
    });
    assert!(published, "no CACHE_UPDATE with the finished evaluation:\n{}", node.log());
    // A's API saw only the prefetch of its project (afterwards it was dead).
    for (log, p) in [(&seen, pid), (&seen2, pid2)] {
        let calls: Vec<String> = log.lock().expect("log").iter().map(|q| q.path.clone()).collect();
        assert_eq!(calls, [format!("/file/{p}")], "only the prefetch reached A");
    }
}
