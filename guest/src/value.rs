//! A CBOR value, for the parts of the engine that look inside messages (the node port).
//! Byte strings stay apart from text strings; where the protocol expects a name, either
//! is accepted ([`Value::as_name`]), since Perl sends byte strings unless a string carries
//! its UTF-8 flag.

use std::borrow::Cow;

use minicbor::data::{Tag, Type};
use minicbor::{Decoder, Encoder};

/// The deepest nesting a configuration may allow: converting between framings recurses
/// once per level, and the stack (1 MiB in the component) must hold it with room to spare.
pub const MAX_DEPTH: usize = 512;

/// Why bytes are not exactly one [`Value`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not well-formed CBOR, cut short, or nested deeper than [`MAX_DEPTH`] (the message
    /// says which).
    #[error("{0}")]
    Malformed(String),
    /// More bytes follow the item.
    #[error("trailing bytes after the item")]
    Trailing,
}

/// One CBOR data item.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Undefined,
    Bool(bool),
    /// An integer. CBOR integers are -2^64 ..= 2^64-1; one outside that range encodes as
    /// a bignum (tag 2 or 3), which decodes as [`Value::Tagged`].
    Int(i128),
    Float(f64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Tagged(u64, Box<Value>),
    Simple(u8),
}

impl Value {
    /// A text string value.
    pub fn text(s: impl Into<String>) -> Value {
        Value::Text(s.into())
    }

    /// The string, for a text string or a byte string (bytes read as Latin-1, as Perl does).
    pub fn as_name(&self) -> Option<Cow<'_, str>> {
        match self {
            Value::Text(s) => Some(Cow::Borrowed(s)),
            Value::Bytes(b) => Some(match std::str::from_utf8(b) {
                Ok(s) if s.is_ascii() => Cow::Borrowed(s),
                _ => Cow::Owned(b.iter().map(|&c| char::from(c)).collect()),
            }),
            _ => None,
        }
    }

    /// Whether Perl would see this value as true.
    pub fn is_true(&self) -> bool {
        match self {
            Value::Null | Value::Undefined => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Text(s) => !s.is_empty() && s != "0",
            Value::Bytes(b) => !b.is_empty() && b != b"0",
            _ => true,
        }
    }

    /// Decodes exactly one item (trailing bytes are an error). Arrays, maps and tags may
    /// nest [`MAX_DEPTH`] levels deep: whatever walks the value afterwards (JSON output,
    /// serde, drop) recurses once per level, so deeper input is refused.
    pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
        Value::decode_within(bytes, usize::MAX)
    }

    /// Decodes exactly one item of at most `max_items` items (containers and tags count,
    /// with everything in them): a decoded item takes many times its encoding (an item of
    /// one byte becomes a `Value` of 32), so peers' input is decoded within a bound.
    pub fn decode_within(bytes: &[u8], max_items: usize) -> Result<Value, DecodeError> {
        let mut d = Decoder::new(bytes);
        let v = decode(&mut d, max_items).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if d.position() != bytes.len() {
            return Err(DecodeError::Trailing);
        }
        Ok(v)
    }

    /// Decodes the next item from `d`.
    pub(crate) fn decode_one(d: &mut Decoder) -> Result<Value, minicbor::decode::Error> {
        decode(d, usize::MAX)
    }

    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode(self, &mut Encoder::new(out));
    }

    /// Appends the encoding of an array of `items` to `out`, as `Value::Array` of them
    /// would be encoded, without owning them.
    pub fn encode_array_into(items: &[Value], out: &mut Vec<u8>) {
        let mut e = Encoder::new(out);
        // Writing into a Vec cannot fail.
        let _ = e.array(items.len() as u64);
        for item in items {
            encode(item, &mut e);
        }
    }
}

impl Value {
    /// Writes the value as JSON text. Byte strings become strings of the characters
    /// U+0000..U+00FF (what Perl's JSON encoder makes of byte strings), tags are dropped,
    /// undefined is null, integer map keys become their decimal text. Fails, saying why,
    /// for what JSON cannot represent: NaN, infinities, simple values, other map keys.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Value::Null | Value::Undefined => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Value::Float(f) if f.is_finite() => {
                json_string_or_number(out, &serde_json::Value::from(*f))
            }
            Value::Float(f) => return Err(format!("{f} is not a JSON number")),
            Value::Text(_) | Value::Bytes(_) => {
                let text = self.as_name().unwrap_or_default();
                json_string_or_number(out, &serde_json::Value::from(text.as_ref()));
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_json(out)?;
                }
                out.push(b']');
            }
            Value::Map(pairs) => {
                out.push(b'{');
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    key.untagged().write_json_key(out)?;
                    out.push(b':');
                    value.write_json(out)?;
                }
                out.push(b'}');
            }
            Value::Tagged(_, inner) => inner.write_json(out)?,
            Value::Simple(s) => return Err(format!("simple value {s} has no JSON form")),
        }
        Ok(())
    }

    /// Writes the value as a JSON object key: a string, or an integer's decimal text.
    pub(crate) fn write_json_key(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let key = match self {
            Value::Int(n) => n.to_string(),
            k => k
                .as_name()
                .ok_or_else(|| format!("{k:?} cannot be a JSON object key"))?
                .into_owned(),
        };
        json_string_or_number(out, &serde_json::Value::from(key));
        Ok(())
    }

    /// The value inside any tags.
    fn untagged(&self) -> &Value {
        match self {
            Value::Tagged(_, inner) => inner.untagged(),
            v => v,
        }
    }
}

fn json_string_or_number(out: &mut Vec<u8>, v: &serde_json::Value) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(out, v);
}

impl From<serde_json::Value> for Value {
    /// JSON to CBOR: strings become text strings, integers stay integers.
    fn from(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Value::Int(u.into()),
                (None, Some(i)) => Value::Int(i.into()),
                _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s),
            serde_json::Value::Array(items) => {
                Value::Array(items.into_iter().map(Value::from).collect())
            }
            serde_json::Value::Object(map) => Value::Map(
                map.into_iter()
                    .map(|(k, v)| (Value::Text(k), Value::from(v)))
                    .collect(),
            ),
        }
    }
}

/// `From` for the common Rust types: strings become text, integers [`Value::Int`], floats
/// [`Value::Float`], `None` null, vectors arrays. Byte strings are [`Value::Bytes`] (or
/// `From<&[u8]>`); a `Vec<u8>` is an array of integers like any other vector.
macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                Value::$v(x.into())
            }
        }
    )*};
}

value_from!(
    &str => Text, String => Text, Cow<'_, str> => Text, bool => Bool,
    i8 => Int, i16 => Int, i32 => Int, i64 => Int, i128 => Int,
    u8 => Int, u16 => Int, u32 => Int, u64 => Int,
    f32 => Float, f64 => Float, &[u8] => Bytes,
);

impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(items: Vec<T>) -> Value {
        Value::Array(items.into_iter().map(Into::into).collect())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(x: Option<T>) -> Value {
        x.map_or(Value::Null, Into::into)
    }
}

/// A container being decoded: its items so far and how many are still to come (`None`:
/// indefinite length, until a break).
enum Open {
    Array(Vec<Value>, Option<u64>),
    /// Pairs so far, a key waiting for its value, pairs still to come.
    Map(Vec<(Value, Value)>, Option<Value>, Option<u64>),
    Tag(u64),
}

/// Decodes one item of at most `max_items` items without recursion (peers choose the
/// nesting): open containers wait on an explicit stack of at most [`MAX_DEPTH`] entries.
fn decode(d: &mut Decoder, max_items: usize) -> Result<Value, minicbor::decode::Error> {
    let mut open: Vec<Open> = Vec::new();
    let mut items = 0usize;
    loop {
        // Close every container that is complete, then read the next item.
        let closing = match open.last() {
            Some(Open::Array(_, Some(0)) | Open::Map(_, None, Some(0))) => true,
            Some(Open::Array(_, None) | Open::Map(_, _, None)) => d.datatype()? == Type::Break,
            _ => false,
        };
        let mut value = if closing {
            match open.pop() {
                Some(Open::Array(items, left)) => {
                    if left.is_none() {
                        d.skip()?;
                    }
                    Value::Array(items)
                }
                Some(Open::Map(pairs, None, left)) => {
                    if left.is_none() {
                        d.skip()?;
                    }
                    Value::Map(pairs)
                }
                _ => {
                    return Err(minicbor::decode::Error::message(
                        "map with a key but no value",
                    ));
                }
            }
        } else {
            items += 1;
            if items > max_items {
                return Err(minicbor::decode::Error::message(format!(
                    "more than {max_items} items"
                )));
            }
            let ty = d.datatype()?;
            if matches!(
                ty,
                Type::Array | Type::ArrayIndef | Type::Map | Type::MapIndef | Type::Tag
            ) && open.len() >= MAX_DEPTH
            {
                return Err(minicbor::decode::Error::message(format!(
                    "arrays, maps and tags nested deeper than {MAX_DEPTH} levels"
                )));
            }
            match ty {
                Type::Array | Type::ArrayIndef => {
                    open.push(Open::Array(Vec::new(), d.array()?));
                    continue;
                }
                Type::Map | Type::MapIndef => {
                    open.push(Open::Map(Vec::new(), None, d.map()?));
                    continue;
                }
                Type::Tag => {
                    open.push(Open::Tag(d.tag()?.as_u64()));
                    continue;
                }
                _ => scalar(d, ty)?,
            }
        };
        // Put the finished value into its container, closing tags on the way up.
        loop {
            match open.last_mut() {
                None => return Ok(value),
                Some(Open::Tag(tag)) => {
                    value = Value::Tagged(*tag, Box::new(value));
                    open.pop();
                }
                Some(Open::Array(items, left)) => {
                    items.push(value);
                    if let Some(n) = left {
                        *n -= 1;
                    }
                    break;
                }
                Some(Open::Map(pairs, key, left)) => {
                    match key.take() {
                        None => *key = Some(value),
                        Some(k) => {
                            pairs.push((k, value));
                            if let Some(n) = left {
                                *n -= 1;
                            }
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Whether `ty` is an integer's.
pub(crate) fn is_int(ty: Type) -> bool {
    matches!(
        ty,
        Type::U8
            | Type::U16
            | Type::U32
            | Type::U64
            | Type::I8
            | Type::I16
            | Type::I32
            | Type::I64
            | Type::Int
    )
}

/// Decodes an item that holds no other items.
pub(crate) fn scalar(d: &mut Decoder, ty: Type) -> Result<Value, minicbor::decode::Error> {
    Ok(match ty {
        Type::Null => {
            d.skip()?;
            Value::Null
        }
        Type::Undefined => {
            d.skip()?;
            Value::Undefined
        }
        Type::Bool => Value::Bool(d.bool()?),
        ty if is_int(ty) => Value::Int(i128::from(d.int()?)),
        Type::F16 | Type::F32 | Type::F64 => Value::Float(d.f64()?),
        Type::Bytes | Type::BytesIndef => {
            let mut v = Vec::new();
            for chunk in d.bytes_iter()? {
                v.extend_from_slice(chunk?);
            }
            Value::Bytes(v)
        }
        Type::String | Type::StringIndef => {
            let mut s = String::new();
            for chunk in d.str_iter()? {
                s.push_str(chunk?);
            }
            Value::Text(s)
        }
        Type::Simple => Value::Simple(d.simple()?),
        other => return Err(minicbor::decode::Error::type_mismatch(other)),
    })
}

/// Encodes without recursion: values built by an application may nest deeper than any
/// limit, and are refused by the limits only after they are encoded.
fn encode(mut v: &Value, e: &mut Encoder<&mut Vec<u8>>) {
    // Allocated only once a container's items are waiting: a scalar costs nothing.
    let mut todo = Vec::new();
    loop {
        // Writing into a Vec cannot fail.
        let _ = match v {
            Value::Null => e.null(),
            Value::Undefined => e.undefined(),
            Value::Bool(b) => e.bool(*b),
            Value::Int(i) => match minicbor::data::Int::try_from(*i) {
                Ok(i) => e.int(i),
                // Past CBOR's integer range: a bignum (tag 2, or 3 for -1 - n), never a
                // float that would lose digits.
                Err(_) => {
                    let (tag, n) = if *i < 0 { (3, -1 - *i) } else { (2, *i) };
                    let bytes = n.to_be_bytes();
                    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
                    e.tag(Tag::new(tag))
                        .and_then(|e| e.bytes(bytes.get(first..).unwrap_or_default()))
                }
            },
            Value::Float(f) => e.f64(*f),
            Value::Bytes(b) => e.bytes(b),
            Value::Text(s) => e.str(s),
            Value::Array(items) => {
                todo.extend(items.iter().rev());
                e.array(items.len() as u64)
            }
            Value::Map(pairs) => {
                for (k, v) in pairs.iter().rev() {
                    todo.push(v);
                    todo.push(k);
                }
                e.map(pairs.len() as u64)
            }
            Value::Tagged(tag, inner) => {
                todo.push(inner);
                e.tag(Tag::new(*tag))
            }
            Value::Simple(s) => e.simple(*s),
        };
        match todo.pop() {
            Some(next) => v = next,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names() {
        let v = Value::Array(vec![
            Value::text("p"),
            Value::Bytes(vec![0xe9]),
            Value::Int(-(1 << 64)),
            Value::Int(u64::MAX.into()),
            Value::Float(1.5),
            Value::Map(vec![(Value::Int(1), Value::Undefined)]),
            Value::Tagged(26, Box::new(Value::Null)),
            Value::Bool(false),
        ]);
        assert_eq!(Value::decode(&v.encode()).unwrap(), v);
        assert_eq!(
            Value::Bytes(b"mon1".to_vec()).as_name().as_deref(),
            Some("mon1")
        );
        assert_eq!(Value::Bytes(vec![0xe9]).as_name().as_deref(), Some("é"));
        assert_eq!(Value::Int(1).as_name(), None);
        assert!(Value::decode(b"\x80\x80").is_err());
        assert!(Value::decode(b"\x82\x01").is_err());
    }

    /// `levels` arrays (or tags around an array) nested inside each other.
    fn nested(levels: usize, tags: bool) -> Vec<u8> {
        let mut bytes = vec![if tags { 0xc6 } else { 0x81 }; levels - 1];
        bytes.push(0x80);
        bytes
    }

    #[test]
    fn items_are_bounded_with_everything_in_them() {
        // [1, [2, 3], 24(4)]: seven items (the tag and what it holds count apart).
        let v = Value::Array(vec![
            Value::Int(1),
            Value::Array(vec![Value::Int(2), Value::Int(3)]),
            Value::Tagged(24, Box::new(Value::Int(4))),
        ]);
        let bytes = v.encode();
        assert_eq!(Value::decode_within(&bytes, 7), Ok(v));
        assert_eq!(
            Value::decode_within(&bytes, 6),
            Err(DecodeError::Malformed(
                "decode error: more than 6 items".into()
            ))
        );
        // Counted as read: a huge declared length costs nothing until items come.
        assert!(Value::decode_within(b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff\x01", 2).is_err());
    }

    #[test]
    fn depth_is_bounded_and_tags_count() {
        assert!(Value::decode(&nested(MAX_DEPTH, false)).is_ok());
        // What walks a decoded value afterwards has the stack for the deepest one.
        let deepest = Value::decode(&nested(MAX_DEPTH, true)).unwrap();
        let mut json = Vec::new();
        deepest.write_json(&mut json).unwrap();
        assert_eq!(json, b"[]");
        let deepest = Value::decode(&nested(MAX_DEPTH, false)).unwrap();
        deepest.write_json(&mut json).unwrap();
        assert_eq!(serde_json::to_vec(&deepest).unwrap(), &json[2..]);
        for tags in [false, true] {
            let err = Value::decode(&nested(MAX_DEPTH + 1, tags)).unwrap_err();
            assert!(err.to_string().contains("nested deeper than 512"), "{err}");
            // Far past the limit: an error, not a stack overflow.
            assert!(Value::decode(&nested(100_000, tags)).is_err());
        }
    }

    #[test]
    fn encoding_does_not_recurse() {
        let mut v = Value::Array(Vec::new());
        for i in 0..4 * MAX_DEPTH as i128 {
            v = if i % 2 == 0 {
                Value::Tagged(6, Box::new(v))
            } else {
                Value::Map(vec![(Value::Int(i), v)])
            };
        }
        let bytes = v.encode();
        assert!(Value::decode(&bytes).is_err());
        let shallow = Value::Map(vec![(
            Value::text("k"),
            Value::Tagged(1, Box::new(Value::Array(vec![Value::Int(1), Value::Null]))),
        )]);
        assert_eq!(Value::decode(&shallow.encode()).unwrap(), shallow);
    }
}

/// Serializes as the closest serde data type: byte strings with `serialize_bytes`, text
/// with `serialize_str`, integers as `i64`/`u64` (else `i128`), tags dropped.
impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Value::Null | Value::Undefined => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => match (i64::try_from(*i), u64::try_from(*i)) {
                (Ok(i), _) => s.serialize_i64(i),
                (_, Ok(u)) => s.serialize_u64(u),
                _ => s.serialize_i128(*i),
            },
            Value::Float(f) => s.serialize_f64(*f),
            Value::Bytes(b) => s.serialize_bytes(b),
            Value::Text(t) => s.serialize_str(t),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(pairs) => {
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            Value::Tagged(_, inner) => inner.serialize(s),
            Value::Simple(v) => s.serialize_u8(*v),
        }
    }
}

/// Deserializes from any self-describing format; bytes stay [`Value::Bytes`], strings
/// become [`Value::Text`].
impl<'de> serde::Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> serde::de::Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::text(v))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        serde::Deserialize::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut pairs = Vec::new();
        while let Some(pair) = map.next_entry()? {
            pairs.push(pair);
        }
        Ok(Value::Map(pairs))
    }
}

#[cfg(test)]
mod conversion_tests {
    use super::{DecodeError, Value};

    #[test]
    fn integers_past_cbor_range_are_bignums_not_floats() {
        let big = Value::Int(1 << 70);
        // tag 2, a 9-byte string: 0x40 followed by eight zero bytes.
        let mut expect = vec![0xc2, 0x49, 0x40];
        expect.extend([0; 8]);
        assert_eq!(big.encode(), expect);
        let negative = Value::Int(-(1 << 70) - 1);
        let mut expect = vec![0xc3, 0x49, 0x40];
        expect.extend([0; 8]);
        assert_eq!(negative.encode(), expect);
        assert_eq!(
            Value::decode(&big.encode()),
            Ok(Value::Tagged(2, Box::new(Value::Bytes(big_bytes()))))
        );
        // The edges of CBOR's range stay plain integers.
        for edge in [u64::MAX as i128, -(u64::MAX as i128) - 1] {
            assert_eq!(
                Value::decode(&Value::Int(edge).encode()),
                Ok(Value::Int(edge))
            );
        }
    }

    fn big_bytes() -> Vec<u8> {
        let mut b = vec![0x40];
        b.extend([0; 8]);
        b
    }

    #[test]
    fn common_types_convert() {
        assert_eq!(Value::from(7u8), Value::Int(7));
        assert_eq!(Value::from(-7i32), Value::Int(-7));
        assert_eq!(Value::from(u64::MAX), Value::Int(u64::MAX.into()));
        assert_eq!(Value::from(0.5f32), Value::Float(0.5));
        assert_eq!(Value::from(&b"ab"[..]), Value::Bytes(b"ab".to_vec()));
        assert_eq!(Value::from(None::<i32>), Value::Null);
        assert_eq!(Value::from(Some("x")), Value::text("x"));
        assert_eq!(
            Value::from(vec![1, 2]),
            Value::Array(vec![Value::Int(1), Value::Int(2)])
        );
    }

    #[test]
    fn decode_errors_say_what_is_wrong() {
        assert_eq!(Value::decode(b"\x01\x02"), Err(DecodeError::Trailing));
        assert!(matches!(
            Value::decode(b"\x82\x01"),
            Err(DecodeError::Malformed(_))
        ));
    }
}

#[cfg(test)]
mod serde_tests {
    use super::Value;

    #[test]
    fn serde_round_trip_keeps_kinds() {
        let v = Value::Array(vec![
            Value::text("t"),
            Value::Int(-3),
            Value::Int(u64::MAX.into()),
            Value::Float(0.5),
            Value::Null,
            Value::Bool(true),
            Value::Map(vec![(Value::text("k"), Value::Array(vec![]))]),
        ]);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"["t",-3,18446744073709551615,0.5,null,true,{"k":[]}]"#
        );
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), v);
        // Bytes reach serializers as bytes (JSON writes them as a list of numbers).
        assert_eq!(
            serde_json::to_string(&Value::Bytes(vec![1, 2])).unwrap(),
            "[1,2]"
        );
    }
}
