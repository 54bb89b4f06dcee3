// The TypeScript declarations describe the API: a usage file compiles under `strict`
// against the package as users import it (through `exports`), and misuse does not.

import { test } from 'node:test';
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(dirname(fileURLToPath(import.meta.url)));

test('the declarations type-check a strict usage file', () => {
  execFileSync(join(here, 'node_modules', '.bin', 'tsc'), ['-p', join(here, 'test', 'types')], { stdio: 'inherit' });
});
