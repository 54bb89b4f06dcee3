//! aemp-host: runs the AEMP engine component sandboxed under wasmtime.
//!
//! The component is built from `guest/` by this crate's build script and embedded here as
//! [`ENGINE_COMPONENT`]. [`Sandbox`] compiles it once and instantiates it cheaply.

pub mod config;
pub mod node;
pub mod sandbox;
pub mod tls;

pub use aemp_engine::Value;
pub use node::{Event, Node, NodeBuilder, NodeError, Port};
pub use sandbox::{EngineBindings, Instance, Sandbox, State, wit, wit_node};
pub use tls::TlsConfig;
pub use wasmtime::component::ResourceAny;

/// Raises this process's soft limit on open files to its hard limit, as servers do at
/// start: every connection costs a file descriptor, and the usual soft limit of 1024
/// lets a thousand idle connections lock everyone else out. Returns the new limit.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The engine as a WebAssembly component (world `aemp:engine/engine`).
pub static ENGINE_COMPONENT: &[u8] = include_bytes!(env!("AEMP_ENGINE_COMPONENT"));
