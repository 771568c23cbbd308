// docs/WEBHOOKS.md's Node.js verification, run by the webhook tests over what the receiver
// recorded: every delivery verifies with the Standard Webhooks library, a changed body does not.
// argv: received.jsonl secret
import { readFileSync } from "node:fs";
import { Webhook } from "standardwebhooks";

const [file, secret] = process.argv.slice(2);
const hook = new Webhook(secret);
let verified = 0;
for (const line of readFileSync(file, "utf8").split("\n").filter(Boolean)) {
  const got = JSON.parse(line);
  if (got.answer !== 204) continue;
  const event = hook.verify(got.raw, got.headers);
  if (event.type !== got.event.type) throw new Error(`type ${event.type} != ${got.event.type}`);
  let refused = false;
  try {
    hook.verify(got.raw.replace('"data"', '"Data"'), got.headers);
  } catch {
    refused = true;
  }
  if (!refused) throw new Error("a changed body verified");
  verified += 1;
}
console.log(`verified ${verified}`);
