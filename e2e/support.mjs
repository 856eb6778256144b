// Shared by the end-to-end tests: the real server binary, Chromium through
// playwright-core, the client module, and a TCP relay that cuts connections
// and loses replies on demand.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";
import { WebSocket } from "ws";

export const E2E_DIR = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(E2E_DIR, "..");
export const CHROMIUM = "/usr/bin/chromium";

/** The client under test, loaded from the file the server embeds. */
export const deadbolt = await import(path.join(REPO_ROOT, "server/web/deadbolt.js"));

/** Node 20 has no global WebSocket: the client is given `ws`'s, which is
 * also what the injection option is for. */
export { WebSocket };

/** The server binary: `DEADBOLT_BIN`, which `cargo test` sets. */
export function serverBinary() {
  const bin = process.env.DEADBOLT_BIN;
  if (!bin) {
    throw new Error(
      "DEADBOLT_BIN is not set: point it at the deadbolt binary (cargo build -p deadbolt; " +
        "DEADBOLT_BIN=target/debug/deadbolt), or run `cargo test -p deadbolt --test browser`, which sets it",
    );
  }
  if (!existsSync(bin)) {
    throw new Error(`DEADBOLT_BIN=${bin} does not exist: build it with cargo build -p deadbolt`);
  }
  return bin;
}

/**
 * Starts `deadbolt serve` (WebSocket only, unless `args` say otherwise) on
 * `port` (0: any free port), with `args` added, and resolves once its log
 * says where it listens (ws:// or, with --tls-cert, wss://).
 */
export async function startServer({ port = 0, dataDir, args = [] } = {}) {
  const bin = serverBinary();
  const dir = dataDir ?? (await mkdtemp(path.join(os.tmpdir(), "deadbolt-e2e-")));
  const flags = ["serve", "--ws", `127.0.0.1:${port}`, "--quic", "off", "--data-dir", dir, ...args];
  const child = spawn(bin, flags, {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, NO_COLOR: "1" },
  });
  const log = [];
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server said no ws:// URL within 20 s:\n${log.join("\n")}`)), 20_000);
    const lines = createInterface({ input: child.stderr });
    lines.on("line", (line) => {
      log.push(line);
      // The log may be coloured; the URL is what follows ws:// (or wss://)
      // up to a space.
      const plain = line.replace(/\x1b\[[0-9;]*m/g, "");
      const at = plain.search(/wss?:\/\//);
      if (at >= 0) {
        clearTimeout(timer);
        resolve(plain.slice(at).split(/\s/)[0]);
      }
    });
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${bin}: ${error.message}`));
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (${code ?? signal}) before listening:\n${log.join("\n")}`));
    });
  });
  const { port: actualPort, host, protocol } = new URL(url);
  return {
    url,
    origin: `${protocol === "wss:" ? "https" : "http"}://${host}`,
    port: Number(actualPort),
    dataDir: dir,
    log,
    /** SIGKILL: a crash, connections cut without a goodbye. */
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
    },
    /** SIGTERM, then the data directory goes (unless it was given). */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      await exited;
      if (!dataDir) await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Connects the client under test from Node. */
export function connectNode(url, options = {}) {
  return deadbolt.connect(url, { WebSocket, ...options });
}

/**
 * A WebSocket class that records what the client sends (parsed) and how
 * many requests were in flight at once, to check the client's wire
 * behaviour: pipelining, batching, retries with the remaining wait.
 */
export function recordingWebSocket() {
  const record = { sent: [], maxInFlight: 0 };
  let inFlight = 0;
  class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", () => {
        inFlight = Math.max(0, inFlight - 1);
      });
      this.addEventListener("close", () => {
        inFlight = 0;
      });
    }
    send(data, ...rest) {
      record.sent.push(JSON.parse(data));
      inFlight += 1;
      record.maxInFlight = Math.max(record.maxInFlight, inFlight);
      return super.send(data, ...rest);
    }
  }
  record.WebSocket = RecordingWebSocket;
  record.ops = (op) => record.sent.filter((request) => request.op === op);
  return record;
}

/**
 * A TCP relay in front of the server: `cut()` breaks every connection
 * through it, and `loseReply(pattern)` drops the next server-to-client
 * chunk whose text matches and then breaks that connection, so the request
 * was carried out but its reply never arrives. (Server frames are not
 * masked, so a reply's JSON is readable in the bytes.)
 */
export class Relay {
  #target;
  #server = null;
  #pairs = new Set();
  #trap = null;

  constructor(targetPort) {
    this.#target = targetPort;
  }

  async listen() {
    this.#server = net.createServer((downstream) => {
      const upstream = net.connect(this.#target, "127.0.0.1");
      const pair = { downstream, upstream };
      this.#pairs.add(pair);
      const close = () => {
        this.#pairs.delete(pair);
        downstream.destroy();
        upstream.destroy();
      };
      downstream.on("data", (chunk) => upstream.write(chunk));
      upstream.on("data", (chunk) => {
        const trap = this.#trap;
        if (trap && trap.pattern.test(chunk.toString("latin1"))) {
          this.#trap = null;
          close();
          trap.resolve(chunk.toString("latin1"));
          return;
        }
        downstream.write(chunk);
      });
      for (const socket of [downstream, upstream]) {
        socket.on("close", close);
        socket.on("error", close);
      }
    });
    await new Promise((resolve) => this.#server.listen(0, "127.0.0.1", resolve));
    this.port = this.#server.address().port;
    this.url = `ws://127.0.0.1:${this.port}/ws`;
    return this;
  }

  /** How many connections go through the relay now. */
  get connections() {
    return this.#pairs.size;
  }

  /** Breaks every connection through the relay. */
  cut() {
    for (const { downstream, upstream } of [...this.#pairs]) {
      downstream.destroy();
      upstream.destroy();
    }
    this.#pairs.clear();
  }

  /** Resolves with the text of the lost reply. */
  loseReply(pattern) {
    return new Promise((resolve) => {
      this.#trap = { pattern, resolve };
    });
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.#server.close(resolve));
  }
}

/** Launch arguments: headless, no network chatter, no QUIC (the page talks
 * plain HTTP and WebSocket to 127.0.0.1). */
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Chromium with a fresh profile. Missing Chromium is a failure, not a skip:
 * the message says how to get it.
 */
export async function launchBrowser({ ignoreHTTPSErrors = false } = {}) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: run .ci/run, or apt-get install chromium`);
  }
  const profile = await mkdtemp(path.join(os.tmpdir(), "deadbolt-chromium-"));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1360, height: 900 },
      // For a server with a self-signed certificate (wss:// tests).
      ignoreHTTPSErrors,
    });
  } catch (error) {
    await rm(profile, { recursive: true, force: true });
    throw new Error(`cannot launch ${CHROMIUM} (run .ci/run, or apt-get install chromium): ${error.message}`);
  }
  const errors = [];
  context.on("page", (page) => watchPage(page, errors));
  for (const page of context.pages()) watchPage(page, errors);
  return {
    context,
    /** Uncaught errors and console errors of every page, to assert none. */
    errors,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

function watchPage(page, errors) {
  page.on("pageerror", (error) => errors.push(`${page.url()}: ${error.message}`));
  page.on("console", (message) => {
    // A page without an icon (such as /healthz) makes Chromium ask for
    // /favicon.ico, which the server does not have; that is no error of ours.
    if (message.location().url?.endsWith("/favicon.ico")) return;
    if (message.type() === "error") errors.push(`${page.url()}: console: ${message.text()}`);
  });
}

/** Polls `probe` until it returns something truthy, or fails after
 * `timeout` ms with `what`. */
export async function eventually(what, probe, { timeout = 5000, every = 25 } = {}) {
  const until = Date.now() + timeout;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > until) throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}

/** A TCP port nobody listens on (just now). */
export async function freePort() {
  const probe = net.createServer();
  await new Promise((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const { port } = probe.address();
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
