// Compiled by `tsc --noEmit` (the test command): the declarations describe the API as used.
import { Worker, Secret, TokenvaultError, status } from "../index.js";

async function use(): Promise<void> {
  const vault = new Worker("localhost:50051", { credential: "tv_x", rootCertificates: Buffer.from("") });
  const token = await vault.getToken("github:user-42", { timeoutMs: 1000 });
  const text: string = token.secret.revealText();
  const answer = await vault.proxy(token.recordId, "GET", "/user", { headers: [["X-Id", "1"]] });
  const code: number = answer.status;
  const grant = await vault.issueGrant({ recordId: "github:user-42", methods: ["GET"], ttlSeconds: 60 });
  await vault.proxy("", "GET", "/user", { grant: grant.grant });
  await vault.revokeGrant(grant);
  try {
    await vault.getToken("missing");
  } catch (e) {
    if (e instanceof TokenvaultError && e.code === status.NOT_FOUND) {
      const reason: string = e.reason;
      void reason;
    }
  }
  void text;
  void code;
  void new Secret("x").reveal();
  vault.close();
}
void use;
