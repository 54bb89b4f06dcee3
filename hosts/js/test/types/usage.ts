// Compiled (not run) by test/types.test.js against the package's declarations, as a
// TypeScript user imports them.
import type { Duplex } from 'node:stream';
import { AempError, DataConnections, Node, Port, decodeCbor, tlsFromPem } from 'aemp-js';
import type { NodeOptions, Value, ValueObject } from 'aemp-js';

const options: NodeOptions = { nodeId: 'ts/', secret: 's', binds: ['127.0.0.1:0'], portCapacity: 16, portBytes: 1 << 20, maxWriteTotal: 64 << 20, dataConnCapacity: 4 };

export async function usage(pem: string): Promise<void> {
  await using node = await Node.start({ ...options, tls: tlsFromPem(pem) });
  const id: string = node.id;
  node.on('node-up', (up: string) => console.log(up));
  node.on('port-down', (port: string, reason: Value[]) => console.log(port, reason));
  node.on('request', (from: string, tag: string, args: Value[]) => console.log(from, tag, args));
  node.on('db-change', (family: string, set: ValueObject, del: string[]) => console.log(family, set, del));
  node.on('log', (level, message) => console.log(level.toUpperCase(), message));
  // @ts-expect-error: no such event
  node.on('message', () => undefined);
  node.handleRequests('ping');
  node.connect('127.0.0.1:4040');
  await node.waitUp('other', 5000);
  const port: Port = node.port();
  if (!node.send('other#echo', port.id, 'hello', 42, new Uint8Array([1]))) await new Promise<void>((r) => node.once('drain', () => r()));
  if (!node.send('other#echo', 'more')) await node.ready('other#echo');
  const waiting: number = port.pendingBytes;
  // @ts-expect-error: a port id is a string
  node.send(42, 'x');
  for await (const args of port) {
    const first: Value = args[0];
    console.log(first);
    break;
  }
  const reply: Value[] | undefined = await port.recv();
  const stream: Duplex = await node.dataConnect('other', 'bulk', [1, 'two'], { timeoutMs: 5000 });
  stream.end(new Uint8Array([1, 2, 3]));
  // @ts-expect-error: the handler's arguments are an array
  await node.dataConnect('other', 'bulk', 'one');
  await using conns: DataConnections = node.handleDataConnections('bulk');
  for await (const { stream: incoming, node: from, id: dataId, args: dataArgs } of conns) {
    incoming.pipe(incoming);
    console.log(from, dataId, dataArgs[0], conns.pending);
    break;
  }
  try {
    await node.dataConnect('other', 'nope');
  } catch (e) {
    if (e instanceof AempError && e.code === 'DATA_CONN') console.log(e.message);
  }
  node.dbSet('family', 'key', { any: ['value'] });
  const all: ValueObject = await node.dbFamily('family');
  const keys: string[] = await node.dbKeys('family');
  const values: Value[] = await node.dbValues('family');
  try {
    node.sendBatch([[id, [1]], ['other#x', [2]]]);
  } catch (e) {
    if (e instanceof AempError && e.code === 'PORT_FULL') console.log(e.sent);
  }
  console.log(reply, all, keys, values, waiting, decodeCbor(new Uint8Array([0xf6])), node.state);
  await node.close({ timeoutMs: 500 });
}
