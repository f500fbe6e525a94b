//! Node-to-node wire format (SPEC.md §2, research/reference.md §2).
//!
//! One message per UDP datagram: a 4-byte big-endian length, then that many bytes of UTF-8 JSON,
//! the envelope `{"ip", "port", "cmd", "data", "timestamp"}` (keys in that order). `ip`/`port` are
//! the sender's reachable UDP address (`port` is a JSON integer) as the sender claims it; the
//! protocol core identifies senders by the datagram's *source* address and replies there (a
//! claimed address is attacker-chosen). `cmd` is the message name.
//!
//! Every message type of the reference implementation is modelled with its exact field names and
//! JSON types, including its quirks: `api_port` is a *string*, `PROJECT_ANNOUNCE.type` is an
//! integer (0 zip, 1 url) while `TASK_SEND.info.type` is a string (`"zip"`/`"url"`), node ids are
//! 21-digit decimal strings, node addresses in data are `"ip:port"` strings (UDP port).
//!
//! cdtester extensions ride in extra `data` fields that the reference ignores (it only reads the
//! keys it knows): see [`HeartbeatData`]. With a cluster secret the envelope gets two more keys:
//! `"auth"` ([`Seal`]: sender boot id, sequence number, send time in ms and destination, for
//! replay protection, see [`Channel`]) and `"mac"` (last key, HMAC-SHA256 of the body without
//! it, see [`Codec`]); members without the secret, and old nodes, are then ignored. Without a
//! secret neither key is sent, so the envelope is exactly the reference's.
//!
//! Limits: a datagram is at most [`MAX_DATAGRAM`] bytes (IPv4 UDP maximum). [`Codec::encode`]
//! refuses larger messages and [`split_cache_update`] splits a CACHE_UPDATE into several
//! datagrams whose union is the whole cache (the receiver's merge is a union, so each part is a
//! valid CACHE_UPDATE on its own, also for the reference implementation).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Largest UDP payload over IPv4 (65,535 − 8 − 20).
pub const MAX_DATAGRAM: usize = 65_507;
/// Length of the big-endian length prefix.
pub const HEADER_LEN: usize = 4;
/// Largest JSON body that fits one datagram.
pub const MAX_BODY: usize = MAX_DATAGRAM - HEADER_LEN;

/// A node id: a decimal string (the reference mints 21 digits: 16-digit microsecond time + 5
/// random digits). Ordered numerically (shorter = smaller, then lexicographic), which equals the
/// reference's string `min()` for same-length ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    /// Mint an id the way the reference does: `unix_micros` followed by five digits from `rand5`
    /// (10000..=99999).
    pub fn mint(unix_micros: u64, rand5: u32) -> NodeId {
        NodeId(format!("{unix_micros}{rand5:05}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.len().cmp(&other.0.len()).then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `"ip:port"` as used in message data, /network and /stats.
pub fn addr_string(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Parse an `"ip:port"` address string from message data (`[v6]:port` for IPv6).
pub fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok().map(canonical)
}

/// `"ip:port"` of separate `ip` and `port` fields (as a TASK_RESULT carries them): an IPv6
/// address in brackets, as [`addr_string`] spells it; fields that are no address are joined
/// as they are (and then match no node).
pub fn join_addr(ip: &str, port: &str) -> String {
    match (ip.parse::<IpAddr>(), port.parse::<u16>()) {
        (Ok(ip), Ok(port)) => addr_string(canonical(SocketAddr::new(ip, port))),
        _ => format!("{ip}:{port}"),
    }
}

/// An IPv4 address as a dual-stack (`[::]`) socket reports it (`::ffff:a.b.c.d`) is the IPv4
/// address, so that a node has one spelling in tables, `/network` and seals.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Peer table entry: `"<id>": ["ip", port]`.
pub type PeerTable = BTreeMap<NodeId, (String, u16)>;
/// `{eval_id: [project_id, ...]}` as carried by the election messages.
pub type EvalMap = BTreeMap<String, Vec<String>>;

/// The outer envelope of every message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Sender's reachable IP.
    pub ip: String,
    /// Sender's UDP port (JSON integer).
    pub port: u16,
    /// `cmd` and `data`.
    #[serde(flatten)]
    pub msg: Message,
    /// Send time, float seconds since the Unix epoch.
    pub timestamp: f64,
    /// Anti-replay header, present only on authenticated datagrams (set by [`Channel::seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Seal>,
}

/// The anti-replay header of an authenticated datagram (envelope key `"auth"`, covered by the
/// MAC). The receiver keeps, per source address, the sender's boot id and a window of the
/// sequence numbers it accepted; see [`Channel::open`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Random id of the sender's process start (16 hex digits).
    pub boot: String,
    /// Strictly increasing per boot, over all datagrams the sender sends.
    pub seq: u64,
    /// Send time, milliseconds since the Unix epoch.
    pub ms: u64,
    /// The destination `"ip:port"` the datagram was sealed for.
    pub to: String,
}

impl Envelope {
    /// An unsealed envelope.
    pub fn new(from: SocketAddr, msg: Message, timestamp: f64) -> Envelope {
        Envelope { ip: from.ip().to_string(), port: from.port(), msg, timestamp, auth: None }
    }

    /// The sender's address from `ip`/`port`; `None` when `ip` is not an IP address.
    pub fn sender(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.ip.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

/// Every message of SPEC.md §2: `cmd` is the variant name in SCREAMING_SNAKE_CASE, `data` the
/// payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Message {
    Connect(ConnectData),
    ConnectRep(ConnectRepData),
    Heartbeat(HeartbeatData),
    CacheUpdate(CacheUpdateData),
    TaskAnnounce(NodeIdData),
    TaskRequest(NodeIdData),
    TaskSend(TaskSendData),
    TaskConfirm(TaskConfirmData),
    TaskResult(TaskResultData),
    ProjectAnnounce(ProjectAnnounceData),
    RecoveryElection(RecoveryElectionData),
    RecoveryElectionRep(RecoveryElectionRepData),
    RecoveryElectionResult(RecoveryElectionResultData),
    EvaluationResponsibilityUpdate(ResponsibilityUpdateData),
}

impl Message {
    /// The `cmd` string of this message.
    pub fn cmd(&self) -> &'static str {
        match self {
            Message::Connect(_) => "CONNECT",
            Message::ConnectRep(_) => "CONNECT_REP",
            Message::Heartbeat(_) => "HEARTBEAT",
            Message::CacheUpdate(_) => "CACHE_UPDATE",
            Message::TaskAnnounce(_) => "TASK_ANNOUNCE",
            Message::TaskRequest(_) => "TASK_REQUEST",
            Message::TaskSend(_) => "TASK_SEND",
            Message::TaskConfirm(_) => "TASK_CONFIRM",
            Message::TaskResult(_) => "TASK_RESULT",
            Message::ProjectAnnounce(_) => "PROJECT_ANNOUNCE",
            Message::RecoveryElection(_) => "RECOVERY_ELECTION",
            Message::RecoveryElectionRep(_) => "RECOVERY_ELECTION_REP",
            Message::RecoveryElectionResult(_) => "RECOVERY_ELECTION_RESULT",
            Message::EvaluationResponsibilityUpdate(_) => "EVALUATION_RESPONSIBILITY_UPDATE",
        }
    }
}

/// CONNECT: `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectData {}

/// CONNECT_REP: the responder's peer table (without the responder and the joiner), the
/// responder's id and the id given to the joiner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectRepData {
    pub peers: PeerTable,
    pub id: NodeId,
    pub given_id: NodeId,
}

/// HEARTBEAT: `{"id", "peers"}` as in the reference, plus cdtester extensions (absent when
/// empty; the reference ignores them):
/// - `hb`: gossip heartbeat counters `{id: counter}` of the sender and every peer it believes
///   alive. A counter only grows; an increase is evidence that the node is alive.
/// - `dead`: recent failure claims `{id: [counter, "ip:port"]}`: the node was declared failed
///   when its counter was at most `counter`. A later, larger counter refutes the claim.
/// - `owners`: recent recovery owners `{failed id: owner id}`.
/// - `leaving`: the sender leaves the network gracefully (sent on shutdown).
/// - `http`: the sender's HTTP API address `"ip:port"` (internal `/file`, `/task`, sync).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatData {
    pub id: NodeId,
    pub peers: PeerTable,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hb: BTreeMap<NodeId, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dead: BTreeMap<NodeId, (u64, String)>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<NodeId, NodeId>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

impl HeartbeatData {
    /// A heartbeat of `id` that says nothing else (no peers, counters or claims).
    pub fn bare(id: NodeId) -> HeartbeatData {
        HeartbeatData {
            id,
            peers: PeerTable::new(),
            hb: BTreeMap::new(),
            dead: BTreeMap::new(),
            owners: BTreeMap::new(),
            leaving: false,
            http: None,
        }
    }
}

/// CACHE_UPDATE: the sender's address and peers (membership part) and its replicated cache
/// (evaluations, projects, stats). A part may carry only some evaluations/projects/modules: the
/// receiver merges (union), see [`split_cache_update`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheUpdateData {
    pub addr: String,
    pub peers_ip: Vec<String>,
    #[serde(flatten)]
    pub content: CacheContent,
}

/// The application part of a CACHE_UPDATE.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheContent {
    pub evaluations: BTreeMap<String, EvaluationEntry>,
    pub projects: BTreeMap<String, ProjectEntry>,
    pub stats: NodeStats,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationEntry {
    pub projects: Vec<String>,
    pub start_time: f64,
    pub end_time: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectEntry {
    pub project_name: String,
    /// `"ip:port"` of the node responsible for the project.
    pub node: String,
    pub modules: BTreeMap<String, ModuleEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleEntry {
    pub passed: u64,
    pub failed: u64,
    pub time: f64,
    pub status: ModuleStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleStatus {
    Pending,
    Running,
    Finished,
}

impl ModuleStatus {
    /// The name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleStatus::Pending => "pending",
            ModuleStatus::Running => "running",
            ModuleStatus::Finished => "finished",
        }
    }
}

/// Self-reported per-node counters (`/stats` `nodes[]`), plus `submitted_evaluation`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub failed: u64,
    pub passed: u64,
    pub projects: u64,
    pub modules: u64,
    pub evaluations: Vec<String>,
    pub submitted_evaluation: Vec<String>,
}

/// TASK_ANNOUNCE and TASK_REQUEST: `{"id": "<sender id>"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeIdData {
    pub id: NodeId,
}

/// TASK_SEND: `{"id": "<owner id>", "info": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSendData {
    pub id: NodeId,
    pub info: TaskInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub project_id: String,
    pub module: String,
    pub project_name: String,
    /// The owner's HTTP port, as a string.
    pub api_port: String,
    pub eval_id: Option<String>,
    pub url: Option<String>,
    pub token: Option<String>,
    /// `"url"` or `"zip"` (a string here, an integer in PROJECT_ANNOUNCE).
    #[serde(rename = "type")]
    pub kind: TaskSourceKind,
}

/// TASK_SEND's `info.type`: the JSON strings `"zip"` / `"url"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskSourceKind {
    Zip,
    Url,
}

/// TASK_CONFIRM: `{"task_id": "<project_id>::<module>"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskConfirmData {
    pub task_id: String,
}

/// TASK_RESULT: a module's result. The reference sends this body by HTTP `POST /task` (same
/// fields); the UDP message exists in the protocol's name list and carries the same body.
/// `port` is the worker's UDP port: sent as a *string* (as the reference does), read as a string
/// or as the integer the seed protocol (§7.1.2) shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResultData {
    pub task_id: String,
    pub passed: u64,
    pub failed: u64,
    pub time: f64,
    pub project_id: String,
    pub module: String,
    pub ip: String,
    #[serde(deserialize_with = "port_text")]
    pub port: String,
}

/// A port given as a string or as an integer, kept as its decimal text.
fn port_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u16),
        Text(String),
    }
    Ok(match Port::deserialize(d)? {
        Port::Number(n) => n.to_string(),
        Port::Text(t) => t,
    })
}

/// PROJECT_ANNOUNCE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectAnnounceData {
    pub project_id: String,
    /// The announcer's HTTP port, as a string.
    pub api_port: String,
    pub project_name: String,
    pub eval_id: String,
    pub url: Option<String>,
    pub token: Option<String>,
    /// 0 = zip (fetch `GET /file/<project_id>`), 1 = url (an integer here, a string in TASK_SEND).
    #[serde(rename = "type")]
    pub kind: ProjectSourceKind,
}

/// PROJECT_ANNOUNCE's `type`: the JSON integers 0 (zip) / 1 (url).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum ProjectSourceKind {
    Zip,
    Url,
}

impl From<ProjectSourceKind> for u8 {
    fn from(k: ProjectSourceKind) -> u8 {
        match k {
            ProjectSourceKind::Zip => 0,
            ProjectSourceKind::Url => 1,
        }
    }
}

impl TryFrom<u8> for ProjectSourceKind {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            0 => Ok(ProjectSourceKind::Zip),
            1 => Ok(ProjectSourceKind::Url),
            other => Err(format!("project type must be 0 or 1, got {other}")),
        }
    }
}

/// RECOVERY_ELECTION: a node announces that `failed_node` failed and that it is a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryElectionData {
    pub candidate_id: NodeId,
    pub failed_node: NodeId,
    pub timestamp: f64,
    /// Active evaluations of the failed node known to the sender.
    pub extra: EvalMap,
    pub failed_node_addr: String,
}

/// RECOVERY_ELECTION_REP: a receiver of RECOVERY_ELECTION answers the candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryElectionRepData {
    pub failed_node_id: NodeId,
    pub evaluations: EvalMap,
    pub node_id: NodeId,
}

/// RECOVERY_ELECTION_RESULT: sent by an election's initiator to the winner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryElectionResultData {
    pub evaluations: EvalMap,
    pub failed_node_id: NodeId,
}

/// EVALUATION_RESPONSIBILITY_UPDATE: `project_id` is now owned by `new_node` (`"ip:port"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponsibilityUpdateData {
    pub project_id: String,
    pub new_node: String,
}

/// Why a datagram was rejected.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("datagram of {0} bytes is shorter than the 4-byte length header")]
    TooShort(usize),
    #[error("length header says {declared} bytes but only {available} follow")]
    Truncated { declared: usize, available: usize },
    #[error("message of {0} bytes exceeds the {MAX_DATAGRAM}-byte datagram limit")]
    TooLarge(usize),
    #[error("invalid message JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message lacks a valid cluster MAC")]
    BadMac,
    #[error("the cluster secret is empty")]
    EmptySecret,
    #[error("authenticated message lacks its anti-replay header")]
    Unsealed,
    #[error("message was sealed for {0}, not for this node")]
    Misdirected(String),
    #[error("message sent at {sent_ms} ms is outside the {REPLAY_WINDOW_MS} ms window around {now_ms} ms")]
    Expired { sent_ms: u64, now_ms: u64 },
    #[error("repeated or stale message (replay)")]
    Replay,
    #[error("authenticated message names no valid sender address ({0:?})")]
    NoSender(String),
}

type HmacSha256 = Hmac<Sha256>;

/// `,"mac":"<64 hex>"}`: the suffix a MAC adds to the JSON body.
const MAC_PREFIX: &[u8] = b",\"mac\":\"";
const MAC_HEX_LEN: usize = 64;
const MAC_SUFFIX_LEN: usize = MAC_PREFIX.len() + MAC_HEX_LEN + 2;

/// Encoder/decoder of datagrams, optionally authenticated with a cluster secret.
///
/// With a secret, the body `{...}` is sent as `{...,"mac":"<hex>"}` where `<hex>` is
/// HMAC-SHA256(secret, `{...}`); the receiver recomputes it over the body with the suffix
/// removed and drops the datagram on mismatch. Without a secret, no MAC is sent and any MAC
/// received is ignored, so old nodes interoperate. An empty secret is refused.
/// The codec is stateless; replay protection is [`Channel`]'s.
#[derive(Clone, Default)]
pub struct Codec {
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("authenticated", &self.secret.is_some()).finish()
    }
}

impl Codec {
    /// A codec for `secret` (`None`: unauthenticated). An empty secret is an error.
    pub fn new(secret: Option<&str>) -> Result<Codec, WireError> {
        match secret {
            Some("") => Err(WireError::EmptySecret),
            s => Ok(Codec { secret: s.map(|s| s.as_bytes().to_vec()) }),
        }
    }

    /// Whether datagrams are authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.secret.is_some()
    }

    fn mac(secret: &[u8], body: &[u8]) -> Result<HmacSha256, WireError> {
        // HMAC accepts keys of any length, so this does not fail in practice.
        let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| WireError::BadMac)?;
        mac.update(body);
        Ok(mac)
    }

    /// Serialize and frame one message; fails if the datagram would exceed [`MAX_DATAGRAM`].
    pub fn encode(&self, env: &Envelope) -> Result<Vec<u8>, WireError> {
        let mut body = serde_json::to_vec(env)?;
        if let Some(secret) = &self.secret {
            let tag = hex::encode(Self::mac(secret, &body)?.finalize().into_bytes());
            body.pop(); // the closing brace
            body.extend_from_slice(MAC_PREFIX);
            body.extend_from_slice(tag.as_bytes());
            body.extend_from_slice(b"\"}");
        }
        let total = HEADER_LEN + body.len();
        if total > MAX_DATAGRAM {
            return Err(WireError::TooLarge(total));
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Unframe, authenticate (with a secret) and parse one datagram. Trailing bytes after the
    /// declared length are ignored, as by the reference.
    pub fn decode(&self, datagram: &[u8]) -> Result<Envelope, WireError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(WireError::TooLarge(datagram.len()));
        }
        let Some((header, rest)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(WireError::TooShort(datagram.len()));
        };
        let declared = u32::from_be_bytes(*header) as usize;
        let Some(body) = rest.get(..declared) else {
            return Err(WireError::Truncated { declared, available: rest.len() });
        };
        match &self.secret {
            None => Ok(serde_json::from_slice(body)?),
            Some(secret) => {
                let split = body.len().checked_sub(MAC_SUFFIX_LEN).ok_or(WireError::BadMac)?;
                let (signed, suffix) = body.split_at(split);
                if !suffix.starts_with(MAC_PREFIX) || !suffix.ends_with(b"\"}") {
                    return Err(WireError::BadMac);
                }
                let hex_tag = &suffix[MAC_PREFIX.len()..MAC_PREFIX.len() + MAC_HEX_LEN];
                // Lowercase only: `hex` also accepts uppercase, which would let a flipped case
                // bit through.
                if !hex_tag.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
                    return Err(WireError::BadMac);
                }
                let tag = hex::decode(hex_tag).map_err(|_| WireError::BadMac)?;
                let mut original = Vec::with_capacity(signed.len() + 1);
                original.extend_from_slice(signed);
                original.push(b'}');
                Self::mac(secret, &original)?.verify_slice(&tag).map_err(|_| WireError::BadMac)?;
                Ok(serde_json::from_slice(&original)?)
            }
        }
    }
}

/// How far an authenticated datagram's send time may be from the receiver's clock.
pub const REPLAY_WINDOW_MS: u64 = 60_000;
/// How many sequence numbers below the highest one seen are still accepted once (reordering).
pub const SEQ_WINDOW: u64 = 1024;
const SEQ_WORDS: usize = (SEQ_WINDOW / 64) as usize;
/// Senders remembered at most (oldest forgotten first); only authenticated senders are kept.
const MAX_SENDERS: usize = 4096;

/// Sequence numbers accepted from one sender boot: the highest and a bitmap of the
/// [`SEQ_WINDOW`] below it (bit `d` = `top - d` was accepted).
#[derive(Debug, Clone)]
struct SeqWindow {
    boot: String,
    top: u64,
    bits: [u64; SEQ_WORDS],
    last_ms: u64,
}

impl SeqWindow {
    fn new(boot: String, seq: u64, ms: u64) -> SeqWindow {
        let mut bits = [0; SEQ_WORDS];
        bits[0] = 1;
        SeqWindow { boot, top: seq, bits, last_ms: ms }
    }

    /// Record `seq`; false if it was accepted before or is below the window.
    fn accept(&mut self, seq: u64) -> bool {
        if seq > self.top {
            self.shift(seq - self.top);
            self.top = seq;
            self.bits[0] |= 1;
            return true;
        }
        let d = self.top - seq;
        if d >= SEQ_WINDOW {
            return false;
        }
        let (w, b) = ((d / 64) as usize, d % 64);
        let fresh = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        fresh
    }

    fn shift(&mut self, n: u64) {
        if n >= SEQ_WINDOW {
            self.bits = [0; SEQ_WORDS];
            return;
        }
        let (ws, bs) = ((n / 64) as usize, (n % 64) as u32);
        for i in (0..SEQ_WORDS).rev() {
            let mut v = 0;
            if i >= ws {
                v = self.bits[i - ws] << bs;
                if bs > 0 && i > ws {
                    v |= self.bits[i - ws - 1] >> (64 - bs);
                }
            }
            self.bits[i] = v;
        }
    }
}

/// Datagrams a [`Channel`] refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChannelStats {
    /// Unparseable, truncated or oversized.
    pub malformed: u64,
    /// Missing or wrong MAC, or an authenticated datagram without its [`Seal`].
    pub unauthenticated: u64,
    /// Sealed for another destination.
    pub misdirected: u64,
    /// Send time outside [`REPLAY_WINDOW_MS`].
    pub expired: u64,
    /// Repeated, or stale (older sequence number or older boot).
    pub replayed: u64,
}

/// A node's datagram channel: the [`Codec`] plus, with a secret, replay protection.
///
/// [`Channel::seal`] stamps each outgoing envelope with a [`Seal`]: this process's random boot
/// id, a strictly increasing sequence number, the send time and the destination, all covered
/// by the MAC. [`Channel::open`] accepts an authenticated datagram only if it was sealed for
/// this node's address, was sent within [`REPLAY_WINDOW_MS`] of now, and its sequence number
/// was not accepted before from the sender it names (a window of [`SEQ_WINDOW`] tolerates
/// reordering). A new boot id from a sender replaces the old one only if its send time is later
/// than everything accepted from that sender, so datagrams of a previous run cannot be replayed
/// either. Without a secret datagrams pass unchanged (the reference has no such header).
///
/// The sender of an authenticated datagram is the address its envelope names (`ip`/`port`,
/// under the MAC: only a member can claim one), which may differ from the datagram's source
/// behind NAT or a published port; the replay window is kept per claimed sender, so a copy
/// sent from another source is still a replay. Without a secret the sender is the source
/// address (a claim anyone could make is not believed).
/// Sans-IO: times are passed in.
#[derive(Debug)]
pub struct Channel {
    codec: Codec,
    me: SocketAddr,
    boot: String,
    seq: u64,
    seen: std::collections::HashMap<SocketAddr, SeqWindow>,
    stats: ChannelStats,
}

impl Channel {
    /// A channel for the node at `me` (its advertised address) in process run `boot`.
    pub fn new(secret: Option<&str>, me: SocketAddr, boot: u64) -> Result<Channel, WireError> {
        Ok(Channel::with_codec(Codec::new(secret)?, me, boot))
    }

    /// A channel around an existing codec.
    pub fn with_codec(codec: Codec, me: SocketAddr, boot: u64) -> Channel {
        Channel {
            codec,
            me,
            boot: format!("{boot:016x}"),
            seq: 0,
            seen: std::collections::HashMap::new(),
            stats: ChannelStats::default(),
        }
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Refusals so far.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Seal (with a secret) and encode `env` for `to`, sent at `now_ms` (Unix ms).
    pub fn seal(&mut self, mut env: Envelope, to: SocketAddr, now_ms: u64) -> Result<Vec<u8>, WireError> {
        if self.codec.is_authenticated() {
            self.seq = self.seq.saturating_add(1);
            env.auth = Some(Seal { boot: self.boot.clone(), seq: self.seq, ms: now_ms, to: addr_string(to) });
        } else {
            env.auth = None;
        }
        self.codec.encode(&env)
    }

    /// Decode a datagram from source `from` received at `now_ms` (Unix ms); with a secret,
    /// authenticate it and refuse replays. Returns the sender (see [`Channel`]) and the
    /// envelope. Refusals are counted in [`Channel::stats`].
    pub fn open(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now_ms: u64,
    ) -> Result<(SocketAddr, Envelope), WireError> {
        let r = self.check(datagram, from, now_ms);
        if let Err(e) = &r {
            let s = &mut self.stats;
            match e {
                WireError::BadMac | WireError::Unsealed => s.unauthenticated += 1,
                WireError::Misdirected(_) => s.misdirected += 1,
                WireError::Expired { .. } => s.expired += 1,
                WireError::Replay => s.replayed += 1,
                _ => s.malformed += 1,
            }
        }
        r
    }

    fn check(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now_ms: u64,
    ) -> Result<(SocketAddr, Envelope), WireError> {
        let env = self.codec.decode(datagram)?;
        if !self.codec.is_authenticated() {
            return Ok((canonical(from), env));
        }
        let seal = env.auth.as_ref().ok_or(WireError::Unsealed)?;
        if parse_addr(&seal.to) != Some(self.me) {
            return Err(WireError::Misdirected(seal.to.clone()));
        }
        if seal.ms.abs_diff(now_ms) > REPLAY_WINDOW_MS {
            return Err(WireError::Expired { sent_ms: seal.ms, now_ms });
        }
        // The window belongs to the claimed sender (covered by the MAC), not to the datagram's
        // source: behind NAT a member's source differs from its address, and a copy replayed
        // from anywhere else meets the same window.
        let sender = env.sender().map(canonical).ok_or_else(|| WireError::NoSender(env.ip.clone()))?;
        match self.seen.get_mut(&sender) {
            Some(w) if w.boot == seal.boot => {
                if !w.accept(seal.seq) {
                    return Err(WireError::Replay);
                }
                w.last_ms = w.last_ms.max(seal.ms);
            }
            Some(w) => {
                // Another run of the sender: only if it is newer than all we accepted.
                if seal.ms <= w.last_ms {
                    return Err(WireError::Replay);
                }
                *w = SeqWindow::new(seal.boot.clone(), seal.seq, seal.ms);
            }
            None => {
                if self.seen.len() >= MAX_SENDERS
                    && let Some(oldest) = self.seen.iter().min_by_key(|(_, w)| w.last_ms).map(|(a, _)| *a)
                {
                    self.seen.remove(&oldest);
                }
                self.seen.insert(sender, SeqWindow::new(seal.boot.clone(), seal.seq, seal.ms));
            }
        }
        Ok((sender, env))
    }
}

/// Split a CACHE_UPDATE into parts whose encoded envelopes (with `overhead` extra bytes for the
/// envelope, MAC and header) each fit `max_body` bytes. Every part repeats `addr`, `peers_ip` and
/// `stats`; evaluations and projects are distributed over the parts, and a project too large
/// for one part is split by modules. The union of the parts is the input. An entry that cannot
/// fit even alone (a single module or evaluation larger than a datagram) is dropped with a
/// warning.
pub fn split_cache_update(data: CacheUpdateData, max_body: usize) -> Vec<CacheUpdateData> {
    let size = |v: &CacheUpdateData| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    if size(&data) <= max_body {
        return vec![data];
    }
    let CacheUpdateData { addr, peers_ip, content } = data;
    let CacheContent { evaluations, projects, stats } = content;
    let empty =
        CacheUpdateData { addr, peers_ip, content: CacheContent { stats, ..CacheContent::default() } };
    let base = size(&empty);
    let mut parts = Vec::new();
    let mut current = empty.clone();
    let mut used = base;
    let flush = |current: &mut CacheUpdateData, used: &mut usize, parts: &mut Vec<_>| {
        if !current.content.evaluations.is_empty() || !current.content.projects.is_empty() {
            parts.push(std::mem::replace(current, empty.clone()));
        }
        *used = base;
    };
    for (id, ev) in evaluations {
        let len = entry_len(&id, &ev);
        if base + len > max_body {
            tracing::warn!(evaluation = %id, bytes = len, "evaluation entry too large for a datagram; not replicated by UDP");
            continue;
        }
        if used + len > max_body {
            flush(&mut current, &mut used, &mut parts);
        }
        used += len;
        current.content.evaluations.insert(id, ev);
    }
    for (id, project) in projects {
        let len = entry_len(&id, &project);
        if used + len <= max_body {
            used += len;
            current.content.projects.insert(id, project);
            continue;
        }
        flush(&mut current, &mut used, &mut parts);
        if base + len <= max_body {
            used += len;
            current.content.projects.insert(id, project);
            continue;
        }
        // Split this project's modules over several parts.
        let ProjectEntry { project_name, node, modules } = project;
        let shell = ProjectEntry { project_name, node, modules: BTreeMap::new() };
        let shell_len = entry_len(&id, &shell);
        let mut piece = shell.clone();
        let mut piece_used = base + shell_len;
        for (module, entry) in modules {
            let len = entry_len(&module, &entry);
            if base + shell_len + len > max_body {
                tracing::warn!(project = %id, %module, "module entry too large for a datagram; not replicated by UDP");
                continue;
            }
            if piece_used + len > max_body {
                current.content.projects.insert(id.clone(), std::mem::replace(&mut piece, shell.clone()));
                flush(&mut current, &mut used, &mut parts);
                piece_used = base + shell_len;
            }
            piece_used += len;
            piece.modules.insert(module, entry);
        }
        if !piece.modules.is_empty() {
            current.content.projects.insert(id, piece);
            used = piece_used;
        }
    }
    if !current.content.evaluations.is_empty() || !current.content.projects.is_empty() || parts.is_empty() {
        parts.push(current);
    }
    parts
}

/// Serialized size of one `"key": value,` map entry (conservative: quotes, colon and comma).
fn entry_len<T: Serialize>(key: &str, value: &T) -> usize {
    key.len() + serde_json::to_vec(value).map(|b| b.len()).unwrap_or(usize::MAX / 2) + 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Datagrams captured from the reference implementation (research/reference.md §8.3), with
    /// Python's `json.dumps` separators.
    const CAPTURES: &[&str] = &[
        r#"{"ip": "127.0.0.1", "port": 8001, "cmd": "CONNECT_REP", "data": {"peers": {"179551204279523187555": ["127.0.0.1", 8002], "179551204482268810432": ["127.0.0.1", 8003]}, "id": "179551203864886859797", "given_id": "179551240141346299244"}, "timestamp": 1795512401.4135466}"#,
        r#"{"ip": "127.0.0.1", "port": 8002, "cmd": "HEARTBEAT", "data": {"id": "179551204279523187555", "peers": {"179551203864886859797": ["127.0.0.1", 8001], "179551240141346299244": ["127.0.0.1", 8007], "179551204482268810432": ["127.0.0.1", 8003]}}, "timestamp": 1795512403.475248}"#,
        r#"{"ip": "127.0.0.1", "port": 8001, "cmd": "PROJECT_ANNOUNCE", "data": {"project_id": "1795512056.7615452179551203864886859797", "api_port": "5001", "project_name": "calc", "eval_id": "1795512038648868597971", "url": null, "token": null, "type": 0}, "timestamp": 1795512056.7620084}"#,
        r#"{"ip": "127.0.0.1", "port": 8001, "cmd": "TASK_ANNOUNCE", "data": {"id": "179551203864886859797"}, "timestamp": 1795512057.829834}"#,
        r#"{"ip": "127.0.0.1", "port": 8008, "cmd": "TASK_REQUEST", "data": {"id": "179551233976643334752"}, "timestamp": 1795512350.1040244}"#,
        r#"{"ip": "127.0.0.1", "port": 8003, "cmd": "TASK_SEND", "data": {"id": "179551204482268810432", "info": {"project_id": "1795512349.1948814179551204482268810432", "module": "test_sub.py", "project_name": "calc", "api_port": "5003", "eval_id": "1795512044822688104321", "url": null, "token": null, "type": "zip"}}, "timestamp": 1795512350.1058202}"#,
        r#"{"ip": "127.0.0.1", "port": 8008, "cmd": "TASK_CONFIRM", "data": {"task_id": "1795512349.1948814179551204482268810432::test_sub.py"}, "timestamp": 1795512350.1061893}"#,
        r#"{"ip": "127.0.0.1", "port": 8002, "cmd": "RECOVERY_ELECTION", "data": {"candidate_id": "179551204279523187555", "failed_node": "179551204482268810432", "timestamp": 1795512441.8474839, "extra": {"1795512044822688104322": ["1795512411.7974784179551204482268810432"], "1795512044822688104321": []}, "failed_node_addr": "127.0.0.1:8003"}, "timestamp": 1795512441.847646}"#,
        r#"{"ip": "127.0.0.1", "port": 8001, "cmd": "EVALUATION_RESPONSIBILITY_UPDATE", "data": {"project_id": "1795512411.7974784179551204482268810432", "new_node": "127.0.0.1:8001"}, "timestamp": 1795512451.8571498}"#,
        r#"{"ip": "127.0.0.1", "port": 8001, "cmd": "CACHE_UPDATE", "data": {"addr": "127.0.0.1:8001", "peers_ip": ["127.0.0.1:8002", "127.0.0.1:8009", "127.0.0.1:8003"], "evaluations": {"1795512038648868597971": {"projects": ["1795512056.7615452179551203864886859797", "1795512056.762204179551203864886859797"], "start_time": 1795512056.7254164, "end_time": 1795512058.647059}}, "projects": {"1795512056.7615452179551203864886859797": {"project_name": "calc", "node": "127.0.0.1:8001", "modules": {"test_add.py": {"passed": 2, "failed": 1, "time": 0.144, "status": "finished"}, "test_sub.py": {"passed": 2, "failed": 0, "time": 0.11, "status": "finished"}}}, "1795512056.762204179551203864886859797": {"project_name": "strs", "node": "127.0.0.1:8001", "modules": {"test_fixture_error.py": {"passed": 1, "failed": 1, "time": 0.062, "status": "finished"}, "test_upper.py": {"passed": 2, "failed": 1, "time": 0.18, "status": "finished"}}}}, "stats": {"failed": 1, "passed": 4, "projects": 1, "modules": 2, "evaluations": ["1795512038648868597971"], "submitted_evaluation": ["1795512038648868597971"]}}, "timestamp": 1795512105.5756736}"#,
    ];

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn reference_captures_decode_and_reencode_to_the_same_json() {
        let codec = Codec::default();
        for text in CAPTURES {
            let env = codec.decode(&frame(text.as_bytes())).unwrap_or_else(|e| panic!("{e}: {text}"));
            let original: serde_json::Value = serde_json::from_str(text).expect("valid capture");
            let bytes = codec.encode(&env).expect("encodes");
            let again: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).expect("json");
            assert_eq!(original, again, "round trip changed {}", env.msg.cmd());
        }
    }

    #[test]
    fn types_follow_the_reference_quirks() {
        let codec = Codec::default();
        let env = codec.decode(&frame(CAPTURES[2].as_bytes())).expect("decodes");
        let Message::ProjectAnnounce(pa) = &env.msg else { panic!("not PROJECT_ANNOUNCE") };
        assert_eq!(pa.kind, ProjectSourceKind::Zip);
        assert_eq!(pa.api_port, "5001");
        let json: serde_json::Value =
            serde_json::from_slice(&codec.encode(&env).expect("enc")[4..]).expect("json");
        assert_eq!(json["port"], serde_json::json!(8001));
        assert_eq!(json["data"]["type"], serde_json::json!(0));
        assert_eq!(json["data"]["api_port"], serde_json::json!("5001"));
        let env = codec.decode(&frame(CAPTURES[5].as_bytes())).expect("decodes");
        let json: serde_json::Value =
            serde_json::from_slice(&codec.encode(&env).expect("enc")[4..]).expect("json");
        assert_eq!(json["data"]["info"]["type"], serde_json::json!("zip"));
        // Envelope key order as the reference emits it.
        let text = String::from_utf8(codec.encode(&env).expect("enc")[4..].to_vec()).expect("utf8");
        let pos = |k: &str| text.find(&format!("\"{k}\"")).expect("key");
        assert!(pos("ip") < pos("port") && pos("port") < pos("cmd") && pos("cmd") < pos("data"));
        assert!(text.rfind("\"timestamp\"").expect("ts") > pos("data"));
        // Extensions are absent when empty, so a reference node sees exactly its own shape.
        let hb = Envelope {
            ip: "127.0.0.1".into(),
            port: 1,
            msg: Message::Heartbeat(HeartbeatData::bare(NodeId("1".into()))),
            timestamp: 1.0,
            auth: None,
        };
        let json: serde_json::Value =
            serde_json::from_slice(&codec.encode(&hb).expect("enc")[4..]).expect("json");
        assert_eq!(json["data"], serde_json::json!({"id": "1", "peers": {}}));
    }

    #[test]
    fn framing_errors_are_reported_not_panicked() {
        let codec = Codec::default();
        assert!(matches!(codec.decode(b"\0\0"), Err(WireError::TooShort(2))));
        assert!(matches!(
            codec.decode(&[0, 0, 0, 9, b'{']),
            Err(WireError::Truncated { declared: 9, available: 1 })
        ));
        assert!(matches!(codec.decode(&frame(b"{\"cmd\": \"NOPE\"}")), Err(WireError::Json(_))));
        assert!(matches!(codec.decode(&vec![0u8; MAX_DATAGRAM + 1]), Err(WireError::TooLarge(_))));
        // Trailing bytes after the declared body are ignored, as by the reference.
        let mut d = frame(CAPTURES[3].as_bytes());
        d.extend_from_slice(b"garbage");
        assert!(codec.decode(&d).is_ok());
        // The header is the body length, big-endian.
        let enc = codec.encode(&codec.decode(&frame(CAPTURES[3].as_bytes())).expect("dec")).expect("enc");
        assert_eq!(u32::from_be_bytes([enc[0], enc[1], enc[2], enc[3]]) as usize, enc.len() - 4);
    }

    #[test]
    fn oversized_messages_are_refused_on_encode() {
        let mut data = CacheUpdateData::default();
        data.content.stats.evaluations = vec!["x".repeat(1000); 70];
        let env = Envelope::new("127.0.0.1:1".parse().expect("addr"), Message::CacheUpdate(data), 0.0);
        assert!(matches!(Codec::default().encode(&env), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn mac_authenticates_members_and_is_ignored_without_a_secret() {
        let members = Codec::new(Some("s3cret")).expect("codec");
        let outsider = Codec::new(Some("other")).expect("codec");
        let open = Codec::default();
        let env = open.decode(&frame(CAPTURES[1].as_bytes())).expect("dec");
        let signed = members.encode(&env).expect("enc");
        assert_eq!(members.decode(&signed).expect("member accepts"), env);
        assert!(matches!(outsider.decode(&signed), Err(WireError::BadMac)));
        assert!(matches!(members.decode(&open.encode(&env).expect("enc")), Err(WireError::BadMac)));
        // A node without the secret (or the reference) still parses it: `mac` is an extra key.
        assert_eq!(open.decode(&signed).expect("open node parses"), env);
        // Tampering is detected.
        let mut bad = signed.clone();
        let i = bad.len() / 2;
        bad[i] ^= 1;
        assert!(members.decode(&bad).is_err());
    }

    #[test]
    fn large_cache_updates_split_into_datagrams_whose_union_is_the_cache() {
        let mut data = CacheUpdateData {
            addr: "127.0.0.1:1".into(),
            peers_ip: vec!["127.0.0.1:2".into()],
            ..Default::default()
        };
        for p in 0..300 {
            let mut modules = BTreeMap::new();
            for m in 0..40 {
                modules.insert(
                    format!("test_module_{m}.py"),
                    ModuleEntry { passed: 3, failed: 1, time: 0.25, status: ModuleStatus::Finished },
                );
            }
            data.content.projects.insert(
                format!("project-{p}"),
                ProjectEntry { project_name: format!("p{p}"), node: "127.0.0.1:1".into(), modules },
            );
            data.content.evaluations.insert(
                format!("eval-{p}"),
                EvaluationEntry { projects: vec![format!("project-{p}")], start_time: 1.0, end_time: None },
            );
        }
        // One project larger than a datagram on its own.
        let mut huge = BTreeMap::new();
        for m in 0..3000 {
            huge.insert(
                format!("tests/very/long/path/test_generated_module_number_{m}.py"),
                ModuleEntry { passed: 1, failed: 0, time: 0.1, status: ModuleStatus::Pending },
            );
        }
        data.content.projects.insert(
            "huge".into(),
            ProjectEntry { project_name: "huge".into(), node: "127.0.0.1:1".into(), modules: huge },
        );
        let parts = split_cache_update(data.clone(), MAX_BODY - 512);
        assert!(parts.len() > 5);
        let codec = Codec::new(Some("k")).expect("codec");
        let mut union = CacheContent { stats: data.content.stats.clone(), ..Default::default() };
        for part in parts {
            let env =
                Envelope::new("127.0.0.1:1".parse().expect("addr"), Message::CacheUpdate(part.clone()), 1.0);
            let bytes = codec.encode(&env).expect("every part fits a datagram");
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(part.addr, data.addr);
            union.evaluations.extend(part.content.evaluations);
            for (id, p) in part.content.projects {
                let e = union
                    .projects
                    .entry(id)
                    .or_insert_with(|| ProjectEntry { modules: BTreeMap::new(), ..p.clone() });
                e.modules.extend(p.modules);
            }
        }
        assert_eq!(union, data.content);
    }

    #[test]
    fn node_ids_order_numerically() {
        assert!(NodeId("9".into()) < NodeId("10".into()));
        assert!(NodeId("179551203864886859797".into()) < NodeId("179551204279523187555".into()));
        assert_eq!(NodeId::mint(1_795_512_038_648_868, 59_797).as_str(), "179551203864886859797");
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            "[a-zA-Z0-9_:.]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const CMDS: &[&str] = &[
        "CONNECT",
        "CONNECT_REP",
        "HEARTBEAT",
        "CACHE_UPDATE",
        "TASK_ANNOUNCE",
        "TASK_REQUEST",
        "TASK_SEND",
        "TASK_CONFIRM",
        "TASK_RESULT",
        "PROJECT_ANNOUNCE",
        "RECOVERY_ELECTION",
        "RECOVERY_ELECTION_REP",
        "RECOVERY_ELECTION_RESULT",
        "EVALUATION_RESPONSIBILITY_UPDATE",
        "BOGUS",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Codec::default().decode(&bytes);
            let _ = Codec::new(Some("k")).expect("codec").decode(&bytes);
        }

        #[test]
        fn decoding_framed_arbitrary_text_never_panics(body in ".{0,512}", lie in any::<u32>(), honest in any::<bool>()) {
            let mut d = if honest { (body.len() as u32).to_be_bytes().to_vec() } else { lie.to_be_bytes().to_vec() };
            d.extend_from_slice(body.as_bytes());
            let _ = Codec::default().decode(&d);
        }

        #[test]
        fn decoding_arbitrary_envelopes_never_panics(
            cmd in prop::sample::select(CMDS),
            data in arb_json(),
            port in any::<i64>(),
            ip in "[0-9.:a-f]{0,20}",
        ) {
            let body = serde_json::json!({"ip": ip, "port": port, "cmd": cmd, "data": data, "timestamp": 1.5});
            let bytes = frame(&serde_json::to_vec(&body).expect("json"));
            if let Ok(env) = Codec::default().decode(&bytes) {
                // Whatever decodes re-encodes.
                let _ = Codec::default().encode(&env);
            }
        }

        #[test]
        fn mutated_captures_never_panic(which in 0..CAPTURES.len(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut d = frame(CAPTURES[which].as_bytes());
            let i = at.index(d.len());
            d[i] = byte;
            let _ = Codec::default().decode(&d);
        }
    }

    fn chan(secret: Option<&str>, port: u16, boot: u64) -> Channel {
        Channel::new(secret, SocketAddr::from(([127, 0, 0, 1], port)), boot).expect("channel")
    }

    fn hb_env(port: u16) -> Envelope {
        let codec = Codec::default();
        let mut env = codec.decode(&frame(CAPTURES[1].as_bytes())).expect("dec");
        env.port = port;
        env
    }

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn an_empty_secret_is_refused() {
        assert!(matches!(Codec::new(Some("")), Err(WireError::EmptySecret)));
        assert!(matches!(
            Channel::new(Some(""), "127.0.0.1:1".parse().expect("a"), 1),
            Err(WireError::EmptySecret)
        ));
        assert!(!Codec::new(None).expect("open").is_authenticated());
    }

    #[test]
    fn without_a_secret_the_envelope_is_the_references() {
        let mut a = chan(None, 1, 1);
        let mut b = chan(None, 2, 2);
        let bytes = a.seal(hb_env(1), "127.0.0.1:2".parse().expect("a"), T0).expect("seal");
        let json: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).expect("json");
        let keys: Vec<&String> = json.as_object().expect("obj").keys().collect();
        assert_eq!(keys.len(), 5, "{json}");
        assert!(json.get("auth").is_none() && json.get("mac").is_none());
        // No replay state without a secret (the reference has no header to check).
        let from = "127.0.0.1:1".parse().expect("a");
        assert!(b.open(&bytes, from, T0).is_ok());
        assert!(b.open(&bytes, from, T0).is_ok());
    }

    #[test]
    fn sealed_datagrams_are_accepted_once_in_window_for_their_destination_only() {
        let (a_addr, b_addr, c_addr): (SocketAddr, SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().expect("a"),
            "127.0.0.1:2".parse().expect("a"),
            "127.0.0.1:3".parse().expect("a"),
        );
        let mut a = chan(Some("k"), 1, 11);
        let mut b = chan(Some("k"), 2, 22);
        let mut c = chan(Some("k"), 3, 33);
        let d1 = a.seal(hb_env(1), b_addr, T0).expect("seal");
        let d2 = a.seal(hb_env(1), b_addr, T0 + 5).expect("seal");
        let to_c = a.seal(hb_env(1), c_addr, T0 + 6).expect("seal");
        // Reordered delivery is fine, repeats are not.
        assert!(b.open(&d2, a_addr, T0 + 10).is_ok());
        assert!(b.open(&d1, a_addr, T0 + 10).is_ok());
        assert!(matches!(b.open(&d1, a_addr, T0 + 10), Err(WireError::Replay)));
        assert!(matches!(b.open(&d2, a_addr, T0 + 10), Err(WireError::Replay)));
        // A datagram sealed for C is refused by B, accepted by C.
        assert!(matches!(b.open(&to_c, a_addr, T0 + 10), Err(WireError::Misdirected(_))));
        assert!(c.open(&to_c, a_addr, T0 + 10).is_ok());
        // Outside the time window (a receiver that restarted and lost its state).
        let mut fresh = chan(Some("k"), 2, 44);
        assert!(matches!(fresh.open(&d1, a_addr, T0 + REPLAY_WINDOW_MS + 1), Err(WireError::Expired { .. })));
        // The sender restarts (new boot): accepted; the old run's datagrams are not any more.
        let mut a2 = chan(Some("k"), 1, 12);
        let old = a.seal(hb_env(1), b_addr, T0 + 20).expect("seal");
        let new = a2.seal(hb_env(1), b_addr, T0 + 30).expect("seal");
        assert!(b.open(&new, a_addr, T0 + 31).is_ok());
        assert!(matches!(b.open(&old, a_addr, T0 + 31), Err(WireError::Replay)));
        // Unsealed but MACed (an old cdtester node with the secret) is refused.
        let unsealed = Codec::new(Some("k")).expect("codec").encode(&hb_env(1)).expect("enc");
        assert!(matches!(b.open(&unsealed, a_addr, T0 + 31), Err(WireError::Unsealed)));
        let s = b.stats();
        assert_eq!((s.replayed, s.misdirected, s.unauthenticated), (3, 1, 1));
    }

    #[test]
    fn the_sender_is_the_sealed_claim_and_a_copy_from_another_source_is_a_replay() {
        let b_addr: SocketAddr = "127.0.0.1:2".parse().expect("a");
        let claimed: SocketAddr = "127.0.0.1:1".parse().expect("a");
        let nat: SocketAddr = "[::ffff:198.51.100.9]:40001".parse().expect("a");
        let attacker: SocketAddr = "203.0.113.66:1".parse().expect("a");
        let mut a = chan(Some("k"), 1, 11);
        let mut b = chan(Some("k"), 2, 22);
        let d = a.seal(hb_env(1), b_addr, T0).expect("seal");
        // Behind NAT the source differs: the sender is still the address the member claims.
        let (sender, _) = b.open(&d, nat, T0).expect("accepted");
        assert_eq!(sender, claimed);
        // The same datagram replayed from anywhere else meets the claimed sender's window.
        assert!(matches!(b.open(&d, attacker, T0), Err(WireError::Replay)));
        // Without a secret a claim is not believed: the sender is the (canonical) source.
        let mut open_a = chan(None, 1, 1);
        let mut open_b = chan(None, 2, 2);
        let d = open_a.seal(hb_env(1), b_addr, T0).expect("seal");
        let (sender, env) = open_b.open(&d, nat, T0).expect("accepted");
        assert_eq!(sender, "198.51.100.9:40001".parse::<SocketAddr>().expect("a"));
        assert_eq!(env.sender(), Some(claimed));
        // IPv6 claims and seals work like IPv4 ones.
        let v6: SocketAddr = "[2001:db8::2]:7000".parse().expect("a");
        let mut c = Channel::new(Some("k"), v6, 3).expect("channel");
        let mut env = hb_env(7001);
        env.ip = "2001:db8::1".into();
        let d = a.seal(env, v6, T0).expect("seal");
        let (sender, _) = c.open(&d, nat, T0).expect("accepted");
        assert_eq!(sender, "[2001:db8::1]:7001".parse::<SocketAddr>().expect("a"));
        assert_eq!(parse_addr(&addr_string(sender)), Some(sender));
        assert_eq!(join_addr("2001:db8::1", "7001"), "[2001:db8::1]:7001");
        assert_eq!(join_addr("10.0.0.1", "7001"), "10.0.0.1:7001");
        assert_eq!(join_addr("x", "y"), "x:y");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Datagram authentication: any single-bit flip, any truncation and any replay of an
        /// authenticated datagram is rejected; the untouched datagram is accepted exactly once.
        #[test]
        fn flipped_truncated_or_replayed_datagrams_are_rejected(
            which in 0..CAPTURES.len(),
            bit in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
            order in any::<bool>(),
        ) {
            let to: SocketAddr = "127.0.0.1:2".parse().expect("a");
            let from: SocketAddr = "127.0.0.1:1".parse().expect("a");
            let mut sender = chan(Some("k"), 1, 7);
            let mut env = Codec::default().decode(&frame(CAPTURES[which].as_bytes())).expect("capture");
            env.ip = "127.0.0.1".into();
            env.port = 1;
            let good = sender.seal(env, to, T0).expect("seal");
            let mut flipped = good.clone();
            let i = bit.index(flipped.len() * 8);
            flipped[i / 8] ^= 1 << (i % 8);
            let truncated = &good[..cut.index(good.len())];
            let mut rx = chan(Some("k"), 2, 8);
            if order {
                prop_assert!(rx.open(&flipped, from, T0).is_err(), "bit {i} flipped was accepted");
                prop_assert!(rx.open(truncated, from, T0).is_err());
                prop_assert!(rx.open(&good, from, T0).is_ok());
            } else {
                prop_assert!(rx.open(&good, from, T0).is_ok());
                prop_assert!(rx.open(&flipped, from, T0).is_err(), "bit {i} flipped was accepted");
                prop_assert!(rx.open(truncated, from, T0).is_err());
            }
            prop_assert!(matches!(rx.open(&good, from, T0), Err(WireError::Replay)));
        }

        /// The sequence window accepts every number at most once and never one below the window,
        /// as a set of accepted numbers would.
        #[test]
        fn seq_window_matches_a_set_model(seqs in prop::collection::vec(0u64..3000, 1..400)) {
            let mut w = SeqWindow::new(String::new(), seqs[0], 0);
            let mut model = std::collections::BTreeSet::from([seqs[0]]);
            let mut top = seqs[0];
            for &s in &seqs[1..] {
                let expect = !model.contains(&s) && s + SEQ_WINDOW > top;
                prop_assert_eq!(w.accept(s), expect, "seq {} top {}", s, top);
                if expect {
                    model.insert(s);
                    top = top.max(s);
                }
            }
        }
    }
}
