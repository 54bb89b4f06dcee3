//! JSON framing: JSON texts, one per message, concatenated (whitespace allowed between).
//!
//! [`Scanner`] finds where a text ends by counting brackets outside strings, resuming where
//! it stopped, and enforces depth and size before anything is parsed; [`to_cbor`] then
//! parses the complete text and writes it as CBOR (strings as text strings).

use serde::Deserialize;
use serde_json::Value;

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
        while let Some(&b) = msg.get(self.pos).filter(|_| self.pos < end) {
            self.pos += 1;
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
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

/// Parses one complete JSON text (as delimited by [`Scanner`]) and writes it as CBOR.
pub(crate) fn to_cbor(text: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
    // The scanner has already bounded the depth, so serde_json's own fixed limit of 128
    // levels (which would undercut a larger configured limit) is switched off.
    let mut de = serde_json::Deserializer::from_slice(text);
    de.disable_recursion_limit();
    let value = Value::deserialize(&mut de).map_err(|e| MessageError::Malformed {
        framing: "json",
        detail: e.to_string(),
    })?;
    crate::value::Value::from(value).encode_into(out);
    Ok(())
}

#[cfg(test)]
mod tests {
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
}
