//! The data phase after a valid handshake: arbitrary bytes received in json or cbor
//! framing (the scanners, json -> cbor), and arbitrary CBOR sent in json framing
//! (cbor -> json), cut at arbitrary points.

#![no_main]

use aemp_engine::Framing;
use aemp_fuzz::{chunks, connected, pump};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [mode, sizes @ ..] = data else { return };
    let (sizes, stream) = sizes.split_at(sizes.len().min(4));
    let framing = |bit| {
        if mode & bit != 0 {
            Framing::Json
        } else {
            Framing::Cbor
        }
    };
    let (mut local, mut remote) = connected(framing(1), framing(2));
    if mode & 4 == 0 {
        // What the remote sends, as local receives it.
        for chunk in chunks(stream, sizes) {
            local.handle_input(chunk);
            pump(&mut local);
        }
        local.handle_eof();
        pump(&mut local);
    } else {
        // Local sends arbitrary CBOR; remote parses what went on the wire.
        let _ = local.send_sequence(stream);
        let wire = pump(&mut local);
        for chunk in chunks(&wire, sizes) {
            remote.handle_input(chunk);
            pump(&mut remote);
        }
    }
});
