//! Sans-IO protocol core: membership, failure detection and recovery election.
//!
//! [`Core::handle`] takes the current time and one [`Input`] (a decoded message, a timer tick or
//! a local request) and returns [`Action`]s (datagrams to send, [`Event`]s for the application).
//! It does no I/O and reads no clock, so the same code runs under the tokio UDP shell
//! ([`crate::udp`]) and under the deterministic simulator ([`sim`]).
//!
//! # Seam for the application layer (evaluations, task distribution, cache merge)
//!
//! The core owns membership; everything else is the application's:
//! - **Incoming application messages** — TASK_ANNOUNCE, TASK_REQUEST, TASK_SEND, TASK_CONFIRM,
//!   TASK_RESULT, PROJECT_ANNOUNCE, EVALUATION_RESPONSIBILITY_UPDATE — come out as
//!   [`Event::App`] with the sender's address (`ip`/`port` of the envelope) and id if known.
//! - **Incoming CACHE_UPDATE**: the core records the sender's `peers_ip` (for `/network`) and
//!   hands the whole message to the application as [`Event::CacheUpdate`]; the application
//!   merges `evaluations`/`projects`/`stats` (it may arrive split in several parts, each a valid
//!   partial cache: merge as a union).
//! - **Outgoing messages**: the application sends with [`LocalEvent::Send`] (unicast to an
//!   `ip:port`) or [`LocalEvent::Broadcast`] (every live peer); the core fills the envelope.
//!   [`LocalEvent::PushCache`] sends a CACHE_UPDATE now (e.g. after a result is stored).
//! - **Pushed state**: the application hands the core the values it needs and nothing else:
//!   [`LocalEvent::SetCache`] (the `evaluations`/`projects`/`stats` part of CACHE_UPDATE) and
//!   [`LocalEvent::SetActive`] (the unfinished evaluations of every responsible node, carried by
//!   the election messages). The core never calls into the application.
//! - **Membership and recovery outcomes**: [`Event::PeerUp`], [`Event::PeerDown`],
//!   [`Event::TakeOver`] (this node now owns the failed node's responsibilities: re-own its
//!   projects, requeue their unfinished modules, broadcast EVALUATION_RESPONSIBILITY_UPDATE per
//!   project with `new_node` = this node's address) and [`Event::Relinquish`] (a conflicting
//!   smaller-id owner won after a partition healed: stop re-owning, the winner's
//!   EVALUATION_RESPONSIBILITY_UPDATEs follow).
//!
//! # Membership
//! A node started without `join` mints its own id; a joiner sends CONNECT to any member (retried
//! every half heartbeat period until answered) and adopts `given_id` from CONNECT_REP, whose
//! `peers` seed its table. The contacted node reuses the id of a live peer at the same address
//! (the reference's rule) but never re-issues the id of a node it declared failed.
//! Every `heartbeat_ms` each node sends HEARTBEAT to every peer: the reference's `id` and
//! `peers` plus cdtester's extension fields (see [`crate::wire::HeartbeatData`]): gossip
//! heartbeat counters `hb`, recent failure claims `dead` and recovery owners `owners`. Only
//! [`GOSSIP_FANOUT`] random peers per period get the full tables; the others get a slim
//! heartbeat (`peers` empty, `hb` = the sender's own counter), which keeps bytes per node
//! nearly constant in the cluster size while every peer still hears every other directly. Nodes
//! named in other members' `peers` tables are *rumours*, not peers: they get a slim heartbeat
//! probe (rate-limited per address, see [`PROBE_INTERVAL_BEATS`]) and become peers when they
//! answer from that address; never when a tombstone says they failed (the reference's
//! zombie-peer flaw F13). The joiner trusts its CONNECT_REP's table (an answer from the member
//! it chose).
//!
//! # Who may say what (issue 9)
//! The sender of a message is the address the shell gives with it: the datagram's source in an
//! open network, the member's authenticated advertised address with a cluster secret (the
//! envelope's `ip`/`port` is otherwise only a claim); replies go there. An id is bound to the address it was admitted at: heartbeats,
//! leaves and refutations for it from elsewhere are refused. RECOVERY_ELECTION is heard only
//! from its candidate and never evicts a live peer; a gossiped failure claim evicts a peer only
//! if this node has not heard from it for two heartbeat periods either. Counters are saturating
//! and plausibility-checked ([`COUNTER_CLOCK_SLACK_MS`], [`CLAIM_SLACK`] for relays), and a
//! node's own heartbeat refutes a failure if it beats the largest counter *it* sent (which
//! relays and claims cannot raise). Gossip tables are read up to [`MAX_CLAIMS_PER_DATAGRAM`]
//! entries and new claims are charged to a per-sender [`CLAIM_BUDGET`]. Addresses from failure
//! claims are never probed. Refusals are counted in [`Counters::rejected`]. Every `cache_update_ms` a CACHE_UPDATE goes to every peer (also
//! needed by reference nodes, whose failure checker breaks without it).
//!
//! # Failure detection (gossip heartbeat counters + local-health guard)
//! Each node's counter starts at its wall-clock milliseconds and grows by one per heartbeat, so
//! it also grows across restarts. A node records, per peer, the largest counter seen (directly
//! or relayed in anyone's `hb`) and when it last grew ("progress"); any direct message from a
//! live peer also counts as progress. A peer without progress for `failure_timeout_ms` is
//! declared failed (a peer whose heartbeats carry no counters, i.e. a reference-implementation
//! node that heartbeats only every 3.5 s, gets [`REFERENCE_PEER_TIMEOUT`]). Because counters are relayed by every member, one lost heartbeat (or an
//! asymmetric link) never kills a node: all `n-1` relays would have to miss. Lifeguard-style
//! local health: if this node's own ticks were delayed (its event loop stalled), every peer's
//! silence timer is extended by the stall, so a stalled node does not accuse the others when it
//! wakes. Failure claims spread in `dead` (with the counter at death and the address); a node
//! with a larger counter for the accused refutes it by gossiping that counter, which re-admits
//! the node everywhere (SWIM's incarnation numbers). Tombstones are kept for
//! [`TOMBSTONE_KEEP`] and are probed every 4th heartbeat period so that healed partitions merge.
//! A graceful leave is a HEARTBEAT with `"leaving": true` (sent twice); receivers treat the
//! leaver as failed at once if it came from the leaver's own address (the reference ignores
//! the field and times out as usual).
//!
//! # Recovery election
//! Rule: the owner of a failed node F's responsibilities is **the smallest id among the live
//! members** (ids are minted from time, so the oldest survivor, as in the reference).
//! 1. A node that detects F itself (timeout or leave notice) broadcasts RECOVERY_ELECTION
//!    `{candidate_id: self, failed_node: F, extra: F's active evaluations, failed_node_addr}`.
//!    Receivers answer RECOVERY_ELECTION_REP with their own view of F's active evaluations
//!    (merged into the record); they record F as failed only if it is not a live peer in their
//!    own view (their detector, with the same timeout, decides that).
//! 2. `election_timeout_ms` after a node learned of F (time for views to settle and answers to
//!    arrive), it evaluates the rule over its live view. If it is the winner it takes over
//!    ([`Event::TakeOver`]) and claims F in the `owners` gossip (sent at once to every peer); if it initiated the election and
//!    someone else won, it sends RECOVERY_ELECTION_RESULT to the winner (so a reference node can
//!    win too).
//! 3. Owners are re-evaluated on every tick: if F's owner is itself declared failed (a failure
//!    during the election or later) the rule is applied again over the remaining live members,
//!    so concurrent and cascading failures converge to one live owner per failed node.
//! 4. Conflicting claims (only possible when views differ, e.g. across a partition) resolve to
//!    the smaller owner id: a node that sees a smaller claim for a failure it owns emits
//!    [`Event::Relinquish`].
//!
//! Views that agree (the normal case, also under message loss, because counters and claims are
//! gossiped) compute the same winner, so exactly one node takes over without any extra round.
//! During a partition each side elects its own owner (no quorum: availability over consistency);
//! after healing the claims merge to one.

pub mod sim;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cdtester_config::Timers;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::wire::{
    self, CacheContent, CacheUpdateData, ConnectData, ConnectRepData, Envelope, EvalMap, HeartbeatData,
    Message, NodeId, PeerTable, RecoveryElectionData, RecoveryElectionRepData, RecoveryElectionResultData,
};

/// How long a failed node's tombstone (and failure record) is kept, protecting against zombie
/// re-adds from stale peer tables and letting healed partitions refute.
pub const TOMBSTONE_KEEP: Duration = Duration::from_secs(300);
/// Silence after which a reference-implementation peer (no counters, heartbeats every 3.5 s)
/// is declared failed: two of its heartbeat periods plus margin, instead of `failure_timeout_ms`.
pub const REFERENCE_PEER_TIMEOUT: Duration = Duration::from_secs(8);
/// How far (in heartbeats) a failure claim's counter may exceed the counter this node knows
/// for the accused. A claimant may have seen a few more heartbeats than us; a claim far beyond
/// is forged or corrupt and would otherwise block the node's refutation for good.
pub const CLAIM_SLACK: u64 = 16;
/// Peers per heartbeat period that receive the full gossip tables (the others get a slim
/// heartbeat with only the sender's counter).
pub const GOSSIP_FANOUT: usize = 3;
/// Room left in a datagram for the envelope, seal and MAC around a CACHE_UPDATE's data.
const ENVELOPE_ROOM: usize = 640;
/// Entries of each gossip table (`peers`, `hb`, `dead`, `owners`) read from one datagram.
pub const MAX_CLAIMS_PER_DATAGRAM: usize = 64;
/// New rumoured peers and failure records one sender may cause per `failure_timeout_ms`.
pub const CLAIM_BUDGET: u32 = 128;
/// Heartbeat periods between two probes of the same unconfirmed address.
pub const PROBE_INTERVAL_BEATS: u32 = 8;
/// Probes of unconfirmed addresses per heartbeat period, in total.
pub const MAX_PROBES_PER_BEAT: usize = 8;
/// Probes per rumoured peer before the rumour is dropped (gossip may bring it back).
pub const RUMOUR_PROBES: u32 = 3;
/// Rumoured peers remembered at most.
pub const MAX_RUMOURS: usize = 256;
/// Failed nodes remembered at most (new gossip-learned ones are refused beyond).
pub const MAX_TOMBSTONES: usize = 4096;
/// A heartbeat counter starts at its node's wall-clock milliseconds and grows by one per
/// heartbeat, so it never exceeds the current time; counters further ahead of this node's
/// clock than this are forged (or the clocks are a day apart) and ignored.
pub const COUNTER_CLOCK_SLACK_MS: u64 = 86_400_000;

/// What the core is given.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A decoded message from sender `from`: the sender's identity and where replies go. The
    /// shell decides it (see [`crate::wire::Channel`]): with a cluster secret the advertised
    /// address the member's authenticated envelope names, without one the datagram's source;
    /// the core never reads the envelope's `ip`/`port` itself.
    Message { from: SocketAddr, env: Envelope },
    /// Timer tick; call every `heartbeat_ms / 5` or more often.
    Tick,
    /// A request from the local application.
    Local(LocalEvent),
}

/// Requests from the local application.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalEvent {
    /// Send an application message to one node (`ip:port`).
    Send { to: SocketAddr, msg: Message },
    /// Send an application message to every live peer.
    Broadcast(Message),
    /// Send a CACHE_UPDATE to every live peer now.
    PushCache,
    /// The `evaluations`/`projects`/`stats` part of this node's CACHE_UPDATEs from now on.
    SetCache(Box<CacheContent>),
    /// The unfinished evaluations each node (`"ip:port"`) is responsible for, as this node
    /// knows them (`{eval_id: [project_id...]}`): what elections carry for a failed node.
    SetActive(BTreeMap<String, EvalMap>),
    /// Leave the network gracefully; the core stops afterwards.
    Leave,
}

/// What the core asks its shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send { to: SocketAddr, envelope: Envelope },
    Event(Event),
}

/// Why a peer went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// Detected by this node (silence) or claimed by another member.
    Failed,
    /// It announced a graceful leave.
    Left,
}

/// Notifications for the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// This node has an id and is part of a network.
    Joined { id: NodeId },
    /// A peer became live (new, or refuted a failure claim).
    PeerUp { id: NodeId, addr: SocketAddr },
    /// A peer failed or left.
    PeerDown { id: NodeId, addr: SocketAddr, reason: DownReason },
    /// This node now owns the failed node's responsibilities. `evaluations` merges what this
    /// node and the election's participants know of its active evaluations.
    TakeOver { failed_id: NodeId, failed_addr: SocketAddr, evaluations: EvalMap },
    /// Another node with a smaller id also took over `failed_id`; it wins.
    Relinquish { failed_id: NodeId, failed_addr: SocketAddr, owner: NodeId },
    /// A message for the application.
    App { from: SocketAddr, from_id: Option<NodeId>, msg: Message },
    /// A CACHE_UPDATE (membership part already recorded by the core).
    CacheUpdate { from: SocketAddr, data: CacheUpdateData },
    /// The graceful leave was sent; the core ignores all further input.
    Left,
}

/// Static parameters of a core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node's reachable UDP address (envelope `ip`/`port`).
    pub addr: SocketAddr,
    /// A member to join through; `None` starts a new network.
    pub join: Option<SocketAddr>,
    /// This node's HTTP API address, advertised in heartbeats.
    pub http: Option<SocketAddr>,
    pub timers: Timers,
    /// Wall clock (µs since the Unix epoch) at the `start` instant given to [`Core::new`].
    pub unix_micros_at_start: u64,
    /// Seed of the id generator.
    pub seed: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    /// Largest counter known, directly or relayed.
    counter: u64,
    /// Largest counter the peer itself sent us (relays cannot raise it).
    direct: u64,
    last_progress: Instant,
    http: Option<SocketAddr>,
    /// Not (yet) seen speaking cdtester's extensions: its last heartbeat carried no counter, or
    /// it has not heartbeated since it was admitted. Timed out as a reference node.
    reference: bool,
}

#[derive(Debug, Clone)]
struct Tombstone {
    addr: SocketAddr,
    /// Largest counter known at death (ours or claimed); a relayed larger one resurrects.
    counter: u64,
    /// Largest counter the node itself sent us; its own heartbeat with a larger one refutes.
    direct: u64,
    at: Instant,
    /// This node had it as a live peer at `addr` (else it was learned from a claim, whose
    /// address is never probed).
    observed: bool,
}

/// A node named in someone's gossip that has not talked to this node yet.
#[derive(Debug, Clone)]
struct Rumour {
    addr: SocketAddr,
    probes: u32,
}

#[derive(Debug, Clone)]
struct Failure {
    addr: SocketAddr,
    at: Instant,
    owner: Option<NodeId>,
    evaluations: EvalMap,
    initiated: bool,
    result_sent: bool,
}

/// A failed node as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailureInfo {
    pub id: NodeId,
    pub addr: String,
    pub owner: Option<NodeId>,
}

/// A read-only view of the membership for status output and the HTTP API.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub id: Option<NodeId>,
    pub addr: String,
    /// Live peers: id → `"ip:port"`.
    pub peers: BTreeMap<NodeId, String>,
    /// Failed or departed nodes still remembered, with their recovery owner.
    pub failed: Vec<FailureInfo>,
    /// `/network` adjacency: `"ip:port"` → `["ip:port", ...]`.
    pub network: BTreeMap<String, Vec<String>>,
    /// Live peers' advertised HTTP API addresses: UDP `"ip:port"` → HTTP `"ip:port"`.
    pub http: BTreeMap<String, String>,
}

/// Datagram counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub sent: u64,
    pub received: u64,
    /// Messages (or gossip entries) refused: a leave, election or identity not from the node
    /// it names, implausible counters, claims over the per-sender caps.
    pub rejected: u64,
    /// Probes sent to rumoured (not yet confirmed) addresses.
    pub probes: u64,
}

/// The protocol state machine of one node.
pub struct Core {
    cfg: CoreConfig,
    /// Pushed by the application ([`LocalEvent::SetCache`], [`LocalEvent::SetActive`]).
    cache: CacheContent,
    active: BTreeMap<String, EvalMap>,
    rng: StdRng,
    start: Instant,
    id: Option<NodeId>,
    counter: u64,
    peers: BTreeMap<NodeId, Peer>,
    tombstones: BTreeMap<NodeId, Tombstone>,
    failures: BTreeMap<NodeId, Failure>,
    rumours: BTreeMap<NodeId, Rumour>,
    /// When each unconfirmed address was last probed.
    probed: BTreeMap<SocketAddr, Instant>,
    /// Per sender: start of its claim period and the claims it caused in it.
    budgets: BTreeMap<SocketAddr, (Instant, u32)>,
    /// `peers_ip` of each node's last CACHE_UPDATE, by its `"ip:port"`.
    reported: BTreeMap<String, Vec<String>>,
    last_tick: Option<Instant>,
    next_heartbeat: Instant,
    next_cache: Instant,
    next_connect: Instant,
    heartbeats_sent: u64,
    /// Send the next heartbeat with full tables to every peer (a new ownership claim).
    full_to_all: bool,
    left: bool,
    counters: Counters,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .field("addr", &self.cfg.addr)
            .field("peers", &self.peers.len())
            .finish()
    }
}

impl Core {
    /// A node at `start`. Without `cfg.join` it mints its own id and is a network of one.
    pub fn new(cfg: CoreConfig, start: Instant) -> Core {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let id = match cfg.join {
            None => Some(NodeId::mint(cfg.unix_micros_at_start, rng.random_range(10_000..=99_999))),
            Some(_) => None,
        };
        Core {
            counter: cfg.unix_micros_at_start / 1000,
            cfg,
            cache: CacheContent::default(),
            active: BTreeMap::new(),
            rng,
            start,
            id,
            peers: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            failures: BTreeMap::new(),
            rumours: BTreeMap::new(),
            probed: BTreeMap::new(),
            budgets: BTreeMap::new(),
            reported: BTreeMap::new(),
            last_tick: None,
            next_heartbeat: start,
            next_cache: start,
            next_connect: start,
            heartbeats_sent: 0,
            full_to_all: false,
            left: false,
            counters: Counters::default(),
        }
    }

    /// This node's id (none while joining).
    /// The active evaluations the node at `addr` is responsible for, as last pushed.
    fn active_of(&self, addr: &str) -> EvalMap {
        self.active.get(addr).cloned().unwrap_or_default()
    }

    pub fn id(&self) -> Option<&NodeId> {
        self.id.as_ref()
    }

    pub fn addr(&self) -> SocketAddr {
        self.cfg.addr
    }

    /// Live peers (id → address).
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, SocketAddr)> {
        self.peers.iter().map(|(id, p)| (id, p.addr))
    }

    /// The recovery owner this node knows for a failed node.
    pub fn owner_of(&self, failed: &NodeId) -> Option<&NodeId> {
        self.failures.get(failed).and_then(|f| f.owner.as_ref())
    }

    /// Failed nodes this node remembers.
    pub fn failures(&self) -> Vec<FailureInfo> {
        self.failures
            .iter()
            .map(|(id, f)| FailureInfo {
                id: id.clone(),
                addr: wire::addr_string(f.addr),
                owner: f.owner.clone(),
            })
            .collect()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// `/network`: this node's peers plus every live peer's reported `peers_ip`.
    pub fn network(&self) -> BTreeMap<String, Vec<String>> {
        let mut net = BTreeMap::new();
        net.insert(wire::addr_string(self.cfg.addr), self.peer_addrs());
        for peer in self.peers.values() {
            let key = wire::addr_string(peer.addr);
            if let Some(list) = self.reported.get(&key) {
                net.insert(key, list.clone());
            }
        }
        net
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            id: self.id.clone(),
            addr: wire::addr_string(self.cfg.addr),
            peers: self.peers.iter().map(|(id, p)| (id.clone(), wire::addr_string(p.addr))).collect(),
            failed: self.failures(),
            network: self.network(),
            http: self
                .peers
                .values()
                .filter_map(|p| p.http.map(|h| (wire::addr_string(p.addr), wire::addr_string(h))))
                .collect(),
        }
    }

    /// Process one input.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.left {
            return out;
        }
        match input {
            Input::Tick => self.on_tick(now, &mut out),
            Input::Message { from, env } => {
                self.counters.received += 1;
                self.on_message(now, from, env, &mut out);
            }
            Input::Local(ev) => self.on_local(now, ev, &mut out),
        }
        out
    }

    // ----------------------------------------------------------------------------- helpers

    fn wall_secs(&self, now: Instant) -> f64 {
        let micros =
            self.cfg.unix_micros_at_start + now.saturating_duration_since(self.start).as_micros() as u64;
        micros as f64 / 1e6
    }

    /// Wall clock in Unix milliseconds.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(self.start).as_millis();
        (self.cfg.unix_micros_at_start / 1000).saturating_add(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// A counter no honest node can have sent yet is forged.
    fn plausible(&self, now: Instant, counter: u64) -> bool {
        counter <= self.unix_ms(now).saturating_add(COUNTER_CLOCK_SLACK_MS)
    }

    fn reject(&mut self, from: SocketAddr, what: &str) {
        self.counters.rejected += 1;
        tracing::debug!(%from, "refusing {what}");
    }

    /// Charge one new claim to `from`'s budget for this period; false when it is spent.
    fn spend(&mut self, now: Instant, from: SocketAddr) -> bool {
        let period = Self::ms(self.cfg.timers.failure_timeout_ms);
        let b = self.budgets.entry(from).or_insert((now, 0));
        if now.saturating_duration_since(b.0) >= period {
            *b = (now, 0);
        }
        if b.1 >= CLAIM_BUDGET {
            return false;
        }
        b.1 += 1;
        true
    }

    /// The smallest live id this node knows (itself included): the recovery owner by the rule.
    fn winner<'a>(&'a self, me: &'a NodeId) -> &'a NodeId {
        self.peers.keys().next().filter(|p| *p < me).unwrap_or(me)
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn peer_addrs(&self) -> Vec<String> {
        self.peers.values().map(|p| wire::addr_string(p.addr)).collect()
    }

    fn send(&mut self, now: Instant, to: SocketAddr, msg: Message, out: &mut Vec<Action>) {
        let envelope = Envelope::new(self.cfg.addr, msg, self.wall_secs(now));
        self.counters.sent += 1;
        out.push(Action::Send { to, envelope });
    }

    fn broadcast(&mut self, now: Instant, msg: &Message, out: &mut Vec<Action>) {
        let targets: Vec<SocketAddr> = self.peers.values().map(|p| p.addr).collect();
        for to in targets {
            self.send(now, to, msg.clone(), out);
        }
    }

    fn peer_table(&self, except: Option<SocketAddr>) -> PeerTable {
        self.peers
            .iter()
            .filter(|(_, p)| Some(p.addr) != except)
            .map(|(id, p)| (id.clone(), (p.addr.ip().to_string(), p.addr.port())))
            .collect()
    }

    fn id_of(&self, addr: SocketAddr) -> Option<NodeId> {
        self.peers.iter().find(|(_, p)| p.addr == addr).map(|(id, _)| id.clone())
    }

    fn mint_id(&mut self, now: Instant) -> NodeId {
        let micros = (self.wall_secs(now) * 1e6) as u64;
        loop {
            let id = NodeId::mint(micros, self.rng.random_range(10_000..=99_999));
            if Some(&id) != self.id.as_ref()
                && !self.peers.contains_key(&id)
                && !self.tombstones.contains_key(&id)
                && !self.rumours.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Add (or re-admit) a live peer at an address it was heard from directly (or that our
    /// join target reported). An id stays bound to the address it was admitted at.
    fn admit(&mut self, now: Instant, id: NodeId, addr: SocketAddr, counter: u64, out: &mut Vec<Action>) {
        if Some(&id) == self.id.as_ref() || addr == self.cfg.addr || self.peers.contains_key(&id) {
            return;
        }
        self.rumours.remove(&id);
        if self.tombstones.remove(&id).is_some() {
            tracing::info!(peer = %id, %addr, "failed peer refuted its failure; re-admitted");
        } else {
            tracing::info!(peer = %id, %addr, "peer joined");
        }
        // A new member at an address that an old id used: the old one is gone.
        if let Some(old) = self.id_of(addr) {
            self.peers.remove(&old);
        }
        self.peers.insert(
            id.clone(),
            // Reference timing until the peer proves it speaks the extensions (its own counter in a
            // heartbeat): a reference node heartbeats only every 3.5 s, and a peer learned from
            // CONNECT or CONNECT_REP has not heartbeated yet.
            Peer { addr, counter, direct: counter, last_progress: now, http: None, reference: true },
        );
        out.push(Action::Event(Event::PeerUp { id, addr }));
    }

    /// Record evidence of life from the peer itself (a datagram from its address), with its own
    /// counter if it sent one.
    fn progress(&mut self, now: Instant, id: &NodeId, counter: Option<u64>) {
        let plausible = counter.is_none_or(|c| self.plausible(now, c));
        if !plausible {
            self.counters.rejected += 1;
        }
        if let Some(peer) = self.peers.get_mut(id) {
            peer.last_progress = now;
            if let Some(c) = counter.filter(|_| plausible) {
                peer.counter = peer.counter.max(c);
                peer.direct = peer.direct.max(c);
            }
        }
    }

    /// A counter for `id` relayed by another member: progress only if it grows by at most
    /// [`CLAIM_SLACK`] over what we know (a relay is at most a few heartbeats ahead of us).
    fn progress_relayed(&mut self, now: Instant, id: &NodeId, counter: u64) {
        let Some(peer) = self.peers.get_mut(id) else { return };
        if counter > peer.counter && peer.counter > 0 && counter <= peer.counter.saturating_add(CLAIM_SLACK) {
            peer.counter = counter;
            peer.last_progress = now;
        } else if counter > peer.counter.saturating_add(CLAIM_SLACK) {
            self.counters.rejected += 1;
        }
    }

    /// Mark a peer down. `initiate`: this node detected it itself and starts an election.
    fn down(&mut self, now: Instant, id: &NodeId, reason: DownReason, initiate: bool, out: &mut Vec<Action>) {
        let Some(peer) = self.peers.remove(id) else { return };
        let addr_s = wire::addr_string(peer.addr);
        self.reported.remove(&addr_s);
        self.tombstones.insert(
            id.clone(),
            Tombstone {
                addr: peer.addr,
                counter: peer.counter,
                direct: peer.direct,
                at: now,
                observed: true,
            },
        );
        tracing::warn!(peer = %id, addr = %peer.addr, ?reason, initiate, "peer down");
        out.push(Action::Event(Event::PeerDown { id: id.clone(), addr: peer.addr, reason }));
        let evaluations = self.active_of(&addr_s);
        self.failures.insert(
            id.clone(),
            Failure {
                addr: peer.addr,
                at: now,
                owner: None,
                evaluations: evaluations.clone(),
                initiated: initiate,
                result_sent: false,
            },
        );
        if initiate && let Some(me) = self.id.clone() {
            let msg = Message::RecoveryElection(RecoveryElectionData {
                candidate_id: me,
                failed_node: id.clone(),
                timestamp: self.wall_secs(now),
                extra: evaluations,
                failed_node_addr: addr_s,
            });
            self.broadcast(now, &msg, out);
        }
    }

    /// A member (`from`) claims that `id` (at `addr`) failed when its counter was `counter`.
    /// A live peer is only declared failed if the claim is plausible and this node has not
    /// heard from it for two heartbeat periods either (a claim alone never evicts a node that
    /// talks to us). Claims about unknown nodes are charged to the sender's budget, and an
    /// address where a live member (or this node) runs is never accepted for another id.
    fn learn_failure(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: &NodeId,
        addr: SocketAddr,
        counter: u64,
        out: &mut Vec<Action>,
    ) {
        if Some(id) == self.id.as_ref() {
            return;
        }
        if !self.plausible(now, counter) {
            return self.reject(from, "a failure claim with an impossible counter");
        }
        if let Some(peer) = self.peers.get(id) {
            let quiet = now.saturating_duration_since(peer.last_progress)
                >= Self::ms(self.cfg.timers.heartbeat_ms) * 2;
            if counter < peer.counter {
                // We have fresher evidence; our gossip refutes the claim.
            } else if counter > peer.counter.saturating_add(CLAIM_SLACK) {
                self.reject(from, "an implausible failure claim");
            } else if quiet {
                self.down(now, id, DownReason::Failed, false, out);
            }
            return;
        }
        if let Some(t) = self.tombstones.get_mut(id) {
            if counter <= t.counter.saturating_add(CLAIM_SLACK) {
                t.counter = t.counter.max(counter);
            }
        } else {
            if addr == self.cfg.addr || self.id_of(addr).is_some() {
                return self.reject(from, "a failure claim naming a live member's address");
            }
            if self.tombstones.len() >= MAX_TOMBSTONES || !self.spend(now, from) {
                return self.reject(from, "a failure claim over the sender's budget");
            }
            self.rumours.remove(id);
            self.tombstones
                .insert(id.clone(), Tombstone { addr, counter, direct: 0, at: now, observed: false });
        }
        if !self.failures.contains_key(id) {
            let evaluations = self.active_of(&wire::addr_string(addr));
            self.failures.insert(
                id.clone(),
                Failure { addr, at: now, owner: None, evaluations, initiated: false, result_sent: false },
            );
        }
    }

    /// A member (`from`) names `id` at `addr` in its gossip: remember it, to be probed (rate
    /// limited) until it talks to us directly. Never for a live member's address.
    fn rumour(&mut self, now: Instant, from: SocketAddr, id: &NodeId, addr: SocketAddr) {
        if Some(id) == self.id.as_ref()
            || self.peers.contains_key(id)
            || self.rumours.contains_key(id)
            || addr == self.cfg.addr
            || self.id_of(addr).is_some()
        {
            return;
        }
        if self.rumours.len() >= MAX_RUMOURS || !self.spend(now, from) {
            return self.reject(from, "a rumoured peer over the sender's budget");
        }
        self.rumours.insert(id.clone(), Rumour { addr, probes: 0 });
    }

    fn merge_evaluations(into: &mut EvalMap, from: EvalMap) {
        for (eval, projects) in from {
            let entry = into.entry(eval).or_default();
            for p in projects {
                if !entry.contains(&p) {
                    entry.push(p);
                }
            }
        }
    }

    /// A recovery owner claim from gossip: accepted only for a live owner (this node or a
    /// peer) that is no larger than the rule's winner in this node's view.
    fn claim(&mut self, failed: &NodeId, owner: NodeId, out: &mut Vec<Action>) {
        let me = self.id.clone();
        let Some(my_id) = me.as_ref() else { return };
        if (owner != *my_id && !self.peers.contains_key(&owner)) || owner > *self.winner(my_id) {
            return;
        }
        let Some(f) = self.failures.get_mut(failed) else { return };
        match &f.owner {
            Some(current) if *current <= owner => {}
            current => {
                if current.is_some() && current.as_ref() == me.as_ref() {
                    tracing::warn!(failed = %failed, %owner, "a smaller-id node also took over; relinquishing");
                    out.push(Action::Event(Event::Relinquish {
                        failed_id: failed.clone(),
                        failed_addr: f.addr,
                        owner: owner.clone(),
                    }));
                }
                f.owner = Some(owner);
            }
        }
    }

    // ------------------------------------------------------------------------------- tick

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let hb = Self::ms(self.cfg.timers.heartbeat_ms);
        if let Some(last) = self.last_tick {
            let gap = now.saturating_duration_since(last);
            if gap > hb * 2 {
                // Our own event loop stalled: do not blame the peers for the silence.
                tracing::warn!(stall_ms = gap.as_millis() as u64, "local stall; extending peer timeouts");
                for peer in self.peers.values_mut() {
                    peer.last_progress = (peer.last_progress + gap).min(now);
                }
            }
        }
        self.last_tick = Some(now);

        let Some(me) = self.id.clone() else {
            if let Some(join) = self.cfg.join
                && now >= self.next_connect
            {
                // Fast retries: peers that already admitted us time us out if we stay silent.
                self.next_connect = now + hb / 2;
                tracing::debug!(%join, "sending CONNECT");
                self.send(now, join, Message::Connect(ConnectData {}), out);
            }
            return;
        };

        // Failure detection.
        let timeout = Self::ms(self.cfg.timers.failure_timeout_ms);
        let silent: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                let limit = if p.reference { timeout.max(REFERENCE_PEER_TIMEOUT) } else { timeout };
                now.saturating_duration_since(p.last_progress) > limit
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.down(now, &id, DownReason::Failed, true, out);
        }

        if now >= self.next_heartbeat {
            self.next_heartbeat = now + hb;
            self.counter += 1;
            self.heartbeats_sent += 1;
            let full = self.heartbeat(now, &me, false);
            // Everyone gets the sender's own counter; GOSSIP_FANOUT random peers per period
            // also get the whole tables (peers, relayed counters, failure and owner claims).
            let slim = Message::Heartbeat(HeartbeatData {
                peers: PeerTable::new(),
                hb: BTreeMap::from([(me.clone(), self.counter)]),
                dead: BTreeMap::new(),
                owners: BTreeMap::new(),
                ..full.clone()
            });
            let msg = Message::Heartbeat(full);
            let targets: Vec<SocketAddr> = self.peers.values().map(|p| p.addr).collect();
            let n = targets.len();
            let mut full_to = vec![self.full_to_all || n <= GOSSIP_FANOUT; n];
            for k in rand::seq::index::sample(&mut self.rng, n, GOSSIP_FANOUT.min(n)) {
                full_to[k] = true;
            }
            for (to, full) in targets.into_iter().zip(full_to) {
                let m = if full { msg.clone() } else { slim.clone() };
                self.send(now, to, m, out);
            }
            self.full_to_all = false;
            if self.heartbeats_sent.is_multiple_of(4) {
                // Probe remembered failed nodes so that a healed partition merges: only those we
                // had as members at that address, never an address from someone's claim.
                let dead: Vec<SocketAddr> =
                    self.tombstones.values().filter(|t| t.observed).map(|t| t.addr).collect();
                for to in dead {
                    self.send(now, to, msg.clone(), out);
                }
            }
            self.probe_rumours(now, &slim, out);
        }

        if now >= self.next_cache {
            self.send_cache(now, out);
        }

        self.decide(now, &me, out);

        // Forget old tombstones, resolved failures and spent budgets.
        self.tombstones.retain(|_, t| now.saturating_duration_since(t.at) < TOMBSTONE_KEEP);
        let period = timeout;
        self.budgets.retain(|_, (start, _)| now.saturating_duration_since(*start) < period);
        let tombstones = &self.tombstones;
        self.failures.retain(|id, f| {
            now.saturating_duration_since(f.at) < TOMBSTONE_KEEP || tombstones.contains_key(id)
        });
    }

    /// Send the slim heartbeat to rumoured peers: each address at most once per
    /// [`PROBE_INTERVAL_BEATS`], at most [`MAX_PROBES_PER_BEAT`] in total, and each rumour
    /// [`RUMOUR_PROBES`] times. This bounds what gossip naming a victim's address can make
    /// this node send there. A real node answers with its own heartbeat and becomes a peer.
    fn probe_rumours(&mut self, now: Instant, slim: &Message, out: &mut Vec<Action>) {
        let interval = Self::ms(self.cfg.timers.heartbeat_ms) * PROBE_INTERVAL_BEATS;
        self.probed.retain(|_, at| now.saturating_duration_since(*at) < interval);
        let mut targets = Vec::new();
        let mut spent = Vec::new();
        for (id, r) in self.rumours.iter_mut() {
            if targets.len() >= MAX_PROBES_PER_BEAT {
                break;
            }
            if self.probed.contains_key(&r.addr) || targets.contains(&r.addr) {
                continue;
            }
            r.probes += 1;
            if r.probes >= RUMOUR_PROBES {
                spent.push(id.clone());
            }
            targets.push(r.addr);
        }
        for id in spent {
            self.rumours.remove(&id);
        }
        for to in targets {
            self.probed.insert(to, now);
            self.counters.probes += 1;
            self.send(now, to, slim.clone(), out);
        }
    }

    fn heartbeat(&self, now: Instant, me: &NodeId, leaving: bool) -> HeartbeatData {
        let gossip = Self::ms(self.cfg.timers.failure_timeout_ms) * 10;
        let mut hb: BTreeMap<NodeId, u64> =
            self.peers.iter().map(|(id, p)| (id.clone(), p.counter)).collect();
        hb.insert(me.clone(), self.counter);
        let dead = self
            .tombstones
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(t.at) < gossip)
            .map(|(id, t)| (id.clone(), (t.counter, wire::addr_string(t.addr))))
            .collect();
        let owners = self
            .failures
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.at) < gossip)
            .filter_map(|(id, f)| f.owner.clone().map(|o| (id.clone(), o)))
            .collect();
        HeartbeatData {
            id: me.clone(),
            peers: self.peer_table(None),
            hb,
            dead,
            owners,
            leaving,
            http: self.cfg.http.map(wire::addr_string),
        }
    }

    fn send_cache(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.next_cache = now + Self::ms(self.cfg.timers.cache_update_ms);
        if self.peers.is_empty() {
            return;
        }
        let data = CacheUpdateData {
            addr: wire::addr_string(self.cfg.addr),
            peers_ip: self.peer_addrs(),
            content: self.cache.clone(),
        };
        for part in wire::split_cache_update(data, wire::MAX_BODY - ENVELOPE_ROOM) {
            self.broadcast(now, &Message::CacheUpdate(part), out);
        }
    }

    /// Apply the election rule to every failure whose owner is unknown or dead.
    fn decide(&mut self, now: Instant, me: &NodeId, out: &mut Vec<Action>) {
        let settle = Self::ms(self.cfg.timers.election_timeout_ms);
        let winner = self.winner(me).clone();
        let pending: Vec<NodeId> = self
            .failures
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.at) >= settle)
            .filter(|(_, f)| match &f.owner {
                None => true,
                Some(o) => o != me && self.tombstones.contains_key(o),
            })
            .map(|(id, _)| id.clone())
            .collect();
        for failed in pending {
            let Some(addr) = self.failures.get(&failed).map(|f| f.addr) else { continue };
            if winner == *me {
                let fresh = self.active_of(&wire::addr_string(addr));
                let Some(f) = self.failures.get_mut(&failed) else { continue };
                Self::merge_evaluations(&mut f.evaluations, fresh);
                f.owner = Some(me.clone());
                tracing::info!(failed = %failed, "taking over the failed node's responsibilities");
                // Announce the claim to everyone with the next heartbeat, sent now.
                self.full_to_all = true;
                self.next_heartbeat = now;
                out.push(Action::Event(Event::TakeOver {
                    failed_id: failed.clone(),
                    failed_addr: addr,
                    evaluations: f.evaluations.clone(),
                }));
            } else {
                let Some(f) = self.failures.get_mut(&failed) else { continue };
                if f.initiated && !f.result_sent {
                    f.result_sent = true;
                    let msg = Message::RecoveryElectionResult(RecoveryElectionResultData {
                        evaluations: f.evaluations.clone(),
                        failed_node_id: failed.clone(),
                    });
                    if let Some(to) = self.peers.get(&winner).map(|p| p.addr) {
                        self.send(now, to, msg, out);
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------------------- messages

    fn on_message(&mut self, now: Instant, from: SocketAddr, env: Envelope, out: &mut Vec<Action>) {
        if from == self.cfg.addr {
            return;
        }
        let Some(me) = self.id.clone() else {
            match env.msg {
                Message::ConnectRep(rep) if Some(from) == self.cfg.join => {
                    self.on_connect_rep(now, from, rep, out)
                }
                msg => tracing::debug!(cmd = msg.cmd(), %from, "not joined yet; dropping"),
            }
            return;
        };
        let from_id = self.id_of(from);
        if let Some(id) = &from_id {
            self.progress(now, id, None);
        }
        match env.msg {
            Message::Connect(_) => self.on_connect(now, from, &me, out),
            Message::ConnectRep(_) => tracing::debug!(%from, "already joined; ignoring CONNECT_REP"),
            Message::Heartbeat(hb) => self.on_heartbeat(now, from, &me, hb, out),
            Message::CacheUpdate(data) => {
                if from_id.is_some() {
                    self.reported.insert(wire::addr_string(from), data.peers_ip.clone());
                }
                out.push(Action::Event(Event::CacheUpdate { from, data }));
            }
            Message::RecoveryElection(el) => self.on_election(now, from, from_id.as_ref(), &me, el, out),
            Message::RecoveryElectionRep(rep) => {
                if from_id.as_ref() != Some(&rep.node_id) {
                    return self.reject(from, "a RECOVERY_ELECTION_REP not from the node it names");
                }
                if let Some(f) = self.failures.get_mut(&rep.failed_node_id) {
                    Self::merge_evaluations(&mut f.evaluations, rep.evaluations);
                }
            }
            Message::RecoveryElectionResult(res) => {
                if from_id.is_none() {
                    return self.reject(from, "a RECOVERY_ELECTION_RESULT from a non-member");
                }
                // A hint that we won; the rule (re-)applied on each tick decides.
                tracing::info!(failed = %res.failed_node_id, %from, "RECOVERY_ELECTION_RESULT names this node");
                if let Some(f) = self.failures.get_mut(&res.failed_node_id) {
                    Self::merge_evaluations(&mut f.evaluations, res.evaluations);
                }
            }
            msg @ (Message::TaskAnnounce(_)
            | Message::TaskRequest(_)
            | Message::TaskSend(_)
            | Message::TaskConfirm(_)
            | Message::TaskResult(_)
            | Message::ProjectAnnounce(_)
            | Message::EvaluationResponsibilityUpdate(_)) => {
                out.push(Action::Event(Event::App { from, from_id, msg }));
            }
        }
    }

    fn on_connect(&mut self, now: Instant, from: SocketAddr, me: &NodeId, out: &mut Vec<Action>) {
        let given = match self.id_of(from) {
            Some(id) => id,
            None => self.mint_id(now),
        };
        let rep =
            ConnectRepData { peers: self.peer_table(Some(from)), id: me.clone(), given_id: given.clone() };
        self.send(now, from, Message::ConnectRep(rep), out);
        self.admit(now, given, from, 0, out);
        // Tell the newcomer about recent failures and owners at once.
        self.next_heartbeat = now;
    }

    fn on_connect_rep(&mut self, now: Instant, from: SocketAddr, rep: ConnectRepData, out: &mut Vec<Action>) {
        tracing::info!(id = %rep.given_id, via = %from, peers = rep.peers.len(), "joined the network");
        self.id = Some(rep.given_id.clone());
        out.push(Action::Event(Event::Joined { id: rep.given_id }));
        self.admit(now, rep.id, from, 0, out);
        for (id, (ip, port)) in rep.peers {
            if let Ok(ip) = ip.parse() {
                self.admit(now, id, SocketAddr::new(ip, port), 0, out);
            }
        }
        self.next_heartbeat = now;
        self.next_cache = now;
    }

    fn on_heartbeat(
        &mut self,
        now: Instant,
        from: SocketAddr,
        me: &NodeId,
        hb: HeartbeatData,
        out: &mut Vec<Action>,
    ) {
        let sender = hb.id.clone();
        if sender == *me {
            tracing::warn!(%from, "HEARTBEAT carries this node's own id; ignoring");
            return;
        }
        let own = hb.hb.get(&sender).copied();
        // An id speaks only from the address it is known at: no one else can leave, refute or
        // heartbeat for it.
        let bound = self
            .peers
            .get(&sender)
            .map(|p| p.addr)
            .or_else(|| self.tombstones.get(&sender).filter(|t| t.observed).map(|t| t.addr));
        if bound.is_some_and(|a| a != from) {
            return self.reject(from, "a HEARTBEAT for an id known at another address");
        }
        if own.is_some_and(|c| !self.plausible(now, c)) {
            return self.reject(from, "a HEARTBEAT with an impossible counter");
        }
        if hb.leaving {
            if !self.peers.contains_key(&sender) {
                return self.reject(from, "a leave notice for a node that is not a live peer");
            }
            tracing::info!(peer = %sender, "peer leaves gracefully");
            self.progress(now, &sender, own);
            self.down(now, &sender, DownReason::Left, true, out);
            return;
        }
        // The sender itself.
        if !self.peers.contains_key(&sender) {
            let refutes = match (self.tombstones.get(&sender), own) {
                (None, _) => true,
                // Only a counter beyond what the node itself sent us (relays and claims cannot
                // raise that); a tombstone learned from a claim never saw one.
                (Some(t), Some(c)) => c > t.direct || !t.observed,
                // Reference nodes have no counters: a direct heartbeat is the evidence.
                (Some(_), None) => true,
            };
            if refutes {
                self.admit(now, sender.clone(), from, own.unwrap_or(0), out);
            }
        }
        self.progress(now, &sender, own);
        if let Some(peer) = self.peers.get_mut(&sender) {
            peer.http = hb.http.as_deref().and_then(wire::parse_addr).or(peer.http);
            peer.reference = own.is_none();
        }

        if !self.peers.contains_key(&sender) {
            // Not admitted (a refuted tombstone): its gossip is not heard either.
            return;
        }
        let peer_addr = |id: &NodeId| {
            hb.peers.get(id).and_then(|(ip, port)| ip.parse().ok().map(|ip| SocketAddr::new(ip, *port)))
        };
        // Relayed counters (at most MAX_CLAIMS_PER_DATAGRAM entries of each table are read).
        for (id, c) in hb.hb.iter().take(MAX_CLAIMS_PER_DATAGRAM) {
            if id == me || *id == sender {
                continue;
            }
            if self.peers.contains_key(id) {
                self.progress_relayed(now, id, *c);
            } else if let Some(addr) = peer_addr(id)
                && self.plausible(now, *c)
                && self.tombstones.get(id).is_none_or(|t| *c > t.counter)
            {
                self.rumour(now, from, id, addr);
            }
        }
        // Reference-style peer tables (no counters): rumours of unknown nodes, never the dead.
        for id in hb.peers.keys().take(MAX_CLAIMS_PER_DATAGRAM) {
            if id == me || self.peers.contains_key(id) || self.tombstones.contains_key(id) {
                continue;
            }
            if let Some(addr) = peer_addr(id) {
                self.rumour(now, from, id, addr);
            }
        }
        // Failure claims.
        for (id, (c, addr)) in hb.dead.iter().take(MAX_CLAIMS_PER_DATAGRAM) {
            if id == me {
                tracing::warn!(by = %sender, "a peer claims this node failed; refuting with a larger counter");
                continue;
            }
            if let Some(addr) = wire::parse_addr(addr) {
                self.learn_failure(now, from, id, addr, *c, out);
            }
        }
        for (failed, owner) in hb.owners.into_iter().take(MAX_CLAIMS_PER_DATAGRAM) {
            self.claim(&failed, owner, out);
        }
    }

    /// RECOVERY_ELECTION: only from the candidate itself (the sender must be the live peer
    /// named `candidate_id`). It never evicts a node that is a live peer here: this node's own
    /// failure detector decides that (and, with its 2 s timeout, long before a reference node's
    /// 21 s). For a node already failed or unknown here it records the failure.
    fn on_election(
        &mut self,
        now: Instant,
        from: SocketAddr,
        from_id: Option<&NodeId>,
        me: &NodeId,
        el: RecoveryElectionData,
        out: &mut Vec<Action>,
    ) {
        if from_id != Some(&el.candidate_id) {
            return self.reject(from, "a RECOVERY_ELECTION not from its candidate");
        }
        if el.failed_node == *me {
            tracing::warn!(by = %el.candidate_id, "RECOVERY_ELECTION names this node as failed; our heartbeats refute it");
            return;
        }
        if self.peers.contains_key(&el.failed_node) {
            tracing::info!(failed = %el.failed_node, by = %el.candidate_id,
                "RECOVERY_ELECTION for a node that is alive here; our own detector decides");
        } else {
            let known = self.tombstones.get(&el.failed_node).map(|t| (t.addr, t.counter));
            let Some((addr, counter)) =
                known.or_else(|| wire::parse_addr(&el.failed_node_addr).map(|a| (a, 0)))
            else {
                tracing::debug!(failed = %el.failed_node, "RECOVERY_ELECTION for an unknown node without a valid address");
                return;
            };
            self.learn_failure(now, from, &el.failed_node, addr, counter, out);
            if let Some(f) = self.failures.get_mut(&el.failed_node) {
                Self::merge_evaluations(&mut f.evaluations, el.extra);
            }
        }
        let failed_addr = self.failures.get(&el.failed_node).map(|f| wire::addr_string(f.addr));
        let mine = failed_addr.map(|a| self.active_of(&a)).unwrap_or_default();
        let rep = RecoveryElectionRepData {
            failed_node_id: el.failed_node,
            evaluations: mine,
            node_id: me.clone(),
        };
        self.send(now, from, Message::RecoveryElectionRep(rep), out);
    }

    // ------------------------------------------------------------------------------- local

    fn on_local(&mut self, now: Instant, ev: LocalEvent, out: &mut Vec<Action>) {
        match ev {
            LocalEvent::Send { to, msg } => self.send(now, to, msg, out),
            LocalEvent::Broadcast(msg) => self.broadcast(now, &msg, out),
            LocalEvent::PushCache => self.send_cache(now, out),
            LocalEvent::SetCache(content) => self.cache = *content,
            LocalEvent::SetActive(active) => self.active = active,
            LocalEvent::Leave => {
                if let Some(me) = self.id.clone() {
                    self.counter += 1;
                    let msg = Message::Heartbeat(self.heartbeat(now, &me, true));
                    // Twice: a single lost datagram should not turn a leave into a timeout.
                    self.broadcast(now, &msg, out);
                    self.broadcast(now, &msg, out);
                }
                self.left = true;
                out.push(Action::Event(Event::Left));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{NodeIdData, ResponsibilityUpdateData};
    use proptest::prelude::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn core(port: u16, join: Option<u16>, start: Instant) -> Core {
        let cfg = CoreConfig {
            addr: addr(port),
            join: join.map(addr),
            http: None,
            timers: Timers::default(),
            unix_micros_at_start: 1_795_512_038_648_868,
            seed: u64::from(port),
        };
        Core::new(cfg, start)
    }

    fn env(from: u16, msg: Message) -> Input {
        Input::Message { from: addr(from), env: Envelope::new(addr(from), msg, 1.0) }
    }

    /// A reference-implementation heartbeat: no counters or other extensions.
    fn reference_hb(id: &str, peers: &[(&str, u16)]) -> Message {
        Message::Heartbeat(HeartbeatData {
            id: NodeId(id.into()),
            peers: peers.iter().map(|(i, p)| (NodeId((*i).into()), ("127.0.0.1".to_string(), *p))).collect(),
            hb: BTreeMap::new(),
            dead: BTreeMap::new(),
            owners: BTreeMap::new(),
            leaving: false,
            http: None,
        })
    }

    fn sent(actions: &[Action]) -> Vec<(SocketAddr, &Message)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, envelope } => Some((*to, &envelope.msg)),
                Action::Event(_) => None,
            })
            .collect()
    }

    fn events(actions: &[Action]) -> Vec<&Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some(e),
                Action::Send { .. } => None,
            })
            .collect()
    }

    #[test]
    fn connect_assigns_ids_like_the_reference_and_never_reuses_a_dead_one() {
        let t0 = Instant::now();
        let mut c = core(7000, None, t0);
        let me = c.id().cloned().expect("founder has an id");
        assert_eq!(me.as_str().len(), 21);
        let acts = c.handle(t0, env(7001, Message::Connect(ConnectData {})));
        let [(to, Message::ConnectRep(rep))] = sent(&acts)[..] else {
            panic!("expected one CONNECT_REP: {acts:?}")
        };
        assert_eq!(to, addr(7001));
        assert_eq!(rep.id, me);
        assert!(rep.peers.is_empty(), "the joiner is not in its own peer list");
        let given = rep.given_id.clone();
        assert_eq!(given.as_str().len(), 21);
        // A retried CONNECT from the same address gets the same id.
        let acts = c.handle(t0, env(7001, Message::Connect(ConnectData {})));
        let [(_, Message::ConnectRep(rep))] = sent(&acts)[..] else { panic!("expected CONNECT_REP") };
        assert_eq!(rep.given_id, given);
        // Silence: 7001 never heartbeated, so it may be a reference node (3.5 s beats); it is
        // declared failed after the reference timeout, not the 2 s one.
        let acts = c.handle(t0 + Duration::from_millis(7_900), Input::Tick);
        assert!(events(&acts).is_empty(), "{acts:?}");
        let later = t0 + REFERENCE_PEER_TIMEOUT + Duration::from_millis(200);
        let acts = c.handle(later, Input::Tick);
        assert!(events(&acts).iter().any(|e| matches!(e, Event::PeerDown { id, .. } if *id == given)));
        let acts = c.handle(later, env(7001, Message::Connect(ConnectData {})));
        let [(_, Message::ConnectRep(rep))] = sent(&acts)[..] else { panic!("expected CONNECT_REP") };
        assert_ne!(rep.given_id, given);
    }

    #[test]
    fn joiner_retries_connect_and_adopts_the_given_id() {
        let t0 = Instant::now();
        let mut j = core(7002, Some(7000), t0);
        assert!(j.id().is_none());
        let first = j.handle(t0, Input::Tick);
        assert!(matches!(sent(&first)[..], [(to, Message::Connect(_))] if to == addr(7000)));
        let retry = j.handle(t0 + Duration::from_millis(300), Input::Tick);
        assert!(matches!(sent(&retry)[..], [(_, Message::Connect(_))]), "CONNECT is retried");
        let rep = ConnectRepData {
            peers: [(NodeId("179551204279523187555".into()), ("127.0.0.1".to_string(), 7005))].into(),
            id: NodeId("179551203864886859797".into()),
            given_id: NodeId("179551240141346299244".into()),
        };
        let acts = j.handle(t0, env(7000, Message::ConnectRep(rep)));
        assert_eq!(j.id().map(NodeId::as_str), Some("179551240141346299244"));
        assert!(events(&acts).iter().any(|e| matches!(e, Event::Joined { .. })));
        let peers: Vec<SocketAddr> = j.peers().map(|(_, a)| a).collect();
        assert_eq!(peers.len(), 2);
        assert!(peers.contains(&addr(7000)) && peers.contains(&addr(7005)));
    }

    #[test]
    fn peers_learned_from_a_reference_join_are_not_failed_before_their_first_heartbeat() {
        // This node joins a reference node A that lists reference node B. Reference nodes beat
        // every 3.5 s and carry no counters; neither may be declared failed in between.
        let t0 = Instant::now();
        let mut j = core(7002, Some(7000), t0);
        j.handle(t0, Input::Tick);
        let rep = ConnectRepData {
            peers: [(NodeId("100000000000000000001".into()), ("127.0.0.1".to_string(), 7001))].into(),
            id: NodeId("100000000000000000000".into()),
            given_id: NodeId("100000000000000000002".into()),
        };
        j.handle(t0, env(7000, Message::ConnectRep(rep)));
        // B is a rumour until it talks: a reference node B heartbeats us after learning of us.
        let mut t = t0;
        let mut downs = Vec::new();
        for step in 1..=200 {
            t += Duration::from_millis(100);
            // First heartbeats 3.4 s after the join, then every 3.5 s (reference timing).
            if step % 35 == 34 {
                j.handle(
                    t,
                    env(7000, reference_hb("100000000000000000000", &[("100000000000000000001", 7001)])),
                );
                j.handle(
                    t,
                    env(7001, reference_hb("100000000000000000001", &[("100000000000000000000", 7000)])),
                );
            }
            for e in events(&j.handle(t, Input::Tick)) {
                if let Event::PeerDown { id, .. } = e {
                    downs.push((step, id.clone()));
                }
            }
        }
        assert!(downs.is_empty(), "healthy reference peers declared failed: {downs:?}");
        assert_eq!(j.peers().count(), 2);
        // Silence after that: both go down after the reference timeout, not the 2 s one.
        for step in 1..=100 {
            t += Duration::from_millis(100);
            for e in events(&j.handle(t, Input::Tick)) {
                if let Event::PeerDown { id, .. } = e {
                    downs.push((step, id.clone()));
                }
            }
        }
        assert_eq!(downs.len(), 2, "{downs:?}");
        assert!(downs.iter().all(|(step, _)| (50..=90).contains(step)), "{downs:?}");
    }

    #[test]
    fn reference_nodes_live_by_direct_heartbeats_and_dead_ids_do_not_come_back_as_zombies() {
        let t0 = Instant::now();
        let mut c = core(7000, None, t0);
        // Two reference nodes heartbeat directly; B lists C too.
        c.handle(t0, env(7001, reference_hb("100000000000000000001", &[])));
        c.handle(t0, env(7002, reference_hb("100000000000000000002", &[("100000000000000000003", 7003)])));
        assert_eq!(c.peers().count(), 2, "C is only a rumour until it talks to us");
        // The next heartbeat probes C's address once; C answers and becomes a peer.
        let acts = c.handle(t0, Input::Tick);
        assert_eq!(sent(&acts).iter().filter(|(to, _)| *to == addr(7003)).count(), 1, "{acts:?}");
        // C is a cdtester node (its heartbeats carry counters).
        let Message::Heartbeat(mut hc) = reference_hb("100000000000000000003", &[]) else { unreachable!() };
        hc.hb.insert(NodeId("100000000000000000003".into()), 5);
        c.handle(t0, env(7003, Message::Heartbeat(hc)));
        assert_eq!(c.peers().count(), 3);
        // A keeps heartbeating (every 3.5 s, as the reference does); B and C go silent.
        let mut t = t0;
        let mut downs = Vec::new();
        for step in 1..=90 {
            t += Duration::from_millis(100);
            if step % 35 == 0 {
                c.handle(t, env(7001, reference_hb("100000000000000000001", &[])));
            }
            for e in events(&c.handle(t, Input::Tick)) {
                if let Event::PeerDown { id, .. } = e {
                    downs.push((step, id.clone()));
                }
            }
        }
        // C never heartbeat again: the normal timeout. B is a reference node: the longer one.
        assert_eq!(downs.len(), 2, "{downs:?}");
        assert_eq!(downs[0].1.as_str(), "100000000000000000003");
        assert!(downs[0].0 <= 25);
        assert_eq!(downs[1].1.as_str(), "100000000000000000002");
        assert!((80..=90).contains(&downs[1].0));
        // F13: A still lists C in its (stale) table; C must not be re-added.
        c.handle(t, env(7001, reference_hb("100000000000000000001", &[("100000000000000000003", 7003)])));
        assert_eq!(c.peers().count(), 1);
        // B itself heartbeating again is evidence of life (reference nodes have no counters).
        let acts = c.handle(t, env(7002, reference_hb("100000000000000000002", &[])));
        assert!(events(&acts).iter().any(|e| matches!(e, Event::PeerUp { .. })));
        assert_eq!(c.peers().count(), 2);
    }

    #[test]
    fn counters_refute_stale_failure_claims_and_revive_falsely_accused_nodes() {
        let t0 = Instant::now();
        let quiet = t0 + Duration::from_millis(1_100);
        let mut c = core(7000, None, t0);
        let x = NodeId("100000000000000000009".into());
        let Message::Heartbeat(mut hb) = reference_hb("100000000000000000009", &[]) else { unreachable!() };
        hb.hb.insert(x.clone(), 50);
        c.handle(t0, env(7009, Message::Heartbeat(hb.clone())));
        let Message::Heartbeat(mut claim) = reference_hb("100000000000000000001", &[]) else {
            unreachable!()
        };
        claim.hb.insert(NodeId("100000000000000000001".into()), 1);
        // A claim at 50 while X still talks to us: our own evidence wins, no eviction.
        claim.dead.insert(x.clone(), (50, "127.0.0.1:7009".into()));
        c.handle(t0, env(7001, Message::Heartbeat(claim.clone())));
        assert!(c.peers().any(|(id, _)| *id == x), "a claim alone never evicts a talking node");
        // A claim at counter 40 is stale even when X is quiet: we saw 50.
        claim.dead.insert(x.clone(), (40, "127.0.0.1:7009".into()));
        c.handle(quiet, env(7001, Message::Heartbeat(claim.clone())));
        assert!(c.peers().any(|(id, _)| *id == x));
        // A claim at 50 about a quiet X wins; a replayed old heartbeat does not revive; 51 does.
        claim.dead.insert(x.clone(), (50, "127.0.0.1:7009".into()));
        c.handle(quiet, env(7001, Message::Heartbeat(claim)));
        assert!(!c.peers().any(|(id, _)| *id == x));
        c.handle(quiet, env(7009, Message::Heartbeat(hb.clone())));
        assert!(!c.peers().any(|(id, _)| *id == x), "a replayed heartbeat must not revive");
        hb.hb.insert(x.clone(), 51);
        c.handle(quiet, env(7009, Message::Heartbeat(hb)));
        assert!(c.peers().any(|(id, _)| *id == x));
    }

    #[test]
    fn a_forged_claim_with_a_huge_counter_neither_kills_nor_blocks_a_node() {
        let t0 = Instant::now();
        let quiet = t0 + Duration::from_millis(1_100);
        let mut c = core(7000, None, t0);
        let x = NodeId("100000000000000000009".into());
        let Message::Heartbeat(mut hb) = reference_hb("100000000000000000009", &[]) else { unreachable!() };
        hb.hb.insert(x.clone(), 50);
        c.handle(t0, env(7009, Message::Heartbeat(hb.clone())));
        let Message::Heartbeat(mut forged) = reference_hb("100000000000000000001", &[]) else {
            unreachable!()
        };
        forged.dead.insert(x.clone(), (u64::MAX, "127.0.0.1:7009".into()));
        c.handle(quiet, env(7001, Message::Heartbeat(forged.clone())));
        assert!(c.peers().any(|(id, _)| *id == x), "implausible claim ignored");
        // Relayed and direct u64::MAX counters are refused too (no overflow, no poisoning).
        let mut relay = forged.clone();
        relay.dead.clear();
        relay.hb.insert(x.clone(), u64::MAX);
        c.handle(quiet, env(7001, Message::Heartbeat(relay)));
        let mut direct = hb.clone();
        direct.hb.insert(x.clone(), u64::MAX);
        direct.leaving = true;
        c.handle(quiet, env(7009, Message::Heartbeat(direct)));
        assert!(c.peers().any(|(id, _)| *id == x), "a leave with an impossible counter is refused");
        // Once X is really down (quiet again), a forged claim cannot keep it from coming back.
        let quiet = quiet + Duration::from_millis(1_100);
        forged.dead.insert(x.clone(), (50, "127.0.0.1:7009".into()));
        c.handle(quiet, env(7001, Message::Heartbeat(forged.clone())));
        assert!(!c.peers().any(|(id, _)| *id == x));
        forged.dead.insert(x.clone(), (u64::MAX - 1, "127.0.0.1:7009".into()));
        c.handle(quiet, env(7001, Message::Heartbeat(forged)));
        hb.hb.insert(x.clone(), 51);
        c.handle(quiet, env(7009, Message::Heartbeat(hb)));
        assert!(c.peers().any(|(id, _)| *id == x));
        assert!(c.counters().rejected >= 3);
    }

    #[test]
    fn a_local_stall_does_not_fail_the_peers() {
        let t0 = Instant::now();
        let mut c = core(7000, None, t0);
        let Message::Heartbeat(mut hb) = reference_hb("100000000000000000001", &[]) else { unreachable!() };
        hb.hb.insert(NodeId("100000000000000000001".into()), 5);
        c.handle(t0, env(7001, Message::Heartbeat(hb)));
        c.handle(t0 + Duration::from_millis(100), Input::Tick);
        // Our loop freezes for 1.9 s: the peer's silence is our fault.
        let acts = c.handle(t0 + Duration::from_millis(2_200), Input::Tick);
        assert!(!events(&acts).iter().any(|e| matches!(e, Event::PeerDown { .. })));
        // Real silence afterwards is still detected.
        let mut t = t0 + Duration::from_millis(2_200);
        let mut down = false;
        for _ in 0..25 {
            t += Duration::from_millis(100);
            down |= events(&c.handle(t, Input::Tick)).iter().any(|e| matches!(e, Event::PeerDown { .. }));
        }
        assert!(down);
    }

    #[test]
    fn elections_answer_the_candidate_and_the_smallest_id_takes_over() {
        let t0 = Instant::now();
        let mut c = core(7000, None, t0);
        let me = c.id().cloned().expect("id");
        c.handle(t0, env(7001, reference_hb("999999999999999999991", &[])));
        c.handle(t0, env(7003, reference_hb("999999999999999999993", &[])));
        let el = RecoveryElectionData {
            candidate_id: NodeId("999999999999999999991".into()),
            failed_node: NodeId("999999999999999999992".into()),
            timestamp: 1.0,
            extra: [("e1".to_string(), vec!["p1".to_string()])].into(),
            failed_node_addr: "127.0.0.1:7002".into(),
        };
        // Not from its candidate: refused without an answer.
        let acts = c.handle(t0, env(7003, Message::RecoveryElection(el.clone())));
        assert!(sent(&acts).is_empty() && c.failures().is_empty(), "{acts:?}");
        // Naming a live peer: answered, but the peer stays (our own detector decides).
        let live = RecoveryElectionData {
            failed_node: NodeId("999999999999999999993".into()),
            failed_node_addr: "127.0.0.1:7003".into(),
            ..el.clone()
        };
        c.handle(t0, env(7001, Message::RecoveryElection(live)));
        assert_eq!(c.peers().count(), 2);
        let acts = c.handle(t0, env(7001, Message::RecoveryElection(el)));
        let reps: Vec<_> =
            sent(&acts).into_iter().filter(|(_, m)| matches!(m, Message::RecoveryElectionRep(_))).collect();
        let [(to, Message::RecoveryElectionRep(rep))] = reps[..] else {
            panic!("one REP expected: {acts:?}")
        };
        assert_eq!(to, addr(7001));
        assert_eq!(rep.node_id, me);
        assert_eq!(rep.failed_node_id.as_str(), "999999999999999999992");
        // We have the smallest id (ours starts 1795...): after the settle time we take over.
        let acts = c.handle(t0 + Duration::from_millis(600), Input::Tick);
        let takeover = events(&acts).into_iter().find_map(|e| match e {
            Event::TakeOver { failed_id, evaluations, .. } => Some((failed_id.clone(), evaluations.clone())),
            _ => None,
        });
        let (failed, evals) = takeover.expect("takeover");
        assert_eq!(failed.as_str(), "999999999999999999992");
        assert_eq!(evals.get("e1"), Some(&vec!["p1".to_string()]), "the candidate's map is kept");
        assert_eq!(c.owner_of(&failed), Some(&me));
        // An owner claim for a node that is not a live member is ignored.
        let Message::Heartbeat(mut hb) = reference_hb("999999999999999999991", &[]) else { unreachable!() };
        hb.owners.insert(failed.clone(), NodeId("1".into()));
        let acts = c.handle(t0 + Duration::from_millis(700), env(7001, Message::Heartbeat(hb)));
        assert!(!events(&acts).iter().any(|e| matches!(e, Event::Relinquish { .. })));
        // A smaller live owner's claim (after a partition) wins and we relinquish.
        let Message::Heartbeat(mut hb) = reference_hb("100000000000000000001", &[]) else { unreachable!() };
        hb.owners.insert(failed.clone(), NodeId("100000000000000000001".into()));
        let acts = c.handle(t0 + Duration::from_millis(700), env(7004, Message::Heartbeat(hb)));
        assert!(events(&acts).iter().any(|e| matches!(e, Event::Relinquish { .. })));
    }

    #[test]
    fn application_messages_pass_through_the_seam() {
        let t0 = Instant::now();
        let mut c = core(7000, None, t0);
        c.handle(t0, env(7001, reference_hb("100000000000000000001", &[])));
        let msg = Message::TaskAnnounce(NodeIdData { id: NodeId("100000000000000000001".into()) });
        let acts = c.handle(t0, env(7001, msg.clone()));
        assert!(
            matches!(events(&acts)[..], [Event::App { from, from_id: Some(_), msg: m }] if *from == addr(7001) && *m == msg)
        );
        let update = Message::EvaluationResponsibilityUpdate(ResponsibilityUpdateData {
            project_id: "p".into(),
            new_node: "127.0.0.1:7000".into(),
        });
        let acts = c.handle(t0, Input::Local(LocalEvent::Broadcast(update.clone())));
        let [Action::Send { to, envelope }] = &acts[..] else { panic!("one send: {acts:?}") };
        assert_eq!(
            (*to, &envelope.msg, envelope.ip.as_str(), envelope.port),
            (addr(7001), &update, "127.0.0.1", 7000)
        );
        // Leave: two notices, then silence.
        let acts = c.handle(t0, Input::Local(LocalEvent::Leave));
        assert_eq!(
            sent(&acts).iter().filter(|(_, m)| matches!(m, Message::Heartbeat(h) if h.leaving)).count(),
            2
        );
        assert!(c.handle(t0, Input::Tick).is_empty());
    }

    fn arb_id() -> impl Strategy<Value = NodeId> {
        prop_oneof![Just("1".to_string()), "[0-9]{21}", "[0-9a-z]{0,4}"].prop_map(NodeId)
    }

    fn arb_msg() -> impl Strategy<Value = Message> {
        let ids =
            || prop::collection::btree_map(arb_id(), (Just("127.0.0.1".to_string()), 7000u16..7010), 0..4);
        prop_oneof![
            Just(Message::Connect(ConnectData {})),
            (ids(), arb_id(), arb_id()).prop_map(|(peers, id, given_id)| Message::ConnectRep(
                ConnectRepData { peers, id, given_id }
            )),
            (
                arb_id(),
                ids(),
                prop::collection::btree_map(arb_id(), any::<u64>(), 0..4),
                prop::collection::btree_map(arb_id(), (any::<u64>(), "[0-9.:]{0,16}"), 0..3),
                prop::collection::btree_map(arb_id(), arb_id(), 0..3),
                any::<bool>()
            )
                .prop_map(|(id, peers, hb, dead, owners, leaving)| Message::Heartbeat(
                    HeartbeatData { id, peers, hb, dead, owners, leaving, http: None }
                )),
            (arb_id(), arb_id(), "[0-9.:]{0,16}").prop_map(
                |(candidate_id, failed_node, failed_node_addr)| Message::RecoveryElection(
                    RecoveryElectionData {
                        candidate_id,
                        failed_node,
                        timestamp: 0.0,
                        extra: EvalMap::new(),
                        failed_node_addr,
                    }
                )
            ),
            (arb_id(), arb_id()).prop_map(|(failed_node_id, node_id)| Message::RecoveryElectionRep(
                RecoveryElectionRepData { failed_node_id, evaluations: EvalMap::new(), node_id }
            )),
            arb_id().prop_map(|failed_node_id| Message::RecoveryElectionResult(RecoveryElectionResultData {
                evaluations: EvalMap::new(),
                failed_node_id
            })),
            arb_id().prop_map(|id| Message::TaskRequest(NodeIdData { id })),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn arbitrary_message_sequences_never_panic_the_core(
            steps in prop::collection::vec((7000u16..7010, arb_msg(), 0u64..400), 1..60),
            joining in any::<bool>(),
        ) {
            let t0 = Instant::now();
            let mut c = core(7000, joining.then_some(7001), t0);
            let mut t = t0;
            for (from, msg, dt) in steps {
                t += Duration::from_millis(dt);
                c.handle(t, env(from, msg));
                c.handle(t, Input::Tick);
            }
            let _ = c.snapshot();
        }
    }
}
