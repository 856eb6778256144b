// Signed grants in the JavaScript client, from Node (WebCrypto's Ed25519),
// against a real server started with --sign-grants: a real grant's proof
// verifies with the key GET /pubkey serves; a tampered one, one checked
// with another server's key, one for another lock and an expired one are
// refused.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { connectNode, deadbolt, sleep, startServer } from "./support.mjs";

const { ProofError, fetchPublicKeys, verifyProof } = deadbolt;
const TIMEOUT = { timeout: 30_000 };

async function refusedWith(promise, code) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof ProofError, `expected a ProofError, got ${error}`);
    assert.equal(error.code, code, error.message);
    return true;
  });
}

/** `proof` with one character of its payload changed. */
function tampered(proof) {
  const at = proof.indexOf(".") + 5;
  const swapped = proof[at] === "A" ? "B" : "A";
  return proof.slice(0, at) + swapped + proof.slice(at + 1);
}

describe("signed grants in the JavaScript client", () => {
  let server;
  let other;
  let client;

  before(async () => {
    server = await startServer({ args: ["--sign-grants"] });
    other = await startServer({ args: ["--sign-grants"] });
    client = await connectNode(server.url);
  });

  after(async () => {
    await client?.close();
    await server?.stop();
    await other?.stop();
  });

  test("a real grant's proof verifies with the server's key", TIMEOUT, async () => {
    const keys = await fetchPublicKeys(server.origin);
    assert.equal(keys.keys[0].crv, "Ed25519");
    const lock = await client.lock("js/proof", { ttl: 20_000 });
    assert.equal(typeof lock.proof, "string");
    const statement = await verifyProof(lock.proof, keys, { key: "js/proof", token: lock.token });
    assert.equal(statement.token, lock.token);
    assert.equal(statement.client, client.clientId);
    assert.equal(statement.mode, "exclusive");
    assert.equal(statement.ttl_ms, 20_000);
    assert.ok(Math.abs(statement.granted_at_ms - Date.now()) < 5_000);
    // The key as a JWK or as base64url does as well.
    await verifyProof(lock.proof, keys.keys[0]);
    await verifyProof(lock.proof, keys.keys[0].x);
    await lock.unlock();
  });

  test("tampered, other-key, other-lock and expired proofs are refused", TIMEOUT, async () => {
    const keys = await fetchPublicKeys(server.origin);
    const lock = await client.lock("js/refused", { ttl: 20_000 });
    await refusedWith(verifyProof(tampered(lock.proof), keys), "bad_signature");
    await refusedWith(verifyProof(lock.proof, await fetchPublicKeys(other.origin)), "unknown_key");
    await refusedWith(verifyProof(lock.proof, keys, { key: "js/other" }), "other_grant");
    await refusedWith(verifyProof(lock.proof, keys, { token: lock.token + 1 }), "other_grant");
    await refusedWith(verifyProof(lock.proof, keys, { now: Date.now() + 20_001 }), "expired");
    await refusedWith(verifyProof("not a proof", keys), "malformed");
    await lock.unlock();
    // A lease that really ran out.
    const short = await client.lock("js/short", { ttl: 50 });
    await sleep(120);
    await refusedWith(verifyProof(short.proof, keys), "expired");
  });

  test("a server that does not sign gives locks no proof", TIMEOUT, async () => {
    const plain = await startServer();
    const c = await connectNode(plain.url);
    try {
      const lock = await c.lock("js/plain", { ttl: 5_000 });
      assert.equal(lock.proof, null);
      await assert.rejects(fetchPublicKeys(plain.origin), /404/);
    } finally {
      await c.close();
      await plain.stop();
    }
  });
});
