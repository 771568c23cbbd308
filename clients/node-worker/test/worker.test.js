"use strict";
// tokenvault-worker against a real daemon over TLS with a private CA (and mutual TLS), started
// by the workspace's test command (tests/it/sdk.rs) with the records the Python SDK's suite
// uses: `sdk-token` (access token `sdk-secret-token` of provider github), `sdk-revoked`; the
// github provider points at a fake API whose /api/me needs that token.

const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const util = require("node:util");

const { Worker, Secret, TokenvaultError, status } = require("..");

const TARGET = process.env.TOKENVAULT_TEST_TARGET;
const CA = fs.readFileSync(process.env.TOKENVAULT_TEST_CA);
const TOKEN = process.env.TOKENVAULT_WORKER_TOKEN;

const worker = (options = {}) =>
  new Worker(TARGET, { credential: TOKEN, rootCertificates: CA, timeoutMs: 5000, ...options });

async function rejectsWith(promise, code) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof TokenvaultError, String(e));
    assert.equal(e.code, code, `${e.codeName}: ${e.details}`);
    return true;
  });
}

test("getToken returns the secret and never prints it", async () => {
  const vault = worker();
  try {
    const token = await vault.getToken("sdk-token");
    assert.equal(token.secret.revealText(), "sdk-secret-token");
    assert.deepEqual(
      [token.recordId, token.provider, token.kind, token.version],
      ["sdk-token", "github", "SECRET_KIND_ACCESS_TOKEN", 1],
    );
    for (const shown of [String(token.secret), util.inspect(token), JSON.stringify(token)]) {
      assert.ok(!shown.includes("sdk-secret-token"), shown);
    }
    assert.match(util.inspect(token), /Secret\(<16 bytes>\)/);
    assert.equal(util.inspect(vault), "Worker(<connection>)");
  } finally {
    vault.close();
  }
});

test("refusals are TokenvaultErrors with the gRPC code", async () => {
  const vault = worker();
  try {
    await rejectsWith(vault.getToken("sdk-missing"), status.NOT_FOUND);
    await rejectsWith(vault.getToken("sdk-revoked"), status.FAILED_PRECONDITION);
    await rejectsWith(vault.getToken("bad id!"), status.INVALID_ARGUMENT);
  } finally {
    vault.close();
  }
  const wrong = worker({ credential: "tv_wrong_credential" });
  try {
    await assert.rejects(wrong.getToken("sdk-token"), (e) => {
      assert.equal(e.code, status.UNAUTHENTICATED);
      assert.ok(!String(e).includes("tv_wrong"));
      return true;
    });
  } finally {
    wrong.close();
  }
});

test("mutual TLS identifies the worker without a bearer credential", async () => {
  const vault = worker({
    credential: undefined,
    privateKey: fs.readFileSync(process.env.TOKENVAULT_TEST_CLIENT_KEY),
    certChain: fs.readFileSync(process.env.TOKENVAULT_TEST_CLIENT_CERT),
  });
  try {
    assert.equal((await vault.getToken("sdk-token")).secret.revealText(), "sdk-secret-token");
  } finally {
    vault.close();
  }
  const anonymous = worker({ credential: undefined });
  try {
    await rejectsWith(anonymous.getToken("sdk-token"), status.UNAUTHENTICATED);
  } finally {
    anonymous.close();
  }
});

test("proxy injects the token and policy refusals are errors", async () => {
  const vault = worker();
  try {
    const answer = await vault.proxy("sdk-token", "GET", "/me", { headers: [["X-Request-Id", "sdk-2"]] });
    assert.equal(answer.status, 200);
    assert.match(answer.body.toString(), /octocat/);
    await rejectsWith(vault.proxy("sdk-token", "GET", "http://elsewhere.example/"), status.PERMISSION_DENIED);
  } finally {
    vault.close();
  }
});

test("grants proxy until revoked", async () => {
  const vault = worker();
  try {
    const grant = await vault.issueGrant({ recordId: "sdk-token", methods: ["GET"], ttlSeconds: 60 });
    assert.ok(!util.inspect(grant).includes("tvg_"));
    assert.equal((await vault.proxy("", "GET", "/me", { grant: grant.grant })).status, 200);
    await vault.revokeGrant(grant);
    await rejectsWith(vault.revokeGrant(grant), status.NOT_FOUND);
    await rejectsWith(vault.proxy("", "GET", "/me", { grant: grant.grant }), status.PERMISSION_DENIED);
  } finally {
    vault.close();
  }
});

test("an unreachable daemon is UNAVAILABLE within the deadline, retried only when safe", async () => {
  const started = Date.now();
  const vault = new Worker("127.0.0.1:9", { insecure: true, credential: TOKEN, timeoutMs: 2000, backoffMs: 1 });
  try {
    await assert.rejects(vault.getToken("sdk-token"), (e) => {
      assert.ok([status.UNAVAILABLE, status.DEADLINE_EXCEEDED].includes(e.code), e.codeName);
      return true;
    });
    await rejectsWith(vault.proxy("sdk-token", "POST", "/upload"), status.UNAVAILABLE);
  } finally {
    vault.close();
  }
  assert.ok(Date.now() - started < 5000);
  assert.throws(() => new Worker(TARGET, { timeoutMs: 0 }), RangeError);
  assert.equal(String(new Secret("abc")), "Secret(<3 bytes>)");
});

test("the proto is the daemon's own file", () => {
  const { PROTO } = require("..");
  const workspace = path.join(__dirname, "..", "..", "..", "proto", "tokenvault", "v1", "tokenvault.proto");
  assert.equal(fs.readFileSync(PROTO, "utf8"), fs.readFileSync(workspace, "utf8"));
});
