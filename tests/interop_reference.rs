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
        let child = Command::new(&self.python)
            .arg(launcher)
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
    let child = Command::new(env!("CARGO_BIN_EXE_cdtester"))
        .args(["node", "--insecure", "--bind", &udp.to_string(), "--http", &http.to_string()])
        .args(["--join", &join.to_string()])
        .env_remove("CDT_CONFIG")
        .env("CDT_NODE__DATA_DIR", dir.join("data"))
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
