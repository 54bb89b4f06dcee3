// Transpiles the engine component (built by `cargo build -p aemp-host`) into gen/ with jco.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const component = join(here, '..', '..', 'target', 'wasm', 'aemp_engine.component.wasm');
if (!existsSync(component)) {
  console.error(`aemp-js: ${component} is missing: run \`cargo build -p aemp-host\` first`);
  process.exit(1);
}
const jco = join(here, 'node_modules', '.bin', 'jco');
execFileSync(jco, ['transpile', component, '-o', join(here, 'gen'), '--name', 'engine', '--quiet'], { stdio: 'inherit' });
