"""The engine component on wasmtime-py: one compiled component per process, one instance
(store) per node. Calls are plain synchronous calls; the component's only import is
randomness, which comes from ``os.urandom``."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from wasmtime import Engine as _WasmEngine
from wasmtime import Store
from wasmtime.component import Component, Func, Instance, Linker, Record, ResourceAny

from . import _bytes

_bytes.install()

COMPONENT_NAME = "aemp_engine.component.wasm"
_NODE_INTERFACE = "aemp:engine/node@0.1.0"

# Every live engine instance; the resource lifecycle test checks it empties.
live_instances: weakref.WeakSet[NodeEngine] = weakref.WeakSet()


def component_path() -> Path:
    """Where the component is: ``$AEMP_WASM_DIR`` when set (a build tree's
    ``target/wasm``), else the copy the wheel carries."""
    override = os.environ.get("AEMP_WASM_DIR")
    path = Path(override) / COMPONENT_NAME if override else Path(__file__).with_name(COMPONENT_NAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"the aemp engine component is missing at {path} (build it, or set AEMP_WASM_DIR)"
        )
    return path


class _Runtime:
    """The process's compiled component and linker, made on first use."""

    def __init__(self) -> None:
        self.engine = _WasmEngine()
        self.component = Component.from_file(self.engine, str(component_path()))
        self.linker = Linker(self.engine)
        with self.linker.root() as root:
            with root.add_instance("wasi:random/random@0.2.0") as random:
                random.add_func("get-random-bytes", lambda _store, n: os.urandom(n))
                random.add_func(
                    "get-random-u64", lambda _store: int.from_bytes(os.urandom(8), "little")
                )
        iface = self.component.get_export_index(_NODE_INTERFACE)
        assert iface is not None, f"component exports no {_NODE_INTERFACE}"
        self._iface = iface

    def func(self, store: Store, instance: Instance, name: str) -> Func:
        """The node interface's function ``name`` in ``instance``."""
        found = self.component.get_export_index(name, self._iface)
        func = instance.get_func(store, found) if found is not None else None
        if func is None:
            raise RuntimeError(f"the component exports no {name}: wrong component file?")
        return func


_runtime: _Runtime | None = None


def runtime() -> _Runtime:
    """The process's runtime (compiling the component takes a while: once)."""
    global _runtime
    if _runtime is None:
        _runtime = _Runtime()
    return _runtime


class Refused(Exception):
    """The engine refused a call: ``kind`` is its refusal kind, ``index`` (for sends) how
    many messages of the batch were queued."""

    def __init__(self, kind: str, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.index = index


def _check(value: Any) -> Any:
    """Results come back as the ok value, or as a refusal record: no ok type of this
    interface is a record, so a record is the error."""
    if isinstance(value, Record):
        raise Refused(getattr(value, "kind"), getattr(value, "message"), getattr(value, "index", None))
    return value


def record(**fields: Any) -> Record:
    """A WIT record; field names are given with ``_`` for the WIT's ``-``."""
    r = Record()
    for key, value in fields.items():
        setattr(r, key.replace("_", "-"), value)
    return r


class NodeEngine:
    """One node resource in its own store. Method names follow the WIT."""

    _METHODS = (
        "node-id is-up buffered-bytes queued-bytes handle-accept handle-connected "
        "handle-connect-failed handle-inputs handle-eof handle-conn-error handle-timeout "
        "poll-timeout poll-outputs connect-addr new-port register-port send kill monitor "
        "unmonitor register-handler set-binds db-set db-del db-family db-keys db-values "
        "db-mon db-unmon"
    ).split()

    def __init__(self, config: Record, now_ms: int) -> None:
        rt = runtime()
        self._store: Store | None = Store(rt.engine)
        instance = rt.linker.instantiate(self._store, rt.component)
        self._funcs = {
            name: rt.func(self._store, instance, f"[method]node.{name}")
            for name in self._METHODS
        }
        create = rt.func(self._store, instance, "[static]node.create")
        self._node: ResourceAny | None = _check(create(self._store, config, now_ms))
        live_instances.add(self)

    def call(self, name: str, *args: Any) -> Any:
        """Calls method ``name``; a refusal raises :class:`Refused`."""
        if self._store is None or self._node is None:
            raise RuntimeError("the engine instance is freed")
        return _check(self._funcs[name](self._store, self._node, *args))

    def free(self) -> None:
        """Drops the node resource and its store."""
        if self._store is None:
            return
        store, node = self._store, self._node
        self._store = self._node = None
        self._funcs.clear()
        live_instances.discard(self)
        try:
            if node is not None:
                node.drop(store)
        finally:
            store.close()


def default_node_config(node_id: str) -> Record:
    """The engine's defaults for a node id."""
    config: Record = _free_call("default-node-config", node_id)
    return config


def expand_node_id(template: str, hostname: str) -> str:
    """``%n`` to ``hostname``, ``%u`` and a trailing ``/`` to random characters."""
    result: str = _free_call("expand-node-id", template, hostname)
    return result


def _free_call(name: str, *args: Any) -> Any:
    # A throwaway store: these functions keep no state.
    rt = runtime()
    store = Store(rt.engine)
    try:
        instance = rt.linker.instantiate(store, rt.component)
        return rt.func(store, instance, name)(store, *args)
    finally:
        store.close()
