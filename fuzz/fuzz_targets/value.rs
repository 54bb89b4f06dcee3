//! CBOR values (what hosts decode from the engine): decoding, encoding, JSON output.

#![no_main]

use aemp_engine::Value;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = Value::decode(data) else {
        return;
    };
    // Encoding is canonical: once re-encoded, a value encodes the same way again.
    let bytes = value.encode();
    let again = Value::decode(&bytes).expect("our own encoding decodes");
    assert_eq!(again.encode(), bytes);
    let mut json = Vec::new();
    if value.write_json(&mut json).is_ok() {
        let mut de = serde_json::Deserializer::from_slice(&json);
        de.disable_recursion_limit();
        serde::de::IgnoredAny::deserialize(&mut de).expect("valid JSON");
    }
    let _ = serde_json::to_vec(&value);
});
