//! Authentication of internal HTTP calls between members.
//!
//! With a cluster secret every internal call carries four headers: the caller's UDP address
//! (`x-cdtester-node`), the time it was signed (`x-cdtester-time`, Unix milliseconds), a random
//! nonce (`x-cdtester-nonce`, 32 hex digits) and `x-cdtester-mac`, the hex HMAC-SHA256 under the
//! secret of the method, the `Host` it is sent to (the receiver's HTTP address), path (with
//! query), caller, time, nonce and body. The receiver refuses a
//! call whose MAC does not verify, whose time is more than [`WINDOW`] away from its clock, or
//! whose nonce it has already seen within the window: a captured call cannot be replayed, moved
//! to another route, or attributed to another member. Without a secret (`node.insecure`) nothing
//! is signed; callers are then checked against the connection's source address only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying the MAC.
pub const MAC_HEADER: &str = "x-cdtester-mac";
/// Header carrying the caller's UDP address (its identity as a member).
pub const NODE_HEADER: &str = "x-cdtester-node";
/// Header carrying the signing time (Unix milliseconds).
pub const TIME_HEADER: &str = "x-cdtester-time";
/// Header carrying the request's nonce.
pub const NONCE_HEADER: &str = "x-cdtester-nonce";

/// How far a signed call's time may be from the receiver's clock (either way).
pub const WINDOW: Duration = Duration::from_secs(30);
/// Most nonces remembered at once; past it, calls are refused until old ones expire.
const MAX_REMEMBERED: usize = 200_000;

/// Why a call was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing cluster authentication header {0}")]
    Missing(&'static str),
    #[error("invalid cluster MAC")]
    BadMac,
    #[error("signed call is {0} ms away from this node's clock (window {w} ms)", w = WINDOW.as_millis())]
    Stale(u64),
    #[error("replayed call (nonce already seen)")]
    Replayed,
    #[error("too many authenticated calls in flight; retry later")]
    Busy,
}

/// The cluster secret (or none, in an insecure network).
#[derive(Clone, Default)]
pub struct Secret(Option<Arc<[u8]>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Secret(set)" } else { "Secret(none)" })
    }
}

/// The parts of a call the MAC covers.
#[derive(Debug, Clone, Copy)]
pub struct CallParts<'a> {
    pub method: &'a str,
    /// The receiver's HTTP address as the caller addressed it (the `Host` header).
    pub host: &'a str,
    pub path: &'a str,
    pub caller: &'a str,
    pub body: &'a [u8],
}

/// Headers that authenticate one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub time_ms: u64,
    pub nonce: String,
    pub mac: String,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Secret {
    /// A secret from its configured value; `None` (or empty, which configuration refuses
    /// earlier) is an insecure network.
    pub fn new(secret: Option<&str>) -> Secret {
        Secret(secret.filter(|s| !s.is_empty()).map(|s| Arc::from(s.as_bytes())))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn mac(key: &[u8], call: &CallParts<'_>, time_ms: u64, nonce: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        for part in
            ["cdtester-http-2", call.method, call.host, call.path, call.caller, &time_ms.to_string(), nonce]
        {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(call.body);
        mac
    }

    /// Signs a call made now, `None` without a secret.
    pub fn sign(&self, call: &CallParts<'_>) -> Option<Signature> {
        self.sign_at(call, now_ms())
    }

    /// Signs a call as if made at `time_ms` (Unix milliseconds), `None` without a secret.
    pub fn sign_at(&self, call: &CallParts<'_>, time_ms: u64) -> Option<Signature> {
        let key = self.0.as_ref()?;
        let nonce = format!("{:032x}", rand::random::<u128>());
        let mac = hex::encode(Self::mac(key, call, time_ms, &nonce).finalize().into_bytes());
        Some(Signature { time_ms, nonce, mac })
    }
}

/// Checks signed calls and remembers their nonces for the window (replay protection).
#[derive(Debug, Clone)]
pub struct Verifier {
    secret: Secret,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    nonces: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
}

impl Seen {
    /// Forgets nonces whose time left the window.
    fn expire(&mut self, now: u64) {
        let horizon = WINDOW.as_millis() as u64;
        while let Some((t, _)) = self.order.front() {
            if t.saturating_add(horizon) >= now {
                break;
            }
            if let Some((_, n)) = self.order.pop_front() {
                self.nonces.remove(&n);
            }
        }
    }
}

impl Verifier {
    pub fn new(secret: Secret) -> Verifier {
        Verifier { secret, seen: Arc::default() }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Verifies a call's signature headers (`time`, `nonce`, `mac` as received). Always `Ok`
    /// without a secret.
    pub fn verify(
        &self,
        call: &CallParts<'_>,
        time: Option<&str>,
        nonce: Option<&str>,
        mac: Option<&str>,
    ) -> Result<(), AuthError> {
        self.verify_at(call, time, nonce, mac, now_ms())
    }

    fn verify_at(
        &self,
        call: &CallParts<'_>,
        time: Option<&str>,
        nonce: Option<&str>,
        mac: Option<&str>,
        now: u64,
    ) -> Result<(), AuthError> {
        let Some(key) = &self.secret.0 else { return Ok(()) };
        let mac = mac.ok_or(AuthError::Missing(MAC_HEADER))?;
        let time_ms: u64 = time.and_then(|t| t.trim().parse().ok()).ok_or(AuthError::Missing(TIME_HEADER))?;
        let nonce = nonce
            .map(str::trim)
            .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(AuthError::Missing(NONCE_HEADER))?;
        let tag = hex::decode(mac.trim()).map_err(|_| AuthError::BadMac)?;
        Secret::mac(key, call, time_ms, nonce).verify_slice(&tag).map_err(|_| AuthError::BadMac)?;
        let skew = now.abs_diff(time_ms);
        if skew > WINDOW.as_millis() as u64 {
            return Err(AuthError::Stale(skew));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.expire(now);
        if seen.nonces.contains_key(nonce) {
            return Err(AuthError::Replayed);
        }
        if seen.nonces.len() >= MAX_REMEMBERED {
            return Err(AuthError::Busy);
        }
        // Remembered until `now + WINDOW` at least (the order is by arrival, so a call signed in
        // the future stays as long as it could still be accepted).
        let keep_from = now.max(time_ms);
        seen.nonces.insert(nonce.to_string(), keep_from);
        seen.order.push_back((keep_from, nonce.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn call<'a>(method: &'a str, path: &'a str, caller: &'a str, body: &'a [u8]) -> CallParts<'a> {
        CallParts { method, host: "127.0.0.1:8000", path, caller, body }
    }

    fn check(v: &Verifier, c: &CallParts<'_>, s: &Signature, now: u64) -> Result<(), AuthError> {
        v.verify_at(c, Some(&s.time_ms.to_string()), Some(&s.nonce), Some(&s.mac), now)
    }

    #[test]
    fn a_signature_binds_method_path_caller_body_and_secret() {
        let s = Secret::new(Some("k"));
        let c = call("POST", "/task", "127.0.0.1:7000", b"{}");
        let sig = s.sign_at(&c, 1_000_000).unwrap();
        let fresh = || Verifier::new(s.clone());
        assert_eq!(check(&fresh(), &c, &sig, 1_000_000), Ok(()));
        for other in [
            CallParts { host: "127.0.0.1:8001", ..c },
            call("GET", "/task", "127.0.0.1:7000", b"{}"),
            call("POST", "/internal/sync", "127.0.0.1:7000", b"{}"),
            call("POST", "/task", "127.0.0.1:7001", b"{}"),
            call("POST", "/task", "127.0.0.1:7000", b"{ }"),
        ] {
            assert_eq!(check(&fresh(), &other, &sig, 1_000_000), Err(AuthError::BadMac), "{other:?}");
        }
        let wrong = Verifier::new(Secret::new(Some("other")));
        assert_eq!(check(&wrong, &c, &sig, 1_000_000), Err(AuthError::BadMac));
        let moved = Signature { time_ms: sig.time_ms + 1, ..sig.clone() };
        assert_eq!(check(&fresh(), &c, &moved, 1_000_000), Err(AuthError::BadMac));
        assert_eq!(
            fresh().verify_at(&c, None, Some(&sig.nonce), Some(&sig.mac), 1),
            Err(AuthError::Missing(TIME_HEADER))
        );
    }

    #[test]
    fn replays_and_stale_calls_are_refused() {
        let s = Secret::new(Some("k"));
        let v = Verifier::new(s.clone());
        let c = call("GET", "/file/1-0", "127.0.0.1:7000", b"");
        let sig = s.sign_at(&c, 1_000_000).unwrap();
        assert_eq!(check(&v, &c, &sig, 1_000_000), Ok(()));
        assert_eq!(check(&v, &c, &sig, 1_000_500), Err(AuthError::Replayed));
        // Past the window the nonce is forgotten, but the time check refuses the call.
        assert!(matches!(check(&v, &c, &sig, 1_000_000 + 31_000), Err(AuthError::Stale(_))));
        let future = s.sign_at(&c, 2_000_000).unwrap();
        assert!(matches!(check(&v, &c, &future, 1_000_000), Err(AuthError::Stale(_))));
    }

    #[test]
    fn without_a_secret_nothing_is_signed_or_checked() {
        let open = Secret::new(None);
        assert!(!open.is_set());
        assert!(Secret::new(Some("")).sign(&call("GET", "/", "", b"")).is_none());
        assert_eq!(Verifier::new(open).verify(&call("GET", "/x", "", b""), None, None, None), Ok(()));
    }

    proptest! {
        /// Any change to one byte of the body or of the MAC is refused.
        #[test]
        fn any_flipped_bit_is_refused(body in proptest::collection::vec(any::<u8>(), 1..64), pos in any::<usize>(), bit in 0u8..8, in_mac in any::<bool>()) {
            let s = Secret::new(Some("secret"));
            let c = call("POST", "/internal/replicate", "10.0.0.1:7000", &body);
            let sig = s.sign_at(&c, 5_000_000).unwrap();
            let v = Verifier::new(s);
            if in_mac {
                let mut mac = hex::decode(&sig.mac).unwrap();
                let i = pos % mac.len();
                mac[i] ^= 1 << bit;
                let bad = Signature { mac: hex::encode(mac), ..sig };
                prop_assert_eq!(check(&v, &c, &bad, 5_000_000), Err(AuthError::BadMac));
            } else {
                let mut changed = body.clone();
                let i = pos % changed.len();
                changed[i] ^= 1 << bit;
                let c2 = call("POST", "/internal/replicate", "10.0.0.1:7000", &changed);
                prop_assert_eq!(check(&v, &c2, &sig, 5_000_000), Err(AuthError::BadMac));
            }
        }
    }
}
