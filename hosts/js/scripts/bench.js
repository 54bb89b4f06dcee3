// Measures the JS host end to end against a node running an echo port (e.g. `aemp run
// --echo --nodeid one --secret shared --listen 127.0.0.1:4040`), as the Go host's
// aemp-bench does: messages/s with a window of messages in flight, then the round-trip
// p50 one message at a time.
// Usage: node scripts/bench.js [--connect ADDR] [--node ID] [--secret S] [--n COUNT] [--window W]
import { parseArgs } from 'node:util';
import { Node } from '../src/node.js';

const { values: opts } = parseArgs({
  options: {
    connect: { type: 'string', default: '127.0.0.1:4040' },
    node: { type: 'string', default: 'one' },
    secret: { type: 'string', default: 'shared' },
    n: { type: 'string', default: '100000' },
    window: { type: 'string', default: '1000' },
  },
});
const count = Number(opts.n);
const window = Number(opts.window);

const node = await Node.start({ nodeId: 'js-bench', secret: opts.secret });
try {
  node.connect(opts.connect);
  await node.waitUp(opts.node);
  const port = node.port();
  const echo = `${opts.node}#echo`;
  let start = performance.now();
  let sent = 0;
  for (let got = 0; got < count; got++) {
    while (sent < count && sent - got < window) {
      if (!node.send(echo, port.id, 'ping', sent)) await node.ready(echo);
      sent++;
    }
    await port.recv();
  }
  const rate = count / ((performance.now() - start) / 1000);
  const rtts = [];
  for (let i = 0; i < 2000; i++) {
    start = performance.now();
    node.send(echo, port.id, 'ping', i);
    await port.recv();
    rtts.push(performance.now() - start);
  }
  rtts.sort((a, b) => a - b);
  const p50 = rtts[rtts.length >> 1] * 1000;
  console.log(`js_host_msgs_per_s ${rate.toFixed(0)}\njs_host_rtt_p50_us ${p50.toFixed(1)}`);
} finally {
  await node.close();
}
