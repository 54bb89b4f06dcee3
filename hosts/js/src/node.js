// An AEMP node in Node.js: the engine component (transpiled by jco) does the protocol;
// this file owns sockets (net, and tls where the engine asks), time and the API.
// Randomness reaches the engine through its wasi:random import (preview2-shim, backed by
// crypto.getRandomValues).

import net from 'node:net';
import tls from 'node:tls';
import os from 'node:os';
import { EventEmitter } from 'node:events';
import { Duplex } from 'node:stream';
import { performance } from 'node:perf_hooks';
import { inspect } from 'node:util';
import * as cborg from 'cborg';
import { bigIntDecoder, bigNegIntDecoder } from 'cborg/taglib';
import { node as api } from '../gen/engine.js';

// Plain CBOR (cborg, pure JS): Uint8Array/Buffer as byte strings, strings as text,
// objects as maps.
const cbor = { encode: (value) => cborg.encode(value) };

// Every tag a peer may send: bignums (2, 3) as BigInt, epoch times (1) as Date, any other
// as the value it wraps (as the engine's JSON output drops tags).
const tags = new Proxy({}, {
  get(_, key) {
    if (typeof key !== 'string' || !/^\d+$/.test(key)) return undefined;
    if (key === '2') return bigIntDecoder;
    if (key === '3') return bigNegIntDecoder;
    if (key === '1') {
      return (decode) => {
        const t = decode();
        return typeof t === 'number' || typeof t === 'bigint' ? new Date(Number(t) * 1000) : t;
      };
    }
    return (decode) => decode();
  },
});

/** Maps become objects when every key is a string or a number (keys as text, as the
 * engine's JSON output writes them); a map with other keys stays a Map. The engine has
 * bounded the nesting, so the recursion is bounded too. */
function plain(value) {
  if (Array.isArray(value)) return value.map(plain);
  if (!(value instanceof Map)) return value;
  const entries = [...value].map(([k, v]) => [k, plain(v)]);
  return entries.every(([k]) => ['string', 'number', 'bigint'].includes(typeof k))
    ? Object.fromEntries(entries.map(([k, v]) => [String(k), v]))
    : new Map(entries);
}

/**
 * Decodes CBOR a peer sent (message arguments, reasons, database values) into JS values:
 * byte strings as Uint8Array, text as strings, maps as objects (see above), tags as above.
 * Throws on what is not CBOR.
 */
export function decodeCbor(bytes) {
  return plain(cborg.decode(bytes, { useMaps: true, tags }));
}

const now = () => BigInt(Math.floor(performance.now()));

/**
 * TLS options from an AnyEvent::MP certificate file: this node's certificate (the first),
 * its key, and every certificate of the file as a CA.
 */
export function tlsFromPem(pem) {
  const blocks = pem.match(/-----BEGIN ([A-Z ]+)-----[\s\S]+?-----END \1-----\n?/g) ?? [];
  const certs = blocks.filter((b) => b.includes('BEGIN CERTIFICATE'));
  const key = blocks.find((b) => b.includes('PRIVATE KEY'));
  if (!certs.length || !key) throw new Error('certificate file needs a certificate and a private key');
  return { cert: certs[0], key, ca: certs };
}

/** A duplex stream over `socket` that first yields `head`, then what the socket reads. */
function prefixed(socket, head) {
  const stream = new Duplex({
    read() {
      socket.resume();
    },
    write(chunk, encoding, done) {
      socket.write(chunk, encoding, done);
    },
    final(done) {
      socket.end(done);
    },
    destroy(error, done) {
      socket.destroy(error ?? undefined);
      done(error);
    },
  });
  if (head.length) stream.push(head);
  socket.on('data', (chunk) => {
    if (!stream.push(chunk)) socket.pause();
  });
  socket.on('end', () => stream.push(null));
  socket.on('error', (error) => stream.destroy(error));
  return stream;
}

/** The error of a write to an end of `duplexPair` whose other end is gone. */
const pipeClosed = () => Object.assign(new Error('the other end of the data connection is closed'), { code: 'EPIPE' });

/**
 * Two Duplex streams joined in memory as a socket pair is (the reference's data
 * connection to its own node): what one writes the other reads, a write waiting until
 * the other end reads when it holds its high-water mark; one end's `end()` is the other's
 * end of data, and a destroyed end ends the other's reading and fails its writes.
 */
function duplexPair() {
  const held = [null, null]; // each end's write callback, waiting for the other to read
  const ends = [0, 1].map((i) => new Duplex({
    read() {
      const done = held[1 - i];
      held[1 - i] = null;
      done?.();
    },
    write(chunk, encoding, done) {
      const other = ends[1 - i];
      if (other.destroyed) done(pipeClosed());
      else if (other.push(chunk)) done();
      else held[i] = done;
    },
    final(done) {
      if (!ends[1 - i].destroyed) ends[1 - i].push(null);
      done();
    },
    destroy(error, done) {
      const other = ends[1 - i];
      const waiting = held[1 - i];
      held[1 - i] = null;
      waiting?.(pipeClosed());
      if (!other.destroyed) other.push(null);
      done(error);
    },
  }));
  return ends;
}

/** The host's limits, as `Node.start` options, with their defaults. */
const defaultLimits = {
  /** Messages a port holds before no connection reads on. */
  portCapacity: 1024,
  /** Bytes a port holds before no connection reads on (an empty port takes one message
   * of any size). */
  portBytes: 16 * 1024 * 1024,
  /** A full port that takes nothing this long is stalled (see `Port`). */
  portStallMs: 10000,
  /** Bytes waiting to be written to one connection before it is closed. */
  maxWriteQueue: 64 * 1024 * 1024,
  /** Bytes waiting to be written to all connections together before the one holding the
   * most is closed. */
  maxWriteTotal: 128 * 1024 * 1024,
  /** What `close()` waits for queued writes by default. */
  closeTimeoutMs: 1000,
  /** Incoming data connections a `handleDataConnections` handle holds not taken yet. */
  dataConnCapacity: 64,
};

/** Bytes waiting to be written to a node's connection past which sends to that node
 * wait (`send` returns false): far more than a socket buffer, so a fast peer's pipe stays
 * full, and little enough that a slow peer holds back only the sends to it. */
const HIGH_WATER = 1024 * 1024;

/** What a message costs a port's byte bound: its encoding and what holding it takes. */
const messageCost = (encoded) => encoded.length + 32;

/** The node of a port id (`NODE#NAME`, or a bare node id for its node port). */
const nodeOf = (portId) => {
  const at = portId.indexOf('#');
  return at < 0 ? portId : portId.slice(0, at);
};

const utf8Encoder = new TextEncoder();

/** Encoded `[portId, args]` pairs (port id bytes, CBOR array of arguments) as the
 * engine's `batch`: one buffer, with two lengths per message. */
function toBatch(parts) {
  const data = new Uint8Array(parts.reduce((n, [p, a]) => n + p.length + a.length, 0));
  const sizes = new Uint32Array(2 * parts.length);
  let at = 0;
  parts.forEach(([p, a], i) => {
    data.set(p, at);
    data.set(a, at + p.length);
    at += p.length + a.length;
    sizes[2 * i] = p.length;
    sizes[2 * i + 1] = a.length;
  });
  return { data, sizes };
}

/** How long a connection the engine closes may take to write what is queued for it. */
const LINGER_MS = 1000;

const dispose = Symbol.dispose ?? Symbol.for('dispose');
const asyncDispose = Symbol.asyncDispose ?? Symbol.for('asyncDispose');

// What Node and Port say to each other, out of the public API's reach.
const deliver = Symbol('deliver');
const room = Symbol('room');
const blocks = Symbol('blocks');
const release = Symbol('release');
const finish = Symbol('finish');
const offer = Symbol('offer');
const unhandle = Symbol('unhandle');
/** The kill reason's first word when the engine fails a data connection (the
 * reference's package name). */
const DATA_CONN_TAG = 'AnyEvent::MP::DataConn';
const EMPTY_ARRAY = cborg.encode([]);

/**
 * An error of this node. `code`: `CLOSED` (the node is closed or closing), `STOPPED` (the
 * engine failed and the node stopped; `cause` says why), `REFUSED` (the engine refused
 * the call: an invalid port id, a full queue, a name already taken, ...), `PORT_FULL` (a
 * local port already holds `portCapacity` messages or `portBytes` bytes), `CONFIG`
 * (invalid options), `BIND`
 * (a listener could not bind; `cause` is the socket error), `TIMEOUT`, `DECODE` (the
 * answer to a database query could not be decoded), `DATA_CONN` (a data connection
 * failed: the message is the reference's, e.g. `NODE: unable to establish connection
 * within N seconds`). A `REFUSED` error has `kind`, the
 * engine's refusal kind (`invalid-port-id`, `port-exists`, `queue-full`,
 * `budget-exhausted`, `too-large`, `too-deep`, `not-an-array`, `malformed`, `not-json`,
 * ...). For `send` and `sendBatch`, `sent` is how many messages of the batch went out
 * before the refusal.
 */
export class AempError extends Error {
  constructor(code, message, { cause, sent, kind } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'AempError';
    this.code = code;
    if (kind !== undefined) this.kind = kind;
    if (sent !== undefined) this.sent = sent;
  }
}

/** The error of a `dataConnect` whose port died with `reason`: the engine's
 * `[AnyEvent::MP::DataConn, MESSAGE]`, or whatever a peer that killed the port gave. */
function dataConnError(reason) {
  const message = reason[0] === DATA_CONN_TAG && typeof reason[1] === 'string'
    ? reason[1]
    : `data connection port killed: ${inspect(reason)}`;
  return new AempError('DATA_CONN', message);
}

/** `host:port` (the host possibly in brackets) as [host, port]. */
function splitAddr(addr) {
  const at = addr.lastIndexOf(':');
  const host = addr.slice(0, at).replace(/^\[(.*)\]$/, '$1');
  return [host, Number(addr.slice(at + 1))];
}

/**
 * What a port and a data connection handle share: an async iterator that `break` out of
 * `for await` and `await using` close (with the subclass's `close()`).
 */
class Closable {
  /** The iterator protocol's end (a `break` out of `for await`): closes it. */
  return(value) {
    this.close();
    return Promise.resolve({ value, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** `await using x = ...` closes it at the end of the scope. */
  async [asyncDispose]() {
    this.close();
  }
}

/**
 * A local port: an async iterator of the argument arrays sent to it, in order. Leaving a
 * `for await` loop (`break`, `return`, a throw) kills the port, as `close()` does.
 *
 * It holds at most `portCapacity` messages and `portBytes` bytes nobody has taken yet
 * (plus what the read that filled it carried; an empty port takes one message of any
 * size); while it is full no connection of the node reads on, so senders wait (TCP
 * backpressure). A full port that takes nothing for `portStallMs` is stalled: what it
 * holds past its bounds is dropped with a warning, and messages that find it full are
 * dropped, until it takes one again, so one port nobody reads cannot stop the node.
 */
export class Port extends Closable {
  #node;
  #queue = [];
  #waiters = [];
  #closed = false;
  #capacity;
  #capacityBytes;
  #bytes = 0; // the cost of what #queue holds
  #stallMs;
  #stalled = false;
  #stallTimer = null;

  constructor(node, id, capacity, capacityBytes, stallMs) {
    super();
    this.#node = node;
    this.#capacity = capacity;
    this.#capacityBytes = capacityBytes;
    this.#stallMs = stallMs;
    /** The port id, `NODE#NAME`. */
    this.id = id;
  }

  /** The node this port belongs to. */
  get node() {
    return this.#node;
  }

  /** Messages received and not taken yet. */
  get pending() {
    return this.#queue.length;
  }

  /** What the messages not taken yet cost the port's byte bound (`portBytes`): their
   * encoded size and 32 bytes each. */
  get pendingBytes() {
    return this.#bytes;
  }

  /** Whether the port is closed (killed, or its node closed). */
  get closed() {
    return this.#closed;
  }

  /** Room for `count` more messages costing `bytes` from this node's application. */
  [room](count, bytes) {
    if (this.#queue.length + count > this.#capacity) return false;
    return this.#bytes + bytes <= this.#capacityBytes || (this.#queue.length === 0 && count === 1);
  }

  #full() {
    return this.#queue.length >= this.#capacity || this.#bytes >= this.#capacityBytes;
  }

  [deliver](args, cost) {
    if (this.#closed) return;
    const waiter = this.#waiters.shift();
    if (waiter) {
      waiter({ value: args, done: false });
      return;
    }
    if (this.#stalled && this.#full()) return;
    this.#queue.push({ args, cost });
    this.#bytes += cost;
    this.#update();
  }

  /** Tells the node whether this port holds reading back, and arms the stall timer. */
  #update() {
    const full = !this.#closed && !this.#stalled && this.#full();
    if (full && !this.#stallTimer) {
      this.#stallTimer = setTimeout(() => this.#stall(), this.#stallMs);
      this.#stallTimer.unref();
    } else if (!full && this.#stallTimer) {
      clearTimeout(this.#stallTimer);
      this.#stallTimer = null;
    }
    this.#node[blocks](this, full);
  }

  #stall() {
    this.#stallTimer = null;
    this.#stalled = true;
    // Keep the oldest messages that fit the bounds (at least one).
    let keep = 0;
    let bytes = 0;
    while (keep < this.#queue.length && keep < this.#capacity
      && (keep === 0 || bytes + this.#queue[keep].cost <= this.#capacityBytes)) {
      bytes += this.#queue[keep].cost;
      keep += 1;
    }
    const dropped = this.#queue.splice(keep).length;
    this.#bytes = bytes;
    this.#node.emit('log', 'warn', `port ${this.id} took no message for ${this.#stallMs} ms: dropped ${dropped} messages for it`);
    this.#update();
  }

  /** Ends the iteration: no more messages, waiting `next()` calls resolve as done. */
  [finish]() {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue = [];
    this.#bytes = 0;
    this.#update();
    for (const waiter of this.#waiters.splice(0)) waiter({ value: undefined, done: true });
  }

  /** The next message's arguments (undefined once the port is closed). */
  async recv() {
    const { value } = await this.next();
    return value;
  }

  /** The iterator protocol: the next message, or `done` once the port is closed. */
  next() {
    if (this.#queue.length) {
      const { args: value, cost } = this.#queue.shift();
      this.#bytes -= cost;
      this.#stalled = false;
      this.#stallTimer?.refresh();
      this.#update();
      return Promise.resolve({ value, done: false });
    }
    if (this.#closed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  /** Kills the port: monitors fire with an empty reason. Does nothing when closed. */
  close() {
    this.kill();
  }

  /** Kills the port with `reason` (what monitors receive). Does nothing when closed. */
  kill(...reason) {
    if (this.#closed) return;
    this[finish]();
    this.#node[release](this, reason);
  }
}

/**
 * The incoming data connections for one data handler name (`handleDataConnections`): an
 * async iterator of `{ stream, node, id, args }`, in arrival order. It holds at most
 * `dataConnCapacity` connections nobody has taken yet; one that finds it full, or comes
 * after `close()`, is closed with a warning. Leaving a `for await` loop closes it, as
 * `close()` does.
 */
export class DataConnections extends Closable {
  #node;
  #queue = [];
  #waiters = [];
  #closed = false;
  #capacity;

  constructor(node, name, capacity) {
    super();
    this.#node = node;
    this.#capacity = capacity;
    /** The data handler name other nodes ask for. */
    this.name = name;
  }

  /** Connections received and not taken yet. */
  get pending() {
    return this.#queue.length;
  }

  /** Whether it is closed (by `close()`, or its node closed). */
  get closed() {
    return this.#closed;
  }

  /** Takes `conn` if it is open and has room; false otherwise (the caller closes it). */
  [offer](conn) {
    if (this.#closed) return false;
    const waiter = this.#waiters.shift();
    if (waiter) {
      waiter({ value: conn, done: false });
      return true;
    }
    if (this.#queue.length >= this.#capacity) return false;
    this.#queue.push(conn);
    return true;
  }

  /** Ends the iteration: queued connections go to `heir` (a new handle for the name) or
   * are closed, waiting `next()` calls resolve as done. */
  [finish](heir = undefined) {
    if (this.#closed) return;
    this.#closed = true;
    for (const conn of this.#queue.splice(0)) if (!heir?.[offer](conn)) conn.stream.destroy();
    for (const waiter of this.#waiters.splice(0)) waiter({ value: undefined, done: true });
  }

  /** The iterator protocol: the next connection, or `done` once closed. */
  next() {
    // One that failed while it waited (the peer reset it) is of no use to anyone.
    while (this.#queue.length) {
      const value = this.#queue.shift();
      if (!value.stream.destroyed) return Promise.resolve({ value, done: false });
    }
    if (this.#closed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  /** Stops taking connections for this name; the queued ones are closed. Does nothing
   * when closed. */
  close() {
    if (this.#closed) return;
    this[finish]();
    this.#node[unhandle](this);
  }
}

/**
 * A running node. Events: 'node-up' (node), 'node-down' (node, reason), 'port-down'
 * (port, reason) for monitored ports, 'request' (node, tag, args) for node-port requests
 * with a tag registered by `handleRequests`, 'db-change' (family, set, del) for monitored
 * database families (`set` an object of new or changed keys, `del` an array of deleted
 * keys; the first report holds the whole family), 'drain' when no connection has more
 * queued than its socket's high-water mark any more (after `send` returned false; to wait
 * for one destination only, await `ready(portId)`),
 * 'log' (level, message), 'close' (error, when the engine failed) once the node is closed.
 * A listener that throws does not disturb the node: its error is rethrown on the next tick.
 */
export class Node extends EventEmitter {
  #engine;
  #conns = new Map(); // conn id (string) -> { conn, socket, writeBlocked, writeTimer, written, counted }
  #upConns = new Map(); // node id -> conn id (string) of its working connection
  #counted = 0; // the connections' `counted` bytes together: their unwritten bytes, or more
  #readyWaiters = new Set(); // { node, resolve, reject } of `ready` calls
  #connecting = new Set(); // sockets still connecting
  #ports = new Map(); // port id -> Port
  #servers = [];
  #timer = null;
  #tls; // tls.SecureContext when configured
  #limits;
  #writeTimeoutMs;
  #dbWaiters = new Map(); // database query id -> { resolve, reject }
  #dataRequests = new Map(); // port id -> { resolve, reject } of a `dataConnect` call
  #dataHandles = new Map(); // data handler name -> DataConnections
  #selfDataConns = 0; // data connections made to this node itself, for their ids
  #blocking = new Set(); // full ports holding reading back
  #writeBlocked = 0; // connections whose socket said "wait for drain"
  #state = 'running';
  /** Set by `close()` while messages still wait for nodes coming up. */
  #draining = false;
  #flushing = false;
  #closing = null;

  /**
   * Starts a node. Options: nodeId (default `<hostname>/`; %n, %u and a trailing / are
   * expanded), secret, framings (['cbor', 'json']), binds (['127.0.0.1:4040', ...]),
   * seeds, tls ({ cert, key, ca } PEM strings: TLS with mandatory certificates from that CA,
   * no host-name check), monitorTimeoutMs, keepaliveIntervalMs, connectIntervalMs,
   * maxQueueBytes, maxBufferedBytes, maxHandshakes (the engine's), and the host's limits:
   * portCapacity (1024), portBytes (16 MiB), portStallMs (10000), maxWriteQueue (64 MiB),
   * maxWriteTotal (128 MiB), writeTimeoutMs (monitorTimeoutMs, 30000), closeTimeoutMs
   * (1000), dataConnCapacity (64).
   */
  static async start(options = {}) {
    const node = new Node(options);
    try {
      await node.#listen(options.binds ?? []);
    } catch (e) {
      await node.close();
      throw e;
    }
    return node;
  }

  constructor(options = {}) {
    super();
    this.#limits = { ...defaultLimits };
    for (const key of Object.keys(defaultLimits)) {
      if (options[key] === undefined) continue;
      if (!Number.isSafeInteger(options[key]) || options[key] < 1) {
        throw new AempError('CONFIG', `${key} must be a positive integer`);
      }
      this.#limits[key] = options[key];
    }
    if (options.writeTimeoutMs !== undefined && !(options.writeTimeoutMs > 0)) {
      throw new AempError('CONFIG', 'writeTimeoutMs must be positive');
    }
    try {
      // Made once, so a bad certificate or key fails here, not at the first TLS peer.
      // A session id context, as tls.Server sets one: without it a server that asks for
      // certificates fails the handshake of a peer that offers to resume an earlier
      // session (rustls does, on a node's second connection: a data connection).
      this.#tls = options.tls && tls.createSecureContext({ ...options.tls, sessionIdContext: 'aemp-js' });
    } catch (e) {
      throw new AempError('CONFIG', `invalid TLS options: ${e.message}`, { cause: e });
    }
    const hostname = os.hostname();
    try {
      const id = api.expandNodeId(options.nodeId ?? `${hostname}/`, hostname);
      const config = api.defaultNodeConfig(id);
      const transport = config.transport;
      if (options.secret !== undefined) transport.secret = new TextEncoder().encode(options.secret);
      if (options.framings) transport.framings = options.framings;
      if (options.monitorTimeoutMs) transport.monitorTimeoutMs = BigInt(options.monitorTimeoutMs);
      if (options.keepaliveIntervalMs) transport.keepaliveIntervalMs = BigInt(options.keepaliveIntervalMs);
      for (const key of ['connectIntervalMs', 'maxQueueBytes', 'maxBufferedBytes']) {
        if (options[key] !== undefined) config[key] = BigInt(options[key]);
      }
      if (options.maxHandshakes !== undefined) config.maxHandshakes = options.maxHandshakes;
      transport.tls = Boolean(options.tls);
      config.seeds = options.seeds ?? [];
      config.wallClockOffsetMs = BigInt(Date.now()) - now();
      this.#writeTimeoutMs = options.writeTimeoutMs ?? Number(transport.monitorTimeoutMs);
      this.#engine = api.Node.create(config, now());
      /** This node's id. */
      this.id = id;
    } catch (e) {
      if (e instanceof AempError) throw e;
      throw new AempError('CONFIG', `invalid node options: ${e.payload?.message ?? e.message}`, { cause: e });
    }
    /** The addresses this node listens on. */
    this.listenAddrs = [];
    this.#flush();
  }

  /** `running`, `closing`, `closed`, or `stopped` (the engine failed). */
  get state() {
    return this.#draining && this.#state === 'running' ? 'closing' : this.#state;
  }

  async #listen(binds) {
    for (const bind of binds) {
      const [host, port] = splitAddr(bind);
      const server = net.createServer((socket) => this.#accepted(socket));
      this.#servers.push(server);
      await new Promise((resolve, reject) => {
        server.once('error', (e) => reject(new AempError('BIND', `cannot listen on ${bind}: ${e.message}`, { cause: e })));
        server.listen(port || 0, host === '*' ? '0.0.0.0' : host, resolve);
      });
      // Accept errors (out of files, ...) come here; the listener keeps listening.
      server.removeAllListeners('error').on('error', (e) => this.#emitSafe('log', 'warn', `accept failed: ${e.message}`));
      const a = server.address();
      this.listenAddrs.push(`${a.address}:${a.port}`);
    }
    if (this.listenAddrs.length) this.#run(() => this.#engine.setBinds(this.listenAddrs, now()));
  }

  #accepted(socket) {
    if (this.#state !== 'running') {
      socket.destroy();
      return;
    }
    socket.on('error', () => undefined); // until attached: an early reset must not throw
    this.#guard(() => this.#attach(this.#engine.handleAccept(`${socket.remoteAddress}:${socket.remotePort}`, now()), socket));
  }

  #attach(conn, socket) {
    const key = String(conn);
    const c = { conn, socket, writeBlocked: false, writeTimer: null, written: 0, counted: 0 };
    socket.setNoDelay(true);
    socket.setKeepAlive(true);
    this.#conns.set(key, c);
    if (this.#blocking.size) socket.pause();
    const mine = () => this.#state === 'running' && this.#conns.get(key) === c;
    // Kept so that a data connection's hand-over removes exactly these.
    c.listeners = {
      data: (data) => {
        if (mine()) this.#guard(() => this.#engine.handleInput(conn, data, now()));
      },
      end: () => {
        if (!mine()) return;
        this.#forget(c);
        this.#guard(() => this.#engine.handleEof(conn, now()));
      },
      error: (e) => {
        if (!mine()) return;
        this.#drop(c, e.message);
      },
      drain: () => {
        if (this.#conns.get(key) === c) this.#drained(c);
      },
    };
    for (const [event, listener] of Object.entries(c.listeners)) socket.on(event, listener);
  }

  /** The connection is no longer ours: no more input from it, no more writes to it. */
  #forget(c) {
    this.#conns.delete(String(c.conn));
    this.#counted -= c.counted;
    c.counted = 0;
    clearTimeout(c.writeTimer);
    if (c.writeBlocked) {
      c.writeBlocked = false;
      this.#writeBlocked -= 1;
      if (!this.#writeBlocked) this.#emitSafe('drain');
    }
    this.#wakeReady();
  }

  /** Closes a connection the host gave up on, telling the engine why. */
  #drop(c, reason) {
    this.#forget(c);
    c.socket.destroy();
    this.#guard(() => this.#engine.handleConnError(c.conn, reason, now()));
  }

  /** Writes to a connection. A socket that asks to wait stops reading too, so a peer that
   * does not read what we answer cannot make us queue more answers. */
  #write(c, bytes) {
    const { socket } = c;
    if (!socket.write(bytes) && !c.writeBlocked) {
      c.writeBlocked = true;
      this.#writeBlocked += 1;
      socket.pause();
      c.written = socket.bytesWritten - socket.writableLength;
      c.writeTimer = setTimeout(() => this.#writeCheck(c), this.#writeTimeoutMs);
      c.writeTimer.unref();
    }
    if (socket.writableLength > this.#limits.maxWriteQueue) {
      this.#drop(c, `peer does not read: more than ${this.#limits.maxWriteQueue} bytes waiting`);
      return;
    }
    this.#counted += socket.writableLength - c.counted;
    c.counted = socket.writableLength;
    while (this.#counted > this.#limits.maxWriteTotal && this.#recount() > this.#limits.maxWriteTotal) {
      let most = null;
      for (const other of this.#conns.values()) if (!most || other.counted > most.counted) most = other;
      this.#drop(most, `peer does not read: the node's connections have more than ${this.#limits.maxWriteTotal} bytes waiting, this one the most`);
    }
  }

  /** Counts every connection's unwritten bytes again (`counted` only grows between
   * writes and drains, as sockets write in the background); returns the total. */
  #recount() {
    this.#counted = 0;
    for (const c of this.#conns.values()) {
      c.counted = c.socket.writableLength;
      this.#counted += c.counted;
    }
    return this.#counted;
  }

  /** Whether all connections together have more than half of `maxWriteTotal` waiting:
   * then sends to every node wait. */
  #allBehind() {
    const half = this.#limits.maxWriteTotal / 2;
    return this.#counted > half && this.#recount() > half;
  }

  /** Whether `node`'s connection has more than `HIGH_WATER` waiting. */
  #connBehind(node) {
    const c = this.#conns.get(this.#upConns.get(node));
    return c !== undefined && c.socket.writableLength > HIGH_WATER;
  }

  /** Whether sends to `node` should wait (see `send`). */
  #behind(node) {
    return this.#connBehind(node) || this.#allBehind();
  }

  /** Resolves the `ready` calls whose node no longer has to wait. */
  #wakeReady() {
    if (!this.#readyWaiters.size) return;
    const allBehind = this.#state === 'running' && this.#allBehind();
    for (const w of this.#readyWaiters) {
      if (this.#state !== 'running' || !(allBehind || this.#connBehind(w.node))) {
        this.#readyWaiters.delete(w);
        if (this.#state === 'running') w.resolve();
        else w.reject(this.#closedError());
      }
    }
  }

  /** A connection waiting for 'drain' must have written something since the last check. */
  #writeCheck(c) {
    const written = c.socket.bytesWritten - c.socket.writableLength;
    if (written > c.written) {
      c.written = written;
      c.writeTimer.refresh();
    } else {
      this.#drop(c, `peer does not read: nothing written for ${this.#writeTimeoutMs} ms`);
    }
  }

  #drained(c) {
    this.#counted -= c.counted - c.socket.writableLength;
    c.counted = c.socket.writableLength;
    if (!c.writeBlocked) return;
    c.writeBlocked = false;
    clearTimeout(c.writeTimer);
    this.#writeBlocked -= 1;
    if (!this.#blocking.size) c.socket.resume();
    if (!this.#writeBlocked) this.#emitSafe('drain');
    this.#wakeReady();
  }

  /** A port became full (`full`) or has room again: no connection reads while one is full. */
  [blocks](port, full) {
    const before = this.#blocking.size;
    if (full) this.#blocking.add(port);
    else this.#blocking.delete(port);
    if (!before === !this.#blocking.size) return;
    for (const c of this.#conns.values()) {
      if (this.#blocking.size) c.socket.pause();
      else if (!c.writeBlocked) c.socket.resume();
    }
  }

  #startTls(conn, role, leftover) {
    const c = this.#conns.get(String(conn));
    if (!c) return;
    const raw = c.socket;
    if (!this.#tls) {
      this.#drop(c, 'TLS requested but no certificate configured');
      return;
    }
    this.#forget(c);
    raw.removeAllListeners('data').removeAllListeners('end').removeAllListeners('error').removeAllListeners('drain');
    raw.on('error', () => undefined); // the TLS socket reports what fails below it
    // The TLS socket decides when to end writing: the peer's end must not end it below
    // (a data connection writes on after it).
    raw.allowHalfOpen = true;
    // Bytes the engine read past the greeting are TLS records: TLS must read them first.
    // A TLSSocket over a net.Socket reads from its handle, past anything unshifted onto
    // the stream, so such bytes go through a stream that yields them before the socket's.
    const transport = leftover.length ? prefixed(raw, Buffer.from(leftover)) : raw;
    const options = {
      secureContext: this.#tls,
      requestCert: true,
      rejectUnauthorized: true,
      checkServerIdentity: () => undefined, // nodes are named by node id, not DNS
    };
    const secure = role === 'client'
      ? tls.connect({ socket: transport, ...options })
      : new tls.TLSSocket(transport, { isServer: true, ...options });
    this.#attach(conn, secure);
  }

  /** Peer data decoded, or undefined (with a log line) when it cannot be: never a throw
   * from inside a socket handler, which would end the process. */
  #decode(bytes, what) {
    try {
      return decodeCbor(bytes);
    } catch (e) {
      this.#emitSafe('log', 'warn', `${what} dropped: ${e.message}`);
      return undefined;
    }
  }

  /** Emits an event; a listener's throw is rethrown on the next tick, so it still reaches
   * the process as an uncaught error but cannot leave the node half way through outputs. */
  #emitSafe(event, ...args) {
    try {
      this.emit(event, ...args);
    } catch (e) {
      process.nextTick(() => {
        throw e;
      });
    }
  }

  /** Runs engine input from a socket or timer: the node stops if the engine fails. */
  #guard(fn) {
    if (this.#state !== 'running') return;
    try {
      fn();
      this.#flush();
    } catch (e) {
      this.#stop(e);
    }
  }

  /** Runs an application call into the engine: refusals become `REFUSED` errors, a
   * failed engine stops the node. */
  #run(fn) {
    if (this.#state !== 'running') throw this.#closedError();
    let result;
    try {
      result = fn();
    } catch (e) {
      if (e !== null && typeof e === 'object' && Object.hasOwn(e, 'payload')) {
        const { payload } = e;
        throw new AempError('REFUSED', payload.message, { kind: payload.kind, sent: payload.index });
      }
      // An argument of the wrong type fails before the engine runs: it is unharmed.
      if (!(e instanceof WebAssembly.RuntimeError)) throw e;
      this.#stop(e);
      throw this.#closedError();
    }
    try {
      this.#flush();
    } catch (e) {
      this.#stop(e);
      throw this.#closedError();
    }
    return result;
  }

  #closedError() {
    return this.#state === 'stopped'
      ? new AempError('STOPPED', `node ${this.id} stopped: the engine failed`, { cause: this.stoppedBy })
      : new AempError('CLOSED', `node ${this.id} is closed`);
  }

  /** Acts on everything the engine has to say, then re-arms its timer. Outputs are taken
   * in order: a call made from an event listener adds its outputs to this loop. */
  #flush() {
    if (this.#flushing || this.#state !== 'running') return;
    this.#flushing = true;
    try {
      for (;;) {
        const outputs = this.#engine.pollOutputs();
        if (!outputs.length) break;
        for (const { tag, val } of outputs) {
          if (this.#state !== 'running') return;
          this.#output(tag, val);
        }
      }
    } finally {
      this.#flushing = false;
    }
    clearTimeout(this.#timer);
    const at = this.#engine.pollTimeout();
    if (at !== undefined) {
      const delay = Math.max(0, Number(at - now()));
      this.#timer = setTimeout(() => this.#guard(() => this.#engine.handleTimeout(now())), delay);
      this.#timer.unref();
    }
  }

  #output(tag, val) {
    switch (tag) {
      case 'transmit': {
        const c = this.#conns.get(String(val.conn));
        if (c) this.#write(c, val.bytes);
        break;
      }
      case 'connect':
        this.#connect(val.conn, val.addr);
        break;
      case 'start-tls':
        this.#startTls(val.conn, val.role, val.leftover);
        break;
      case 'close': {
        const c = this.#conns.get(String(val.conn));
        if (!c) break;
        this.#forget(c);
        c.socket.end();
        setTimeout(() => c.socket.destroy(), LINGER_MS).unref();
        break;
      }
      case 'deliver': {
        // Messages for one port: each message's arguments one after another, `sizes`
        // giving their lengths.
        const port = this.#ports.get(val.port);
        if (!port) break;
        const { data, sizes } = val;
        let at = 0;
        for (const size of sizes) {
          const raw = data.subarray(at, at + size);
          at += size;
          const args = this.#decode(raw, `message for ${val.port}`);
          if (args !== undefined) port[deliver](args, messageCost(raw));
        }
        break;
      }
      case 'node-up':
        this.#upConns.set(val.node, String(val.conn));
        this.#emitSafe('node-up', val.node);
        break;
      case 'node-down':
        this.#upConns.delete(val.node);
        this.#wakeReady();
        this.#emitSafe('node-down', val.node, val.reason);
        break;
      case 'port-down': {
        const reason = this.#decode(val.reason, 'reason') ?? [];
        const request = this.#dataRequests.get(val.port);
        if (request) {
          // The engine killed a `dataConnect` port: that request failed.
          this.#dataRequests.delete(val.port);
          request.reject(dataConnError(reason));
        } else {
          this.#emitSafe('port-down', val.port, reason);
        }
        break;
      }
      case 'request': {
        // `[NODE, ARGS...]`
        const message = this.#decode(val.message, `request ${val.tag}`);
        if (Array.isArray(message) && typeof message[0] === 'string') {
          this.#emitSafe('request', message[0], val.tag, message.slice(1));
        }
        break;
      }
      case 'db-reply': {
        const waiter = this.#dbWaiters.get(val.id);
        this.#dbWaiters.delete(val.id);
        if (!waiter) break;
        try {
          waiter.resolve(decodeCbor(val.result));
        } catch (e) {
          waiter.reject(new AempError('DECODE', `database reply not decodable: ${e.message}`, { cause: e }));
        }
        break;
      }
      case 'db-change': {
        // `[SET, DEL]`
        const [set, del] = this.#decode(val.change, 'database change') ?? [];
        this.#emitSafe('db-change', val.family, set ?? {}, Array.isArray(del) ? del : []);
        break;
      }
      case 'log':
        this.#emitSafe('log', val.level, val.message);
        break;
      case 'data-connection':
        this.#dataConnection(val.conn, val.setup, val.leftover);
        break;
      default:
        this.#emitSafe('log', 'debug', `engine output ${tag} not understood by this host`);
        break;
    }
  }

  /** The engine handed connection `conn` over as a data connection: its socket leaves
   * the node's tables and goes, as a stream, to the `dataConnect` call that asked for it
   * or to the handle of its data handler. */
  #dataConnection(conn, setup, leftover) {
    const c = this.#conns.get(String(conn));
    let stream;
    if (c) {
      this.#forget(c);
      const { socket } = c;
      for (const [event, listener] of Object.entries(c.listeners)) socket.off(event, listener);
      // Nothing is read until the application reads. Every byte the host read went to
      // the engine at once, so what follows the handshake is `leftover`, then what the
      // socket has not emitted yet; what the engine wrote last (its handshake lines) is
      // in the socket's buffer already, before anything the application writes.
      socket.pause();
      // Each side ends its own writing: the peer's end must not end ours.
      socket.allowHalfOpen = true;
      stream = prefixed(socket, Buffer.from(leftover));
    }
    const fields = this.#decode(setup, 'data connection setup');
    if (!Array.isArray(fields) || fields.length < 6) {
      stream?.destroy();
      return;
    }
    const [id, node, port, handler, args, requested] = fields;
    // The application reads errors from the stream as usual; this listener only keeps a
    // peer's reset from throwing when it has none.
    stream?.on('error', (e) => this.#emitSafe('log', 'debug', `data connection ${id} with ${node}: ${e.message}`));
    if (requested) {
      const request = this.#dataRequests.get(port);
      if (!request) {
        // Its port was killed meanwhile (by a peer that knew it): nobody waits for it.
        this.#emitSafe('log', 'warn', `data connection ${id} with ${node}: its request is gone, closed`);
        stream?.destroy();
        return;
      }
      this.#dataRequests.delete(port);
      this.#freePort(port);
      if (stream) request.resolve(stream);
      else request.reject(new AempError('DATA_CONN', `data connection ${id} with ${node}: the connection was gone at its hand-over`));
      return;
    }
    if (!stream) return;
    const handle = this.#dataHandles.get(handler);
    const taken = handle?.[offer]({ stream, node, id, args: Array.isArray(args) ? args : [] });
    if (!taken) {
      const why = handle ? `${handle.pending} waiting to be taken already` : 'nothing handles it';
      this.#emitSafe('log', 'warn', `data connection ${id} from ${node} for handler ${handler}: ${why}, closed`);
      stream.destroy();
    }
  }

  /** Frees the port of a `dataConnect` call: unmonitored first, so no 'port-down'
   * follows. Both calls are on a live local port: there is nothing to refuse. */
  #freePort(port) {
    this.#engine.unmonitor(port, now());
    this.#engine.kill(port, EMPTY_ARRAY, now());
  }

  /** Dials `addr` for the engine's connection `conn`. Addresses come from peers (through
   * the database), so a malformed one fails that connection only. */
  #connect(conn, addr) {
    const [host, port] = splitAddr(addr);
    let socket;
    try {
      socket = net.connect(port, host);
    } catch (e) {
      this.#engine.handleConnectFailed(conn, e.message, now());
      return;
    }
    this.#connecting.add(socket);
    socket.once('connect', () => {
      this.#connecting.delete(socket);
      socket.removeAllListeners('error');
      if (this.#state !== 'running') {
        socket.destroy();
        return;
      }
      this.#guard(() => {
        this.#attach(conn, socket);
        this.#engine.handleConnected(conn, now());
      });
    });
    socket.once('error', (e) => {
      this.#connecting.delete(socket);
      this.#guard(() => this.#engine.handleConnectFailed(conn, e.message, now()));
    });
  }

  /** A new local port (with `name`, else a fresh unique one). */
  port(name) {
    const id = this.#run(() => (name === undefined ? this.#engine.newPort() : this.#engine.registerPort(name)));
    const port = new Port(this, id, this.#limits.portCapacity, this.#limits.portBytes, this.#limits.portStallMs);
    this.#ports.set(id, port);
    return port;
  }

  /**
   * Sends the remaining arguments as a message to `portId`. Returns false when sends to
   * its node should wait: its connection has more than 1 MiB waiting to be written, or
   * all connections together more than half of `maxWriteTotal` (await `ready(portId)`, or
   * the 'drain' event, before sending it more); else true. Sends to other nodes go on.
   * Throws `AempError` (REFUSED, PORT_FULL, CLOSED, STOPPED).
   */
  send(portId, ...args) {
    return this.sendBatch([[portId, args]]);
  }

  /**
   * Sends `[portId, args]` pairs in order; on a refusal the error's `sent` says how many
   * went out. Returns as `send` does.
   */
  sendBatch(messages) {
    const parts = messages.map(([portId, args]) => [utf8Encoder.encode(portId), cbor.encode(args)]);
    // A local port takes no more than its bounds from the application.
    const taken = new Map(); // port -> [count, bytes]
    let fits = messages.length;
    for (const [i, [portId]] of messages.entries()) {
      const port = this.#ports.get(portId);
      if (!port) continue;
      const [count, bytes] = taken.get(port) ?? [0, 0];
      const more = [count + 1, bytes + messageCost(parts[i][1])];
      taken.set(port, more);
      if (!port[room](...more)) {
        fits = i;
        break;
      }
    }
    if (fits > 0) this.#run(() => this.#engine.send(toBatch(parts.slice(0, fits)), now()));
    if (fits < messages.length) {
      const portId = messages[fits][0];
      const { portCapacity, portBytes } = this.#limits;
      throw new AempError('PORT_FULL', `port ${portId} is full (${portCapacity} messages or ${portBytes} bytes waiting)`, { sent: fits });
    }
    const nodes = new Set(messages.map(([portId]) => nodeOf(portId)));
    return !this.#allBehind() && ![...nodes].some((node) => this.#connBehind(node));
  }

  /**
   * Resolves when a send to `portId` would not have to wait (see `send`): at once when
   * it would not now, else once its node's connection has written what it holds (or is
   * gone). Rejects (CLOSED, STOPPED) when this node closes first.
   */
  ready(portId) {
    if (this.#state !== 'running') return Promise.reject(this.#closedError());
    const node = nodeOf(portId);
    if (!this.#behind(node)) return Promise.resolve();
    return new Promise((resolve, reject) => this.#readyWaiters.add({ node, resolve, reject }));
  }

  /** Kills a port (local or remote) with `reason` (what its monitors receive). */
  kill(portId, ...reason) {
    const port = this.#ports.get(portId);
    if (port) port.kill(...reason);
    else this.#run(() => this.#engine.kill(portId, cbor.encode(reason), now()));
  }

  [release](port, reason) {
    this.#ports.delete(port.id);
    if (this.#state === 'running') this.#run(() => this.#engine.kill(port.id, cbor.encode(reason), now()));
  }

  /** Monitors a port: 'port-down' fires when it dies. */
  monitor(portId) {
    this.#run(() => this.#engine.monitor(portId, now()));
  }

  /** Stops monitoring a port. */
  unmonitor(portId) {
    this.#run(() => this.#engine.unmonitor(portId, now()));
  }

  /** Node-port requests tagged `tag` (a message `[tag, ...args]` to `NODE#`) come to this
   * application as 'request' events instead of being refused. */
  handleRequests(tag) {
    this.#run(() => this.#engine.registerHandler(tag));
  }

  /**
   * Asks `node` for a data connection (AnyEvent::MP::DataConn's `connect_to`), handled
   * there by its data handler `handler` with `args`. Resolves to the connection, a
   * `stream.Duplex` (inside TLS when the node connections use it); rejects with
   * `DATA_CONN` and the reference's message when it fails (`HANDLER: no such data
   * connection handler`, `NODE: unable to establish connection within N seconds`, ...),
   * `REFUSED` when the engine refuses to ask (too many pending), `CLOSED`/`STOPPED` when
   * this node closes first. To this node itself it is an in-memory pair of streams.
   */
  dataConnect(node, handler, args = [], { timeoutMs = 10000 } = {}) {
    // A throw inside the executor (closed node, refusal, bad argument) rejects.
    return new Promise((resolve, reject) => {
      if (!Array.isArray(args)) throw new TypeError('args must be an array');
      if (!Number.isSafeInteger(timeoutMs) || timeoutMs < 0) {
        throw new AempError('CONFIG', 'timeoutMs must be a non-negative integer');
      }
      const initArgs = cbor.encode(args);
      if (typeof node === 'string' && nodeOf(node) === this.id) {
        resolve(this.#dataConnectSelf(handler, initArgs));
        return;
      }
      // A port of its own, monitored: the engine kills it when the connection fails.
      const port = this.#run(() => this.#engine.newPort());
      this.#dataRequests.set(port, { resolve, reject });
      try {
        this.#run(() => {
          this.#engine.monitor(port, now());
          this.#engine.dataConnect(port, node, BigInt(timeoutMs), handler, initArgs, now());
        });
      } catch (e) {
        this.#dataRequests.delete(port);
        if (this.#state === 'running') this.#run(() => this.#freePort(port));
        throw e;
      }
    });
  }

  /** A data connection to this node itself: the other end of an in-memory pair goes to
   * the handle of `handler` at once, as the reference makes a socket pair (no engine, no
   * socket). Its id is `N@NODE`, digits where the engine's are letters. */
  #dataConnectSelf(handler, initArgs) {
    if (this.#state !== 'running') throw this.#closedError();
    if (typeof handler !== 'string') throw new TypeError('handler must be a string');
    const handle = this.#dataHandles.get(handler);
    this.#selfDataConns += 1;
    const id = `${this.#selfDataConns}@${this.id}`;
    const [ours, theirs] = duplexPair();
    for (const end of [ours, theirs]) {
      end.on('error', (e) => this.#emitSafe('log', 'debug', `data connection ${id} with ${this.id}: ${e.message}`));
    }
    // The arguments as the handler of a remote request gets them: through CBOR.
    if (handle?.[offer]({ stream: theirs, node: this.id, id, args: decodeCbor(initArgs) })) return ours;
    throw new AempError('DATA_CONN', handle
      ? `${handler}: ${handle.pending} data connections wait for it already`
      : `${handler}: no such data connection handler`);
  }

  /**
   * Lets other nodes ask for data connections handled by `name`; they come from the
   * returned `DataConnections`, an async iterator. A second call takes them over, as in
   * the Rust host: the first handle's iteration ends, and what it held goes to the new.
   */
  handleDataConnections(name) {
    if (typeof name !== 'string') throw new TypeError('name must be a string');
    this.#run(() => this.#engine.registerDataHandler(name));
    const handle = new DataConnections(this, name, this.#limits.dataConnCapacity);
    const previous = this.#dataHandles.get(name);
    this.#dataHandles.set(name, handle);
    previous?.[finish](handle);
    return handle;
  }

  [unhandle](handle) {
    if (this.#dataHandles.get(handle.name) === handle) this.#dataHandles.delete(handle.name);
  }

  /** Connects to the node listening at `addr` (`host:port`). */
  connect(addr) {
    this.#run(() => this.#engine.connectAddr(addr, now()));
  }

  /** Whether `node` has a working connection (false once this node is closed). */
  isUp(node) {
    return this.#state === 'running' && this.#run(() => this.#engine.isUp(node));
  }

  /** Bytes the engine holds on behalf of peers (what `maxBufferedBytes` limits). */
  bufferedBytes() {
    return Number(this.#run(() => this.#engine.bufferedBytes()));
  }

  /** Resolves once `node` is up; rejects (TIMEOUT) after `timeoutMs`, or when this node
   * closes (CLOSED, STOPPED). */
  waitUp(node, timeoutMs = 10000) {
    if (this.#state !== 'running') return Promise.reject(this.#closedError());
    if (this.isUp(node)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = (error) => {
        clearTimeout(timer);
        this.off('node-up', onUp);
        this.off('close', onClose);
        if (error) reject(error);
        else resolve();
      };
      const timer = setTimeout(() => done(new AempError('TIMEOUT', `${node} not up within ${timeoutMs} ms`)), timeoutMs);
      const onUp = (up) => {
        if (up === node) done();
      };
      const onClose = () => done(this.#closedError());
      this.on('node-up', onUp);
      this.on('close', onClose);
    });
  }

  /** Sets this node's entry `key` of database `family` to `value` (any CBOR value). */
  dbSet(family, key, value) {
    this.#run(() => this.#engine.dbSet(family, key, cbor.encode(value), now()));
  }

  /** Deletes this node's entries `keys` of `family`. */
  dbDel(family, ...keys) {
    this.#run(() => this.#engine.dbDel(family, keys, now()));
  }

  /** Resolves to the whole `family` (an object), as the master knows it. */
  dbFamily(family) {
    return this.#query(() => this.#engine.dbFamily(family, now()));
  }

  /** Resolves to the keys of `family` (an array). */
  dbKeys(family) {
    return this.#query(() => this.#engine.dbKeys(family, now()));
  }

  /** Resolves to the values of `family` (an array). */
  dbValues(family) {
    return this.#query(() => this.#engine.dbValues(family, now()));
  }

  /** Monitors `family`: 'db-change' reports its contents, then every change. */
  dbMon(family) {
    this.#run(() => this.#engine.dbMon(family, now()));
  }

  /** Stops monitoring `family`. */
  dbUnmon(family) {
    this.#run(() => this.#engine.dbUnmon(family, now()));
  }

  /** Waits for the answer to a database query (kept until the master answers, rejected
   * when the node closes). */
  #query(ask) {
    // A throw inside the executor (closed node, refusal) rejects the promise.
    return new Promise((resolve, reject) => {
      this.#dbWaiters.set(this.#run(ask), { resolve, reject });
    });
  }

  /**
   * Closes the node: stops listening and connecting, writes what is queued for each
   * connection and ends it (waiting at most `timeoutMs`, then dropping what is left),
   * closes every port, rejects pending database queries and frees the engine. Before
   * that, messages the engine still queues for nodes coming up are given the same time
   * to go out (the node keeps running meanwhile); what is left at `timeoutMs` is
   * dropped. Resolves when done; calling it again returns the same promise.
   */
  close({ timeoutMs = this.#limits.closeTimeoutMs } = {}) {
    this.#closing ??= this.#shutdown(timeoutMs);
    return this.#closing;
  }

  /** `await using node = await Node.start(...)` closes the node at the end of the scope. */
  [asyncDispose]() {
    return this.close();
  }

  async #shutdown(timeoutMs) {
    if (this.#state !== 'running') return;
    const deadline = Date.now() + timeoutMs;
    this.#draining = true;
    while (this.#state === 'running' && this.#queuedBytes() > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    if (this.#state !== 'running') return;
    this.#state = 'closing';
    clearTimeout(this.#timer);
    for (const server of this.#servers) server.close();
    for (const socket of this.#connecting) socket.destroy();
    const sockets = [...this.#conns.values()].map((c) => {
      this.#forget(c);
      return c.socket;
    });
    let timer;
    await Promise.race([
      Promise.all(sockets.map((socket) => new Promise((resolve) => {
        socket.once('finish', resolve).once('close', resolve);
        socket.end();
      }))),
      new Promise((resolve) => {
        timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
      }),
    ]);
    clearTimeout(timer);
    for (const socket of sockets) socket.destroy();
    this.#teardown('closed');
    this.#emitSafe('close');
  }

  /** Bytes of messages the engine holds for nodes not connected yet (0 once it failed). */
  #queuedBytes() {
    try {
      return Number(this.#engine.queuedBytes());
    } catch (e) {
      this.#stop(e);
      return 0;
    }
  }

  /** The engine failed: everything of this node goes at once. */
  #stop(error) {
    if (this.#state === 'stopped' || this.#state === 'closed') return;
    /** What made the engine fail, once it has. */
    this.stoppedBy = error;
    for (const c of this.#conns.values()) {
      this.#forget(c);
      c.socket.destroy();
    }
    for (const socket of this.#connecting) socket.destroy();
    for (const server of this.#servers) server.close();
    this.#teardown('stopped');
    this.#emitSafe('log', 'error', `node ${this.id} stopped: the engine failed: ${error?.message ?? error}`);
    this.#emitSafe('close', error);
  }

  #teardown(state) {
    this.#state = state;
    clearTimeout(this.#timer);
    this.#connecting.clear();
    for (const port of this.#ports.values()) port[finish]();
    this.#ports.clear();
    const error = this.#closedError();
    for (const { reject } of this.#dbWaiters.values()) reject(error);
    this.#dbWaiters.clear();
    for (const { reject } of this.#readyWaiters) reject(error);
    this.#readyWaiters.clear();
    for (const { reject } of this.#dataRequests.values()) reject(error);
    this.#dataRequests.clear();
    for (const handle of this.#dataHandles.values()) handle[finish]();
    this.#dataHandles.clear();
    try {
      this.#engine?.[dispose]?.();
    } catch {
      // A failed engine may not take its handle back; it is dropped with the node.
    }
  }
}
