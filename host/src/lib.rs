//! aemp-host: runs the AEMP engine component sandboxed under wasmtime.
//!
//! The component is built from `guest/` by this crate's build script and embedded here as
//! [`ENGINE_COMPONENT`]. [`Sandbox`] compiles it once and instantiates it cheaply.

pub mod config;
mod convert;
pub mod metrics;
pub mod node;
mod sandbox;
pub mod tls;

pub use aemp_engine::{AuthMethod, DecodeError, Framing, Value};
pub use convert::{ValueError, from_value, to_value};
pub use node::{
    ConnInfo, DataConnections, DataStream, DbChange, DbMonitor, Event, INFO_TAG, Messages, Monitor,
    Node, NodeBuilder, NodeError, NodeInfo, Port, PortInfo, Refusal, Request, Requests, SendBatch,
};
pub use sandbox::{Limits as SandboxLimits, Sandbox, SandboxError};
pub use tls::TlsConfig;

/// The engine's raw component bindings under wasmtime: an [`raw::Instance`] and the WIT
/// types, for benchmarks and for hosts of the component's interfaces. Unstable: they
/// change with every wasmtime major release, so they need the `unstable-raw` feature.
#[cfg(feature = "unstable-raw")]
pub mod raw {
    pub use crate::sandbox::{EngineBindings, Instance, State, describe, wit, wit_node};
    pub use wasmtime::component::ResourceAny;
}

/// Raises this process's soft limit on open files to its hard limit, as servers do at
/// start: every connection costs a file descriptor, and the usual soft limit of 1024
/// lets a thousand idle connections lock everyone else out. Returns the new limit.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The engine as a WebAssembly component (world `aemp:engine/engine`).
pub static ENGINE_COMPONENT: &[u8] = include_bytes!(env!("AEMP_ENGINE_COMPONENT"));
