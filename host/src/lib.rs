//! aemp-host: runs the AEMP engine component sandboxed under wasmtime.
//!
//! The component is built from `guest/` by this crate's build script and embedded here as
//! [`ENGINE_COMPONENT`]. [`Sandbox`] compiles it once and instantiates it cheaply.

pub mod config;
mod net;
pub mod node;
pub mod sandbox;
pub mod tls;

pub use aemp_engine::Value;
pub use node::{Event, Node, NodeBuilder, NodeError, Port};
pub use sandbox::{EngineBindings, Instance, Sandbox, State, wit, wit_node};
pub use tls::TlsConfig;
pub use wasmtime::component::ResourceAny;

/// The engine as a WebAssembly component (world `aemp:engine/engine`).
pub static ENGINE_COMPONENT: &[u8] = include_bytes!(env!("AEMP_ENGINE_COMPONENT"));
