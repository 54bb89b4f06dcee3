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
  stream.push(head);
  socket.on('data', (chunk) => {
    if (!stream.push(chunk)) socket.pause();
  });
  socket.on('end', () => stream.push(null));
  socket.on('error', (error) => stream.destroy(error));
  return stream;
}

/** A local port: an async iterator of the argument arrays sent to it. */
export class Port {
  #queue = [];
  #waiters = [];
  #closed = false;

  constructor(node, id) {
    this.node = node;
    /** The port id, `NODE#NAME`. */
    this.id = id;
  }

  _push(args) {
    const waiter = this.#waiters.shift();
    if (waiter) waiter({ value: args, done: false });
    else this.#queue.push(args);
  }

  _close() {
    this.#closed = true;
    for (const waiter of this.#waiters.splice(0)) waiter({ value: undefined, done: true });
  }

  /** The next message's arguments (undefined once the port is closed). */
  async recv() {
    const { value } = await this.next();
    return value;
  }

  next() {
    if (this.#queue.length) return Promise.resolve({ value: this.#queue.shift(), done: false });
    if (this.#closed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** Kills the port (monitors fire with an empty reason). */
  close() {
    this.node._kill(this.id);
    this._close();
  }
}

/**
 * A running node. Events: 'node-up' (node), 'node-down' (node, reason), 'port-down'
 * (port, reason), 'db-change' (family, set, del) for monitored database families (`set`
 * an object of new or changed keys, `del` an array of deleted keys; the first report
 * holds the whole family), 'log' (level, message).
 */
export class Node extends EventEmitter {
  #engine;
  #sockets = new Map(); // conn id (string) -> socket
  #ports = new Map(); // port id -> Port
  #servers = [];
  #timer = null;
  #tls;
  #dbWaiters = new Map(); // database query id -> resolve

  /**
   * Starts a node. Options: nodeId (default `<hostname>/`; %n, %u and a trailing / are
   * expanded), secret, framings (['cbor', 'json']), binds (['127.0.0.1:4040', ...]),
   * seeds, tls ({ cert, key, ca } PEM strings: TLS with mandatory certificates from that CA,
   * no host-name check), monitorTimeoutMs.
   */
  static async start(options = {}) {
    const node = new Node(options);
    await node.#listen(options.binds ?? []);
    return node;
  }

  constructor(options) {
    super();
    const hostname = os.hostname();
    const id = api.expandNodeId(options.nodeId ?? `${hostname}/`, hostname);
    const config = api.defaultNodeConfig(id);
    if (options.secret !== undefined) config.transport.secret = new TextEncoder().encode(options.secret);
    if (options.framings) config.transport.framings = options.framings;
    if (options.monitorTimeoutMs) config.transport.monitorTimeoutMs = BigInt(options.monitorTimeoutMs);
    config.transport.tls = Boolean(options.tls);
    config.seeds = options.seeds ?? [];
    config.wallClockOffsetMs = BigInt(Date.now()) - now();
    this.#tls = options.tls;
    this.#engine = api.Node.create(config, now());
    /** This node's id. */
    this.id = id;
    this.#flush();
  }

  async #listen(binds) {
    const addrs = [];
    for (const bind of binds) {
      const at = bind.lastIndexOf(':');
      const host = bind.slice(0, at) === '*' ? '0.0.0.0' : bind.slice(0, at);
      const port = Number(bind.slice(at + 1)) || 0;
      const server = net.createServer((socket) => this.#accepted(socket));
      await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, resolve);
      });
      this.#servers.push(server);
      const a = server.address();
      addrs.push(`${a.address}:${a.port}`);
    }
    /** The addresses this node listens on. */
    this.listenAddrs = addrs;
    if (addrs.length) this.#engine.setBinds(addrs, now());
    this.#flush();
  }

  #accepted(socket) {
    const conn = this.#engine.handleAccept(`${socket.remoteAddress}:${socket.remotePort}`, now());
    this.#attach(conn, socket);
    this.#flush();
  }

  #attach(conn, socket) {
    const key = String(conn);
    socket.setNoDelay(true);
    socket.setKeepAlive(true);
    this.#sockets.set(key, socket);
    socket.on('data', (data) => {
      if (this.#sockets.get(key) !== socket) return;
      this.#engine.handleInput(conn, data, now());
      this.#flush();
    });
    socket.on('end', () => {
      if (this.#sockets.get(key) !== socket) return;
      this.#sockets.delete(key);
      this.#engine.handleEof(conn, now());
      this.#flush();
    });
    socket.on('error', (e) => {
      if (this.#sockets.get(key) !== socket) return;
      this.#sockets.delete(key);
      this.#engine.handleConnError(conn, e.message, now());
      this.#flush();
    });
  }

  #startTls(conn, role, leftover) {
    const key = String(conn);
    const raw = this.#sockets.get(key);
    if (!raw) return;
    if (!this.#tls) {
      this.#sockets.delete(key);
      raw.destroy();
      this.#engine.handleConnError(conn, 'TLS requested but no certificate configured', now());
      return;
    }
    raw.removeAllListeners('data').removeAllListeners('end').removeAllListeners('error');
    // Bytes the engine read past the greeting are TLS records: TLS must read them first.
    // A TLSSocket over a net.Socket reads from its handle, past anything unshifted onto
    // the stream, so such bytes go through a stream that yields them before the socket's.
    const transport = leftover.length ? prefixed(raw, Buffer.from(leftover)) : raw;
    const options = {
      ...this.#tls,
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
      this.emit('log', 'warn', `${what} dropped: ${e.message}`);
      return undefined;
    }
  }

  /** Acts on everything the engine has to say, then re-arms its timer. */
  #flush() {
    for (;;) {
      const outputs = this.#engine.pollOutputs();
      if (!outputs.length) break;
      for (const { tag, val } of outputs) this.#output(tag, val);
    }
    clearTimeout(this.#timer);
    const at = this.#engine.pollTimeout();
    if (at !== undefined) {
      const delay = Math.max(0, Number(at - now()));
      this.#timer = setTimeout(() => {
        this.#engine.handleTimeout(now());
        this.#flush();
      }, delay);
      this.#timer.unref();
    }
  }

  #output(tag, val) {
    switch (tag) {
      case 'transmit':
        this.#sockets.get(String(val.conn))?.write(val.bytes);
        break;
      case 'connect': {
        const at = val.addr.lastIndexOf(':');
        const socket = net.connect(Number(val.addr.slice(at + 1)), val.addr.slice(0, at));
        socket.once('connect', () => {
          socket.removeAllListeners('error');
          this.#attach(val.conn, socket);
          this.#engine.handleConnected(val.conn, now());
          this.#flush();
        });
        socket.once('error', (e) => {
          this.#engine.handleConnectFailed(val.conn, e.message, now());
          this.#flush();
        });
        break;
      }
      case 'start-tls':
        this.#startTls(val.conn, val.role, val.leftover);
        break;
      case 'close': {
        const key = String(val.conn);
        const socket = this.#sockets.get(key);
        this.#sockets.delete(key);
        socket?.end();
        break;
      }
      case 'deliver': {
        const args = this.#decode(val.args, `message for ${val.port}`);
        if (args !== undefined) this.#ports.get(val.port)?._push(args);
        break;
      }
      case 'node-up':
        this.emit('node-up', val);
        break;
      case 'node-down':
        this.emit('node-down', val.node, val.reason);
        break;
      case 'port-down':
        this.emit('port-down', val.port, this.#decode(val.reason, 'reason') ?? []);
        break;
      case 'db-reply': {
        const resolve = this.#dbWaiters.get(val.id);
        this.#dbWaiters.delete(val.id);
        resolve?.(this.#decode(val.result, 'database reply') ?? null);
        break;
      }
      case 'db-change':
        this.emit('db-change', val.family, this.#decode(val.set, 'database change') ?? {}, val.del);
        break;
      case 'log':
        this.emit('log', val.level, val.message);
        break;
      default:
        break; // node-port requests are not used by this host yet
    }
  }

  /** A new local port (with `name`, else a fresh unique one). */
  port(name) {
    const id = name === undefined ? this.#engine.newPort() : this.#engine.registerPort(name);
    const port = new Port(this, id);
    this.#ports.set(id, port);
    return port;
  }

  /** Sends the remaining arguments as a message to `portId`. */
  send(portId, ...args) {
    this.#engine.send([[portId, cbor.encode(args)]], now());
    this.#flush();
  }

  /** Monitors a port: 'port-down' fires when it dies. */
  monitor(portId) {
    this.#engine.monitor(portId, now());
    this.#flush();
  }

  /** Connects to the node listening at `addr` (`host:port`). */
  connect(addr) {
    this.#engine.connectAddr(addr, now());
    this.#flush();
  }

  /** Whether `node` has a working connection. */
  isUp(node) {
    return this.#engine.isUp(node);
  }

  /** Resolves once `node` is up; rejects after `timeoutMs`. */
  waitUp(node, timeoutMs = 10000) {
    if (this.isUp(node)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('node-up', onUp);
        reject(new Error(`${node} not up within ${timeoutMs} ms`));
      }, timeoutMs);
      const onUp = (up) => {
        if (up !== node) return;
        clearTimeout(timer);
        this.off('node-up', onUp);
        resolve();
      };
      this.on('node-up', onUp);
    });
  }

  /** Sets this node's entry `key` of database `family` to `value` (any CBOR value). */
  dbSet(family, key, value) {
    this.#engine.dbSet(family, key, cbor.encode(value), now());
    this.#flush();
  }

  /** Deletes this node's entries `keys` of `family`. */
  dbDel(family, ...keys) {
    this.#engine.dbDel(family, keys, now());
    this.#flush();
  }

  /** Resolves to the whole `family` (an object), as the master knows it. */
  dbFamily(family) {
    return this.#query(this.#engine.dbFamily(family, now()));
  }

  /** Resolves to the keys of `family` (an array). */
  dbKeys(family) {
    return this.#query(this.#engine.dbKeys(family, now()));
  }

  /** Resolves to the values of `family` (an array). */
  dbValues(family) {
    return this.#query(this.#engine.dbValues(family, now()));
  }

  /** Monitors `family`: 'db-change' reports its contents, then every change. */
  dbMon(family) {
    this.#engine.dbMon(family, now());
    this.#flush();
  }

  /** Stops monitoring `family`. */
  dbUnmon(family) {
    this.#engine.dbUnmon(family, now());
    this.#flush();
  }

  /** Waits for the answer to database query `id` (kept until the master answers). */
  #query(id) {
    const answer = new Promise((resolve) => this.#dbWaiters.set(id, resolve));
    this.#flush();
    return answer;
  }

  _kill(portId) {
    this.#ports.delete(portId);
    this.#engine.kill(portId, cbor.encode([]), now());
    this.#flush();
  }

  /** Closes listeners and connections. */
  close() {
    clearTimeout(this.#timer);
    for (const server of this.#servers) server.close();
    for (const socket of this.#sockets.values()) socket.destroy();
    this.#sockets.clear();
    for (const port of this.#ports.values()) port._close();
  }
}
