//! The accepted connections still in their handshake, and which one makes room when a
//! new one arrives at the cap (`NodeConfig::max_handshakes`).
//!
//! Closing the newcomer at the cap would hand the node to whoever fills the table first:
//! an attacker that keeps it full of silent connections locks every peer out. Closing the
//! oldest handshake instead gives every connection the time that `max_handshakes` newer
//! ones take to arrive, so a peer that completes its handshake in milliseconds gets
//! through however many silent ones come and go. The oldest is taken from the source
//! address holding the most handshakes, so that where addresses differ the flood pays
//! for itself first.

use std::collections::BTreeMap;

use super::ConnId;

/// Accepted connections in their handshake, in accept order, counted per source host.
#[derive(Debug, Default)]
pub(super) struct Handshakes {
    /// Accept order -> the connection and its source host.
    order: BTreeMap<u64, (ConnId, String)>,
    /// Source host -> how many of `order` came from it.
    per_host: BTreeMap<String, usize>,
    next: u64,
}

impl Handshakes {
    /// How many connections are in their handshake.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// Adds `conn`, accepted from `addr` (`host:port`); returns its place, for
    /// [`Handshakes::remove`].
    pub(super) fn insert(&mut self, conn: ConnId, addr: &str) -> u64 {
        let seq = self.next;
        self.next = self.next.saturating_add(1);
        let host = host(addr).to_owned();
        let held = self.per_host.entry(host.clone()).or_default();
        *held = held.saturating_add(1);
        self.order.insert(seq, (conn, host));
        seq
    }

    /// Removes the connection at `seq` (authenticated, or gone).
    pub(super) fn remove(&mut self, seq: u64) {
        let Some((_, host)) = self.order.remove(&seq) else {
            return;
        };
        if let Some(count) = self.per_host.get_mut(&host) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_host.remove(&host);
            }
        }
    }

    /// The connection to close to make room: the oldest handshake of the host holding
    /// the most (of the hosts holding as many, the one with the oldest handshake).
    pub(super) fn victim(&self) -> Option<ConnId> {
        let most = self.per_host.values().copied().max()?;
        self.order
            .values()
            .find(|(_, host)| self.per_host.get(host) == Some(&most))
            .map(|&(conn, _)| conn)
    }
}

/// The host part of `host:port` (`[v6]:port` keeps its brackets); the whole text when
/// there is no port.
fn host(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_makes_room() {
        let mut h = Handshakes::default();
        let a = h.insert(ConnId::from(1), "10.0.0.1:1000");
        h.insert(ConnId::from(2), "10.0.0.2:1000");
        assert_eq!(h.victim(), Some(ConnId::from(1)));
        h.remove(a);
        assert_eq!(h.victim(), Some(ConnId::from(2)));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_busiest_host_makes_room_first() {
        let mut h = Handshakes::default();
        h.insert(ConnId::from(1), "10.0.0.1:1000");
        h.insert(ConnId::from(2), "10.0.0.2:1000");
        h.insert(ConnId::from(3), "10.0.0.2:1001");
        assert_eq!(h.victim(), Some(ConnId::from(2)));
        h.insert(ConnId::from(4), "[::1]:5");
        h.insert(ConnId::from(5), "[::1]:6");
        h.insert(ConnId::from(6), "[::1]:7");
        assert_eq!(h.victim(), Some(ConnId::from(4)));
    }

    #[test]
    fn hosts_are_told_apart_from_ports() {
        assert_eq!(host("127.0.0.1:4040"), "127.0.0.1");
        assert_eq!(host("[::1]:4040"), "[::1]");
        assert_eq!(host("unix-socket"), "unix-socket");
        assert_eq!(host("weird:"), "weird:");
    }

    #[test]
    fn removing_twice_is_harmless() {
        let mut h = Handshakes::default();
        let a = h.insert(ConnId::from(1), "h:1");
        h.remove(a);
        h.remove(a);
        assert_eq!(h.len(), 0);
        assert_eq!(h.victim(), None);
    }
}
