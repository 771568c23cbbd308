// Types of tokenvault-sealer (index.js / index.mjs).

/// <reference types="node" />

/** The kind strings bound in the associated data, and their `SecretKind` names on the wire. */
export declare const KINDS: Readonly<{
  access_token: 'SECRET_KIND_ACCESS_TOKEN';
  refresh_token: 'SECRET_KIND_REFRESH_TOKEN';
  client_secret: 'SECRET_KIND_CLIENT_SECRET';
  api_key: 'SECRET_KIND_API_KEY';
  token_bundle: 'SECRET_KIND_TOKEN_BUNDLE';
}>;

/** A kind string. */
export type Kind = keyof typeof KINDS;

/** The package version. */
export declare const version: string;

/**
 * The envelope of `secret` (1 to 65536 bytes) for the record's identity, sealed with `spkiPem`
 * (the active public key's `spkiPem`): envelope v1 for an RSA key, v2 (HPKE) for an X-Wing
 * key. `testOnly` exists for known-answer tests; never pass it.
 */
export declare function seal(
  spkiPem: string,
  id: string,
  owner: string,
  provider: string,
  kind: Kind,
  secret: Buffer,
  testOnly?: { dek?: Buffer; nonce?: Buffer; eseed?: Buffer },
): Buffer;

/** A refusal: `code` is the gRPC code name (`ALREADY_EXISTS`), `status` the HTTP status. */
export declare class TokenvaultError extends Error {
  constructor(status: number, code: string, message: string);
  readonly status: number;
  readonly code: string;
}

/** The daemon could not be reached or did not answer in time (`status` 0, `code` `UNAVAILABLE`). */
export declare class VaultUnreachable extends TokenvaultError {
  constructor(message: string);
}

/** The active public key, as `GET /v1/public-keys` lists it. */
export interface PublicKey {
  version: number;
  fingerprint: string;
  spkiPem: string;
  state: string;
  createdAt: string;
  /** `rsa-2048`, `rsa-3072`, `rsa-4096` or `x-wing`. */
  algorithm: string;
  /** Base64: the X-Wing encapsulation key (1,216 bytes), or for RSA the SPKI DER. */
  publicKey: string;
}

/** One record to store. Versions and times are 64-bit: BigInt, or a number within 2^53. */
export interface SealedRecord {
  id: string;
  owner: string;
  provider: string;
  kind: Kind;
  envelope: Uint8Array;
  scopes?: string[];
  expiresAt?: bigint | number;
  expectedVersion?: bigint | number;
}

/** What a code exchange answers: never a token. 64-bit values are decimal strings. */
export interface Exchanged {
  id: string;
  version: string;
  expiresAt: string;
  scopes: string[];
}

/** Options of a [`Client`]. */
export interface ClientOptions {
  /** PEM of a private CA the daemon's certificate is signed by (default: Node's bundled roots). */
  ca?: string | Buffer | Array<string | Buffer>;
  /** Per-call limit, milliseconds (default 10000). */
  timeoutMs?: number;
}

/** The daemon's HTTP/JSON ingest routes. `https://` unless the daemon is on loopback. */
export declare class Client {
  constructor(baseUrl: string, credential: string, options?: ClientOptions);
  publicKey(): Promise<PublicKey>;
  /** Resolves to the record's new version. */
  putSealed(record: SealedRecord): Promise<bigint>;
  /** Stores several records atomically; resolves to their versions. */
  putSealedBatch(records: SealedRecord[]): Promise<bigint[]>;
  exchangeCode(request: {
    id: string;
    owner: string;
    provider: string;
    code: string;
    codeVerifier: string;
    redirectUri: string;
    scopes?: string[];
    expectedVersion?: bigint | number;
  }): Promise<Exchanged>;
  toJSON(): { baseUrl: string; credential: '[REDACTED]' };
}
