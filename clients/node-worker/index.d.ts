/// <reference types="node" />
import type { status as GrpcStatus } from "@grpc/grpc-js";

/** A secret value: never shown by toString, inspect or JSON; reveal() returns it. */
export declare class Secret {
  constructor(value: Uint8Array | string);
  reveal(): Buffer;
  revealText(): string;
  readonly length: number;
  toString(): string;
  toJSON(): string;
}

/** A call the daemon refused or could not answer. */
export declare class TokenvaultError extends Error {
  /** The gRPC status code (grpc.status). */
  readonly code: number;
  /** Its name, e.g. "NOT_FOUND". */
  readonly codeName: string;
  readonly details: string;
  /** google.rpc.ErrorInfo reason (e.g. "STALE_VERSION"), or "". */
  readonly reason: string;
  readonly metadata: Record<string, string>;
}

export interface WorkerOptions {
  /** The bearer credential (not needed when the client certificate identifies the worker). */
  credential?: string;
  /** The daemon's CA (PEM); omitted: the system roots. */
  rootCertificates?: Buffer;
  /** Mutual TLS: the client's key and certificate chain (PEM). */
  privateKey?: Buffer;
  certChain?: Buffer;
  serverName?: string;
  /** Plaintext, for a loopback daemon only. */
  insecure?: boolean;
  /** Each call's deadline (default 10000). */
  timeoutMs?: number;
  /** Attempts of a call safe to repeat on UNAVAILABLE (default 4). */
  maxAttempts?: number;
  /** The backoff's base (default 100). */
  backoffMs?: number;
}

export interface Token {
  recordId: string;
  owner: string;
  provider: string;
  /** e.g. "SECRET_KIND_ACCESS_TOKEN". */
  kind: string;
  version: number;
  keyVersion: number;
  expiresAt: number;
  secret: Secret;
}

export interface ProxyOptions {
  headers?: Array<[string, string | Uint8Array]>;
  body?: Uint8Array | string;
  grant?: Secret | string;
  timeoutMs?: number;
}

export interface ProxyResponse {
  /** The upstream's status (its 4xx/5xx are answers, not errors). */
  status: number;
  headers: Array<[string, Buffer]>;
  body: Buffer;
  refreshed: boolean;
}

export interface GrantRequest {
  recordId?: string;
  owner?: string;
  methods?: string[];
  pathPrefixes?: string[];
  ttlSeconds?: number;
  maxUses?: number;
  audience?: string;
  timeoutMs?: number;
}

export interface Grant {
  grant: Secret;
  grantId: string;
  expiresAt: number;
}

export declare class Worker {
  constructor(target: string, options?: WorkerOptions);
  close(): void;
  getToken(recordId: string, options?: { timeoutMs?: number }): Promise<Token>;
  proxy(recordId: string, method: string, path: string, options?: ProxyOptions): Promise<ProxyResponse>;
  issueGrant(request?: GrantRequest): Promise<Grant>;
  revokeGrant(grant: Grant | Secret | string, options?: { timeoutMs?: number }): Promise<void>;
}

export declare const IDEMPOTENT_METHODS: ReadonlySet<string>;
/** The proto file the client was built from. */
export declare const PROTO: string;
export declare const status: typeof GrpcStatus;
