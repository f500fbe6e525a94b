//! Issue 9, UDP side (H3, H4, M1, L1): real `cdtester node` processes on 127.0.0.1 attacked
//! with raw datagrams from test sockets, observed through each node's HTTP `/network`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdtester::demo::LocalCluster;
use cdtester::peer_http::client::HttpClient;
use cdtester::wire::{
    Channel, Codec, ConnectData, ConnectRepData, Envelope, HeartbeatData, Message, NodeId,
    RecoveryElectionData,
};

const SECRET: &str = "security-udp test secret";

fn cluster(n: usize, dir: &Path, secret: Option<&str>) -> LocalCluster {
    let mut env = vec![("CDT_LOG".to_string(), "info".to_string())];
    match secret {
        Some(s) => env.push(("CDT_NODE__SECRET".to_string(), s.to_string())),
        // An open network: the attacks below then reach the protocol core.
        None => env.push(("CDT_NODE__INSECURE".to_string(), "true".to_string())),
    }
    let mut c = LocalCluster::new(env!("CARGO_BIN_EXE_cdtester").into(), dir.to_path_buf(), env);
    c.start(n).expect("start nodes");
    c
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// `/network` of a node: `"ip:port"` → its peers.
fn network(rt: &tokio::runtime::Runtime, http: SocketAddr) -> BTreeMap<String, Vec<String>> {
    let c = HttpClient::new(Default::default(), None);
    rt.block_on(c.get_json(http, "/network", Duration::from_secs(2))).unwrap_or_default()
}

/// The peers a node lists for itself in `/network`.
fn peers_of(rt: &tokio::runtime::Runtime, c: &LocalCluster, i: usize) -> Vec<String> {
    let n = &c.nodes[i];
    network(rt, n.http).remove(&n.udp.to_string()).unwrap_or_default()
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn meshed(rt: &tokio::runtime::Runtime, c: &LocalCluster, n: usize) -> bool {
    (0..n).all(|i| peers_of(rt, c, i).len() == n - 1)
}

fn socket() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let a = s.local_addr().expect("addr");
    (s, a)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// An unauthenticated datagram whose envelope claims `claimed` as the sender.
fn forge(claimed: SocketAddr, msg: Message) -> Vec<u8> {
    Codec::default().encode(&Envelope::new(claimed, msg, 1.0)).expect("encodes")
}

fn heartbeat(id: &NodeId) -> HeartbeatData {
    HeartbeatData::bare(id.clone())
}

/// Receive until `limit` passes; every decodable datagram through `decode`.
fn drain(s: &UdpSocket, limit: Duration, mut each: impl FnMut(&[u8])) {
    let start = Instant::now();
    let mut buf = vec![0u8; 70_000];
    while start.elapsed() < limit {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            each(&buf[..n]);
        }
    }
}

/// Join an open network through `via` like any stranger may: CONNECT, read the CONNECT_REP.
fn join_open(s: &UdpSocket, me: SocketAddr, via: SocketAddr) -> ConnectRepData {
    s.send_to(&forge(me, Message::Connect(ConnectData {})), via).expect("send");
    let mut rep = None;
    drain(s, Duration::from_secs(1), |d| {
        if let Ok(Envelope { msg: Message::ConnectRep(r), .. }) = Codec::default().decode(d) {
            rep.get_or_insert(r);
        }
    });
    rep.expect("CONNECT_REP")
}

#[test]
fn forged_leaves_elections_and_max_counters_evict_no_one_and_panic_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let rt = rt();
    let mut c = cluster(3, dir.path(), None);
    assert!(wait_until(Duration::from_secs(30), || meshed(&rt, &c, 3)).is_some(), "mesh");
    let victim_addr = c.nodes[2].udp;
    let (s, me) = socket();
    // The attacker learns every id by joining.
    let rep = join_open(&s, me, c.nodes[0].udp);
    let my_id = rep.given_id.clone();
    let victim = rep
        .peers
        .iter()
        .find(|(_, (_, port))| *port == victim_addr.port())
        .map(|(id, _)| id.clone())
        .expect("the victim's id is in CONNECT_REP");
    let targets = [c.nodes[0].udp, c.nodes[1].udp];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let mut leave = heartbeat(&victim);
        leave.leaving = true;
        leave.hb.insert(victim.clone(), u64::MAX);
        let mut gossip = heartbeat(&my_id);
        gossip.hb.insert(my_id.clone(), unix_ms());
        gossip.hb.insert(victim.clone(), u64::MAX);
        gossip.dead.insert(victim.clone(), (u64::MAX, victim_addr.to_string()));
        let mut plausible = heartbeat(&my_id);
        plausible.dead.insert(victim.clone(), (unix_ms(), victim_addr.to_string()));
        let mut datagrams = vec![
            forge(me, Message::Heartbeat(leave.clone())),
            // The same leave claiming to come from the victim's own address.
            forge(victim_addr, Message::Heartbeat(leave)),
            forge(me, Message::Heartbeat(gossip)),
            forge(me, Message::Heartbeat(plausible)),
        ];
        for candidate in [&victim, &my_id] {
            datagrams.push(forge(
                me,
                Message::RecoveryElection(RecoveryElectionData {
                    candidate_id: candidate.clone(),
                    failed_node: victim.clone(),
                    timestamp: 1.0,
                    extra: Default::default(),
                    failed_node_addr: victim_addr.to_string(),
                }),
            ));
        }
        for t in targets {
            for d in &datagrams {
                s.send_to(d, t).expect("send");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        assert!(c.nodes[i].is_running(), "node {i} died (panic?); see {}", c.nodes[i].log.display());
    }
    for i in [0, 1] {
        let peers = peers_of(&rt, &c, i);
        assert!(peers.contains(&victim_addr.to_string()), "node {i} evicted the victim: {peers:?}");
    }
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    assert!(
        !log.contains("peer down") || !log.contains(&victim_addr.to_string()),
        "victim went down:\n{log}"
    );
    // The victim can still fail and is detected as usual (no poisoned counter blocks anything).
    c.kill9(2);
    let took = wait_until(Duration::from_secs(8), || {
        [0, 1].iter().all(|&i| !peers_of(&rt, &c, i).contains(&victim_addr.to_string()))
    });
    assert!(took.is_some_and(|t| t <= Duration::from_secs(5)), "detection took {took:?}");
}

#[test]
fn a_claim_flood_naming_a_victim_port_sends_it_almost_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let rt = rt();
    let c = cluster(3, dir.path(), None);
    assert!(wait_until(Duration::from_secs(30), || meshed(&rt, &c, 3)).is_some(), "mesh");
    let (victim, victim_addr) = socket();
    let counter = std::thread::spawn(move || {
        let mut bytes = 0usize;
        drain(&victim, Duration::from_secs(8), |d| bytes += d.len());
        bytes
    });
    let (s, me) = socket();
    let my_id = join_open(&s, me, c.nodes[0].udp).given_id;
    let mut sent = 0usize;
    let start = Instant::now();
    let mut round = 0u128;
    while start.elapsed() < Duration::from_secs(6) {
        let mut hb = heartbeat(&my_id);
        hb.hb.insert(my_id.clone(), unix_ms());
        for k in 0..500u128 {
            let n = round * 1000 + k;
            hb.peers.insert(
                NodeId(format!("{}", 200_000_000_000_000_000_000 + n)),
                ("127.0.0.1".into(), victim_addr.port()),
            );
            hb.dead
                .insert(NodeId(format!("{}", 300_000_000_000_000_000_000 + n)), (1, victim_addr.to_string()));
        }
        let el = RecoveryElectionData {
            candidate_id: my_id.clone(),
            failed_node: NodeId(format!("{}", 400_000_000_000_000_000_000 + round)),
            timestamp: 1.0,
            extra: Default::default(),
            failed_node_addr: victim_addr.to_string(),
        };
        let datagrams = [forge(me, Message::Heartbeat(hb)), forge(me, Message::RecoveryElection(el))];
        for n in &c.nodes {
            for d in &datagrams {
                sent += s.send_to(d, n.udp).expect("send");
            }
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = counter.join().expect("counter thread");
    eprintln!("attacker sent {sent} bytes; the victim port received {got} bytes");
    // At most a few slim heartbeat probes per node (one per address per 4 s).
    assert!(got <= 3 * 3 * 400, "the victim received {got} bytes");
    for i in 0..3 {
        let peers = peers_of(&rt, &c, i);
        for (j, n) in c.nodes.iter().enumerate() {
            assert!(i == j || peers.contains(&n.udp.to_string()), "node {i} lost node {j}: {peers:?}");
        }
    }
}

#[test]
fn connect_replies_go_to_the_source_not_the_claimed_address() {
    let dir = tempfile::tempdir().expect("dir");
    let rt = rt();
    let c = cluster(1, dir.path(), None);
    assert!(wait_until(Duration::from_secs(30), || !network(&rt, c.nodes[0].http).is_empty()).is_some());
    let (claimed, claimed_addr) = socket();
    let (s, _) = socket();
    s.send_to(&forge(claimed_addr, Message::Connect(ConnectData {})), c.nodes[0].udp).expect("send");
    let watcher = std::thread::spawn(move || {
        let mut n = 0usize;
        drain(&claimed, Duration::from_secs(2), |d| n += d.len());
        n
    });
    let mut reps = 0;
    drain(&s, Duration::from_secs(2), |d| {
        if matches!(Codec::default().decode(d), Ok(Envelope { msg: Message::ConnectRep(_), .. })) {
            reps += 1;
        }
    });
    assert_eq!(reps, 1, "the CONNECT_REP goes to the datagram's source");
    assert_eq!(watcher.join().expect("watcher"), 0, "nothing reaches the claimed address");
}

/// A member with the secret, run by the test: a sealed channel and its own counter.
struct Member {
    s: UdpSocket,
    me: SocketAddr,
    ch: Channel,
}

impl Member {
    fn new() -> Member {
        let (s, me) = socket();
        let ch = Channel::new(Some(SECRET), me, 0xfeed).expect("channel");
        Member { s, me, ch }
    }

    fn send(&mut self, to: SocketAddr, msg: Message) -> Vec<u8> {
        let d = self.ch.seal(Envelope::new(self.me, msg, 1.0), to, unix_ms()).expect("seal");
        self.s.send_to(&d, to).expect("send");
        d
    }
}

#[test]
fn with_a_secret_replayed_heartbeats_keep_no_killed_node_alive() {
    let dir = tempfile::tempdir().expect("dir");
    let rt = rt();
    let mut c = cluster(3, dir.path(), Some(SECRET));
    assert!(wait_until(Duration::from_secs(30), || meshed(&rt, &c, 3)).is_some(), "mesh");
    let mut m = Member::new();
    m.send(c.nodes[0].udp, Message::Connect(ConnectData {}));
    let mut rep = None;
    let mut from_node2: Vec<Vec<u8>> = Vec::new();
    let node2 = c.nodes[2].udp;
    drain(&m.s.try_clone().expect("clone"), Duration::from_secs(1), |d| {
        if let Ok((_, Envelope { msg: Message::ConnectRep(r), .. })) = m.ch.open(d, c.nodes[0].udp, unix_ms())
        {
            rep.get_or_insert(r);
        }
    });
    let my_id = rep.expect("CONNECT_REP to a member with the secret").given_id;
    // Heartbeat as a member for 2 s, keeping every datagram sent, and capturing what node 2
    // sends to us.
    let mut mine: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let start = Instant::now();
    let mut buf = vec![0u8; 70_000];
    while start.elapsed() < Duration::from_secs(2) {
        for n in [c.nodes[0].udp, c.nodes[1].udp, node2] {
            let mut hb = heartbeat(&my_id);
            hb.hb.insert(my_id.clone(), unix_ms());
            mine.push((n, m.send(n, Message::Heartbeat(hb))));
        }
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            if let Ok((len, from)) = m.s.recv_from(&mut buf)
                && from == node2
            {
                from_node2.push(buf[..len].to_vec());
            }
        }
    }
    let me = m.me.to_string();
    assert!(peers_of(&rt, &c, 0).contains(&me), "the test member joined");
    assert!(!from_node2.is_empty(), "captured node 2's datagrams");
    // Node 2 is killed; an attacker takes its port and replays what node 2 sent (sealed for
    // the test member); the test member "dies" and its own datagrams are replayed too.
    c.kill9(2);
    let killed = Instant::now();
    let thief = UdpSocket::bind(node2).expect("take the killed node's port");
    let node2_s = node2.to_string();
    let mut gone = [None, None];
    while killed.elapsed() < Duration::from_secs(6) {
        for (to, d) in &mine {
            m.s.send_to(d, to).expect("replay");
        }
        for d in &from_node2 {
            for n in [c.nodes[0].udp, c.nodes[1].udp] {
                thief.send_to(d, n).expect("replay");
            }
        }
        for (i, g) in gone.iter_mut().enumerate() {
            let peers = peers_of(&rt, &c, i);
            if g.is_none() && !peers.contains(&node2_s) && !peers.contains(&me) {
                *g = Some(killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, g) in gone.iter().enumerate() {
        let t = g.unwrap_or_else(|| panic!("node {i} still lists a dead node: {:?}", peers_of(&rt, &c, i)));
        assert!(t <= Duration::from_secs(4), "node {i} took {t:?}");
    }
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    assert!(log.contains("replay") || log.contains("sealed for"), "refusals are logged:\n{log}");
}

#[test]
fn a_node_with_an_empty_secret_refuses_to_start() {
    let dir = tempfile::tempdir().expect("dir");
    let (_, udp) = socket();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdtester"))
        .args(["node", "--bind", &udp.to_string(), "--http", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CDT_NODE__SECRET", "")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cdtester node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with an empty secret: {stderr}");
    assert!(stderr.contains("secret"), "{stderr}");
}
