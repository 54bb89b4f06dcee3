//! What a global node's database takes in memory, as the allocator hands it out, against
//! what its limits count (`Node::global_db_usage`): the count must not be below it, or
//! `GlobalLimits::max_bytes` would not bound the sandbox. Measured natively, where
//! pointers are twice as wide as in the wasm32 component, so the component takes less.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use aemp_engine::{Framing, Value};
use support::net::{node_config, t};
use support::wire::Wire;

/// Counts live bytes as a small-block allocator holds them: each block rounded up to
/// 8 bytes, with an 8-byte header.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn held(layout: Layout) -> usize {
    layout.size().next_multiple_of(8) + 8
}

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(held(layout), Ordering::Relaxed);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(held(layout), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Entries to store, sent `batch` keys per `g_upd`.
struct Shape {
    name: &'static str,
    entries: usize,
    batch: usize,
    /// Each entry in a family of its own, else all in one.
    family_each: bool,
    value: Value,
}

impl Shape {
    fn family(&self, i: usize) -> String {
        if self.family_each {
            format!("f{i}")
        } else {
            "f".into()
        }
    }
}

fn key(i: usize) -> String {
    format!("key{i}")
}

/// Fills a fresh global node from one slave; returns (bytes the allocator holds for the
/// entries, bytes the limits count).
fn fill(shape: &Shape) -> (usize, usize) {
    let mut w = Wire::new(node_config("n", &[]), Framing::Cbor);
    let s = w.connect("s");
    w.request(s, vec![t("g_slave")]);
    w.take(s);
    w.events.clear();
    // The node's own entries ('g and 'l) are there already.
    let (base_entries, base_bytes) = w.node.global_db_usage();
    let before = LIVE.load(Ordering::Relaxed);
    for start in (0..shape.entries).step_by(shape.batch) {
        // One g_upd per family in the batch.
        let mut families: Vec<(String, Vec<(Value, Value)>)> = Vec::new();
        for i in start..(start + shape.batch).min(shape.entries) {
            let (f, pair) = (shape.family(i), (t(&key(i)), shape.value.clone()));
            match families.last_mut() {
                Some((last, pairs)) if *last == f => pairs.push(pair),
                _ => families.push((f, vec![pair])),
            }
        }
        for (f, pairs) in families {
            w.request(s, vec![t("g_upd"), t(&f), Value::Map(pairs)]);
        }
        w.events.clear();
        w.take(s);
    }
    let grown = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let (stored, counted) = w.node.global_db_usage();
    assert_eq!(
        stored - base_entries,
        shape.entries,
        "every entry is stored"
    );
    (grown, counted - base_bytes)
}

#[test]
fn the_limits_count_at_least_what_entries_take() {
    let shapes = [
        Shape {
            name: "small entries in one family",
            entries: 20_000,
            batch: 500,
            family_each: false,
            value: Value::Int(1),
        },
        Shape {
            name: "one entry per family",
            entries: 2_000,
            batch: 100,
            family_each: true,
            value: Value::Int(1),
        },
        Shape {
            name: "8 KiB values",
            entries: 1_000,
            batch: 8,
            family_each: false,
            value: Value::Bytes(vec![b'v'; 8 << 10]),
        },
    ];
    for shape in &shapes {
        let (grown, counted) = fill(shape);
        let entries = shape.entries;
        let keys: usize = (0..entries).map(|i| key(i).len()).sum();
        let payload = keys + entries * shape.value.encode().len();
        eprintln!(
            "{}: {entries} entries, {} bytes each held, {} counted; \
             {:.2} bytes held per byte of keys and values",
            shape.name,
            grown / entries,
            counted / entries,
            grown as f64 / payload as f64
        );
        assert!(
            grown <= counted,
            "{}: the entries take {grown} bytes, the limits count {counted}",
            shape.name
        );
    }
}
