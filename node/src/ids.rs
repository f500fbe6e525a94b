//! Typed identifiers, each with one parse ([`FromStr`], also behind serde) and one spelling
//! ([`Display`]): evaluation ids ([`EvalId`]), project ids ([`ProjectId`]), task ids
//! ([`TaskId`]) and node addresses ([`NodeAddr`]).
//!
//! Every id that arrives from a peer, a client or a file goes through its parse, which refuses
//! hostile input (wrong length or characters, out-of-range numbers, non-canonical spellings), so
//! that the rest of the node handles only well-formed ids. The serde forms are the JSON shapes
//! the HTTP API, the stored records and the peer protocol always used.

use std::cmp::Ordering;
use std::fmt::{self, Display};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::str::FromStr;

use cdtester_runner_api::Chunk;
use serde::{Deserialize, Serialize};

/// Why a text is not an id of the kind asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("evaluation id {0:?} is not an integer from 1 to 2^53 - 1 without leading zeros")]
    Eval(String),
    #[error("project id {0:?} is not 1 to 64 characters of [0-9A-Za-z_.-] (not dots only)")]
    Project(String),
    #[error(
        "task id {0:?} is not <project id>::<module>[#<index>/<count>] (a relative module path, index < count, count > 1)"
    )]
    Task(String),
    #[error("node address {0:?} is not ip:port ([v6]:port for IPv6)")]
    Node(String),
}

/// The first characters of a hostile text, for error messages.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Whether `s` is a decimal number as cdtester writes it: 1 to `max_len` ASCII digits, no sign
/// and no leading zero (except `0` itself).
fn canonical_decimal(s: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
}

/// An evaluation id: an integer from 1 to 2^53 - 1 (exact in JSON numbers everywhere). A JSON
/// number in records and reports; decimal in paths and in the peer protocol's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct EvalId(u64);

impl EvalId {
    /// The largest evaluation id (2^53 - 1).
    pub const MAX: u64 = (1 << 53) - 1;

    /// The id `n`, if it is in range.
    pub fn new(n: u64) -> Result<EvalId, IdError> {
        if (1..=Self::MAX).contains(&n) { Ok(EvalId(n)) } else { Err(IdError::Eval(n.to_string())) }
    }

    /// A random id in the range cdtester mints from (at least 1,000,000).
    pub fn random() -> EvalId {
        EvalId(rand::random_range(1_000_000..=Self::MAX))
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
impl EvalId {
    /// `n` as an evaluation id, in tests (panics when out of range).
    pub(crate) fn test(n: u64) -> EvalId {
        EvalId::new(n).expect("a test's evaluation id is in range")
    }
}

impl TryFrom<u64> for EvalId {
    type Error = IdError;
    fn try_from(n: u64) -> Result<EvalId, IdError> {
        EvalId::new(n)
    }
}

impl From<EvalId> for u64 {
    fn from(id: EvalId) -> u64 {
        id.0
    }
}

impl FromStr for EvalId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<EvalId, IdError> {
        // 2^53 - 1 has 16 digits.
        if !canonical_decimal(s, 16) {
            return Err(IdError::Eval(clip(s)));
        }
        s.parse::<u64>().map_err(|_| IdError::Eval(clip(s))).and_then(EvalId::new)
    }
}

impl Display for EvalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Display::fmt(&self.0, f)
    }
}

/// A project id: 1 to 64 characters of `[0-9A-Za-z_.-]`, not dots only (they name folders and
/// files). cdtester's are `<eval id>-<index>` ([`ProjectId::of`]); those of projects owned by
/// nodes of the earlier implementation (`<float time><node id>`) follow the same rule
/// ([`crate::interop::valid_id`]). A JSON string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProjectId(String);

impl ProjectId {
    /// The id of the `index`th project of evaluation `eval`.
    pub fn of(eval: EvalId, index: usize) -> ProjectId {
        ProjectId(format!("{eval}-{index}"))
    }

    /// The evaluation of a cdtester project id (`None` for another implementation's).
    pub fn eval(&self) -> Option<EvalId> {
        self.0.split_once('-').and_then(|(eval, _)| eval.parse().ok())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ProjectId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<ProjectId, IdError> {
        if crate::interop::valid_id(s) {
            Ok(ProjectId(s.to_string()))
        } else {
            Err(IdError::Project(clip(s)))
        }
    }
}

impl TryFrom<String> for ProjectId {
    type Error = IdError;
    fn try_from(s: String) -> Result<ProjectId, IdError> {
        if crate::interop::valid_id(&s) { Ok(ProjectId(s)) } else { Err(IdError::Project(clip(&s))) }
    }
}

impl From<ProjectId> for String {
    fn from(id: ProjectId) -> String {
        id.0
    }
}

impl Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest module path a task id names (bytes).
pub const MAX_MODULE_LEN: usize = 1024;

/// Whether `m` can name a test module: a relative path inside the project (no `..`, `.`, root
/// or prefix components), 1 to [`MAX_MODULE_LEN`] bytes, no control characters.
pub fn valid_module_path(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= MAX_MODULE_LEN
        && !m.chars().any(char::is_control)
        && std::path::Path::new(m).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Between the project id and the module in a task id.
const SEPARATOR: &str = "::";

/// The chunk a task-id suffix `<index>/<count>` names: `Some(Err)` when it has that shape but is
/// no chunk (`3/2`, `0/0`, leading zeros), `None` when it has another shape (then the `#` is part
/// of the module's name).
fn chunk_suffix(spec: &str) -> Option<Result<Chunk, ()>> {
    let (i, n) = spec.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(i) || !digits(n) {
        return None;
    }
    let chunk = match (i.parse::<u32>(), n.parse::<u32>()) {
        (Ok(index), Ok(count)) if canonical_decimal(i, 10) && canonical_decimal(n, 10) => {
            Chunk { index, count }
        }
        _ => return Some(Err(())),
    };
    Some(if chunk.count > 1 && chunk.index < chunk.count { Ok(chunk) } else { Err(()) })
}

/// A task: one test module of a project, or one chunk (a contiguous slice of its tests) of it.
/// One spelling, `<project id>::<module>` or `<project id>::<module>#<index>/<count>` (the
/// earlier implementation's `<project_id>::<module>` for a whole module), a JSON string. Ordered
/// as its text, as the records' maps always were.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId {
    text: String,
    project: ProjectId,
    /// Where the module ends in `text`.
    module_end: usize,
    chunk: Option<Chunk>,
}

impl TaskId {
    /// The task of `module` (or of one chunk of it) in `project`.
    pub fn new(project: &ProjectId, module: &str, chunk: Option<Chunk>) -> Result<TaskId, IdError> {
        let mut text = format!("{project}{SEPARATOR}{module}");
        let module_end = text.len();
        if let Some(c) = chunk {
            text = format!("{text}#{}/{}", c.index, c.count);
        }
        // The module may hold a `#`, but nothing that would read back as a chunk.
        let clean = module.rsplit_once('#').is_none_or(|(_, spec)| chunk_suffix(spec).is_none());
        let chunk_ok = chunk.is_none_or(|c| c.count > 1 && c.index < c.count);
        if !valid_module_path(module) || !clean || !chunk_ok {
            return Err(IdError::Task(clip(&text)));
        }
        Ok(TaskId { text, project: project.clone(), module_end, chunk })
    }

    /// The task a peer names by project id and task part (`<module>[#<index>/<count>]`, as
    /// TASK_SEND's `module` carries it).
    pub fn from_parts(project: &str, part: &str) -> Result<TaskId, IdError> {
        format!("{project}{SEPARATOR}{part}").parse()
    }

    pub fn project(&self) -> &ProjectId {
        &self.project
    }

    /// The module's path in the project.
    pub fn module(&self) -> &str {
        &self.text[self.project.as_str().len() + SEPARATOR.len()..self.module_end]
    }

    pub fn chunk(&self) -> Option<Chunk> {
        self.chunk
    }

    /// Everything after the project id: `<module>` or `<module>#<index>/<count>`.
    pub fn part(&self) -> &str {
        &self.text[self.project.as_str().len() + SEPARATOR.len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
impl TaskId {
    /// `s` as a task id, in tests (panics when it is none).
    pub(crate) fn test(s: &str) -> TaskId {
        s.parse().expect("a test's task id is valid")
    }
}

impl FromStr for TaskId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<TaskId, IdError> {
        let bad = || IdError::Task(clip(s));
        let (project, part) = s.split_once(SEPARATOR).ok_or_else(bad)?;
        let project: ProjectId = project.parse().map_err(|_| bad())?;
        let (module, chunk) = match part.rsplit_once('#').and_then(|(m, spec)| Some((m, chunk_suffix(spec)?)))
        {
            Some((module, Ok(chunk))) => (module, Some(chunk)),
            Some((_, Err(()))) => return Err(bad()),
            None => (part, None),
        };
        TaskId::new(&project, module, chunk).map_err(|_| bad())
    }
}

impl TryFrom<String> for TaskId {
    type Error = IdError;
    fn try_from(s: String) -> Result<TaskId, IdError> {
        s.parse()
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.text
    }
}

impl Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

// The other fields are read from the text: comparing it compares the ids.
impl PartialEq for TaskId {
    fn eq(&self, other: &TaskId) -> bool {
        self.text == other.text
    }
}

impl Eq for TaskId {}

impl PartialOrd for TaskId {
    fn partial_cmp(&self, other: &TaskId) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TaskId {
    fn cmp(&self, other: &TaskId) -> Ordering {
        self.text.cmp(&other.text)
    }
}

impl Hash for TaskId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

/// Longest node address text (`[` 45-character IPv6 `]:65535` fits).
const MAX_ADDR_LEN: usize = 64;

/// A node's UDP address, its identity as a member: `ip:port` (`[v6]:port`), in the one spelling
/// of [`crate::wire::canonical`] (an IPv4-mapped address written as IPv4). A JSON string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeAddr(SocketAddr);

impl NodeAddr {
    pub fn socket(self) -> SocketAddr {
        self.0
    }
}

#[cfg(test)]
impl NodeAddr {
    /// `s` as a node address, in tests (panics when it is none).
    pub(crate) fn test(s: &str) -> NodeAddr {
        s.parse().expect("a test's node address is valid")
    }
}

impl From<SocketAddr> for NodeAddr {
    fn from(addr: SocketAddr) -> NodeAddr {
        NodeAddr(crate::wire::canonical(addr))
    }
}

impl From<NodeAddr> for SocketAddr {
    fn from(addr: NodeAddr) -> SocketAddr {
        addr.0
    }
}

impl FromStr for NodeAddr {
    type Err = IdError;
    fn from_str(s: &str) -> Result<NodeAddr, IdError> {
        if s.len() > MAX_ADDR_LEN {
            return Err(IdError::Node(clip(s)));
        }
        s.parse::<SocketAddr>().map(NodeAddr::from).map_err(|_| IdError::Node(clip(s)))
    }
}

impl TryFrom<String> for NodeAddr {
    type Error = IdError;
    fn try_from(s: String) -> Result<NodeAddr, IdError> {
        s.parse()
    }
}

impl From<NodeAddr> for String {
    fn from(addr: NodeAddr) -> String {
        addr.to_string()
    }
}

impl Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Display::fmt(&self.0, f)
    }
}

impl PartialEq<SocketAddr> for NodeAddr {
    fn eq(&self, other: &SocketAddr) -> bool {
        *self == NodeAddr::from(*other)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn eval_ids_round_trip_and_keep_their_json_shape() {
        for n in [1, 7, 1_000_000, EvalId::MAX] {
            let id = EvalId::new(n).expect("in range");
            assert_eq!(id.to_string().parse::<EvalId>(), Ok(id));
            assert_eq!(serde_json::to_string(&id).expect("json"), n.to_string(), "a JSON number");
            assert_eq!(serde_json::from_str::<EvalId>(&n.to_string()).expect("json"), id);
        }
        let map = BTreeMap::from([(EvalId::new(7).expect("id"), 1)]);
        assert_eq!(serde_json::to_string(&map).expect("json"), r#"{"7":1}"#, "a map key stays a string");
        assert_eq!(serde_json::from_str::<BTreeMap<EvalId, u8>>(r#"{"7":1}"#).expect("json"), map);
        assert!(EvalId::random().get() >= 1_000_000);
    }

    #[test]
    fn hostile_eval_ids_are_refused() {
        let max_plus_one = (EvalId::MAX + 1).to_string();
        for bad in ["", "0", "-1", "+7", "007", " 7", "7 ", "7\n", "1e3", "7.0", "x", "1/2", &max_plus_one] {
            assert!(bad.parse::<EvalId>().is_err(), "{bad:?}");
        }
        // A reference evaluation id (22 digits) is not cdtester's.
        assert!("1718000000123456712345".parse::<EvalId>().is_err());
        assert!(EvalId::new(0).is_err());
        assert!(serde_json::from_str::<EvalId>("0").is_err());
        assert!(serde_json::from_str::<EvalId>(&max_plus_one).is_err());
        assert!(serde_json::from_str::<EvalId>("\"7\"").is_err(), "a number, not a string");
    }

    #[test]
    fn project_ids_round_trip_and_keep_their_json_shape() {
        let ours = ProjectId::of(EvalId::test(7), 10);
        assert_eq!(ours.to_string(), "7-10");
        assert_eq!(ours.eval(), Some(EvalId::test(7)));
        assert_eq!("7-10".parse::<ProjectId>(), Ok(ours.clone()));
        assert_eq!(serde_json::to_string(&ours).expect("json"), r#""7-10""#);
        assert_eq!(serde_json::from_str::<ProjectId>(r#""7-10""#).expect("json"), ours);
        let reference: ProjectId = "1718000000.123412345678901234567".parse().expect("a reference id");
        assert_eq!(reference.eval(), None);
        assert_eq!(reference.as_str(), "1718000000.123412345678901234567");
    }

    #[test]
    fn hostile_project_ids_are_refused() {
        let long = "a".repeat(65);
        for bad in ["", ".", "..", "...", "a/b", "..\\x", "7-0\r\nX-Evil: 1", "a b", "a\0", "é", &long] {
            assert!(bad.parse::<ProjectId>().is_err(), "{bad:?}");
            assert!(serde_json::from_value::<ProjectId>(serde_json::json!(bad)).is_err(), "{bad:?}");
        }
        assert!("a".repeat(64).parse::<ProjectId>().is_ok());
    }

    fn chunk(index: u32, count: u32) -> Option<Chunk> {
        Some(Chunk { index, count })
    }

    #[test]
    fn task_ids_round_trip_and_keep_their_json_shape() {
        let p = ProjectId::of(EvalId::test(7), 0);
        for (text, module, c) in [
            ("7-0::t_a.py", "t_a.py", None),
            ("7-0::tests/sub/t_b.py#1/3", "tests/sub/t_b.py", chunk(1, 3)),
            ("7-0::odd#name.py", "odd#name.py", None),
            ("7-0::odd#1/2.py", "odd#1/2.py", None),
            ("7-0::a::b.py#10/12", "a::b.py", chunk(10, 12)),
        ] {
            let t = TaskId::new(&p, module, c).expect("valid");
            assert_eq!(t.to_string(), text);
            assert_eq!(text.parse::<TaskId>(), Ok(t.clone()));
            let parsed: TaskId = text.parse().expect("parses");
            assert_eq!((parsed.project(), parsed.module(), parsed.chunk()), (&p, module, c));
            assert_eq!(TaskId::from_parts("7-0", parsed.part()), Ok(t.clone()));
            assert_eq!(serde_json::to_string(&t).expect("json"), format!("{text:?}"));
            assert_eq!(serde_json::from_str::<TaskId>(&format!("{text:?}")).expect("json"), t);
        }
        // The reference's task ids are task ids.
        let r: TaskId = "1718000000.123412345::test_x.py".parse().expect("a reference task id");
        assert_eq!((r.project().as_str(), r.module()), ("1718000000.123412345", "test_x.py"));
        // Ordered as text, as the records' maps were: 7-1::x after 7-10::x.
        let (a, b): (TaskId, TaskId) = ("7-1::x.py".parse().expect("id"), "7-10::x.py".parse().expect("id"));
        assert!(a > b);
    }

    #[test]
    fn hostile_task_ids_are_refused() {
        let long = format!("7-0::{}", "a".repeat(MAX_MODULE_LEN + 1));
        for bad in [
            "",
            "7-0",
            "7-0::",
            "::t.py",
            "7-0:t.py",
            "7-0::t.py#3/2",
            "7-0::t.py#2/2",
            "7-0::t.py#0/0",
            "7-0::t.py#0/1",
            "7-0::t.py#01/3",
            "7-0::t.py#1/99999999999",
            "7-0::../t.py",
            "7-0::/etc/passwd",
            "7-0::a/../../t.py",
            "7-0::t.py\n",
            "7-0::t\0.py",
            "7\r\n-0::t.py",
            "../x::t.py",
            &long,
        ] {
            assert!(bad.parse::<TaskId>().is_err(), "{bad:?}");
            assert!(serde_json::from_value::<TaskId>(serde_json::json!(bad)).is_err(), "{bad:?}");
        }
        let p = ProjectId::of(EvalId::test(7), 0);
        assert!(TaskId::new(&p, "t.py#1/2", None).is_err(), "a module that reads back as a chunk");
        assert!(TaskId::new(&p, "t.py", chunk(3, 2)).is_err());
        assert!(TaskId::new(&p, "t.py", chunk(0, 0)).is_err());
    }

    #[test]
    fn node_addresses_round_trip_and_keep_their_json_shape() {
        for text in ["127.0.0.1:7000", "[2001:db8::1]:7001", "0.0.0.0:1"] {
            let a: NodeAddr = text.parse().expect("an address");
            assert_eq!(a.to_string(), text);
            assert_eq!(serde_json::to_string(&a).expect("json"), format!("{text:?}"));
            assert_eq!(serde_json::from_str::<NodeAddr>(&format!("{text:?}")).expect("json"), a);
        }
        let mapped: SocketAddr = "[::ffff:198.51.100.9]:40001".parse().expect("a");
        assert_eq!(NodeAddr::from(mapped).to_string(), "198.51.100.9:40001", "one spelling");
        assert_eq!(
            "[::ffff:198.51.100.9]:40001".parse::<NodeAddr>().map(|a| a.to_string()).as_deref(),
            Ok("198.51.100.9:40001")
        );
        assert!(NodeAddr::from(mapped) == mapped);
    }

    #[test]
    fn hostile_node_addresses_are_refused() {
        let long = format!("127.0.0.1:7000{}", " ".repeat(60));
        for bad in [
            "",
            "n1",
            "somewhere",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:70000",
            "::1:7000",
            "127.0.0.1:7000\n",
            "127.0.0.1:7000/x",
            "localhost:7000",
            &long,
        ] {
            assert!(bad.parse::<NodeAddr>().is_err(), "{bad:?}");
            assert!(serde_json::from_value::<NodeAddr>(serde_json::json!(bad)).is_err(), "{bad:?}");
        }
    }
}
