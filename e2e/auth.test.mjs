// A page against an authenticated wss:// server (SPEC section 10): the
// server runs with --auth and the certificate QUIC generated for it
// (--tls-cert/--tls-key), so the page is served over https:// and its
// client connects to wss:// and says `hello` with its principal's secret.

import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";

import { launchBrowser, startServer } from "./support.mjs";

const TIMEOUT = { timeout: 60_000 };

const POLICY = `
[[principal]]
name = "ops"
secret = "ops-secret"
locks = [""]
sets = [""]
read = [""]
admin = true

[[principal]]
name = "tabs"
secret = "tabs-secret"
locks = ["tab/"]
read = ["tab/"]
`;

describe("in Chromium, against an authenticated wss:// server", () => {
  let dir;
  let server;
  let browser;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "deadbolt-e2e-auth-"));
    // A server with QUIC on writes a self-signed certificate for localhost
    // into its data directory: the pair the secure server is given.
    const certifier = await startServer({ dataDir: path.join(dir, "data"), args: ["--quic", "127.0.0.1:0", "--in-memory"] });
    await certifier.stop();
    const auth = path.join(dir, "auth.toml");
    await writeFile(auth, POLICY);
    const cert = path.join(dir, "data", "cert.pem");
    const key = path.join(dir, "data", "key.pem");
    server = await startServer({ args: ["--auth", auth, "--tls-cert", cert, "--tls-key", key] });
    browser = await launchBrowser({ ignoreHTTPSErrors: true });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("the server listens on wss:// and serves its pages over https://", TIMEOUT, () => {
    assert.match(server.url, /^wss:\/\/127\.0\.0\.1:\d+\/ws$/);
    assert.match(server.origin, /^https:\/\//);
  });

  test("a page connects with its secret, is refused without it, and is held to its grants", TIMEOUT, async () => {
    const page = await browser.context.newPage();
    await page.goto(`${server.origin}/healthz`);
    const seen = await page.evaluate(async () => {
      const deadbolt = await import("/deadbolt.js");
      const refused = await deadbolt
        .connect(undefined, { retryFor: 0 })
        .then(() => "connected", (error) => error.code);
      const client = await deadbolt.connect(undefined, { auth: "tabs-secret" });
      const lock = await client.tryLock("tab/1", { ttl: 30_000 });
      const outside = await client.tryLock("other", { ttl: 30_000 }).then(() => "granted", (error) => error.code);
      const stats = await client.stats().then(() => "answered", (error) => error.code);
      const info = await client.inspect("tab/1");
      await lock.unlock();
      await client.close();
      return { url: client.url, refused, token: lock.token, holderToken: info.holder.token, outside, stats };
    });
    await page.close();
    assert.match(seen.url, /^wss:\/\//);
    assert.equal(seen.refused, "unauthorized");
    assert.ok(Number.isInteger(seen.token) && seen.token > 0, JSON.stringify(seen));
    assert.equal(seen.holderToken, seen.token, "the holder sees its own token");
    assert.equal(seen.outside, "unauthorized");
    assert.equal(seen.stats, "unauthorized", "stats is for admins");
  });

  test("the dashboard goes live with an admin's secret in its fragment", TIMEOUT, async () => {
    const page = await browser.context.newPage();
    await page.goto(`${server.origin}/#auth=ops-secret`);
    await page.waitForSelector('#status[data-state="live"]', { timeout: 10_000 });
    // The secret is taken out of the address bar.
    assert.equal(new URL(page.url()).hash, "");
    await page.close();
  });
});
