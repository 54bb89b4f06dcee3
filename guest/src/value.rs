//! A CBOR value, for the parts of the engine that look inside messages (the node port).
//! Byte strings stay apart from text strings; where the protocol expects a name, either
//! is accepted ([`Value::as_name`]), since Perl sends byte strings unless a string carries
//! its UTF-8 flag.

use std::borrow::Cow;

use minicbor::data::{Tag, Type};
use minicbor::{Decoder, Encoder};

/// One CBOR data item.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Undefined,
    Bool(bool),
    /// Any CBOR integer (-2^64 ..= 2^64-1).
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

    /// Decodes exactly one item (trailing bytes are an error).
    pub fn decode(bytes: &[u8]) -> Result<Value, minicbor::decode::Error> {
        let mut d = Decoder::new(bytes);
        let v = decode(&mut d)?;
        if d.position() != bytes.len() {
            return Err(minicbor::decode::Error::message(
                "trailing bytes after the item",
            ));
        }
        Ok(v)
    }

    /// Decodes the next item from `d`.
    pub(crate) fn decode_one(d: &mut Decoder) -> Result<Value, minicbor::decode::Error> {
        decode(d)
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
                    let key = match key.untagged() {
                        Value::Int(n) => n.to_string(),
                        k => k
                            .as_name()
                            .ok_or_else(|| format!("{k:?} cannot be a JSON object key"))?
                            .into_owned(),
                    };
                    json_string_or_number(out, &serde_json::Value::from(key));
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

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i.into())
    }
}

impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Value {
        Value::Array(items)
    }
}

fn decode(d: &mut Decoder) -> Result<Value, minicbor::decode::Error> {
    Ok(match d.datatype()? {
        Type::Null => {
            d.skip()?;
            Value::Null
        }
        Type::Undefined => {
            d.skip()?;
            Value::Undefined
        }
        Type::Bool => Value::Bool(d.bool()?),
        Type::U8
        | Type::U16
        | Type::U32
        | Type::U64
        | Type::I8
        | Type::I16
        | Type::I32
        | Type::I64
        | Type::Int => Value::Int(i128::from(d.int()?)),
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
        Type::Array | Type::ArrayIndef => {
            let mut items = Vec::new();
            match d.array()? {
                Some(n) => {
                    for _ in 0..n {
                        items.push(decode(d)?);
                    }
                }
                None => {
                    while d.datatype()? != Type::Break {
                        items.push(decode(d)?);
                    }
                    d.skip()?;
                }
            }
            Value::Array(items)
        }
        Type::Map | Type::MapIndef => {
            let mut pairs = Vec::new();
            match d.map()? {
                Some(n) => {
                    for _ in 0..n {
                        pairs.push((decode(d)?, decode(d)?));
                    }
                }
                None => {
                    while d.datatype()? != Type::Break {
                        pairs.push((decode(d)?, decode(d)?));
                    }
                    d.skip()?;
                }
            }
            Value::Map(pairs)
        }
        Type::Tag => {
            let tag = d.tag()?;
            Value::Tagged(tag.as_u64(), Box::new(decode(d)?))
        }
        Type::Simple => Value::Simple(d.simple()?),
        other => return Err(minicbor::decode::Error::type_mismatch(other)),
    })
}

fn encode(v: &Value, e: &mut Encoder<&mut Vec<u8>>) {
    // Writing into a Vec cannot fail.
    let _ = match v {
        Value::Null => e.null(),
        Value::Undefined => e.undefined(),
        Value::Bool(b) => e.bool(*b),
        Value::Int(i) => match minicbor::data::Int::try_from(*i) {
            Ok(i) => e.int(i),
            Err(_) => e.f64(*i as f64),
        },
        Value::Float(f) => e.f64(*f),
        Value::Bytes(b) => e.bytes(b),
        Value::Text(s) => e.str(s),
        Value::Array(items) => {
            let _ = e.array(items.len() as u64);
            for item in items {
                encode(item, e);
            }
            Ok(&mut *e)
        }
        Value::Map(pairs) => {
            let _ = e.map(pairs.len() as u64);
            for (k, v) in pairs {
                encode(k, e);
                encode(v, e);
            }
            Ok(&mut *e)
        }
        Value::Tagged(tag, inner) => {
            let _ = e.tag(Tag::new(*tag));
            encode(inner, e);
            Ok(&mut *e)
        }
        Value::Simple(s) => e.simple(*s),
    };
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
