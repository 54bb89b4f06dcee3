//! `aemp info` as a person reads it: a few aligned lines for the node, then one block
//! per connection and one line per port.

use std::collections::BTreeMap;
use std::fmt::Write;

use aemp_host::NodeInfo;

/// `n` bytes, in the unit that keeps it short.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Named counts other than zero as `a 1, b 2`, or `none`.
fn counts(map: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = map
        .iter()
        .filter(|&(_, &v)| v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if parts.is_empty() {
        return "none".into();
    }
    parts.join(", ")
}

/// Seconds as `1d 2h 3m 4s` (largest units first, zeros left out; `0s` for none).
fn duration(secs: f64) -> String {
    let mut left = secs.max(0.0) as u64;
    let mut out = Vec::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if left >= size {
            out.push(format!("{}{unit}", left / size));
            left %= size;
        }
    }
    if left > 0 || out.is_empty() {
        out.push(format!("{left}s"));
    }
    out.join(" ")
}

/// The node's info as aligned lines.
pub fn readable(info: &NodeInfo) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "{label:<12} {text}");
    };
    line("node", info.node.clone());
    line("uptime", duration(info.uptime));
    line(
        "global",
        if info.global {
            format!(
                "yes, database {} entries, {}",
                info.db_entries,
                bytes(info.db_bytes)
            )
        } else {
            "no".into()
        },
    );
    line(
        "traffic",
        format!(
            "in {} messages, {}; out {} messages, {}",
            info.messages_in,
            bytes(info.bytes_in),
            info.messages_out,
            bytes(info.bytes_out)
        ),
    );
    line(
        "queued",
        format!(
            "{} for nodes not up, {} unwritten, {} held for peers",
            bytes(info.queued_bytes),
            bytes(info.write_queue_bytes),
            bytes(info.buffered_bytes)
        ),
    );
    line("sandbox", bytes(info.sandbox_memory));
    line("handshakes", format!("{} completed", info.handshakes));
    line("conn ends", counts(&info.connection_ends));
    line("limits hit", counts(&info.limits));
    line("refusals", counts(&info.refusals));
    line(
        "connections",
        format!("{} ({} nodes up)", info.connection_count, info.nodes_up),
    );
    for c in &info.connections {
        let node = c.node.as_deref().unwrap_or("(greeting not yet received)");
        let state = if c.working {
            "up"
        } else if c.auth.is_some() {
            "closing"
        } else {
            "handshake"
        };
        let direction = if c.incoming { "from" } else { "to" };
        let _ = writeln!(
            out,
            "  #{:<4} {node} {direction} {} ({state})",
            c.conn, c.addr
        );
        if let (Some(auth), Some(framing)) = (&c.auth, &c.framing) {
            let tls = if c.tls { "tls" } else { "no tls" };
            let _ = writeln!(out, "        auth {auth}, framing {framing}, {tls}");
        }
        let _ = writeln!(
            out,
            "        in {} messages, {}; out {} messages, {}; queued {}, held {}",
            c.messages_in,
            bytes(c.bytes_in),
            c.messages_out,
            bytes(c.bytes_out),
            bytes(c.queued_bytes),
            bytes(c.held_bytes)
        );
    }
    not_listed(&mut out, info.connection_count, info.connections.len());
    let _ = writeln!(out, "{:<12} {}", "ports", info.port_count);
    let width = info.ports.iter().map(|p| p.port.len()).max().unwrap_or(0);
    for p in &info.ports {
        let _ = writeln!(
            out,
            "  {:<width$}  {} messages waiting, {}",
            p.port,
            p.messages,
            bytes(p.bytes)
        );
    }
    not_listed(&mut out, info.port_count, info.ports.len());
    out
}

/// A line for what an answer left out (it lists a bounded number).
fn not_listed(out: &mut String, count: u64, listed: usize) {
    let listed = u64::try_from(listed).unwrap_or(u64::MAX);
    if count > listed {
        let _ = writeln!(out, "  ({} more not listed)", count - listed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_shortly() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(3_725.0), "1h 2m 5s");
        assert_eq!(duration(86_400.0), "1d");
    }
}
