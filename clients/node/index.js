'use strict';
// Seal secrets for a tokenvault daemon and store them over its HTTP/JSON ingest routes.
//
// Written from docs/ENVELOPE.md and the README's "HTTP/JSON for web tiers" alone, with
// node:crypto and fetch only. The web tier holds the vault's public key: it can seal and
// store, never read back.
//
//   const client = new Client('https://vault.internal:50052', credential);
//   const key = await client.publicKey();
//   const envelope = seal(key.spkiPem, 'github:user-42', 'user-42', 'github', 'access_token', token);
//   const version = await client.putSealed({ id: 'github:user-42', owner: 'user-42',
//     provider: 'github', kind: 'access_token', envelope });
//
// TLS: Node's fetch trusts the system's CAs; for a private CA start node with
// NODE_EXTRA_CA_CERTS=vault-ca.pem.

const crypto = require('node:crypto');

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

function lp(text) {
  const b = Buffer.from(text, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length);
  return Buffer.concat([len, b]);
}

// Returns the envelope (a Buffer) of `secret` (a Buffer) for the record's identity.
// `spkiPem` is the active public key's `spkiPem` (GET /v1/public-keys). `testOnly` ({dek,
// nonce}) exists for known-answer tests; never pass it otherwise.
function seal(spkiPem, id, owner, provider, kind, secret, testOnly) {
  if (!Object.prototype.hasOwnProperty.call(KINDS, kind)) {
    throw new RangeError(`unknown kind ${JSON.stringify(kind)}; one of ${Object.keys(KINDS).join(', ')}`);
  }
  if (!Buffer.isBuffer(secret) || secret.length < 1 || secret.length > 65536) {
    throw new RangeError('a secret is a Buffer of 1 to 65536 bytes');
  }
  const key = crypto.createPublicKey(spkiPem);
  const bits = key.asymmetricKeyDetails && key.asymmetricKeyDetails.modulusLength;
  if (key.asymmetricKeyType !== 'rsa' || !(bits >= 2048 && bits <= 4096)) {
    throw new RangeError("the vault's key is RSA, 2048 to 4096 bits");
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

// A refusal: `code` is the gRPC code name (ALREADY_EXISTS), `status` the HTTP one.
class TokenvaultError extends Error {
  constructor(status, code, message) {
    super(`${code} (HTTP ${status}): ${message}`);
    this.name = 'TokenvaultError';
    this.status = status;
    this.code = code;
  }
}

// The daemon's HTTP/JSON ingest routes, with an ingest credential.
class Client {
  #base;
  #credential;

  constructor(baseUrl, credential) {
    if (!/^https?:\/\//.test(baseUrl)) throw new RangeError('baseUrl must be http:// (loopback) or https://');
    this.#base = baseUrl.replace(/\/+$/, '');
    this.#credential = credential;
  }

  // Keeps the credential out of console.log and util.inspect.
  [Symbol.for('nodejs.util.inspect.custom')]() {
    return `Client(${this.#base}, credential=[REDACTED])`;
  }

  toJSON() {
    return { baseUrl: this.#base, credential: '[REDACTED]' };
  }

  async #call(method, path, body) {
    const headers = { authorization: `Bearer ${this.#credential}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const response = await fetch(this.#base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      throw new TokenvaultError(response.status, 'UNKNOWN', `HTTP ${response.status} without a JSON body`);
    }
    if (!response.ok) throw new TokenvaultError(response.status, json.code, json.message);
    return json;
  }

  // The active key: {version, fingerprint, spkiPem, state, createdAt}.
  async publicKey() {
    return (await this.#call('GET', '/v1/public-keys')).active;
  }

  static item({ id, owner, provider, kind, envelope, scopes = [], expiresAt = 0, expectedVersion = 0 }) {
    if (!KINDS[kind]) throw new RangeError(`unknown kind ${JSON.stringify(kind)}`);
    return {
      record: {
        meta: { id, owner, provider, kind: KINDS[kind], scopes, expiresAt: String(expiresAt) },
        envelope: Buffer.from(envelope).toString('base64'),
      },
      expectedVersion: String(expectedVersion),
    };
  }

  // Stores one sealed record; resolves to its new version (expectedVersion 0 creates).
  async putSealed(record) {
    return Number((await this.#call('POST', '/v1/records', Client.item(record))).version);
  }

  // Has the daemon redeem an OAuth authorization code and store the token bundle; resolves to
  // {id, version, expiresAt, scopes}, never a token.
  async exchangeCode({ id, owner, provider, code, codeVerifier, redirectUri, scopes = [], expectedVersion = 0 }) {
    return this.#call('POST', '/v1/code-exchange', {
      meta: { id, owner, provider, scopes },
      code,
      codeVerifier,
      redirectUri,
      expectedVersion: String(expectedVersion),
    });
  }

  // Stores several records atomically; resolves to their versions.
  async putSealedBatch(records) {
    const body = { items: records.map((r) => Client.item(r)) };
    return (await this.#call('POST', '/v1/records:batch', body)).versions.map(Number);
  }
}

module.exports = { KINDS, seal, Client, TokenvaultError };
