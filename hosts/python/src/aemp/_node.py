"""An AEMP node on asyncio: the engine component does the protocol; this module owns
sockets, TLS, time and the API."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import cbor2

from . import _engine
from ._engine import NodeEngine, Refused, record

# Bytes waiting to be written to a connection past which sends to its node wait: far more
# than a socket buffer, so a fast peer's pipe stays full.
HIGH_WATER = 1024 * 1024
# What a message costs a port's byte bound on top of its encoding (as in the JS host).
PORT_MESSAGE_COST = 32
# How long a connection the engine closes may take to write what is queued for it.
LINGER_S = 1.0
# How often sends waiting for all connections together to drain below half of
# max_write_total look again: asyncio reports no write progress of a transport below its
# high-water mark, so there is nothing to wait on but time.
TOTAL_DRAIN_POLL_S = 0.01


def _now() -> int:
    return int(time.monotonic() * 1000)


class AempError(Exception):
    """An error of a node. ``kind`` is the engine's refusal kind (``invalid-port-id``,
    ``port-exists``, ``queue-full``, ``too-large``, ...) when the engine refused the call,
    ``port-full`` for :class:`PortFullError`, else None."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class ClosedError(AempError):
    """The node is closed (or its engine failed)."""


class RefusedError(AempError):
    """The engine refused the call; ``kind`` says why."""


class PortFullError(AempError):
    """A send of this node's application to one of its own ports found no room (see
    :class:`Port`): no connection can hold such sends back, so they are refused instead
    of queued past the port's bounds (as the JS host's ``PORT_FULL``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "port-full")


# Tags cbor2 gives a meaning to (times, decimals, regexps, MIME, UUIDs, sets, ...), kept
# as plain CBORTags when their content does not fit that meaning. Bignums (2, 3) always
# decode: any byte string is a valid one.
_RAW_TAGS = (0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004, 55799)


def _raw(tag: int) -> Callable[[Any, bool], Any]:
    return lambda value, _immutable: cbor2.CBORTag(tag, value)


_AS_TAGS = {tag: _raw(tag) for tag in _RAW_TAGS}


def decode(data: bytes) -> Any:
    """CBOR from a peer as Python values: byte strings stay ``bytes``, bignums are ints,
    tags cbor2 knows decode (epoch times as ``datetime``...), other tags, and known ones
    whose content does not fit, as ``cbor2.CBORTag``."""
    try:
        return cbor2.loads(data)
    except cbor2.CBORDecodeError:
        return cbor2.loads(data, semantic_decoders=_AS_TAGS)


def tls_contexts(pem: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The client and server TLS contexts from an AnyEvent::MP certificate file: this
    node's certificate (the first) and key, and every certificate of the file as a trust
    anchor. Peers must present a certificate that is one of them or chains to one; host
    names are not checked (nodes are named by node id)."""
    contexts = (ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # load_cert_chain reads files only.
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        for ctx in contexts:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            # A certificate of the file is trusted as it is, not only a self-signed root.
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            ctx.load_verify_locations(cadata=pem)
            ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    return contexts


# The framings the engine speaks.
FRAMINGS = ("cbor", "json")
# The configuration's names of the engine's auth methods.
_AUTH_METHODS = {"tls_sha3_512": "tls-sha3512", "hmac_sha3_512": "hmac-sha3512",
                 "tls_anon": "tls-anon", "cleartext": "cleartext"}


def _auth_methods(names: Sequence[str]) -> list[str]:
    try:
        return [_AUTH_METHODS[name] for name in names]
    except KeyError as e:
        raise AempError(f"unknown auth method {e.args[0]!r}") from None


def _split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (the host possibly in brackets), read as the Rust host reads binds: a
    host ``*`` (or none) is every interface, a port ``*`` (or none: AnyEvent::MP's
    default bind ``*``) a dynamic one, a bare number that port on every interface."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = ("*", addr) if addr.isdigit() else (addr, "0")
    host = host.strip("[]")
    return ("0.0.0.0" if host in ("*", "") else host), int("0" if port == "*" else port)


@dataclass(frozen=True)
class _Limits:
    """The host's bounds (see :meth:`Node.start`)."""

    port_capacity: int
    port_bytes: int
    port_stall_ms: int
    max_write_queue: int
    max_write_total: int
    write_timeout_ms: int

    def check(self) -> None:
        for name, value in vars(self).items():
            _check_positive(name, value)


def _check_positive(name: str, value: Any, most: int | None = None) -> None:
    if (not isinstance(value, int) or isinstance(value, bool) or value <= 0
            or (most is not None and value > most)):
        bound = f" up to {most}" if most is not None else ""
        raise AempError(f"{name} must be a positive integer{bound}, not {value!r}")


# The engine's settings among Node.start's options: where they go in its node config, and
# the most their WIT type holds.
_ENGINE_SETTINGS: dict[str, tuple[tuple[str, ...], int]] = {
    "max_message_size": (("transport", "limits", "max-message-size"), 2**32 - 1),
    "max_depth": (("transport", "limits", "max-depth"), 2**32 - 1),
    "keepalive_interval_ms": (("transport", "keepalive-interval-ms"), 2**64 - 1),
    "max_queue_bytes": (("max-queue-bytes",), 2**64 - 1),
    "max_buffered_bytes": (("max-buffered-bytes",), 2**64 - 1),
    "max_handshakes": (("max-handshakes",), 2**32 - 1),
}


def _node_of(port_id: str) -> str:
    return port_id.partition("#")[0]


class _Conn(asyncio.Protocol):
    """One socket of the node, plain or (once the engine asks) TLS through memory BIOs, so
    the bytes the engine read past the greeting reach TLS first."""

    def __init__(self, node: Node, conn: int | None) -> None:
        self.node = node
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.tls: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._handshaken = False
        self._pending: list[bytes] = []  # plaintext written before the TLS handshake ended
        self.sent = 0  # bytes handed to the transport, for the write timeout's progress
        self.write_timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.done = asyncio.get_running_loop().create_future()
        self.gone = False  # the engine knows this connection is over

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.conn is None:  # accepted
            peer = transport.get_extra_info("peername")
            self.conn = self.node._accepted(self, f"{peer[0]}:{peer[1]}")

    def data_received(self, data: bytes) -> None:
        if self.gone:
            return
        if self.tls is None:
            self.node._input(self, data)
            return
        self._in.write(data)
        self._pump()

    def eof_received(self) -> bool:
        if not self.gone:
            self.gone = True
            self.node._eof(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone:
            self.gone = True
            self.node._lost(self, str(exc) if exc else "connection closed")
        self.drained.set()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        # A peer that does not read our answers cannot make us queue more: read nothing
        # more from it until it does.
        self.paused = True
        self.drained.clear()
        assert self.transport is not None
        self.transport.pause_reading()
        self.node._write_paused(self)

    def resume_writing(self) -> None:
        self.paused = False
        self.drained.set()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.transport is not None and not self.node._blocking:
            self.transport.resume_reading()

    # for the node

    def start_tls(self, ctx: ssl.SSLContext, server: bool, leftover: bytes) -> None:
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=server)
        self._in.write(leftover)
        self._pump()

    def buffered(self) -> int:
        """Bytes waiting to be written (TLS records and plaintext before the handshake)."""
        if self.transport is None:
            return 0
        return self.transport.get_write_buffer_size() + sum(map(len, self._pending))

    def written(self) -> int:
        """Bytes the socket took so far."""
        return self.sent - (self.transport.get_write_buffer_size() if self.transport else 0)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tls is None:
            self.sent += len(data)
            self.transport.write(data)
        elif not self._handshaken:
            self._pending.append(data)
        else:
            try:
                self.tls.write(data)
            except ssl.SSLError as e:
                self.fail(f"TLS: {e}")
                return
            self._send_records()

    def abort(self) -> None:
        """Drops the socket with what it holds, unless it is over already: asyncio's
        transport fails on an abort after a close that wrote everything."""
        if self.transport is not None and not self.done.done():
            self.transport.abort()

    def fail(self, reason: str) -> None:
        """The host gives up on this connection."""
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        self.abort()
        if not self.gone:
            self.gone = True
            self.node._lost(self, reason)

    def _send_records(self) -> None:
        if self._out.pending and self.transport is not None:
            records = self._out.read()
            self.sent += len(records)
            self.transport.write(records)

    def _pump(self) -> None:
        assert self.tls is not None
        try:
            if not self._handshaken:
                try:
                    self.tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._send_records()
                    return
                self._handshaken = True
                for data in self._pending:
                    self.tls.write(data)
                self._pending.clear()
            plain = bytearray()
            while True:
                try:
                    plain += self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    break
            self._send_records()
            if plain:
                self.node._input(self, bytes(plain))
        except ssl.SSLError as e:
            self._send_records()
            self.fail(f"TLS: {e.reason or e}")


class Port:
    """A local port: ``async for args in port`` yields the argument lists sent to it.
    ``async with`` (or :meth:`close`) kills it.

    It holds at most the node's ``port_capacity`` messages and ``port_bytes`` bytes not
    taken yet (plus what the engine call that filled it delivered; an empty port takes one
    message of any size); while one port is full no connection of the node reads, so
    senders wait (TCP backpressure). A full port that takes nothing for ``port_stall_ms``
    is stalled: what it holds past its bounds is dropped with one warning, and messages
    that find it full are dropped until it takes one, so one port nobody reads cannot
    stop the node. This node's own sends to it are refused with :class:`PortFullError`
    when they do not fit."""

    def __init__(self, node: Node, port_id: str, capacity: int, capacity_bytes: int,
                 stall_ms: int) -> None:
        self.node = node
        #: The port id, ``NODE#NAME``.
        self.id = port_id
        self._queue: collections.deque[tuple[list[Any], int]] = collections.deque()
        self._bytes = 0  # the cost of what _queue holds
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._stall_ms = stall_ms
        self._stalled = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _full(self) -> bool:
        return len(self._queue) >= self._capacity or self._bytes >= self._capacity_bytes

    def _room(self, count: int, cost: int) -> bool:
        """Whether ``count`` more messages costing ``cost`` fit (an empty port takes one
        message of any size)."""
        held = len(self._queue) + count
        return held <= self._capacity and (self._bytes + cost <= self._capacity_bytes
                                           or held == 1)

    def _deliver(self, args: list[Any], cost: int) -> None:
        if self.closed or (self._stalled and self._full()):
            return
        self._queue.append((args, cost))
        self._bytes += cost
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._update()

    def _update(self) -> None:
        """Tells the node whether this port holds reading back; arms the stall timer."""
        full = not self.closed and not self._stalled and self._full()
        if full and self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(
                self._stall_ms / 1000, self._stall)
        elif not full and self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.node._blocks(self, full)

    def _stall(self) -> None:
        self._stall_timer = None
        self._stalled = True
        # Keep the oldest messages that fit the bounds (at least one).
        keep = 0
        kept_bytes = 0
        for _, cost in self._queue:
            if keep >= self._capacity or (keep and kept_bytes + cost > self._capacity_bytes):
                break
            keep += 1
            kept_bytes += cost
        dropped = len(self._queue) - keep
        while len(self._queue) > keep:
            self._queue.pop()
        self._bytes = kept_bytes
        self.node._emit("log", "warn", f"port {self.id} took no message for {self._stall_ms} ms: "
                        f"dropped {dropped} messages for it")
        self._update()

    def _finish(self) -> None:
        self.closed = True
        self._queue.clear()
        self._bytes = 0
        self._update()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def pending(self) -> int:
        """Messages received and not taken yet."""
        return len(self._queue)

    @property
    def pending_bytes(self) -> int:
        """What the messages not taken yet cost the byte bound (``port_bytes``): their
        encoded size and 32 bytes each."""
        return self._bytes

    async def recv(self) -> list[Any]:
        """The next message's arguments; raises :class:`ClosedError` once the port is
        closed."""
        while not self._queue:
            if self.closed:
                raise ClosedError(f"port {self.id} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        args, cost = self._queue.popleft()
        self._bytes -= cost
        # Taking a message ends a stall and restarts the stall clock.
        self._stalled = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._update()
        return args

    def __aiter__(self) -> AsyncIterator[list[Any]]:
        return self

    async def __anext__(self) -> list[Any]:
        try:
            return await self.recv()
        except ClosedError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Port:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self, *reason: Any) -> None:
        """Kills the port with ``reason`` (what its monitors receive)."""
        if self.closed:
            return
        self._finish()
        self.node._release(self, list(reason))


Callback = Callable[..., None]


class Node:
    """A running node. Start one with :meth:`start`; ``async with`` closes it.

    Events (:meth:`on`): ``node-up`` (node), ``node-down`` (node, reason), ``log``
    (level, message), ``request`` (node, tag, args) for tags given to
    :meth:`handle_requests`, ``db-change`` (family, set, deleted) for monitored families.
    """

    def __init__(self, engine: NodeEngine, node_id: str, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None,
                 limits: _Limits) -> None:
        self._engine: NodeEngine | None = engine
        #: This node's id.
        self.id = node_id
        #: The addresses this node listens on.
        self.listen_addrs: list[str] = []
        self._tls = tls
        self._limits = limits
        self._wrote = False  # a transmit since the last check of the write total
        # Bytes all connections had waiting at the last count: only too high between
        # counts, as sockets write in the background.
        self._write_total = 0
        self._total_drained: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._conns: dict[int, _Conn] = {}
        self._up: dict[str, int] = {}  # node id -> its working connection
        self._ports: dict[str, Port] = {}
        self._blocking: set[Port] = set()
        self._servers: list[asyncio.Server] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._inputs: list[tuple[int, bytes]] = []
        self._outbox: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        # Messages and their cost in the outbox for each local port: they count against
        # its room until the engine delivers them.
        self._reserved: dict[Port, tuple[int, int]] = {}
        self._round_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._listeners: dict[str, list[Callback]] = collections.defaultdict(list)
        self._up_waiters: dict[str, list[asyncio.Future[None]]] = collections.defaultdict(list)
        self._monitors: dict[str, list[asyncio.Future[list[Any]]]] = collections.defaultdict(list)
        self._db_waiters: dict[str, asyncio.Future[Any]] = {}
        self._closing: asyncio.Task[None] | None = None
        # Set once close() has drained: from then on no new connection is taken.
        self._ending = False

    @classmethod
    async def start(
        cls,
        node_id: str | None = None,
        *,
        secret: str | bytes | None = None,
        binds: Sequence[str] = (),
        seeds: Sequence[str] = (),
        cert: str | None = None,
        framings: Sequence[str] | None = None,
        auth_offer: Sequence[str] | None = None,
        auth_accept: Sequence[str] | None = None,
        monitor_timeout_ms: int | None = None,
        connect_interval_ms: int | None = None,
        port_capacity: int = 1024,
        port_bytes: int = 16 * 1024 * 1024,
        port_stall_ms: int = 10000,
        max_write_queue: int = 64 * 1024 * 1024,
        max_write_total: int = 128 * 1024 * 1024,
        write_timeout_ms: int | None = None,
        max_message_size: int | None = None,
        max_depth: int | None = None,
        keepalive_interval_ms: int | None = None,
        max_queue_bytes: int | None = None,
        max_buffered_bytes: int | None = None,
        max_handshakes: int | None = None,
    ) -> Node:
        """Starts a node. ``node_id`` defaults to ``<hostname>/`` (``%n``, ``%u`` and a
        trailing ``/`` are expanded); ``cert`` is the PEM text of an AnyEvent::MP
        certificate file (certificate, key, CA certificates): TLS as the Rust host does
        it. ``auth_offer`` (the methods we may send) and ``auth_accept`` (those we
        accept, announced in this order) take AnyEvent::MP's names: ``tls_sha3_512``,
        ``hmac_sha3_512``, ``tls_anon``, ``cleartext`` (default: the engine's, the
        reference's). Raises :class:`AempError` on invalid options or a bind that fails.

        The host's bounds, as in the JS host: a port holds ``port_capacity`` messages
        and ``port_bytes`` bytes (see :class:`Port`) and is stalled after
        ``port_stall_ms`` full without taking one; a connection with more than
        ``max_write_queue`` bytes waiting to be written is closed, as is the one holding
        the most when all hold more than ``max_write_total``, and one whose pending
        writes make no progress for ``write_timeout_ms`` (default: the monitor timeout,
        30 s). Each closes with ``peer does not read: ...``, the engine told why.

        The engine's settings, as the Rust host's ``NodeBuilder`` has them (None: the
        engine's default): ``max_message_size`` (16 MiB) and ``max_depth`` (128) bound
        messages both ways, ``keepalive_interval_ms`` sends a keepalive after that long
        without sending (default none), ``max_queue_bytes`` (16 MiB) bounds what waits
        for one node not connected yet, ``max_buffered_bytes`` (64 MiB) what the engine
        holds for peers all together, ``max_handshakes`` (256) the accepted connections
        in their handshake at once."""
        if write_timeout_ms is None:
            write_timeout_ms = monitor_timeout_ms or 30000
        limits = _Limits(port_capacity, port_bytes, port_stall_ms, max_write_queue,
                         max_write_total, write_timeout_ms)
        limits.check()
        hostname = socket.gethostname()
        node_id = _engine.expand_node_id(node_id or f"{hostname}/", hostname)
        config = _engine.default_node_config(node_id)
        transport = getattr(config, "transport")
        if secret is not None:
            transport.secret = secret.encode() if isinstance(secret, str) else secret
        if framings is not None:
            unknown = [f for f in framings if f not in FRAMINGS]
            if unknown:
                raise AempError(f"unknown framing {unknown[0]!r} (the engine speaks cbor "
                                "and json)")
            transport.framings = list(framings)
        if auth_offer is not None:
            setattr(transport, "auth-offer", _auth_methods(auth_offer))
        if auth_accept is not None:
            setattr(transport, "auth-accept", _auth_methods(auth_accept))
        if monitor_timeout_ms is not None:
            setattr(transport, "monitor-timeout-ms", monitor_timeout_ms)
        if connect_interval_ms is not None:
            setattr(config, "connect-interval-ms", connect_interval_ms)
        settings = {"max_message_size": max_message_size, "max_depth": max_depth,
                    "keepalive_interval_ms": keepalive_interval_ms,
                    "max_queue_bytes": max_queue_bytes,
                    "max_buffered_bytes": max_buffered_bytes, "max_handshakes": max_handshakes}
        for name, value in settings.items():
            if value is None:
                continue
            path, most = _ENGINE_SETTINGS[name]
            _check_positive(name, value, most)
            target = config
            for key in path[:-1]:
                target = getattr(target, key)
            setattr(target, path[-1], value)
        try:
            tls = tls_contexts(cert) if cert is not None else None
        except (ssl.SSLError, OSError) as e:
            raise AempError(f"invalid certificate file: {e}") from e
        transport.tls = tls is not None
        setattr(config, "seeds", list(seeds))
        setattr(config, "wall-clock-offset-ms", int(time.time() * 1000) - _now())
        try:
            engine = NodeEngine(config, _now())
        except Refused as e:
            raise AempError(f"invalid node options: {e}", e.kind) from e
        node = cls(engine, node_id, tls, limits)
        try:
            await node._listen(binds)
        except BaseException:
            await node.close()
            raise
        node._flush()
        return node

    @classmethod
    async def from_config(cls, profile: str | None = None, **overrides: Any) -> Node:
        """Starts a node as the AnyEvent::MP configuration file's ``profile`` (default:
        the host name) says (see :mod:`aemp.config`); ``overrides`` are
        :meth:`start`'s keyword arguments and win over the file."""
        from .config import ConfigError, load_profile

        try:
            options = load_profile(profile).options()
        except ConfigError as e:
            raise AempError(str(e)) from e
        options.update(overrides)
        return await cls.start(**options)

    async def _listen(self, binds: Iterable[str]) -> None:
        hostname = socket.gethostname()
        announced: list[str] = []
        for bind in binds:
            try:
                host, port = _split_addr(bind)
                server = await self._loop.create_server(lambda: _Conn(self, None), host, port)
            except (OSError, ValueError) as e:
                raise AempError(f"cannot listen on {bind}: {e}") from e
            self._servers.append(server)
            for sock in server.sockets:
                h, p = sock.getsockname()[:2]
                self.listen_addrs.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
                # Nobody can dial an unspecified address: the host name is announced
                # instead, as the Rust host does.
                announced.append(f"{hostname}:{p}" if ipaddress.ip_address(h).is_unspecified
                                 else self.listen_addrs[-1])
        if announced:
            self._call("set-binds", announced, _now())

    # context manager, events

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def on(self, event: str, callback: Callback) -> None:
        """Calls ``callback(*args)`` on every ``event`` (see the class)."""
        self._listeners[event].append(callback)

    def off(self, event: str, callback: Callback) -> None:
        """Stops calling ``callback`` on ``event``."""
        self._listeners[event].remove(callback)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in list(self._listeners.get(event, ())):
            try:
                callback(*args)
            except Exception as e:  # a listener's bug must not stop the node
                self._loop.call_exception_handler(
                    {"message": f"aemp {event} listener failed", "exception": e})

    # the engine

    @property
    def closed(self) -> bool:
        """Whether the node is closed (or closing)."""
        return self._engine is None or self._closing is not None

    def _call(self, name: str, *args: Any) -> Any:
        if self._engine is None:
            raise ClosedError(f"node {self.id} is closed")
        try:
            return self._engine.call(name, *args)
        except Refused:
            raise
        except Exception as e:  # a trap: the engine is unusable
            self._stop(e)
            raise ClosedError(f"node {self.id} stopped: the engine failed: {e}") from e

    def _guard(self, name: str, *args: Any) -> None:
        """Engine input from a socket or timer: never raises into asyncio."""
        if self._engine is None:
            return
        try:
            self._call(name, *args)
        except (Refused, ClosedError):
            return
        self._schedule()

    def _schedule(self) -> None:
        if not self._round_pending and self._engine is not None:
            self._round_pending = True
            self._loop.call_soon(self._round)

    def _round(self) -> None:
        """One loop round: all reads in one call, all sends in one call, then outputs."""
        self._round_pending = False
        if self._engine is None:
            return
        try:
            if self._inputs:
                inputs, self._inputs = self._inputs, []
                self._call("handle-inputs", inputs, _now())
            if self._outbox:
                self._send_outbox()
            self._flush()
        except ClosedError:
            return

    def _send_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        # The engine delivers them to local ports in this round's poll.
        self._reserved.clear()
        while outbox:
            data = b"".join(p + a for p, a, _ in outbox)
            sizes = [n for p, a, _ in outbox for n in (len(p), len(a))]
            try:
                self._call("send", record(data=data, sizes=sizes), _now())
            except Refused as e:
                index = e.index or 0
                for _, _, fut in outbox[:index]:
                    if not fut.done():
                        fut.set_result(None)
                fut = outbox[index][2]
                if not fut.done():
                    fut.set_exception(RefusedError(str(e), e.kind))
                outbox = outbox[index + 1:]
                continue
            for _, _, fut in outbox:
                if not fut.done():
                    fut.set_result(None)
            break

    def _flush(self) -> None:
        """Acts on every engine output, then re-arms the engine's timer. One poll is
        enough: whatever calls the engine while outputs are acted on schedules a round of
        its own, and a call through wasmtime-py costs tens of µs."""
        for output in self._call("poll-outputs"):
            if self._engine is None:
                return
            self._output(output.tag, output.payload)
        if self._engine is None:
            return
        if self._wrote:
            self._wrote = False
            self._check_write_total()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self._call("poll-timeout")
        if at is not None:
            delay = max(0, at - _now()) / 1000
            self._timer = self._loop.call_later(delay, self._guard_timeout)

    def _guard_timeout(self) -> None:
        self._timer = None
        self._guard("handle-timeout", _now())

    def _output(self, tag: str, val: Any) -> None:
        if tag == "transmit":
            c = self._conns.get(val.conn)
            if c is not None:
                c.write(val.bytes)
                self._wrote = True
                limit = self._limits.max_write_queue
                if c.buffered() > limit:
                    c.fail(f"peer does not read: more than {limit} bytes waiting")
        elif tag == "connect":
            task = self._loop.create_task(self._connect(val.conn, val.addr))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        elif tag == "start-tls":
            c = self._conns.get(val.conn)
            if c is None:
                return
            if self._tls is None:
                c.fail("TLS requested but no certificate configured")
            else:
                server = val.role == "server"
                c.start_tls(self._tls[server], server, val.leftover)
        elif tag == "close":
            c = self._conns.pop(val.conn, None)
            if c is not None and c.transport is not None:
                c.gone = True
                c.transport.close()  # after what is buffered is written
                self._loop.call_later(LINGER_S, c.abort)
        elif tag == "deliver":
            port = self._ports.get(val.port)
            if port is None:
                return
            at = 0
            for size in val.sizes:
                raw = val.data[at:at + size]
                at += size
                args = self._decode(raw, f"message for {val.port}")
                if isinstance(args, list):
                    port._deliver(args, size + PORT_MESSAGE_COST)
        elif tag == "node-up":
            self._up[val.node] = val.conn
            for fut in self._up_waiters.pop(val.node, []):
                if not fut.done():
                    fut.set_result(None)
            self._emit("node-up", val.node)
        elif tag == "node-down":
            self._up.pop(val.node, None)
            self._emit("node-down", val.node, val.reason)
        elif tag == "port-down":
            reason = self._decode(val.reason, "reason")
            for mon in self._monitors.pop(val.port, []):
                if not mon.done():
                    mon.set_result(reason if isinstance(reason, list) else [])
        elif tag == "request":
            message = self._decode(val.message, f"request {val.tag}")
            if isinstance(message, list) and message and isinstance(message[0], str):
                self._emit("request", message[0], val.tag, message[1:])
        elif tag == "db-reply":
            waiter = self._db_waiters.pop(val.id, None)
            if waiter is not None and not waiter.done():
                try:
                    waiter.set_result(decode(val.result))
                except Exception as e:
                    waiter.set_exception(AempError(f"database reply not decodable: {e}"))
        elif tag == "db-change":
            change = self._decode(val.change, "database change")
            if isinstance(change, list) and len(change) == 2:
                self._emit("db-change", val.family, change[0], change[1])
        elif tag == "log":
            self._emit("log", val.level, val.message)

    def _decode(self, raw: bytes, what: str) -> Any:
        # The engine checked the CBOR is well formed; what Python cannot represent (a tag
        # cbor2 rejects...) drops that item with a warning.
        try:
            return decode(raw)
        except Exception as e:
            self._emit("log", "warn", f"{what} dropped: {e}")
            return None

    # connections

    def _accepted(self, c: _Conn, peer: str) -> int | None:
        if self._engine is None or self._ending:
            assert c.transport is not None
            c.gone = True
            c.transport.abort()
            return None
        conn: int = self._call("handle-accept", peer, _now())
        self._attach(conn, c)
        self._schedule()
        return conn

    def _attach(self, conn: int, c: _Conn) -> None:
        c.conn = conn
        self._conns[conn] = c
        if self._blocking and c.transport is not None:
            c.transport.pause_reading()

    async def _connect(self, conn: int, addr: str) -> None:
        try:
            host, port = _split_addr(addr)
            _, c = await self._loop.create_connection(lambda: _Conn(self, conn), host, port)
        except (OSError, ValueError) as e:
            self._guard("handle-connect-failed", conn, str(e) or type(e).__name__, _now())
            return
        if self._engine is None or self._ending:
            c.gone = True
            assert c.transport is not None
            c.transport.abort()
            return
        self._attach(conn, c)
        self._guard("handle-connected", conn, _now())

    def _input(self, c: _Conn, data: bytes) -> None:
        if c.conn is not None and self._conns.get(c.conn) is c:
            self._inputs.append((c.conn, data))
            self._schedule()

    def _eof(self, c: _Conn) -> None:
        self._end(c, "handle-eof")

    def _lost(self, c: _Conn, reason: str) -> None:
        self._end(c, "handle-conn-error", reason)

    def _end(self, c: _Conn, name: str, *args: Any) -> None:
        """The connection ended: input read before the end goes first. Outputs wait for
        the round (this may run while outputs are being acted on)."""
        if c.conn is None or self._conns.pop(c.conn, None) is not c:
            return
        try:
            if self._inputs:
                inputs, self._inputs = self._inputs, []
                self._call("handle-inputs", inputs, _now())
            self._call(name, c.conn, *args, _now())
        except (Refused, ClosedError):
            return
        self._schedule()

    def _check_write_total(self) -> None:
        """Past ``max_write_total`` waiting over all connections, the one holding the most
        goes (once a round: summing is linear in the connections)."""
        limit = self._limits.max_write_total
        sizes = {c: c.buffered() for c in self._conns.values()}
        total = sum(sizes.values())
        while total > limit and sizes:
            most = max(sizes, key=sizes.__getitem__)
            total -= sizes.pop(most)
            most.fail(f"peer does not read: the node's connections have more than {limit} "
                      "bytes waiting, this one the most")
        self._write_total = total

    def _all_behind(self) -> bool:
        """Whether all connections together have more than half of ``max_write_total``
        waiting (counted again only when the last count says so)."""
        half = self._limits.max_write_total // 2
        if self._write_total > half:
            self._write_total = sum(c.buffered() for c in self._conns.values())
        return self._write_total > half

    async def _wait_total_drained(self) -> None:
        """Until :meth:`_all_behind` is false or the node stops; one poll for all
        waiting sends."""
        if self._total_drained is None:
            self._total_drained = self._loop.create_future()
            self._loop.call_later(TOTAL_DRAIN_POLL_S, self._poll_total)
        # Shielded: a cancelled send must not end the others' wait.
        await asyncio.shield(self._total_drained)

    def _poll_total(self) -> None:
        fut = self._total_drained
        if fut is None:
            return
        if self._engine is not None and self._all_behind():
            self._loop.call_later(TOTAL_DRAIN_POLL_S, self._poll_total)
            return
        self._total_drained = None
        if not fut.done():
            fut.set_result(None)

    def _write_paused(self, c: _Conn) -> None:
        """A connection whose transport asks to wait must write something every
        ``write_timeout_ms``."""
        if c.write_timer is None:
            self._arm_write_check(c, c.written())

    def _arm_write_check(self, c: _Conn, written: int) -> None:
        c.write_timer = self._loop.call_later(self._limits.write_timeout_ms / 1000,
                                              self._write_check, c, written)

    def _write_check(self, c: _Conn, before: int) -> None:
        c.write_timer = None
        if c.gone or not c.paused:
            return
        now = c.written()
        if now > before:
            self._arm_write_check(c, now)
        else:
            c.fail(f"peer does not read: nothing written for {self._limits.write_timeout_ms} ms")

    def _blocks(self, port: Port, full: bool) -> None:
        """No connection reads while a port is full."""
        before = bool(self._blocking)
        if full:
            self._blocking.add(port)
        else:
            self._blocking.discard(port)
        if before == bool(self._blocking):
            return
        for c in self._conns.values():
            if c.transport is not None and not c.transport.is_closing():
                if self._blocking:
                    c.transport.pause_reading()
                elif not c.paused:
                    c.transport.resume_reading()

    # the API

    def port(self, name: str | None = None) -> Port:
        """A new local port (named ``name``, else with a fresh unique name)."""
        try:
            port_id: str = (self._call("new-port") if name is None
                            else self._call("register-port", name))
        except Refused as e:
            raise RefusedError(str(e), e.kind) from e
        port = Port(self, port_id, self._limits.port_capacity, self._limits.port_bytes,
                    self._limits.port_stall_ms)
        self._ports[port_id] = port
        return port

    def _release(self, port: Port, reason: list[Any]) -> None:
        self._ports.pop(port.id, None)
        if self._engine is not None:
            self.kill(port.id, *reason)

    async def send(self, port_id: str, *args: Any) -> None:
        """Sends ``args`` to ``port_id``. Sends of one loop round cross into the engine
        together. Returns once the message is queued and its node's connection has room
        (waits while the peer is slow: while its connection holds more than 1 MiB
        unwritten, or while all connections together hold more than half of
        ``max_write_total``, as long as its node is up). Raises :class:`RefusedError`
        when the engine refuses it, :class:`PortFullError` when it is for a port of this
        node that has no room, :class:`ClosedError` when the node is closed."""
        await self.send_batch([(port_id, args)])

    async def send_batch(self, messages: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Sends ``(port_id, args)`` pairs in order, as :meth:`send` does, in one call into
        the engine. Each message is queued or refused on its own; the first refusal is
        raised once all have been tried. A message to a port of this node that has no
        room for it is refused with :class:`PortFullError`."""
        if self.closed:
            raise ClosedError(f"node {self.id} is closed")
        futures: list[asyncio.Future[None]] = []
        nodes: set[str] = set()
        for port_id, args in messages:
            fut: asyncio.Future[None] = self._loop.create_future()
            futures.append(fut)
            encoded = cbor2.dumps(list(args))
            port = self._ports.get(port_id)
            if port is not None:
                count, cost = self._reserved.get(port, (0, 0))
                count, cost = count + 1, cost + len(encoded) + PORT_MESSAGE_COST
                if not port._room(count, cost):
                    fut.set_exception(PortFullError(
                        f"port {port_id} is full ({self._limits.port_capacity} messages or "
                        f"{self._limits.port_bytes} bytes waiting)"))
                    continue
                self._reserved[port] = (count, cost)
            self._outbox.append((port_id.encode(), encoded, fut))
            nodes.add(_node_of(port_id))
        self._schedule()
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for node in nodes:
            conn = self._up.get(node)
            c = self._conns.get(conn) if conn is not None else None
            if c is not None and c.paused:
                await c.drained.wait()
        while any(node in self._up for node in nodes) and self._all_behind():
            await self._wait_total_drained()

    def kill(self, port_id: str, *reason: Any) -> None:
        """Kills a port (local or remote) with ``reason`` (what monitors receive)."""
        port = self._ports.get(port_id)
        if port is not None:
            port.close(*reason)
            return
        try:
            self._call("kill", port_id, cbor2.dumps(list(reason)), _now())
        except Refused as e:
            raise RefusedError(str(e), e.kind) from e
        self._schedule()

    async def monitor(self, port_id: str) -> list[Any]:
        """Waits for ``port_id`` to die; returns the kill reason (empty for a plain
        close). Cancelling the wait stops monitoring."""
        try:
            self._call("monitor", port_id, _now())
        except Refused as e:
            raise RefusedError(str(e), e.kind) from e
        self._schedule()
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._monitors[port_id].append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            waiters = self._monitors.get(port_id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters and self._engine is not None:
                self._monitors.pop(port_id, None)
                try:
                    self._call("unmonitor", port_id, _now())
                except (Refused, ClosedError):
                    pass
            raise

    def connect(self, addr: str) -> None:
        """Connects to the node listening at ``addr`` (``host:port``)."""
        self._call("connect-addr", addr, _now())
        self._schedule()

    def is_up(self, node: str) -> bool:
        """Whether ``node`` has a working connection."""
        return self._engine is not None and bool(self._call("is-up", node))

    async def wait_up(self, node: str, timeout: float = 10.0) -> None:
        """Waits until ``node`` is up; raises ``TimeoutError`` after ``timeout`` s."""
        if self.is_up(node):
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._up_waiters[node].append(fut)
        async with asyncio.timeout(timeout):
            await fut

    def handle_requests(self, tag: str) -> None:
        """Node-port requests ``[tag, ...]`` come to the ``request`` event."""
        self._call("register-handler", tag)

    def db_set(self, family: str, key: str, value: Any) -> None:
        """Sets this node's entry ``key`` of database ``family``."""
        try:
            self._call("db-set", family, key, cbor2.dumps(value), _now())
        except Refused as e:
            raise RefusedError(str(e), e.kind) from e
        self._schedule()

    def db_del(self, family: str, *keys: str) -> None:
        """Deletes this node's entries ``keys`` of ``family``."""
        self._call("db-del", family, list(keys), _now())
        self._schedule()

    async def db_family(self, family: str) -> dict[str, Any]:
        """The whole ``family`` as the master knows it."""
        result: dict[str, Any] = await self._query("db-family", family)
        return result

    async def db_keys(self, family: str) -> list[str]:
        """The keys of ``family``."""
        result: list[str] = await self._query("db-keys", family)
        return result

    async def db_values(self, family: str) -> list[Any]:
        """The values of ``family``."""
        result: list[Any] = await self._query("db-values", family)
        return result

    def db_mon(self, family: str) -> None:
        """Monitors ``family``: ``db-change`` reports its contents, then every change."""
        self._call("db-mon", family, _now())
        self._schedule()

    def db_unmon(self, family: str) -> None:
        """Stops monitoring ``family``."""
        self._call("db-unmon", family, _now())
        self._schedule()

    async def _query(self, name: str, family: str) -> Any:
        query_id: str = self._call(name, family, _now())
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._db_waiters[query_id] = fut
        self._schedule()
        return await fut

    # closing

    async def close(self, timeout: float = 1.0) -> None:
        """Closes the node: sends what is queued (messages for nodes still coming up
        included, for at most ``timeout`` s), ends every connection after writing what
        it holds, closes every port and frees the engine. Idempotent."""
        if self._closing is None:
            self._closing = self._loop.create_task(self._shutdown(timeout))
        await asyncio.shield(self._closing)

    async def _shutdown(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        try:
            while self._engine is not None and self._loop.time() < deadline and (
                self._outbox or self._inputs or self._call("queued-bytes") > 0
            ):
                await asyncio.sleep(0.01)
        except ClosedError:
            pass
        self._ending = True
        for server in self._servers:
            server.close()
        for task in list(self._connecting):
            task.cancel()
        conns = list(self._conns.values())
        self._conns.clear()
        for c in conns:
            c.gone = True
            if c.transport is not None:
                c.transport.close()
        if conns:
            await asyncio.wait([c.done for c in conns],
                               timeout=max(0.0, deadline - self._loop.time()))
        for c in conns:
            c.abort()
        self._stop(None)

    def _stop(self, error: Exception | None) -> None:
        """Frees everything of the node; ``error`` when the engine failed."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        for c in list(self._conns.values()):
            c.gone = True
            c.abort()
        self._conns.clear()
        for server in self._servers:
            server.close()
        closed = ClosedError(f"node {self.id} is closed")
        for port in list(self._ports.values()):
            port._finish()
        self._ports.clear()
        pending: list[asyncio.Future[Any]] = [f for _, _, f in self._outbox]
        pending += [f for fs in self._up_waiters.values() for f in fs]
        pending += [f for fs in self._monitors.values() for f in fs]
        pending += list(self._db_waiters.values())
        self._outbox.clear()
        self._reserved.clear()
        self._up_waiters.clear()
        self._monitors.clear()
        self._db_waiters.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(closed)
        try:
            engine.free()
        except Exception:
            pass  # a failed engine may not take its resource back; the store goes anyway
        if error is not None:
            self._emit("log", "error", f"node {self.id} stopped: the engine failed: {error}")
