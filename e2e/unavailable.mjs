// Not a test file of its own (node --test does not pick it up): a driver
// that bins/deadbolt/tests/browser.rs runs against real servers it hosts in
// its process, one of them durable on a disk the Rust test has made full,
// so that it answers `unavailable` as a cluster node without quorum would.
// The Rust side controls the disk and checks the servers; this side runs
// the JavaScript client and prints what it saw as one JSON line.
//
//   node unavailable.mjs retry URL              # the disk is full, for a while
//   node unavailable.mjs failover URL,URL2      # URL's disk is full

import { WebSocket } from "ws";

import { connect } from "../server/web/deadbolt.js";

/** One client with a short budget gives up with `unavailable`; one with the
 * default budget is answered once there is room again. */
async function retry(url) {
  const impatient = await connect(url, { WebSocket, retryFor: 300 });
  let refused = null;
  try {
    await impatient.set("js/impatient").setUp(60_000);
  } catch (error) {
    refused = error.code;
  } finally {
    await impatient.close();
  }
  const patient = await connect(url, { WebSocket });
  const started = performance.now();
  try {
    const { created } = await patient.set("js/patient").setUp(60_000);
    return { refused, created, waitedMs: Math.round(performance.now() - started) };
  } finally {
    await patient.close();
  }
}

/** The first server answers `unavailable`: the lock is taken on the next. */
async function failover(urls) {
  const client = await connect(urls, { WebSocket });
  const connectedTo = [client.url];
  client.addEventListener("connect", (event) => connectedTo.push(event.detail.url));
  try {
    const lock = await client.lock("js/failover", { ttl: 30_000 });
    const result = { clientId: client.clientId, token: lock.token, connectedTo };
    lock.detach();
    return result;
  } finally {
    await client.close();
  }
}

const [mode, urls] = process.argv.slice(2);
const scenarios = { retry, failover };
if (!scenarios[mode] || !urls) {
  console.error("usage: node unavailable.mjs retry|failover URL[,URL...]");
  process.exit(2);
}
console.log(JSON.stringify(await scenarios[mode](urls)));
