//! The scaling group (`--only scaling`, issue 18 step 5): what one node's work costs as it
//! grows: more sending peers, larger messages, more idle connections. `--plot DIR` draws
//! the three curves as SVG files. Figure names are documented in the README.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aemp_host::{Sandbox, SendBatch, Value};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::{Api, child_figures, nodes, one_way, raise_open_files, round_trips, stop};

/// The points each curve is measured at, and how long each point runs.
pub struct Levels {
    /// Sending peers into one node.
    senders: Vec<usize>,
    /// Message sizes (bytes of the one byte-string argument).
    sizes: Vec<usize>,
    /// Idle connections to one node.
    idle: Vec<usize>,
    /// How long the senders load the node while the round trips are measured.
    window: Duration,
    /// At most this many messages per size...
    messages: usize,
    /// ...and at most this many bytes of them (a GiB of 1 MiB messages takes seconds).
    bytes: usize,
}

impl Levels {
    /// The full curves, or (`quick`) two points of each with tiny counts, for the smoke
    /// test: the figures' names carry their points, so they differ from the full run's.
    pub fn new(quick: bool) -> Levels {
        if quick {
            Levels {
                senders: vec![1, 10],
                sizes: vec![16, 1 << 20],
                idle: vec![10, 50],
                window: Duration::from_millis(300),
                messages: 2_000,
                bytes: 8 << 20,
            }
        } else {
            Levels {
                senders: vec![1, 10, 100, 1_000],
                sizes: vec![16, 256, 4 << 10, 64 << 10, 1 << 20],
                idle: vec![100, 1_000, 3_000, 10_000],
                window: Duration::from_secs(3),
                messages: 300_000,
                bytes: 1 << 30,
            }
        }
    }
}

/// One measured point: x, then the y values of the curve's figures.
type Point = (usize, Vec<f64>);

/// What the group measured, for [`plot`].
#[derive(Default)]
pub struct Curves {
    senders: Vec<Point>,
    sizes: Vec<Point>,
    idle: Vec<Point>,
}

/// How long the senders run before the window opens: long enough for all of them to
/// have a batch in flight, so the window sees the steady state.
const WARM_UP: Duration = Duration::from_millis(200);

/// Messages the senders of [`fan_in`] may have sent and the port not yet taken, all
/// together: the credit that keeps the load closed-loop.
const IN_FLIGHT: usize = 64 * 1024;

/// `senders` nodes send `["ping",123]` to one port of one node, as fast as it takes
/// them, while one more node pings a port of it (round trips, as [`round_trips`]).
/// Returns messages/s into the port and the round trips' p50 and p99 in µs, both over
/// the same `window`, and how many round trips there were.
///
/// The load is closed-loop: a sender takes credit for a batch before sending it, and the
/// port's reader gives it back as it takes messages, [`IN_FLIGHT`] in all, shared fairly
/// (tokio's semaphore is first come, first served); each sender's batches are small
/// enough that every sender has one in flight. Open-loop, every sender would fill its
/// connection's buffers (a megabyte of messages each, `HIGH_WATER`, and the sockets'):
/// all in this process on two cores, a thousand senders doing that take the CPU from
/// the node they load, and the figures would measure them instead.
async fn fan_in(
    sandbox: &Arc<Sandbox>,
    senders: usize,
    window: Duration,
) -> (f64, f64, f64, usize) {
    let files = raise_open_files(4 * senders as u64 + 256);
    // A sender takes its listener and its socket, the receiver a socket per sender.
    assert!(
        files > 3 * senders as u64 + 128,
        "{senders} senders need about {} open files, the limit is {files}",
        3 * senders + 128
    );
    let (receiver, mut peers) = nodes(sandbox, None, &format!("fan{senders}"), senders + 1).await;
    let pinger = peers.pop().expect("pinger");
    let mut inbox = receiver.port().await.expect("port");
    let target = inbox.id().to_owned();
    let received = Arc::new(AtomicU64::new(0));
    let credit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let per_batch = (IN_FLIGHT / 2 / senders).clamp(1, 1000);
    // Ends when the receiver shuts down; until then it drains, so the senders can flush.
    let consumer = {
        let (received, credit) = (received.clone(), credit.clone());
        tokio::spawn(async move {
            while let Some(batch) = inbox.recv_batch(1024).await {
                received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                credit.add_permits(batch.len());
            }
        })
    };
    let done = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = peers
        .iter()
        .map(|sender| {
            let (sender, target, done) = (sender.clone(), target.clone(), done.clone());
            let credit = credit.clone();
            tokio::spawn(async move {
                let args = [Value::text("ping"), Value::Int(123)];
                while !done.load(Ordering::Relaxed) {
                    let k = per_batch as u32;
                    credit.acquire_many(k).await.expect("credit").forget();
                    let mut batch = SendBatch::with_capacity(per_batch);
                    for _ in 0..per_batch {
                        batch.push(&target, &args);
                    }
                    sender.send_messages(batch).await.expect("send");
                }
            })
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;
    let (before, start) = (received.load(Ordering::Relaxed), Instant::now());
    let (p50, p99, pings) = round_trips(&receiver, &pinger, usize::MAX, window).await;
    let rate = (received.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    // Senders waiting for credit see `done` once they have it.
    credit.add_permits(IN_FLIGHT);
    for producer in producers {
        producer.await.expect("producer");
    }
    peers.push(pinger);
    abandon(peers).await;
    stop(receiver, Vec::new()).await;
    consumer.await.expect("consumer");
    (rate, p50, p99, pings)
}

/// Shuts loaded nodes down all at once, without waiting for what they still hold: a
/// thousand senders each hold up to `HIGH_WATER` (1 MiB) of small messages, tens of
/// seconds of the receiver's work, which [`stop`]'s flush would wait for one by one.
async fn abandon(nodes: Vec<aemp_host::Node>) {
    let stopping: Vec<_> = nodes
        .into_iter()
        .map(|node| tokio::spawn(node.shutdown(Duration::from_millis(100))))
        .collect();
    for node in stopping {
        match node.await.expect("shutdown") {
            // Timed out flushing: the node has stopped all the same.
            Ok(()) | Err(aemp_host::NodeError::Timeout) => {}
            Err(e) => panic!("shutdown: {e}"),
        }
    }
}

/// Messages/s and payload MB/s one way between two nodes, messages of one byte string
/// of `size` bytes (the batch run of the e2e group, [`one_way`]).
async fn sized(sandbox: &Arc<Sandbox>, size: usize, n: usize) -> (f64, f64) {
    let (receiver, senders) = nodes(sandbox, None, &format!("size{size}"), 1).await;
    let args = [Value::Bytes(vec![7; size])];
    let rate = one_way(&receiver, &senders, &args, n, Api::Batches).await;
    stop(receiver, senders).await;
    (rate, rate * size as f64 / 1e6)
}

/// Runs the group, giving each figure to `add` (name, value, meaning): every curve, or
/// the one `part` names (`senders`, `sizes` or `idle`), to profile it alone.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    sandbox: &Arc<Sandbox>,
    levels: &Levels,
    part: Option<&str>,
    add: &mut impl FnMut(&str, f64, &str),
) -> Curves {
    let mut curves = Curves::default();
    let run = |name: &str| part.is_none_or(|p| p == name);
    for &size in levels.sizes.iter().filter(|_| run("sizes")) {
        let n = levels.messages.min(levels.bytes / size).max(1);
        let (rate, mb) = runtime.block_on(sized(sandbox, size, n));
        add(
            &format!("scaling_msgs_per_s_size_{size}"),
            rate,
            "messages/s one way, two nodes, one byte string of this many bytes",
        );
        add(
            &format!("scaling_mb_per_s_size_{size}"),
            mb,
            "the same in MB/s of those byte strings",
        );
        curves.sizes.push((size, vec![rate, mb]));
    }
    for &senders in levels.senders.iter().filter(|_| run("senders")) {
        let (rate, p50, p99, pings) = runtime.block_on(fan_in(sandbox, senders, levels.window));
        eprintln!("({pings} round trips with {senders} senders)");
        add(
            &format!("scaling_msgs_per_s_senders_{senders}"),
            rate,
            "small messages/s into one port of one node from this many nodes",
        );
        add(
            &format!("scaling_rtt_p50_us_senders_{senders}"),
            p50,
            "meanwhile, round trip from one more node through that node, median, µs",
        );
        add(
            &format!("scaling_rtt_p99_us_senders_{senders}"),
            p99,
            "the same, 99th percentile, µs",
        );
        curves.senders.push((senders, vec![rate, p50, p99]));
    }
    // Each in a fresh process, as the memory group runs (see there).
    for &n in levels.idle.iter().filter(|_| run("idle")) {
        let figures = child_figures(&["--only", "memory", "--idle", &n.to_string()]);
        let figure = |name: &str| {
            figures
                .get(name)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let (rss, engine, handshakes) = (
            figure("idle_conn_rss_bytes"),
            figure("idle_conn_engine_bytes"),
            figure("idle_handshakes_per_s"),
        );
        add(
            &format!("scaling_idle_rss_bytes_per_conn_{n}"),
            rss,
            "the node process's RSS per idle connection (peers in another process)",
        );
        add(
            &format!("scaling_idle_engine_bytes_per_conn_{n}"),
            engine,
            "the node's sandbox memory per idle connection",
        );
        add(
            &format!("scaling_handshakes_per_s_{n}"),
            handshakes,
            "handshakes/s opening them one after another",
        );
        curves.idle.push((n, vec![rss, engine, handshakes]));
    }
    curves
}

/// One curve of a panel: its legend, and which of the points' y values it draws.
struct Line {
    label: &'static str,
    index: usize,
}

/// One chart: its title, its axes' descriptions and lines.
struct Panel {
    title: &'static str,
    x: &'static str,
    y: &'static str,
    /// Whether y is drawn on a log scale (values spanning orders of magnitude).
    log_y: bool,
    /// Whether x counts bytes (labelled in KiB and MiB).
    bytes: bool,
    /// Where the legend goes: off the curves.
    legend: SeriesLabelPosition,
    lines: Vec<Line>,
}

/// Writes `scaling-senders.svg`, `scaling-sizes.svg` and `scaling-idle.svg` into `dir`.
pub fn plot(dir: &std::path::Path, curves: &Curves) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let line = |label, index| Line { label, index };
    let files = [
        (
            "scaling-senders.svg",
            &curves.senders,
            [
                Panel {
                    title: "Small messages into one port of one node",
                    x: "sending nodes",
                    y: "messages/s",
                    log_y: false,
                    bytes: false,
                    legend: SeriesLabelPosition::UpperRight,
                    lines: vec![line("messages/s", 0)],
                },
                Panel {
                    title: "Round trip from one more node meanwhile",
                    x: "sending nodes",
                    y: "round trip, µs",
                    log_y: true,
                    bytes: false,
                    legend: SeriesLabelPosition::UpperLeft,
                    lines: vec![line("p50", 1), line("p99", 2)],
                },
            ],
        ),
        (
            "scaling-sizes.svg",
            &curves.sizes,
            [
                Panel {
                    title: "Messages one way between two nodes",
                    x: "message size, bytes",
                    y: "messages/s",
                    log_y: true,
                    bytes: true,
                    legend: SeriesLabelPosition::UpperRight,
                    lines: vec![line("messages/s", 0)],
                },
                Panel {
                    title: "The same in MB/s",
                    x: "message size, bytes",
                    y: "MB/s",
                    log_y: true,
                    bytes: true,
                    legend: SeriesLabelPosition::UpperRight,
                    lines: vec![line("MB/s", 1)],
                },
            ],
        ),
        (
            "scaling-idle.svg",
            &curves.idle,
            [
                Panel {
                    title: "Memory per idle connection",
                    x: "idle connections",
                    y: "bytes",
                    log_y: false,
                    bytes: false,
                    legend: SeriesLabelPosition::LowerRight,
                    lines: vec![line("node process's RSS", 0), line("node's sandbox", 1)],
                },
                Panel {
                    title: "Handshakes to get there, one after another",
                    x: "idle connections",
                    y: "handshakes/s",
                    log_y: false,
                    bytes: false,
                    legend: SeriesLabelPosition::LowerLeft,
                    lines: vec![line("handshakes/s", 2)],
                },
            ],
        ),
    ];
    for (file, points, panels) in files {
        if points.is_empty() {
            continue;
        }
        let path = dir.join(file);
        let root = SVGBackend::new(&path, (800, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, panel) in root.split_evenly((2, 1)).iter().zip(&panels) {
            let ys = || {
                panel
                    .lines
                    .iter()
                    .flat_map(|l| points.iter().map(move |p| p.1[l.index]))
            };
            let (lo, hi) = (ys().fold(f64::MAX, f64::min), ys().fold(0.0, f64::max));
            if panel.log_y {
                draw(area, panel, points, (lo / 2.0..hi * 2.0).log_scale())?;
            } else {
                draw(area, panel, points, 0.0..hi * 1.15)?;
            }
        }
        root.present()?;
    }
    Ok(())
}

/// Draws one panel on `area`: x on a log scale, y on `y`.
fn draw<Y>(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    panel: &Panel,
    points: &[Point],
    y: Y,
) -> Result<(), Box<dyn std::error::Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let xs = points.iter().map(|p| p.0 as f64);
    let (lo, hi) = (xs.clone().fold(f64::MAX, f64::min), xs.fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (lo / 1.5..hi * 1.5)
                .log_scale()
                .with_key_points(points.iter().map(|p| p.0 as f64).collect()),
            y,
        )?;
    chart
        .configure_mesh()
        .x_desc(panel.x)
        .y_desc(panel.y)
        .x_label_formatter(&|x| if panel.bytes { binary(*x) } else { si(*x) })
        .y_label_formatter(&|y| si(*y))
        .draw()?;
    for (i, line) in panel.lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let data: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.0 as f64, p.1[line.index]))
            .collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
            .label(line.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(panel.legend.clone())
        .draw()?;
    Ok(())
}

/// A byte count for an axis label: 16 B, 4 KiB, 1 MiB.
fn binary(v: f64) -> String {
    match v {
        v if v >= f64::from(1 << 20) => format!("{} MiB", si(v / f64::from(1 << 20))),
        v if v >= 1024.0 => format!("{} KiB", si(v / 1024.0)),
        v => format!("{} B", si(v)),
    }
}

/// A number for an axis label: 1.5k, 2M, 16, 0.25.
fn si(v: f64) -> String {
    let (v, unit) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = format!("{v:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{unit}")
}
