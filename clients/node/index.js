'use strict';
// Seal secrets for a tokenvault daemon and store them over its HTTP/JSON ingest routes.
//
// Written from docs/ENVELOPE.md and the README's "HTTP/JSON for web tiers" alone, with
// node:crypto and, for X-Wing keys (envelope v2), @noble/post-quantum's X-Wing KEM. The web
// tier holds the vault's public key: it can seal and store, never read back.
//
// Why @noble/post-quantum and not node:crypto for X-Wing: node:crypto has ML-KEM only from
// Node.js 24.7 (OpenSSL 3.5) and no X-Wing combiner at all; one pure implementation, checked
// against the X-Wing draft's vectors in test/, runs the same on every supported Node. HPKE's
// key schedule (RFC 9180 section 5.1, base mode, one message) is a few HMACs over node:crypto
// and is checked against RFC 9180 A.1.1 and the shared v2 vectors.
//
//   const client = new Client('https://vault.internal:50052', credential, { ca: fs.readFileSync('vault-ca.pem') });
//   const key = await client.publicKey();
//   const envelope = seal(key.spkiPem, 'github:user-42', 'user-42', 'github', 'access_token', token);
//   const version = await client.putSealed({ id: 'github:user-42', owner: 'user-42',
//     provider: 'github', kind: 'access_token', envelope });   // a BigInt: 1n
//
// https:// is required unless the daemon is on loopback. Versions are 64-bit: they are BigInts
// here and decimal strings on the wire, never Numbers. Types: index.d.ts.

const crypto = require('node:crypto');
const http = require('node:http');
const https = require('node:https');
const net = require('node:net');
// X-Wing, loaded on first use: only sealing to an X-Wing key needs it, so the RSA path and the
// HTTP client work without it. ESM-only; require(esm) is on by default from Node.js 20.19.
let xwing;
function XWing() {
  if (xwing === undefined) xwing = require('@noble/post-quantum/hybrid.js').ml_kem768_x25519;
  return xwing;
}

// The kind strings bound in the associated data, and their SecretKind names on the wire.
const KINDS = Object.freeze({
  access_token: 'SECRET_KIND_ACCESS_TOKEN',
  refresh_token: 'SECRET_KIND_REFRESH_TOKEN',
  client_secret: 'SECRET_KIND_CLIENT_SECRET',
  api_key: 'SECRET_KIND_API_KEY',
  token_bundle: 'SECRET_KIND_TOKEN_BUNDLE',
});
const LABEL = Buffer.from('tokenvault/v1/dek', 'ascii');
const MAGIC = Buffer.from([0x54, 0x56, 0x45, 0x01]);
const MAGIC_V2 = Buffer.from([0x54, 0x56, 0x45, 0x02]);
// SubjectPublicKeyInfo of an X-Wing key: these 24 bytes (id-XWing, 1.3.6.1.4.1.62253.25722, no
// parameters, and the BIT STRING header), then the 1,216-byte encapsulation key.
const XWING_SPKI_PREFIX = Buffer.from('308204d4300d060b2b0601040183e62d81c87a038204c100', 'hex');
const KEM_XWING = 0x647a;
const KDF_HKDF_SHA256 = 0x0001;
const AEAD_AES_256_GCM = 0x0002;
const HPKE_INFO_LABEL = Buffer.from('tokenvault/v2/dek', 'ascii');

function u16(n) {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

// RFC 9180 section 4: LabeledExtract and LabeledExpand over HKDF-SHA256, for one suite.
function hpkeSuite(kem, kdf, aead) {
  return Buffer.concat([Buffer.from('HPKE', 'ascii'), u16(kem), u16(kdf), u16(aead)]);
}
function labeledExtract(suite, salt, label, ikm) {
  return crypto.createHmac('sha256', salt)
    .update(Buffer.concat([Buffer.from('HPKE-v1', 'ascii'), suite, Buffer.from(label, 'ascii'), ikm]))
    .digest();
}
function labeledExpand(suite, prk, label, info, length) {
  // One HMAC block is enough: every length used here is at most 32 bytes.
  const labeled = Buffer.concat([u16(length), Buffer.from('HPKE-v1', 'ascii'), suite, Buffer.from(label, 'ascii'), info]);
  return crypto.createHmac('sha256', prk).update(labeled).update(Buffer.from([1])).digest().subarray(0, length);
}
// RFC 9180 section 5.1, mode_base (no PSK): the AEAD key and base nonce.
function keySchedule(suite, sharedSecret, info, keyLength) {
  const empty = Buffer.alloc(0);
  const context = Buffer.concat([
    Buffer.from([0]),
    labeledExtract(suite, empty, 'psk_id_hash', empty),
    labeledExtract(suite, empty, 'info_hash', info),
  ]);
  const secret = labeledExtract(suite, sharedSecret, 'secret', empty);
  return {
    key: labeledExpand(suite, secret, 'key', context, keyLength),
    baseNonce: labeledExpand(suite, secret, 'base_nonce', context, 12),
  };
}

function aesGcm(key, nonce, plaintext, aad) {
  const cipher = crypto.createCipheriv(key.length === 32 ? 'aes-256-gcm' : 'aes-128-gcm', key, nonce, { authTagLength: 16 });
  cipher.setAAD(aad);
  return Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
}

// The DER inside a PEM block labelled PUBLIC KEY, or null.
function pemDer(pem) {
  const m = /-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----/.exec(pem);
  return m ? Buffer.from(m[1].replace(/\s+/g, ''), 'base64') : null;
}

function lp(text) {
  const b = Buffer.from(text, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length);
  return Buffer.concat([len, b]);
}

// Returns the envelope (a Buffer) of `secret` (a Buffer) for the record's identity.
// `spkiPem` is the active public key's `spkiPem` (GET /v1/public-keys). `testOnly` ({dek,
// nonce}) exists for known-answer tests; never pass it otherwise.
// An X-Wing key (algorithm "x-wing") gives an envelope v2: the data key sealed with HPKE.
function seal(spkiPem, id, owner, provider, kind, secret, testOnly) {
  if (!Object.prototype.hasOwnProperty.call(KINDS, kind)) {
    throw new RangeError(`unknown kind ${JSON.stringify(kind)}; one of ${Object.keys(KINDS).join(', ')}`);
  }
  if (!Buffer.isBuffer(secret) || secret.length < 1 || secret.length > 65536) {
    throw new RangeError('a secret is a Buffer of 1 to 65536 bytes');
  }
  const der = pemDer(spkiPem);
  if (der && der.length === XWING_SPKI_PREFIX.length + 1216 && der.subarray(0, XWING_SPKI_PREFIX.length).equals(XWING_SPKI_PREFIX)) {
    return sealV2(der, id, owner, provider, kind, secret, testOnly);
  }
  const key = crypto.createPublicKey(spkiPem);
  const bits = key.asymmetricKeyDetails && key.asymmetricKeyDetails.modulusLength;
  if (key.asymmetricKeyType !== 'rsa' || !(bits >= 2048 && bits <= 4096)) {
    throw new RangeError("the vault's key is RSA, 2048 to 4096 bits, or X-Wing");
  }
  const spkiDer = key.export({ type: 'spki', format: 'der' });
  const dek = (testOnly && testOnly.dek) || crypto.randomBytes(32);
  const nonce = (testOnly && testOnly.nonce) || crypto.randomBytes(12);
  const aad = Buffer.concat([MAGIC, lp(id), lp(owner), lp(provider), lp(kind)]);
  const cipher = crypto.createCipheriv('aes-256-gcm', dek, nonce, { authTagLength: 16 });
  cipher.setAAD(aad);
  const ct = Buffer.concat([cipher.update(secret), cipher.final()]);
  const tag = cipher.getAuthTag();
  const wrapped = crypto.publicEncrypt(
    { key, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256', oaepLabel: LABEL },
    dek,
  );
  const len = Buffer.alloc(2);
  len.writeUInt16BE(wrapped.length);
  const fingerprint = crypto.createHash('sha256').update(spkiDer).digest();
  return Buffer.concat([MAGIC, fingerprint, len, wrapped, nonce, ct, tag]);
}

// Envelope v2 (docs/ENVELOPE.md): the token ciphertext exactly as in v1 (the associated data
// keeps its version byte 01), the data key sealed with HPKE base mode to the X-Wing key.
// `testOnly.eseed` (64 bytes of encapsulation randomness) exists for known-answer tests only.
function sealV2(der, id, owner, provider, kind, secret, testOnly) {
  const fingerprint = crypto.createHash('sha256').update(der).digest();
  const publicKey = der.subarray(XWING_SPKI_PREFIX.length);
  const dek = (testOnly && testOnly.dek) || crypto.randomBytes(32);
  const nonce = (testOnly && testOnly.nonce) || crypto.randomBytes(12);
  const aad = Buffer.concat([MAGIC, lp(id), lp(owner), lp(provider), lp(kind)]);
  const token = aesGcm(dek, nonce, secret, aad);
  const { cipherText: enc, sharedSecret } = XWing().encapsulate(publicKey, testOnly && testOnly.eseed);
  const info = Buffer.concat([HPKE_INFO_LABEL, u16(KEM_XWING), fingerprint]);
  const suite = hpkeSuite(KEM_XWING, KDF_HKDF_SHA256, AEAD_AES_256_GCM);
  const { key, baseNonce } = keySchedule(suite, Buffer.from(sharedSecret), info, 32);
  // The first (and only) message of the HPKE context: its nonce is the base nonce.
  const sealedDek = aesGcm(key, baseNonce, dek, Buffer.alloc(0));
  return Buffer.concat([MAGIC_V2, u16(KEM_XWING), fingerprint, u16(enc.length), Buffer.from(enc), sealedDek, nonce, token]);
}

// A refusal: `code` is the gRPC code name (ALREADY_EXISTS), `status` the HTTP one.
class TokenvaultError extends Error {
  constructor(status, code, message) {
    super(`${code} (HTTP ${status}): ${message}`);
    this.name = 'TokenvaultError';
    this.status = status;
    this.code = code;
  }
}

// The daemon could not be reached or did not answer in time (status 0, code UNAVAILABLE).
// Nothing is known to have been written; the same write retried with the same envelope is
// answered with the version it stored, if it did.
class VaultUnreachable extends TokenvaultError {
  constructor(message) {
    super(0, 'UNAVAILABLE', message);
    this.name = 'VaultUnreachable';
  }
}

function isLoopback(hostname) {
  const host = hostname.replace(/^\[|\]$/g, '');
  if (host === 'localhost') return true;
  if (net.isIPv4(host)) return host.startsWith('127.');
  if (net.isIPv6(host)) return host === '::1';
  return false;
}

// The daemon's HTTP/JSON ingest routes, with an ingest credential. Options: `ca` (PEM of a
// private CA the daemon's certificate is signed by; default: Node's bundled roots) and
// `timeoutMs` (per call, default 10000).
class Client {
  #base;
  #credential;
  #agent;
  #timeoutMs;

  constructor(baseUrl, credential, { ca, timeoutMs = 10000 } = {}) {
    let url;
    try {
      url = new URL(baseUrl);
    } catch {
      throw new RangeError('baseUrl must be https:// (or http:// on loopback)');
    }
    if (url.protocol === 'https:') {
      this.#agent = new https.Agent({ ca, keepAlive: true });
    } else if (url.protocol === 'http:') {
      if (!isLoopback(url.hostname)) {
        throw new RangeError('baseUrl must be https:// unless the daemon is on loopback (http://127.0.0.1, http://[::1] or http://localhost)');
      }
      this.#agent = new http.Agent({ keepAlive: true });
    } else {
      throw new RangeError('baseUrl must be https:// (or http:// on loopback)');
    }
    this.#base = baseUrl.replace(/\/+$/, '');
    this.#credential = credential;
    this.#timeoutMs = timeoutMs;
  }

  // Keeps the credential out of console.log and util.inspect.
  [Symbol.for('nodejs.util.inspect.custom')]() {
    return `Client(${this.#base}, credential=[REDACTED])`;
  }

  toJSON() {
    return { baseUrl: this.#base, credential: '[REDACTED]' };
  }

  #call(method, path, body) {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body), 'utf8');
    const headers = { authorization: `Bearer ${this.#credential}` };
    if (payload !== undefined) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(payload.length);
    }
    const url = new URL(this.#base + path);
    const transport = url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const request = transport.request(
        url,
        { method, headers, agent: this.#agent, timeout: this.#timeoutMs },
        (response) => {
          const chunks = [];
          response.on('data', (c) => chunks.push(c));
          response.on('error', (e) => reject(new VaultUnreachable(`reading from ${this.#base}: ${e.message}`)));
          response.on('end', () => {
            const status = response.statusCode || 0;
            let json;
            try {
              json = JSON.parse(Buffer.concat(chunks).toString('utf8'));
            } catch {
              reject(new TokenvaultError(status, 'UNKNOWN', `HTTP ${status} without a JSON body`));
              return;
            }
            if (status < 200 || status > 299) reject(new TokenvaultError(status, json.code, json.message));
            else resolve(json);
          });
        },
      );
      // Refused connections, TLS failures and timeouts; the credential is not in the text.
      request.on('timeout', () => request.destroy(new Error(`no answer within ${this.#timeoutMs} ms`)));
      request.on('error', (e) => reject(new VaultUnreachable(`cannot reach ${this.#base}: ${e.message}`)));
      request.end(payload);
    });
  }

  // The active key: {version, fingerprint, spkiPem, state, createdAt, algorithm, publicKey}
  // (algorithm "rsa-2048", "rsa-3072", "rsa-4096" or "x-wing"; seal() takes spkiPem either way).
  async publicKey() {
    return (await this.#call('GET', '/v1/public-keys')).active;
  }

  static item({ id, owner, provider, kind, envelope, scopes = [], expiresAt = 0, expectedVersion = 0 }) {
    if (!KINDS[kind]) throw new RangeError(`unknown kind ${JSON.stringify(kind)}`);
    return {
      record: {
        meta: { id, owner, provider, kind: KINDS[kind], scopes, expiresAt: BigInt(expiresAt).toString() },
        envelope: Buffer.from(envelope).toString('base64'),
      },
      expectedVersion: BigInt(expectedVersion).toString(),
    };
  }

  // Stores one sealed record; resolves to its new version, a BigInt (expectedVersion 0 creates).
  async putSealed(record) {
    return BigInt((await this.#call('POST', '/v1/records', Client.item(record))).version);
  }

  // Has the daemon redeem an OAuth authorization code and store the token bundle; resolves to
  // {id, version, expiresAt, scopes}, never a token (version and expiresAt as decimal strings,
  // as on the wire).
  async exchangeCode({ id, owner, provider, code, codeVerifier, redirectUri, scopes = [], expectedVersion = 0 }) {
    return this.#call('POST', '/v1/code-exchange', {
      meta: { id, owner, provider, scopes },
      code,
      codeVerifier,
      redirectUri,
      expectedVersion: BigInt(expectedVersion).toString(),
    });
  }

  // Stores several records atomically; resolves to their versions.
  async putSealedBatch(records) {
    const body = { items: records.map((r) => Client.item(r)) };
    return (await this.#call('POST', '/v1/records:batch', body)).versions.map((v) => BigInt(v));
  }
}

const version = '0.1.0';

module.exports = { KINDS, seal, Client, TokenvaultError, VaultUnreachable, version };
// For this package's tests (RFC 9180's and the X-Wing draft's vectors); not part of the API.
Object.defineProperty(module.exports, '_internal', { value: { hpkeSuite, keySchedule, XWing }, enumerable: false });
