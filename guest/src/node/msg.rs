//! Building and taking apart messages `[PORT, ARGS...]` as CBOR without decoding the
//! arguments.

use std::borrow::Cow;

use minicbor::Decoder;
use minicbor::data::Type;

use crate::error::MessageError;
use crate::value::Value;

fn malformed(detail: &str) -> MessageError {
    MessageError::Malformed {
        framing: "cbor",
        detail: detail.into(),
    }
}

/// Writes a CBOR array header for `len` items.
fn array_header(len: u64, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = minicbor::Encoder::new(&mut *out).array(len);
}

/// `[port, ARGS...]` from a port name and a CBOR array of arguments.
pub(crate) fn join(port: &str, args: &[u8]) -> Result<Vec<u8>, MessageError> {
    let mut d = Decoder::new(args);
    let mut out = Vec::with_capacity(args.len() + port.len() + 10);
    match d.datatype() {
        Ok(Type::Array) => {
            let n = d
                .array()
                .map_err(|e| malformed(&e.to_string()))?
                .unwrap_or_default();
            array_header(n + 1, &mut out);
        }
        Ok(Type::ArrayIndef) => {
            d.array().map_err(|e| malformed(&e.to_string()))?;
            out.push(0x9f);
        }
        _ => return Err(MessageError::NotAnArray),
    }
    Value::text(port).encode_into(&mut out);
    out.extend_from_slice(&args[d.position()..]);
    Ok(out)
}

/// Splits a checked message into its port (a name) and the CBOR array of its arguments.
pub(crate) fn split(message: &[u8]) -> Option<(Cow<'_, str>, Vec<u8>)> {
    let mut d = Decoder::new(message);
    let len = d.array().ok()?;
    if len == Some(0) {
        return None;
    }
    let port = match d.datatype().ok()? {
        // The common case, read in place.
        Type::String => Cow::Borrowed(d.str().ok()?),
        _ => Value::decode_one(&mut d)
            .ok()?
            .as_name()?
            .into_owned()
            .into(),
    };
    let mut args = Vec::with_capacity(message.len() - d.position() + 9);
    match len {
        Some(n) => array_header(n - 1, &mut args),
        None => args.push(0x9f),
    }
    args.extend_from_slice(&message[d.position()..]);
    Some((port, args))
}

/// A message from values.
pub(crate) fn build(port: &str, args: impl IntoIterator<Item = Value>) -> Vec<u8> {
    let mut items = vec![Value::text(port)];
    items.extend(args);
    Value::Array(items).encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_split() {
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
        assert_eq!(split(b"\x80"), None);
        assert_eq!(join("p", b"\x01"), Err(MessageError::NotAnArray));
    }
}
