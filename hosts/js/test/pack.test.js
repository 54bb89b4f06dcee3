// The package as npm publishes it works from a clean directory: `npm pack` (which builds
// gen/ through `prepack`), `npm install` of the tarball in a temporary project (its
// dependencies from the registry), then that project imports `aemp-js`, exchanges a
// message with a Rust `aemp` node and type-checks against the installed declarations.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rustNode } from './support.js';

const here = dirname(dirname(fileURLToPath(import.meta.url)));

const app = `
import { Node } from 'aemp-js';
const node = await Node.start({ nodeId: 'js-packed', secret: 'shared' });
node.connect(process.argv[2]);
await node.waitUp('rust-packed');
const port = node.port();
node.send('rust-packed#echo', port.id, 'from the tarball', 7);
const reply = await port.recv();
await node.close();
console.log(JSON.stringify(reply));
`;

const typed = `
import { Node, type Value } from 'aemp-js';
const node: Node = await Node.start({ nodeId: 'ts/' });
const reply: Value[] | undefined = await node.port().recv();
console.log(reply);
`;

test('npm pack, install in a clean directory, and a round trip with a Rust node', { timeout: 300000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'aemp-js-pack-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const npm = (args, cwd) => execFileSync('npm', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const [{ filename, files }] = JSON.parse(npm(['pack', '--json', '--pack-destination', dir], here));
  const packed = files.map((f) => f.path);
  for (const path of ['package.json', 'src/node.js', 'src/node.d.ts', 'gen/engine.js', 'gen/engine.core.wasm']) {
    assert.ok(packed.includes(path), `${path} is in the package (${packed.join(', ')})`);
  }
  assert.ok(!packed.some((p) => p.startsWith('test/') || p.startsWith('node_modules/')), packed.join(', '));

  const project = join(dir, 'project');
  mkdirSync(project);
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'uses-aemp-js', private: true, type: 'module' }));
  npm(['install', '--no-audit', '--no-fund', '--prefer-offline', join(dir, filename)], project);

  const { addr, child } = await rustNode('rust-packed', 'shared', 'cbor');
  t.after(() => child.kill());
  writeFileSync(join(project, 'app.js'), app);
  const out = execFileSync(process.execPath, ['app.js', addr], { cwd: project, encoding: 'utf8', timeout: 30000 });
  assert.deepEqual(JSON.parse(out), ['from the tarball', 7]);

  // The installed declarations, through the package's `exports`, with this repository's
  // TypeScript and Node.js types.
  writeFileSync(join(project, 'typed.ts'), typed);
  writeFileSync(join(project, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      target: 'es2022', module: 'nodenext', moduleResolution: 'nodenext', strict: true, noEmit: true,
      types: ['node'], typeRoots: [join(here, 'node_modules', '@types')],
    },
    files: ['typed.ts'],
  }));
  execFileSync(join(here, 'node_modules', '.bin', 'tsc'), ['-p', project], { stdio: 'inherit' });
});
