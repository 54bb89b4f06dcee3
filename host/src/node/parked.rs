//! Backpressure per peer: the application's sends that wait for their destinations'
//! connections to catch up.
//!
//! A send to a node whose connection has more than [`super::HIGH_WATER`] bytes waiting to
//! be written waits here (its caller's `send` does not return yet), while sends to every
//! other node go out at once. Waiting sends keep their order: a send waits as well when a
//! send before it to one of the same nodes is still waiting, so no node receives a later
//! message before an earlier one. What waits is bounded: the sends' bytes by the node's
//! send permits ([`super::SEND_QUEUE_BYTES`]), their count by [`MAX_PARKED`].

use std::collections::{HashSet, VecDeque};

use aemp_engine::batch;
use aemp_engine::node::PortId;
use tokio::sync::OwnedSemaphorePermit;

use super::Reply;
use crate::sandbox::wit_node::Batch;

/// Sends that may wait at once; past it the driver takes no more commands.
pub(super) const MAX_PARKED: usize = 1024;

/// One call of the application's `send`, as the driver carries it out.
pub(super) struct Send {
    pub(super) batch: Batch,
    pub(super) reply: Reply<()>,
    /// The share of the node's send bytes this send holds until it is carried out.
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

/// A send waiting, with the nodes it is for.
struct Waiting {
    send: Send,
    nodes: Vec<String>,
}

/// Sends waiting for slow peers, in arrival order.
#[derive(Default)]
pub(super) struct Parked {
    waiting: VecDeque<Waiting>,
}

impl Parked {
    /// How many sends wait.
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Whether `send` must wait: a node it is for is `slow`, or has sends waiting for it.
    /// `Err` gives it back to be carried out now.
    pub(super) fn park(&mut self, send: Send, slow: impl Fn(&str) -> bool) -> Result<(), Send> {
        let nodes = destinations(&send.batch);
        let behind =
            |node: &String| slow(node) || self.waiting.iter().any(|w| w.nodes.contains(node));
        if nodes.iter().any(behind) {
            self.waiting.push_back(Waiting { send, nodes });
            Ok(())
        } else {
            Err(send)
        }
    }

    /// Takes out, in order, the sends that need wait no longer: none of their nodes is
    /// `slow`, and no send before them still waits for one of their nodes.
    pub(super) fn release(&mut self, slow: impl Fn(&str) -> bool) -> Vec<Send> {
        let mut ready = Vec::new();
        let mut blocked: HashSet<String> = HashSet::new();
        for w in std::mem::take(&mut self.waiting) {
            if w.nodes.iter().any(|n| blocked.contains(n) || slow(n)) {
                blocked.extend(w.nodes.iter().cloned());
                self.waiting.push_back(w);
            } else {
                ready.push(w.send);
            }
        }
        ready
    }
}

/// The nodes the messages of `batch` are for, once each (a bare node id is its node
/// port; what is not a port id at all is left to the engine to refuse).
fn destinations(batch: &Batch) -> Vec<String> {
    let mut nodes: Vec<String> = Vec::new();
    for (port, _) in batch::pairs(&batch.data, &batch.sizes).flatten() {
        if let Some(PortId { node, .. }) = PortId::parse(port)
            && !nodes.iter().any(|n| n == node)
        {
            nodes.push(node.to_owned());
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::super::NodeError;
    use super::*;

    fn send(ports: &[&str]) -> (Send, tokio::sync::oneshot::Receiver<Result<(), NodeError>>) {
        let mut b = Batch {
            data: Vec::new(),
            sizes: Vec::new(),
        };
        for p in ports {
            batch::push(&mut b.data, &mut b.sizes, p, &[0x80]);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        (
            Send {
                batch: b,
                reply,
                _permit: None,
            },
            rx,
        )
    }

    fn ids(sends: &[Send]) -> Vec<Vec<String>> {
        sends.iter().map(|s| destinations(&s.batch)).collect()
    }

    #[test]
    fn only_sends_to_slow_nodes_wait() {
        let mut parked = Parked::default();
        let slow = |n: &str| n == "slow";
        assert!(parked.park(send(&["fast#p"]).0, slow).is_err());
        assert!(parked.park(send(&["slow#p"]).0, slow).is_ok());
        assert!(parked.park(send(&["fast#p", "slow"]).0, slow).is_ok());
        // Behind a waiting send to one of its nodes: waits too, though fast is fast.
        assert!(parked.park(send(&["fast#q"]).0, slow).is_ok());
        assert!(parked.park(send(&["other#q"]).0, slow).is_err());
        assert_eq!(parked.len(), 3);
        // Still slow: nothing moves.
        assert!(parked.release(slow).is_empty());
        // Caught up: all go, in order.
        let out = parked.release(|_| false);
        assert_eq!(
            ids(&out),
            [vec!["slow"], vec!["fast", "slow"], vec!["fast"]]
        );
        assert!(parked.is_empty());
    }

    #[test]
    fn a_send_is_released_only_behind_the_earlier_ones_for_its_nodes() {
        let mut parked = Parked::default();
        let slow_a = |n: &str| n == "a";
        parked.park(send(&["a#p", "b#p"]).0, slow_a).ok();
        parked.park(send(&["b#q"]).0, slow_a).ok();
        parked.park(send(&["c#q"]).0, |n| n == "c").ok();
        // c caught up, a did not: the send to b waits behind the one to a and b.
        let out = parked.release(slow_a);
        assert_eq!(ids(&out), [vec!["c"]]);
        assert_eq!(parked.len(), 2);
        let out = parked.release(|_| false);
        assert_eq!(ids(&out), [vec!["a", "b"], vec!["b"]]);
    }
}
