// What peers legitimately send decodes into sensible JS values, and nothing a peer sends
// makes the decoder take the process down.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeCbor } from '../src/node.js';

const hex = (h) => Buffer.from(h, 'hex');

test('tags, bignums and non-string keys decode', () => {
  // [1(1600000000), 2(h'010000000000000000'), 3(h'00'), 6(6(["x"])), {1: "a", "k": 2}]
  const value = decodeCbor(hex('85c11a5f5e1000c249010000000000000000c34100c6c6816178a2016161616b02'));
  assert.deepEqual(value[0], new Date(1600000000 * 1000));
  assert.equal(value[1], 2n ** 64n);
  assert.equal(value[2], -1n);
  assert.deepEqual(value[3], ['x']);
  assert.deepEqual(value[4], { 1: 'a', k: 2 });
});

test('maps with keys no object can hold stay maps', () => {
  // {[1]: "a"}
  const value = decodeCbor(hex('a181016161'));
  assert.ok(value instanceof Map);
  assert.deepEqual([...value], [[[1], 'a']]);
});

test('a __proto__ key is an own property, not a prototype', () => {
  // {"__proto__": {"polluted": true}}
  const value = decodeCbor(hex('a1695f5f70726f746f5f5fa168706f6c6c75746564f5'));
  assert.equal(Object.getPrototypeOf(value), Object.prototype);
  assert.deepEqual(Object.keys(value), ['__proto__']);
  assert.equal({}.polluted, undefined);
});

test('what is not CBOR throws, for the node to log and drop', () => {
  assert.throws(() => decodeCbor(hex('ff')));
});
