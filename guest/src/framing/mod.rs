//! The data phase: turning the wire framing into messages and back.
//!
//! Messages cross the engine's API as CBOR items (lossless: byte strings stay apart from
//! text strings, integers from floats); each direction of the wire uses the framing its
//! sender chose.

mod cbor;
mod json;

pub(crate) use cbor::header;

use crate::buffer;
use crate::error::MessageError;

/// A wire framing for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// A sequence of CBOR items.
    Cbor,
    /// Concatenated JSON texts.
    Json,
}

impl Framing {
    /// Both framings, in the reference's preference order.
    pub const ALL: [Framing; 2] = [Framing::Cbor, Framing::Json];

    /// The name used on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Cbor => "cbor",
            Framing::Json => "json",
        }
    }

    /// The framing with this wire name (`storable` is Perl-only and never supported).
    pub fn from_name(name: &str) -> Option<Framing> {
        Framing::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Limits on what a peer (or the application) can make the engine hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded message, in bytes, in either direction (default 16 MiB).
    pub max_message_size: usize,
    /// Deepest nesting of arrays and maps; the message array itself is level 1 (default 128).
    pub max_depth: usize,
}

impl Limits {
    /// What one connection may hold for its peer at once (the partial message, bytes
    /// not parsed yet, outputs not polled yet): twice the message size limit plus a
    /// little, room for a whole message and the input that completes it.
    pub fn max_buffered_bytes(&self) -> usize {
        self.max_message_size
            .saturating_mul(2)
            .saturating_add(buffer::KEEP)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 16 << 20,
            max_depth: 128,
        }
    }
}

/// What a scanner found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The message is not complete yet.
    Partial,
    /// The message ends at this offset.
    Complete(usize),
}

/// Whether a message (as CBOR) is a keepalive: `[]`, or `["", ""]` with either string kind.
pub(crate) fn is_keepalive(item: &[u8]) -> bool {
    match item {
        [0x80] => true,
        [0x82, a, b] => matches!(a, 0x40 | 0x60) && matches!(b, 0x40 | 0x60),
        _ => false,
    }
}

/// Checks messages given as CBOR (arrays, well-formed, within the limits). One checker
/// serves message after message, so checking does not allocate per message.
#[derive(Debug, Default)]
pub(crate) struct Checker(cbor::Scanner);

impl Checker {
    /// Checks the CBOR array at the start of `buf` and returns its length.
    pub(crate) fn first_item(
        &mut self,
        buf: &[u8],
        limits: &Limits,
    ) -> Result<usize, MessageError> {
        // A previous message may have failed half way.
        self.0.reset();
        match self.0.scan(buf, limits)? {
            Scan::Complete(end) => Ok(end),
            Scan::Partial => Err(MessageError::Malformed {
                framing: "cbor",
                detail: "incomplete item".into(),
            }),
        }
    }

    /// Checks that `item` is exactly one CBOR array.
    pub(crate) fn check_item(&mut self, item: &[u8], limits: &Limits) -> Result<(), MessageError> {
        if self.first_item(item, limits)? == item.len() {
            Ok(())
        } else {
            Err(MessageError::Malformed {
                framing: "cbor",
                detail: "trailing bytes after the item".into(),
            })
        }
    }
}

/// Splits a CBOR sequence of messages (what the component's `messages` output and `send`
/// carry) into its items, checking each (default limits).
pub fn split_sequence(mut buf: &[u8]) -> Result<Vec<&[u8]>, MessageError> {
    let limits = Limits::default();
    let mut checker = Checker::default();
    let mut items = Vec::new();
    while !buf.is_empty() {
        let (item, rest) = buf.split_at(checker.first_item(buf, &limits)?);
        items.push(item);
        buf = rest;
    }
    Ok(items)
}

/// Appends message `item` (CBOR, already checked) to `out` in `framing`. On error `out` is
/// left unchanged.
#[inline]
pub(crate) fn encode(
    framing: Framing,
    item: &[u8],
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<(), MessageError> {
    match framing {
        Framing::Cbor => out.extend_from_slice(item),
        Framing::Json => {
            let start = out.len();
            let result = cbor::to_json(item, out).and_then(|()| {
                if out.len() - start > limits.max_message_size {
                    Err(MessageError::TooLarge(limits.max_message_size))
                } else {
                    Ok(())
                }
            });
            if result.is_err() {
                out.truncate(start);
            }
            result?;
        }
    }
    Ok(())
}

/// The receiving side of the data phase: buffers a partial message, yields complete ones.
#[derive(Debug)]
pub(crate) struct Decoder {
    framing: Framing,
    /// The start of a message that is not complete yet (never more than the size limit).
    partial: Vec<u8>,
    cbor: cbor::Scanner,
    json: json::Scanner,
}

impl Decoder {
    pub(crate) fn new(framing: Framing) -> Decoder {
        Decoder {
            framing,
            partial: Vec::new(),
            cbor: cbor::Scanner::default(),
            json: json::Scanner::default(),
        }
    }

    /// The framing it reads.
    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether part of a message is buffered.
    pub(crate) fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// Bytes the decoder holds (the partial message buffer's capacity).
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.partial.capacity()
    }

    /// At most what [`buffered_bytes`](Self::buffered_bytes) becomes after decoding
    /// `extra` more bytes.
    pub(crate) fn buffered_after(&self, extra: usize, limits: &Limits) -> usize {
        let (len, capacity) = (self.partial.len(), self.partial.capacity());
        buffer::capacity_after(len, capacity, extra, limits.max_message_size)
    }

    /// Decodes `input`, handing each complete message except keepalives, as CBOR, to `sink`.
    /// Messages complete before an error are handed over before it is returned.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        limits: &Limits,
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<(), MessageError> {
        if self.partial.is_empty() {
            // The common case: complete messages are read straight from the input.
            let used = self.drain(input, limits, sink)?;
            let rest = input.get(used..).unwrap_or_default();
            buffer::append(&mut self.partial, rest, limits.max_message_size);
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buffer::append(&mut buf, input, limits.max_message_size);
            let used = self.drain(&buf, limits, sink)?;
            buf.drain(..used);
            // A big message just delivered leaves its room behind: give it back.
            buffer::release(&mut buf);
            self.partial = buf;
        }
        Ok(())
    }

    /// Hands over every complete message at the start of `buf`; returns the bytes used.
    fn drain(
        &mut self,
        buf: &[u8],
        limits: &Limits,
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<usize, MessageError> {
        let mut used = 0;
        loop {
            let mut rest = &buf[used..];
            if self.framing == Framing::Json {
                // Whitespace between texts belongs to no message.
                let ws = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
                if ws > 0 {
                    used += ws;
                    rest = &rest[ws..];
                }
            }
            if rest.is_empty() {
                return Ok(used);
            }
            let scan = match self.framing {
                Framing::Cbor => self.cbor.scan(rest, limits)?,
                Framing::Json => self.json.scan(rest, limits)?,
            };
            let Scan::Complete(end) = scan else {
                return Ok(used);
            };
            // CBOR is handed over where it lies; JSON is converted first.
            let converted;
            let item = match self.framing {
                Framing::Cbor => &rest[..end],
                Framing::Json => {
                    let mut item = Vec::with_capacity(end);
                    json::to_cbor(&rest[..end], &mut item)?;
                    converted = item;
                    &converted[..]
                }
            };
            used += end;
            if !is_keepalive(item) {
                sink(item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        framing: Framing,
        chunks: &[&[u8]],
        limits: &Limits,
    ) -> (Vec<Vec<u8>>, Option<MessageError>) {
        let mut d = Decoder::new(framing);
        let mut got = Vec::new();
        for chunk in chunks {
            if let Err(e) = d.decode(chunk, limits, &mut |m| got.push(m.to_vec())) {
                return (got, Some(e));
            }
        }
        (got, None)
    }

    #[test]
    fn keepalives_are_swallowed() {
        let (got, err) = decode_all(
            Framing::Json,
            &[b"[] [\"\",\"\"]\n[\"p\",1]"],
            &Limits::default(),
        );
        assert_eq!(got, [b"\x82\x61p\x01".to_vec()]);
        assert!(err.is_none());
        let (got, _) = decode_all(
            Framing::Cbor,
            &[b"\x80\x82\x40\x60\x81\x40"],
            &Limits::default(),
        );
        assert_eq!(got, [b"\x81\x40".to_vec()]);
    }

    #[test]
    fn complete_messages_survive_a_later_error() {
        let (got, err) = decode_all(
            Framing::Json,
            &[b"[\"a\"]", b"[\"b\"] 5"],
            &Limits::default(),
        );
        assert_eq!(got.len(), 2);
        assert_eq!(err, Some(MessageError::NotAnArray));
    }

    #[test]
    fn partial_input_is_bounded() {
        let limits = Limits {
            max_message_size: 10,
            max_depth: 8,
        };
        let (got, err) = decode_all(Framing::Json, &[b"[\"a\"][\"12", b"3456789"], &limits);
        assert_eq!(got.len(), 1);
        assert_eq!(err, Some(MessageError::TooLarge(10)));
    }

    #[test]
    fn encode_checks_and_converts() {
        let limits = Limits::default();
        let mut out = Vec::new();
        encode(Framing::Json, b"\x82\x61p\x42hi", &limits, &mut out).unwrap();
        assert_eq!(out, b"[\"p\",\"hi\"]");
        // Messages are checked before encoding: one complete array, nothing after it.
        let mut c = Checker::default();
        assert!(c.check_item(b"\x82\x61p", &limits).is_err());
        assert!(c.check_item(b"\x81\x01\x01", &limits).is_err());
        assert_eq!(
            c.check_item(b"\x01", &limits),
            Err(MessageError::NotAnArray)
        );
        assert_eq!(c.first_item(b"\x81\x01\x80", &limits), Ok(2));
        // A failure half way leaves nothing behind for the next message.
        assert!(c.first_item(b"\x82\x82\x01", &limits).is_err());
        assert_eq!(c.check_item(b"\x81\x01", &limits), Ok(()));
        let tight = Limits {
            max_message_size: 12,
            max_depth: 8,
        };
        // Fits as CBOR (10 bytes) but not once each high byte becomes two in JSON.
        let item = b"\x81\x48\xff\xff\xff\xff\xff\xff\xff\xff";
        assert_eq!(
            encode(Framing::Json, item, &tight, &mut out),
            Err(MessageError::TooLarge(12))
        );
        assert_eq!(out, b"[\"p\",\"hi\"]");
    }
}
