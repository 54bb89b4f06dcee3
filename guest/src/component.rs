//! The WebAssembly component export: the `aemp:engine/transport` interface of `wit/`,
//! mapped one to one onto [`crate::Connection`]. Randomness comes from the world's only
//! import, `wasi:random/random`.

use std::cell::RefCell;

use exports::aemp::engine::transport as wit;

use crate::{AuthMethod, Config, Connection, Error, Framing, Limits, Output, TlsRole, Verdict};

wit_bindgen::generate!({
    world: "engine",
    path: "../wit",
    generate_all,
});

struct Component;

export!(Component);

impl wit::Guest for Component {
    type Connection = ConnectionResource;

    fn default_config(node_id: String) -> wit::Config {
        Config::new(node_id).into()
    }
}

/// A [`Connection`] behind the resource handle (methods take `&self`).
struct ConnectionResource(RefCell<Connection>);

impl wit::GuestConnection for ConnectionResource {
    fn open(config: wit::Config, now_ms: u64) -> Result<wit::Connection, String> {
        let bytes = wasi::random::random::get_random_bytes(crate::NONCE_LEN as u64);
        let nonce = <[u8; crate::NONCE_LEN]>::try_from(bytes).map_err(|b| {
            format!(
                "host returned {} random bytes instead of {}",
                b.len(),
                crate::NONCE_LEN
            )
        })?;
        let conn = Connection::new(config.into(), nonce, now_ms).map_err(|e| e.to_string())?;
        Ok(wit::Connection::new(ConnectionResource(RefCell::new(conn))))
    }

    fn handle_input(&self, data: Vec<u8>) {
        self.0.borrow_mut().handle_input(&data);
    }

    fn handle_eof(&self) {
        self.0.borrow_mut().handle_eof();
    }

    fn handle_verdict(&self, verdict: wit::Verdict) {
        self.0.borrow_mut().handle_verdict(match verdict {
            wit::Verdict::Accept => Verdict::Accept,
            wit::Verdict::AlreadyConnected => Verdict::AlreadyConnected,
        });
    }

    fn handle_timeout(&self, now_ms: u64) {
        self.0.borrow_mut().handle_timeout(now_ms);
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.0.borrow().poll_timeout()
    }

    fn poll_outputs(&self) -> Vec<wit::Output> {
        let mut conn = self.0.borrow_mut();
        std::iter::from_fn(|| conn.poll_output())
            .map(Into::into)
            .collect()
    }

    fn send(&self, messages: Vec<Vec<u8>>) -> Result<(), wit::SendError> {
        let mut conn = self.0.borrow_mut();
        for (index, message) in messages.iter().enumerate() {
            conn.send(message).map_err(|e| wit::SendError {
                index: index as u32,
                message: e.to_string(),
            })?;
        }
        Ok(())
    }
}

impl From<AuthMethod> for wit::AuthMethod {
    fn from(m: AuthMethod) -> Self {
        match m {
            AuthMethod::TlsSha3_512 => wit::AuthMethod::TlsSha3512,
            AuthMethod::HmacSha3_512 => wit::AuthMethod::HmacSha3512,
            AuthMethod::TlsAnon => wit::AuthMethod::TlsAnon,
            AuthMethod::Cleartext => wit::AuthMethod::Cleartext,
        }
    }
}

impl From<wit::AuthMethod> for AuthMethod {
    fn from(m: wit::AuthMethod) -> Self {
        match m {
            wit::AuthMethod::TlsSha3512 => AuthMethod::TlsSha3_512,
            wit::AuthMethod::HmacSha3512 => AuthMethod::HmacSha3_512,
            wit::AuthMethod::TlsAnon => AuthMethod::TlsAnon,
            wit::AuthMethod::Cleartext => AuthMethod::Cleartext,
        }
    }
}

impl From<Framing> for wit::Framing {
    fn from(f: Framing) -> Self {
        match f {
            Framing::Cbor => wit::Framing::Cbor,
            Framing::Json => wit::Framing::Json,
        }
    }
}

impl From<wit::Framing> for Framing {
    fn from(f: wit::Framing) -> Self {
        match f {
            wit::Framing::Cbor => Framing::Cbor,
            wit::Framing::Json => Framing::Json,
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl From<Config> for wit::Config {
    fn from(c: Config) -> Self {
        wit::Config {
            node_id: c.node_id,
            protocol: c.protocol,
            secret: c.secret,
            tls: c.tls,
            auth_offer: c.auth_offer.into_iter().map(Into::into).collect(),
            auth_accept: c.auth_accept.into_iter().map(Into::into).collect(),
            framings: c.framings.into_iter().map(Into::into).collect(),
            greeting: c.greeting,
            peer_addr: c.peer_addr,
            monitor_timeout_ms: c.monitor_timeout_ms,
            keepalive_interval_ms: c.keepalive_interval_ms,
            limits: wit::Limits {
                max_message_size: saturate(c.limits.max_message_size),
                max_depth: saturate(c.limits.max_depth),
            },
        }
    }
}

impl From<wit::Config> for Config {
    fn from(c: wit::Config) -> Self {
        Config {
            node_id: c.node_id,
            protocol: c.protocol,
            secret: c.secret,
            tls: c.tls,
            auth_offer: c.auth_offer.into_iter().map(Into::into).collect(),
            auth_accept: c.auth_accept.into_iter().map(Into::into).collect(),
            framings: c.framings.into_iter().map(Into::into).collect(),
            greeting: c.greeting,
            peer_addr: c.peer_addr,
            monitor_timeout_ms: c.monitor_timeout_ms,
            keepalive_interval_ms: c.keepalive_interval_ms,
            limits: Limits {
                max_message_size: c.limits.max_message_size as usize,
                max_depth: c.limits.max_depth as usize,
            },
        }
    }
}

fn error_kind(e: &Error) -> wit::ErrorKind {
    use wit::ErrorKind as K;
    match e {
        Error::UnparsableGreeting { .. } => K::UnparsableGreeting,
        Error::VersionMismatch(_) => K::VersionMismatch,
        Error::SelfConnection => K::SelfConnection,
        Error::AlreadyConnected(_) => K::AlreadyConnected,
        Error::EchoAttack => K::EchoAttack,
        Error::NoCommonAuth(_) => K::NoCommonAuth,
        Error::NoCommonFraming(_) => K::NoCommonFraming,
        Error::UnsupportedSendAuth(_) => K::UnsupportedSendAuth,
        Error::NoTlsNoSecret => K::NoTlsNoSecret,
        Error::UnsupportedRecvAuth(_) => K::UnsupportedRecvAuth,
        Error::AuthFailure => K::AuthFailure,
        Error::UnusableRemoteFraming(_) => K::UnusableRemoteFraming,
        Error::LineTooLong(_) => K::LineTooLong,
        Error::HandshakeTimeout => K::HandshakeTimeout,
        Error::PeerClosed => K::PeerClosed,
        Error::TruncatedMessage => K::TruncatedMessage,
        Error::InputAfterHandover => K::InputAfterHandover,
        Error::Message(_) => K::Message,
    }
}

impl From<Output> for wit::Output {
    fn from(o: Output) -> Self {
        match o {
            Output::Transmit(bytes) => wit::Output::Transmit(bytes),
            Output::Greeting(g) => wit::Output::Greeting(wit::Greeting {
                protocol: g.protocol,
                version: g.version,
                node_id: g.node_id,
                auths: g.auths,
                framings: g.framings,
                pairs: g.pairs,
            }),
            Output::StartTls { role, leftover } => wit::Output::StartTls(wit::StartTls {
                role: match role {
                    TlsRole::Client => wit::TlsRole::Client,
                    TlsRole::Server => wit::TlsRole::Server,
                },
                leftover,
            }),
            Output::Connected(s) => wit::Output::Connected(wit::Session {
                remote_node: s.remote_node,
                protocol: s.protocol,
                tls: s.tls,
                send_auth: s.send_auth.into(),
                recv_auth: s.recv_auth.into(),
                untrusted: s.untrusted,
                send_framing: s.send_framing.into(),
                recv_framing: s.recv_framing.into(),
            }),
            Output::Message(m) => wit::Output::Message(m),
            Output::HandedOver { leftover } => wit::Output::HandedOver(leftover),
            Output::Closed(e) => wit::Output::Closed(wit::Error {
                kind: error_kind(&e),
                message: e.to_string(),
            }),
        }
    }
}
