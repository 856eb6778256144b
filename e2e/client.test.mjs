// The JavaScript client (server/web/deadbolt.js) from Node, against
// the real server: pipelining, typed errors, locks and their lease view,
// distinct sets, reconnecting with retries after cut connections, lost
// replies and a server restart, and failing over between several servers.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Relay, connectNode, deadbolt, eventually, freePort, recordingWebSocket, sleep, startServer } from "./support.mjs";

const { DeadboltError } = deadbolt;
const TIMEOUT = { timeout: 30_000 };

/** Awaits `promise`, failing if it takes over `ms`. */
async function within(ms, promise, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`waited over ${ms} ms for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Asserts that `promise` rejects with a DeadboltError of `code`. */
async function rejectsWith(promise, code) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof DeadboltError, `expected a DeadboltError, got ${error}`);
    assert.ok(error instanceof Error);
    assert.equal(error.code, code, error.message);
    return true;
  });
}

describe("the JavaScript client in Node", () => {
  let server;
  const clients = [];
  /** A client that is closed after the suite. */
  const client = async (options = {}, url = server.url) => {
    const c = await connectNode(url, options);
    clients.push(c);
    return c;
  };

  before(async () => {
    server = await startServer();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await server?.stop();
  });

  test("connects with hello, a 128-bit hex client id, and the server's version", TIMEOUT, async () => {
    const a = await client();
    assert.match(a.clientId, /^[0-9a-f]{32}$/);
    assert.match(a.server, /^deadbolt\//);
    assert.ok(a.connected);
    const b = await client();
    assert.notEqual(a.clientId, b.clientId, "each client has its own id");
    const named = await client({ clientId: "worker-7" });
    assert.equal(named.clientId, "worker-7");
    const lock = await named.lock("hello/owned", { ttl: 10_000 });
    assert.equal((await a.inspect("hello/owned")).holder.client, "worker-7", "the id is the lock's owner");
    await lock.unlock();
  });

  test("pipelines requests on one connection and matches replies by id", TIMEOUT, async () => {
    const record = recordingWebSocket();
    const a = await client({ WebSocket: record.WebSocket });
    const b = await client();
    const held = await b.lock("pipe/held", { ttl: 10_000 });

    // A lock that waits must not hold up the requests behind it.
    let granted = null;
    const waiting = a.lock("pipe/held", { ttl: 10_000 }).then((lock) => (granted = lock));
    await a.ping();
    assert.equal(granted, null, "the lock still waits while the ping is answered");

    const set = a.set("pipe/set");
    await set.setUp(60_000);
    const keys = Array.from({ length: 300 }, (_, i) => `k${i % 100}`);
    const results = await Promise.all(keys.map((key) => set.insert(key)));
    assert.ok(record.maxInFlight >= 50, `requests were in flight together (at most ${record.maxInFlight})`);
    const indexOf = new Map();
    results.forEach((result, i) => {
      // One client inserting a key twice is its first both times.
      assert.equal(result.first, true);
      const seen = indexOf.get(keys[i]);
      if (seen === undefined) indexOf.set(keys[i], result.index);
      else assert.equal(result.index, seen, `${keys[i]} keeps its index`);
    });
    assert.deepEqual([...indexOf.values()].sort((x, y) => x - y), Array.from({ length: 100 }, (_, i) => i + 1));

    assert.equal(granted, null);
    await held.unlock();
    const lock = await waiting;
    assert.ok(lock.token > held.token, "the next grant has a higher token");
    assert.equal((await b.inspect("pipe/held")).holder.client, a.clientId);
    await lock.unlock();
    await set.tearDown();
  });

  test("answers with errors typed by their wire code", TIMEOUT, async () => {
    const a = await client();
    const b = await client();
    const held = await b.lock("errors/held", { ttl: 10_000 });

    assert.equal(await a.tryLock("errors/held", { ttl: 1000 }), null, "busy is null from tryLock");
    const started = performance.now();
    assert.equal(await a.lock("errors/held", { ttl: 1000, wait: 150 }), null, "timeout is null from lock");
    assert.ok(performance.now() - started >= 140, "the bounded wait was waited");

    await rejectsWith(a.unlock("errors/held", held.token + 1), "not_held");
    await rejectsWith(a.extend("errors/held", held.token - 1, 1000), "not_held");
    const gone = a.set("errors/never-set-up");
    await rejectsWith(gone.insert("x"), "no_such_set");
    await rejectsWith(gone.insertMany(["x", "y"]), "no_such_set");
    await rejectsWith(gone.membersPage(), "no_such_set");
    await rejectsWith(gone.inspect(), "no_such_set");
    assert.equal(await gone.tearDown(), null, "tearing down what is gone is null");
    await rejectsWith(a.lock("", { ttl: 1000 }), "bad_request");
    await rejectsWith(a.lock("errors/k", { ttl: 1e12 }), "bad_request");
    await rejectsWith(a.call("frobnicate"), "bad_request");
    await rejectsWith(a.stats(1e9), "bad_request");
    await assert.rejects(a.lock("errors/k", {}), TypeError, "a lease is required");
    await assert.rejects(a.lock("errors/k", { ttl: 1000, wait: -1 }), TypeError);

    // Over the server's batch limit: the server says so.
    const set = a.set("errors/set");
    await set.setUp(60_000);
    await rejectsWith(a.call("insert", { set: "errors/set", keys: Array.from({ length: 10_001 }, (_, i) => `k${i}`) }), "too_large");
    // Over the message limit: refused before sending, since the server
    // would close the connection (1009) and every retry would meet the same.
    let reconnects = 0;
    a.addEventListener("connect", () => reconnects++);
    await rejectsWith(set.insert("x".repeat(2 * 1024 * 1024)), "too_large");
    await a.ping();
    assert.equal(reconnects, 0, "the connection survived");

    // The server bounds client ids; a refused hello fails connect.
    await rejectsWith(connectNode(server.url, { clientId: "x".repeat(65) }), "bad_request");
    // Nobody listening: connect fails (it does not retry the first time).
    await rejectsWith(connectNode(`ws://127.0.0.1:${await freePort()}/ws`), "connection_lost");

    const closing = await connectNode(server.url);
    await closing.close();
    await rejectsWith(closing.ping(), "closed");
    await held.unlock();
    await set.tearDown();
  });

  test("inserts many in batches of at most 1000 and iterates members page by page", TIMEOUT, async () => {
    const record = recordingWebSocket();
    const a = await client({ WebSocket: record.WebSocket });
    const b = await client();
    const set = a.set("sets/batch");
    assert.deepEqual(await set.setUp(60_000), { created: true, size: 0 });
    assert.deepEqual(await b.set("sets/batch").setUp(60_000), { created: false, size: 0 }, "set_up again only restarts the TTL");

    const keys = Array.from({ length: 2500 }, (_, i) => `key-${i}`);
    const results = await set.insertMany(keys);
    assert.equal(record.ops("insert").length, 3, "2500 keys in 3 requests");
    assert.ok(record.ops("insert").every((request) => request.keys.length <= 1000));
    assert.deepEqual(results.map((r) => r.index), keys.map((_, i) => i + 1), "indexes follow the order of the keys");
    assert.ok(results.every((r) => r.first));
    assert.deepEqual(await set.insertMany([]), [], "nothing to insert, no request");
    assert.equal(record.ops("insert").length, 3);

    // Another client inserting some of the same keys shares their indexes
    // but owns none of them.
    const overlap = ["key-7", "new-1", "key-2499", "new-2"];
    const theirs = await b.set("sets/batch").insertMany(new Set(overlap));
    assert.deepEqual(theirs, [
      { index: 8, first: false },
      { index: 2501, first: true },
      { index: 2500, first: false },
      { index: 2502, first: true },
    ]);

    const members = [];
    for await (const member of set.members({ pageSize: 700 })) members.push(member);
    assert.equal(members.length, 2502);
    assert.deepEqual(members.slice(0, 2), [{ index: 1, key: "key-0" }, { index: 2, key: "key-1" }]);
    assert.deepEqual(members.at(-1), { index: 2502, key: "new-2" });
    assert.ok(members.every((m, i) => m.index === i + 1), "in index order, none missing");
    assert.equal(record.ops("members").length, 4, "2502 members in pages of 700");
    assert.ok(record.ops("members").every((r) => r.limit === 700));

    const tail = [];
    for await (const member of set.members({ after: 2500 })) tail.push(member.key);
    assert.deepEqual(tail, ["new-1", "new-2"], "iteration can start after an index");

    const info = await set.inspect();
    assert.equal(info.size, 2502);
    assert.ok(info.remaining_ms > 50_000 && info.remaining_ms <= 60_000, `remaining ${info.remaining_ms}`);
    assert.equal(await set.tearDown(), 2502);
    assert.equal(await set.tearDown(), null);
  });

  test("lock handles: a conservative lease view, extend, unlock", TIMEOUT, async () => {
    const a = await client();
    const b = await client();
    const ttl = 2000;
    const sentAt = performance.now();
    const lock = await a.lock("lease/k", { ttl });
    assert.equal(lock.key, "lease/k");
    assert.equal(typeof lock.token, "number");
    assert.ok(Number.isSafeInteger(lock.token));
    const view = lock.validFor();
    const elapsed = performance.now() - sentAt;
    const drift = ttl / 100 + 2;
    // Anchored at the request's send time, less the drift margin.
    assert.ok(view <= ttl - drift, `view ${view}`);
    assert.ok(view >= ttl - drift - elapsed, `view ${view} after ${elapsed} ms`);
    assert.ok(lock.isHeld());
    const server = (await b.inspect("lease/k")).holder;
    assert.ok(server.remaining_ms >= lock.validFor(), "the view never outlasts the server's lease");

    await lock.extend(5000);
    assert.equal(lock.ttl, 5000);
    assert.ok(lock.validFor() > 4000, "extend restarts the view");
    assert.ok((await b.inspect("lease/k")).holder.remaining_ms > 4000);

    await lock.unlock();
    assert.equal(lock.validFor(), 0);
    assert.equal(lock.isHeld(), false);
    assert.equal((await b.inspect("lease/k")).holder, null);
    await rejectsWith(lock.extend(1000), "not_held");
  });

  test("shared locks, semaphores and lock delay (SPEC section 7)", TIMEOUT, async () => {
    const [a, b, c] = [await client(), await client(), await client()];
    const readerA = await a.lockShared("js-doc", { ttl: 30_000 });
    const readerB = await b.lockShared("js-doc", { ttl: 30_000 });
    assert.ok(readerB.token > readerA.token);
    assert.equal(await c.tryLock("js-doc", { ttl: 30_000 }), null, "readers keep a writer out");
    const info = await c.inspect("js-doc");
    assert.deepEqual(info.holders.map((h) => h.mode), ["shared", "shared"]);
    assert.deepEqual(info.holder, info.holders[0]);
    await readerA.unlock();
    await readerB.unlock();

    const permits = [await a.semaphore("js-api", 2).acquire({ ttl: 30_000 }), await b.semaphore("js-api", 2).acquire({ ttl: 30_000 })];
    assert.equal(await c.semaphore("js-api", 2).tryAcquire({ ttl: 30_000 }), null, "both permits are out");
    await rejectsWith(c.semaphore("js-api", 3).tryAcquire({ ttl: 30_000 }), "conflict");
    assert.equal((await c.inspect("js-api")).limit, 2);
    await permits[0].unlock();
    const third = await c.semaphore("js-api", 2).tryAcquire({ ttl: 30_000 });
    assert.ok(third && third.token > permits[1].token);

    // A lease that runs out keeps the key from everyone for its delay.
    const paused = await a.tryLock("js-delayed", { ttl: 100, lockDelay: 60_000 });
    paused.detach();
    await eventually("the lease to run out", async () => (await c.inspect("js-delayed")).holder === null);
    assert.equal(await b.tryLock("js-delayed", { ttl: 1_000 }), null, "inside the lock delay");
    await assert.rejects(a.lockShared("x", { ttl: 1, limit: 2 }), RangeError);
  });

  test("a grant after a long wait is re-anchored with an extend", TIMEOUT, async () => {
    const record = recordingWebSocket();
    const a = await client({ WebSocket: record.WebSocket });
    const b = await client();
    await b.lock("anchor/k", { ttl: 300 }); // left to expire
    const lock = await a.lock("anchor/k", { ttl: 1000 });
    const extends_ = record.ops("extend");
    assert.equal(extends_.length, 1, "waited 300 ms > a tenth of the lease: one extend");
    assert.equal(extends_[0].token, lock.token);
    // Anchored at the extend, not at the lock sent 300 ms earlier.
    assert.ok(lock.validFor() > 900, `view ${lock.validFor()}`);

    // A quick grant is not re-anchored.
    const quick = await a.lock("anchor/quick", { ttl: 1000 });
    assert.equal(record.ops("extend").length, 1);
    await Promise.all([lock.unlock(), quick.unlock()]);
  });

  test("auto-renewal keeps a lock past its lease and stops the moment it is unlocked", TIMEOUT, async () => {
    const record = recordingWebSocket();
    const a = await client({ WebSocket: record.WebSocket });
    const b = await client();
    const lock = await a.lock("renew/k", { ttl: 300, autoRenew: true });
    let lost = false;
    lock.onLost(() => (lost = true));
    await sleep(1000);
    assert.ok(record.ops("extend").length >= 2, `renewed every third of the lease (${record.ops("extend").length} extends)`);
    assert.equal((await b.inspect("renew/k")).holder?.token, lock.token, "still held after three leases");
    assert.ok(lock.isHeld());
    await lock.unlock();
    const renewals = record.ops("extend").length;
    await sleep(500);
    assert.equal(record.ops("extend").length, renewals, "no renewal after unlock");
    assert.equal(lost, false, "an unlocked lock is not lost");
  });

  test("a lock is lost when the server ends its grant or its lease view runs out", TIMEOUT, async () => {
    const a = await client();
    const b = await client();

    // Someone else unlocks it with its token: the next renewal (a third
    // into the lease) says not_held, long before the view would run out.
    const renewed = await a.lock("lost/renewed", { ttl: 1500, autoRenew: true });
    let told = 0;
    renewed.onLost(() => told++);
    await b.unlock("lost/renewed", renewed.token);
    const started = performance.now();
    await renewed.lost;
    const noticed = performance.now() - started;
    assert.ok(noticed < 1200, `noticed at the next renewal (${noticed} ms)`);
    assert.equal(renewed.validFor(), 0);
    await sleep(0);
    assert.equal(told, 1, "onLost callbacks are called once");

    // Without renewal, the view runs out with the lease.
    const plain = await a.lock("lost/plain", { ttl: 200 });
    const at = performance.now();
    await plain.lost;
    const after_ = performance.now() - at;
    assert.ok(after_ >= 180 && after_ < 1000, `lost when the lease ran out, not before (${after_} ms)`);
    assert.equal(plain.isHeld(), false);

    // An ephemeral lock ends with its client's connection.
    const ephemeral = await a.lock("lost/ephemeral", { ttl: 60_000, ephemeral: true });
    await a.close();
    await eventually("the ephemeral lock to be released", async () => (await b.inspect("lost/ephemeral")).holder === null);
    assert.equal(ephemeral.validFor(), 0, "closing stopped the handle");
  });

  test("pushed events: notify warns and marks a lock lost at once; watches hear a key and a set (SPEC section 7)", TIMEOUT, async () => {
    const a = await client();
    const b = await client();

    // Someone else unlocks it with its token: the server's `lost` ends the
    // lock at once, though its lease view has a minute left.
    const held = await a.lock("events/held", { ttl: 60_000, notify: true });
    await b.unlock("events/held", held.token);
    await within(5000, held.lost, "the pushed lost");
    assert.equal(held.validFor(), 0);

    // A third of the lease left, and no extend: `expiring`.
    const short = await a.lock("events/short", { ttl: 900, notify: true });
    const remaining = await within(5000, new Promise((resolve) => short.onExpiring(resolve)), "expiring");
    assert.ok(remaining <= 300, `a third or less of the lease is left (${remaining} ms)`);
    assert.ok(short.isHeld(), "before the lease ends");
    short.detach();

    const keys = await a.watchKey("events/k");
    const granted = await b.lock("events/k", { ttl: 60_000 });
    assert.deepEqual(await within(5000, keys.next(), "granted"), { event: "granted", key: "events/k", token: granted.token });
    await granted.unlock();
    assert.deepEqual(await within(5000, keys.next(), "released"), { event: "released", key: "events/k", token: granted.token });
    keys.cancel();
    assert.equal(await keys.next(), null, "over once cancelled");

    const sets = await a.watchSet("events/s");
    await b.set("events/s").setUp(60_000);
    const seen = [];
    for await (const event of sets) {
      seen.push(event);
      if (seen.length === 1) await b.set("events/s").tearDown();
      if (seen.length === 2) break;
    }
    assert.deepEqual(seen, [
      { event: "created", set: "events/s" },
      { event: "torn_down", set: "events/s" },
    ]);
    sets.cancel();
  });

  test("a waiting lock can be given up with an AbortSignal", TIMEOUT, async () => {
    const a = await client();
    const b = await client();
    const held = await b.lock("abort/k", { ttl: 10_000 });
    const abort = new AbortController();
    const waiting = a.lock("abort/k", { ttl: 10_000, signal: abort.signal });
    await eventually("a to wait", async () => (await b.inspect("abort/k")).waiters === 1);
    abort.abort();
    await assert.rejects(waiting, { name: "AbortError" });
    assert.equal((await b.inspect("abort/k")).waiters, 0, "the server cancelled the wait");
    await held.unlock();
    assert.equal((await b.inspect("abort/k")).holder, null, "nothing was granted to a");
  });
});

describe("reconnecting and retrying", () => {
  let server;
  let relay;
  const clients = [];
  /** A client whose connections go through the relay, with a record of
   * what it sent and how often it said hello. */
  const relayed = async () => {
    const record = recordingWebSocket();
    const c = await connectNode(relay.url, { WebSocket: record.WebSocket });
    record.connects = 1;
    c.addEventListener("connect", (event) => {
      if (event.detail.reconnect) record.connects++;
    });
    clients.push(c);
    return { client: c, record };
  };
  const direct = async () => {
    const c = await connectNode(server.url);
    clients.push(c);
    return c;
  };

  before(async () => {
    server = await startServer();
    relay = await new Relay(server.port).listen();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await relay?.close();
    await server?.stop();
  });

  test("after a cut it reconnects with the same client id, which still owns its locks", TIMEOUT, async () => {
    const { client: a, record } = await relayed();
    const b = await direct();
    const lock = await a.lock("cut/owned", { ttl: 30_000 });
    relay.cut();
    const again = await a.lock("cut/owned", { ttl: 30_000, wait: 0 });
    assert.equal(again.token, lock.token, "a re-lock by the owner is the same grant");
    assert.equal(record.connects, 2);
    assert.deepEqual(record.ops("hello").map((h) => h.client), [a.clientId, a.clientId]);
    assert.equal((await b.inspect("cut/owned")).holder.client, a.clientId);
    await again.unlock();
  });

  test("a waiting lock is retried on the new connection and granted", TIMEOUT, async () => {
    const { client: a } = await relayed();
    const b = await direct();
    const held = await b.lock("cut/wait", { ttl: 30_000 });
    const waiting = a.lock("cut/wait", { ttl: 30_000 });
    await eventually("a to wait", async () => (await b.inspect("cut/wait")).waiters === 1);
    relay.cut();
    // The server drops the cut connection's wait; the retry queues again.
    await eventually("a to wait again", async () => relay.connections === 1 && (await b.inspect("cut/wait")).waiters === 1);
    await held.unlock();
    const lock = await waiting;
    assert.ok(lock.token > held.token);
    assert.equal((await b.inspect("cut/wait")).holder.client, a.clientId);
    await lock.unlock();
  });

  test("a bounded wait is retried with the wait that is left", TIMEOUT, async () => {
    const { client: a, record } = await relayed();
    const b = await direct();
    const held = await b.lock("cut/bounded", { ttl: 30_000 });
    const started = performance.now();
    const waiting = a.lock("cut/bounded", { ttl: 30_000, wait: 1500 });
    await sleep(600);
    relay.cut();
    assert.equal(await waiting, null, "timed out");
    const took = performance.now() - started;
    assert.ok(took >= 1400 && took < 2000, `the whole wait was about 1500 ms, not more (${took})`);
    const locks = record.ops("lock");
    assert.equal(locks.length, 2);
    assert.equal(locks[0].wait_ms, 1500);
    assert.ok(locks[1].wait_ms <= 950 && locks[1].wait_ms >= 500, `retried with ${locks[1].wait_ms} ms left`);
    await held.unlock();
  });

  test("an ephemeral lock is lost with its connection", TIMEOUT, async () => {
    const { client: a } = await relayed();
    const b = await direct();
    const lock = await a.lock("cut/ephemeral", { ttl: 30_000, ephemeral: true });
    relay.cut();
    await within(1000, lock.lost, "the handle to be lost with the connection, not with the lease");
    assert.equal(lock.validFor(), 0);
    await eventually("the server to release it", async () => (await b.inspect("cut/ephemeral")).holder === null);
  });

  test("lost replies: a retried lock gets the same token, a retried insert the same first", TIMEOUT, async () => {
    const { client: a, record } = await relayed();
    const b = await direct();

    let lost = relay.loseReply(/"token"/);
    const lock = await a.lock("lost/lock", { ttl: 30_000 });
    const frame = await lost;
    const dropped = JSON.parse(frame.slice(frame.indexOf("{")));
    assert.equal(lock.token, dropped.ok.token, "the retry returned the grant whose reply was lost");
    assert.equal(record.ops("lock").length, 2);

    const set = a.set("lost/set");
    await set.setUp(60_000);
    lost = relay.loseReply(/"first"/);
    assert.deepEqual(await set.insert("only-once"), { index: 1, first: true }, "still first after the retry");
    await lost;
    assert.deepEqual(await b.set("lost/set").insert("only-once"), { index: 1, first: false });

    // unlock carried out, reply lost: the retry's not_held is success.
    lost = relay.loseReply(/"ok":\{\}/);
    await lock.unlock();
    await lost;
    assert.equal(record.ops("unlock").length, 2);
    assert.equal((await b.inspect("lost/lock")).holder, null);

    // tear_down carried out, reply lost: the retry's no_such_set is null.
    lost = relay.loseReply(/"size"/);
    assert.equal(await set.tearDown(), null);
    await lost;
    await rejectsWith(set.inspect(), "no_such_set");
    assert.ok(record.connects >= 5, `reconnected after each loss (${record.connects})`);
  });
});

describe("a server restart", () => {
  test("requests sent while the server is down are carried out once it is back", TIMEOUT, async () => {
    const first = await startServer();
    const a = await connectNode(first.url);
    const impatient = await connectNode(first.url, { retryFor: 300 });
    let reconnects = 0;
    a.addEventListener("connect", () => reconnects++);
    try {
      const before_ = await a.lock("restart/k", { ttl: 30_000 });
      await first.kill();
      // The server is gone: a client with a short retry budget gives up...
      await rejectsWith(impatient.ping(), "connection_lost");
      // ...while one with the default budget keeps trying.
      const ping = a.ping();
      const lock = a.lock("restart/k", { ttl: 30_000, wait: 0 });
      await sleep(500);
      const second = await startServer({ port: first.port, dataDir: first.dataDir });
      try {
        await ping;
        // The grant was kept in the data directory (SPEC section 8): the
        // holder's retried lock is its re-lock, with the same token...
        const after_ = await lock;
        assert.ok(after_, "the holder still holds the key after the restart");
        assert.equal(after_.token, before_.token, "the kept grant keeps its token");
        assert.equal(reconnects, 1);
        await impatient.ping(); // and it works again once the server is back
        await after_.unlock();
        // ...and the key's next grant has a greater token than any before.
        const next = await impatient.lock("restart/k", { ttl: 30_000, wait: 0 });
        assert.ok(next.token > before_.token, "tokens rise across restarts");
        await next.unlock();
      } finally {
        await Promise.all([a.close(), impatient.close()]);
        await second.stop();
      }
    } finally {
      await a.close();
      await impatient.close();
      await first.stop();
    }
  });
});

describe("several servers", () => {
  /** A URL nobody listens on. */
  const deadUrl = async () => `ws://127.0.0.1:${await freePort()}/ws`;

  test("an array or a comma-separated list of URLs: one nobody listens on is skipped", TIMEOUT, async () => {
    const server = await startServer();
    const clients = [];
    try {
      const dead = await deadUrl();
      const observer = await connectNode(server.url);
      clients.push(observer);
      for (const urls of [[dead, server.url], `${dead} , ${server.url}`]) {
        const c = await connectNode(urls);
        clients.push(c);
        assert.deepEqual(c.urls, [dead, server.url]);
        assert.equal(c.url, server.url, "the live server is the one in use");
        const lock = await c.lock("several/skip", { ttl: 30_000 });
        assert.equal((await observer.inspect("several/skip")).holder.client, c.clientId);
        await lock.unlock();
      }
      const single = await connectNode(server.url);
      clients.push(single);
      assert.deepEqual(single.urls, [server.url], "one URL is a list of one");
      const other = await deadUrl();
      await assert.rejects(connectNode([dead, other]), (error) => {
        assert.equal(error.code, "connection_lost");
        assert.ok(error.message.includes(dead) && error.message.includes(other), error.message);
        return true;
      });
      await assert.rejects(connectNode(`${dead},,${server.url}`), TypeError);
    } finally {
      await Promise.all(clients.map((c) => c.close()));
      await server.stop();
    }
  });

  test("a server killed mid-run is left for the next, as the same client", TIMEOUT, async () => {
    const first = await startServer();
    const second = await startServer();
    const c = await connectNode([first.url, second.url]);
    const observer = await connectNode(second.url);
    const connected = [];
    c.addEventListener("connect", (event) => connected.push(event.detail.url));
    try {
      const before_ = await c.lock("several/killed", { ttl: 30_000 });
      before_.detach();
      await first.kill();
      const after_ = await within(10_000, c.lock("several/killed", { ttl: 30_000 }), "the lock on the second server");
      assert.equal(c.url, second.url);
      assert.deepEqual(connected, [second.url], "one reconnect, to the second server");
      assert.equal((await observer.inspect("several/killed")).holder.client, c.clientId);
      await after_.unlock();
    } finally {
      await Promise.all([c.close(), observer.close()]);
      await first.stop();
      await second.stop();
    }
  });
});
