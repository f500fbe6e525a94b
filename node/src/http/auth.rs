//! Authentication of internal HTTP calls between members when a cluster secret is set: the
//! caller sends `x-cdtester-mac: hex(HMAC-SHA256(secret, path "\n" body))`. Without a secret
//! nothing is signed and nothing is checked (the network is open, as the reference's).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying the MAC.
pub const MAC_HEADER: &str = "x-cdtester-mac";
/// Header carrying the caller's UDP address (its identity as a member).
pub const NODE_HEADER: &str = "x-cdtester-node";

/// The cluster secret (or none).
#[derive(Clone, Default)]
pub struct Secret(Option<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Secret(set)" } else { "Secret(none)" })
    }
}

impl Secret {
    pub fn new(secret: Option<&str>) -> Secret {
        Secret(secret.filter(|s| !s.is_empty()).map(|s| s.as_bytes().to_vec()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn mac(key: &[u8], path: &str, body: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// The MAC header value for a call, `None` without a secret.
    pub fn sign(&self, path: &str, body: &[u8]) -> Option<String> {
        self.0.as_ref().map(|k| hex::encode(Self::mac(k, path, body).finalize().into_bytes()))
    }

    /// Whether a call carries a valid MAC (always true without a secret).
    pub fn verify(&self, path: &str, body: &[u8], header: Option<&str>) -> bool {
        let Some(key) = &self.0 else { return true };
        let Some(bytes) = header.and_then(|h| hex::decode(h.trim()).ok()) else { return false };
        Self::mac(key, path, body).verify_slice(&bytes).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_path_body_and_secret() {
        let s = Secret::new(Some("k"));
        let mac = s.sign("/task", b"{}").unwrap();
        assert!(s.verify("/task", b"{}", Some(&mac)));
        assert!(!s.verify("/task", b"{ }", Some(&mac)));
        assert!(!s.verify("/file/x", b"{}", Some(&mac)));
        assert!(!s.verify("/task", b"{}", None));
        assert!(!Secret::new(Some("other")).verify("/task", b"{}", Some(&mac)));
        let open = Secret::new(None);
        assert!(open.sign("/task", b"").is_none());
        assert!(open.verify("/task", b"", None));
    }
}
