//! Typed identifiers, each with one parse ([`FromStr`], also behind serde) and one spelling
//! ([`Display`]): evaluation ids ([`EvalId`]) and project ids ([`ProjectId`]).
//!
//! Every id that arrives from a peer, a client or a file goes through its parse, which refuses
//! hostile input (wrong length or characters, out-of-range numbers, non-canonical spellings), so
//! that the rest of the node handles only well-formed ids. The serde forms are the JSON shapes
//! the HTTP API, the stored records and the peer protocol always used.

use std::fmt::{self, Display};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a text is not an id of the kind asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("evaluation id {0:?} is not an integer from 1 to 2^53 - 1 without leading zeros")]
    Eval(String),
    #[error("project id {0:?} is not 1 to 64 characters of [0-9A-Za-z_.-] (not dots only)")]
    Project(String),
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
}
