// deadbolt in a real browser: pages that import the client from the
// server's /deadbolt.js and contend for locks and insert into sets, and the
// dashboard at / showing what the server holds.

import assert from "node:assert/strict";
import { mkdir, readFile } from "node:fs/promises";
import path from "node:path";
import { after, before, describe, test } from "node:test";

import { REPO_ROOT, connectNode, eventually, launchBrowser, sleep, startServer } from "./support.mjs";

const TIMEOUT = { timeout: 60_000 };
const SCREENSHOT = path.join(REPO_ROOT, "target/e2e/dashboard.png");

describe("in Chromium", () => {
  let server;
  let browser;
  /** A Node client to look at the server with. */
  let observer;

  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
    observer = await connectNode(server.url);
  });

  after(async () => {
    await observer?.close();
    await browser?.close();
    await server?.stop();
  });

  /** A tab on the server's origin with the client module loaded and
   * connected as `window.client`; resolves with the page and its client id.
   * (/healthz is just a same-origin page that runs nothing of its own.) */
  async function clientPage() {
    const page = await browser.context.newPage();
    await page.goto(`${server.origin}/healthz`);
    const clientId = await page.evaluate(async () => {
      const deadbolt = await import("/deadbolt.js");
      window.deadbolt = deadbolt;
      window.client = await deadbolt.connect();
      return window.client.clientId;
    });
    return { page, clientId };
  }

  async function dashboard() {
    const page = await browser.context.newPage();
    await page.goto(`${server.origin}/`);
    await page.waitForSelector('#status[data-state="live"]');
    return page;
  }

  test("the module is served with its types and keeps a tab's client id across a reload", TIMEOUT, async () => {
    const { page, clientId } = await clientPage();
    assert.match(clientId, /^[0-9a-f]{32}$/);
    const types = await page.evaluate(async () => (await fetch("/deadbolt.d.ts")).text());
    assert.match(types, /export declare function connect/);
    await page.reload();
    const again = await page.evaluate(async () => (await (await import("/deadbolt.js")).connect()).clientId);
    assert.equal(again, clientId, "sessionStorage keeps the id for the tab");
    const other = await clientPage();
    assert.notEqual(other.clientId, clientId, "another tab has its own id");
    await Promise.all([page.close(), other.page.close()]);
  });

  test("two pages contend for a lock; closing the holder's page hands it to the waiter", TIMEOUT, async () => {
    const holder = await clientPage();
    const waiter = await clientPage();
    const first = await holder.page.evaluate(async () => {
      window.held = await window.client.lock("contended", { ttl: 30_000, ephemeral: true });
      return window.held.token;
    });
    assert.equal((await observer.inspect("contended")).holder.client, holder.clientId);

    await waiter.page.evaluate(() => {
      window.granted = null;
      window.client.lock("contended", { ttl: 30_000, ephemeral: true }).then((lock) => (window.granted = lock.token));
    });
    await eventually("the second page to wait", async () => (await observer.inspect("contended")).waiters === 1);
    await sleep(300);
    assert.equal(await waiter.page.evaluate(() => window.granted), null, "the second page still waits");

    // Closing the tab closes its WebSocket: the server releases the
    // ephemeral lock and grants the waiter.
    await holder.page.close();
    const second = await waiter.page.waitForFunction(() => window.granted, null, { timeout: 5000 }).then((h) => h.jsonValue());
    assert.ok(second > first, `the new grant's token ${second} is above ${first}`);
    const info = await observer.inspect("contended");
    assert.equal(info.holder.client, waiter.clientId);
    assert.equal(info.holder.token, second);
    await waiter.page.close();
    await eventually("the second page's lock to go with it", async () => (await observer.inspect("contended")).holder === null);
  });

  test("the same key inserted from two pages is first for exactly one, with one index", TIMEOUT, async () => {
    const a = await clientPage();
    const b = await clientPage();
    await observer.set("pages").setUp(60_000);
    const keys = Array.from({ length: 50 }, (_, i) => `result-${i}`);
    const insert = (page) =>
      page.evaluate(async (keys) => {
        const set = window.client.set("pages");
        await set.setUp(60_000);
        // One key alone and the rest in a batch, both at once from each page.
        const [one, many] = await Promise.all([set.insert("the-same-key"), set.insertMany(keys)]);
        return { one, many };
      }, keys);
    const [fromA, fromB] = await Promise.all([insert(a.page), insert(b.page)]);

    assert.equal([fromA.one.first, fromB.one.first].filter(Boolean).length, 1, "exactly one first");
    assert.equal(fromA.one.index, fromB.one.index, "the same index for both");
    keys.forEach((key, i) => {
      assert.equal(fromA.many[i].first !== fromB.many[i].first, true, `${key}: one first`);
      assert.equal(fromA.many[i].index, fromB.many[i].index, `${key}: one index`);
    });
    const members = [];
    for await (const member of observer.set("pages").members()) members.push(member.key);
    assert.equal(members.length, 51);
    assert.deepEqual(new Set(members), new Set(["the-same-key", ...keys]));
    await Promise.all([a.page.close(), b.page.close()]);
    await observer.set("pages").tearDown();
  });

  test("the dashboard shows a lock taken from Node within two seconds", TIMEOUT, async () => {
    const page = await dashboard();
    const worker = await connectNode(server.url);
    const lock = await worker.lock("shown/on-the-dashboard", { ttl: 20_000 });
    const taken = performance.now();
    const row = page.locator('#held-locks tbody tr[data-key="shown/on-the-dashboard"]');
    await row.waitFor({ timeout: 2000 });
    assert.ok(performance.now() - taken <= 2000);
    assert.equal(await row.locator('[data-field="token"]').textContent(), String(lock.token));
    assert.equal(await row.locator('[data-field="client"]').textContent(), worker.clientId);
    assert.equal(await row.locator('[data-field="waiters"]').textContent(), "0");
    const remaining = Number(await row.locator('[data-field="remaining"]').getAttribute("data-ms"));
    assert.ok(remaining > 15_000 && remaining <= 20_000, `lease left ${remaining}`);
    assert.ok(Number(await page.locator("#locks-held").textContent()) >= 1);
    assert.ok(Number(await page.locator("#connections-websocket").textContent()) >= 3, "observer, worker, dashboard");

    // Released: the row goes within the next refresh or two.
    await lock.unlock();
    await row.waitFor({ state: "detached", timeout: 2500 });
    await worker.close();
    await page.close();
  });

  test("the demo lock: two dashboard tabs contend, and the queue shows", TIMEOUT, async () => {
    const one = await dashboard();
    const two = await dashboard();
    await one.click("#demo-take");
    await one.waitForSelector('#demo-state[data-state="held"]');
    const firstToken = Number(await one.locator("#demo-token").textContent());
    assert.ok(firstToken > 0);

    await two.click("#demo-take");
    await two.waitForSelector('#demo-state[data-state="waiting"]');
    // Both tabs see the queue: the demo key is held with one waiter, and
    // it is the most contended key. The holder's tab marks it as its own.
    for (const page of [one, two]) {
      await page.waitForSelector('#held-locks tr[data-key="demo"] [data-field="waiters"]:text-is("1")', { timeout: 2500 });
      await page.waitForSelector('#contended tr[data-key="demo"]', { timeout: 2500 });
    }
    assert.equal(await one.locator('#held-locks tr[data-key="demo"]').getAttribute("data-mine"), "");
    assert.equal(await two.locator('#held-locks tr[data-key="demo"]').getAttribute("data-mine"), null);

    await one.click("#demo-release");
    await one.waitForSelector('#demo-state[data-state="released"]');
    await two.waitForSelector('#demo-state[data-state="held"]', { timeout: 5000 });
    const secondToken = Number(await two.locator("#demo-token").textContent());
    assert.ok(secondToken > firstToken, "the waiting tab got it with a higher token");
    assert.equal((await observer.inspect("demo")).holder.token, secondToken);

    // A waiting tab can give up: release cancels the wait.
    await one.click("#demo-take");
    await one.waitForSelector('#demo-state[data-state="waiting"]');
    await one.click("#demo-release");
    await one.waitForSelector('#demo-state[data-state="idle"]');
    assert.equal((await observer.inspect("demo")).waiters, 0);

    // Closing the holder's tab releases the ephemeral demo lock.
    await two.close();
    await eventually("the demo lock to be released", async () => (await observer.inspect("demo")).holder === null);
    await one.close();
  });

  test("the dashboard draws rates, sets and connections, and a screenshot is saved", TIMEOUT, async () => {
    // Something to show: held and contended locks, two sets, and a steady
    // stream of grants, expiries and inserts until the screenshot is taken.
    const worker = await connectNode(server.url);
    const other = await connectNode(server.url);
    const page = await dashboard();
    const crawl = worker.set("crawl/2026-11");
    await crawl.setUp(3_600_000);
    await crawl.insertMany(Array.from({ length: 850 }, (_, i) => `page-${i}`));
    const events = worker.set("events/today");
    await events.setUp(600_000);
    const held = [];
    for (const key of ["jobs/report", "jobs/backup", "leader"]) held.push(await worker.lock(key, { ttl: 60_000 }));
    const queued = [other.lock("jobs/report", { ttl: 10_000 }), other.lock("leader", { ttl: 10_000 })];
    let busy = true;
    const activity = (async () => {
      for (let n = 0; busy; n++) {
        await (await worker.lock(`burst/${n % 8}`, { ttl: 10_000 })).unlock();
        await events.insertMany([`e${n % 40}`, `e${(n * 7) % 40}`, `e${n % 40}-x`]);
        if (n % 10 === 0) await worker.lock(`short/${n}`, { ttl: 50 }); // left to expire
        await sleep(40);
      }
    })();

    try {
      // Rates are nonzero once two snapshots have seen the activity.
      const rate = (name) => page.locator(`#rate-${name} [data-field="value"]`).textContent().then(Number);
      await eventually("the grant rate to show", async () => (await rate("grants")) > 0);
      await eventually("the insert rate to show", async () => (await rate("inserts")) > 0);
      await eventually("the expiry rate to show", async () => (await rate("expiries")) > 0, { timeout: 8000 });
      await eventually("a sparkline of several samples", async () => Number(await page.locator("#rate-grants").getAttribute("data-samples")) >= 3);
      const line = await page.locator("#rate-grants polyline").getAttribute("points");
      assert.ok(line.split(" ").length >= 3, `sparkline points: ${line}`);

      const row = page.locator('#sets tr[data-set="crawl/2026-11"]');
      assert.equal(await row.locator('[data-field="size"]').textContent(), "850");
      const ttl = Number(await row.locator('[data-field="remaining"]').getAttribute("data-ms"));
      assert.ok(ttl > 3_500_000 && ttl <= 3_600_000, `set TTL ${ttl}`);
      assert.equal(await page.locator("#sets tbody tr").first().getAttribute("data-set"), "crawl/2026-11", "largest first");
      await page.waitForSelector('#sets tr[data-set="events/today"]');
      await page.waitForSelector('#contended tr[data-key="jobs/report"] [data-field="waiters"]:text-is("1")');
      assert.ok(Number(await page.locator("#locks-waiters").textContent()) >= 2);
      assert.ok(Number(await page.locator("#sets-count").textContent()) >= 2);

      // This tab holds the demo lock: its row is marked as the tab's own.
      await page.click("#demo-take");
      await page.waitForSelector('#demo-state[data-state="held"]');
      await page.waitForSelector('#held-locks tr[data-key="demo"][data-mine]', { timeout: 2500 });

      await mkdir(path.dirname(SCREENSHOT), { recursive: true });
      await page.screenshot({ path: SCREENSHOT, fullPage: true });
      const png = await readFile(SCREENSHOT);
      assert.deepEqual([...png.subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47], "a PNG");
      assert.ok(png.length > 10_000, `a real picture (${png.length} bytes)`);

      await page.click("#demo-release");
      await page.waitForSelector('#demo-state[data-state="released"]');
    } finally {
      busy = false;
      await activity;
    }
    for (const lock of held) await lock.unlock();
    for (const lock of await Promise.all(queued)) await lock.unlock();
    await Promise.all([worker.close(), other.close(), page.close()]);
  });

  test("a page verifies a real grant's proof with WebCrypto Ed25519 and refuses a tampered one", TIMEOUT, async () => {
    const signing = await startServer({ args: ["--sign-grants"] });
    const page = await browser.context.newPage();
    try {
      await page.goto(`${signing.origin}/healthz`);
      const result = await page.evaluate(async () => {
        const { connect, fetchPublicKeys, verifyProof } = await import("/deadbolt.js");
        const client = await connect();
        const lock = await client.lock("browser/proof", { ttl: 20_000 });
        const keys = await fetchPublicKeys();
        const statement = await verifyProof(lock.proof, keys, { key: "browser/proof", token: lock.token });
        const at = lock.proof.indexOf(".") + 5;
        const changed = lock.proof.slice(0, at) + (lock.proof[at] === "A" ? "B" : "A") + lock.proof.slice(at + 1);
        const refusal = await verifyProof(changed, keys).then(() => "accepted", (error) => error.code);
        const expired = await verifyProof(lock.proof, keys, { now: statement.expires_at_ms }).then(() => "accepted", (error) => error.code);
        await lock.unlock();
        await client.close();
        return { statement, token: lock.token, clientId: client.clientId, refusal, expired };
      });
      assert.equal(result.statement.token, result.token);
      assert.equal(result.statement.client, result.clientId);
      assert.equal(result.refusal, "bad_signature");
      assert.equal(result.expired, "expired");
    } finally {
      await page.close();
      await signing.stop();
    }
  });

  test("no page threw or logged an error", () => {
    assert.deepEqual(browser.errors, []);
  });
});
