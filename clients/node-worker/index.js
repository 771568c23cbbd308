"use strict";
// A backend worker's client for a tokenvault daemon (`tokenvault.v1.Broker` over gRPC, with
// @grpc/grpc-js). The API mirrors the Python SDK (clients/python-worker): every call has a
// deadline; calls safe to repeat (getToken, revokeGrant, proxy with an idempotent HTTP
// method) are retried on UNAVAILABLE with exponential backoff and full jitter within it; a
// refusal rejects with a TokenvaultError carrying the gRPC code and the google.rpc.ErrorInfo
// reason and metadata; tokens and grant handles are Secret values that never print.

const fs = require("node:fs");
const path = require("node:path");
const util = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

// The daemon's proto: the copy `npm pack` puts in the package (prepack), or in the workspace
// the one file every client and the daemon are built from.
const PROTO = ["proto", "../../proto"]
  .map((dir) => path.join(__dirname, dir, "tokenvault", "v1", "tokenvault.proto"))
  .find((file) => fs.existsSync(file));
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).tokenvault.v1;

// google.rpc.Status and ErrorInfo, to read the `grpc-status-details-bin` trailer.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const StatusProto = rpc.lookupType("google.rpc.Status");
const ErrorInfoProto = rpc.lookupType("google.rpc.ErrorInfo");

/** HTTP methods whose repetition is harmless: a proxy call with one is retried. */
const IDEMPOTENT_METHODS = new Set(["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]);

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

/** A secret value: never shown by toString, inspect or JSON; reveal() returns it. */
class Secret {
  #value;
  constructor(value) {
    this.#value = Buffer.from(value);
  }
  reveal() {
    return Buffer.from(this.#value);
  }
  revealText() {
    return this.#value.toString("utf8");
  }
  get length() {
    return this.#value.length;
  }
  toString() {
    return `Secret(<${this.#value.length} bytes>)`;
  }
  toJSON() {
    return this.toString();
  }
  [util.inspect.custom]() {
    return this.toString();
  }
}

/** A call the daemon refused or could not answer. */
class TokenvaultError extends Error {
  constructor(code, details, reason = "", metadata = {}) {
    const codeName = CODE_NAMES[code] || "UNKNOWN";
    super(`${codeName}: ${details}`);
    this.name = "TokenvaultError";
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.reason = reason;
    this.metadata = metadata;
  }
}

function toError(e) {
  let reason = "";
  let metadata = {};
  const raw = e.metadata && e.metadata.get("grpc-status-details-bin");
  if (raw && raw.length) {
    try {
      const status = StatusProto.decode(raw[0]);
      for (const any of status.details) {
        if (any.type_url.endsWith("/google.rpc.ErrorInfo")) {
          const info = ErrorInfoProto.decode(any.value);
          reason = info.reason;
          metadata = { ...info.metadata };
        }
      }
    } catch {
      // A detail that does not decode leaves reason and metadata empty.
    }
  }
  const code = typeof e.code === "number" ? e.code : grpc.status.UNKNOWN;
  return new TokenvaultError(code, e.details || e.message || "", reason, metadata);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Worker {
  #client;
  #metadata;
  #timeoutMs;
  #maxAttempts;
  #backoffMs;

  /**
   * `target` is host:port. Over TLS give rootCertificates (the daemon's CA, PEM; omitted: the
   * system roots) and, for mutual TLS, privateKey and certChain; `insecure` is for a plaintext
   * loopback daemon only. `credential` is the bearer credential (not needed when the client
   * certificate identifies the worker).
   */
  constructor(target, options = {}) {
    const {
      credential,
      rootCertificates,
      privateKey,
      certChain,
      serverName,
      insecure = false,
      timeoutMs = 10000,
      maxAttempts = 4,
      backoffMs = 100,
    } = options;
    if (!(timeoutMs > 0) || !(maxAttempts >= 1) || !(backoffMs >= 0)) {
      throw new RangeError("timeoutMs > 0, maxAttempts >= 1 and backoffMs >= 0 are required");
    }
    const creds = insecure
      ? grpc.credentials.createInsecure()
      : grpc.credentials.createSsl(rootCertificates || null, privateKey || null, certChain || null);
    const channelOptions = serverName ? { "grpc.ssl_target_name_override": serverName } : {};
    this.#client = new v1.Broker(target, creds, channelOptions);
    this.#metadata = new grpc.Metadata();
    if (credential) this.#metadata.set("authorization", `Bearer ${credential}`);
    this.#timeoutMs = timeoutMs;
    this.#maxAttempts = maxAttempts;
    this.#backoffMs = backoffMs;
  }

  toString() {
    return "Worker(<connection>)";
  }

  [util.inspect.custom]() {
    return this.toString();
  }

  close() {
    this.#client.close();
  }

  async #call(method, request, { timeoutMs, retry }) {
    const deadline = Date.now() + (timeoutMs || this.#timeoutMs);
    for (let attempt = 1; ; attempt++) {
      if (Date.now() >= deadline) {
        throw new TokenvaultError(grpc.status.DEADLINE_EXCEEDED, "the deadline passed");
      }
      try {
        return await new Promise((resolve, reject) => {
          this.#client[method](request, this.#metadata, { deadline: new Date(deadline) }, (err, res) =>
            err ? reject(err) : resolve(res),
          );
        });
      } catch (e) {
        const err = toError(e);
        if (!(retry && err.code === grpc.status.UNAVAILABLE && attempt < this.#maxAttempts)) {
          throw err;
        }
        // Full jitter below an exponential cap: retries of many workers spread out.
        const pause = Math.random() * Math.min(2000, this.#backoffMs * 2 ** (attempt - 1));
        if (Date.now() + pause >= deadline) throw err;
        await sleep(pause);
      }
    }
  }

  /** The record's secret (a token bundle's JSON for token_bundle records). */
  async getToken(recordId, { timeoutMs } = {}) {
    const r = await this.#call("GetToken", { id: recordId }, { timeoutMs, retry: true });
    const meta = r.info.meta;
    return {
      recordId: meta.id,
      owner: meta.owner,
      provider: meta.provider,
      kind: meta.kind,
      version: Number(r.info.version),
      keyVersion: r.info.key_version,
      expiresAt: Number(meta.expires_at),
      secret: new Secret(r.secret),
    };
  }

  /** Calls the record's provider with its credential injected by the daemon. */
  async proxy(recordId, method, path, { headers = [], body = Buffer.alloc(0), grant, timeoutMs } = {}) {
    const request = {
      id: recordId,
      method,
      path,
      headers: headers.map(([name, value]) => ({ name, value: Buffer.from(value) })),
      body: Buffer.from(body),
      grant: grant instanceof Secret ? grant.revealText() : grant || "",
    };
    const r = await this.#call("Proxy", request, {
      timeoutMs,
      retry: IDEMPOTENT_METHODS.has(method.toUpperCase()),
    });
    return {
      status: r.status,
      headers: r.headers.map((h) => [h.name, Buffer.from(h.value)]),
      body: Buffer.from(r.body),
      refreshed: r.refreshed,
    };
  }

  /** A downscoped, expiring handle for proxy; never retried (a retry could mint a second). */
  async issueGrant(
    { recordId = "", owner = "", methods = [], pathPrefixes = [], ttlSeconds = 0, maxUses = 0, audience = "", timeoutMs } = {},
  ) {
    const r = await this.#call(
      "IssueGrant",
      { id: recordId, owner, methods, path_prefixes: pathPrefixes, ttl_seconds: ttlSeconds, max_uses: maxUses, audience },
      { timeoutMs, retry: false },
    );
    return { grant: new Secret(Buffer.from(r.grant)), grantId: r.grant_id, expiresAt: Number(r.expires_at) };
  }

  /** Revokes a grant (by the grant, its handle or its id); one already gone rejects NOT_FOUND. */
  async revokeGrant(grant, { timeoutMs } = {}) {
    const value = grant instanceof Secret ? grant.revealText() : typeof grant === "string" ? grant : grant.grantId;
    await this.#call("RevokeGrant", { grant_id: value }, { timeoutMs, retry: true });
  }
}

module.exports = { Worker, Secret, TokenvaultError, IDEMPOTENT_METHODS, PROTO, status: grpc.status };
