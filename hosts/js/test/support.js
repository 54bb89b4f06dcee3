// What the tests share: the Rust `aemp` binary and a Rust node to talk to.

import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, readFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

/** The repository's root. */
export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** The `aemp` binary built by `cargo build -p aemp-host` (debug, else release). */
export const aemp = [join(root, 'target', 'debug', 'aemp'), join(root, 'target', 'release', 'aemp')].find(existsSync);

/** A network certificate as AnyEvent::MP's `aemp gencert` makes one (`openssl req`,
 * self-signed), with an ECDSA P-256 key: the certificate followed by its key. */
export function networkCert() {
  const dir = mkdtempSync(join(tmpdir(), 'aemp-js-cert-'));
  execFileSync('openssl', ['req', '-new', '-nodes', '-x509', '-days', '3650', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-batch', '-subj', '/CN=AnyEvent::MP', '-keyout', 'key.pem', '-out', 'cert.pem'], { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] });
  return readFileSync(join(dir, 'cert.pem'), 'utf8') + readFileSync(join(dir, 'key.pem'), 'utf8');
}

/** A fresh configuration file holding `secret`, for `PERL_ANYEVENT_MP_RC`. */
export function rcFile(secret) {
  const rc = join(mkdtempSync(join(tmpdir(), 'aemp-js-')), 'rc');
  writeFileSync(rc, JSON.stringify({ secret }));
  return rc;
}

/** Starts `aemp run --echo` with `secret` (and the options `more`, such as `--connect
 * ADDR`); resolves to { addr, child, rc }. */
export async function rustNode(id, secret, framing, withCert = false, more = []) {
  assert.ok(aemp, 'build the aemp binary first (cargo build -p aemp-host)');
  const rcPath = rcFile(secret);
  if (withCert) execFileSync(aemp, ['gencert'], { env: { ...process.env, PERL_ANYEVENT_MP_RC: rcPath }, stdio: 'ignore' });
  const child = spawn(aemp, ['run', '--echo', '--nodeid', id, '--listen', '127.0.0.1:0', '--framing', framing, ...more], {
    env: { ...process.env, PERL_ANYEVENT_MP_RC: rcPath },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  // The node listens before its echo port exists: a message sent in between would find
  // no port, so wait for both lines.
  const lines = createInterface({ input: child.stdout });
  let addr;
  for await (const line of lines) {
    const m = line.match(/^node \S+ listening on (\S+)$/);
    if (m) addr = m[1];
    else if (addr && line.startsWith('echo port ')) {
      return { addr, child, rc: JSON.parse(readFileSync(rcPath, 'utf8')) };
    }
  }
  throw new Error('aemp run printed no address and echo port');
}
