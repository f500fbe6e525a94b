//! Thin tokio shell around the sans-IO [`Core`]: one UDP socket, real time, a tick timer, a
//! command channel for the application and an event channel back to it.
//!
//! Datagrams go through a [`Channel`] (length framing; with a cluster secret also the MAC and
//! replay protection); malformed, oversized, unauthenticated or replayed ones are dropped,
//! counted and logged (rate-limited). The core gets each message with its sender's address:
//! with a secret the advertised address the member's envelope names, without one the
//! datagram's source. Outgoing messages the codec refuses (over 65,507 bytes) are dropped with
//! a warning.
//!
//! Behind NAT or a published port a member's datagrams arrive from another address than the
//! one it advertises. The shell remembers, per member, the source its latest authenticated
//! datagram came from and sends there (sealed for the advertised address), so replies follow
//! the path the NAT opened; members it has not heard from yet are sent to at their advertised
//! address. A mismatch is logged once per member.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdtester_config::Timers;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::core::{Action, Core, CoreConfig, Event, Input, LocalEvent, Snapshot};
use crate::wire::{Channel, Envelope, MAX_DATAGRAM, Message, WireError};

/// Errors starting the shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("binding UDP socket {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("UDP socket {addr} is bound to an unspecified IP; give a reachable address to advertise")]
    Unspecified { addr: SocketAddr },
    #[error("cluster secret: {0}")]
    Secret(#[source] WireError),
}

/// What the shell needs.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// Local UDP address to bind.
    pub bind: SocketAddr,
    /// Address peers reach this node at (envelope `ip`/`port`); default: `bind`.
    pub advertise: Option<SocketAddr>,
    /// Any member of an existing network.
    pub join: Option<SocketAddr>,
    /// HTTP API address advertised to peers.
    pub http: Option<SocketAddr>,
    pub timers: Timers,
    /// Cluster secret (authenticates every datagram when set).
    pub secret: Option<String>,
}

/// Datagram traffic of one node since it started.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    received: AtomicU64,
    refused: AtomicU64,
}

/// A copy of [`Traffic`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficCounts {
    pub sent: u64,
    pub sent_bytes: u64,
    pub received: u64,
    /// Datagrams dropped before the protocol core: malformed, unauthenticated or replayed.
    pub refused: u64,
}

impl Traffic {
    pub fn counts(&self) -> TrafficCounts {
        TrafficCounts {
            sent: self.sent.load(Ordering::Relaxed),
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Cloneable handle the application uses to talk to the running protocol.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    tx: mpsc::UnboundedSender<LocalEvent>,
    snapshot: watch::Receiver<Snapshot>,
    traffic: Arc<Traffic>,
}

impl NodeHandle {
    fn request(&self, ev: LocalEvent) {
        if self.tx.send(ev).is_err() {
            tracing::debug!("protocol loop has stopped; request dropped");
        }
    }

    /// Unicast an application message.
    pub fn send(&self, to: SocketAddr, msg: Message) {
        self.request(LocalEvent::Send { to, msg });
    }

    /// Send an application message to every live peer.
    pub fn broadcast(&self, msg: Message) {
        self.request(LocalEvent::Broadcast(msg));
    }

    /// Send a CACHE_UPDATE now.
    pub fn push_cache(&self) {
        self.request(LocalEvent::PushCache);
    }

    /// Hand the core a value it needs from the application ([`LocalEvent::SetCache`],
    /// [`LocalEvent::SetActive`]).
    pub fn push_state(&self, event: LocalEvent) {
        self.request(event);
    }

    /// Leave the network gracefully; the protocol loop ends.
    pub fn leave(&self) {
        self.request(LocalEvent::Leave);
    }

    /// Membership as the core saw it after its last change or tick.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// A live peer's advertised HTTP API address.
    pub fn peer_http(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let snap = self.snapshot.borrow();
        snap.http.get(&crate::wire::addr_string(peer)).and_then(|h| h.parse().ok())
    }

    /// Datagrams sent and received so far.
    pub fn traffic(&self) -> TrafficCounts {
        self.traffic.counts()
    }

    /// Wait until the snapshot changes (for status output).
    pub async fn changed(&mut self) -> bool {
        self.snapshot.changed().await.is_ok()
    }
}

/// A started protocol loop.
pub struct Running {
    pub handle: NodeHandle,
    /// Events for the application ([`Event::Left`] is the last one).
    pub events: mpsc::UnboundedReceiver<Event>,
    /// The loop; ends after a graceful leave.
    pub task: JoinHandle<()>,
    /// The bound local address (useful with port 0).
    pub local_addr: SocketAddr,
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn unix_ms() -> u64 {
    unix_micros() / 1000
}

/// Bind the socket and start the protocol loop.
pub async fn start(cfg: ShellConfig) -> Result<Running, ShellError> {
    let socket =
        UdpSocket::bind(cfg.bind).await.map_err(|source| ShellError::Bind { addr: cfg.bind, source })?;
    let local_addr = socket.local_addr().map_err(|source| ShellError::Bind { addr: cfg.bind, source })?;
    let advertise = cfg.advertise.unwrap_or(local_addr);
    if advertise.ip().is_unspecified() {
        return Err(ShellError::Unspecified { addr: advertise });
    }
    let tick = Duration::from_millis((cfg.timers.heartbeat_ms / 5).clamp(10, 100));
    let core_cfg = CoreConfig {
        addr: advertise,
        join: cfg.join,
        http: cfg.http,
        timers: cfg.timers.clone(),
        unix_micros_at_start: unix_micros(),
        seed: unix_micros() ^ u64::from(std::process::id()).rotate_left(32),
    };
    let channel =
        Channel::new(cfg.secret.as_deref(), advertise, rand::random::<u64>()).map_err(ShellError::Secret)?;
    let core = Core::new(core_cfg, Instant::now());
    let (tx, rx) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (snap_tx, snapshot) = watch::channel(core.snapshot());
    tracing::info!(udp = %local_addr, advertise = %advertise, join = ?cfg.join, "peer protocol started");
    let traffic = Arc::new(Traffic::default());
    let shell = Shell {
        socket,
        local: local_addr,
        paths: Paths::default(),
        channel,
        core,
        events_tx,
        snap_tx,
        drops: DropLog::default(),
        traffic: traffic.clone(),
    };
    let task = tokio::spawn(shell.run(rx, tick));
    Ok(Running { handle: NodeHandle { tx, snapshot, traffic }, events, task, local_addr })
}

/// Rate-limited log of dropped datagrams (at most one line per second).
#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    fn drop(&mut self, from: SocketAddr, why: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(%from, suppressed = self.suppressed, "dropping datagram: {why}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Members (and mismatch notes) remembered at most by [`Paths`].
const MAX_PATHS: usize = 4096;

/// Where datagrams for each member go when it sends from another address than it advertises
/// (NAT, published ports), and which mismatches were already logged.
#[derive(Debug, Default)]
struct Paths {
    /// Advertised address → source of its latest authenticated datagram, when they differ.
    via: HashMap<SocketAddr, SocketAddr>,
    /// Senders whose mismatch was logged.
    noted: HashSet<SocketAddr>,
}

impl Paths {
    /// A datagram from `source` was accepted as coming from `sender`. With a secret the sender
    /// is the member's authenticated claim and its traffic follows the source; without one the
    /// sender is the source and a different claim is only logged.
    fn heard(&mut self, sender: SocketAddr, source: SocketAddr, env: &Envelope, authenticated: bool) {
        let source = crate::wire::canonical(source);
        if authenticated {
            if sender == source {
                self.via.remove(&sender);
                return;
            }
            if self.via.len() >= MAX_PATHS && !self.via.contains_key(&sender) {
                self.via.clear();
            }
            if self.via.insert(sender, source) != Some(source) && self.note(sender) {
                tracing::info!(member = %sender, %source,
                    "member sends from another address than it advertises (NAT or a published port); \
                     replying to that source");
            }
        } else if let Some(claimed) = env.sender().map(crate::wire::canonical)
            && claimed != source
            && self.note(source)
        {
            tracing::warn!(%source, %claimed,
                "datagram claims another sender than its source; an open network (no cluster secret) \
                 knows a node by its source address, so NAT and port mapping need a secret");
        }
    }

    /// True the first time `addr` is noted.
    fn note(&mut self, addr: SocketAddr) -> bool {
        if self.noted.len() >= MAX_PATHS {
            self.noted.clear();
        }
        self.noted.insert(addr)
    }

    /// The address to send a datagram for `to` to.
    fn via(&self, to: SocketAddr) -> SocketAddr {
        self.via.get(&to).copied().unwrap_or(to)
    }
}

/// `to` in the address family of a socket bound to `local` (an IPv4 peer from a dual-stack
/// `[::]` socket is `::ffff:a.b.c.d`).
fn for_socket(local: SocketAddr, to: SocketAddr) -> SocketAddr {
    match (local, to) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => to,
    }
}

struct Shell {
    socket: UdpSocket,
    local: SocketAddr,
    paths: Paths,
    channel: Channel,
    core: Core,
    events_tx: mpsc::UnboundedSender<Event>,
    snap_tx: watch::Sender<Snapshot>,
    drops: DropLog,
    traffic: Arc<Traffic>,
}

impl Shell {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<LocalEvent>, tick: Duration) {
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // One byte more than the largest valid datagram, to notice oversized ones.
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut app_open = true;
        loop {
            let input = tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => match self.open(&buf[..n], from) {
                        Some(input) => input,
                        None => continue,
                    },
                    Err(e) => {
                        // e.g. ICMP port unreachable from a dead peer, reported on the next recv.
                        tracing::debug!("UDP receive error: {e}");
                        continue;
                    }
                },
                ev = rx.recv(), if app_open => match ev {
                    Some(ev) => Input::Local(ev),
                    None => {
                        app_open = false;
                        continue;
                    }
                },
                _ = timer.tick() => Input::Tick,
            };
            let is_tick = matches!(input, Input::Tick);
            let actions = self.core.handle(Instant::now(), input);
            let mut changed = is_tick;
            let mut left = false;
            for action in actions {
                match action {
                    Action::Send { to, envelope } => self.send(to, envelope).await,
                    Action::Event(event) => {
                        changed |= !matches!(event, Event::App { .. } | Event::CacheUpdate { .. });
                        left |= matches!(event, Event::Left);
                        // The application may not listen (membership-only use): that is fine.
                        let _ = self.events_tx.send(event);
                    }
                }
            }
            if changed {
                self.publish();
            }
            if left {
                tracing::info!("left the network");
                return;
            }
        }
    }

    /// The core's input for a datagram of `from`, or `None` (counted and logged) when refused.
    fn open(&mut self, datagram: &[u8], from: SocketAddr) -> Option<Input> {
        self.traffic.received.fetch_add(1, Ordering::Relaxed);
        match self.channel.open(datagram, from, unix_ms()) {
            Ok((sender, env)) => {
                let authenticated = self.channel.codec().is_authenticated();
                self.paths.heard(sender, from, &env, authenticated);
                Some(Input::Message { from: sender, env })
            }
            Err(e) => {
                self.traffic.refused.fetch_add(1, Ordering::Relaxed);
                self.drops.drop(from, &e);
                None
            }
        }
    }

    async fn send(&mut self, to: SocketAddr, envelope: Envelope) {
        let cmd = envelope.msg.cmd();
        let via = for_socket(self.local, self.paths.via(to));
        match self.channel.seal(envelope, to, unix_ms()) {
            Ok(bytes) => match self.socket.send_to(&bytes, via).await {
                Ok(n) => {
                    self.traffic.sent.fetch_add(1, Ordering::Relaxed);
                    self.traffic.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(%to, cmd, "UDP send failed: {e}"),
            },
            Err(e) => tracing::warn!(%to, cmd, "not sending: {e}"),
        }
    }

    /// Publishes the core's snapshot when it changed.
    fn publish(&self) {
        let snap = self.core.snapshot();
        self.snap_tx.send_if_modified(|old| {
            if *old == snap {
                false
            } else {
                *old = snap;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn node(join: Option<SocketAddr>, secret: Option<&str>) -> Running {
        node_at(SocketAddr::from(([127, 0, 0, 1], 0)), None, join, secret).await
    }

    async fn node_at(
        bind: SocketAddr,
        advertise: Option<SocketAddr>,
        join: Option<SocketAddr>,
        secret: Option<&str>,
    ) -> Running {
        let cfg = ShellConfig {
            bind,
            advertise,
            join,
            http: None,
            timers: Timers::default(),
            secret: secret.map(String::from),
        };
        start(cfg).await.expect("start shell")
    }

    /// A userland UDP port forward (as a published container port): datagrams to the returned
    /// address go to `target` from one upstream socket per client, and replies come back from
    /// the forward's address.
    async fn port_forward(target: SocketAddr) -> SocketAddr {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind forward"));
        let addr = front.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            while let Ok((n, client)) = front.recv_from(&mut buf).await {
                let up = match upstreams.get(&client) {
                    Some(up) => up.clone(),
                    None => {
                        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
                        let (back, front) = (up.clone(), front.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
                            while let Ok((n, _)) = back.recv_from(&mut buf).await {
                                let _ = front.send_to(&buf[..n], client).await;
                            }
                        });
                        upstreams.insert(client, up.clone());
                        up
                    }
                };
                let _ = up.send_to(&buf[..n], target).await;
            }
        });
        addr
    }

    async fn wait_for(r: &Running, what: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let snap = r.handle.snapshot();
            if what(&snap) || Instant::now() > deadline {
                return snap;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_member_reachable_only_through_its_advertised_forward_joins_and_is_known_by_it() {
        // B binds one port and advertises a forward to it; A reaches B only through the forward.
        let b_sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("reserve");
        let b_bind = b_sock.local_addr().expect("addr");
        drop(b_sock);
        let forward = port_forward(b_bind).await;
        let a = node(None, Some("s3cret")).await;
        let b = node_at(b_bind, Some(forward), Some(a.local_addr), Some("s3cret")).await;
        let a_addr = a.local_addr.to_string();
        let snap = wait_for(&a, |s| s.peers.values().any(|p| *p == forward.to_string())).await;
        assert_eq!(snap.peers.values().cloned().collect::<Vec<_>>(), vec![forward.to_string()]);
        let b_snap = wait_for(&b, |s| s.network.len() == 2).await;
        assert_eq!(b_snap.addr, forward.to_string(), "B is known by its advertised address");
        assert_eq!(b_snap.peers.values().cloned().collect::<Vec<_>>(), vec![a_addr.clone()]);
        assert_eq!(b_snap.network.keys().cloned().collect::<Vec<_>>(), {
            let mut k = vec![a_addr, forward.to_string()];
            k.sort();
            k
        });
        // It stays up: A keeps hearing B (through the forward) past the failure timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(a.handle.snapshot().peers.len(), 1, "B is still a live peer of A");
        assert!(a.handle.snapshot().failed.is_empty());
    }

    #[tokio::test]
    async fn an_open_network_knows_a_node_by_its_source_not_by_its_claim() {
        // Without a secret anyone could claim any address: the claim is not believed.
        let a = node(None, None).await;
        let victim: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let b_sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("reserve");
        let b_bind = b_sock.local_addr().expect("addr");
        drop(b_sock);
        let b = node_at(b_bind, Some(victim), Some(a.local_addr), None).await;
        let snap = wait_for(&a, |s| !s.peers.is_empty()).await;
        assert_eq!(snap.peers.values().cloned().collect::<Vec<_>>(), vec![b_bind.to_string()]);
        assert!(!snap.network.contains_key(&victim.to_string()));
        drop(b);
    }

    #[tokio::test]
    async fn ipv6_addresses_work_in_bind_join_and_tables() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("skipping: no IPv6 loopback (::1) on this machine");
            return;
        }
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
        let a = node_at(v6, None, None, Some("k")).await;
        let b = node_at(v6, None, Some(a.local_addr), Some("k")).await;
        let snap = wait_for(&a, |s| !s.peers.is_empty()).await;
        let b_addr = format!("[::1]:{}", b.local_addr.port());
        assert_eq!(snap.peers.values().cloned().collect::<Vec<_>>(), vec![b_addr.clone()]);
        let b_snap = wait_for(&b, |s| s.network.len() == 2).await;
        assert!(b_snap.network.contains_key(&b_addr), "{:?}", b_snap.network);
        assert!(b_snap.network.contains_key(&format!("[::1]:{}", a.local_addr.port())));
    }

    #[test]
    fn paths_follow_authenticated_sources_only() {
        let member: SocketAddr = "203.0.113.5:7000".parse().expect("a");
        let nat: SocketAddr = "[::ffff:198.51.100.1]:40000".parse().expect("a");
        let env = Envelope::new(member, Message::Connect(crate::wire::ConnectData {}), 1.0);
        let mut p = Paths::default();
        p.heard(member, nat, &env, true);
        assert_eq!(p.via(member), "198.51.100.1:40000".parse::<SocketAddr>().expect("a"));
        // It talks from its own address again: back to the advertised address.
        p.heard(member, member, &env, true);
        assert_eq!(p.via(member), member);
        // Without a secret a claim never redirects anything.
        p.heard(nat, nat, &env, false);
        assert_eq!(p.via(member), member);
        assert_eq!(
            for_socket("[::]:1".parse().expect("a"), member),
            "[::ffff:203.0.113.5]:7000".parse().expect("a")
        );
        assert_eq!(for_socket("0.0.0.0:1".parse().expect("a"), member), member);
    }

    fn peer_addrs(r: &Running) -> Vec<String> {
        r.handle.snapshot().peers.into_values().collect()
    }

    #[tokio::test]
    async fn a_cluster_secret_keeps_outsiders_out_and_garbage_is_dropped() {
        let a = node(None, Some("s3cret")).await;
        let b = node(Some(a.local_addr), Some("s3cret")).await;
        let wrong = node(Some(a.local_addr), Some("other")).await;
        let open = node(Some(a.local_addr), None).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while peer_addrs(&a).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Garbage of every kind at the member: too short, lying length, bad JSON, oversized.
        let junk = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let mut lying = 1000u32.to_be_bytes().to_vec();
        lying.extend_from_slice(b"{}");
        let mut bad_json = 5u32.to_be_bytes().to_vec();
        bad_json.extend_from_slice(b"{nope");
        for d in [vec![0u8], lying, bad_json, vec![b'x'; MAX_DATAGRAM]] {
            junk.send_to(&d, a.local_addr).await.expect("send junk");
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(peer_addrs(&a), vec![b.local_addr.to_string()], "only the member with the secret");
        assert_eq!(peer_addrs(&b), vec![a.local_addr.to_string()]);
        assert!(wrong.handle.snapshot().id.is_none(), "a node with another secret never joins");
        assert!(open.handle.snapshot().id.is_none(), "a node without the secret never joins");
        // Graceful leave ends the loop.
        b.handle.leave();
        tokio::time::timeout(Duration::from_secs(2), b.task).await.expect("loop ends").expect("no panic");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !peer_addrs(&a).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(peer_addrs(&a).is_empty(), "the leave was heard at once");
    }
}
