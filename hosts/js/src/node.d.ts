// Types of the public API of src/node.js (checked by test/types.test.js).

import { EventEmitter } from 'node:events';
import { Duplex } from 'node:stream';

/**
 * A value a peer sent, as `decodeCbor` decodes it: byte strings as `Uint8Array`, maps as
 * objects (integer keys as text; a map with other keys stays a `Map`), bignums as
 * `bigint`, epoch times (tag 1) as `Date`, any other tag as the value it wraps.
 */
export type Value =
  | null
  | undefined
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | Date
  | Value[]
  | ValueObject
  | Map<Value, Value>;

/** A CBOR map whose keys are all strings or numbers. */
export interface ValueObject {
  [key: string]: Value;
}

/** What an `AempError` is about. */
export type AempErrorCode =
  | 'CLOSED'
  | 'STOPPED'
  | 'REFUSED'
  | 'PORT_FULL'
  | 'CONFIG'
  | 'BIND'
  | 'TIMEOUT'
  | 'DECODE'
  /** A data connection failed; the message is the reference's. */
  | 'DATA_CONN';

/** An error of a node; `code` says which kind. */
/** What the engine refused a call for (`REFUSED` errors). */
export type RefusalKind =
  | 'invalid-config'
  | 'invalid-port-id'
  | 'port-exists'
  | 'queue-full'
  | 'budget-exhausted'
  | 'not-connected'
  | 'closed'
  | 'too-large'
  | 'too-deep'
  | 'not-an-array'
  | 'malformed'
  | 'not-json';

export declare class AempError extends Error {
  constructor(
    code: AempErrorCode,
    message: string,
    options?: { cause?: unknown; sent?: number; kind?: RefusalKind },
  );
  readonly name: 'AempError';
  readonly code: AempErrorCode;
  /** For `REFUSED`: what the engine refused the call for. */
  readonly kind?: RefusalKind;
  /** For `send`/`sendBatch`: how many messages of the batch went out before the refusal. */
  readonly sent?: number;
}

/** TLS material as PEM strings (see `tlsFromPem`). */
export interface TlsOptions {
  cert: string;
  key: string;
  ca: string | string[];
}

/** Options of `Node.start`. */
export interface NodeOptions {
  /** Default `<hostname>/`; `%n`, `%u` and a trailing `/` are expanded. */
  nodeId?: string;
  secret?: string;
  /** Framings in order of preference (default both, cbor first). */
  framings?: Array<'cbor' | 'json'>;
  /** Listen addresses, `host:port` (`*` for every interface, port 0 for any). */
  binds?: string[];
  /** Seed addresses to keep connected; the first one up becomes master. */
  seeds?: string[];
  tls?: TlsOptions;
  monitorTimeoutMs?: number;
  keepaliveIntervalMs?: number;
  connectIntervalMs?: number;
  /** Bytes queued per node that is not connected yet (engine default 16 MiB). */
  maxQueueBytes?: number;
  /** The engine's memory budget for peers (default 64 MiB). */
  maxBufferedBytes?: number;
  /** Accepted connections in their handshake at once (default 256). */
  maxHandshakes?: number;
  /** Messages a port holds before no connection reads on (default 1024). */
  portCapacity?: number;
  /** Bytes a port holds before no connection reads on (default 16 MiB; a message costs
   * its encoded size and 32 bytes; an empty port takes one message of any size). */
  portBytes?: number;
  /** A full port that takes nothing this long is stalled (default 10000). */
  portStallMs?: number;
  /** Bytes waiting to be written to one connection before it is closed (default 64 MiB). */
  maxWriteQueue?: number;
  /** Bytes waiting to be written to all connections together before the one holding the
   * most is closed (default 128 MiB); past half of it, sends to every node wait. */
  maxWriteTotal?: number;
  /** A connection whose writes make no progress this long is closed (default monitorTimeoutMs). */
  writeTimeoutMs?: number;
  /** What `close()` waits for queued writes by default (1000). */
  closeTimeoutMs?: number;
  /** Incoming data connections a `handleDataConnections` handle holds not taken yet
   * (default 64); more are closed with a warning. */
  dataConnCapacity?: number;
}

/** The events of a `Node`, with their arguments. */
export interface NodeEvents {
  'node-up': [node: string];
  'node-down': [node: string, reason: string];
  'port-down': [port: string, reason: Value[]];
  request: [node: string, tag: string, args: Value[]];
  'db-change': [family: string, set: ValueObject, del: string[]];
  drain: [];
  log: [level: 'error' | 'warn' | 'info' | 'debug', message: string];
  /** Once the node is closed; `error` when the engine failed. */
  close: [error?: unknown];
}

/** A local port: an async iterator of the argument arrays sent to it. */
export declare class Port implements AsyncIterableIterator<Value[]> {
  private constructor();
  readonly node: Node;
  /** `NODE#NAME`. */
  readonly id: string;
  /** Messages received and not taken yet. */
  readonly pending: number;
  /** What the messages not taken yet cost the port's `portBytes` bound. */
  readonly pendingBytes: number;
  readonly closed: boolean;
  /** The next message's arguments (undefined once the port is closed). */
  recv(): Promise<Value[] | undefined>;
  next(): Promise<IteratorResult<Value[], undefined>>;
  /** Kills the port (a `break` out of `for await` calls it). */
  return(value?: unknown): Promise<IteratorResult<Value[], undefined>>;
  [Symbol.asyncIterator](): this;
  [Symbol.asyncDispose](): Promise<void>;
  /** Kills the port with an empty reason. */
  close(): void;
  /** Kills the port with `reason`. */
  kill(...reason: unknown[]): void;
}

/** An incoming data connection, from `handleDataConnections`. */
export interface DataConnection {
  /** The byte stream (inside TLS when the node's connections use it). */
  stream: Duplex;
  /** The node that asked for it. */
  node: string;
  /** The data connection's id (`b@NODE`, ...). */
  id: string;
  /** The arguments the asking node gave `dataConnect`. */
  args: Value[];
}

/** The incoming data connections for one handler name: an async iterator of them. */
export declare class DataConnections implements AsyncIterableIterator<DataConnection> {
  private constructor();
  /** The handler name other nodes ask for. */
  readonly name: string;
  /** Connections received and not taken yet. */
  readonly pending: number;
  readonly closed: boolean;
  next(): Promise<IteratorResult<DataConnection, undefined>>;
  /** Closes it (a `break` out of `for await` calls it). */
  return(value?: unknown): Promise<IteratorResult<DataConnection, undefined>>;
  [Symbol.asyncIterator](): this;
  [Symbol.asyncDispose](): Promise<void>;
  /** Stops taking connections for this name; the queued ones are closed. */
  close(): void;
}

/** A running node. */
export declare class Node extends EventEmitter<NodeEvents> {
  /** Starts a node and its listeners. */
  static start(options?: NodeOptions): Promise<Node>;
  /** A node without listeners (`start` binds `options.binds`). */
  constructor(options?: NodeOptions);
  readonly id: string;
  /** The addresses this node listens on. */
  readonly listenAddrs: string[];
  readonly state: 'running' | 'closing' | 'closed' | 'stopped';
  /** What made the engine fail, once it has. */
  readonly stoppedBy?: unknown;
  /** A new local port (named `name`, else a fresh unique one). */
  port(name?: string): Port;
  /** Sends `args` to `portId`; false: sends to its node should wait (its connection has
   * more than 1 MiB waiting): await `ready(portId)` (or 'drain') before sending it more. */
  send(portId: string, ...args: unknown[]): boolean;
  /** Sends `[portId, args]` pairs in order; false when sends to one of their nodes
   * should wait. */
  sendBatch(messages: Array<[portId: string, args: unknown[]]>): boolean;
  /** Resolves when a send to `portId` would not have to wait; rejects when the node
   * closes first. */
  ready(portId: string): Promise<void>;
  kill(portId: string, ...reason: unknown[]): void;
  monitor(portId: string): void;
  unmonitor(portId: string): void;
  /** Node-port requests tagged `tag` come as 'request' events. */
  handleRequests(tag: string): void;
  /** Asks `node` for a data connection handled there by `handler` with `args` (to this
   * node itself: an in-memory pair); rejects with `DATA_CONN` (the reference's message)
   * when it fails or times out. */
  dataConnect(node: string, handler: string, args?: unknown[], options?: { timeoutMs?: number }): Promise<Duplex>;
  /** Data connections other nodes ask for with handler `name`; a second call takes
   * them over (the first handle ends, what it held goes to the new one). */
  handleDataConnections(name: string): DataConnections;
  /** Connects to the node listening at `addr` (`host:port`). */
  connect(addr: string): void;
  isUp(node: string): boolean;
  bufferedBytes(): number;
  waitUp(node: string, timeoutMs?: number): Promise<void>;
  dbSet(family: string, key: string, value: unknown): void;
  dbDel(family: string, ...keys: string[]): void;
  dbFamily(family: string): Promise<ValueObject>;
  dbKeys(family: string): Promise<string[]>;
  dbValues(family: string): Promise<Value[]>;
  dbMon(family: string): void;
  dbUnmon(family: string): void;
  /** Writes what is queued (for at most `timeoutMs`), then frees everything. */
  close(options?: { timeoutMs?: number }): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Decodes CBOR a peer sent; throws on what is not CBOR. */
export declare function decodeCbor(bytes: Uint8Array): Value;

/** TLS options from an AnyEvent::MP certificate file. */
export declare function tlsFromPem(pem: string): TlsOptions;
