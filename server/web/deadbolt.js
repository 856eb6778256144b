// deadbolt.js: the browser (and Node) client for the deadbolt lock and
// de-duplication server. No dependencies; one ES module.
//
// It mirrors the Rust client (`deadbolt_core::client`): a client id kept for
// the life of the client, pipelined requests matched to replies by id,
// reconnecting and retrying after a lost connection (every operation of
// protocol version 1 is safe to retry for the client that sent it), failing
// over between several servers (the nodes of a cluster) when one cannot be
// reached or answers `unavailable`, lock handles with a conservative view of
// their lease and optional renewal, and distinct-set handles. The wire
// protocol is docs/protocol.md.
//
//   import { connect } from "/deadbolt.js";
//   const client = await connect();                 // in a page served by deadbolt
//   const nodes = await connect("ws://a:7420/ws,ws://b:7420/ws");  // or an array
//   const lock = await client.lock("job/42", { ttl: 30_000 });
//   await lock.unlock();
//
// In Node 20, which has no global WebSocket, pass one in:
//   import { WebSocket } from "ws";
//   const client = await connect("ws://127.0.0.1:7420/ws", { WebSocket });

/** Where a browser tab keeps its client id, so that a reload keeps it. */
const CLIENT_ID_STORAGE_KEY = "deadbolt.clientId";
/** Keys per `insert` request in `insertMany`, as the Rust client does. */
const INSERT_BATCH_KEYS = 1000;
/** Bytes of JSON-encoded keys per `insert` request in `insertMany`: well
 * under the server's default message limit of 1 MiB. */
const INSERT_BATCH_BYTES = 256 * 1024;
/** Keys per `members` page when iterating. */
const MEMBERS_PAGE = 1000;

const DEFAULTS = Object.freeze({
  retryFor: 30_000,
  retryDelay: 20,
  retryDelayMax: 1_000,
  connectTimeout: 10_000,
  maxMessageBytes: 1024 * 1024,
});

/**
 * An error with the wire code of the server's answer (`busy`, `timeout`,
 * `not_held`, `no_such_set`, `bad_request`, `overloaded`, `too_large`,
 * `shutting_down`, `unavailable`, ...), or one of the client's own codes:
 * `connection_lost` (the request could not be carried, even after
 * retrying for `retryFor`), `closed` (the client was closed), and
 * `too_large` also for a message refused before it was sent.
 */
export class DeadboltError extends Error {
  constructor(code, message, options) {
    super(message ?? code, options);
    this.name = "DeadboltError";
    this.code = code;
  }
}

/** Errors after which a request is sent again, as the Rust client does:
 * `connection_lost`, `shutting_down` and `unavailable` (no quorum or no
 * leader, a full disk; the request may or may not have been carried out,
 * and the protocol makes a retry safe either way), and `overloaded` (refused
 * at the door). After `unavailable` and `shutting_down` the client leaves
 * that server. */
const RETRYABLE = new Set(["connection_lost", "unavailable", "shutting_down", "overloaded"]);

function isRetryable(error) {
  return error instanceof DeadboltError && RETRYABLE.has(error.code);
}

/** Answers that say the server cannot serve now: the client leaves it for
 * the next server (or a new connection to the same one). */
function leavesServer(error) {
  return error instanceof DeadboltError && (error.code === "unavailable" || error.code === "shutting_down");
}

/** The servers `connect` was given: one URL, an array of them, or a
 * comma-separated string; by default the server that served the page. */
function serverUrls(url) {
  if (url === undefined || url === null) return [defaultUrl()];
  const list = Array.isArray(url) ? url : String(url).split(",");
  const urls = list.map((one) => String(one).trim());
  if (urls.length === 0 || urls.some((one) => one === "")) {
    throw new TypeError(`deadbolt: connect(url) needs one URL, an array of URLs, or URLs separated by commas; got ${JSON.stringify(url)}`);
  }
  return urls;
}

/** A number in [0, 1) drawn from `text`: the backoff's jitter, the same for
 * the same client and attempt (FNV-1a), as the Rust client's is, so that a
 * fleet spreads out while one client's run can be reproduced. */
function jitter(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return (hash % 1024) / 1024;
}

const now = () => performance.now();

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function randomClientId() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The tab's client id: kept in `sessionStorage`, which lives as long as
 * the tab (a reload keeps it, another tab has its own). Outside a browser,
 * or where storage is refused, a fresh random id. */
function tabClientId() {
  let storage;
  try {
    storage = globalThis.sessionStorage;
  } catch {
    // Storage access can throw (sandboxed frames, blocked cookies).
  }
  if (!storage) return randomClientId();
  try {
    let id = storage.getItem(CLIENT_ID_STORAGE_KEY);
    if (!id) {
      id = randomClientId();
      storage.setItem(CLIENT_ID_STORAGE_KEY, id);
    }
    return id;
  } catch {
    return randomClientId();
  }
}

/** The WebSocket URL of the server that served this page. */
function defaultUrl() {
  const location = globalThis.location;
  if (!location?.host) {
    throw new TypeError("deadbolt: connect(url) needs a URL such as ws://127.0.0.1:7420/ws");
  }
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

/** A duration in whole milliseconds, as the wire wants it (at least `min`). */
/** The `mode`, `limit` and `lock_delay_ms` fields of a lock, each left
 * out at its default (so an older server is not sent what it does not
 * know). */
function lockKind({ shared, limit, lockDelay }) {
  const kind = {};
  if (shared) {
    if (limit !== undefined && limit !== 1) throw new RangeError("deadbolt: a shared lock takes no limit");
    kind.mode = "shared";
  }
  if (limit !== undefined) {
    if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) {
      throw new RangeError(`deadbolt: limit must be an integer in 1..=10000, got ${limit}`);
    }
    if (limit !== 1) kind.limit = limit;
  }
  if (lockDelay !== undefined && lockDelay !== 0) kind.lock_delay_ms = millis("lockDelay", lockDelay, 0);
  return kind;
}

function millis(name, value, min) {
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new TypeError(`deadbolt: ${name} must be a number of milliseconds, got ${value}`);
  }
  return Math.max(min, Math.floor(value));
}

/** Bytes of a string in UTF-8, without encoding it. */
function utf8Length(text) {
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) bytes += 1;
    else if (c < 0x800) bytes += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < text.length) {
      bytes += 4; // a surrogate pair: one 4-byte code point
      i++;
    } else bytes += 3;
  }
  return bytes;
}

/**
 * One open WebSocket to the server. Requests are pipelined: each is sent at
 * once and its reply found by id, in whatever order replies come.
 */
class Connection {
  constructor(socket, events) {
    this.socket = socket;
    this.events = events;
    this.open = true;
    /** Set when the client left this connection's server: it closes once
     * nothing is in flight on it and no ephemeral lock lives on it. */
    this.retired = false;
    /** id → { resolve, reject } of requests awaiting their reply. */
    this.pending = new Map();
    /** id → Watch: where the pushed events of each request that asked
     * for them go (a `watch`, a `lock` with `notify`). */
    this.routes = new Map();
    /** Set when this side closes on purpose: what pending requests fail with. */
    this.closeError = null;
    socket.addEventListener("message", (event) => this.#onMessage(event));
    socket.addEventListener("close", (event) => this.#onClose(event));
    // Browsers follow every error with a close; so do Node's `ws` and undici.
    socket.addEventListener("error", () => {});
  }

  /** Sends `{id, ...fields}`; resolves with the `ok` object or rejects with
   * a DeadboltError. `maxBytes` is the server's message limit: a bigger
   * message would make it close the connection (1009), so it is refused
   * here instead of being retried in vain. */
  request(id, fields, maxBytes) {
    return new Promise((resolve, reject) => {
      if (!this.open) {
        reject(this.closeError ?? new DeadboltError("connection_lost", "the connection is closed"));
        return;
      }
      const text = JSON.stringify({ id, ...fields });
      if (text.length > maxBytes / 3 && utf8Length(text) > maxBytes) {
        reject(new DeadboltError("too_large", `a ${fields.op} message of more than ${maxBytes} bytes`));
        return;
      }
      this.pending.set(id, { resolve, reject });
      try {
        this.socket.send(text);
      } catch (error) {
        this.pending.delete(id);
        reject(new DeadboltError("connection_lost", `cannot send: ${error?.message ?? error}`, { cause: error }));
      }
    });
  }

  close(error) {
    this.closeError = error;
    try {
      this.socket.close(1000);
    } catch {
      // Already closing.
    }
    this.#onClose(null);
  }

  #onMessage(event) {
    const data = typeof event.data === "string" ? event.data : String(event.data);
    let reply;
    try {
      reply = JSON.parse(data);
    } catch {
      return; // Not ours to answer; the server only sends JSON.
    }
    if (typeof reply?.event === "string") {
      // A pushed event (SPEC section 7): its second field is `event`.
      this.routes.get(reply.id)?._push(reply);
      return;
    }
    const waiting = this.pending.get(reply?.id);
    if (!waiting) return; // A reply to a request given up on (a cancel's, say).
    this.pending.delete(reply.id);
    if (reply.err) {
      waiting.reject(new DeadboltError(reply.err.code, reply.err.message));
    } else {
      waiting.resolve(reply.ok ?? {});
    }
    if (this.retired) this.events.onRetiredReply(this);
  }

  #onClose(event) {
    if (!this.open) return;
    this.open = false;
    const error =
      this.closeError ??
      new DeadboltError(
        "connection_lost",
        `connection lost${event?.code ? ` (close code ${event.code}${event.reason ? `: ${event.reason}` : ""})` : ""}`,
      );
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const { reject } of pending) reject(error);
    // Every feed of events ends with its connection.
    const feeds = [...this.routes.values()];
    this.routes.clear();
    for (const feed of feeds) feed._end();
    this.events.onClosed(this, !this.closeError);
  }
}

/** Opens a WebSocket and resolves once it is open. */
function openSocket(WebSocketImpl, url, timeoutMs) {
  return new Promise((resolve, reject) => {
    let socket;
    try {
      socket = new WebSocketImpl(url);
    } catch (error) {
      reject(new DeadboltError("connection_lost", `cannot connect to ${url}: ${error?.message ?? error}`, { cause: error }));
      return;
    }
    const onOpen = () => {
      settle();
      resolve(socket);
    };
    const onError = (event) => fail(event?.message ?? event?.error?.message ?? "connection error");
    const onClose = (event) => fail(`closed (${event?.code})`);
    const timer = setTimeout(() => fail(`no answer within ${timeoutMs} ms`), timeoutMs);
    const settle = () => {
      clearTimeout(timer);
      socket.removeEventListener("open", onOpen);
      socket.removeEventListener("error", onError);
      socket.removeEventListener("close", onClose);
    };
    function fail(why) {
      settle();
      try {
        socket.close();
      } catch {
        // Never opened; nothing to close.
      }
      reject(new DeadboltError("connection_lost", `cannot connect to ${url}: ${why}`));
    }
    socket.addEventListener("open", onOpen);
    socket.addEventListener("error", onError);
    socket.addEventListener("close", onClose);
  });
}

/**
 * A deadbolt client. Make one with `connect`. It is an EventTarget: it
 * dispatches `connect` (after each successful `hello`; `detail.reconnect`
 * is true after the first, `detail.url` is the server's) and `disconnect`
 * (when a connection breaks).
 */
export class Client extends EventTarget {
  #WebSocket;
  #options;
  /** The index in `urls` of the server to try first: the one that last
   * answered, or the one after a server that said it cannot serve. */
  #at = 0;
  #current = null;
  /** Connections the client left that are still open for what needs them. */
  #retired = new Set();
  #connecting = null;
  #nextId = 1;
  #closed = false;
  #connections = 0;
  /** Live lock handles, so that `close` stops their timers and a broken
   * connection marks its ephemeral locks lost. */
  #locks = new Set();

  /** @internal Use `connect`. */
  constructor(urls, options, WebSocketImpl) {
    super();
    /** Every server it may connect to, in the order given. */
    this.urls = Object.freeze([...urls]);
    this.clientId = options.clientId ?? tabClientId();
    /** `deadbolt/<version>` from the last `hello`. */
    this.server = null;
    this.#WebSocket = WebSocketImpl;
    this.#options = options;
  }

  /** The server in use, or the one to be tried next. */
  get url() {
    return this.urls[this.#at];
  }

  /** Whether a connection is open right now. */
  get connected() {
    return this.#current?.open === true;
  }

  /** @internal Opens the first connection; `connect` does not retry it. */
  async start() {
    await this.#connection();
    return this;
  }

  /** The open connection, opening one (and saying `hello`) if needed;
   * concurrent callers share one attempt. */
  #connection() {
    if (this.#closed) return Promise.reject(new DeadboltError("closed", "the client is closed"));
    if (this.#current?.open) return Promise.resolve(this.#current);
    this.#connecting ??= this.#open().finally(() => {
      this.#connecting = null;
    });
    return this.#connecting;
  }

  async #open() {
    const socket = await this.#openAny();
    const connection = new Connection(socket, {
      onClosed: (closed, unexpected) => this.#onClosed(closed, unexpected),
      // After the reply's own continuations, which may make it a Lock that
      // keeps the connection (an ephemeral one).
      onRetiredReply: (retired) => setTimeout(() => this.#closeIfIdle(retired), 0),
    });
    if (this.#closed) {
      connection.close(new DeadboltError("closed", "the client is closed"));
      throw connection.closeError;
    }
    let hello;
    try {
      const fields = { op: "hello", client: this.clientId };
      // A server started with --auth wants the principal's secret.
      if (this.#options.auth) fields.auth = this.#options.auth;
      hello = await connection.request(this.#nextId++, fields, this.#options.maxMessageBytes);
    } catch (error) {
      // A refused hello (a client id that is too long, say) leaves the
      // socket open: it is of no use without its hello.
      if (connection.open) connection.close(error);
      if (leavesServer(error)) this.#failOver();
      throw error;
    }
    this.server = hello.server ?? null;
    this.#current = connection;
    const reconnect = this.#connections++ > 0;
    const detail = { clientId: this.clientId, server: this.server, reconnect, url: this.url };
    this.dispatchEvent(new CustomEvent("connect", { detail }));
    return connection;
  }

  /** Opens a socket to the current server or, if that fails, to each next
   * one in turn, once round the list; the one that opens becomes current.
   * A failed round fails with every server's reason, and the caller backs
   * off before the next (within its retry budget), as for one server. */
  async #openAny() {
    const start = this.#at;
    const errors = [];
    for (let step = 0; step < this.urls.length; step++) {
      const at = (start + step) % this.urls.length;
      try {
        const socket = await openSocket(this.#WebSocket, this.urls[at], this.#options.connectTimeout);
        this.#at = at;
        return socket;
      } catch (error) {
        if (this.#closed) throw error;
        errors.push(error);
      }
    }
    if (errors.length === 1) throw errors[0];
    throw new DeadboltError("connection_lost", errors.map((error) => error.message).join("; "));
  }

  /** Makes the server after the current one current. */
  #failOver() {
    this.#at = (this.#at + 1) % this.urls.length;
  }

  /** Leaves the server behind `connection`, which said it cannot serve
   * now: new requests go to a new connection, to the next server. What is
   * still in flight on it (a waiting lock), and its ephemeral locks, keep
   * it open until they are done. */
  #leave(connection) {
    if (this.#current !== connection) return; // left already
    this.#current = null;
    this.#failOver();
    connection.retired = true;
    this.#retired.add(connection);
    this.#closeIfIdle(connection);
  }

  /** Closes a connection the client left once nothing needs it. */
  #closeIfIdle(connection) {
    if (!connection.retired || !connection.open || connection.pending.size > 0) return;
    for (const lock of this.#locks) {
      if (lock._connection === connection) return;
    }
    connection.close(new DeadboltError("connection_lost", "left for another server"));
  }

  #onClosed(connection, unexpected) {
    if (this.#current === connection) this.#current = null;
    this.#retired.delete(connection);
    // An ephemeral lock ends with the connection that took it.
    for (const lock of this.#locks) {
      if (lock._connection === connection) lock._markLost();
    }
    if (unexpected && !this.#closed) this.dispatchEvent(new CustomEvent("disconnect"));
  }

  /** Jittered exponential backoff: between half and all of
   * retryDelay·2^attempt, at most retryDelayMax, so a fleet that lost its
   * server does not come back in step. */
  #backoff(attempt) {
    const { retryDelay, retryDelayMax } = this.#options;
    const base = Math.min(retryDelay * 2 ** Math.min(attempt, 16), retryDelayMax);
    return base / 2 + (jitter(`${attempt}:${this.clientId}`) * base) / 2;
  }

  /**
   * Sends the request `make(attempt, {earlierMayHaveRun})` builds, retrying
   * it while connections fail or the server refuses it for now (see
   * `isRetryable`; after `unavailable` or `shutting_down` on a new
   * connection, to the next server). `earlierMayHaveRun` says whether an
   * earlier attempt may have been carried out (it was sent, and not refused
   * `overloaded`). `retryFor` bounds the
   * time spent without the request in flight (reconnecting, backing off),
   * not the time it waits on the server, so a lock that waited an hour is
   * still retried when its connection breaks.
   *
   * Resolves with `{ok, sentAt, attempt, connection}`: `sentAt` is when the
   * answered attempt was sent, which a lease view is anchored at.
   */
  async _exchange(make, { signal, onSend } = {}) {
    let down = 0;
    let failedAt = null;
    let earlierMayHaveRun = false;
    for (let attempt = 0; ; attempt++) {
      signal?.throwIfAborted();
      const fields = make(attempt, { earlierMayHaveRun });
      let connection = null;
      let sent = false;
      try {
        connection = await this.#connection();
        if (failedAt !== null) {
          down += now() - failedAt;
          failedAt = null;
        }
        const id = this.#nextId++;
        // A request that asks for events gets its route before it is sent.
        onSend?.(connection, id);
        const sentAt = now();
        const reply = connection.request(id, fields, this.#options.maxMessageBytes);
        sent = true;
        const ok = signal ? await this.#cancellable(connection, id, reply, signal) : await reply;
        return { ok, sentAt, attempt, connection };
      } catch (error) {
        if (!isRetryable(error) || this.#closed) throw error;
        // A request that was sent and not refused at the door may have been
        // carried out (a cluster's follower answers `unavailable` when its
        // link to the leader broke with the request on it).
        if (sent && error.code !== "overloaded") earlierMayHaveRun = true;
        if (connection && leavesServer(error)) this.#leave(connection);
        const at = now();
        if (failedAt !== null) down += at - failedAt;
        failedAt = at;
        if (down >= this.#options.retryFor) throw error;
        await sleep(this.#backoff(attempt), signal);
      }
    }
  }

  /** Awaits `reply`; if `signal` aborts first, asks the server to cancel
   * request `id` (which then answers `cancelled`, unless it was answered
   * already). Either way the server's answer is what this resolves with. */
  async #cancellable(connection, id, reply, signal) {
    const onAbort = () => {
      connection.request(this.#nextId++, { op: "cancel", target: id }, this.#options.maxMessageBytes).catch(() => {});
    };
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      return await reply;
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Sends any request, `{op, ...fields}`, retrying after a lost connection;
   * resolves with the reply's `ok` object. The typed methods below are
   * built on it.
   */
  async call(op, fields = {}) {
    return (await this._exchange(() => ({ op, ...fields }))).ok;
  }

  /** `ping`: a round trip. */
  async ping() {
    await this.call("ping");
  }

  /** `inspect`: `{holder: {client, token, remaining_ms} | null, waiters}`. */
  inspect(key) {
    return this.call("inspect", { key });
  }

  /** `stats`: counters, sizes, and the `top` held locks, contended keys and
   * largest sets (see the StatsReply type). */
  stats(top = 20) {
    return this.call("stats", { top });
  }

  /**
   * Takes `key`. `ttl` is the lease in ms; `wait` how long to wait in ms
   * (undefined: as long as it takes; 0: not at all); `ephemeral` releases
   * the lock when this connection closes; `autoRenew` extends the lease
   * every third of it until the handle is unlocked; `signal` (an
   * AbortSignal) gives up a wait. `shared` holds the key as one of any
   * number of readers; `limit` (1..=10,000) as one of at most that many
   * exclusive holders (a counting semaphore); `lockDelay` (ms, at most
   * 60,000) keeps the key from everyone that long after this lease runs
   * out (not after an unlock). Resolves with a Lock, or null when the key
   * was busy or the wait ran out.
   */
  async lock(
    key,
    { ttl, wait, ephemeral = false, autoRenew = false, signal, shared = false, limit, lockDelay, notify = false } = {},
  ) {
    const ttlMs = millis("ttl", ttl, 1);
    const kind = lockKind({ shared, limit, lockDelay });
    if (notify) kind.notify = true;
    // With `notify`, the feed of the answered attempt's events.
    let feed = null;
    const onSend = notify ? (connection, id) => (feed = this.#route(feed, connection, id)) : undefined;
    const forever = wait === undefined || wait === null || wait === Infinity;
    const waitMs = forever ? null : millis("wait", wait, 0);
    const deadline = forever ? null : now() + waitMs;
    let first = true;
    for (;;) {
      let granted;
      try {
        granted = await this._exchange((attempt) => {
          const request = { op: "lock", key, ttl_ms: ttlMs, ephemeral, ...kind };
          // A retry (or a new request after a lost grant) waits only what
          // is left of the wait.
          if (deadline !== null) {
            request.wait_ms = first && attempt === 0 ? waitMs : Math.max(0, Math.floor(deadline - now()));
          }
          return request;
        }, { signal, onSend });
        first = false;
      } catch (error) {
        feed?._detach();
        if (signal?.aborted) throw signal.reason;
        if (error instanceof DeadboltError && (error.code === "busy" || error.code === "timeout")) return null;
        throw error;
      }
      if (signal?.aborted) {
        // Granted while the cancel was on its way: give it back.
        feed?.cancel();
        await this.unlock(key, granted.ok.token).catch(() => {});
        throw signal.reason;
      }
      const lock = await this.#anchor(key, granted, { ephemeral, autoRenew });
      if (lock && feed) lock._heed(feed);
      if (lock) return lock;
      feed?.cancel();
      // The grant ran out before it could be re-anchored (the wait was
      // longer than the lease), or its ephemeral connection broke: ask
      // again, within the wait that is left.
      if (deadline !== null && now() >= deadline) return null;
    }
  }

  /** `lock` with `wait: 0`: a Lock, or null if someone else holds `key`. */
  tryLock(key, { ttl, ephemeral = false, autoRenew = false, shared, limit, lockDelay, notify } = {}) {
    return this.lock(key, { ttl, wait: 0, ephemeral, autoRenew, shared, limit, lockDelay, notify });
  }

  /**
   * `watch` (SPEC section 7): every grant, release and expiry of the lock
   * `key` from now on, as events `{event, key, token}` with `event` one of
   * `granted`, `released`, `expired`. Resolves with a Watch once it is in
   * place; read it with `next()` or `for await`, end it with `cancel()`.
   * It lives on one connection and ends (`next()` gives null) with it.
   */
  watchKey(key) {
    return this.#watch({ op: "watch", key });
  }

  /** `watch` of the distinct set `name`: events `{event, set}` with
   * `event` one of `created`, `expired`, `torn_down`. See `watchKey`. */
  watchSet(name) {
    return this.#watch({ op: "watch", set: name });
  }

  async #watch(fields) {
    let feed = null;
    try {
      await this._exchange(() => fields, {
        onSend: (connection, id) => (feed = this.#route(feed, connection, id)),
      });
    } catch (error) {
      feed?._detach();
      throw error;
    }
    return feed;
  }

  /** A new feed for request `id` on `connection` (the last attempt's, if
   * any, is dropped). */
  #route(previous, connection, id) {
    previous?._detach();
    const max = this.#options.maxMessageBytes;
    const cancel = () => connection.request(this.#nextId++, { op: "cancel", target: id }, max).catch(() => {});
    const feed = new Watch(connection, id, cancel);
    connection.routes.set(id, feed);
    return feed;
  }

  /** `lock` with `shared: true`: one of any number of readers of `key`. */
  lockShared(key, options = {}) {
    return this.lock(key, { ...options, shared: true });
  }

  /**
   * The counting semaphore `key` with `limit` permits: `acquire(options)`
   * and `tryAcquire(options)` take one (a Lock, released with `unlock()`),
   * with the options of `lock`. Every user of the key must give the same
   * limit while it is held or waited on, or gets `conflict`. A client holds
   * at most one permit of a key (asking again is a retry of the same grant).
   */
  semaphore(key, limit) {
    return {
      key,
      limit,
      acquire: (options = {}) => this.lock(key, { ...options, limit }),
      tryAcquire: (options = {}) => this.tryLock(key, { ...options, limit }),
    };
  }

  /**
   * Turns a grant into a Lock with a sound lease view, or null if the grant
   * was lost first. The server starts the lease at the grant, after the
   * request was sent; so the view starts at the send time. After a long
   * wait that would leave little of it, so it is re-anchored with an
   * `extend` round trip, whose send time is again a sound anchor.
   */
  async #anchor(key, { ok, sentAt, connection }, { ephemeral, autoRenew }) {
    const ttl = ok.ttl_ms;
    let anchor = sentAt;
    if (now() - sentAt > ttl / 10) {
      try {
        anchor = await this._extendTimed(key, ok.token, ttl);
      } catch (error) {
        if (error instanceof DeadboltError && error.code === "not_held") return null;
        throw error;
      }
    }
    if (ephemeral && !connection.open) return null;
    const lock = new Lock(this, key, ok.token, ttl, anchor, ephemeral ? connection : null);
    /** The server's signed proof of the grant (a server started with
     * `--sign-grants`), or null: hand it to the protected resource, which
     * checks it with `verifyProof`. It states the grant's first lease. */
    lock.proof = ok.proof ?? null;
    this.#locks.add(lock);
    if (autoRenew) lock._startRenewal();
    return lock;
  }

  /** @internal */
  _forget(lock) {
    this.#locks.delete(lock);
    // The last ephemeral lock on a connection the client left frees it.
    if (lock._connection) this.#closeIfIdle(lock._connection);
  }

  /** `extend`, resolving with the send time of the answered attempt. */
  async _extendTimed(key, token, ttl) {
    const ttlMs = millis("ttl", ttl, 1);
    const { sentAt } = await this._exchange(() => ({ op: "extend", key, token, ttl_ms: ttlMs }));
    return sentAt;
  }

  /** `extend`: restarts the lease of grant `token` of `key` at `ttl` ms,
   * from any connection (the token alone authorises it). */
  async extend(key, token, ttl) {
    await this._extendTimed(key, token, ttl);
  }

  /**
   * `unlock`: ends grant `token` of `key`, from any connection. `not_held`
   * means the grant had already ended, unless an earlier attempt of this
   * call may have been carried out before its connection broke: then it
   * is that attempt's success (so may an `unavailable` one, in a cluster;
   * not one refused `overloaded`, or never sent).
   */
  async unlock(key, token) {
    let earlierMayHaveRun = false;
    try {
      await this._exchange((_attempt, earlier) => {
        earlierMayHaveRun = earlier.earlierMayHaveRun;
        return { op: "unlock", key, token };
      });
    } catch (error) {
      if (earlierMayHaveRun && error instanceof DeadboltError && error.code === "not_held") return;
      throw error;
    }
  }

  /** A handle on the distinct set `name`. */
  set(name) {
    return new DistinctSet(this, name);
  }

  /** Closes the connection and fails what is in flight with `closed`.
   * Renewal stops; locks stay held until their lease ends, except
   * ephemeral ones, which the server releases now. */
  async close() {
    if (this.#closed) return;
    this.#closed = true;
    for (const lock of this.#locks) lock._clientClosed();
    this.#locks.clear();
    const closed = new DeadboltError("closed", "the client is closed");
    const connection = this.#current ?? (await this.#connecting?.catch(() => null));
    connection?.close(closed);
    for (const retired of [...this.#retired]) retired.close(closed);
    this.#current = null;
  }
}

/** The margin for clock-rate drift between client and server: 1 % of the
 * lease + 2 ms, as Redlock does. */
const drift = (ttl) => ttl / 100 + 2;
const leaseFrom = (anchor, ttl) => anchor + Math.max(0, ttl - drift(ttl));

/**
 * A held lock: its key, its fencing token, and a view of its lease that
 * never outlasts the server's.
 */
export class Lock {
  #client;
  #ttl;
  #validUntil;
  #lost = false;
  #released = false;
  #stopped = false;
  #unlocking = null;
  #lostListeners = new Set();
  #expiringListeners = new Set();
  #feed = null;
  #resolveLost;
  #watchTimer = null;
  #renewTimer = null;
  #wakeRenewal = null;

  /** @internal Locks come from `client.lock` and `client.tryLock`. */
  constructor(client, key, token, ttl, anchor, connection) {
    this.#client = client;
    this.key = key;
    /** The fencing token: pass it to whatever the lock protects, which
     * should refuse any token lower than one it has seen. */
    this.token = token;
    this.#ttl = ttl;
    this.#validUntil = leaseFrom(anchor, ttl);
    /** @internal The connection an ephemeral lock lives and dies with. */
    this._connection = connection;
    /** Resolves once the lock may no longer be held: its lease view ran
     * out (renewal, if on, could not keep it up), the server said the
     * grant is gone, or an ephemeral lock's connection broke. It does not
     * resolve after `unlock()` or `detach()`. */
    this.lost = new Promise((resolve) => {
      this.#resolveLost = resolve;
    });
    this.#watch();
  }

  /** The lease the lock was last granted or extended with, in ms. */
  get ttl() {
    return this.#ttl;
  }

  /** How many more ms the lock is certainly held (0 once it may not be). */
  validFor() {
    if (this.#lost || this.#released) return 0;
    return Math.max(0, this.#validUntil - now());
  }

  /** Whether the lock is certainly still held. */
  isHeld() {
    return this.validFor() > 0;
  }

  /** Calls `callback` once the lock is lost (see `lost`); returns a
   * function that unregisters it. */
  onLost(callback) {
    if (this.#lost) {
      queueMicrotask(callback);
      return () => {};
    }
    this.#lostListeners.add(callback);
    return () => this.#lostListeners.delete(callback);
  }

  /** With `notify`: calls `callback(remainingMs)` each time the server
   * says a third of the lease is left without an extend (an extend
   * re-arms it); returns a function that unregisters it. */
  onExpiring(callback) {
    this.#expiringListeners.add(callback);
    return () => this.#expiringListeners.delete(callback);
  }

  /** @internal Heeds the server's events about this grant: `lost` marks
   * the lock lost at once; `expiring` calls the `onExpiring` callbacks. */
  async _heed(feed) {
    this.#feed = feed;
    for await (const event of feed) {
      if (event.token !== this.token) continue;
      if (event.event === "lost") {
        this._markLost();
        return;
      }
      if (event.event === "expiring") {
        for (const listener of [...this.#expiringListeners]) listener(event.remaining_ms);
      }
    }
  }

  /** Restarts the lease at `ttl` ms (and renews at that period from now
   * on). `not_held` marks the lock lost. */
  async extend(ttl) {
    try {
      const sentAt = await this.#client._extendTimed(this.key, this.token, ttl);
      if (!this.#stopped) {
        this.#ttl = millis("ttl", ttl, 1);
        this.#validUntil = leaseFrom(sentAt, this.#ttl);
        this.#watch();
        this.#wakeRenewal?.(); // renew on the new schedule
      }
    } catch (error) {
      if (error instanceof DeadboltError && error.code === "not_held") this._markLost();
      throw error;
    }
  }

  /** Stops renewal and releases the lock. `not_held` means the lease had
   * already run out: whatever the lock protected may have been touched by
   * the next holder. Calling it again returns the same promise. */
  unlock() {
    this._stop();
    this.#released = true;
    this.#unlocking ??= this.#client.unlock(this.key, this.token);
    return this.#unlocking;
  }

  /** Lets go of the handle without releasing the lock: renewal stops and
   * the lock stays held until its lease ends or someone unlocks it with
   * the token, which this returns. */
  detach() {
    this._stop();
    return this.token;
  }

  /** @internal Stops every timer; the handle is done. */
  _stop() {
    if (this.#stopped) return;
    this.#stopped = true;
    clearTimeout(this.#watchTimer);
    clearTimeout(this.#renewTimer);
    this.#wakeRenewal?.();
    this.#lostListeners.clear();
    this.#expiringListeners.clear();
    this.#feed?.cancel();
    this.#client._forget(this);
  }

  /** @internal The client was closed: renewal stops, and an ephemeral
   * lock is released by the server with the connection. */
  _clientClosed() {
    this._stop();
    if (this._connection) this.#released = true;
  }

  /** @internal */
  _markLost() {
    if (this.#lost || this.#stopped) return;
    this.#lost = true;
    const listeners = [...this.#lostListeners];
    this._stop();
    this.#resolveLost();
    for (const listener of listeners) {
      try {
        listener();
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  /** Resolves `lost` when the lease view runs out. */
  #watch() {
    if (this.#stopped) return;
    clearTimeout(this.#watchTimer);
    this.#watchTimer = setTimeout(() => {
      if (now() >= this.#validUntil) this._markLost();
      else this.#watch(); // a timer may fire a little early
    }, Math.max(0, this.#validUntil - now()) + 1);
    // In Node, this timer alone should not keep the process alive.
    this.#watchTimer?.unref?.();
  }

  /** Sleeps until `at` (performance.now() time); false if stopped first. */
  #sleepUntil(at) {
    return new Promise((resolve) => {
      if (this.#stopped) return resolve(false);
      this.#wakeRenewal = () => {
        clearTimeout(this.#renewTimer);
        this.#wakeRenewal = null;
        resolve(!this.#stopped);
      };
      this.#renewTimer = setTimeout(() => this.#wakeRenewal?.(), Math.max(0, at - now()));
    });
  }

  /** @internal Renews the lease every third of it, until stopped or lost:
   * a failed renewal is tried again while the lease view lasts. */
  async _startRenewal() {
    while (!this.#stopped) {
      const validUntil = this.#validUntil;
      const ttl = this.#ttl;
      if (!(await this.#sleepUntil(validUntil - (ttl * 2) / 3))) return;
      if (this.#validUntil !== validUntil) continue; // extended meanwhile
      const left = validUntil - now();
      let timer;
      const outOfTime = new Promise((resolve) => {
        timer = setTimeout(() => resolve("out of time"), Math.max(0, left));
      });
      let outcome;
      try {
        outcome = await Promise.race([this.#client._extendTimed(this.key, this.token, ttl), outOfTime]);
      } catch (error) {
        outcome = error;
      } finally {
        clearTimeout(timer);
      }
      if (this.#stopped) return;
      if (typeof outcome === "number") {
        this.#validUntil = Math.max(this.#validUntil, leaseFrom(outcome, ttl));
        this.#watch();
        continue;
      }
      const notHeld = outcome instanceof DeadboltError && outcome.code === "not_held";
      if (outcome !== "out of time" && !notHeld && now() < validUntil) {
        await this.#sleepUntil(now() + ttl / 20);
        continue;
      }
      this._markLost();
      return;
    }
  }
}

/**
 * The events of one request (a `watch`, or a `lock` with `notify`), in the
 * order the server pushed them: `await next()` (null once over) or
 * `for await (const event of watch)`. `cancel()` ends it on the server.
 */
export class Watch {
  #connection;
  #id;
  #cancel;
  #queue = [];
  #waiting = [];
  #over = false;

  /** @internal Use `client.watchKey` or `client.watchSet`. */
  constructor(connection, id, cancel) {
    this.#connection = connection;
    this.#id = id;
    this.#cancel = cancel;
  }

  /** The next event, or null once the watch is over (cancelled, or its
   * connection closed: watch again, and `inspect` what changed). */
  next() {
    if (this.#queue.length > 0) return Promise.resolve(this.#queue.shift());
    if (this.#over) return Promise.resolve(null);
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      const event = await this.next();
      if (event === null) return;
      yield event;
    }
  }

  /** Ends the watch: the server stops its events. */
  cancel() {
    if (this.#over) return;
    this._detach();
    this.#cancel();
  }

  /** @internal An event for this request. */
  _push(event) {
    if (this.#over) return;
    const { id: _id, ...fields } = event;
    const waiting = this.#waiting.shift();
    if (waiting) waiting(fields);
    else this.#queue.push(fields);
  }

  /** @internal No more events (its connection closed). */
  _end() {
    this.#over = true;
    for (const resolve of this.#waiting.splice(0)) resolve(null);
  }

  /** @internal Stops routing events here, and ends it. */
  _detach() {
    if (this.#connection.routes.get(this.#id) === this) this.#connection.routes.delete(this.#id);
    this._end();
  }
}

/** A handle on one distinct set. */
export class DistinctSet {
  #client;

  /** @internal Use `client.set(name)`. */
  constructor(client, name) {
    this.#client = client;
    this.name = name;
  }

  /** Creates the set with time to live `ttl` ms, or restarts its time to
   * live if it exists (every worker may call it): `{created, size}`. */
  setUp(ttl) {
    return this.#client.call("set_up", { set: this.name, ttl_ms: millis("ttl", ttl, 1) });
  }

  /** Inserts `key`: `{index, first}`. `index` is the key's 1-based position
   * in arrival order, the same for everyone; process the key when `first`. */
  insert(key) {
    return this.#client.call("insert", { set: this.name, key });
  }

  /** Inserts `keys` (any iterable) in order, in batches of at most 1000
   * keys, one request after another so that indexes follow the order;
   * one `{index, first}` per key, in the same order. */
  async insertMany(keys) {
    const results = [];
    let batch = [];
    let batchBytes = 0;
    const flush = async () => {
      const reply = await this.#client.call("insert", { set: this.name, keys: batch });
      results.push(...reply.results);
      batch = [];
      batchBytes = 0;
    };
    for (const key of keys) {
      const bytes = utf8Length(JSON.stringify(key)) + 1;
      if (batch.length > 0 && (batch.length === INSERT_BATCH_KEYS || batchBytes + bytes > INSERT_BATCH_BYTES)) {
        await flush();
      }
      batch.push(key);
      batchBytes += bytes;
    }
    if (batch.length > 0) await flush();
    return results;
  }

  /** One page of members: at most `limit` keys after index `after`:
   * `{members: [{index, key}], next}` (`next` is null at the end). */
  membersPage(after = 0, limit = MEMBERS_PAGE) {
    return this.#client.call("members", { set: this.name, after, limit });
  }

  /** Every member, `{index, key}` in index order, fetched a page at a
   * time: `for await (const {index, key} of set.members()) ...` */
  async *members({ after = 0, pageSize = MEMBERS_PAGE } = {}) {
    let next = after;
    while (next !== null && next !== undefined) {
      const page = await this.membersPage(next, pageSize);
      yield* page.members;
      next = page.next;
    }
  }

  /** `{size, remaining_ms}`; `no_such_set` if it does not exist. */
  inspect() {
    return this.#client.call("inspect_set", { set: this.name });
  }

  /** Removes the set now. Resolves with how many keys it held, or null if
   * it was already gone (never set up, expired, or torn down, perhaps by an
   * earlier attempt of this call whose reply was lost). */
  async tearDown() {
    try {
      return (await this.#client.call("tear_down", { set: this.name })).size;
    } catch (error) {
      if (error instanceof DeadboltError && error.code === "no_such_set") return null;
      throw error;
    }
  }
}

/**
 * Connects to a deadbolt server and says `hello`. `url` defaults, in a
 * page served by deadbolt, to that server's `/ws`. Several servers (the
 * nodes of a cluster) are an array of URLs or one string of URLs separated
 * by commas: the client connects to the first that answers, and moves to
 * the next when its server cannot be reached or answers `unavailable`.
 * Rejects if no server can be connected to at first; after that, the
 * client reconnects by itself.
 *
 * Options: `WebSocket` (a constructor; default `globalThis.WebSocket`,
 * which Node 20 lacks: pass `ws`'s), `clientId` (default: the tab's, kept
 * in sessionStorage, or a random 128-bit hex id), `auth` (the principal's
 * secret, for a server started with --auth), `retryFor` (ms without a
 * connection after which a request fails, 30 000), `retryDelay` and
 * `retryDelayMax` (backoff, 20 and 1000 ms), `connectTimeout` (10 000 ms),
 * `maxMessageBytes` (the server's message limit, 1 MiB).
 */
export async function connect(url, options = {}) {
  const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
  if (typeof WebSocketImpl !== "function") {
    throw new TypeError(
      "deadbolt: no WebSocket here; pass one: connect(url, { WebSocket }) (in Node 20: import { WebSocket } from 'ws')",
    );
  }
  const settings = { ...DEFAULTS };
  for (const [name, value] of Object.entries(options)) {
    if (value !== undefined) settings[name] = value;
  }
  const client = new Client(serverUrls(url), settings, WebSocketImpl);
  return client.start();
}

/**
 * Why `verifyProof` refused a proof. `code`: `malformed`, `unknown_key`
 * (signed by a key not among those given), `bad_signature` (changed or
 * forged), `expired`, `other_grant` (not of the expected `key`/`token`),
 * or `unsupported` (no Ed25519 in this WebCrypto).
 */
export class ProofError extends Error {
  constructor(code, message) {
    super(`deadbolt proof refused: ${code}: ${message}`);
    this.name = "ProofError";
    this.code = code;
  }
}

/** The version of the proofs this checks (docs/protocol.md). */
const PROOF_VERSION = 1;

function base64urlBytes(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text)) {
    throw new ProofError("malformed", "not base64url");
  }
  const base64 = text.replaceAll("-", "+").replaceAll("_", "/");
  const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function proofPart(text, name) {
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(base64urlBytes(text)));
  } catch (error) {
    throw error instanceof ProofError ? error : new ProofError("malformed", `${name} is not JSON`);
  }
}

/** The key id of a 32-byte Ed25519 key: base64url of the first 8 bytes of
 * its SHA-256, as the server's `kid`. */
async function keyId(raw) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", raw));
  return btoa(String.fromCharCode(...digest.subarray(0, 8))).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

/** The Ed25519 keys among `keys`: a JWK set (as `GET /pubkey` serves, as
 * an object or JSON text), a JWK, a base64url key, or an array of these. */
function ed25519Keys(keys) {
  if (typeof keys === "string") {
    const text = keys.trim();
    return text.startsWith("{") ? ed25519Keys(JSON.parse(text)) : [text];
  }
  if (Array.isArray(keys)) return keys.flatMap(ed25519Keys);
  if (keys && Array.isArray(keys.keys)) return ed25519Keys(keys.keys);
  if (keys && keys.kty === "OKP" && keys.crv === "Ed25519") return [keys.x];
  return [];
}

/** The public keys a deadbolt server signs grants with: `GET /pubkey` of
 * `base` (an http(s) origin; default: this page's). */
export async function fetchPublicKeys(base = globalThis.location?.origin) {
  const response = await fetch(new URL("/pubkey", base));
  if (!response.ok) throw new DeadboltError("unavailable", `GET /pubkey: ${response.status} ${await response.text()}`);
  return response.json();
}

/**
 * Checks a grant's proof offline, as a protected resource does before it
 * accepts a write under a lock: the signature against the server's keys
 * (`keys`: what `fetchPublicKeys` returns, a JWK, a base64url key, or an
 * array of them), that the lease has not ended by `now` (ms since the
 * epoch, default `Date.now()`), and, if given, that it is the grant of
 * `key` and `token`. Resolves with the statement (`key`, `token`,
 * `client`, `mode`, `granted_at_ms`, `ttl_ms`, `expires_at_ms`); rejects
 * with a ProofError. Uses WebCrypto's Ed25519 (Chromium 137+, Firefox
 * 129+, Safari 17+, Node 20).
 */
export async function verifyProof(proof, keys, { now: at = Date.now(), key, token } = {}) {
  const parts = typeof proof === "string" ? proof.trim().split(".") : [];
  if (parts.length !== 3) throw new ProofError("malformed", "not three base64url parts joined by `.`");
  const [headerText, payloadText, signatureText] = parts;
  const header = proofPart(headerText, "header");
  if (header.alg !== "EdDSA") throw new ProofError("malformed", `alg ${header.alg} (only EdDSA is accepted)`);
  let signer = null;
  for (const x of ed25519Keys(keys)) {
    const raw = base64urlBytes(x);
    if (raw.length === 32 && (await keyId(raw)) === header.kid) signer = raw;
  }
  if (!signer) throw new ProofError("unknown_key", `signed by key ${header.kid}, which is not among the keys given`);
  let cryptoKey;
  try {
    cryptoKey = await crypto.subtle.importKey("raw", signer, { name: "Ed25519" }, false, ["verify"]);
  } catch (error) {
    throw new ProofError("unsupported", `this WebCrypto has no Ed25519: ${error.message}`);
  }
  const signed = new TextEncoder().encode(`${headerText}.${payloadText}`);
  const good = await crypto.subtle.verify({ name: "Ed25519" }, cryptoKey, base64urlBytes(signatureText), signed);
  if (!good) throw new ProofError("bad_signature", "the signature does not match (a changed or forged proof)");
  const payload = proofPart(payloadText, "payload");
  if (payload.v !== PROOF_VERSION) throw new ProofError("malformed", `version ${payload.v} (this reads ${PROOF_VERSION})`);
  const statement = {
    key: payload.key,
    token: payload.token,
    client: payload.client,
    mode: payload.mode,
    granted_at_ms: payload.granted_at_ms,
    ttl_ms: payload.ttl_ms,
    expires_at_ms: payload.granted_at_ms + payload.ttl_ms,
  };
  if (at >= statement.expires_at_ms) {
    throw new ProofError("expired", `the lease ended at ${statement.expires_at_ms}, ${at - statement.expires_at_ms} ms ago`);
  }
  if (key !== undefined && key !== statement.key) throw new ProofError("other_grant", `the proof is for key ${JSON.stringify(statement.key)}`);
  if (token !== undefined && token !== statement.token) throw new ProofError("other_grant", `the proof is for token ${statement.token}`);
  return statement;
}
