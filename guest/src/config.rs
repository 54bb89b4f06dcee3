//! Configuration of one connection.

use crate::auth::AuthMethod;
use crate::error::ConfigError;
use crate::framing::{Framing, Limits};
use crate::value::MAX_DEPTH;

/// How this side of a connection greets, authenticates and frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Our node id (free text without `;`, `#`, CR, LF; host-side expansion of `%n` etc.
    /// is done before it gets here).
    pub node_id: String,
    /// `aemp`, or `aemp-NAME` to ask for an upgraded protocol.
    pub protocol: String,
    /// The shared secret; empty counts as none, as in the reference.
    pub secret: Option<Vec<u8>>,
    /// Whether the host can run TLS (has a certificate); announced as `tls=1.0`.
    pub tls: bool,
    /// Methods we may send, in no particular order (the remote's order decides).
    pub auth_offer: Vec<AuthMethod>,
    /// Methods we accept from the remote, announced in preference order.
    pub auth_accept: Vec<AuthMethod>,
    /// Framings we understand, announced in preference order.
    pub framings: Vec<Framing>,
    /// Extra `KEY=VALUE` pairs for our first greeting line (e.g. `mproto`, `gproto`); a
    /// `provider` pair replaces the engine's own (`aemp-VERSION`).
    pub greeting: Vec<(String, String)>,
    /// The remote address as seen locally, announced as `peeraddr`.
    pub peer_addr: Option<String>,
    /// Milliseconds the whole handshake may take (the reference's `monitor_timeout`).
    pub monitor_timeout_ms: u64,
    /// Send a keepalive after this many milliseconds without sending anything; `None`
    /// sends none (the reference relies on TCP keepalive unless a node has no listener).
    pub keepalive_interval_ms: Option<u64>,
    /// Limits on messages in both directions.
    pub limits: Limits,
}

impl Config {
    /// A configuration with the reference's defaults: accepts all four auth methods,
    /// offers `tls_sha3_512` and `hmac_sha3_512`, framings `cbor,json`, 30 s handshake.
    pub fn new(node_id: impl Into<String>) -> Config {
        Config {
            node_id: node_id.into(),
            protocol: "aemp".into(),
            secret: None,
            tls: false,
            auth_offer: vec![AuthMethod::TlsSha3_512, AuthMethod::HmacSha3_512],
            auth_accept: AuthMethod::ALL.to_vec(),
            framings: Framing::ALL.to_vec(),
            greeting: Vec::new(),
            peer_addr: None,
            monitor_timeout_ms: 30_000,
            keepalive_interval_ms: None,
            limits: Limits::default(),
        }
    }

    /// The secret, if one is set and non-empty.
    pub(crate) fn secret(&self) -> Option<&[u8]> {
        self.secret.as_deref().filter(|s| !s.is_empty())
    }

    /// Checks what would make our greeting unparsable for the remote.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: &str, extra: &[char]| s.contains(['\r', '\n']) || s.contains(extra);
        if self.node_id.is_empty() || bad(&self.node_id, &[';', '#']) {
            return Err(ConfigError::InvalidNodeId(self.node_id.clone()));
        }
        if !is_protocol(&self.protocol) {
            return Err(ConfigError::InvalidProtocol(self.protocol.clone()));
        }
        if self.framings.is_empty() {
            return Err(ConfigError::NoFraming);
        }
        if self.limits.max_depth > MAX_DEPTH {
            return Err(ConfigError::DepthTooLarge(self.limits.max_depth));
        }
        for (key, value) in &self.greeting {
            if key.is_empty() || bad(key, &['=']) {
                return Err(ConfigError::InvalidGreetingKey(key.clone()));
            }
            if bad(value, &[]) {
                return Err(ConfigError::InvalidGreetingValue(key.clone()));
            }
        }
        if self.peer_addr.as_deref().is_some_and(|a| bad(a, &[])) {
            return Err(ConfigError::InvalidGreetingValue("peeraddr".into()));
        }
        Ok(())
    }
}

/// `aemp` or `aemp-NAME` with NAME made of word characters (the reference's `^aemp-\w+$`).
pub(crate) fn is_protocol(word: &str) -> bool {
    word == "aemp"
        || word.strip_prefix("aemp-").is_some_and(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(Config::new("a/b").validate(), Ok(()));
        assert!(Config::new("").validate().is_err());
        assert!(Config::new("a;b").validate().is_err());
        assert!(Config::new("a#b").validate().is_err());
        let mut c = Config::new("a");
        c.protocol = "aemp-".into();
        assert!(c.validate().is_err());
        c.protocol = "aemp-dataconn".into();
        assert_eq!(c.validate(), Ok(()));
        c.limits.max_depth = MAX_DEPTH + 1;
        assert_eq!(c.validate(), Err(ConfigError::DepthTooLarge(MAX_DEPTH + 1)));
        c.limits.max_depth = MAX_DEPTH;
        c.greeting.push(("k=".into(), "v".into()));
        assert!(c.validate().is_err());
    }
}
