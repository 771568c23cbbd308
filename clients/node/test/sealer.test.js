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
const sealer = require('..');
const { seal, Client, TokenvaultError, VaultUnreachable } = sealer;

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
const OK_V2 = fs.readdirSync(VECTORS).filter((f) => f.startsWith('v2-ok-')).sort();

test('the X-Wing implementation gives the X-Wing draft\'s test vectors', () => {
  const XWing = sealer._internal.XWing();
  const { vectors } = JSON.parse(fs.readFileSync(path.join(VECTORS, 'xwing-draft.json'), 'utf8'));
  assert.strictEqual(vectors.length, 3);
  for (const v of vectors) {
    const { publicKey, secretKey } = XWing.keygen(Buffer.from(v.seed, 'hex'));
    assert.strictEqual(Buffer.from(publicKey).toString('hex'), v.pk);
    const { cipherText, sharedSecret } = XWing.encapsulate(publicKey, Buffer.from(v.eseed, 'hex'));
    assert.strictEqual(Buffer.from(cipherText).toString('hex'), v.ct);
    assert.strictEqual(Buffer.from(sharedSecret).toString('hex'), v.ss);
    assert.strictEqual(Buffer.from(XWing.decapsulate(cipherText, secretKey)).toString('hex'), v.ss);
  }
});

test('the HPKE key schedule gives RFC 9180 A.1.1 (X25519, HKDF-SHA256, AES-128-GCM)', () => {
  const { hpkeSuite, keySchedule } = sealer._internal;
  const { key, baseNonce } = keySchedule(
    hpkeSuite(0x0020, 0x0001, 0x0001),
    Buffer.from('fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc', 'hex'),
    Buffer.from('4f6465206f6e2061204772656369616e2055726e', 'hex'),
    16,
  );
  assert.strictEqual(key.toString('hex'), '4531685d41d65f03dc48f6b8302c05b0');
  assert.strictEqual(baseNonce.toString('hex'), '56d890e5accaaf011cff4b7d');
  const cipher = crypto.createCipheriv('aes-128-gcm', key, baseNonce);
  cipher.setAAD(Buffer.from('Count-0'));
  const ct = Buffer.concat([cipher.update(Buffer.from('Beauty is truth, truth beauty')), cipher.final(), cipher.getAuthTag()]);
  assert.strictEqual(ct.toString('hex'), 'f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a');
});

for (const file of OK_V2) {
  test(`resealing ${file} with its DEK, nonce and eseed gives its bytes`, () => {
    const v = vector(file);
    const pem = fs.readFileSync(path.join(KEYS, `${v.sealed_with}.pub.pem`), 'utf8');
    const got = seal(pem, v.id, v.owner, v.provider, v.kind, Buffer.from(v.plaintext, 'hex'), {
      dek: Buffer.from(v.dek, 'hex'),
      nonce: Buffer.from(v.nonce, 'hex'),
      eseed: Buffer.from(v.eseed, 'hex'),
    });
    assert.strictEqual(got.toString('hex'), v.envelope);
  });
}

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
  assert.throws(() => seal(ec, 'a', 'o', 'p', 'access_token', Buffer.from('x')), /RSA, 2048 to 4096 bits, or X-Wing/);
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
// The harness runs the daemon part twice: with an RSA key, then after rotating to X-Wing.
const PREFIX = process.env.TOKENVAULT_TEST_PREFIX || 'node-';
const ALGORITHM = process.env.TOKENVAULT_TEST_ALGORITHM || 'rsa-2048';

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
  assert.strictEqual(key.algorithm, ALGORITHM);
  for (const file of OK) {
    const v = vector(file);
    const id = `${PREFIX}${file.replace(/\.txt$/, '')}`;
    const envelope = seal(key.spkiPem, id, v.owner, v.provider, v.kind, Buffer.from(v.plaintext, 'hex'));
    assert.strictEqual(envelope[3], ALGORITHM === 'x-wing' ? 2 : 1, 'the envelope version of the key');
    const version = await client.putSealed({ id, owner: v.owner, provider: v.provider, kind: v.kind, envelope, scopes: ['read'] });
    assert.strictEqual(version, 1n);
  }
  const items = [0, 1, 2].map((i) => ({
    id: `${PREFIX}batch-${i}`, owner: 'o', provider: 'github', kind: 'api_key',
    envelope: seal(key.spkiPem, `${PREFIX}batch-${i}`, 'o', 'github', 'api_key', Buffer.from(`batch-${i}`)),
  }));
  assert.deepStrictEqual(await client.putSealedBatch(items), [1n, 1n, 1n]);
});

test('refusals carry the gRPC code and the HTTP status', withDaemon, async () => {
  const client = new Client(URL, process.env.TOKENVAULT_INGEST_TOKEN, { ca: CA });
  const pem = (await client.publicKey()).spkiPem;
  const record = { id: `${PREFIX}dup`, owner: 'o', provider: 'github', kind: 'access_token',
    envelope: seal(pem, `${PREFIX}dup`, 'o', 'github', 'access_token', Buffer.from('t')) };
  await client.putSealed(record);
  // The very same write again (a blind retry) answers the stored version; a new seal of the
  // same id is a conflict.
  assert.strictEqual(await client.putSealed(record), 1n);
  const other = { ...record, envelope: seal(pem, `${PREFIX}dup`, 'o', 'github', 'access_token', Buffer.from('t')) };
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
