//! A node's figures ([`NodeInfo`]) for monitoring systems: the Prometheus (OpenMetrics)
//! text format, rendered by `prometheus-client` and served over HTTP/1 by `hyper`
//! (`aemp run --metrics HOST:PORT`).
//!
//! Every scrape asks the node afresh ([`Node::info`]), so the figures are never stale
//! and nothing is kept between scrapes. Counters are the node's own totals since it
//! started; ports are summed (their names are per request and would make a label of
//! unbounded cardinality).
//!
//! ```no_run
//! # async fn f(node: aemp_host::Node) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9100").await?;
//! tokio::spawn(aemp_host::metrics::serve(node, listener));
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{Node, NodeInfo};

/// The content type of the text [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once, at most (more wait in the listener's backlog).
const MAX_SCRAPES: usize = 16;

/// How long a scraper may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A gauge's value (they are signed).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `info` in the OpenMetrics text format.
pub fn render(info: &NodeInfo) -> String {
    let mut registry = Registry::with_prefix("aemp");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g = Gauge::<i64>::default();
        g.set(signed(value));
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    let by = |registry: &mut Registry,
              name: &str,
              help: &str,
              label: &str,
              counts: &std::collections::BTreeMap<String, u64>| {
        let family = Family::<Vec<(String, String)>, Counter>::default();
        for (key, &value) in counts {
            family
                .get_or_create(&vec![(label.to_owned(), String::clone(key))])
                .inc_by(value);
        }
        registry.register(name, help, family);
    };
    let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    uptime.set(info.uptime);
    registry.register("uptime_seconds", "Seconds since the node started", uptime);
    let r = &mut registry;
    gauge(
        r,
        "connections",
        "Open connections, handshakes included",
        info.connection_count,
    );
    gauge(
        r,
        "nodes_up",
        "Nodes with a working connection",
        info.nodes_up,
    );
    counter(r, "handshakes", "Handshakes completed", info.handshakes);
    counter(
        r,
        "messages_received",
        "Messages received from peers",
        info.messages_in,
    );
    counter(
        r,
        "messages_sent",
        "Messages sent to peers",
        info.messages_out,
    );
    counter(
        r,
        "received_bytes",
        "Bytes received from peers (after TLS)",
        info.bytes_in,
    );
    counter(
        r,
        "sent_bytes",
        "Bytes sent to peers (before TLS)",
        info.bytes_out,
    );
    by(
        r,
        "connection_ends",
        "Connections their transport ended, by reason (peer_closed is a normal close)",
        "reason",
        &info.connection_ends,
    );
    by(
        r,
        "limit_hits",
        "Limits the node hit, by limit",
        "limit",
        &info.limits,
    );
    by(
        r,
        "refusals",
        "Calls of the application the engine refused, by kind",
        "kind",
        &info.refusals,
    );
    gauge(
        r,
        "queued_bytes",
        "Bytes of messages waiting for nodes not connected yet",
        info.queued_bytes,
    );
    gauge(
        r,
        "write_queue_bytes",
        "Bytes waiting to be written to the sockets",
        info.write_queue_bytes,
    );
    gauge(
        r,
        "buffered_bytes",
        "Bytes the engine holds on behalf of peers",
        info.buffered_bytes,
    );
    gauge(r, "ports", "Local ports", info.port_count);
    let inbox: u64 = info
        .ports
        .iter()
        .map(|p| p.messages)
        .fold(0, u64::saturating_add);
    gauge(
        r,
        "inbox_messages",
        "Messages in the ports' inboxes, not taken yet",
        inbox,
    );
    gauge(
        r,
        "global",
        "1 when the node acts as a global node",
        u64::from(info.global),
    );
    gauge(
        r,
        "db_entries",
        "Entries of the network database it holds as a global node",
        info.db_entries,
    );
    gauge(
        r,
        "db_bytes",
        "Bytes of the network database it holds as a global node",
        info.db_bytes,
    );
    gauge(
        r,
        "sandbox_memory_bytes",
        "Size of the engine's sandbox memory",
        info.sandbox_memory,
    );
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// Serves [`render`] of `node`'s info to every HTTP request on `listener` (any path),
/// until the node stops. One request per connection, at most [`MAX_SCRAPES`] at once;
/// a scraper that sends no request headers within 10 s is dropped.
pub async fn serve(node: Node, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = node.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of files, say: pause rather than spin.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| scrape(node.clone(), request));
            // One scrape per connection: an idle keep-alive connection cannot hold a slot.
            let served = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("metrics: {e}");
            }
            drop(slot);
        });
    }
}

/// One scrape: the node's figures now, or 503 when the node is gone.
async fn scrape(
    node: Node,
    _request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match node.info().await {
        Ok(info) => Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(render(&info)))),
        Err(e) => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Full::new(Bytes::from(format!("{e}\n")))),
    };
    // The parts above are all valid: a builder error cannot happen.
    Ok(response.unwrap_or_default())
}
