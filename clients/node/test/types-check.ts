// Compiled by `tsc --noEmit` (npm run typecheck), never run: the declarations describe the API
// the tests exercise, with 64-bit values as BigInt.
import { Client, KINDS, TokenvaultError, VaultUnreachable, seal, version } from '..';

async function use(pem: string): Promise<bigint[]> {
  const client = new Client('http://127.0.0.1:50051', 'credential', { timeoutMs: 5000 });
  const key = await client.publicKey();
  const algorithm: string = key.algorithm;
  const envelope: Buffer = seal(key.spkiPem, 'r', 'o', 'github', 'access_token', Buffer.from('t'));
  const one: bigint = await client.putSealed({ id: 'r', owner: 'o', provider: 'github', kind: 'api_key', envelope, expectedVersion: 1n });
  const many: bigint[] = await client.putSealedBatch([{ id: 'r', owner: 'o', provider: 'github', kind: 'token_bundle', envelope }]);
  const exchanged = await client.exchangeCode({ id: 'r', owner: 'o', provider: 'github', code: 'c', codeVerifier: 'v', redirectUri: 'https://app/cb' });
  const v: string = exchanged.version;
  const e: TokenvaultError = new VaultUnreachable('x');
  const k: string = KINDS.access_token;
  void [pem, v, e, k, version, algorithm];
  return [one, ...many];
}

void use;
