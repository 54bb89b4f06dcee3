//! Why a connection ended, and why a configuration or a message was refused.
//!
//! The `Display` text of [`Error`](enum@Error) is the reference implementation's wording where it has
//! one, so logs read the same on both sides of a mixed network.

use thiserror::Error;

use crate::protocol::PROTOCOL_VERSION;
use crate::value::MAX_DEPTH;

/// A fatal protocol error: the connection is over once the engine reports one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// The remote protocol word is neither ours nor `aemp`.
    #[error("unparsable greeting, expected '{expected}', got '{got}'")]
    UnparsableGreeting { expected: String, got: String },
    /// The remote speaks another protocol version.
    #[error("version mismatch (we: {PROTOCOL_VERSION}, they: {0})")]
    VersionMismatch(String),
    /// The remote node id is our own.
    #[error("I refuse to talk to myself")]
    SelfConnection,
    /// The host refused the remote node because it already has a working connection.
    #[error("{0} already connected, not connecting again.")]
    AlreadyConnected(String),
    /// The remote greeting repeats ours, or its nonce equals ours.
    #[error("authentication error, echo attack?")]
    EchoAttack,
    /// None of the remote's accepted auth methods is one we may send.
    #[error("{0}: no common auth type supported")]
    NoCommonAuth(String),
    /// None of the remote's framings is one we support.
    #[error("{0}: no common framing method supported")]
    NoCommonFraming(String),
    /// The auth method chosen cannot be generated in this situation.
    #[error("{0}: fatal, selected unsupported snd auth method")]
    UnsupportedSendAuth(String),
    /// Neither TLS nor a secret is available to authenticate with.
    #[error("unable to handshake TLS and no shared secret configured")]
    NoTlsNoSecret,
    /// The remote authenticated with a method we do not accept.
    #[error("{0}: fatal, selected unsupported rcv auth method")]
    UnsupportedRecvAuth(String),
    /// The remote's authentication token is wrong.
    #[error("authentication failure/shared secret mismatch")]
    AuthFailure,
    /// The remote announced a framing for its messages that we did not offer.
    #[error("{0}: unusable remote framing")]
    UnusableRemoteFraming(String),
    /// A handshake line, terminator included, is longer than the limit.
    #[error("greeting line longer than {0} bytes")]
    LineTooLong(usize),
    /// The handshake did not complete within `monitor_timeout`.
    #[error("Connection timed out")]
    HandshakeTimeout,
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    PeerClosed,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed by peer inside a message")]
    TruncatedMessage,
    /// Bytes arrived after the stream was handed over to TLS or to an upgraded protocol.
    #[error("input after the stream was handed over")]
    InputAfterHandover,
    /// The peer sent more than the connection may hold at once (see
    /// [`Limits::max_buffered_bytes`](crate::Limits::max_buffered_bytes)).
    #[error("peer input would need more than {0} bytes of buffers on this connection")]
    ConnectionBufferFull(usize),
    /// Buffering the peer's input would take the node past its memory budget for peers
    /// (`NodeConfig::max_buffered_bytes`); this connection is closed, the node goes on.
    #[error("node memory budget for peers ({0} bytes) exhausted, connection closed")]
    NodeBudgetExhausted(usize),
    /// A received message breaks the configured limits or the framing's syntax.
    #[error("received message rejected: {0}")]
    Message(#[from] MessageError),
}

impl Error {
    /// A short name for the kind of error, for counters and metric labels (the WIT
    /// `error-kind` in snake case).
    pub fn name(&self) -> &'static str {
        match self {
            Error::UnparsableGreeting { .. } => "unparsable_greeting",
            Error::VersionMismatch(_) => "version_mismatch",
            Error::SelfConnection => "self_connection",
            Error::AlreadyConnected(_) => "already_connected",
            Error::EchoAttack => "echo_attack",
            Error::NoCommonAuth(_) => "no_common_auth",
            Error::NoCommonFraming(_) => "no_common_framing",
            Error::UnsupportedSendAuth(_) => "unsupported_send_auth",
            Error::NoTlsNoSecret => "no_tls_no_secret",
            Error::UnsupportedRecvAuth(_) => "unsupported_recv_auth",
            Error::AuthFailure => "auth_failure",
            Error::UnusableRemoteFraming(_) => "unusable_remote_framing",
            Error::LineTooLong(_) => "line_too_long",
            Error::HandshakeTimeout => "handshake_timeout",
            Error::PeerClosed => "peer_closed",
            Error::TruncatedMessage => "truncated_message",
            Error::InputAfterHandover => "input_after_handover",
            Error::ConnectionBufferFull(_) => "connection_buffer_full",
            Error::NodeBudgetExhausted(_) => "node_budget_exhausted",
            Error::Message(_) => "message",
        }
    }
}

/// Why a message (received or to be sent) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The encoded message is larger than `max_message_size`.
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    /// Arrays, maps and tags are nested deeper than `max_depth`.
    #[error("message nested deeper than {0} levels")]
    TooDeep(usize),
    /// A message must be an array `[PORT, ARGS...]`.
    #[error("message is not an array")]
    NotAnArray,
    /// The bytes are not valid in the framing (or, for the API, not one CBOR item).
    #[error("malformed {framing}: {detail}")]
    Malformed {
        framing: &'static str,
        detail: String,
    },
    /// The value has no equivalent in JSON (a NaN, a map key that is not a string...).
    #[error("cannot be sent as json: {0}")]
    NotJson(String),
}

/// Why `send` refused a message. Nothing is sent when it fails.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The handshake has not completed yet.
    #[error("not connected yet")]
    NotConnected,
    /// The connection is closed, or was handed over to an upgraded protocol.
    #[error("connection closed")]
    Closed,
    /// The message itself is unacceptable.
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Node ids must be non-empty and free of `;`, `#`, CR and LF.
    #[error("invalid node id '{0}': must be non-empty and contain none of ';', '#', CR, LF")]
    InvalidNodeId(String),
    /// The protocol word must be `aemp` or `aemp-NAME` (NAME made of word characters).
    #[error("invalid protocol '{0}': expected 'aemp' or 'aemp-NAME'")]
    InvalidProtocol(String),
    /// At least one framing is needed.
    #[error("no framing configured")]
    NoFraming,
    /// `max_depth` is above [`MAX_DEPTH`].
    #[error("max_depth {0} is above the supported {max}", max = MAX_DEPTH)]
    DepthTooLarge(usize),
    /// Greeting keys must be non-empty and free of `=`, CR and LF.
    #[error("invalid greeting key '{0}'")]
    InvalidGreetingKey(String),
    /// Greeting values may not contain CR or LF.
    #[error("invalid greeting value for '{0}'")]
    InvalidGreetingValue(String),
}

/// What kind of refusal an application's call met: the error enums below (and the
/// node's) flattened, for hosts to match on. The WIT `refusal-kind` carries it across
/// the component boundary and the Rust host re-exports it as `Refusal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalKind {
    /// The configuration is invalid.
    InvalidConfig,
    /// Port ids are `NODE#NAME`.
    InvalidPortId,
    /// A local port of that name exists already.
    PortExists,
    /// The destination node is not connected and its queue is full.
    QueueFull,
    /// Queueing would take the node past its memory budget for peers.
    BudgetExhausted,
    /// The connection has not completed its handshake.
    NotConnected,
    /// The connection is closed.
    Closed,
    /// The message is larger than the maximum message size.
    TooLarge,
    /// The message is nested deeper than the limit.
    TooDeep,
    /// A message must be an array `[PORT, ARGS...]`.
    NotAnArray,
    /// Not one well-formed CBOR item.
    Malformed,
    /// The value has no JSON form, for a peer that speaks json.
    NotJson,
}

impl MessageError {
    /// The kind of refusal this is.
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            MessageError::TooLarge(_) => RefusalKind::TooLarge,
            MessageError::TooDeep(_) => RefusalKind::TooDeep,
            MessageError::NotAnArray => RefusalKind::NotAnArray,
            MessageError::Malformed { .. } => RefusalKind::Malformed,
            MessageError::NotJson(_) => RefusalKind::NotJson,
        }
    }
}

impl SendError {
    /// The kind of refusal this is.
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            SendError::NotConnected => RefusalKind::NotConnected,
            SendError::Closed => RefusalKind::Closed,
            SendError::Message(m) => m.refusal_kind(),
        }
    }
}

impl ConfigError {
    /// The kind of refusal this is (always [`RefusalKind::InvalidConfig`]).
    pub fn refusal_kind(&self) -> RefusalKind {
        RefusalKind::InvalidConfig
    }
}

/// `text` with control characters (newlines, escape sequences, ...) escaped as Rust
/// escapes them (`\n`, `\u{1b}`): for putting peer-controlled text (node ids, tags,
/// greeting words, reasons) into a log line.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn escapes_only_control_characters() {
        assert_eq!(printable("plain ünïcode 'x'"), "plain ünïcode 'x'");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            printable("tag\nWARN forged\r\u{1b}[31m\0"),
            "tag\\nWARN forged\\r\\u{1b}[31m\\u{0}"
        );
    }
}
