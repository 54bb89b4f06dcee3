//! Loading and instantiating the engine component under wasmtime, with limits: each
//! instance gets its own capped memory (StoreLimits) and a CPU budget per call (epoch
//! deadlines); a trap or a limit fails that call, never the process.
//!
//! wasmtime stays private: [`Sandbox`], [`Limits`] and [`SandboxError`] are the stable
//! surface; the raw bindings ([`Instance`] and the WIT types) are public only through
//! `aemp_host::raw` with the `unstable-raw` feature, since every wasmtime major changes them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceAny};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

use crate::ENGINE_COMPONENT;

mod bindings {
    wasmtime::component::bindgen!({
        world: "engine",
        path: "../wit",
    });
}

/// The types of the `aemp:engine/transport` interface, as the host sees them.
pub use bindings::exports::aemp::engine::transport as wit;

/// The types of the `aemp:engine/node` interface, as the host sees them.
pub use bindings::exports::aemp::engine::node as wit_node;

/// The generated bindings of the whole world, for calls not wrapped here.
pub use bindings::Engine as EngineBindings;

/// The component compiled ahead for this host by the build script.
static PRECOMPILED: &[u8] = include_bytes!(env!("AEMP_ENGINE_PRECOMPILED"));

/// How often the CPU clock of all instances ticks.
const TICK: Duration = Duration::from_millis(10);

/// Largest randomness request an instance may make at once (the engine asks for 66 bytes).
const MAX_RANDOM: u64 = 4096;

/// Limits for every instance of a [`Sandbox`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear memory an instance may grow to (default 256 MiB).
    pub max_memory: usize,
    /// CPU time one call into the instance may take before it traps (default 2 s).
    pub max_call_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: 256 << 20,
            max_call_time: Duration::from_secs(2),
        }
    }
}

/// What each instance's store holds.
pub struct State {
    limits: StoreLimits,
    /// Current size of the instance's linear memory, in bytes.
    memory: usize,
}

/// Enforces the memory cap (StoreLimits) and remembers how big the memory is.
impl wasmtime::ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory = self.memory.max(desired);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
}

impl bindings::wasi::random::random::Host for State {
    fn get_random_bytes(&mut self, len: u64) -> Vec<u8> {
        let mut bytes = vec![0; len.min(MAX_RANDOM) as usize];
        fill_random(&mut bytes);
        bytes
    }

    fn get_random_u64(&mut self) -> u64 {
        let mut bytes = [0; 8];
        fill_random(&mut bytes);
        u64::from_le_bytes(bytes)
    }
}

/// One line saying why a call into the sandbox failed: the trap, and whether the engine
/// ran out of memory (its allocator's out-of-memory handler is on the stack).
pub fn describe(e: &wasmtime::Error) -> String {
    let Some(trap) = e.downcast_ref::<wasmtime::Trap>() else {
        return e.to_string();
    };
    let oom = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .is_some_and(|bt| {
            bt.frames()
                .iter()
                .any(|f| f.func_name().is_some_and(|n| n.contains("rust_oom")))
        });
    match trap {
        _ if oom => "the engine ran out of sandbox memory".into(),
        wasmtime::Trap::Interrupt => "the engine exceeded its CPU time per call".into(),
        trap => format!("the engine trapped: {trap}"),
    }
}

/// Fills `bytes` from the operating system's secure generator.
pub(crate) fn fill_random(bytes: &mut [u8]) {
    // The OS generator failing leaves no safe way to make nonces: stop rather than
    // continue with predictable ones.
    if let Err(e) = getrandom::fill(bytes) {
        panic!("the operating system's random generator failed: {e}");
    }
}

/// Why a sandbox could not be made, or an instance started in it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// wasmtime could not compile or link the embedded engine component.
    #[error("cannot compile the engine component: {0}")]
    Compile(String),
    /// The thread that measures CPU time per call could not start.
    #[error("cannot start the sandbox's clock thread: {0}")]
    Clock(#[source] Arc<std::io::Error>),
    /// A new instance of the engine failed to start (out of memory, usually).
    #[error("cannot start an engine instance: {0}")]
    Instantiate(String),
}

/// The compiled engine component, ready to instantiate.
pub struct Sandbox {
    engine: Engine,
    pre: bindings::EnginePre<State>,
    limits: Limits,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Compiles the embedded component with default limits. Nodes share
    /// [`Sandbox::shared`] unless given one of their own.
    pub fn new() -> Result<Sandbox, SandboxError> {
        Sandbox::with_limits(Limits::default())
    }

    /// The process's default sandbox, compiled on first use and shared by every node not
    /// given another: one compiled engine and one clock thread for them all.
    pub fn shared() -> Result<Arc<Sandbox>, SandboxError> {
        static SHARED: Mutex<Option<Arc<Sandbox>>> = Mutex::new(None);
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sandbox) = &*shared {
            return Ok(sandbox.clone());
        }
        let sandbox = Arc::new(Sandbox::new()?);
        *shared = Some(sandbox.clone());
        Ok(sandbox)
    }

    /// Compiles the embedded component and links its only import, `wasi:random/random`,
    /// to the operating system's generator. `limits` apply to instances that do not set
    /// their own.
    pub fn with_limits(limits: Limits) -> Result<Sandbox, SandboxError> {
        let compile = |e: wasmtime::Error| SandboxError::Compile(format!("{e:#}"));
        let mut config = Config::new();
        config.epoch_interruption(true);
        // `AEMP_PERFMAP=1` writes /tmp/perf-PID.map, so `perf report` names the
        // engine's compiled functions (see README, Performance).
        if std::env::var_os("AEMP_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(compile)?;
        // SAFETY: the precompiled bytes were produced by this crate's build script, with
        // this wasmtime version, from the embedded component, and are part of the
        // binary itself; deserialize checks the engine settings and refuses a mismatch.
        let component = match unsafe { Component::deserialize(&engine, PRECOMPILED) } {
            Ok(component) => component,
            Err(e) => {
                tracing::debug!("precompiled engine unusable ({e}); compiling it");
                Component::new(&engine, ENGINE_COMPONENT).map_err(compile)?
            }
        };
        let mut linker = Linker::<State>::new(&engine);
        bindings::Engine::add_to_linker::<State, HasSelf<State>>(&mut linker, |state| state)
            .map_err(compile)?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(bindings::EnginePre::new)
            .map_err(compile)?;
        // One ticker per sandbox; it stops once the engine is dropped.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("aemp-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| SandboxError::Clock(Arc::new(e)))?;
        Ok(Sandbox {
            engine,
            pre,
            limits,
        })
    }

    /// A fresh instance with its own memory, under the sandbox's limits (unstable).
    #[cfg(feature = "unstable-raw")]
    pub fn instantiate(&self) -> Result<Instance, SandboxError> {
        self.instantiate_with(Some(self.limits))
    }

    /// A fresh instance with its own memory, under `limits` (else the sandbox's).
    pub(crate) fn instantiate_with(
        &self,
        limits: Option<Limits>,
    ) -> Result<Instance, SandboxError> {
        let limits = limits.unwrap_or(self.limits);
        let memory = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory)
            .build();
        let mut store = Store::new(
            &self.engine,
            State {
                limits: memory,
                memory: 0,
            },
        );
        store.limiter(|state| state);
        store.epoch_deadline_trap();
        let ticks = (limits.max_call_time.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| SandboxError::Instantiate(describe(&e)))?;
        Ok(Instance {
            store,
            bindings,
            ticks,
        })
    }
}

/// One instance of the engine; connections opened in it live in its memory.
///
/// Unstable: part of wasmtime's generated bindings (`aemp_host::raw`).
pub struct Instance {
    store: Store<State>,
    bindings: bindings::Engine,
    ticks: u64,
}

// The transport calls serve the raw API (benchmarks, component tests); nodes use `parts`.
#[cfg_attr(not(feature = "unstable-raw"), allow(dead_code))]
impl Instance {
    /// The store and the bindings, to call the `node` interface directly. The CPU budget
    /// of one call starts again with each use.
    pub fn parts(&mut self) -> (&mut Store<State>, &EngineBindings) {
        self.parts_for(1)
    }

    /// [`Instance::parts`] for one call that does the work of `calls` (a round of many
    /// peers' input): it gets the budget of each, so what one peer sends is measured
    /// against one call's budget however many others share the round.
    pub fn parts_for(&mut self, calls: usize) -> (&mut Store<State>, &EngineBindings) {
        let calls = u64::try_from(calls.max(1)).unwrap_or(u64::MAX);
        self.store
            .set_epoch_deadline(self.ticks.saturating_mul(calls));
        (&mut self.store, &self.bindings)
    }

    /// The size of the instance's linear memory, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().memory
    }

    /// The engine's default configuration for `node_id`.
    pub fn default_config(&mut self, node_id: &str) -> wasmtime::Result<wit::Config> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .call_default_config(store, node_id)
    }

    /// Opens a connection; the inner error is an invalid configuration.
    pub fn open(
        &mut self,
        config: &wit::Config,
        now_ms: u64,
    ) -> wasmtime::Result<Result<ResourceAny, wit::Refusal>> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_open(store, config, now_ms)
    }

    /// Feeds bytes received from the peer.
    pub fn handle_input(&mut self, conn: ResourceAny, data: &[u8]) -> wasmtime::Result<()> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_handle_input(store, conn, data)
    }

    /// The peer closed its side.
    pub fn handle_eof(&mut self, conn: ResourceAny) -> wasmtime::Result<()> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_handle_eof(store, conn)
    }

    /// Answers a greeting output.
    pub fn handle_verdict(
        &mut self,
        conn: ResourceAny,
        verdict: wit::Verdict,
    ) -> wasmtime::Result<()> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_handle_verdict(store, conn, verdict)
    }

    /// Advances the connection's clock.
    pub fn handle_timeout(&mut self, conn: ResourceAny, now_ms: u64) -> wasmtime::Result<()> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_handle_timeout(store, conn, now_ms)
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&mut self, conn: ResourceAny) -> wasmtime::Result<Option<u64>> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_poll_timeout(store, conn)
    }

    /// Everything to act on now, in order.
    pub fn poll_outputs(&mut self, conn: ResourceAny) -> wasmtime::Result<Vec<wit::Output>> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_poll_outputs(store, conn)
    }

    /// Queues CBOR messages for the peer.
    pub fn send(
        &mut self,
        conn: ResourceAny,
        messages: &[u8],
    ) -> wasmtime::Result<Result<(), wit::SendError>> {
        let (store, b) = self.parts();
        b.aemp_engine_transport()
            .connection()
            .call_send(store, conn, messages)
    }

    /// Frees a connection's state inside the instance.
    pub fn drop_connection(&mut self, conn: ResourceAny) -> wasmtime::Result<()> {
        conn.resource_drop(&mut self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_sandbox_is_compiled_once() {
        let a = Sandbox::shared().unwrap();
        let b = Sandbox::shared().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // Instances take their own limits (tests/faults.rs shows a node stopped by its
        // own memory limit while others in the shared sandbox go on).
        assert!(a.instantiate_with(Some(Limits::default())).is_ok());
    }
}
