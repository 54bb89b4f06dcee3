//! The AEMP protocol engine: AnyEvent::MP's node-to-node transport as a sans-IO state
//! machine. It never does I/O, never reads a clock and never draws randomness: the host
//! feeds bytes, time and nonces, and acts on what the engine outputs.
//!
//! Start with [`Connection`]. The same code is exported as a WebAssembly component
//! (world `aemp:engine/engine`, see `wit/`) when built for `wasm32`.

pub mod auth;
pub mod batch;
mod buffer;
pub mod config;
pub mod connection;
pub mod error;
pub mod framing;
pub mod greeting;
pub mod node;
mod protocol;
pub mod value;

#[cfg(target_arch = "wasm32")]
mod component;

pub use auth::AuthMethod;
pub use batch::Delivery;
pub use config::Config;
pub use connection::{Connection, Output, Session, TlsRole, Verdict};
pub use error::{ConfigError, Error, MessageError, RefusalKind, SendError, printable};
pub use framing::{Framing, Limits, split_sequence};
pub use greeting::{Greeting, NONCE_LEN};
pub use node::{
    ConnId, ConnInfo, GlobalLimits, Limit, LogLevel, Node, NodeConfig, NodeError, NodeInfo,
    NodeOutput, REQUEST_TAGS, Traffic,
};
pub use protocol::{PROTOCOL_VERSION, PROVIDER};
pub use value::{DecodeError, Value};
