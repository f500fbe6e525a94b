//! Thin tokio shell around the sans-IO [`Core`]: one UDP socket, real time, a tick timer, a
//! command channel for the application and an event channel back to it.
//!
//! Datagrams go through a [`Channel`] (length framing; with a cluster secret also the MAC and
//! replay protection); malformed, oversized, unauthenticated or replayed ones are dropped,
//! counted and logged (rate-limited). The core gets each message with its datagram's source
//! address. Outgoing messages the codec refuses (over 65,507 bytes) are dropped with a warning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdtester_config::Timers;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::core::{Action, Core, CoreConfig, Event, Input, LocalEvent, Snapshot};
use crate::wire::{Channel, MAX_DATAGRAM, Message, WireError};

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

struct Shell {
    socket: UdpSocket,
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
                    Ok((n, from)) => {
                        self.traffic.received.fetch_add(1, Ordering::Relaxed);
                        match self.channel.open(&buf[..n], from, unix_ms()) {
                            Ok(env) => Input::Message { from, env },
                            Err(e) => {
                                self.traffic.refused.fetch_add(1, Ordering::Relaxed);
                                self.drops.drop(from, &e);
                                continue;
                            }
                        }
                    }
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
                    Action::Send { to, envelope } => {
                        let cmd = envelope.msg.cmd();
                        match self.channel.seal(envelope, to, unix_ms()) {
                            Ok(bytes) => match self.socket.send_to(&bytes, to).await {
                                Ok(n) => {
                                    self.traffic.sent.fetch_add(1, Ordering::Relaxed);
                                    self.traffic.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Err(e) => tracing::debug!(%to, cmd, "UDP send failed: {e}"),
                            },
                            Err(e) => tracing::warn!(%to, cmd, "not sending: {e}"),
                        }
                    }
                    Action::Event(event) => {
                        changed |= !matches!(event, Event::App { .. } | Event::CacheUpdate { .. });
                        left |= matches!(event, Event::Left);
                        // The application may not listen (membership-only use): that is fine.
                        let _ = self.events_tx.send(event);
                    }
                }
            }
            if changed {
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
            if left {
                tracing::info!("left the network");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn node(join: Option<SocketAddr>, secret: Option<&str>) -> Running {
        let cfg = ShellConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            join,
            http: None,
            timers: Timers::default(),
            secret: secret.map(String::from),
        };
        start(cfg).await.expect("start shell")
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
