//! Handing the engine's deliveries to the application's inboxes, with back-pressure.
//!
//! Each local port, each subscribed request tag and each monitored database family has
//! a bounded inbox. What finds its inbox full is held here, in arrival order, and the
//! connections whose reads brought it are not read again until nothing is held (so TCP
//! pushes back on the peers that fill a port, not on every peer); past [`HELD_MAX`] bytes
//! held no connection is read. The application's own messages to its ports count apart:
//! past a port's capacity of them, the driver takes no more commands. A target that takes
//! nothing for the stall time is stalled: what is held for it, and what finds it full
//! from then on, is dropped (with one warning) until it takes a message again.
//!
//! Nothing here knows the engine or the sockets: the driver tells it whose input the
//! engine is handling, and asks which connections it may read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::time::Duration;

use aemp_engine::printable;
use tokio::time::Instant;

use super::inbox::{self, Chunk, Inbox, Offer};
use super::info::PortInfo;
use super::subscribe::Topic;

/// Bytes of held messages past which no connection reads on, whoever sent them. Below
/// it only the connections whose reads had messages held wait, so a port that is behind
/// stops its senders, not the node: a new peer's handshake and messages for other ports
/// go on.
const HELD_MAX: usize = 32 << 20;

/// How often held messages are offered again to their inboxes.
const HELD_RETRY: Duration = Duration::from_millis(10);

/// An inbox messages are delivered to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Target {
    /// A local port, by its id.
    Port(String),
    /// The requests of a tag, or the changes of a database family.
    Topic(Topic),
}

/// A [`Target`] borrowed, so that a delivery needs no allocation to find its inbox.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    Port(&'a str),
    Topic(&'a Topic),
}

impl Key<'_> {
    fn owned(self) -> Target {
        match self {
            Key::Port(port) => Target::Port(port.to_owned()),
            Key::Topic(topic) => Target::Topic(topic.clone()),
        }
    }
}

/// Messages waiting for room in their inbox.
#[derive(Debug)]
struct Held {
    target: Target,
    chunk: Chunk,
    from_app: bool,
}

/// An inbox messages are held for.
#[derive(Debug)]
struct HeldFor {
    /// How many messages.
    count: usize,
    /// When it last took a message (or the first was held).
    progress: Instant,
}

/// The inboxes and what is held for them.
#[derive(Debug)]
pub(super) struct Deliveries {
    ports: HashMap<String, Inbox>,
    topics: HashMap<Topic, Inbox>,
    /// Messages an inbox holds, at most.
    capacity: usize,
    /// Bytes of messages an inbox holds, about (see [`inbox::inbox`]).
    capacity_bytes: usize,
    /// How long an inbox may take nothing before it is stalled.
    stall: Duration,
    /// In arrival order.
    held: VecDeque<Held>,
    /// What `held` counts toward [`HELD_MAX`] (the chunks' bytes).
    held_bytes: usize,
    held_for: HashMap<Target, HeldFor>,
    /// Inboxes that took nothing for `stall`: messages finding them full are dropped.
    stalled: HashSet<Target>,
    /// How many of `held` came from the application's commands, and their bytes.
    held_app: usize,
    held_app_bytes: usize,
    /// Whether what is delivered now answers the application's commands.
    from_app: bool,
    /// The connection whose input is being handled, if any.
    source: Option<u64>,
    /// The connections not read while messages are held.
    paused: HashSet<u64>,
    /// Whether the last round read every connection (nothing was held).
    reading: bool,
}

impl Deliveries {
    /// No inboxes yet; each will hold `capacity` messages and about `capacity_bytes`.
    pub(super) fn new(capacity: usize, capacity_bytes: usize, stall: Duration) -> Deliveries {
        Deliveries {
            ports: HashMap::new(),
            topics: HashMap::new(),
            capacity,
            capacity_bytes,
            stall,
            held: VecDeque::new(),
            held_bytes: 0,
            held_for: HashMap::new(),
            stalled: HashSet::new(),
            held_app: 0,
            held_app_bytes: 0,
            from_app: false,
            source: None,
            paused: HashSet::new(),
            reading: true,
        }
    }

    /// A new inbox for `target`, replacing the one it had: what is held for the old one
    /// goes to the new one.
    pub(super) fn open(&mut self, target: Target) -> inbox::Receiver {
        let (tx, rx) = inbox::inbox(self.capacity, self.capacity_bytes);
        self.stalled.remove(&target);
        match target {
            Target::Port(port) => self.ports.insert(port, tx),
            Target::Topic(topic) => self.topics.insert(topic, tx),
        };
        rx
    }

    /// Closes `target`'s inbox: what comes for it from now on is dropped.
    pub(super) fn close(&mut self, target: &Target) {
        match target {
            Target::Port(port) => self.ports.remove(port),
            Target::Topic(topic) => self.topics.remove(topic),
        };
        self.stalled.remove(target);
    }

    /// Closes `topic`'s inbox if its receiver is gone (a newer one that replaced it stays
    /// open); returns whether it did.
    pub(super) fn close_if_gone(&mut self, topic: &Topic) -> bool {
        let gone = self.topics.get(topic).is_some_and(Inbox::is_closed);
        if gone {
            self.close(&Target::Topic(topic.clone()));
        }
        gone
    }

    /// Every port's inbox depth (messages held for a full inbox counted too), by id.
    pub(super) fn ports(&self) -> Vec<PortInfo> {
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let mut ports: Vec<PortInfo> = self
            .ports
            .iter()
            .map(|(port, inbox)| {
                let (count, bytes) = inbox.depth();
                let held = self
                    .held_for
                    .get(&Target::Port(port.clone()))
                    .map_or(0, |h| h.count);
                PortInfo {
                    port: port.clone(),
                    messages: wide(count.saturating_add(held)),
                    bytes: wide(bytes),
                }
            })
            .collect();
        ports.sort_by(|a, b| a.port.cmp(&b.port));
        ports
    }

    /// What is delivered from now on answers the application's commands (or not).
    pub(super) fn set_from_app(&mut self, from_app: bool) {
        self.from_app = from_app;
    }

    /// Whether the driver may take the application's commands: not while its messages to
    /// its own ports fill an inbox's capacity.
    pub(super) fn takes_commands(&self) -> bool {
        self.held_app < self.capacity && self.held_app_bytes < self.capacity_bytes
    }

    /// Starts a round of reads (of peers' input, not the application's); returns whether
    /// every connection is to be read again: nothing is held any more and some were passed
    /// over since messages were held (even when the last round saw nothing held).
    pub(super) fn begin_round(&mut self) -> bool {
        self.from_app = false;
        let reading = self.held.is_empty();
        let resume = reading && (!self.reading || !self.paused.is_empty());
        if resume {
            self.paused.clear();
        }
        self.reading = reading;
        resume
    }

    /// Whether connection `conn` may be read this round.
    pub(super) fn may_read(&self, conn: u64) -> bool {
        self.held_bytes <= HELD_MAX && !self.paused.contains(&conn)
    }

    /// The connection whose input the engine handles now: if what it brings fills an
    /// inbox, it waits.
    pub(super) fn read(&mut self, conn: u64) {
        self.source = Some(conn);
    }

    /// Hands messages to a local port.
    pub(super) fn deliver_port(&mut self, port: &str, chunk: Chunk) {
        self.deliver(Key::Port(port), chunk);
    }

    /// Hands a request or a database change to its subscriber.
    pub(super) fn deliver_topic(&mut self, topic: &Topic, chunk: Chunk) {
        self.deliver(Key::Topic(topic), chunk);
    }

    /// Offers `chunk` to its inbox; holds what does not fit (and everything while
    /// messages for it are held already, to keep their order); drops it when the inbox is
    /// stalled or gone.
    fn deliver(&mut self, key: Key<'_>, mut chunk: Chunk) {
        let inbox = match key {
            Key::Port(port) => self.ports.get(port),
            Key::Topic(topic) => self.topics.get(topic),
        };
        let Some(inbox) = inbox else {
            return;
        };
        // (The emptiness checks spare building a key per delivery.)
        if self.held_for.is_empty() || !self.held_for.contains_key(&key.owned()) {
            let offered = inbox.offer(&mut chunk);
            if !self.stalled.is_empty() && !matches!(offered, Offer::Full { taken: 0 }) {
                self.stalled.remove(&key.owned());
            }
            match offered {
                Offer::Taken | Offer::Closed => return,
                // Logged once, when it stalled.
                Offer::Full { .. }
                    if !self.stalled.is_empty() && self.stalled.contains(&key.owned()) =>
                {
                    return;
                }
                Offer::Full { .. } => {}
            }
        }
        self.hold(key.owned(), chunk);
    }

    fn hold(&mut self, target: Target, chunk: Chunk) {
        let n = chunk.len();
        let held = self.held_for.entry(target.clone()).or_insert(HeldFor {
            count: 0,
            progress: Instant::now(),
        });
        held.count = held.count.saturating_add(n);
        self.held_bytes = self.held_bytes.saturating_add(chunk.bytes());
        if self.from_app {
            self.held_app = self.held_app.saturating_add(n);
            self.held_app_bytes = self.held_app_bytes.saturating_add(chunk.bytes());
        } else {
            // What this connection sent filled an inbox: it waits.
            self.paused.extend(self.source);
        }
        self.held.push_back(Held {
            target,
            chunk,
            from_app: self.from_app,
        });
    }

    /// Whether messages are held.
    #[cfg(test)]
    fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Resolves when it is time to offer the held messages again: the inbox the first is
    /// for has room for half an inbox (or all held for it), or a moment passed (for the
    /// other inboxes, and to notice stalls). Never, when nothing is held. (Waking per
    /// message taken would cost a task switch per message.)
    pub(super) fn room(&self) -> impl Future<Output = ()> + use<> {
        let waiting = self.held.front().map(|h| {
            let held = self.held_for.get(&h.target).map_or(1, |p| p.count);
            let want = held.min(self.capacity.div_ceil(2));
            self.inbox(&h.target).map(|inbox| inbox.room(want))
        });
        async move {
            match waiting {
                Some(Some(room)) => {
                    let _ = tokio::time::timeout(HELD_RETRY, room).await;
                }
                // Its inbox is gone: offering again drops what was held for it.
                Some(None) => {}
                None => std::future::pending().await,
            }
        }
    }

    fn inbox(&self, target: &Target) -> Option<&Inbox> {
        match target {
            Target::Port(port) => self.ports.get(port),
            Target::Topic(topic) => self.topics.get(topic),
        }
    }

    /// Moves held messages into their inboxes, in order for each, and stalls the inboxes
    /// that took nothing for the stall time.
    pub(super) fn deliver_held(&mut self) {
        let now = Instant::now();
        let mut full = HashSet::new();
        let mut kept = VecDeque::new();
        for mut h in std::mem::take(&mut self.held) {
            if full.contains(&h.target) {
                kept.push_back(h);
                continue;
            }
            let (before, before_bytes) = (h.chunk.len(), h.chunk.bytes());
            let offered = match self.inbox(&h.target) {
                Some(inbox) => inbox.offer(&mut h.chunk),
                None => Offer::Closed,
            };
            // Taken, or gone with the inbox: either way no longer held.
            let (done, done_bytes) = match offered {
                Offer::Taken | Offer::Closed => (before, before_bytes),
                Offer::Full { taken } => (taken, before_bytes.saturating_sub(h.chunk.bytes())),
            };
            self.held_bytes = self.held_bytes.saturating_sub(done_bytes);
            if h.from_app {
                self.held_app = self.held_app.saturating_sub(done);
                self.held_app_bytes = self.held_app_bytes.saturating_sub(done_bytes);
            }
            if let Some(p) = self.held_for.get_mut(&h.target) {
                p.count = p.count.saturating_sub(done);
                if done > 0 {
                    p.progress = now;
                }
                if p.count == 0 {
                    self.held_for.remove(&h.target);
                }
            }
            if let Offer::Full { .. } = offered {
                full.insert(h.target.clone());
                kept.push_back(h);
            }
        }
        self.held = kept;
        let stalled: Vec<Target> = self
            .held_for
            .iter()
            .filter(|(_, p)| now >= p.progress + self.stall)
            .map(|(target, _)| target.clone())
            .collect();
        for target in stalled {
            let dropped: usize = self
                .held
                .iter()
                .filter(|h| h.target == target)
                .map(|h| h.chunk.len())
                .sum();
            self.held.retain(|h| h.target != target);
            tracing::warn!(
                "{} took no message for {} ms: dropped {dropped} messages for it",
                target,
                self.stall.as_millis(),
            );
            self.held_for.remove(&target);
            self.stalled.insert(target);
            let from_app = self.held.iter().filter(|h| h.from_app);
            self.held_app = from_app.clone().map(|h| h.chunk.len()).sum();
            self.held_app_bytes = from_app.map(|h| h.chunk.bytes()).sum();
            self.held_bytes = self.held.iter().map(|h| h.chunk.bytes()).sum();
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Port(port) => write!(f, "port {}", printable(port)),
            Target::Topic(Topic::Requests(tag)) => {
                write!(f, "the handler of requests {}", printable(tag))
            }
            Target::Topic(Topic::Db(family)) => {
                write!(f, "the monitor of family {}", printable(family))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(n: u8) -> Chunk {
        Chunk::single(vec![0x81, n])
    }

    fn port(id: &str) -> Target {
        Target::Port(id.into())
    }

    async fn take_all(rx: &mut inbox::Receiver) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(1), rx.take(usize::MAX)).await
        {
            got.extend(m.iter().map(<[u8]>::to_vec));
        }
        got
    }

    #[tokio::test]
    async fn a_full_port_pauses_the_connections_that_filled_it_until_it_takes_them() {
        let mut d = Deliveries::new(2, 1 << 20, Duration::from_secs(10));
        let mut rx = d.open(port("n#a"));
        let _other = d.open(port("n#b"));
        assert!(!d.begin_round());
        d.read(7);
        for n in 0..3 {
            d.deliver_port("n#a", one(n));
        }
        // Another port is not held up by it.
        d.deliver_port("n#b", one(9));
        assert!(d.holds());
        assert!(!d.may_read(7), "the connection that filled the port waits");
        assert!(d.may_read(8), "other connections read on");
        assert!(
            d.takes_commands(),
            "peers' messages do not stop the application"
        );
        assert!(!d.begin_round(), "nothing resumes while messages are held");

        assert_eq!(take_all(&mut rx).await, [vec![0x81, 0], vec![0x81, 1]]);
        d.deliver_held();
        assert!(!d.holds());
        assert!(d.begin_round(), "every connection is read again");
        assert!(d.may_read(7));
        assert_eq!(take_all(&mut rx).await, [vec![0x81, 2]]);
    }

    #[tokio::test]
    async fn messages_behind_held_ones_keep_their_order() {
        let mut d = Deliveries::new(1, 1 << 20, Duration::from_secs(10));
        let mut rx = d.open(port("n#a"));
        d.deliver_port("n#a", one(0));
        d.deliver_port("n#a", one(1));
        assert_eq!(take_all(&mut rx).await, [vec![0x81, 0]]);
        // The inbox has room now, but 1 is held: 2 goes behind it.
        d.deliver_port("n#a", one(2));
        assert!(take_all(&mut rx).await.is_empty());
        d.deliver_held();
        assert_eq!(take_all(&mut rx).await, [vec![0x81, 1]]);
        d.deliver_held();
        assert_eq!(take_all(&mut rx).await, [vec![0x81, 2]]);
    }

    #[tokio::test]
    async fn the_applications_own_messages_stop_its_commands_at_a_ports_capacity() {
        let mut d = Deliveries::new(2, 1 << 20, Duration::from_secs(10));
        let mut rx = d.open(port("n#a"));
        d.set_from_app(true);
        for n in 0..4 {
            d.deliver_port("n#a", one(n));
        }
        assert!(!d.takes_commands());
        assert!(
            d.may_read(7),
            "peers are not paused for the application's messages"
        );
        take_all(&mut rx).await;
        d.deliver_held();
        assert!(d.takes_commands());
    }

    #[tokio::test]
    async fn a_port_that_takes_nothing_is_stalled_until_it_takes_a_message() {
        let mut d = Deliveries::new(1, 1 << 20, Duration::from_millis(20));
        let mut rx = d.open(port("n#a"));
        d.read(7);
        d.deliver_port("n#a", one(0));
        d.deliver_port("n#a", one(1));
        tokio::time::sleep(Duration::from_millis(30)).await;
        d.deliver_held();
        assert!(!d.holds(), "what was held for a stalled port is dropped");
        assert!(d.begin_round(), "its senders are read again");
        // Finding it full now drops at once; room un-stalls it.
        d.deliver_port("n#a", one(2));
        assert!(!d.holds());
        assert_eq!(take_all(&mut rx).await, [vec![0x81, 0]]);
        d.deliver_port("n#a", one(3));
        d.deliver_port("n#a", one(4));
        assert!(d.holds(), "a port that took a message is held for again");
    }

    #[tokio::test]
    async fn a_closed_inbox_drops_what_is_held_for_it() {
        let mut d = Deliveries::new(1, 1 << 20, Duration::from_secs(10));
        let rx = d.open(Target::Topic(Topic::Db("f".into())));
        let topic = Topic::Db("f".into());
        d.deliver_topic(&topic, one(0));
        d.deliver_topic(&topic, one(1));
        assert!(d.holds());
        assert!(!d.close_if_gone(&topic), "its receiver is still there");
        drop(rx);
        assert!(d.close_if_gone(&topic));
        d.deliver_held();
        assert!(!d.holds());
        // With nothing held there is nothing to wait for.
        tokio::time::timeout(Duration::from_millis(30), d.room())
            .await
            .expect_err("nothing held: never ready");
    }
}
