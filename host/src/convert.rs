//! Rust types to and from [`Value`] through serde, by way of their CBOR encoding (the
//! form messages travel in): structs become maps with text keys, sequences and tuples
//! arrays, `None` null, enums as serde's externally tagged form, byte buffers (with
//! `serde_bytes`) byte strings, and 128-bit integers past CBOR's range bignums.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Job { id: u32, name: String }
//!
//! let job = Job { id: 7, name: "build".into() };
//! let value = aemp_host::to_value(&job)?;
//! assert_eq!(aemp_host::from_value::<Job>(&value)?, job);
//! // A value of the wrong shape is an error, never a silent conversion.
//! assert!(aemp_host::from_value::<u8>(&aemp_host::Value::Int(300)).is_err());
//! # Ok::<(), aemp_host::ValueError>(())
//! ```

use aemp_engine::{DecodeError, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a Rust value and a [`Value`] could not be converted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// The Rust value's `Serialize` implementation failed.
    #[error("cannot serialize: {0}")]
    Serialize(String),
    /// The value does not have the shape the Rust type needs (a missing field, an
    /// integer out of range, a string where a number belongs...).
    #[error("cannot deserialize: {0}")]
    Deserialize(String),
    /// The serialized form is not a value this crate can hold (nested too deep).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Message arguments must serialize to a sequence (a tuple, array or `Vec`).
    #[error("arguments must serialize to a sequence, not {0}")]
    NotASequence(&'static str),
}

/// The [`Value`] of any serializable Rust value.
pub fn to_value<T: Serialize + ?Sized>(x: &T) -> Result<Value, ValueError> {
    Ok(Value::decode(&to_cbor(x)?)?)
}

/// A Rust value from a [`Value`] of the right shape.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, ValueError> {
    minicbor_serde::from_slice(&value.encode()).map_err(|e| ValueError::Deserialize(e.to_string()))
}

/// The CBOR encoding of `x`.
fn to_cbor<T: Serialize + ?Sized>(x: &T) -> Result<Vec<u8>, ValueError> {
    minicbor_serde::to_vec(x).map_err(|e| ValueError::Serialize(e.to_string()))
}

/// `args` as a message's arguments: the CBOR array the engine sends, checked to be one
/// (a tuple, array or `Vec` serializes to an array) and to be a value this crate can
/// hold.
pub(crate) fn to_args<T: Serialize + ?Sized>(args: &T) -> Result<Vec<u8>, ValueError> {
    let cbor = to_cbor(args)?;
    match Value::decode(&cbor)? {
        Value::Array(_) => Ok(cbor),
        Value::Map(_) => Err(ValueError::NotASequence("a map")),
        _ => Err(ValueError::NotASequence("a single value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Dot,
        Circle(u32),
        Rect { w: u32, h: u32 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Drawing {
        name: String,
        shapes: Vec<Shape>,
        scale: Option<f64>,
        big: i128,
    }

    #[test]
    fn round_trips_keep_everything() {
        let d = Drawing {
            name: "d".into(),
            shapes: vec![Shape::Dot, Shape::Circle(3), Shape::Rect { w: 1, h: 2 }],
            scale: None,
            big: -(1 << 100),
        };
        let v = to_value(&d).unwrap();
        let Value::Map(pairs) = &v else {
            panic!("a struct is a map: {v:?}")
        };
        assert_eq!(pairs[0], (Value::text("name"), Value::text("d")));
        assert_eq!(pairs[2], (Value::text("scale"), Value::Null));
        assert_eq!(from_value::<Drawing>(&v).unwrap(), d);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        assert!(matches!(
            from_value::<u8>(&Value::Int(256)),
            Err(ValueError::Deserialize(_))
        ));
        assert!(matches!(
            from_value::<u64>(&Value::Int(-1)),
            Err(ValueError::Deserialize(_))
        ));
        assert!(matches!(
            from_value::<Drawing>(&Value::Map(vec![])),
            Err(ValueError::Deserialize(_))
        ));
        assert!(matches!(
            from_value::<String>(&Value::Int(1)),
            Err(ValueError::Deserialize(_))
        ));
    }

    #[test]
    fn arguments_are_sequences() {
        assert_eq!(to_args(&("ping", 1)).unwrap(), b"\x82\x64ping\x01");
        assert_eq!(to_args(&Vec::<u8>::new()).unwrap(), b"\x80");
        assert_eq!(
            to_args(&Shape::Rect { w: 1, h: 2 }),
            Err(ValueError::NotASequence("a map"))
        );
        assert_eq!(to_args(&5), Err(ValueError::NotASequence("a single value")));
    }
}
