//! JSON framing: JSON texts, one per message, concatenated (whitespace allowed between).
//!
//! [`Scanner`] finds where a text ends by counting brackets outside strings, resuming where
//! it stopped, and enforces depth and size before anything is parsed; [`to_cbor`] then
//! parses the complete text and writes it as CBOR (strings as text strings) as it goes,
//! never holding the message as a tree: a 16 MiB text of small items would take hundreds
//! of MiB as one, more than a node's sandbox has.

use std::fmt;

use minicbor::Encoder;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::{Limits, Scan};
use crate::error::MessageError;

/// Resumable end-of-text finder for one message; positions are relative to its first byte.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Scanner {
    /// Scans `msg` (one message from its first byte, which must be `[`, possibly followed
    /// by more) from where the previous call stopped.
    pub(crate) fn scan(&mut self, msg: &[u8], limits: &Limits) -> Result<Scan, MessageError> {
        if self.pos == 0 {
            match msg.first() {
                None => return Ok(Scan::Partial),
                Some(b'[') => {}
                Some(_) => return Err(MessageError::NotAnArray),
            }
        }
        let end = msg.len().min(limits.max_message_size);
        while self.pos < end {
            if self.escaped {
                self.escaped = false;
                self.pos += 1;
                continue;
            }
            if self.in_string {
                let rest = msg.get(self.pos..end).unwrap_or_default();
                let Some(i) = string_special(rest) else {
                    self.pos = end;
                    break;
                };
                match rest.get(i) {
                    Some(b'\\') => self.escaped = true,
                    _ => self.in_string = false,
                }
                self.pos += i + 1;
                continue;
            }
            let Some(&b) = msg.get(self.pos) else { break };
            self.pos += 1;
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth > limits.max_depth {
                        return Err(MessageError::TooDeep(limits.max_depth));
                    }
                }
                b']' | b'}' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        let end = self.pos;
                        *self = Scanner::default();
                        return Ok(Scan::Complete(end));
                    }
                }
                _ => {}
            }
        }
        if msg.len() > limits.max_message_size {
            return Err(MessageError::TooLarge(limits.max_message_size));
        }
        Ok(Scan::Partial)
    }
}

/// Where the next quote or backslash of a string is: the only bytes that matter inside
/// one. Long strings are most of a large message, and going a byte at a time through
/// them was most of what such a message cost in the sandbox.
fn string_special(rest: &[u8]) -> Option<usize> {
    memchr::memchr2(b'"', b'\\', rest)
}

/// Parses one complete JSON text (as delimited by [`Scanner`]) and writes it as CBOR, as
/// [`crate::Value`] would encode the text's value: integers that fit 64 bits as integers,
/// other numbers as floats, strings as text strings, arrays and maps of definite length.
/// A key that comes twice in an object comes twice in the map, where every decoder of
/// the hosts and of Perl keeps the last, as JSON decoders do.
pub(crate) fn to_cbor(text: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
    let mut writer = Writer {
        out: Encoder::new(out),
        long: long_containers(text),
        next_long: 0,
        opened: 0,
    };
    // The scanner has already bounded the depth, so serde_json's own fixed limit of 128
    // levels (which would undercut a larger configured limit) is switched off.
    let mut de = serde_json::Deserializer::from_slice(text);
    de.disable_recursion_limit();
    Item(&mut writer)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| MessageError::Malformed {
            framing: "json",
            detail: e.to_string(),
        })
}

/// Containers holding this many items or more need a header longer than one byte.
const LONG: u32 = 24;

/// The item counts of the containers of `text` that hold [`LONG`] items or more, as
/// (which container, counted from 0 in the order they open; how many items), in that
/// order. The writer needs a container's count before its items; the others' counts fit
/// the one byte it leaves and fills in afterwards. Counting is by commas outside strings,
/// which agrees with the parser on every valid text; the writer checks that it does.
fn long_containers(text: &[u8]) -> Vec<(u32, u32)> {
    // For each open container: its number, commas at its level, whether it has an item.
    let mut open: Vec<(u32, u32, bool)> = Vec::new();
    let mut long = Vec::new();
    let (mut opened, mut in_string, mut escaped) = (0u32, false, false);
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        i += 1;
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {
                    let rest = text.get(i..).unwrap_or_default();
                    i = string_special(rest).map_or(text.len(), |j| i + j);
                }
            }
            continue;
        }
        if !b.is_ascii_whitespace()
            && !matches!(b, b']' | b'}')
            && let Some((_, _, any)) = open.last_mut()
        {
            *any = true;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                open.push((opened, 0, false));
                opened = opened.saturating_add(1);
            }
            b',' => {
                if let Some((_, commas, _)) = open.last_mut() {
                    *commas = commas.saturating_add(1);
                }
            }
            b']' | b'}' => {
                if let Some((n, commas, true)) = open.pop() {
                    let items = commas.saturating_add(1);
                    if items >= LONG {
                        long.push((n, items));
                    }
                }
            }
            _ => {}
        }
    }
    // Pushed as they closed; the writer meets them as they open.
    long.sort_unstable();
    long
}

/// Where the parser's items go as CBOR.
struct Writer<'o> {
    out: Encoder<&'o mut Vec<u8>>,
    /// [`long_containers`] of the text.
    long: Vec<(u32, u32)>,
    /// The next entry of `long` to meet.
    next_long: usize,
    /// Containers opened so far.
    opened: u32,
}

/// A container's header as written before its items.
enum Header {
    /// The count is known and written; the items must come to that many.
    Long(u32),
    /// One byte at this offset, to take the count once the items are written.
    Short(usize),
}

impl Writer<'_> {
    /// Writes the header of the next container, an array (`map` false) or a map.
    fn open(&mut self, map: bool) -> Header {
        let number = self.opened;
        self.opened = self.opened.saturating_add(1);
        match self.long.get(self.next_long) {
            Some(&(n, count)) if n == number => {
                self.next_long += 1;
                // Writing into a Vec cannot fail.
                let _ = if map {
                    self.out.map(count.into())
                } else {
                    self.out.array(count.into())
                };
                Header::Long(count)
            }
            _ => {
                let out = self.out.writer_mut();
                out.push(if map { 0xa0 } else { 0x80 });
                Header::Short(out.len() - 1)
            }
        }
    }

    /// Completes a container's header now that it held `items`.
    fn close<E: de::Error>(&mut self, header: Header, items: u32) -> Result<(), E> {
        match header {
            Header::Long(count) if count == items => Ok(()),
            Header::Short(at) if items < LONG => {
                if let Some(byte) = self.out.writer_mut().get_mut(at) {
                    // Below 24: the count is the header byte's low bits.
                    *byte |= items as u8;
                }
                Ok(())
            }
            _ => Err(E::custom("container sizes disagree")),
        }
    }
}

/// One JSON value to write: the parser calls the visitor, which writes as it is called.
struct Item<'w, 'o>(&'w mut Writer<'o>);

impl<'de> DeserializeSeed<'de> for Item<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

// Writing into a Vec cannot fail, hence the ignored results.
impl<'de> Visitor<'de> for Item<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        let _ = self.0.out.null();
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        let _ = self.0.out.bool(b);
        Ok(())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        let _ = self.0.out.u64(n);
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        let _ = self.0.out.i64(n);
        Ok(())
    }

    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        let _ = self.0.out.f64(f);
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        let _ = self.0.out.str(s);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let header = self.0.open(false);
        let mut n = 0u32;
        while items.next_element_seed(Item(self.0))?.is_some() {
            n = n.saturating_add(1);
        }
        self.0.close(header, n)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut pairs: A) -> Result<(), A::Error> {
        let header = self.0.open(true);
        let mut n = 0u32;
        while pairs.next_key_seed(Item(self.0))?.is_some() {
            pairs.next_value_seed(Item(self.0))?;
            n = n.saturating_add(1);
        }
        self.0.close(header, n)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: Limits = Limits {
        max_message_size: 1 << 20,
        max_depth: 128,
    };

    #[test]
    fn finds_text_ends_across_strings_and_escapes() {
        let text = br#"["p","a]\"[{",{"k":[1,2.5e3,null,true]}]"#;
        let mut s = Scanner::default();
        for end in 0..text.len() {
            assert_eq!(s.scan(&text[..end], &LIMITS), Ok(Scan::Partial), "at {end}");
        }
        let mut more = text.to_vec();
        more.extend_from_slice(b" []");
        assert_eq!(s.scan(&more, &LIMITS), Ok(Scan::Complete(text.len())));
        let mut out = Vec::new();
        to_cbor(text, &mut out).unwrap();
        let mut back = Vec::new();
        super::super::cbor::to_json(&out, &mut back).unwrap();
        assert_eq!(back, br#"["p","a]\"[{",{"k":[1,2500.0,null,true]}]"#);
    }

    #[test]
    fn limits_and_shape() {
        let small = Limits {
            max_message_size: 8,
            max_depth: 2,
        };
        assert_eq!(
            Scanner::default().scan(b"{}", &small),
            Err(MessageError::NotAnArray)
        );
        assert_eq!(
            Scanner::default().scan(b"[[[]]]", &small),
            Err(MessageError::TooDeep(2))
        );
        assert_eq!(
            Scanner::default().scan(b"[[]]", &small),
            Ok(Scan::Complete(4))
        );
        assert_eq!(
            Scanner::default().scan(b"[\"abcdefgh\"]", &small),
            Err(MessageError::TooLarge(8))
        );
        assert_eq!(
            Scanner::default().scan(b"[\"abcd\"]", &small),
            Ok(Scan::Complete(8))
        );
        let mut out = Vec::new();
        assert!(matches!(
            to_cbor(b"[1,}", &mut out),
            Err(MessageError::Malformed { .. })
        ));
    }

    /// What the conversion wrote before it streamed: the text as a tree, then encoded.
    fn through_a_tree(text: &[u8]) -> Vec<u8> {
        let tree: serde_json::Value = serde_json::from_slice(text).unwrap();
        crate::Value::from(tree).encode()
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e300f64..1e300).prop_map(serde_json::Value::from),
            ".{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 400, 40, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..40).prop_map(serde_json::Value::Array),
                // Distinct keys: a repeated one is where the two ways differ (documented).
                prop::collection::btree_map(".{0,6}", inner, 0..30)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn finds_the_end_of_any_text_however_it_arrives(
            items in prop::collection::vec(json_value(), 0..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            // Quotes, backslashes and brackets inside strings included (`.` strings).
            let text = serde_json::to_vec(&serde_json::Value::Array(items)).unwrap();
            let mut more = text.clone();
            more.extend_from_slice(b" [1]");
            let mut ends: Vec<usize> = cuts.iter().map(|c| c.index(text.len())).collect();
            ends.sort_unstable();
            let mut s = Scanner::default();
            for end in ends {
                prop_assert_eq!(s.scan(&more[..end], &LIMITS), Ok(Scan::Partial));
            }
            prop_assert_eq!(s.scan(&more, &LIMITS), Ok(Scan::Complete(text.len())));
        }

        #[test]
        fn streams_what_a_tree_would_encode(items in prop::collection::vec(json_value(), 0..40)) {
            let text = serde_json::to_vec(&serde_json::Value::Array(items)).unwrap();
            let mut out = Vec::new();
            to_cbor(&text, &mut out).unwrap();
            prop_assert_eq!(out, through_a_tree(&text));
        }
    }

    #[test]
    fn long_and_short_containers_and_strings_with_brackets() {
        for text in [
            &br#"[]"#[..],
            br#"[{}]"#,
            br#"[ [ ] , { } , "a,]}" ]"#,
            br#"["\"[,", 1, [1,2,3], {"a,b": [ ], "c": {"d":[{}]}}]"#,
        ] {
            let mut out = Vec::new();
            to_cbor(text, &mut out).unwrap();
            assert_eq!(
                out,
                through_a_tree(text),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        for n in [23, 24, 255, 256, 65535, 65536] {
            let items = vec!["0"; n].join(",");
            let text = format!(
                r#"["p",[{items}],{{{}}}]"#,
                (0..n)
                    .map(|i| format!(r#""k{i}":[{items}]"#))
                    .take(30)
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let mut out = Vec::new();
            to_cbor(text.as_bytes(), &mut out).unwrap();
            assert_eq!(out, through_a_tree(text.as_bytes()), "{n} items");
        }
    }

    #[test]
    fn repeated_keys_stay_and_broken_texts_are_malformed() {
        let mut out = Vec::new();
        to_cbor(br#"[{"a":1,"a":2}]"#, &mut out).unwrap();
        assert_eq!(out, b"\x81\xa2\x61a\x01\x61a\x02");
        for text in [
            &b"[1,]"[..],
            b"[,]",
            b"[1 2]",
            b"[\"a\" 1]",
            b"[{\"a\"}]",
            b"[1]x",
        ] {
            assert!(
                matches!(
                    to_cbor(text, &mut Vec::new()),
                    Err(MessageError::Malformed { .. })
                ),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
