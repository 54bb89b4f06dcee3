//! Loading and instantiating the engine component under wasmtime.

use wasmtime::component::{Component, Linker, ResourceAny};
use wasmtime::{Engine, Store};
use wasmtime_wasi::random::{WasiRandom, WasiRandomCtx};

use crate::ENGINE_COMPONENT;

mod bindings {
    wasmtime::component::bindgen!({
        world: "engine",
        path: "../wit",
        with: { "wasi:random/random": wasmtime_wasi::p2::bindings::random::random },
    });
}

/// The types of the `aemp:engine/transport` interface, as the host sees them.
pub use bindings::exports::aemp::engine::transport as wit;

/// The types of the `aemp:engine/node` interface, as the host sees them.
pub use bindings::exports::aemp::engine::node as wit_node;

/// The generated bindings of the whole world, for calls not wrapped here.
pub use bindings::Engine as EngineBindings;

/// What each instance's store holds: the randomness it may draw.
pub struct State {
    random: WasiRandomCtx,
}

/// The compiled engine component, ready to instantiate.
pub struct Sandbox {
    engine: Engine,
    pre: bindings::EnginePre<State>,
}

impl Sandbox {
    /// Compiles the embedded component and links its only import, `wasi:random/random`.
    pub fn new() -> wasmtime::Result<Sandbox> {
        let engine = Engine::default();
        let component = Component::new(&engine, ENGINE_COMPONENT)?;
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::bindings::random::random::add_to_linker::<State, WasiRandom>(
            &mut linker,
            |state| &mut state.random,
        )?;
        let pre = bindings::EnginePre::new(linker.instantiate_pre(&component)?)?;
        Ok(Sandbox { engine, pre })
    }

    /// A fresh instance with its own memory.
    pub fn instantiate(&self) -> wasmtime::Result<Instance> {
        let mut store = Store::new(
            &self.engine,
            State {
                random: WasiRandomCtx::default(),
            },
        );
        let bindings = self.pre.instantiate(&mut store)?;
        Ok(Instance { store, bindings })
    }
}

/// One instance of the engine; connections opened in it live in its memory.
pub struct Instance {
    store: Store<State>,
    bindings: bindings::Engine,
}

impl Instance {
    /// The store and the bindings, to call the `node` interface directly.
    pub fn parts(&mut self) -> (&mut Store<State>, &EngineBindings) {
        (&mut self.store, &self.bindings)
    }

    /// The engine's default configuration for `node_id`.
    pub fn default_config(&mut self, node_id: &str) -> wasmtime::Result<wit::Config> {
        let guest = self.bindings.aemp_engine_transport();
        guest.call_default_config(&mut self.store, node_id)
    }

    /// Opens a connection; the inner error is an invalid configuration.
    pub fn open(
        &mut self,
        config: &wit::Config,
        now_ms: u64,
    ) -> wasmtime::Result<Result<ResourceAny, String>> {
        let guest = self.bindings.aemp_engine_transport();
        guest
            .connection()
            .call_open(&mut self.store, config, now_ms)
    }

    /// Feeds bytes received from the peer.
    pub fn handle_input(&mut self, conn: ResourceAny, data: &[u8]) -> wasmtime::Result<()> {
        let guest = self.bindings.aemp_engine_transport();
        guest
            .connection()
            .call_handle_input(&mut self.store, conn, data)
    }

    /// The peer closed its side.
    pub fn handle_eof(&mut self, conn: ResourceAny) -> wasmtime::Result<()> {
        let guest = self.bindings.aemp_engine_transport();
        guest.connection().call_handle_eof(&mut self.store, conn)
    }

    /// Answers a greeting output.
    pub fn handle_verdict(
        &mut self,
        conn: ResourceAny,
        verdict: wit::Verdict,
    ) -> wasmtime::Result<()> {
        let guest = self.bindings.aemp_engine_transport();
        guest
            .connection()
            .call_handle_verdict(&mut self.store, conn, verdict)
    }

    /// Advances the connection's clock.
    pub fn handle_timeout(&mut self, conn: ResourceAny, now_ms: u64) -> wasmtime::Result<()> {
        let guest = self.bindings.aemp_engine_transport();
        guest
            .connection()
            .call_handle_timeout(&mut self.store, conn, now_ms)
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&mut self, conn: ResourceAny) -> wasmtime::Result<Option<u64>> {
        let guest = self.bindings.aemp_engine_transport();
        guest.connection().call_poll_timeout(&mut self.store, conn)
    }

    /// Everything to act on now, in order.
    pub fn poll_outputs(&mut self, conn: ResourceAny) -> wasmtime::Result<Vec<wit::Output>> {
        let guest = self.bindings.aemp_engine_transport();
        guest.connection().call_poll_outputs(&mut self.store, conn)
    }

    /// Queues CBOR messages for the peer.
    pub fn send(
        &mut self,
        conn: ResourceAny,
        messages: &[Vec<u8>],
    ) -> wasmtime::Result<Result<(), wit::SendError>> {
        let guest = self.bindings.aemp_engine_transport();
        guest
            .connection()
            .call_send(&mut self.store, conn, messages)
    }

    /// Frees a connection's state inside the instance.
    pub fn drop_connection(&mut self, conn: ResourceAny) -> wasmtime::Result<()> {
        conn.resource_drop(&mut self.store)
    }
}
