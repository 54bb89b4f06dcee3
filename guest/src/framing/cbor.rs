//! CBOR framing: a sequence of CBOR data items, one message each.
//!
//! [`Scanner`] finds where an item ends in a growing buffer without re-reading what it
//! has already checked, and checks well-formedness, UTF-8 of text strings, nesting depth
//! and size on the way, so nothing a peer sends can make the engine buffer or recurse
//! without bound. [`to_json`] turns a checked item into JSON text.

use minicbor::Decoder;
use minicbor::data::Type;

use super::{Limits, Scan};
use crate::error::MessageError;
use crate::value::MAX_DEPTH;

const FRAMING: &str = "cbor";

fn malformed(detail: impl Into<String>) -> MessageError {
    MessageError::Malformed {
        framing: FRAMING,
        detail: detail.into(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Frame {
    /// A definite array or map with this many items (keys and values) still to come.
    Items(u64),
    /// An indefinite array or map; `count` items so far.
    Indefinite { map: bool, count: u64 },
    /// An indefinite byte (2) or text (3) string: definite chunks of that type until break.
    Chunks(u8),
    /// A tag, waiting for the one item it wraps. Tags nest like arrays (every decoder
    /// recurses into them), so each one counts toward the depth limit.
    Tag,
}

/// Frames a scanner keeps room for between messages: enough for common nesting, so the
/// stack is not allocated anew for every message, while a deep message does not pin its
/// room for the rest of the connection.
const KEEP_FRAMES: usize = 8;

/// Resumable end-of-item finder for one message; positions are relative to its first byte.
/// One scanner serves message after message (see [`Scanner::reset`]).
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    pos: usize,
    depth: usize,
    stack: Vec<Frame>,
}

/// One item header: major type, additional information, argument, header length.
pub(crate) struct Header {
    pub major: u8,
    pub info: u8,
    pub arg: u64,
    pub len: usize,
}

/// The header at the start of `buf`, `None` while it is incomplete. Reserved additional
/// information (28-30) must have been refused before; it reads as a bare header here.
/// Kept small and infallible: it runs for every item of every message.
#[inline]
pub(crate) fn header(buf: &[u8]) -> Option<Header> {
    let &first = buf.first()?;
    let (major, info) = (first >> 5, first & 0x1f);
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 1),
        24 => (u64::from(*buf.get(1)?), 2),
        25 => (
            u64::from(u16::from_be_bytes(buf.get(1..3)?.try_into().ok()?)),
            3,
        ),
        26 => (
            u64::from(u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?)),
            5,
        ),
        27 => (u64::from_be_bytes(buf.get(1..9)?.try_into().ok()?), 9),
        _ => (0, 1),
    };
    Some(Header {
        major,
        info,
        arg,
        len,
    })
}

impl Scanner {
    /// Forgets the message in progress, keeping a little room for the next one.
    pub(crate) fn reset(&mut self) {
        self.pos = 0;
        self.depth = 0;
        self.stack.clear();
        self.stack.shrink_to(KEEP_FRAMES);
    }

    /// Scans `msg` (the bytes of one message from its start, possibly more) from where the
    /// previous call stopped.
    pub(crate) fn scan(&mut self, msg: &[u8], limits: &Limits) -> Result<Scan, MessageError> {
        if self.pos == 0
            && let Some(end) = flat_array(msg, limits)
        {
            return Ok(Scan::Complete(end));
        }
        loop {
            let rest = msg.get(self.pos..).unwrap_or_default();
            if let Some(info @ 28..=30) = rest.first().map(|b| b & 0x1f) {
                return Err(malformed(format!("reserved additional information {info}")));
            }
            let Some(h) = header(rest) else {
                return self.partial(msg, limits);
            };
            if self.pos == 0 && h.major != 4 {
                return Err(MessageError::NotAnArray);
            }
            if let Some(&Frame::Chunks(major)) = self.stack.last()
                && !(h.major == major && h.info != 31 || h.major == 7 && h.info == 31)
            {
                return Err(malformed("bad chunk in an indefinite-length string"));
            }
            let mut advance = h.len;
            let mut done = true;
            match (h.major, h.info) {
                (0 | 1 | 6, 31) => return Err(malformed("indefinite length on an integer or tag")),
                (0 | 1, _) => {}
                (2 | 3, 31) => {
                    self.stack.push(Frame::Chunks(h.major));
                    done = false;
                }
                (2 | 3, _) => {
                    let end = usize::try_from(h.arg)
                        .ok()
                        .and_then(|n| (self.pos + h.len).checked_add(n))
                        .filter(|&end| end <= limits.max_message_size)
                        .ok_or(MessageError::TooLarge(limits.max_message_size))?;
                    let Some(content) = msg.get(self.pos + h.len..end) else {
                        return self.partial(msg, limits);
                    };
                    if h.major == 3 && !is_text(content) {
                        return Err(malformed("text string is not UTF-8"));
                    }
                    advance = end - self.pos;
                }
                (4 | 5, 31) => {
                    self.enter(limits)?;
                    self.stack.push(Frame::Indefinite {
                        map: h.major == 5,
                        count: 0,
                    });
                    done = false;
                }
                (4 | 5, _) => {
                    let items = if h.major == 5 {
                        h.arg.checked_mul(2)
                    } else {
                        Some(h.arg)
                    };
                    // Every item takes at least one byte, so a count past the size limit
                    // can be refused before any of it arrives.
                    let items = items
                        .filter(|&n| n <= limits.max_message_size as u64)
                        .ok_or(MessageError::TooLarge(limits.max_message_size))?;
                    self.enter(limits)?;
                    if items > 0 {
                        self.stack.push(Frame::Items(items));
                        done = false;
                    } else {
                        self.depth -= 1;
                    }
                }
                (6, _) => {
                    self.enter(limits)?;
                    self.stack.push(Frame::Tag);
                    done = false;
                }
                (7, 24) if h.arg < 32 => {
                    return Err(malformed("two-byte encoding of a simple value below 32"));
                }
                (7, 31) => match self.stack.pop() {
                    Some(Frame::Chunks(_)) => {}
                    Some(Frame::Tag) => return Err(malformed("break after a tag")),
                    Some(Frame::Indefinite { map, count }) => {
                        if map && count % 2 == 1 {
                            return Err(malformed("map with a key but no value"));
                        }
                        self.depth -= 1;
                    }
                    _ => return Err(malformed("unexpected break")),
                },
                _ => {}
            }
            self.pos += advance;
            if self.pos > limits.max_message_size {
                return Err(MessageError::TooLarge(limits.max_message_size));
            }
            if done && self.item_done() {
                let end = self.pos;
                self.reset();
                return Ok(Scan::Complete(end));
            }
        }
    }

    fn enter(&mut self, limits: &Limits) -> Result<(), MessageError> {
        self.depth += 1;
        if self.depth > limits.max_depth {
            return Err(MessageError::TooDeep(limits.max_depth));
        }
        Ok(())
    }

    /// Counts a finished item in its container; true when the whole message is finished.
    fn item_done(&mut self) -> bool {
        loop {
            match self.stack.last_mut() {
                None => return true,
                Some(Frame::Items(n)) => {
                    *n -= 1;
                    if *n > 0 {
                        return false;
                    }
                    self.stack.pop();
                    self.depth -= 1;
                }
                Some(Frame::Indefinite { count, .. }) => {
                    *count += 1;
                    return false;
                }
                Some(Frame::Chunks(_)) => return false,
                // The tagged item is done, and with it the tag: count it in its parent.
                Some(Frame::Tag) => {
                    self.stack.pop();
                    self.depth -= 1;
                }
            }
        }
    }

    fn partial(&self, msg: &[u8], limits: &Limits) -> Result<Scan, MessageError> {
        if msg.len() > limits.max_message_size {
            return Err(MessageError::TooLarge(limits.max_message_size));
        }
        Ok(Scan::Partial)
    }
}

/// Whether a text string's bytes are UTF-8, with 128-bit vector operations (`simd128`
/// in the sandbox): std's check on wasm32 takes a 32-bit word at a time, and a large
/// text message's cost in the sandbox was mostly that check (twice: once sent, once
/// received).
fn is_text(bytes: &[u8]) -> bool {
    simdutf8::basic::from_utf8(bytes).is_ok()
}

/// The end of `msg`'s first item when it is a complete, valid definite array of integers,
/// definite strings and simple values or floats, within the limits: the common message
/// shape, checked in one tight pass. `None` for anything else, valid or not, which the
/// general scanner then reads from the start (so errors are reported by one place only).
fn flat_array(msg: &[u8], limits: &Limits) -> Option<usize> {
    let array = header(msg)?;
    if array.major != 4 || array.info > 27 || limits.max_depth == 0 {
        return None;
    }
    let mut pos = array.len;
    for _ in 0..array.arg {
        let rest = msg.get(pos..)?;
        if matches!(rest.first()? & 0x1f, 28..=31) {
            return None;
        }
        let h = header(rest)?;
        pos += h.len;
        match h.major {
            0 | 1 => {}
            2 | 3 => {
                let end = pos.checked_add(usize::try_from(h.arg).ok()?)?;
                let content = msg.get(pos..end)?;
                if h.major == 3 && !is_text(content) {
                    return None;
                }
                pos = end;
            }
            // Simple values and floats; the two-byte simple form has rules of its own.
            7 if h.info != 24 => {}
            _ => return None,
        }
    }
    (pos <= limits.max_message_size).then_some(pos)
}

/// Writes `s` as a JSON string, as serde_json writes it. Nearly every string has no byte
/// to escape (a quote, a backslash, a control character); those are copied whole, after
/// a check 8 bytes at a time, where serde_json looks at each byte: in the sandbox that
/// was most of what sending a large text message as JSON cost.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(out, s);
        return;
    }
    out.reserve(s.len().saturating_add(2));
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Whether some byte is one JSON escapes: below 0x20, `"` or `\`.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Some byte of `x` is below `n` (n <= 0x80), the usual word-at-a-time test.
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    let found = words.by_ref().any(|w| {
        let x = u64::from_le_bytes(w.try_into().unwrap_or_default());
        below(x, 0x20)
            || below(x ^ (ONES * u64::from(b'"')), 1)
            || below(x ^ (ONES * u64::from(b'\\')), 1)
    });
    found
        || words
            .remainder()
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Writes a checked CBOR item as JSON (see [`crate::Value::write_json`] for the mapping) as it
/// reads it, never holding it as a tree: sixteen million one-byte items would take 512 MiB
/// as [`crate::Value`]s, and a peer may ask to receive JSON what it sent as CBOR.
pub(crate) fn to_json(item: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
    let start = out.len();
    if flat_to_json(item, out) {
        return Ok(());
    }
    out.truncate(start);
    let mut d = Decoder::new(item);
    write_json(&mut d, out)?;
    if d.position() != item.len() {
        return Err(malformed("trailing bytes after the item"));
    }
    Ok(())
}

/// [`to_json`] of the common message shape, a definite array of integers and text
/// strings with nothing to escape, in one pass over the bytes: no decoder, no stack of
/// containers (an allocation per message), integers as u64 rather than through i128.
/// In the sandbox the general path cost twice what it does natively, most of a small
/// JSON message's sending. `false` for anything else, valid or not (what it wrote is
/// then to be dropped): the general path reads it from the start and reports errors.
fn flat_to_json(item: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(array) = header(item) else {
        return false;
    };
    if array.major != 4 || array.info > 27 {
        return false;
    }
    let mut pos = array.len;
    let mut digits = itoa::Buffer::new();
    out.push(b'[');
    for i in 0..array.arg {
        if i > 0 {
            out.push(b',');
        }
        let Some(rest) = item.get(pos..) else {
            return false;
        };
        if rest.first().is_none_or(|&b| matches!(b & 0x1f, 28..=31)) {
            return false;
        }
        let Some(h) = header(rest) else {
            return false;
        };
        pos = pos.saturating_add(h.len);
        match h.major {
            0 => out.extend_from_slice(digits.format(h.arg).as_bytes()),
            1 => {
                // -1 - arg; the one value below i64's range through the general path.
                let Some(magnitude) = h.arg.checked_add(1) else {
                    return false;
                };
                out.push(b'-');
                out.extend_from_slice(digits.format(magnitude).as_bytes());
            }
            3 => {
                let Some(end) = usize::try_from(h.arg).ok().and_then(|n| pos.checked_add(n)) else {
                    return false;
                };
                let Some(content) = item.get(pos..end) else {
                    return false;
                };
                if !is_text(content) || needs_escape(content) {
                    return false;
                }
                out.reserve(content.len().saturating_add(2));
                out.push(b'"');
                out.extend_from_slice(content);
                out.push(b'"');
                pos = end;
            }
            _ => return false,
        }
    }
    out.push(b']');
    pos == item.len()
}

/// A container being written: a map or not, items still to come (`None`: until a
/// break; a map's count is of keys and values both), items written so far.
struct Open {
    map: bool,
    left: Option<u64>,
    written: u64,
}

/// [`to_json`] of the next item of `d`, with an explicit stack of at most [`MAX_DEPTH`]
/// containers and tags, as [`crate::Value::decode`] allows.
fn write_json(d: &mut Decoder, out: &mut Vec<u8>) -> Result<(), MessageError> {
    let bad = |e: minicbor::decode::Error| malformed(e.to_string());
    let mut open: Vec<Open> = Vec::new();
    loop {
        // Close every complete container; then the next item, after its separator.
        let key = match open.last_mut() {
            Some(o) => {
                let done = match o.left {
                    Some(left) => left == 0,
                    None => d.datatype().map_err(bad)? == Type::Break,
                };
                if done {
                    if o.map && o.written % 2 == 1 {
                        return Err(malformed("map with a key but no value"));
                    }
                    if o.left.is_none() {
                        d.skip().map_err(bad)?;
                    }
                    out.push(if o.map { b'}' } else { b']' });
                    open.pop();
                    if open.is_empty() {
                        return Ok(());
                    }
                    continue;
                }
                let key = o.map && o.written % 2 == 0;
                match (o.written, key) {
                    (0, _) => {}
                    (_, false) if o.map => out.push(b':'),
                    _ => out.push(b','),
                }
                o.written += 1;
                if let Some(left) = &mut o.left {
                    *left -= 1;
                }
                key
            }
            None => false,
        };
        // Tags are dropped, but count toward the depth as they do when decoding.
        let mut tags = 0;
        let ty = loop {
            let ty = d.datatype().map_err(bad)?;
            if matches!(
                ty,
                Type::Array | Type::ArrayIndef | Type::Map | Type::MapIndef | Type::Tag
            ) && open.len() + tags >= MAX_DEPTH
            {
                return Err(malformed(format!(
                    "arrays, maps and tags nested deeper than {MAX_DEPTH} levels"
                )));
            }
            if ty != Type::Tag {
                break ty;
            }
            d.tag().map_err(bad)?;
            tags += 1;
        };
        let container = match ty {
            Type::Array | Type::ArrayIndef => Some((false, d.array().map_err(bad)?)),
            Type::Map | Type::MapIndef => {
                let pairs = d.map().map_err(bad)?;
                let left = match pairs {
                    Some(n) => Some(n.checked_mul(2).ok_or_else(|| malformed("map too long"))?),
                    None => None,
                };
                Some((true, left))
            }
            _ => None,
        };
        match container {
            Some((map, _)) if key => {
                let what = if map { "a map" } else { "an array" };
                return Err(MessageError::NotJson(format!(
                    "{what} cannot be a JSON object key"
                )));
            }
            Some((map, left)) => {
                out.push(if map { b'{' } else { b'[' });
                open.push(Open {
                    map,
                    left,
                    written: 0,
                });
                continue;
            }
            // The common scalars straight from the input; the others through a `Value`.
            None if !key && crate::value::is_int(ty) => {
                let n = i128::from(d.int().map_err(bad)?);
                // Writing into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, &n);
            }
            None if !key && ty == Type::String => write_json_str(out, d.str().map_err(bad)?),
            None => {
                let value = crate::value::scalar(d, ty).map_err(bad)?;
                let written = if key {
                    value.write_json_key(out)
                } else {
                    value.write_json(out)
                };
                written.map_err(MessageError::NotJson)?;
            }
        }
        if open.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::value::Value;

    const LIMITS: Limits = Limits {
        max_message_size: 1 << 20,
        max_depth: 128,
    };

    fn scan_all(item: &[u8], limits: &Limits) -> Result<Scan, MessageError> {
        Scanner::default().scan(item, limits)
    }

    fn json(item: &[u8]) -> String {
        let mut out = Vec::new();
        to_json(item, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn finds_item_ends() {
        // ["port", h'ff', {1: -1}, [_ 1, 2], (_ "a", "b"), 1.5, true, null]
        let item = b"\x88\x64port\x41\xff\xa1\x01\x20\x9f\x01\x02\xff\x7f\x61a\x61b\xff\xf9\x3e\x00\xf5\xf6";
        assert_eq!(scan_all(item, &LIMITS), Ok(Scan::Complete(item.len())));
        let mut more = item.to_vec();
        more.extend_from_slice(b"\x80");
        assert_eq!(scan_all(&more, &LIMITS), Ok(Scan::Complete(item.len())));
        // Byte by byte, resuming.
        let mut s = Scanner::default();
        for end in 1..item.len() {
            assert_eq!(s.scan(&item[..end], &LIMITS), Ok(Scan::Partial), "at {end}");
        }
        assert_eq!(s.scan(item, &LIMITS), Ok(Scan::Complete(item.len())));
        assert_eq!(
            json(item),
            r#"["port","ÿ",{"1":-1},[1,2],"ab",1.5,true,null]"#
        );
    }

    #[test]
    fn refuses_malformed_and_oversized() {
        assert_eq!(scan_all(b"\x01", &LIMITS), Err(MessageError::NotAnArray));
        assert!(matches!(
            scan_all(b"\x81\x1c", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            scan_all(b"\x81\x62\xff\xfe", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            scan_all(b"\x81\xff", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            scan_all(b"\x9f\xbf\x01\xff", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            scan_all(b"\x81\x7f\x41a\xff", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            scan_all(b"\x81\xc1\xff", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        // A declared length past the limit is refused before the content arrives.
        let small = Limits {
            max_message_size: 100,
            max_depth: 4,
        };
        assert_eq!(
            scan_all(b"\x81\x5a\x00\x01\x00\x00", &small),
            Err(MessageError::TooLarge(100))
        );
        assert_eq!(
            scan_all(b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", &small),
            Err(MessageError::TooLarge(100))
        );
        assert_eq!(
            scan_all(&[0x81; 101], &small),
            Err(MessageError::TooDeep(4))
        );
        assert_eq!(
            scan_all(b"\x81\x81\x81\x81\x80", &small),
            Err(MessageError::TooDeep(4))
        );
        assert_eq!(scan_all(b"\x81\x81\x81\x80", &small), Ok(Scan::Complete(4)));
        // Tags nest like arrays: each counts as a level until the item it wraps is done.
        assert_eq!(
            scan_all(b"\x81\xc6\xc6\x81\x80", &small),
            Err(MessageError::TooDeep(4))
        );
        assert_eq!(
            scan_all(b"\x82\xc6\xc6\x80\xc6\xc6\x01", &small),
            Ok(Scan::Complete(7))
        );
        let mut tags = vec![0x81];
        tags.extend([0xc6; 100_000]);
        assert_eq!(scan_all(&tags, &LIMITS), Err(MessageError::TooDeep(128)));
        assert!(matches!(
            scan_all(b"\x9f\xc6\xff", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
    }

    #[test]
    fn flat_arrays_take_the_short_path_with_the_same_verdicts() {
        let item = b"\x85\x64port\x41\xff\x3b\xff\xff\xff\xff\xff\xff\xff\xff\xf9\x3e\x00\xf6";
        assert_eq!(flat_array(item, &LIMITS), Some(item.len()));
        assert_eq!(scan_all(item, &LIMITS), Ok(Scan::Complete(item.len())));
        // Everything else is left to the general scanner, which reports errors.
        for bad in [
            &b"\x9c"[..],
            b"\x82\x01\x1c",
            b"\x82\x01\xf8\x01",
            b"\x81\x62\xff\xfe",
            b"\x82\x01",
            b"\x81\x81\x01",
            b"\x81\xc1\x01",
            b"\x01",
        ] {
            assert_eq!(flat_array(bad, &LIMITS), None, "{bad:?}");
        }
        assert!(matches!(
            scan_all(b"\x9c", &LIMITS),
            Err(MessageError::Malformed { .. })
        ));
        let tight = Limits {
            max_message_size: 4,
            max_depth: 1,
        };
        assert_eq!(flat_array(b"\x81\x64port", &tight), None);
        assert_eq!(
            scan_all(b"\x81\x64port", &tight),
            Err(MessageError::TooLarge(4))
        );
        let flat = Limits {
            max_message_size: 100,
            max_depth: 0,
        };
        assert_eq!(scan_all(b"\x80", &flat), Err(MessageError::TooDeep(0)));
    }

    #[test]
    fn json_refuses_what_json_cannot_say() {
        let mut out = Vec::new();
        assert!(matches!(
            to_json(b"\x81\xf9\x7e\x00", &mut out),
            Err(MessageError::NotJson(_))
        ));
        assert!(matches!(
            to_json(b"\x81\xa1\x80\x01", &mut out),
            Err(MessageError::NotJson(_))
        ));
        assert_eq!(
            json(b"\x82\xc2\x41\x01\x3b\xff\xff\xff\xff\xff\xff\xff\xff"),
            "[\"\\u0001\",-18446744073709551616]"
        );
    }

    /// What the conversion wrote before it streamed: the item as a tree, then as JSON.
    fn through_a_tree(item: &[u8]) -> Result<Vec<u8>, MessageError> {
        let value = Value::decode(item).map_err(|e| malformed(e.to_string()))?;
        let mut out = Vec::new();
        value.write_json(&mut out).map_err(MessageError::NotJson)?;
        Ok(out)
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            Just(Value::Undefined),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Int(i.into())),
            any::<u64>().prop_map(|i| Value::Int(i.into())),
            any::<f64>().prop_map(Value::Float),
            prop::collection::vec(any::<u8>(), 0..6).prop_map(Value::Bytes),
            ".{0,6}".prop_map(Value::Text),
            (0u8..24).prop_map(Value::Simple),
        ];
        leaf.prop_recursive(6, 300, 20, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..30).prop_map(Value::Array),
                prop::collection::vec((inner.clone(), inner.clone()), 0..8).prop_map(Value::Map),
                (0u64..300, inner).prop_map(|(t, v)| Value::Tagged(t, Box::new(v))),
            ]
        })
    }

    proptest! {
        #[test]
        fn strings_are_written_as_serde_json_writes_them(s in "(.|[\\x00-\\x1f\"\\\\\\x7f])*") {
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }

        #[test]
        fn the_text_check_is_utf8s(
            ascii in prop::collection::vec(0u8..0x80, 0..100),
            at in 0usize..100,
            high in prop::collection::vec(0x80u8.., 0..4),
        ) {
            // ASCII of every length around the 32-byte blocks, then bytes above 0x7f (valid
            // UTF-8 or not) spliced in anywhere.
            prop_assert!(is_text(&ascii));
            let mut bytes = ascii.clone();
            let at = at.min(bytes.len());
            bytes.splice(at..at, high);
            prop_assert_eq!(is_text(&bytes), std::str::from_utf8(&bytes).is_ok());
        }

        #[test]
        fn streams_what_a_tree_would_write(items in prop::collection::vec(value(), 0..20)) {
            let item = Value::Array(items).encode();
            let mut out = Vec::new();
            let streamed = to_json(&item, &mut out).map(|()| out);
            match (streamed, through_a_tree(&item)) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(MessageError::NotJson(_)), Err(MessageError::NotJson(_))) => {}
                (a, b) => prop_assert!(false, "streamed {:?}, tree {:?}", a, b),
            }
        }
    }

    /// The general path alone, as [`to_json`] was before its flat fast path.
    fn general_to_json(item: &[u8]) -> Result<Vec<u8>, MessageError> {
        let mut d = Decoder::new(item);
        let mut out = Vec::new();
        write_json(&mut d, &mut out)?;
        if d.position() != item.len() {
            return Err(malformed("trailing bytes after the item"));
        }
        Ok(out)
    }

    fn flat_item() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(|n| Value::Int(n.into())),
            any::<u64>().prop_map(|n| Value::Int(n.into())),
            "(.|[\\x00-\\x1f\"\\\\])*".prop_map(Value::Text),
            Just(Value::Bool(true)),
            prop::collection::vec(any::<u8>(), 0..4).prop_map(Value::Bytes),
        ]
    }

    proptest! {
        #[test]
        fn the_flat_path_writes_what_the_general_one_writes(
            items in prop::collection::vec(flat_item(), 0..30),
            cut in any::<prop::sample::Index>(),
            junk in prop::collection::vec(any::<u8>(), 0..3),
        ) {
            let item = Value::Array(items).encode();
            let mut out = b"x".to_vec();
            let got = to_json(&item, &mut out).map(|()| out[1..].to_vec());
            prop_assert_eq!(got, general_to_json(&item));
            // Cut short, with bytes after it, or broken: the same verdict as well.
            let mut broken = item[..cut.index(item.len())].to_vec();
            broken.extend_from_slice(&junk);
            let mut out = Vec::new();
            let got = to_json(&broken, &mut out).map(|()| out);
            prop_assert_eq!(got, general_to_json(&broken));
        }
    }

    #[test]
    fn flat_edges() {
        for item in [
            &b"\x80"[..],
            b"\x81\x3b\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x81\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x82\x61\"\x20",
            b"\x81\x62\xc3\xa9",
            b"\x81\x61\xff",
            b"\x9f\x01\xff",
        ] {
            let mut out = Vec::new();
            let got = to_json(item, &mut out).map(|()| out);
            assert_eq!(got, general_to_json(item), "{item:x?}");
        }
    }

    #[test]
    fn indefinite_lengths_and_broken_items() {
        // [_ "a", {_ "k": (_ h'01', h'02')}, (_ "b", "c"), [_ ]]
        let item = b"\x9f\x61a\xbf\x61k\x5f\x41\x01\x41\x02\xff\xff\x7f\x61b\x61c\xff\x9f\xff\xff";
        assert_eq!(json(item), r#"["a",{"k":"\u0001\u0002"},"bc",[]]"#);
        assert_eq!(json(item).into_bytes(), through_a_tree(item).unwrap());
        for broken in [
            &b"\x82\x01"[..],
            b"\x81\xbf\x61k\xff",
            b"\x81\xff",
            b"\x81\x01\x01",
            b"\x81\x7f\x01\xff",
        ] {
            let mut out = Vec::new();
            assert!(
                matches!(
                    to_json(broken, &mut out),
                    Err(MessageError::Malformed { .. })
                ),
                "{broken:x?}"
            );
            assert!(through_a_tree(broken).is_err());
        }
        let mut deep = vec![0x81; MAX_DEPTH];
        deep.push(0x80);
        assert!(matches!(
            to_json(&deep, &mut Vec::new()),
            Err(MessageError::Malformed { .. })
        ));
        // Tags count toward the depth as containers do.
        let mut tagged = vec![0x81; MAX_DEPTH - 1];
        tagged.extend([0xc1, 0x01]);
        assert_eq!(json(&tagged).into_bytes(), through_a_tree(&tagged).unwrap());
        tagged.insert(MAX_DEPTH - 1, 0xc1);
        assert!(through_a_tree(&tagged).is_err());
        assert!(to_json(&tagged, &mut Vec::new()).is_err());
    }
}
