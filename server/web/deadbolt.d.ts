// Types of deadbolt.js, the browser (and Node) client of the deadbolt lock
// and de-duplication server. Durations are milliseconds. Reply objects are
// the protocol's own JSON (docs/protocol.md), so their fields are
// snake_case as on the wire.

/** A wire error code of the server (docs/protocol.md, "Errors and limits"). */
export type ServerErrorCode =
  | "bad_request"
  | "busy"
  | "timeout"
  | "cancelled"
  | "not_held"
  | "no_such_set"
  | "too_large"
  | "overloaded"
  | "unauthorized"
  | "shutting_down"
  | "unavailable"
  | "internal";

/**
 * The client's own codes: `connection_lost` (the request could not be
 * carried, even after retrying for `retryFor`), `closed` (the client was
 * closed). A message over `maxMessageBytes` fails with `too_large` before
 * it is sent. Of the server's codes, `unavailable`, `shutting_down` and
 * `overloaded` are retried within `retryFor` (on the next server, after
 * the first two) and come through only once it has run out.
 */
export type ClientErrorCode = "connection_lost" | "closed";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

/** An error typed by its wire code. */
export declare class DeadboltError extends Error {
  constructor(code: ErrorCode | (string & {}), message?: string, options?: ErrorOptions);
  readonly name: "DeadboltError";
  /** The wire code; codes a newer server adds come through as they are. */
  readonly code: ErrorCode | (string & {});
}

/** The constructor of a WHATWG-style WebSocket (browsers, Node 22+, `ws`). */
export interface WebSocketConstructor {
  new (url: string | URL, protocols?: string | string[]): WebSocketLike;
}

/** What the client uses of a WebSocket. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open" | "message" | "close" | "error", listener: (event: any) => void, options?: { once?: boolean }): void;
  removeEventListener(type: "open" | "message" | "close" | "error", listener: (event: any) => void): void;
}

export interface ConnectOptions {
  /** The WebSocket class; default `globalThis.WebSocket`. Node 20 has none:
   * pass `WebSocket` from the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** The client id, 1..=64 bytes: the owner of the locks you take and the
   * keys you insert first. Default: in a browser the tab's (kept in
   * sessionStorage, so a reload keeps it), elsewhere a random 128-bit hex
   * id; either way kept for the life of the client. */
  clientId?: string;
  /** The principal's secret, said in every `hello`, for a server started
   * with `--auth` (requests are refused `unauthorized` without it). */
  auth?: string;
  /** How long a request may go without a connection (reconnecting, backing
   * off, moving to another server) before it fails with `connection_lost`,
   * or with the server's `unavailable` if that was the last answer. Time
   * spent waiting on the server does not count. Default 30 000. */
  retryFor?: number;
  /** The first delay between reconnect attempts; it doubles up to
   * `retryDelayMax`, with jitter. Defaults 20 and 1000. */
  retryDelay?: number;
  retryDelayMax?: number;
  /** How long opening a connection may take. Default 10 000. */
  connectTimeout?: number;
  /** The server's message limit (`deadbolt serve --message-bytes-max`):
   * bigger requests fail with `too_large` unsent. Default 1 MiB. */
  maxMessageBytes?: number;
}

/**
 * Connects and says `hello`. `url` is `ws://host:port/ws`; in a page served
 * by deadbolt it defaults to that server. Several servers (the nodes of a
 * cluster) are an array of URLs or one string of URLs separated by commas:
 * the client connects to the first that answers, trying them in turn, and
 * moves on to the next when its server cannot be reached or answers
 * `unavailable` (or `shutting_down`). Rejects if no server can be
 * connected to at first; afterwards the client reconnects by itself (same
 * client id, backoff) and retries what was in flight.
 */
export declare function connect(url?: string | readonly string[], options?: ConnectOptions): Promise<Client>;

export interface LockOptions {
  /** The lease, 1..=86 400 000 ms. Required. */
  ttl: number;
  /** How long to wait: undefined (or Infinity) for as long as it takes, 0
   * to not wait at all. After a lost connection the retry waits what is
   * left. */
  wait?: number;
  /** Release as soon as the connection that took it closes (a page that
   * closes frees its locks at once). The handle is then `lost`. */
  ephemeral?: boolean;
  /** Renew the lease every third of it until `unlock()`/`detach()`. */
  autoRenew?: boolean;
  /** Gives up the wait: the server cancels it and the promise rejects with
   * the signal's reason (a grant that crossed the cancel is released). */
  signal?: AbortSignal;
  /** Hold the key shared: with any number of other shared holders and no
   * exclusive one. A waiting exclusive request blocks later shared ones. */
  shared?: boolean;
  /** Hold the key as one of at most `limit` (1..=10 000) exclusive
   * holders: a counting semaphore. Everyone using the key must give the
   * same limit while it is held or waited on, or gets `conflict`. */
  limit?: number;
  /** After this lease runs out (not after an unlock), nobody is granted the
   * key for this many ms (at most 60 000). */
  lockDelay?: number;
  /** Have the server push `expiring` (see `Lock.onExpiring`) and `lost`
   * (which resolves `Lock.lost` at once) about the grant. */
  notify?: boolean;
}

/** A pushed event of a `watch` (SPEC section 7); the lock `key` with
 * `token`, or the `set`. */
export interface WatchEvent {
  event: "granted" | "released" | "expired" | "created" | "torn_down" | "expiring" | "lost";
  key?: string;
  set?: string;
  token?: number;
  remaining_ms?: number;
  reason?: "expired" | "revoked";
}

/** The events of a `watch`, in order, until `cancel()` or its connection
 * closes (then `next()` gives null: watch again). */
export declare class Watch implements AsyncIterable<WatchEvent> {
  next(): Promise<WatchEvent | null>;
  [Symbol.asyncIterator](): AsyncIterator<WatchEvent>;
  /** Ends the watch; the server stops its events. */
  cancel(): void;
}

/** A counting semaphore (`Client.semaphore`). */
export interface Semaphore {
  readonly key: string;
  readonly limit: number;
  /** Takes a permit (a Lock): null if none was free in time. */
  acquire(options: Omit<LockOptions, "limit" | "shared">): Promise<Lock | null>;
  /** Takes a permit if one is free now. */
  tryAcquire(options: Omit<TryLockOptions, "limit" | "shared">): Promise<Lock | null>;
}

export type TryLockOptions = Omit<LockOptions, "wait" | "signal">;

/** One holder in an `inspect` reply. */
export interface HolderInfo {
  client: string;
  /** Left out by a server with `--auth` unless the asker is the holder's
   * client id or an admin. */
  token?: number;
  remaining_ms: number;
  mode: "exclusive" | "shared";
}

/** `inspect`. */
export interface LockInfo {
  /** The first (oldest) of `holders`. */
  holder: HolderInfo | null;
  waiters: number;
  /** Every holder, oldest grant first. */
  holders: HolderInfo[];
  /** How many exclusive holders the key admits. */
  limit: number;
}

export interface ConnectEventDetail {
  clientId: string;
  /** `deadbolt/<version>`. */
  server: string | null;
  /** False for the first connection. */
  reconnect: boolean;
  /** The URL of the server connected to (one of `Client.urls`). */
  url: string;
}

export interface ClientEventMap {
  connect: CustomEvent<ConnectEventDetail>;
  disconnect: CustomEvent<undefined>;
}

/**
 * A connection to a deadbolt server. Requests are pipelined: any number may
 * be in flight, a waiting lock holds up nothing. Every operation is retried
 * after a lost connection, which the protocol makes safe: a retried lock
 * returns the same token, a retried insert the same `first`.
 *
 * Events: `connect` after each `hello`, `disconnect` when a connection breaks.
 */
export declare class Client extends EventTarget {
  private constructor();
  /** Every server it may connect to, in the order given to `connect`. */
  readonly urls: readonly string[];
  /** The URL of the server in use, or of the one to be tried next. */
  readonly url: string;
  /** The client id, kept across reconnects. */
  readonly clientId: string;
  /** `deadbolt/<version>` from the last `hello`. */
  readonly server: string | null;
  /** Whether a connection is open right now. */
  readonly connected: boolean;

  /** Takes `key`: a Lock, or null if it was busy (`wait: 0`) or the wait
   * ran out. Without `wait` it waits as long as it takes. */
  lock(key: string, options: LockOptions): Promise<Lock | null>;
  /** Takes `key` if it is free: a Lock, or null if someone else holds it. */
  tryLock(key: string, options: TryLockOptions): Promise<Lock | null>;
  /** `lock` with `shared: true`. */
  lockShared(key: string, options: Omit<LockOptions, "shared" | "limit">): Promise<Lock | null>;
  /** The counting semaphore `key` with `limit` permits. */
  semaphore(key: string, limit: number): Semaphore;
  /** Every grant (`granted`), release (`released`) and expiry (`expired`)
   * of the lock `key` from now on. Needs the `read` grant of `key`. */
  watchKey(key: string): Promise<Watch>;
  /** The creation, expiry and tear-down (`torn_down`) of the set `name`. */
  watchSet(name: string): Promise<Watch>;
  /** Restarts the lease of grant `token` of `key`, from any connection. */
  extend(key: string, token: number, ttl: number): Promise<void>;
  /** Ends grant `token` of `key`, from any connection. `not_held` if it had
   * ended already (a retry's `not_held` counts as success when an attempt
   * before it may have been carried out: sent, and not refused
   * `overloaded`). */
  unlock(key: string, token: number): Promise<void>;
  /** Who holds `key` and how many wait for it. */
  inspect(key: string): Promise<LockInfo>;
  /** A handle on the distinct set `name` (no request is sent). */
  set(name: string): DistinctSet;
  /** Counters, sizes, and the `top` (default 20) held locks, contended keys
   * and largest sets. */
  stats(top?: number): Promise<StatsReply>;
  /** A round trip. */
  ping(): Promise<void>;
  /** Any request `{op, ...fields}`, retried like the rest; resolves with the
   * reply's `ok` object. */
  call(op: string, fields?: Record<string, unknown>): Promise<any>;
  /** Closes the connection; what is in flight fails with `closed`. Renewal
   * stops; locks stay held until their lease ends, except ephemeral ones. */
  close(): Promise<void>;

  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/**
 * A held lock. The lease view is conservative: anchored at the send time of
 * the request that got the grant, less 1 % + 2 ms for clock drift (and
 * re-anchored with an `extend` after a long wait), so it never outlasts the
 * server's lease.
 */
export declare class Lock {
  private constructor();
  readonly key: string;
  /** The fencing token, below 2^53: pass it to whatever the lock protects,
   * which should refuse any token lower than one it has seen. */
  readonly token: number;
  /** The lease last granted or extended, in ms. */
  readonly ttl: number;
  /** The server's signed proof of the grant (`deadbolt serve
   * --sign-grants`), or null: hand it to the protected resource, which
   * checks it with `verifyProof`. It states the grant's first lease. */
  readonly proof: string | null;
  /** Resolves once the lock may no longer be held: the lease view ran out
   * (renewal, if on, could not keep it up), the server said the grant is
   * gone, or an ephemeral lock's connection broke. Never after `unlock()`
   * or `detach()`. */
  readonly lost: Promise<void>;
  /** Milliseconds the lock is certainly still held; 0 once it may not be. */
  validFor(): number;
  /** `validFor() > 0`. */
  isHeld(): boolean;
  /** Calls `callback` when the lock is lost; returns an unsubscribe function. */
  onLost(callback: () => void): () => void;
  /** With `notify`: calls `callback(remainingMs)` when the server says a
   * third of the lease is left without an extend; returns an unsubscribe
   * function. */
  onExpiring(callback: (remainingMs: number) => void): () => void;
  /** Restarts the lease at `ttl` (renewal follows the new lease).
   * `not_held` marks the lock lost. */
  extend(ttl: number): Promise<void>;
  /** Stops renewal and releases the lock. `not_held` means the lease had
   * run out already. Calling it again returns the same promise. */
  unlock(): Promise<void>;
  /** Stops renewal and lets go of the handle, leaving the lock held until
   * its lease ends; returns the token (to unlock it elsewhere). */
  detach(): number;
}

/** `insert`: `index` is the key's 1-based position in arrival order, the
 * same for everyone; `first` is true only for the client that inserted it
 * first (also on its retries). */
export interface Inserted {
  index: number;
  first: boolean;
}

export interface Member {
  index: number;
  key: string;
}

export interface MembersPage {
  members: Member[];
  /** The `after` of the next page, or null at the end. */
  next: number | null;
}

export interface MembersOptions {
  /** Start after this index (default 0: from the start). */
  after?: number;
  /** Keys per request, 1..=10 000 (default 1000). */
  pageSize?: number;
}

/** A handle on one distinct set. */
export declare class DistinctSet {
  private constructor();
  readonly name: string;
  /** Creates the set with time to live `ttl`, or restarts the time to live
   * of an existing one (every worker may call it). */
  setUp(ttl: number): Promise<{ created: boolean; size: number }>;
  /** Inserts one key. `no_such_set` if the set does not exist. */
  insert(key: string): Promise<Inserted>;
  /** Inserts keys in order, at most 1000 per request, one request after
   * another; one result per key, in the same order. */
  insertMany(keys: Iterable<string>): Promise<Inserted[]>;
  /** One page: at most `limit` (default 1000) keys after index `after`. */
  membersPage(after?: number, limit?: number): Promise<MembersPage>;
  /** Every member in index order, a page at a time. */
  members(options?: MembersOptions): AsyncGenerator<Member, void, undefined>;
  /** Size and remaining time to live; `no_such_set` if it does not exist. */
  inspect(): Promise<{ size: number; remaining_ms: number }>;
  /** Removes the set: how many keys it held, or null if it was already gone. */
  tearDown(): Promise<number | null>;
}

/** A held lock in a `stats` reply. */
export interface HeldLock {
  key: string;
  /** The holder's client id. */
  client: string;
  token: number;
  remaining_ms: number;
  waiters: number;
}

/** A distinct set in a `stats` reply. */
export interface SetSummary {
  set: string;
  size: number;
  remaining_ms: number;
}

/** `stats`: a bounded snapshot. Counters count since the server started;
 * take rates from two snapshots (and `uptime_ms`). */
export interface StatsReply {
  /** `deadbolt/<version>`. */
  server: string;
  uptime_ms: number;
  /** Open connections per frontend. */
  connections: { websocket?: number; quic?: number; local?: number; [frontend: string]: number | undefined };
  locks: {
    held: number;
    waiters: number;
    grants: number;
    releases: number;
    expiries: number;
    disconnects: number;
    timeouts: number;
    cancellations: number;
    busy: number;
  };
  sets: {
    count: number;
    members: number;
    created: number;
    expired: number;
    torn_down: number;
    inserts_new: number;
    inserts_duplicate: number;
  };
  /** Held locks, most waited-for first. */
  held: HeldLock[];
  /** Keys with waiters, most waiters first. */
  contended: HeldLock[];
  /** Distinct sets, largest first. */
  largest_sets: SetSummary[];
}

/** What a grant's proof states (docs/protocol.md, "Signed grants"). */
export interface ProofStatement {
  key: string;
  token: number;
  client: string;
  /** `"exclusive"` (or `"shared"`). */
  mode: string;
  /** The server's wall clock at the grant, ms since the Unix epoch. */
  granted_at_ms: number;
  ttl_ms: number;
  /** `granted_at_ms + ttl_ms`. */
  expires_at_ms: number;
}

/** An Ed25519 public key as a JSON Web Key. */
export interface Ed25519Jwk {
  kty: "OKP";
  crv: "Ed25519";
  x: string;
  kid?: string;
  alg?: string;
  use?: string;
}

/** Why `verifyProof` refused a proof. */
export declare class ProofError extends Error {
  readonly name: "ProofError";
  readonly code: "malformed" | "unknown_key" | "bad_signature" | "expired" | "other_grant" | "unsupported";
}

/** `GET /pubkey` of `base` (an http(s) origin; default: this page's): the
 * JWK set of the keys the server signs grants with. */
export declare function fetchPublicKeys(base?: string): Promise<{ keys: Ed25519Jwk[] }>;

/** Checks a grant's proof offline: the signature against `keys` (a JWK set
 * as `fetchPublicKeys` returns, a JWK, a base64url key, or an array), the
 * lease against `now` (default `Date.now()`), and the expected `key` and
 * `token` if given. Rejects with a ProofError. */
export declare function verifyProof(
  proof: string,
  keys: { keys: Ed25519Jwk[] } | Ed25519Jwk | string | ReadonlyArray<Ed25519Jwk | string>,
  options?: { now?: number; key?: string; token?: number },
): Promise<ProofStatement>;
