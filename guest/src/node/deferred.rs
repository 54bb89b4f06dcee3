//! Messages for connections that the node's outputs have no room for yet.
//!
//! One request can make the node send far more than it received: a change of a family
//! goes to every node monitoring it, one copy per connection, and twenty watchers of a
//! 12 MiB entry would need 240 MiB of outputs in one call (past the sandbox). The node
//! encodes such a message once and shares it; a connection takes its copy only while the
//! outputs the host has not polled yet stay within the node's budget. The rest wait here,
//! in order per connection, and are released as the host polls (round robin over the
//! connections, so that one slow fan-out does not starve the others).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::ConnId;

/// A message as the node holds it while it waits: shared by every connection it is for.
pub(super) type Shared = Arc<[u8]>;

/// One connection's waiting messages.
#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Shared>,
    /// Their lengths, summed (a shared message counts for each connection it waits for).
    bytes: usize,
}

/// The waiting messages of every connection.
#[derive(Debug, Default)]
pub(super) struct Deferred {
    queues: BTreeMap<ConnId, Queue>,
    /// Connections with waiting messages, in the order they get their next turn.
    turns: VecDeque<ConnId>,
    /// The bytes of the distinct messages held, as of the last [`Deferred::recount`]
    /// plus what was deferred since (an estimate from above between recounts).
    held: usize,
}

/// A connection has more waiting than its bound: the node closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Overflow;

impl Deferred {
    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Whether messages wait for `conn` (what it sends next must wait behind them).
    pub(super) fn waits(&self, conn: ConnId) -> bool {
        !self.queues.is_empty() && self.queues.contains_key(&conn)
    }

    /// Memory the waiting messages take (each shared message once).
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// Queues `message` for `conn`, unless `conn` already has messages waiting and this
    /// one would take it past `bound` bytes.
    pub(super) fn push(
        &mut self,
        conn: ConnId,
        message: Shared,
        bound: usize,
    ) -> Result<(), Overflow> {
        let queue = self.queues.entry(conn).or_default();
        let bytes = queue.bytes.saturating_add(message.len());
        if !queue.messages.is_empty() && bytes > bound {
            return Err(Overflow);
        }
        if queue.messages.is_empty() {
            self.turns.push_back(conn);
        }
        // Shared by nobody else yet (the caller's reference aside): new memory.
        if Arc::strong_count(&message) <= 2 {
            self.held = self.held.saturating_add(message.len());
        }
        queue.bytes = bytes;
        queue.messages.push_back(message);
        Ok(())
    }

    /// The next waiting message (from the connection whose turn it is) if it is at most
    /// `room` bytes long, or whatever its length when `any` is set.
    pub(super) fn pop(&mut self, room: usize, any: bool) -> Option<(ConnId, Shared)> {
        let &conn = self.turns.front()?;
        let queue = self.queues.get_mut(&conn)?;
        let len = queue.messages.front()?.len();
        if len > room && !any {
            return None;
        }
        let message = queue.messages.pop_front()?;
        queue.bytes = queue.bytes.saturating_sub(len);
        self.turns.pop_front();
        if queue.messages.is_empty() {
            self.queues.remove(&conn);
        } else {
            self.turns.push_back(conn);
        }
        Some((conn, message))
    }

    /// Forgets what waits for `conn` (it is gone).
    pub(super) fn remove(&mut self, conn: ConnId) {
        if self.queues.remove(&conn).is_some() {
            self.turns.retain(|&c| c != conn);
        }
    }

    /// Brings [`Deferred::held`] up to date: the distinct messages still waiting.
    pub(super) fn recount(&mut self) {
        let mut seen = BTreeSet::new();
        self.held = self
            .queues
            .values()
            .flat_map(|q| &q.messages)
            .filter(|m| seen.insert(m.as_ptr()))
            .map(|m| m.len())
            .sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ConnId = ConnId(1);
    const B: ConnId = ConnId(2);

    #[test]
    fn connections_take_turns_and_keep_their_order() {
        let mut d = Deferred::default();
        let shared: Shared = Arc::from(&b"shared"[..]);
        for conn in [A, B] {
            d.push(conn, shared.clone(), 100).unwrap();
        }
        d.push(A, Arc::from(&b"one"[..]), 100).unwrap();
        d.recount();
        assert_eq!(d.held(), 9, "the shared message counts once");
        assert!(d.waits(A) && d.waits(B) && !d.waits(ConnId(3)));
        let mut got = Vec::new();
        while let Some((conn, m)) = d.pop(usize::MAX, false) {
            got.push((conn, m.to_vec()));
        }
        assert_eq!(
            got,
            [
                (A, b"shared".to_vec()),
                (B, b"shared".to_vec()),
                (A, b"one".to_vec())
            ]
        );
        assert!(d.is_empty() && !d.waits(A));
        d.recount();
        assert_eq!(d.held(), 0);
    }

    #[test]
    fn room_and_bounds() {
        let mut d = Deferred::default();
        // The first message waits whatever its length; more past the bound do not.
        d.push(A, Arc::from(&[0u8; 50][..]), 10).unwrap();
        assert_eq!(d.push(A, Arc::from(&[0u8; 1][..]), 10), Err(Overflow));
        assert_eq!(d.pop(49, false), None);
        assert_eq!(d.pop(49, true).map(|(c, m)| (c, m.len())), Some((A, 50)));
        d.push(B, Arc::from(&[0u8; 5][..]), 10).unwrap();
        d.remove(B);
        assert!(d.is_empty());
    }
}
