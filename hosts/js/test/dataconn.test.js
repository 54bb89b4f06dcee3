// Data connections between two JS nodes on loopback: both ways of opening one (the asking
// node dials, or it asks the other to dial it), 1 MiB each way with end of stream, over
// TLS too, bytes that came with the handshake, one to the node itself, the reference's
// failures, and the bounds of an incoming handle.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { Duplex } from 'node:stream';
import { Node, AempError, tlsFromPem } from '../src/node.js';
import { networkCert } from './support.js';

/** Node `a` listening, node `b` connected to it (b reached a on its listener, or on
 * `via`'s address when given). */
async function pair(t, options = {}, via = undefined) {
  const a = await Node.start({ nodeId: `dc-a-${t.name.length}`, secret: 's', binds: ['127.0.0.1:0'], ...options });
  const b = await Node.start({ nodeId: `dc-b-${t.name.length}`, secret: 's', ...options });
  t.after(() => Promise.all([a.close(), b.close()]));
  b.connect(via ? await via(a.listenAddrs[0]) : a.listenAddrs[0]);
  await b.waitUp(a.id);
  await a.waitUp(b.id);
  return [a, b];
}

/** Everything `stream` yields until its end, as one buffer. The stream is not destroyed
 * there (a plain `for await` would, dropping what it still has to write). */
async function readAll(stream) {
  const chunks = [];
  for await (const chunk of stream.iterator({ destroyOnReturn: false })) chunks.push(chunk);
  return Buffer.concat(chunks);
}

/** The first `n` bytes `stream` yields (it may yield more), as one buffer. */
async function readBytes(stream, n) {
  const chunks = [];
  let length = 0;
  for await (const chunk of stream.iterator({ destroyOnReturn: false })) {
    chunks.push(chunk);
    length += chunk.length;
    if (length >= n) break;
  }
  return Buffer.concat(chunks).subarray(0, n);
}

/** One data connection from `asker` to handler `name` of `handler`, 1 MiB sent each way
 * at once, each side ending its writing and reading the other's to its end. Returns
 * what was sent, to the handler and to the asker. */
async function roundTrip(asker, handler, name) {
  const conns = handler.handleDataConnections(name);
  const toHandler = randomBytes(1 << 20);
  const toAsker = randomBytes(1 << 20);
  const asked = asker.dataConnect(handler.id, name, ['x', 42, { k: true }]);
  const { value: incoming } = await conns.next();
  const stream = await asked;
  assert.ok(stream instanceof Duplex);
  assert.equal(incoming.node, asker.id);
  assert.match(incoming.id, new RegExp(`@${asker.id}$`));
  assert.deepEqual(incoming.args, ['x', 42, { k: true }]);
  incoming.stream.end(toAsker);
  stream.end(toHandler);
  const [atHandler, atAsker] = await Promise.all([readAll(incoming.stream), readAll(stream)]);
  assert.ok(atHandler.equals(toHandler), `handler got ${atHandler.length} bytes, not what was sent`);
  assert.ok(atAsker.equals(toAsker), `asker got ${atAsker.length} bytes, not what was sent`);
  conns.close();
  return [toHandler, toAsker];
}

test('the asking node dials the data connection where it reached the other', async (t) => {
  const [a, b] = await pair(t);
  const downs = [];
  b.on('port-down', (port) => downs.push(port));
  await roundTrip(b, a, 'bulk');
  // The request's own port is freed without a 'port-down' for the application.
  assert.deepEqual(downs, []);
});

test('the asking node that was dialled has the other node dial it', async (t) => {
  const [a, b] = await pair(t);
  await roundTrip(a, b, 'bulk');
});

/** A TCP relay to `target` that keeps every byte it carries (in `wire`); resolves to
 * its address. The data connections follow the node connection's address through it. */
function relay(t, wire) {
  return async (target) => {
    const [host, port] = target.split(':');
    // Half open, as the nodes' streams are: one side's end must not end the other's.
    const server = net.createServer({ allowHalfOpen: true }, (down) => {
      const up = net.connect({ port: Number(port), host, allowHalfOpen: true });
      for (const [from, to] of [[down, up], [up, down]]) {
        from.on('data', (chunk) => wire.push(chunk));
        from.pipe(to);
        from.on('error', () => to.destroy());
      }
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => server.close());
    return `127.0.0.1:${server.address().port}`;
  };
}

test('data connections run inside TLS when the nodes use it', async (t) => {
  const wire = [];
  const [a, b] = await pair(t, { tls: tlsFromPem(networkCert()) }, relay(t, wire));
  const sent = await Promise.all([roundTrip(b, a, 'bulk'), roundTrip(a, b, 'back')]);
  // Both went through the relay, and none of what they carried shows there in clear.
  const carried = Buffer.concat(wire);
  assert.ok(carried.length > 4 << 20, `${carried.length} bytes relayed`);
  for (const data of sent.flat()) assert.equal(carried.indexOf(data.subarray(0, 32)), -1);
});

test('without TLS the relay sees the data as it is', async (t) => {
  const wire = [];
  const [a, b] = await pair(t, {}, relay(t, wire));
  const [toHandler] = await roundTrip(b, a, 'bulk');
  assert.notEqual(Buffer.concat(wire).indexOf(toHandler.subarray(0, 32)), -1);
});

/** A relay to `target` that delivers, on each connection after the first (the data
 * connections), what the listening node sends after its greeting in one write once
 * nothing more came for 250 ms: its authentication line and what it writes next arrive
 * at the dialling node in one read, so the engine hands them over as `leftover`. */
function coalescing(t) {
  return async (target) => {
    const [host, port] = target.split(':');
    let count = 0;
    // Half open, as the nodes' streams are: one side's end must not end the other's.
    const server = net.createServer({ allowHalfOpen: true }, (down) => {
      const up = net.connect({ port: Number(port), host, allowHalfOpen: true });
      down.pipe(up);
      down.on('error', () => up.destroy());
      up.on('error', () => down.destroy());
      if (count++ === 0) {
        up.pipe(down);
        return;
      }
      let held = Buffer.alloc(0);
      let timer = null;
      const onData = (chunk) => {
        held = Buffer.concat([held, chunk]);
        // The greeting is two lines (the greeting, then a nonce).
        const greeting = held.indexOf(10, held.indexOf(10) + 1);
        if (!timer && greeting < 0) return;
        if (!timer) {
          down.write(held.subarray(0, greeting + 1));
          held = held.subarray(greeting + 1);
        }
        clearTimeout(timer);
        timer = setTimeout(() => {
          up.off('data', onData);
          down.write(held);
          up.pipe(down);
        }, 250);
      };
      up.on('data', onData);
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => server.close());
    return `127.0.0.1:${server.address().port}`;
  };
}

test('bytes that came with the handshake reach the stream first', async (t) => {
  const [a, b] = await pair(t, {}, coalescing(t));
  const data = randomBytes(256 << 10);
  // b asks, a's handler writes at once: b reads it with a's authentication line. (The
  // writer does not end: its end would come before the relay lets anything through.)
  const conns = a.handleDataConnections('first');
  const asked = b.dataConnect(a.id, 'first');
  const { value: incoming } = await conns.next();
  incoming.stream.write(data);
  const asking = await asked;
  const atAsker = await readBytes(asking, data.length);
  assert.ok(atAsker.equals(data), 'the asker got other bytes than were sent');
  // a asks (b dials it), and writes at once: b's handler reads it with the line.
  const back = b.handleDataConnections('second');
  const stream = await a.dataConnect(b.id, 'second');
  stream.write(data);
  const { value: handled } = await back.next();
  const atHandler = await readBytes(handled.stream, data.length);
  assert.ok(atHandler.equals(data), 'the handler got other bytes than were sent');
  // Streams are the application's: closing the nodes leaves them open.
  for (const s of [incoming.stream, asking, stream, handled.stream]) s.destroy();
});

test('an unknown handler rejects with the reference message', async (t) => {
  const [a, b] = await pair(t);
  await assert.rejects(
    b.dataConnect(a.id, 'nope'),
    (e) => e instanceof AempError && e.code === 'DATA_CONN' && e.message === 'nope: no such data connection handler',
  );
});

test('a data connection not up in time rejects with the reference message', async (t) => {
  const [, b] = await pair(t);
  // Nobody knows where this node is: nothing answers before the timeout.
  await assert.rejects(
    b.dataConnect('dc-nowhere', 'bulk', [], { timeoutMs: 200 }),
    (e) => e.code === 'DATA_CONN' && /^dc-nowhere: unable to establish connection within 0\.2 seconds$/.test(e.message),
  );
});

test('a data connection to the node itself is an in-memory pair', async (t) => {
  const [a] = await pair(t, { dataConnCapacity: 1 });
  await assert.rejects(
    a.dataConnect(a.id, 'self'),
    (e) => e.code === 'DATA_CONN' && e.message === 'self: no such data connection handler',
  );
  const downs = [];
  a.on('port-down', (port) => downs.push(port));
  await roundTrip(a, a, 'self');
  assert.deepEqual(downs, []);
  const conns = a.handleDataConnections('self');
  const first = await a.dataConnect(`${a.id}#anyport`, 'self', [Buffer.from([1])]);
  await assert.rejects(a.dataConnect(a.id, 'self'), { code: 'DATA_CONN', message: 'self: 1 data connections wait for it already' });
  const { value } = await conns.next();
  assert.match(value.id, new RegExp(`^\\d+@${a.id}$`));
  assert.deepEqual(value.args, [new Uint8Array([1])]);
  // A destroyed end ends the other's reading and fails its writing.
  first.write('before');
  first.destroy();
  assert.equal(String(await readAll(value.stream)), 'before');
  await assert.rejects(new Promise((resolve, reject) => value.stream.write('after', (e) => (e ? reject(e) : resolve()))), { code: 'EPIPE' });
  conns.close();
});

test('bad arguments and a closing node reject dataConnect', async (t) => {
  const [a, b] = await pair(t);
  await assert.rejects(b.dataConnect(a.id, 'bulk', 'not an array'), TypeError);
  await assert.rejects(b.dataConnect(a.id, 'bulk', [], { timeoutMs: -1 }), { code: 'CONFIG' });
  const waiting = b.dataConnect('dc-nowhere', 'bulk', [], { timeoutMs: 60000 });
  await b.close();
  await assert.rejects(waiting, { code: 'CLOSED' });
  await assert.rejects(b.dataConnect(a.id, 'bulk'), { code: 'CLOSED' });
});

test('an incoming handle holds dataConnCapacity connections, others are closed with a warning; a new handle takes over', async (t) => {
  const [a, b] = await pair(t, { dataConnCapacity: 1 });
  const replaced = a.handleDataConnections('bulk');
  const warned = new Promise((resolve) => a.on('log', (level, message) => {
    if (level === 'warn' && /data connection .* for handler bulk: 1 waiting to be taken already, closed/.test(message)) resolve();
  }));
  const first = await b.dataConnect(a.id, 'bulk', [1]);
  const second = await b.dataConnect(a.id, 'bulk', [2]);
  await warned;
  assert.equal((await readAll(second)).length, 0);
  assert.equal(replaced.pending, 1);
  // A second handle for the name takes over, with what the first held.
  const conns = a.handleDataConnections('bulk');
  assert.equal(replaced.closed, true);
  assert.deepEqual(await replaced.next(), { value: undefined, done: true });
  assert.equal(conns.pending, 1);
  first.end('queued, then taken');
  const taken = [];
  for await (const conn of conns) {
    taken.push(conn.args);
    assert.equal(String(await readAll(conn.stream)), 'queued, then taken');
    conn.stream.end();
    break; // closes the handle
  }
  assert.deepEqual(taken, [[1]]);
  assert.equal(conns.closed, true);
  // The engine still accepts the name (a handler cannot be unregistered): what comes now
  // finds no handle and is closed.
  const closed = new Promise((resolve) => a.on('log', (level, message) => {
    if (/for handler bulk: nothing handles it, closed/.test(message)) resolve();
  }));
  const late = await b.dataConnect(a.id, 'bulk');
  await closed;
  assert.equal((await readAll(late)).length, 0);
  // A new handle may take the name again.
  a.handleDataConnections('bulk').close();
  // Ours are only half closed (we did not end them): the application's to free.
  for (const s of [first, second, late]) s.destroy();
});

test('closing the node ends its handles and closes the connections they hold', async (t) => {
  const [a, b] = await pair(t);
  const conns = a.handleDataConnections('bulk');
  const stream = await b.dataConnect(a.id, 'bulk');
  const { value } = await conns.next();
  assert.equal(value.node, b.id);
  const queued = await b.dataConnect(a.id, 'bulk');
  while (conns.pending === 0) await new Promise((resolve) => setTimeout(resolve, 10));
  const waiting = a.handleDataConnections('idle').next();
  await a.close();
  assert.deepEqual(await waiting, { value: undefined, done: true });
  assert.equal(conns.closed, true);
  // The one it held and nobody took is closed: its asker reads the end.
  assert.equal((await readAll(queued)).length, 0);
  // A stream the application took is its own: closing the node leaves it open.
  assert.equal(value.stream.destroyed, false);
  value.stream.end('still there');
  assert.equal(String(await readAll(stream)), 'still there');
  for (const s of [stream, value.stream, queued]) s.destroy();
});
