'use strict';
// The Node.js sealer against the shared vectors and, when the harness gives one, a daemon.
// tests/sealers.rs runs this with a daemon and reads the stored records back with
// `tokenvault get`; alone, `node --test clients/node/test/` runs the known-answer part only.

const test = require('node:test');
const assert = require('node:assert');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const util = require('node:util');
const { seal, Client, TokenvaultError, VaultUnreachable } = require('..');

const ROOT = path.resolve(__dirname, '..', '..', '..');
const VECTORS = path.join(ROOT, 'tests', 'vectors');
const KEYS = path.join(ROOT, 'keys', 'test');

function vector(file) {
  const fields = {};
  for (const line of fs.readFileSync(path.join(VECTORS, file), 'utf8').split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.indexOf(': ');
    fields[line.slice(0, i)] = line.slice(i + 2);
  }
  return fields;
}

const OK = fs.readdirSync(VECTORS).filter((f) => f.startsWith('ok-')).sort();

for (const file of OK) {
  test(`resealing ${file} with its DEK and nonce gives its bytes`, () => {
    const v = vector(file);
    const pem = fs.readFileSync(path.join(KEYS, `${v.sealed_with}.pub.pem`), 'utf8');
    const expected = Buffer.from(v.envelope, 'hex');
    const dek = Buffer.from(v.dek, 'hex');
    const got = seal(pem, v.id, v.owner, v.provider, v.kind, Buffer.from(v.plaintext, 'hex'), {
      dek,
      nonce: Buffer.from(v.nonce, 'hex'),
    });
    const n = expected.readUInt16BE(36);
    assert.strictEqual(got.length, expected.length);
    assert.deepStrictEqual(got.subarray(0, 38), expected.subarray(0, 38));
    assert.deepStrictEqual(got.subarray(38 + n), expected.subarray(38 + n));
    // RSA-OAEP is randomized: the wrapped DEK differs, and unwraps to the same DEK.
    const privateKey = fs.readFileSync(path.join(KEYS, `${v.sealed_with}.key.pem`), 'utf8');
    const unwrapped = crypto.privateDecrypt(
      {
        key: privateKey,
        padding: crypto.constants.RSA_PKCS1_OAEP_PADDING,
        oaepHash: 'sha256',
        oaepLabel: Buffer.from('tokenvault/v1/dek'),
      },
      got.subarray(38, 38 + n),
    );
    assert.deepStrictEqual(unwrapped, dek);
  });
}

test('bad input is refused before anything is sealed', () => {
  const pem = fs.readFileSync(path.join(KEYS, 'fixture-a.pub.pem'), 'utf8');
  assert.throws(() => seal(pem, 'a', 'o', 'p', 'password', Buffer.from('x')), /unknown kind/);
  for (const secret of [Buffer.alloc(0), Buffer.alloc(65537), 'text']) {
    assert.throws(() => seal(pem, 'a', 'o', 'p', 'access_token', secret), /1 to 65536 bytes/);
  }
  const ec = fs.readFileSync(path.join(KEYS, 'fixture-ec.pub.pem'), 'utf8');
  assert.throws(() => seal(ec, 'a', 'o', 'p', 'access_token', Buffer.from('x')), /RSA, 2048 to 4096/);
  assert.throws(() => new Client('ftp://x', 'c'), /https:\/\//);
  for (const url of ['http://vault.example:50051', 'http://10.0.0.5:1', 'http://[2001:db8::1]:1', 'http://127.0.0.1.example.com:1']) {
    assert.throws(() => new Client(url, 'c'), /must be https:\/\/ unless the daemon is on loopback/, url);
  }
  for (const url of ['http://127.0.0.1:1', 'http://127.0.0.2:1', 'http://[::1]:1', 'http://localhost:1', 'https://vault.example']) {
    new Client(url, 'c');
  }
  const client = new Client('http://127.0.0.1:1', 'c-secret');
  assert.ok(!util.inspect(client).includes('c-secret'));
  assert.ok(!JSON.stringify(client).includes('c-secret'));
});

const URL = process.env.TOKENVAULT_TEST_URL;
// The harness's daemon serves TLS with a certificate from this private CA.
const CA = process.env.TOKENVAULT_TEST_CA && fs.readFileSync(process.env.TOKENVAULT_TEST_CA);
const withDaemon = { skip: URL === undefined ? 'run by tests/sealers.rs with a daemon' : false };

test("the daemon's private CA is needed and enough", withDaemon, async () => {
  assert.ok(URL.startsWith('https://'));
  await assert.rejects(new Client(URL, process.env.TOKENVAULT_INGEST_TOKEN).publicKey(),
    (e) => e instanceof VaultUnreachable && /certificate/i.test(e.message));
  assert.ok((await new Client(URL, process.env.TOKENVAULT_INGEST_TOKEN, { ca: CA }).publicKey()).version >= 1);
});

test('vectors are stored over HTTP/JSON for the harness to read back', withDaemon, async () => {
  const client = new Client(URL, process.env.TOKENVAULT_INGEST_TOKEN, { ca: CA });
  const key = await client.publicKey();
  assert.strictEqual(key.state, 'KEY_STATE_ACTIVE');
  for (const file of OK) {
    const v = vector(file);
    const id = `node-${file.replace(/\.txt$/, '')}`;
    const envelope = seal(key.spkiPem, id, v.owner, v.provider, v.kind, Buffer.from(v.plaintext, 'hex'));
    const version = await client.putSealed({ id, owner: v.owner, provider: v.provider, kind: v.kind, envelope, scopes: ['read'] });
    assert.strictEqual(version, 1n);
  }
  const items = [0, 1, 2].map((i) => ({
    id: `node-batch-${i}`, owner: 'o', provider: 'github', kind: 'api_key',
    envelope: seal(key.spkiPem, `node-batch-${i}`, 'o', 'github', 'api_key', Buffer.from(`batch-${i}`)),
  }));
  assert.deepStrictEqual(await client.putSealedBatch(items), [1n, 1n, 1n]);
});

test('refusals carry the gRPC code and the HTTP status', withDaemon, async () => {
  const client = new Client(URL, process.env.TOKENVAULT_INGEST_TOKEN, { ca: CA });
  const pem = (await client.publicKey()).spkiPem;
  const record = { id: 'node-dup', owner: 'o', provider: 'github', kind: 'access_token',
    envelope: seal(pem, 'node-dup', 'o', 'github', 'access_token', Buffer.from('t')) };
  await client.putSealed(record);
  // The very same write again (a blind retry) answers the stored version; a new seal of the
  // same id is a conflict.
  assert.strictEqual(await client.putSealed(record), 1n);
  const other = { ...record, envelope: seal(pem, 'node-dup', 'o', 'github', 'access_token', Buffer.from('t')) };
  await assert.rejects(client.putSealed(other), (e) => e instanceof TokenvaultError && e.status === 409 && e.code === 'ALREADY_EXISTS');
  await assert.rejects(client.putSealed({ ...record, expectedVersion: 9 }), (e) => e.status === 412 && e.code === 'ABORTED');
  await assert.rejects(new Client(URL, 'tv_wrong', { ca: CA }).publicKey(), (e) => e.status === 401 && e.code === 'UNAUTHENTICATED');
});

test('an unreachable daemon rejects with the package\'s own error, without the credential', async () => {
  // Port 1 on loopback: nothing listens there, the connection is refused at once.
  await assert.rejects(new Client('http://127.0.0.1:1', 'c-secret-credential', { timeoutMs: 5000 }).publicKey(), (e) =>
    e instanceof VaultUnreachable && e instanceof TokenvaultError && e.status === 0 && e.code === 'UNAVAILABLE' &&
    !e.message.includes('c-secret-credential'));
});

test('the ES module entry exports the same API', async () => {
  const esm = await import('tokenvault-sealer');
  const cjs = require('..');
  for (const name of ['KINDS', 'seal', 'Client', 'TokenvaultError', 'VaultUnreachable', 'version']) {
    assert.strictEqual(esm[name], cjs[name], name);
  }
  const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8'));
  assert.strictEqual(cjs.version, pkg.version);
});
