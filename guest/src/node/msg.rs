//! Building and taking apart messages `[PORT, ARGS...]` as CBOR without decoding the
//! arguments.

use std::borrow::Cow;

use minicbor::Decoder;
use minicbor::data::Type;

use crate::error::MessageError;
use crate::framing;
use crate::value::Value;

fn malformed(detail: &str) -> MessageError {
    MessageError::Malformed {
        framing: "cbor",
        detail: detail.into(),
    }
}

/// Writes a CBOR head, `major` type and argument `n` in the shortest form, by hand: an
/// encoder per message sent and received cost more than the message's other work.
#[inline]
fn head(major: u8, n: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    if let Ok(n) = u8::try_from(n) {
        if n < 24 {
            out.push(m | n);
        } else {
            out.extend_from_slice(&[m | 24, n]);
        }
    } else if let Ok(n) = u16::try_from(n) {
        out.push(m | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(m | 26);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Writes a CBOR array header for `len` items.
#[inline]
pub(crate) fn array_header(len: u64, out: &mut Vec<u8>) {
    head(4, len, out);
}

/// Writes a CBOR map header for `len` pairs.
pub(crate) fn map_header(len: u64, out: &mut Vec<u8>) {
    head(5, len, out);
}

/// Writes a CBOR text string.
#[inline]
pub(crate) fn text(s: &str, out: &mut Vec<u8>) {
    head(3, s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// `[port, ARGS...]` from a port name and a CBOR array of arguments, appended to `out`
/// (a buffer reused from message to message: nothing allocated per message). On an
/// error `out` may hold a partial message.
pub(crate) fn join_into(port: &str, args: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
    // The common case, a definite array, read by hand: a decoder per message costs more
    // in the sandbox than the rest of the join.
    if let Some(h) = framing::header(args)
        && h.major == 4
        && h.info <= 27
        && let Some(items) = h.arg.checked_add(1)
    {
        array_header(items, out);
        text(port, out);
        out.extend_from_slice(args.get(h.len..).unwrap_or_default());
        return Ok(());
    }
    join_any(port, args, out)
}

/// [`join_into`] of any arguments, through a decoder.
fn join_any(port: &str, args: &[u8], out: &mut Vec<u8>) -> Result<(), MessageError> {
    let mut d = Decoder::new(args);
    match d.datatype() {
        Ok(Type::Array) => {
            let n = d
                .array()
                .map_err(|e| malformed(&e.to_string()))?
                .unwrap_or_default();
            let items = n
                .checked_add(1)
                .ok_or_else(|| malformed("array too long"))?;
            array_header(items, out);
        }
        Ok(Type::ArrayIndef) => {
            d.array().map_err(|e| malformed(&e.to_string()))?;
            out.push(0x9f);
        }
        _ => return Err(MessageError::NotAnArray),
    }
    text(port, out);
    out.extend_from_slice(&args[d.position()..]);
    Ok(())
}

/// A checked message `[PORT, ARGS...]` taken apart in place.
pub(crate) struct Parts<'a> {
    /// The port (a name).
    pub port: Cow<'a, str>,
    /// How many arguments follow (`None`: an indefinite array).
    len: Option<u64>,
    /// The encoded arguments (and the break of an indefinite array).
    rest: &'a [u8],
}

impl Parts<'_> {
    /// Appends the CBOR array of the arguments to `out`.
    pub fn write_args(&self, out: &mut Vec<u8>) {
        match self.len {
            Some(n) => array_header(n, out),
            None => out.push(0x9f),
        }
        out.extend_from_slice(self.rest);
    }

    /// `[first, ARGS...]`: the same arguments after another first item, in a buffer of
    /// its own.
    pub fn renamed(&self, first: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.rest
                .len()
                .saturating_add(first.len())
                .saturating_add(18),
        );
        match self.len {
            Some(n) => array_header(n.saturating_add(1), &mut out),
            None => out.push(0x9f),
        }
        text(first, &mut out);
        out.extend_from_slice(self.rest);
        out
    }

    /// The CBOR array of the arguments in a buffer of its own.
    pub fn args(&self) -> Vec<u8> {
        let mut args = Vec::with_capacity(self.rest.len() + 9);
        self.write_args(&mut args);
        args
    }
}

/// Takes a checked message apart into its port and arguments, without copying.
pub(crate) fn split(message: &[u8]) -> Option<Parts<'_>> {
    split_plain(message).or_else(|| split_any(message))
}

/// [`split`] of the common shape, a definite array whose first item is a definite text
/// string, read by hand (it runs for every message received); `None` for anything else.
#[inline]
fn split_plain(message: &[u8]) -> Option<Parts<'_>> {
    let array = framing::header(message)?;
    if array.major != 4 || array.info > 27 || array.arg == 0 {
        return None;
    }
    let rest = message.get(array.len..)?;
    let name = framing::header(rest)?;
    if name.major != 3 || name.info > 27 {
        return None;
    }
    let end = name.len.checked_add(usize::try_from(name.arg).ok()?)?;
    Some(Parts {
        port: Cow::Borrowed(std::str::from_utf8(rest.get(name.len..end)?).ok()?),
        len: Some(array.arg - 1),
        rest: rest.get(end..)?,
    })
}

/// [`split`] of any other shape, through a decoder.
fn split_any(message: &[u8]) -> Option<Parts<'_>> {
    let mut d = Decoder::new(message);
    let len = d.array().ok()?;
    if len == Some(0) {
        return None;
    }
    let port = match d.datatype().ok()? {
        // The common case, read in place.
        Type::String => Cow::Borrowed(d.str().ok()?),
        // Only strings are names: anything else is not decoded at all (an array of
        // millions of items would take many times its size).
        Type::StringIndef | Type::Bytes | Type::BytesIndef => Value::decode_one(&mut d)
            .ok()?
            .as_name()?
            .into_owned()
            .into(),
        _ => return None,
    };
    Some(Parts {
        port,
        len: len.map(|n| n - 1),
        rest: message.get(d.position()..)?,
    })
}

/// A message from values.
pub(crate) fn build(port: &str, args: impl IntoIterator<Item = Value>) -> Vec<u8> {
    let mut items = vec![Value::text(port)];
    items.extend(args);
    Value::Array(items).encode()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn heads_match_minicbor() {
        for n in [
            0,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            array_header(n, &mut ours);
            minicbor::Encoder::new(&mut theirs).array(n).unwrap();
            assert_eq!(ours, theirs, "array of {n}");
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            map_header(n, &mut ours);
            minicbor::Encoder::new(&mut theirs).map(n).unwrap();
            assert_eq!(ours, theirs, "map of {n}");
        }
        let port = "p".repeat(300);
        let mut ours = Vec::new();
        join_into(&port, b"\x80", &mut ours).unwrap();
        let mut theirs = vec![0x81];
        minicbor::Encoder::new(&mut theirs).str(&port).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn join_and_split() {
        let join = |port: &str, args: &[u8]| {
            let mut out = vec![0xaa];
            join_into(port, args, &mut out).map(|()| out[1..].to_vec())
        };
        let split = |msg: &[u8]| {
            split(msg).map(|p| {
                let args = p.args();
                (p.port.into_owned(), args)
            })
        };
        let args = Value::Array(vec![Value::Int(1), Value::Bytes(b"x".to_vec())]).encode();
        let msg = join("port", &args).unwrap();
        assert_eq!(
            Value::decode(&msg).unwrap(),
            Value::Array(vec![
                Value::text("port"),
                Value::Int(1),
                Value::Bytes(b"x".to_vec())
            ])
        );
        assert_eq!(split(&msg), Some(("port".into(), args)));
        // Byte-string ports are names too (Latin-1).
        let msg = b"\x82\x42\xe9t\x01";
        assert_eq!(split(msg), Some(("\u{e9}t".into(), b"\x81\x01".to_vec())));
        // Indefinite arrays and byte-string ports.
        let msg = b"\x9f\x42pq\x01\xff";
        let (port, args) = split(msg).unwrap();
        assert_eq!(port, "pq");
        assert_eq!(
            Value::decode(&args).unwrap(),
            Value::Array(vec![Value::Int(1)])
        );
        assert_eq!(join("p", b"\x9f\x01\xff").unwrap(), b"\x9f\x61p\x01\xff");
        assert_eq!(
            super::split(msg).unwrap().renamed("n"),
            b"\x9f\x61n\x01\xff"
        );
        let args = Value::Array(vec![Value::Int(1), Value::Bytes(b"x".to_vec())]).encode();
        let renamed = super::split(&join("port", &args).unwrap())
            .unwrap()
            .renamed("node");
        assert_eq!(
            Value::decode(&renamed).unwrap(),
            Value::Array(vec![
                Value::text("node"),
                Value::Int(1),
                Value::Bytes(b"x".to_vec())
            ])
        );
        assert_eq!(split(b"\x80"), None);
        // A port that is not a string is no port, whatever it holds.
        assert_eq!(split(b"\x82\x81\x01\x01"), None);
        assert_eq!(join("p", b"\x01"), Err(MessageError::NotAnArray));
    }

    /// Bytes that start as an array does (any length form, indefinite, reserved).
    fn array_like() -> impl Strategy<Value = Vec<u8>> {
        (0x80u8..=0x9f, prop::collection::vec(any::<u8>(), 0..24)).prop_map(|(first, rest)| {
            let mut bytes = vec![first];
            bytes.extend(rest);
            bytes
        })
    }

    proptest! {
        #[test]
        fn the_plain_paths_read_as_the_decoder_does(bytes in array_like(), port in ".{0,8}") {
            let parts = |p: Option<Parts<'_>>| p.map(|p| (p.port.into_owned(), p.len, p.rest.to_vec()));
            if let Some(plain) = split_plain(&bytes) {
                prop_assert_eq!(parts(Some(plain)), parts(split_any(&bytes)));
            }
            let (mut plain, mut any) = (Vec::new(), Vec::new());
            let verdict = join_into(&port, &bytes, &mut plain);
            prop_assert_eq!(&verdict, &join_any(&port, &bytes, &mut any));
            if verdict.is_ok() {
                prop_assert_eq!(plain, any);
            }
        }
    }
}
