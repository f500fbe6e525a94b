//! Real sockets: `cdtester node` processes on 127.0.0.1 with default timers. Membership is
//! observed through each node's `--status-file`.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Node {
    addr: SocketAddr,
    status: PathBuf,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port");
    s.local_addr().expect("local addr")
}

fn spawn(dir: &Path, name: &str, join: Option<SocketAddr>) -> Node {
    let addr = free_udp_port();
    let status = dir.join(format!("{name}.json"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdtester"));
    cmd.arg("node").arg("--bind").arg(addr.to_string()).arg("--status-file").arg(&status);
    if let Some(j) = join {
        cmd.arg("--join").arg(j.to_string());
    }
    // No config file from the working directory; default timers; one cluster secret.
    cmd.env("CDT_NODE__SECRET", "p2p-udp-test-secret");
    cmd.current_dir(dir).stdout(Stdio::null()).stderr(log);
    let child = cmd.spawn().expect("start cdtester node");
    Node { addr, status, child }
}

fn status(node: &Node) -> Option<Value> {
    let text = std::fs::read_to_string(&node.status).ok()?;
    serde_json::from_str(&text).ok()
}

fn peers(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = status(node)
        .and_then(|s| {
            s["peers"].as_object().map(|m| m.values().filter_map(|a| a.as_str().map(String::from)).collect())
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn failed(node: &Node) -> Vec<String> {
    status(node)
        .and_then(|s| {
            s["failed"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f["addr"].as_str().map(String::from)).collect())
        })
        .unwrap_or_default()
}

/// Each node's recorded recovery owner for the failed node at `addr` (null where none yet).
fn owners_of(nodes: &[Node], addr: &str) -> Vec<Value> {
    nodes
        .iter()
        .map(|n| {
            status(n)
                .and_then(|s| {
                    s["failed"]
                        .as_array()
                        .and_then(|a| a.iter().find(|f| f["addr"] == addr).map(|f| f["owner"].clone()))
                })
                .unwrap_or(Value::Null)
        })
        .collect()
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Everything the nodes logged and reported, for failure messages.
fn dump(dir: &Path) -> String {
    let mut out = String::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    entries.sort();
    for p in entries {
        out.push_str(&format!("== {}\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default()));
    }
    out
}

fn full_mesh(nodes: &[&Node]) -> bool {
    nodes.iter().all(|n| {
        let mut want: Vec<String> =
            nodes.iter().filter(|o| o.addr != n.addr).map(|o| o.addr.to_string()).collect();
        want.sort();
        peers(n) == want
    })
}

#[test]
fn five_processes_detect_a_kill_within_3s_and_accept_a_joiner_through_any_member() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = spawn(dir.path(), "n0", None);
    std::thread::sleep(Duration::from_millis(200));
    let mut nodes = vec![first];
    for i in 1..5 {
        // Join through different members, not only the founder.
        let via = nodes[(i - 1) / 2].addr;
        nodes.push(spawn(dir.path(), &format!("n{i}"), Some(via)));
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_until(Duration::from_secs(20), || full_mesh(&refs))
        .unwrap_or_else(|| panic!("5 nodes form no full mesh\n{}", dump(dir.path())));
    // Let heartbeats settle, then check that nothing was declared failed meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    for n in &nodes {
        assert!(failed(n).is_empty(), "false positive at {}: {:?}", n.addr, failed(n));
    }

    let mut victim = nodes.remove(2);
    let victim_addr = victim.addr.to_string();
    victim.child.kill().expect("kill -9");
    let killed = Instant::now();
    let _ = victim.child.wait();
    let took = wait_until(Duration::from_secs(10), || nodes.iter().all(|n| failed(n).contains(&victim_addr)));
    let took = took.expect("the survivors never agreed on the failure");
    eprintln!("all 4 survivors declared the killed node failed after {took:?}");
    assert!(took <= Duration::from_secs(3), "detection took {took:?}");
    // All agree on one recovery owner: the smallest live id.
    let owners = owners_of(&nodes, &victim_addr);
    wait_until(Duration::from_secs(3), || {
        let o = owners_of(&nodes, &victim_addr);
        !o[0].is_null() && o.iter().all(|x| *x == o[0])
    })
    .unwrap_or_else(|| panic!("no agreed recovery owner: {owners:?}"));
    let _ = killed;

    // A new node joins through a non-founder member and everyone converges to 5 nodes.
    let via = nodes[3].addr;
    nodes.push(spawn(dir.path(), "n5", Some(via)));
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_until(Duration::from_secs(10), || full_mesh(&refs)).expect("the joiner is known to everyone");

    // /network adjacency: every node lists the other four, for every live node.
    wait_until(Duration::from_secs(5), || {
        nodes.iter().all(|n| {
            status(n).is_some_and(|s| {
                s["network"].as_object().is_some_and(|net| {
                    net.len() == 5 && net.values().all(|v| v.as_array().is_some_and(|a| a.len() == 4))
                })
            })
        })
    })
    .expect("/network adjacency converges");
}

#[test]
fn sigterm_leaves_gracefully_and_peers_notice_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = spawn(dir.path(), "a", None);
    std::thread::sleep(Duration::from_millis(200));
    let b = spawn(dir.path(), "b", Some(a.addr));
    let mut c = spawn(dir.path(), "c", Some(b.addr));
    wait_until(Duration::from_secs(15), || full_mesh(&[&a, &b, &c])).expect("3 nodes mesh");
    let c_addr = c.addr.to_string();
    let pid = c.child.id();
    let sent = Instant::now();
    let rc = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("run kill");
    assert!(rc.success());
    let took =
        wait_until(Duration::from_secs(5), || failed(&a).contains(&c_addr) && failed(&b).contains(&c_addr))
            .expect("leave noticed");
    assert!(took < Duration::from_millis(1_500), "leave took {took:?} (a timeout, not the leave notice)");
    let status = c.child.wait().expect("wait");
    assert!(status.success(), "node exits cleanly after leaving: {status:?}");
    let _ = sent;
}

#[test]
fn eight_processes_one_stalled_for_1s_no_false_positive_over_60s() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nodes = vec![spawn(dir.path(), "s0", None)];
    std::thread::sleep(Duration::from_millis(200));
    for i in 1..8 {
        let via = nodes[i / 2].addr;
        nodes.push(spawn(dir.path(), &format!("s{i}"), Some(via)));
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_until(Duration::from_secs(20), || full_mesh(&refs))
        .unwrap_or_else(|| panic!("8 nodes form no full mesh\n{}", dump(dir.path())));
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    // Freeze one node's whole process (its event loop included) for 1 s.
    let pid = nodes[3].child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill -STOP").success());
    std::thread::sleep(Duration::from_secs(1));
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill -CONT").success());
    while start.elapsed() < Duration::from_secs(60) {
        for n in &nodes {
            let f = failed(n);
            assert!(
                f.is_empty(),
                "false positive at {} after {:?}: {f:?}\n{}",
                n.addr,
                start.elapsed(),
                dump(dir.path())
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(full_mesh(&refs), "membership changed during the run");
}
