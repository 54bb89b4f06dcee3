//! The greeting and auth lines: arbitrary bytes from a peer, from the first byte on, or
//! after a valid greeting (so the auth line parser is reached), cut at arbitrary points.

#![no_main]

use aemp_engine::Framing;
use aemp_fuzz::{chunks, config, pump};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [mode, sizes @ ..] = data else { return };
    let (sizes, stream) = sizes.split_at(sizes.len().min(4));
    let mut conn =
        aemp_engine::Connection::new(config("local", Framing::Cbor), [1; 66], 0).expect("config");
    pump(&mut conn);
    let mut input = Vec::new();
    if mode & 1 == 1 {
        input.extend_from_slice(
            b"aemp;1;remote;hmac_sha3_512,cleartext,tls_anon;json,cbor;tls=1.0\n",
        );
        input.extend_from_slice(aemp_engine::greeting::nonce_line(&[2; 66]).as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(stream);
    for chunk in chunks(&input, sizes) {
        conn.handle_input(chunk);
        pump(&mut conn);
    }
    if mode & 2 == 2 {
        conn.handle_timeout(u64::MAX / 2);
    } else {
        conn.handle_eof();
    }
    pump(&mut conn);
});
