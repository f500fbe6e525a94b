//! Deterministic network simulator for [`Core`]: many nodes in one process, simulated time,
//! seeded message loss, duplication, reordering (random delays), partitions, crashes, stalls
//! and graceful leaves. Used by the simulation tests and `cdtester bench membership`.
//!
//! Time advances in steps of [`STEP_MS`]; each live, non-stalled node gets a tick every
//! [`TICK_MS`] (phase-shifted per node). Messages to a stalled node wait (like a socket buffer)
//! until it wakes; messages to a crashed node are lost.
//!
//! Datagrams travel as bytes through each node's [`Channel`] (the same encoding, MAC and
//! replay protection as the UDP shell, with [`NetConfig::codec`]'s secret), so an attacker can
//! be simulated: [`Sim::inject`] delivers raw datagrams from any address, [`Sim::record`]
//! captures what the nodes send (for replays), and datagrams to addresses where no node runs
//! are counted per address ([`Sim::stray`], e.g. an amplification victim).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cdtester_config::Timers;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Action, Core, CoreConfig, Event, Input, LocalEvent};
use crate::wire::{Channel, ChannelStats, Codec, Envelope, NodeId};

/// Simulation step.
pub const STEP_MS: u64 = 5;
/// Tick period of every node.
pub const TICK_MS: u64 = 50;

/// Network behaviour.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Delivery delay, uniform in `[min_delay_ms, max_delay_ms]` (a spread reorders).
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    pub seed: u64,
    /// Every node's codec (with or without a cluster secret).
    pub codec: Codec,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            loss: 0.0,
            duplicate: 0.0,
            min_delay_ms: 1,
            max_delay_ms: 5,
            seed: 1,
            codec: Codec::default(),
        }
    }
}

/// A datagram on its way: (deliver at, sequence, destination, source, bytes).
type InFlight = (u64, u64, usize, SocketAddr, Vec<u8>);

/// Simulated wall clock at time 0, Unix ms.
const EPOCH_MS: u64 = 1_800_000_000_000;

/// A datagram a node sent, as recorded by [`Sim::record`].
#[derive(Debug, Clone)]
pub struct Captured {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// One event a node emitted, with the simulated time (ms) it happened at.
#[derive(Debug, Clone)]
pub struct Logged {
    pub at_ms: u64,
    pub event: Event,
}

struct SimNode {
    core: Core,
    channel: Channel,
    crashed: bool,
    stalled_until: Option<u64>,
    phase: u64,
    events: Vec<Logged>,
}

/// The simulated network.
pub struct Sim {
    base: Instant,
    now_ms: u64,
    net: NetConfig,
    timers: Timers,
    rng: StdRng,
    nodes: Vec<SimNode>,
    by_addr: BTreeMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// Partition group of each node; messages cross only within a group.
    groups: Option<Vec<usize>>,
    /// Encoded size of every sent datagram, when measured ([`Sim::measure_bytes`]).
    bytes: Option<u64>,
    /// Every sent datagram, when recording ([`Sim::record`]).
    captured: Option<Vec<Captured>>,
    /// Datagrams and bytes sent to addresses where no node runs.
    strays: BTreeMap<SocketAddr, (u64, u64)>,
}

impl Sim {
    pub fn new(net: NetConfig, timers: Timers) -> Sim {
        Sim {
            base: Instant::now(),
            now_ms: 0,
            rng: StdRng::seed_from_u64(net.seed),
            net,
            timers,
            nodes: Vec::new(),
            by_addr: BTreeMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            groups: None,
            bytes: None,
            captured: None,
            strays: BTreeMap::new(),
        }
    }

    /// Start recording every datagram the nodes send.
    pub fn record(&mut self) {
        self.captured = Some(Vec::new());
    }

    /// Datagrams recorded since [`Sim::record`].
    pub fn captured(&self) -> &[Captured] {
        self.captured.as_deref().unwrap_or_default()
    }

    /// Deliver a raw datagram from `from` (any address, e.g. an attacker's) to node `to` after
    /// the minimum delay, bypassing loss and partitions.
    pub fn inject(&mut self, from: SocketAddr, to: usize, bytes: Vec<u8>) {
        self.seq += 1;
        self.queue.push(Reverse((self.now_ms + self.net.min_delay_ms, self.seq, to, from, bytes)));
    }

    /// The node at `addr`.
    pub fn node_at(&self, addr: SocketAddr) -> Option<usize> {
        self.by_addr.get(&addr).copied()
    }

    /// Datagrams and bytes the nodes sent to `addr`, where no node runs.
    pub fn stray(&self, addr: SocketAddr) -> (u64, u64) {
        self.strays.get(&addr).copied().unwrap_or_default()
    }

    /// Datagrams node `i`'s channel refused.
    pub fn channel_stats(&self, i: usize) -> ChannelStats {
        self.nodes[i].channel.stats()
    }

    /// Simulated wall clock, Unix ms.
    pub fn unix_ms(&self) -> u64 {
        EPOCH_MS + self.now_ms
    }

    /// Start adding up the encoded size of every sent datagram (costs an encode per send).
    pub fn measure_bytes(&mut self) {
        self.bytes = Some(0);
    }

    /// Bytes sent since [`Sim::measure_bytes`].
    pub fn bytes_sent(&self) -> Option<u64> {
        self.bytes
    }

    /// Address of node `i`.
    pub fn addr(i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 20_000 + i as u16))
    }

    /// Add a node, joining through node `via` (or founding a network). Returns its index.
    pub fn add_node(&mut self, via: Option<usize>) -> usize {
        let i = self.nodes.len();
        let cfg = CoreConfig {
            addr: Self::addr(i),
            join: via.map(Self::addr),
            http: None,
            timers: self.timers.clone(),
            // Ids must grow with join order, as with real clocks.
            unix_micros_at_start: (EPOCH_MS + self.now_ms) * 1000 + i as u64,
            seed: self.net.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        };
        let core = Core::new(cfg, self.instant());
        let channel = Channel::with_codec(self.net.codec.clone(), Self::addr(i), self.rng.random());
        let phase = self.rng.random_range(0..TICK_MS / STEP_MS) * STEP_MS;
        self.nodes.push(SimNode {
            core,
            channel,
            crashed: false,
            stalled_until: None,
            phase,
            events: Vec::new(),
        });
        self.by_addr.insert(Self::addr(i), i);
        i
    }

    /// Start `n` nodes: node 0 founds the network, the others join through a random earlier node.
    pub fn cluster(net: NetConfig, timers: Timers, n: usize) -> Sim {
        let mut sim = Sim::new(net, timers);
        sim.add_node(None);
        for i in 1..n {
            let via = sim.rng.random_range(0..i);
            sim.add_node(Some(via));
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn core(&self, i: usize) -> &Core {
        &self.nodes[i].core
    }

    pub fn events(&self, i: usize) -> &[Logged] {
        &self.nodes[i].events
    }

    pub fn is_crashed(&self, i: usize) -> bool {
        self.nodes[i].crashed
    }

    /// Nodes that have not crashed or left.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| !self.nodes[i].crashed).collect()
    }

    /// Kill node `i` (no goodbye).
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].crashed = true;
    }

    /// Freeze node `i`'s event loop for `ms`.
    pub fn stall(&mut self, i: usize, ms: u64) {
        self.nodes[i].stalled_until = Some(self.now_ms + ms);
    }

    /// Hand node `i`'s core a request from its application (nothing if it is down).
    pub fn local(&mut self, i: usize, event: LocalEvent) {
        if !self.nodes[i].crashed {
            self.input(i, Input::Local(event));
        }
    }

    /// Restart crashed node `i` at the same address (a new process: new id, empty state),
    /// joining through node `via`.
    pub fn restart(&mut self, i: usize, via: usize) {
        let cfg = CoreConfig {
            addr: Self::addr(i),
            join: Some(Self::addr(via)),
            http: None,
            timers: self.timers.clone(),
            unix_micros_at_start: (EPOCH_MS + self.now_ms) * 1000 + i as u64,
            seed: self.net.seed.wrapping_mul(1_000_003).wrapping_add(i as u64 + self.now_ms),
        };
        let core = Core::new(cfg, self.instant());
        let channel = Channel::with_codec(self.net.codec.clone(), Self::addr(i), self.rng.random());
        let node = &mut self.nodes[i];
        node.core = core;
        node.channel = channel;
        node.crashed = false;
        node.stalled_until = None;
        node.events.clear();
    }

    /// Graceful leave of node `i`.
    pub fn leave(&mut self, i: usize) {
        self.input(i, Input::Local(LocalEvent::Leave));
        self.nodes[i].crashed = true;
    }

    /// Split the network: `groups[i]` is node i's side.
    pub fn partition(&mut self, groups: Vec<usize>) {
        self.groups = Some(groups);
    }

    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Id of node `i` (after it joined).
    pub fn id(&self, i: usize) -> Option<NodeId> {
        self.nodes[i].core.id().cloned()
    }

    /// Total datagrams sent by all nodes.
    pub fn sent_total(&self) -> u64 {
        self.nodes.iter().map(|n| n.core.counters().sent).sum()
    }

    fn input(&mut self, i: usize, input: Input) {
        let now = self.instant();
        let actions = self.nodes[i].core.handle(now, input);
        for action in actions {
            match action {
                Action::Send { to, envelope } => self.transmit(i, to, envelope),
                Action::Event(event) => self.nodes[i].events.push(Logged { at_ms: self.now_ms, event }),
            }
        }
    }

    fn transmit(&mut self, from: usize, to: SocketAddr, env: Envelope) {
        let now = self.unix_ms();
        let Ok(bytes) = self.nodes[from].channel.seal(env, to, now) else { return };
        if let Some(b) = &mut self.bytes {
            *b += bytes.len() as u64;
        }
        let src = Self::addr(from);
        if let Some(c) = &mut self.captured {
            c.push(Captured { from: src, to, bytes: bytes.clone() });
        }
        let Some(&dest) = self.by_addr.get(&to) else {
            let s = self.strays.entry(to).or_default();
            s.0 += 1;
            s.1 += bytes.len() as u64;
            return;
        };
        if let Some(groups) = &self.groups
            && groups.get(from) != groups.get(dest)
        {
            return;
        }
        if self.rng.random_bool(self.net.loss) {
            return;
        }
        let copies = if self.rng.random_bool(self.net.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.random_range(self.net.min_delay_ms..=self.net.max_delay_ms);
            self.seq += 1;
            self.queue.push(Reverse((self.now_ms + delay, self.seq, dest, src, bytes.clone())));
        }
    }

    /// Advance simulated time by `ms`.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.now_ms += STEP_MS;
            let mut waiting = Vec::new();
            while let Some(Reverse((at, ..))) = self.queue.peek()
                && *at <= self.now_ms
            {
                let Some(Reverse((at, seq, dest, from, bytes))) = self.queue.pop() else { break };
                let node = &self.nodes[dest];
                if node.crashed {
                    continue;
                }
                if node.stalled_until.is_some_and(|t| t > self.now_ms) {
                    waiting.push(Reverse((at, seq, dest, from, bytes)));
                    continue;
                }
                let now = self.unix_ms();
                if let Ok((from, env)) = self.nodes[dest].channel.open(&bytes, from, now) {
                    self.input(dest, Input::Message { from, env });
                }
            }
            // Re-queue messages for stalled nodes at their wake-up time.
            for Reverse((_, seq, dest, from, bytes)) in waiting {
                let wake = self.nodes[dest].stalled_until.unwrap_or(self.now_ms);
                self.queue.push(Reverse((wake, seq, dest, from, bytes)));
            }
            for i in 0..self.nodes.len() {
                let node = &mut self.nodes[i];
                if node.crashed {
                    continue;
                }
                if let Some(until) = node.stalled_until {
                    if until > self.now_ms {
                        continue;
                    }
                    node.stalled_until = None;
                }
                if (self.now_ms + node.phase).is_multiple_of(TICK_MS) {
                    self.input(i, Input::Tick);
                }
            }
        }
    }

    /// True when every running node knows exactly the other running nodes as live peers.
    pub fn converged(&self) -> bool {
        let running = self.running();
        let ids: Vec<Option<NodeId>> = running.iter().map(|&i| self.id(i)).collect();
        if ids.iter().any(Option::is_none) {
            return false;
        }
        running.iter().all(|&i| {
            let me = self.id(i);
            let mut expected: Vec<&NodeId> =
                ids.iter().flatten().filter(|id| Some(*id) != me.as_ref()).collect();
            expected.sort();
            let mut have: Vec<&NodeId> = self.nodes[i].core.peers().map(|(id, _)| id).collect();
            have.sort();
            have == expected
        })
    }

    /// Run until [`Sim::converged`] or `limit_ms` passes; returns the time it took.
    pub fn run_until_converged(&mut self, limit_ms: u64) -> Option<u64> {
        let start = self.now_ms;
        while self.now_ms - start < limit_ms {
            self.run_for(TICK_MS);
            if self.converged() {
                return Some(self.now_ms - start);
            }
        }
        None
    }

    /// When node `observer` first reported `failed` down (ms), if it did.
    pub fn detected_at(&self, observer: usize, failed: &NodeId) -> Option<u64> {
        self.nodes[observer].events.iter().find_map(|l| match &l.event {
            Event::PeerDown { id, .. } if id == failed => Some(l.at_ms),
            _ => None,
        })
    }

    /// Net number of TakeOver minus Relinquish events for `failed` on node `i`.
    pub fn ownership(&self, i: usize, failed: &NodeId) -> i64 {
        self.nodes[i]
            .events
            .iter()
            .map(|l| match &l.event {
                Event::TakeOver { failed_id, .. } if failed_id == failed => 1,
                Event::Relinquish { failed_id, .. } if failed_id == failed => -1,
                _ => 0,
            })
            .sum()
    }
}
