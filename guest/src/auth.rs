//! Authentication: choosing the method to send, computing tokens, verifying the remote's.
//!
//! With `L` our two greeting lines and `R` the remote's, each followed by LF, we send a
//! token over `L R` and expect one over `R L`; both sides hash their own lines first.

use hmac::{Hmac, Mac};
use sha3::{Digest, Sha3_512};
use subtle::ConstantTimeEq;

use crate::error::Error;

/// An authentication method of the auth line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// SHA3-512 of the greeting lines; only inside TLS.
    TlsSha3_512,
    /// HMAC-SHA3-512 of the greeting lines keyed with the shared secret.
    HmacSha3_512,
    /// No token; only inside TLS, and the peer is then untrusted.
    TlsAnon,
    /// The secret in lowercase hex. Accepted, never generated.
    Cleartext,
}

impl AuthMethod {
    /// Every method, in the reference's default preference order.
    pub const ALL: [AuthMethod; 4] = [
        AuthMethod::TlsSha3_512,
        AuthMethod::HmacSha3_512,
        AuthMethod::TlsAnon,
        AuthMethod::Cleartext,
    ];

    /// The name used on the wire.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::TlsSha3_512 => "tls_sha3_512",
            AuthMethod::HmacSha3_512 => "hmac_sha3_512",
            AuthMethod::TlsAnon => "tls_anon",
            AuthMethod::Cleartext => "cleartext",
        }
    }

    /// The method with this wire name.
    pub fn from_name(name: &str) -> Option<AuthMethod> {
        AuthMethod::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the method is only valid inside TLS.
    pub fn needs_tls(self) -> bool {
        matches!(self, AuthMethod::TlsSha3_512 | AuthMethod::TlsAnon)
    }
}

/// Both sides' greeting lines, each followed by LF.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// Our line 1 and line 2.
    pub local: Vec<u8>,
    /// The remote's line 1 and line 2.
    pub remote: Vec<u8>,
}

/// The method we send: the first of the remote's list that we offer, skipping `tls_*`
/// without TLS.
pub fn choose(
    remote_list: &[String],
    offer: &[AuthMethod],
    tls: bool,
) -> Result<AuthMethod, Error> {
    remote_list
        .iter()
        .filter_map(|name| AuthMethod::from_name(name))
        .find(|m| offer.contains(m) && (tls || !m.needs_tls()))
        .ok_or_else(|| Error::NoCommonAuth(remote_list.join(",")))
}

/// The token we send with `method`, under the reference's rules: inside TLS only `tls_*`
/// methods, outside TLS only `hmac_sha3_512`, which needs a secret.
pub fn local_token(
    method: AuthMethod,
    tls: bool,
    secret: Option<&[u8]>,
    transcript: &Transcript,
) -> Result<String, Error> {
    let unsupported = || Error::UnsupportedSendAuth(method.name().to_owned());
    if tls {
        match method {
            AuthMethod::TlsAnon => Ok(String::new()),
            AuthMethod::TlsSha3_512 => Ok(sha3_hex(&transcript.local, &transcript.remote)),
            _ => Err(unsupported()),
        }
    } else {
        match secret {
            Some(secret) if method == AuthMethod::HmacSha3_512 => {
                Ok(hmac_hex(secret, &transcript.local, &transcript.remote))
            }
            Some(_) => Err(unsupported()),
            None => Err(Error::NoTlsNoSecret),
        }
    }
}

/// Checks the remote's auth line fields. `accepted` is what we advertised.
pub fn verify(
    method_name: &str,
    token: &str,
    accepted: &[AuthMethod],
    tls: bool,
    secret: Option<&[u8]>,
    transcript: &Transcript,
) -> Result<AuthMethod, Error> {
    let method = AuthMethod::from_name(method_name)
        .filter(|m| accepted.contains(m))
        .ok_or_else(|| Error::UnsupportedRecvAuth(method_name.to_owned()))?;
    let expected = match (method, secret) {
        (AuthMethod::HmacSha3_512, Some(secret)) => {
            Some(hmac_hex(secret, &transcript.remote, &transcript.local))
        }
        (AuthMethod::Cleartext, Some(secret)) => Some(hex::encode(secret)),
        (AuthMethod::TlsAnon, _) if tls => Some(String::new()),
        (AuthMethod::TlsSha3_512, _) if tls => {
            Some(sha3_hex(&transcript.remote, &transcript.local))
        }
        // tls_* outside TLS, or a secret-based method without a secret, never matches.
        _ => None,
    };
    match expected {
        Some(expected) if bool::from(expected.as_bytes().ct_eq(token.as_bytes())) => Ok(method),
        _ => Err(Error::AuthFailure),
    }
}

/// Lowercase hex HMAC-SHA3-512 (block size 72) of `first` then `second`.
pub fn hmac_hex(secret: &[u8], first: &[u8], second: &[u8]) -> String {
    // HMAC accepts keys of any length; the error case cannot happen.
    let mut mac = <Hmac<Sha3_512> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(first);
    mac.update(second);
    hex::encode(mac.finalize().into_bytes())
}

/// Lowercase hex SHA3-512 of `first` then `second`.
pub fn sha3_hex(first: &[u8], second: &[u8]) -> String {
    let mut hash = Sha3_512::new();
    hash.update(first);
    hash.update(second);
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &str) -> Vec<String> {
        list.split(',').map(str::to_owned).collect()
    }

    #[test]
    fn choice_follows_remote_order_and_tls() {
        let offer = [AuthMethod::TlsSha3_512, AuthMethod::HmacSha3_512];
        let remote = names("tls_sha3_512,hmac_sha3_512,tls_anon,cleartext");
        assert_eq!(choose(&remote, &offer, true), Ok(AuthMethod::TlsSha3_512));
        assert_eq!(choose(&remote, &offer, false), Ok(AuthMethod::HmacSha3_512));
        let err = choose(&names("tls_anon,cleartext"), &offer, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tls_anon,cleartext: no common auth type supported"
        );
    }

    #[test]
    fn send_rules_follow_the_reference() {
        let t = Transcript {
            local: b"a\n".to_vec(),
            remote: b"b\n".to_vec(),
        };
        let err = local_token(AuthMethod::HmacSha3_512, true, Some(b"s"), &t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hmac_sha3_512: fatal, selected unsupported snd auth method"
        );
        let err = local_token(AuthMethod::Cleartext, false, Some(b"s"), &t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cleartext: fatal, selected unsupported snd auth method"
        );
        let err = local_token(AuthMethod::HmacSha3_512, false, None, &t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unable to handshake TLS and no shared secret configured"
        );
        assert_eq!(
            local_token(AuthMethod::TlsAnon, true, None, &t),
            Ok(String::new())
        );
    }

    #[test]
    fn verify_rejects_what_it_must() {
        let t = Transcript {
            local: b"a\n".to_vec(),
            remote: b"b\n".to_vec(),
        };
        let all = AuthMethod::ALL;
        // tls_* outside TLS never matches, even with the right token.
        let token = sha3_hex(&t.remote, &t.local);
        assert_eq!(
            verify("tls_sha3_512", &token, &all, false, None, &t),
            Err(Error::AuthFailure)
        );
        assert_eq!(
            verify("tls_sha3_512", &token, &all, true, None, &t),
            Ok(AuthMethod::TlsSha3_512)
        );
        assert_eq!(
            verify("tls_anon", "", &all, false, None, &t),
            Err(Error::AuthFailure)
        );
        // Without a secret, an empty cleartext token does not authenticate.
        assert_eq!(
            verify("cleartext", "", &all, true, None, &t),
            Err(Error::AuthFailure)
        );
        assert_eq!(
            verify(
                "cleartext",
                "67656865696d",
                &all,
                false,
                Some(b"geheim"),
                &t
            ),
            Ok(AuthMethod::Cleartext)
        );
        // Only methods we advertised.
        let err = verify(
            "cleartext",
            "67656865696d",
            &all[..2],
            false,
            Some(b"geheim"),
            &t,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cleartext: fatal, selected unsupported rcv auth method"
        );
        let err = verify("hmac_md6_64_256", "", &all, false, None, &t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hmac_md6_64_256: fatal, selected unsupported rcv auth method"
        );
        assert_eq!(
            Error::AuthFailure.to_string(),
            "authentication failure/shared secret mismatch"
        );
    }

    #[test]
    fn hmac_block_size_is_72() {
        // A key longer than the 72-byte SHA3-512 block is hashed first; one of exactly 72
        // bytes is not. Worked through the HMAC definition with plain SHA3-512.
        for key_len in [1usize, 71, 72, 73, 200] {
            let key = vec![0x5a; key_len];
            let mut k = if key_len > 72 {
                Sha3_512::digest(&key).to_vec()
            } else {
                key.clone()
            };
            k.resize(72, 0);
            let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
            let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
            let inner = Sha3_512::new()
                .chain_update(&ipad)
                .chain_update(b"msg")
                .finalize();
            let outer = Sha3_512::new()
                .chain_update(&opad)
                .chain_update(inner)
                .finalize();
            assert_eq!(
                hmac_hex(&key, b"m", b"sg"),
                hex::encode(outer),
                "key length {key_len}"
            );
        }
    }
}
