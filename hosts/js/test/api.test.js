// The JavaScript API between two JS nodes on loopback: port iteration and its end,
// requests, typed errors, backpressure both ways with its bounds, and close().

import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { Node, AempError } from '../src/node.js';

/** Node `a` listening, node `b` connected to it (each with its own options). */
async function pair(t, aOptions = {}, bOptions = {}) {
  const a = await Node.start({ nodeId: `a-${t.name.length}`, secret: 's', binds: ['127.0.0.1:0'], ...aOptions });
  const b = await Node.start({ nodeId: `b-${t.name.length}`, secret: 's', ...bOptions });
  t.after(() => Promise.all([a.close(), b.close()]));
  b.connect(a.listenAddrs[0]);
  await b.waitUp(a.id);
  await a.waitUp(b.id);
  return [a, b];
}

/** Resolves with the first log message of `node` matching `pattern`. */
function logged(node, pattern) {
  return new Promise((resolve) => {
    const on = (level, message) => {
      if (!pattern.test(message)) return;
      node.off('log', on);
      resolve(message);
    };
    node.on('log', on);
  });
}

/** Polls `cond` every 10 ms until it holds (the test's own timeout bounds the wait). */
async function until(cond) {
  while (!cond()) await sleep(10);
}

test('a break out of for await kills the port, and its monitor fires', async (t) => {
  const [a, b] = await pair(t);
  const port = a.port();
  b.monitor(port.id);
  const down = once(b, 'port-down');
  b.send(port.id, 'one');
  b.send(port.id, 'two');
  const seen = [];
  for await (const args of port) {
    seen.push(args);
    break;
  }
  assert.deepEqual(seen, [['one']]);
  assert.equal(port.closed, true);
  assert.deepEqual(await port.next(), { value: undefined, done: true });
  assert.deepEqual(await down, [port.id, []]);
});

test('kill with a reason reaches the monitor; a closed port ends its iteration', async (t) => {
  const [a, b] = await pair(t);
  const port = a.port();
  b.monitor(port.id);
  b.send(port.id, 'after the monitor');
  assert.deepEqual(await port.recv(), ['after the monitor']);
  const down = once(b, 'port-down');
  const waiting = port.recv();
  port.kill('gone', 42);
  assert.equal(await waiting, undefined);
  assert.deepEqual(await down, [port.id, ['gone', 42]]);
  port.close(); // again: nothing happens
});

test('requests with a registered tag come as events; others stay refused', async (t) => {
  const [a, b] = await pair(t);
  a.handleRequests('ping');
  const request = once(a, 'request');
  const refused = logged(a, /remote execution not allowed: request 'pong'/);
  b.send(`${a.id}#`, 'pong', 1);
  b.send(`${a.id}#`, 'ping', 1, 'x', { k: true });
  assert.deepEqual(await request, [b.id, 'ping', [1, 'x', { k: true }]]);
  await refused;
});

test('errors are AempError with a code', async (t) => {
  const [a] = await pair(t);
  assert.throws(
    () => a.send('', 1),
    (e) => e instanceof AempError && e.code === 'REFUSED' && e.kind === 'invalid-port-id' && e.sent === 0,
  );
  assert.throws(() => a.monitor(''), { name: 'AempError', code: 'REFUSED', kind: 'invalid-port-id' });
  a.port('taken');
  assert.throws(() => a.port('taken'), {
    code: 'REFUSED',
    kind: 'port-exists',
    message: 'port taken exists already',
  });
  const busy = net.createServer();
  await new Promise((resolve) => busy.listen(0, '127.0.0.1', resolve));
  t.after(() => busy.close());
  await assert.rejects(
    Node.start({ nodeId: 'bind-test', binds: [`127.0.0.1:${busy.address().port}`] }),
    (e) => e.code === 'BIND' && e.cause.code === 'EADDRINUSE',
  );
  assert.throws(() => new Node({ portCapacity: 0 }), { code: 'CONFIG' });
  assert.throws(() => new Node({ tls: { cert: 'no pem', key: 'no pem', ca: [] } }), { code: 'CONFIG' });
  // An argument of the wrong type fails before it reaches the engine, which goes on.
  assert.throws(() => a.monitor(42), TypeError);
  assert.equal(a.state, 'running');
  assert.equal(a.port().node, a);
});

test('the application fills a local port only to its capacity', async (t) => {
  const [a] = await pair(t, { portCapacity: 2 });
  const port = a.port();
  assert.throws(() => a.sendBatch([[port.id, [1]], [port.id, [2]], [port.id, [3]]]), { code: 'PORT_FULL', sent: 2 });
  assert.equal(port.pending, 2);
  assert.deepEqual([await port.recv(), await port.recv()], [[1], [2]]);
  assert.equal(a.send(port.id, 3), true);
});

test('a full port stops the node reading, so the sender waits; every message arrives in order', async (t) => {
  const capacity = 4;
  const size = 16 * 1024;
  const [a, b] = await pair(t, { portCapacity: capacity });
  const port = a.port();
  const total = 1600; // 25 MiB: more than loopback's socket buffers hold
  const blob = Buffer.alloc(size, 7);
  let waited = false;
  for (let i = 0; i < total; i += 1) {
    if (!b.send(port.id, i, blob)) waited = true;
  }
  assert.ok(waited, 'send said to wait for drain');
  const drained = once(b, 'drain');
  await until(() => port.pending >= capacity);
  await sleep(200);
  // One read (at most 64 KiB) may complete a few messages past the capacity, no more.
  assert.ok(port.pending <= capacity + 65536 / size + 1, `${port.pending} messages held`);
  for (let i = 0; i < total; i += 1) {
    const [n, bytes] = await port.recv();
    assert.equal(n, i);
    assert.equal(bytes.length, size);
  }
  await drained;
});

test('a port nobody reads is stalled, and the node reads on for the others', async (t) => {
  const [a, b] = await pair(t, { portCapacity: 2, portStallMs: 200 });
  const stuck = a.port();
  const other = a.port();
  const stalled = logged(a, new RegExp(`port ${stuck.id} took no message for 200 ms: dropped \\d+ messages for it`));
  const blob = Buffer.alloc(64 * 1024);
  for (let i = 0; i < 100; i += 1) b.send(stuck.id, i, blob);
  b.send(other.id, 'after');
  await stalled;
  assert.deepEqual(await other.recv(), ['after']);
  assert.equal(stuck.pending, 2);
  assert.equal((await stuck.recv())[0], 0);
});

test('a peer that stops reading is cut off past maxWriteQueue', async (t) => {
  // a's only port is full and never read: a reads nothing, so b's writes pile up.
  const [a, b] = await pair(t, { portCapacity: 1 }, { maxWriteQueue: 1024 * 1024 });
  const port = a.port();
  const cut = logged(b, /peer does not read: more than 1048576 bytes waiting/);
  const down = once(b, 'node-down');
  const blob = Buffer.alloc(64 * 1024);
  for (let i = 0; i < 2000 && b.isUp(a.id); i += 1) b.send(port.id, blob);
  await cut;
  assert.equal((await down)[0], a.id);
});

test('a peer that stops reading is cut off after writeTimeoutMs without progress', async (t) => {
  const [a, b] = await pair(t, { portCapacity: 1 }, { writeTimeoutMs: 300 });
  const port = a.port();
  const cut = logged(b, /peer does not read: nothing written for 300 ms/);
  const blob = Buffer.alloc(64 * 1024);
  let i = 0;
  while (b.send(port.id, blob)) i += 1;
  assert.ok(i < 1000, 'the socket asked to wait');
  await cut;
  assert.equal(b.isUp(a.id), false);
});

test('close() writes what is queued, then frees everything', async (t) => {
  const [a, b] = await pair(t);
  const port = b.port();
  const blob = Buffer.alloc(1024 * 1024, 1);
  let waited = false;
  for (let i = 0; i < 20; i += 1) if (!a.send(port.id, i, blob)) waited = true;
  assert.ok(waited, 'writes were still queued at close');
  const query = assert.rejects(a.dbKeys('never-answered-family'), { code: 'CLOSED' });
  const closed = a.close({ timeoutMs: 10000 });
  assert.equal(a.close(), closed);
  assert.equal(a.state, 'closing');
  await closed;
  assert.equal(a.state, 'closed');
  for (let i = 0; i < 20; i += 1) {
    const [n, bytes] = await port.recv();
    assert.equal(n, i);
    assert.equal(bytes.length, blob.length);
  }
  await query;
  assert.throws(() => a.send(port.id, 1), { code: 'CLOSED' });
  await assert.rejects(a.waitUp(b.id), { code: 'CLOSED' });
  assert.equal(a.isUp(b.id), false);
});

test('close() lets messages for a node still coming up go out first', { timeout: 20000 }, async (t) => {
  const a = await Node.start({ nodeId: 'drain-a', secret: 's', binds: ['127.0.0.1:0'] });
  const b = await Node.start({ nodeId: 'drain-b', secret: 's' });
  t.after(() => Promise.all([a.close(), b.close()]));
  const inbox = a.port('inbox');
  // A slow link: b's connection gets through only after 300 ms.
  const [host, port] = a.listenAddrs[0].split(':');
  const proxy = net.createServer((from) => {
    setTimeout(() => {
      const to = net.connect(Number(port), host);
      from.pipe(to).pipe(from);
      from.on('error', () => to.destroy());
      to.on('error', () => from.destroy());
    }, 300);
  });
  await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  t.after(() => proxy.close());
  b.connect(`127.0.0.1:${proxy.address().port}`);
  for (let i = 0; i < 10; i += 1) b.send('drain-a#inbox', i);
  const closed = b.close({ timeoutMs: 5000 });
  assert.equal(b.state, 'closing');
  await closed;
  for (let i = 0; i < 10; i += 1) assert.deepEqual(await inbox.recv(), [i]);
});

test('a listener that throws does not disturb the node', () => {
  // In a process of its own: the rethrown error is uncaught by design.
  const script = `
    import { Node } from ${JSON.stringify(new URL('../src/node.js', import.meta.url).href)};
    const errors = [];
    process.on('uncaughtException', (e) => errors.push(e.message));
    const a = await Node.start({ nodeId: 'a', secret: 's', binds: ['127.0.0.1:0'] });
    const b = await Node.start({ nodeId: 'b', secret: 's' });
    b.connect(a.listenAddrs[0]);
    await b.waitUp('a');
    a.handleRequests('boom');
    a.once('request', () => { throw new Error('listener failed'); });
    const port = a.port();
    b.send('a#', 'boom');
    b.send(port.id, 'still served');
    console.log(JSON.stringify([await port.recv(), errors]));
    await Promise.all([a.close(), b.close()]);
  `;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20000 });
  assert.deepEqual(JSON.parse(out), [['still served'], ['listener failed']]);
});

test('garbage from a raw socket closes that connection only', async (t) => {
  const [a, b] = await pair(t);
  const [host, port] = a.listenAddrs[0].split(':');
  for (const junk of [Buffer.from('not a greeting\n'), Buffer.alloc(100000, 0xff), Buffer.from('aemp;2;x;;\n'.repeat(3))]) {
    const raw = net.connect(Number(port), host);
    raw.on('error', () => undefined);
    await once(raw, 'connect');
    raw.write(junk);
    await Promise.race([once(raw, 'close'), sleep(2000)]);
    raw.destroy();
  }
  assert.equal(a.state, 'running');
  const inbox = a.port();
  b.send(inbox.id, 'still here');
  assert.deepEqual(await inbox.recv(), ['still here']);
});

test('big messages to a port nobody reads stay within portBytes, and the sender is held back', async (t) => {
  const portBytes = 4 * 1024 * 1024;
  const [a, b] = await pair(t, { portBytes, portStallMs: 60000 });
  const port = a.port();
  const size = 1024 * 1024;
  const blob = Buffer.alloc(size, 1);
  const total = 64; // 64 MiB offered
  let sent = 0;
  const producer = (async () => {
    for (; sent < total; sent += 1) {
      if (!b.send(port.id, sent, blob)) await b.ready(port.id);
    }
  })();
  await until(() => port.pendingBytes >= portBytes);
  await sleep(300);
  // Full: the read that filled it (64 KiB) may complete one message past the bound.
  assert.ok(port.pendingBytes <= portBytes + size + 64 * 1024 + 32, `${port.pendingBytes} bytes held`);
  assert.ok(sent < total, `the sender is held back (${sent} of ${total} sent)`);
  // Every message arrives, in order, as the port is read.
  for (let i = 0; i < total; i += 1) {
    const [n, bytes] = await port.recv();
    assert.equal(n, i);
    assert.equal(bytes.length, size);
  }
  await producer;
  assert.equal(port.pendingBytes, 0);
  // An empty port takes one message bigger than its bound, then nothing more.
  const small = await Node.start({ nodeId: 'small-port', secret: 's', portBytes: 1024 });
  t.after(() => small.close());
  const one = small.port();
  assert.equal(small.send(one.id, blob), true);
  assert.throws(() => small.send(one.id, 'x'), { code: 'PORT_FULL' });
  await until(() => one.pending === 1);
  // Its cost: the encoding (an array head, a 5-byte byte-string head, the bytes) and 32.
  assert.equal(one.pendingBytes, 1 + 5 + blob.length + 32);
});

test('a peer that does not read holds back only the sends to it', async (t) => {
  const slow = await Node.start({ nodeId: 'slow', secret: 's', binds: ['127.0.0.1:0'], portCapacity: 1 });
  const fast = await Node.start({ nodeId: 'fast', secret: 's', binds: ['127.0.0.1:0'] });
  const sender = await Node.start({ nodeId: 'sender', secret: 's', writeTimeoutMs: 60000 });
  t.after(() => Promise.all([slow.close(), fast.close(), sender.close()]));
  sender.connect(slow.listenAddrs[0]);
  sender.connect(fast.listenAddrs[0]);
  await sender.waitUp('slow');
  await sender.waitUp('fast');
  // slow's only port is never read: slow stops reading, sender's writes to it pile up.
  const stuck = slow.port();
  const blob = Buffer.alloc(64 * 1024);
  let sent = 0;
  while (sender.send(stuck.id, blob)) sent += 1;
  assert.ok(sent < 1000, 'sends to the slow node wait');
  let waited = false;
  const slowReady = sender.ready(stuck.id).then(() => {
    waited = true;
  });
  // Sends to the fast node go on at once, at full rate.
  const inbox = fast.port();
  const started = Date.now();
  for (let i = 0; i < 2000; i += 1) {
    assert.equal(sender.send(inbox.id, i), true, 'a send to the fast node does not wait');
    if (i % 100 === 99) await sender.ready(inbox.id);
  }
  for (let i = 0; i < 2000; i += 1) assert.deepEqual(await inbox.recv(), [i]);
  const took = Date.now() - started;
  assert.ok(took < 2000, `2000 messages to the fast node took ${took} ms`);
  assert.equal(waited, false, 'the slow node is still behind');
  assert.equal(sender.send(stuck.id, 'more'), false);
  // Once slow reads again, its sends go on.
  (async () => {
    for await (const _ of stuck) {
      // drain it
    }
  })();
  await slowReady;
});

test('past maxWriteTotal the connection holding the most is closed', async (t) => {
  const a = await Node.start({ nodeId: 'total-a', secret: 's', binds: ['127.0.0.1:0'], portCapacity: 1 });
  const c = await Node.start({ nodeId: 'total-c', secret: 's', binds: ['127.0.0.1:0'], portCapacity: 1 });
  const b = await Node.start({ nodeId: 'total-b', secret: 's', maxWriteTotal: 4 * 1024 * 1024, writeTimeoutMs: 60000 });
  t.after(() => Promise.all([a.close(), b.close(), c.close()]));
  b.connect(a.listenAddrs[0]);
  b.connect(c.listenAddrs[0]);
  await b.waitUp('total-a');
  await b.waitUp('total-c');
  const toA = a.port();
  const toC = c.port();
  const cut = logged(b, /peer does not read: the node's connections have more than 4194304 bytes waiting, this one the most/);
  const down = once(b, 'node-down');
  const blob = Buffer.alloc(64 * 1024);
  // More to a than to c: a's connection holds the most.
  for (let i = 0; i < 400 && b.isUp('total-a'); i += 1) {
    b.send(toA.id, blob);
    b.send(toA.id, blob);
    b.send(toC.id, blob);
  }
  await cut;
  assert.equal((await down)[0], 'total-a');
  assert.equal(b.isUp('total-c'), true, 'the other connection stays');
});
