//! `aemp-soak`: runs a small network (a seed and three workers, sandboxed nodes on loopback
//! TCP) for a while with faults injected, and checks what must hold whatever happens:
//!
//! - every worker sends numbered messages to every other worker's `inbox`; a receiver
//!   never sees a message twice or out of order, and never misses one unless the two
//!   nodes were disconnected about then (a restart, or a disconnect a node reports: a
//!   switch to a newer connection counts), which may also reorder messages around it;
//! - every worker monitors every other worker's `inbox`; a monitor fires at most once, and
//!   every monitor still held at the end fires exactly once when its port goes away;
//! - faults: workers restarted at random (the others see their connections drop), one
//!   slow reader, and bad peers (garbage, deep nesting, a wrong secret) dialling workers.
//!
//! `aemp-soak [--seconds N] [--seed S]`: prints a summary, exits 1 on any violation.
//! The test suite runs it briefly (`tests/soak_smoke.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aemp_engine::Framing;
use aemp_host::{Event, Node, NodeBuilder, Sandbox, Value};
use aemp_tests::RawPeer;
use tokio::io::AsyncWriteExt;

const SECRET: &str = "soak";
const WORKERS: usize = 3;

/// Slack around a disconnect within which lost or reordered messages are put down to it:
/// a node reports a disconnect as an event, which may be seen a little before or after
/// the messages around it.
const SLACK: Duration = Duration::from_secs(2);

/// Something odd in one stream of messages, judged at the end.
#[derive(Debug)]
struct Anomaly {
    pair: (usize, usize),
    what: String,
    /// When the message before it and this one arrived.
    between: (Instant, Instant),
}

/// What the run saw, checked at the end.
#[derive(Debug, Default)]
struct Checker {
    /// Per (sender, sender incarnation, receiver): last sequence number and when it came.
    last: HashMap<(usize, u64, usize), (i128, Instant)>,
    /// Per unordered pair of workers: when either was restarted or reported the other down.
    disconnects: HashMap<(usize, usize), Vec<Instant>>,
    anomalies: Vec<Anomaly>,
    sent: u64,
    received: u64,
    violations: Vec<String>,
    /// Per (watcher, watcher incarnation, target): monitors placed and fired.
    monitors: HashMap<(usize, u64, usize), (u64, u64)>,
    restarts: u64,
    disconnects_seen: u64,
    bad_peers: u64,
    /// Set when the workers are being taken down for the final check.
    ending: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Checker {
    fn disconnect(&mut self, a: usize, b: usize) {
        self.disconnects
            .entry(pair(a, b))
            .or_default()
            .push(Instant::now());
    }

    fn received(&mut self, to: usize, from: usize, incarnation: u64, seq: i128) {
        self.received += 1;
        let now = Instant::now();
        let key = (from, incarnation, to);
        if let Some(&(last, at)) = self.last.get(&key) {
            let what = if seq == last {
                Some(format!("w{to} got #{seq} from w{from}/{incarnation} twice"))
            } else if seq < last {
                Some(format!(
                    "w{to} got #{seq} from w{from}/{incarnation} after #{last}"
                ))
            } else if seq > last + 1 {
                Some(format!(
                    "w{to} missed #{}..#{} from w{from}/{incarnation}",
                    last + 1,
                    seq - 1
                ))
            } else {
                None
            };
            if let Some(what) = what {
                self.anomalies.push(Anomaly {
                    pair: pair(to, from),
                    what,
                    between: (at, now),
                });
            }
        }
        self.last.insert(key, (seq, now));
    }

    /// Anomalies no disconnect explains, and how many were explained.
    fn judge(&self) -> (Vec<String>, usize) {
        let mut unexplained = Vec::new();
        let mut explained = 0;
        for a in &self.anomalies {
            let (from, to) = (a.between.0 - SLACK, a.between.1 + SLACK);
            let near = self
                .disconnects
                .get(&a.pair)
                .is_some_and(|ts| ts.iter().any(|&t| from <= t && t <= to));
            if near && !a.what.ends_with("twice") {
                explained += 1;
            } else {
                unexplained.push(a.what.clone());
            }
        }
        (unexplained, explained)
    }

    /// Counts a monitor placed or fired; true once the run is ending (place no more).
    fn monitor(&mut self, watcher: usize, incarnation: u64, target: usize, fired: bool) -> bool {
        let entry = self
            .monitors
            .entry((watcher, incarnation, target))
            .or_default();
        if fired {
            entry.1 += 1;
            if entry.1 > entry.0 {
                self.violations.push(format!(
                    "w{watcher}/{incarnation}: monitor of w{target}#inbox fired twice"
                ));
            }
        } else {
            entry.0 += 1;
        }
        self.ending
    }
}

type Shared = Arc<Mutex<Checker>>;

fn lock(c: &Shared) -> std::sync::MutexGuard<'_, Checker> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny xorshift generator: the faults are random but repeatable from `--seed`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn name(i: usize) -> String {
    format!("soak-w{i}")
}

/// One incarnation of a worker: its node and the tasks that send, read and monitor.
struct Worker {
    node: Node,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn base(sandbox: &Arc<Sandbox>, id: &str) -> NodeBuilder {
    Node::builder()
        .node_id(id)
        .secret(SECRET)
        .bind("127.0.0.1:0")
        .monitor_timeout(Duration::from_secs(5))
        .sandbox(sandbox.clone())
}

async fn start_worker(
    i: usize,
    incarnation: u64,
    seed: &str,
    sandbox: &Arc<Sandbox>,
    checker: &Shared,
) -> Worker {
    let node = base(sandbox, &name(i))
        .seed(seed)
        .start()
        .await
        .expect("worker starts");
    let mut tasks = Vec::new();
    let mut inbox = node.named_port("inbox").await.expect("inbox");
    let slow = i == 0;
    let c = checker.clone();
    tasks.push(tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(args) = inbox.recv().await {
            if let [Value::Int(from), Value::Int(inc), Value::Int(seq)] = args.as_slice() {
                lock(&c).received(i, *from as usize, *inc as u64, *seq);
            }
            n += 1;
            if slow && n.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }));
    for j in (0..WORKERS).filter(|&j| j != i) {
        let (sender, c) = (node.clone(), checker.clone());
        tasks.push(tokio::spawn(async move {
            let to = format!("{}#inbox", name(j));
            let mut seq = 0;
            loop {
                seq += 1;
                let args = vec![
                    Value::Int(i as i128),
                    Value::Int(incarnation.into()),
                    Value::Int(seq),
                ];
                if sender.send(&to, args).await.is_err() {
                    // A full queue for a node that is away: the same number again later.
                    seq -= 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                lock(&c).sent += 1;
                if seq % 32 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    // Monitors, and disconnects the node reports (each one may lose messages in flight).
    let (watcher, c) = (node.clone(), checker.clone());
    tasks.push(tokio::spawn(async move {
        let mut events = watcher.events();
        let targets: Vec<usize> = (0..WORKERS).filter(|&j| j != i).collect();
        for &j in &targets {
            if watcher.monitor(&format!("{}#inbox", name(j))).await.is_ok() {
                lock(&c).monitor(i, incarnation, j, false);
            }
        }
        loop {
            match events.recv().await {
                Ok(Event::PortDown { port, .. }) => {
                    let Some(j) = targets
                        .iter()
                        .copied()
                        .find(|&j| port == format!("{}#inbox", name(j)))
                    else {
                        continue;
                    };
                    if lock(&c).monitor(i, incarnation, j, true) {
                        continue;
                    }
                    // Watch the port again (of the target's next incarnation).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if watcher.monitor(&port).await.is_ok() {
                        lock(&c).monitor(i, incarnation, j, false);
                    }
                }
                Ok(Event::NodeDown { node, .. }) => {
                    if let Some(j) = targets.iter().copied().find(|&j| node == name(j)) {
                        let mut c = lock(&c);
                        c.disconnects_seen += 1;
                        c.disconnect(i, j);
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    lock(&c)
                        .violations
                        .push(format!("w{i}/{incarnation} lost {n} events"));
                }
                Err(_) => return,
            }
        }
    }));
    Worker { node, tasks }
}

/// A peer that misbehaves against `addr` in one of several ways, then goes away.
async fn bad_peer(addr: &str, kind: u64, n: u64) {
    let id = format!("soak-bad{n}");
    match kind {
        0 => {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                let _ = s.write_all(b"aemp;1;x;y;z\n\xff\xfe garbage\n").await;
            }
        }
        1 => {
            let mut raw = RawPeer::connect_framing(addr, &id, SECRET, Framing::Cbor).await;
            if raw.handshake().await.is_ok() {
                let mut m = vec![0x82, 0x60];
                m.extend(std::iter::repeat_n(0xc6, 10_000));
                m.push(0x80);
                let _ = raw.stream.write_all(&m).await;
            }
        }
        2 => {
            let mut raw = RawPeer::connect(addr, &id, "wrong secret").await;
            let _ = raw.handshake().await;
        }
        _ => {
            let mut raw = RawPeer::connect(addr, &id, SECRET).await;
            if raw.handshake().await.is_ok() {
                raw.send(vec![
                    Value::text(""),
                    Value::text("eval"),
                    Value::text("die"),
                ])
                .await;
                raw.send(vec![Value::text(""), Value::text("snd")]).await;
                let _ = raw.stream.write_all(b"[\"inbox\",{\"a\":").await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn arg(args: &[String], flag: &str) -> Option<u64> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1)?.parse().ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds").unwrap_or(120);
    let seed = arg(&args, "--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("aemp-soak: {seconds} s, seed {seed}");
    let mut rng = Rng(seed | 1);
    let sandbox = Arc::new(Sandbox::new().expect("sandbox"));
    let checker: Shared = Arc::default();
    let seed_node = base(&sandbox, "soak-seed").start().await.expect("seed");
    let seed_addr = seed_node.listen_addrs()[0].to_string();
    let mut incarnations = [0u64; WORKERS];
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        workers.push(Some(
            start_worker(i, 0, &seed_addr, &sandbox, &checker).await,
        ));
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut bad = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
        let i = rng.below(WORKERS as u64) as usize;
        match rng.below(4) {
            0 => {
                // Restart worker i: everyone may lose what was in flight to or from it.
                {
                    let mut c = lock(&checker);
                    c.restarts += 1;
                }
                workers[i] = None;
                {
                    let mut c = lock(&checker);
                    for j in (0..WORKERS).filter(|&j| j != i) {
                        c.disconnect(i, j);
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
                incarnations[i] += 1;
                workers[i] =
                    Some(start_worker(i, incarnations[i], &seed_addr, &sandbox, &checker).await);
            }
            kind => {
                if let Some(w) = &workers[i] {
                    let addr = w.node.listen_addrs()[0].to_string();
                    bad += 1;
                    lock(&checker).bad_peers += 1;
                    bad_peer(&addr, kind - 1 + rng.below(2), bad).await;
                }
            }
        }
    }
    // Quiesce: stop sending, let what is in flight arrive, then take workers down one by
    // one while the others watch: every monitor they hold must fire exactly once.
    for w in workers.iter_mut().flatten() {
        for task in w.tasks.iter().skip(1).take(WORKERS - 1) {
            task.abort();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    lock(&checker).ending = true;
    for (i, worker) in workers.iter_mut().enumerate() {
        *worker = None;
        {
            let mut c = lock(&checker);
            for j in (0..WORKERS).filter(|&j| j != i) {
                c.disconnect(i, j);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The monitors a worker held when it went are gone with it; what it held on workers
    // taken down before it must each have fired exactly once.
    let c = lock(&checker);
    let mut violations = c.violations.clone();
    let (unexplained, explained) = c.judge();
    violations.extend(
        unexplained
            .into_iter()
            .map(|w| format!("{w} without a disconnect")),
    );
    for (i, &incarnation) in incarnations.iter().enumerate() {
        for j in (0..WORKERS).filter(|&j| j != i) {
            let (placed, fired) = c
                .monitors
                .get(&(i, incarnation, j))
                .copied()
                .unwrap_or((0, 0));
            // Worker i was taken down after every j < i, so it saw those ports go.
            if j < i && placed != fired {
                violations.push(format!(
                    "w{i}/{incarnation}: {placed} monitors of w{j}#inbox placed, {fired} fired"
                ));
            }
        }
    }
    println!(
        "sent {} received {} restarts {} disconnects seen {} gaps or reorders at a disconnect {} \
         bad peers {} monitors placed {} fired {}",
        c.sent,
        c.received,
        c.restarts,
        c.disconnects_seen,
        explained,
        c.bad_peers,
        c.monitors.values().map(|m| m.0).sum::<u64>(),
        c.monitors.values().map(|m| m.1).sum::<u64>(),
    );
    drop(seed_node);
    if violations.is_empty() && c.received > 0 {
        println!("aemp-soak: ok");
        std::process::ExitCode::SUCCESS
    } else {
        for v in &violations {
            println!("violation: {v}");
        }
        if c.received == 0 {
            println!("violation: nothing was received");
        }
        std::process::ExitCode::FAILURE
    }
}
