//! Byte-exact handshake vectors with fixed nonces and secret. The tokens were computed
//! independently of the engine with Python's hashlib and hmac:
//!
//! ```text
//! LA = la1 + b"\n" + la2 + b"\n"; LB = lb1 + b"\n" + lb2 + b"\n"
//! hmac.new(SECRET, LA + LB, hashlib.sha3_512).hexdigest()   # what A sends
//! hashlib.sha3_512(LA + LB).hexdigest()                     # tls_sha3_512, A
//! SECRET.hex()                                              # cleartext
//! ```

mod support;

use aemp_engine::{AuthMethod, Connection, Output, Verdict};
use support::*;

const ACCEPT: &str = "tls_sha3_512,hmac_sha3_512,tls_anon,cleartext";
const NONCE_A: &str =
    "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+P0BB";
const NONCE_B: &str =
    "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKTlJWWl5iZmpucnZ6foKGio6Sl";

const HMAC_A: &str = "4a2b368b9f2b8e0faa999a3f28ff3279be322b68d4e672604047c48dcf739d27c3439f5eb69e15515cf860e8c06b35fe40fc0cbb72220795dd4b7aa6522563d4";
const HMAC_B: &str = "24e0ac85bf300adfcd4cbdce9aafa35630096b7d5f98d1d9353a41e241f22f3689a9327ffa5de0d4afb5d210e8f651d3ad319d99dd2cc41049d1509a86ab68ce";
const SHA3_A: &str = "16830b90402655ebd0b08bfb9c220571083cf2637a9f917b345d8e4c0fa03f501f6d8db0eef6e3f90808ec01e60c9e936e32c0f7afb592091f6a1ee725a4ab91";
const SHA3_B: &str = "605526290d9233671216deb37c4250e4dab5bad45dfdb34277333555cb3ac9b417968b1f83abe5429b09a9e52340986a3585d021f957eebb2910a604065ba5e4";

fn beta_json_only() -> aemp_engine::Config {
    let mut b = config("beta");
    b.framings = vec![aemp_engine::Framing::Json];
    b
}

#[test]
fn hmac_sha3_512_vector() {
    let mut pair = Pair::new(config("alpha"), beta_json_only());
    pair.drive();
    assert!(pair.connected());
    let a = format!(
        "aemp;1;alpha;{ACCEPT};cbor,json;provider=test\n{NONCE_A}\nhmac_sha3_512;{HMAC_A};json\n"
    );
    let b = format!(
        "aemp;1;beta;{ACCEPT};json;provider=test\n{NONCE_B}\nhmac_sha3_512;{HMAC_B};json\n"
    );
    assert_eq!(String::from_utf8(pair.a.sent.clone()).unwrap(), a);
    assert_eq!(String::from_utf8(pair.b.sent.clone()).unwrap(), b);
}

#[test]
fn tls_sha3_512_vector() {
    let mut a = config("alpha");
    let mut b = beta_json_only();
    a.tls = true;
    b.tls = true;
    let mut pair = Pair::new(a, b);
    pair.drive();
    assert!(pair.connected());
    let a = format!(
        "aemp;1;alpha;{ACCEPT};cbor,json;tls=1.0;provider=test\n{NONCE_A}\ntls_sha3_512;{SHA3_A};json\n"
    );
    let b = format!(
        "aemp;1;beta;{ACCEPT};json;tls=1.0;provider=test\n{NONCE_B}\ntls_sha3_512;{SHA3_B};json\n"
    );
    assert_eq!(String::from_utf8(pair.a.sent.clone()).unwrap(), a);
    assert_eq!(String::from_utf8(pair.b.sent.clone()).unwrap(), b);
}

#[test]
fn tls_starts_right_after_the_remote_nonce_with_leftover_bytes() {
    let mut a = config("alpha");
    a.tls = true;
    let mut conn = Connection::new(a, nonce_a(), 0).unwrap();
    let remote = format!("aemp;1;beta;{ACCEPT};json;tls=1.0\n{NONCE_B}\n\x16\x03\x01records");
    conn.handle_input(remote.as_bytes());
    let outputs: Vec<Output> = std::iter::from_fn(|| conn.poll_output()).collect();
    assert!(matches!(
        outputs[..],
        [Output::Transmit(_), Output::Greeting(_)]
    ));
    conn.handle_verdict(Verdict::Accept);
    let outputs: Vec<Output> = std::iter::from_fn(|| conn.poll_output()).collect();
    let [Output::StartTls { role, leftover }, Output::Transmit(auth)] = &outputs[..] else {
        panic!("{outputs:?}")
    };
    assert_eq!(*role, aemp_engine::TlsRole::Client);
    assert_eq!(leftover, b"\x16\x03\x01records");
    assert!(auth.starts_with(b"tls_sha3_512;"));
}

/// The spec's "simple handshake": a peer that sends three lines, cleartext auth and json.
#[test]
fn cleartext_vector_simple_handshake() {
    let mut conn = Connection::new(config("alpha"), nonce_a(), 0).unwrap();
    let hex_secret = "38756778727477364835744b6e665057666153723448476845384d6f4a586d7a54543142577137734c75744e6344304962587072516c5a6a49626c374d424b6f656b6c47334945665939476c4a7468433070454e7a6b";
    let peer = format!(
        "aemp;1;simple;hmac_sha3_512;json\n\ncleartext;{hex_secret};json\n[\"port\",\"hi\",1]"
    );
    conn.handle_input(peer.as_bytes());
    conn.handle_verdict(Verdict::Accept);
    let outputs: Vec<Output> = std::iter::from_fn(|| conn.poll_output()).collect();
    let mut sent = Vec::new();
    for o in &outputs {
        if let Output::Transmit(b) = o {
            sent.extend_from_slice(b);
        }
    }
    // Independently: the HMAC over our lines then the peer's ("simple" lines, empty nonce).
    let la = format!("aemp;1;alpha;{ACCEPT};cbor,json;provider=test\n{NONCE_A}\n");
    let lb = "aemp;1;simple;hmac_sha3_512;json\n\n";
    let token = aemp_engine::auth::hmac_hex(SECRET, la.as_bytes(), lb.as_bytes());
    assert_eq!(
        String::from_utf8(sent).unwrap(),
        format!("{la}hmac_sha3_512;{token};json\n")
    );
    let session = outputs
        .iter()
        .find_map(|o| {
            if let Output::Connected(s) = o {
                Some(s)
            } else {
                None
            }
        })
        .expect("connected");
    assert_eq!(session.recv_auth, AuthMethod::Cleartext);
    assert_eq!(session.remote_node, "simple");
    let message = outputs.iter().find_map(|o| {
        if let Output::Message(m) = o {
            Some(m)
        } else {
            None
        }
    });
    assert_eq!(message, Some(&b"\x83\x64port\x62hi\x01".to_vec()));
}
