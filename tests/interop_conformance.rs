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

struct Node {
    addr: SocketAddr,
    status: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        Node { addr, status, child, dir }
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
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

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
    r.send(node.addr, "CONNECT", json!({}));
    assert!(
        wait_until(Duration::from_secs(5), || {
            r.drain();
            !r.got("CONNECT_REP").is_empty()
        }),
        "no CONNECT_REP:\n{}",
        node.log()
    );
    let rep = r.got("CONNECT_REP")[0].clone();
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

#[test]
fn a_node_joining_reference_nodes_keeps_them_between_their_heartbeats() {
    let mut a = ReferencePeer::new("100000000000000000001");
    let b = ReferencePeer::new("100000000000000000002");
    let node = Node::start(Some(a.addr));
    assert!(
        wait_until(Duration::from_secs(10), || {
            a.drain();
            !a.got("CONNECT").is_empty()
        }),
        "no CONNECT:\n{}",
        node.log()
    );
    let given = "100000000000000000003";
    let connect_rep = json!({
        "peers": {b.id.clone(): ["127.0.0.1", b.addr.port()]},
        "id": a.id,
        "given_id": given,
    });
    a.send(node.addr, "CONNECT_REP", connect_rep);
    assert!(wait_until(Duration::from_secs(5), || node.id().as_deref() == Some(given)), "{}", node.log());

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
