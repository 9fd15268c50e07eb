// pagesync for web pages. `Database` runs one document in a dedicated worker (worker.js), where
// SQLite, the OPFS journals and the WebSocket live, and forwards calls to it.
//
// One owner per document per origin: the tab holding the Web Lock `pagesync:<doc>` runs the
// worker; other tabs reach it over the BroadcastChannel `pagesync:<doc>` with the same API. When
// the owner closes, the next tab in the lock's queue starts its own worker on the same OPFS
// files and announces itself; the others re-send what was in flight (a write in flight at that
// moment fails with a clear error instead, since it may or may not have been applied).
//
//   const db = await Database.open(docId, { url: "ws://127.0.0.1:8787/v1/sync", token });
//   const m = await db.exec("INSERT INTO todos(title) VALUES (?)", ["milk"]);
//   m.id;               // the mutation's id
//   await m.settled;    // { state: "confirmed" } or { state: "rejected", code, message }
//   await db.migrate(["CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)"]); // once per doc
//   await db.query("SELECT * FROM todos");            // rows as objects
//   const stop = db.subscribe("SELECT * FROM todos", [], (rows) => render(rows));
//   await db.status();  // { pending, confirmed, rejected: [{ id, code, message }], ... }
//   await db.sync();    // every write settled, and everything the server has is here

const CALL_TIMEOUT_MS = 30_000;
const SYNC_TIMEOUT_MS = 10_000;
// setTimeout takes at most 2^31 - 1 ms; the call's own timer adds CALL_TIMEOUT_MS to a sync's.
export const MAX_SYNC_TIMEOUT_MS = 2 ** 31 - 1 - CALL_TIMEOUT_MS;
const OPEN_RETRIES = 40; // the previous owner's worker may take a moment to release OPFS

export class Database {
  #docId;
  #options;
  #tab = crypto.randomUUID();
  #next = 1;
  #calls = new Map(); // id -> { op, args, resolve, reject, timer }
  #subs = new Map(); // sub id -> { sql, params, callback }
  #settled = new Map(); // mutation id -> resolve
  #statusListeners = new Set();
  #presenceListeners = new Set();
  #closed = false;
  #channel = null;
  #worker = null; // set while this tab owns the document
  #workerCalls = new Map(); // worker call id -> { resolve, reject }
  #owner = null; // the owning tab's id, once known
  #releaseLock = null;
  #whenReady = null; // settles `open`: once this tab owns the document or has heard from the owner
  #warm = Promise.resolve(); // the worker's script and wasm loaded (or failing to)
  /** "owner" when this tab runs the worker, "follower" when another tab does. */
  role = "pending";
  storageKind = null;

  constructor(docId, options) {
    this.#docId = docId;
    this.#options = {
      url: options.url ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sync`,
      token: options.token ?? "",
      persist: options.persist ?? true,
      online: options.online ?? true,
      workerUrl: options.workerUrl ?? new URL("./worker.js", import.meta.url),
    };
  }

  /**
   * Opens a document (32 hex digits). Options: `url` (the server's /v1/sync WebSocket), `token`,
   * `persist` (default true: OPFS, surviving reloads), `online` (default true).
   * Resolves once this tab owns the document or has heard from the tab that does.
   */
  static async open(docId, options = {}) {
    const db = new Database(docId, options);
    if (!globalThis.navigator?.locks || !globalThis.BroadcastChannel) {
      await db.#becomeOwner(); // no way to share: this tab opens it alone
      return db;
    }
    db.#spawnWorker();
    db.#channel = new BroadcastChannel(`pagesync:${docId}`);
    db.#channel.onmessage = (e) => db.#onChannel(e.data);
    addEventListener("pagehide", () => db.#channel?.postMessage({ type: "bye", tab: db.#tab }));
    const ready = new Promise((resolve, reject) => {
      db.#whenReady = { resolve, reject };
    });
    navigator.locks.request(`pagesync:${docId}`, () => {
      if (db.#closed) return undefined;
      return new Promise((release) => {
        db.#releaseLock = release;
        db.#becomeOwner().then(() => db.#whenReady?.resolve(), (e) => {
          db.#whenReady?.reject(e);
          release();
        });
      });
    });
    db.#channel.postMessage({ type: "hello", tab: db.#tab });
    await ready;
    // A follower resolves only once its worker has loaded what it needs, so a tab that
    // opened online can take over offline (the owner's close while the server is away).
    await db.#warm;
    return db;
  }

  /** Runs a write at once on the local state and queues it for the server. */
  async exec(sql, params = []) {
    const { id, localError } = await this.#call("exec", sql, params);
    const settled = new Promise((resolve) => this.#settled.set(id, resolve));
    return { id, localError, settled };
  }

  /**
   * Calls the server-defined mutator `name` with `args` (an array), as `exec` runs SQL: at
   * once on the local state (with the definitions the server sent; until they came it fails
   * locally with `no_such_mutator`), then on the server, which decides (its `reject` message
   * comes back as a rejection, `settled` resolving to it).
   */
  async call(name, args = []) {
    const { id, localError } = await this.#call("call", name, args);
    const settled = new Promise((resolve) => this.#settled.set(id, resolve));
    return { id, localError, settled };
  }

  /** The version of the server's mutator definitions in force here, `null` before any came. */
  mutators() {
    return this.#call("mutators");
  }

  /**
   * Brings the schema up to date: `migrations` is an array of SQL strings (version 1 first).
   * Each runs exactly once per document, whichever tab or client brings it first. Ship the
   * same list everywhere and call this after `open`. Resolves to the migrations submitted.
   */
  migrate(migrations) {
    return this.#call("migrate", migrations);
  }

  /**
   * Resolves once every write made so far is confirmed or rejected by the server and this
   * replica holds everything the server had when `sync` was called (it asks the server for
   * its head, so a write another client made a moment ago counts). Rejects with the server's
   * error (not one that passes on its own, such as `unavailable` while a server regains its
   * cluster lease: the replica subscribes again and the wait goes on), or when not in sync
   * within `timeoutMs` (default 10 s, at most `MAX_SYNC_TIMEOUT_MS`; offline, it waits for
   * that long).
   */
  sync({ timeoutMs = SYNC_TIMEOUT_MS } = {}) {
    if (typeof timeoutMs !== "number" || !(timeoutMs >= 0 && timeoutMs <= MAX_SYNC_TIMEOUT_MS)) {
      return Promise.reject(new RangeError(`timeoutMs must be a number of ms from 0 to ${MAX_SYNC_TIMEOUT_MS}`));
    }
    return this.#callWithin(timeoutMs + CALL_TIMEOUT_MS, "sync", timeoutMs);
  }

  /** A read-only query on the local state; rows are objects keyed by column name. */
  query(sql, params = []) {
    return this.#call("query", sql, params);
  }

  /** Calls `callback(rows)` now and whenever the result changes. Returns an unsubscribe function. */
  subscribe(sql, params, callback) {
    const sub = `${this.#tab}:${this.#next++}`;
    this.#subs.set(sub, { sql, params: params ?? [], callback });
    this.#call("subscribe", sub, sql, params ?? []).catch((e) => callback(null, e));
    return () => {
      this.#subs.delete(sub);
      if (!this.#closed) this.#call("unsubscribe", sub).catch(() => {});
    };
  }

  /** `{ pending, confirmed, rejected: [{ id, code, message }], error, connected, caughtUp }`. */
  status() {
    return this.#call("status");
  }

  /** Calls `callback(status)` whenever the document or the connection changed. */
  onStatus(callback) {
    this.#statusListeners.add(callback);
    return () => this.#statusListeners.delete(callback);
  }

  /**
   * Sends `value` (anything JSON can hold: a name, a cursor, "typing") to everyone else with
   * this document open. Nothing is stored: the server keeps it while this context stays, and
   * it is said again after a reconnect. At most 8 KiB; at most one per 25 ms reaches them.
   */
  broadcast(value) {
    return this.#call("broadcast", value);
  }

  /** Who else has the document open: `[{ id, subject, timeline, value }]`. */
  presence() {
    return this.#call("presence");
  }

  /** Calls `callback(peers)` now and whenever someone comes, goes or broadcasts. Returns an unsubscribe function. */
  subscribePresence(callback) {
    this.#presenceListeners.add(callback);
    this.presence().then((peers) => this.#presenceListeners.has(callback) && callback(peers), () => {});
    return () => this.#presenceListeners.delete(callback);
  }

  /**
   * A page of the document's history, from the server: `{ records, next }`, oldest first. Each
   * record: `{ cursor, doc, storage_lsn, timeline, timeline_lsn, subject, client_ms, received_ms,
   * applied_ms, outcome: "applied" | "rejected", code, message, statements: [{ sql, params }],
   * once }`. Options: `since` (a Date, ms since the epoch, or an RFC 3339 string), `after` (a
   * page's `next`, to continue) and `limit` (at most 10,000; 1,000 by default). Needs the server
   * (a read grant; an admin one where the server keeps history to admins).
   */
  history({ since, after, limit } = {}) {
    const query = { since: since instanceof Date ? since.getTime() : since, after, limit };
    return this.#call("history", query);
  }

  /** Where mutation `id` stands (also for writes made before a reload). */
  state(id) {
    return this.#call("state", id);
  }

  /**
   * Uses `token` from now on, in every tab of this document: one that replaces a token about to
   * expire, or one that did (the server closes the connection at its token's `exp` and refuses
   * it after; writes made meanwhile wait). Said to the server at once, reconnecting if the old
   * token was refused. It must name the same subject (`sub`) the document was opened with;
   * another is refused. Resolves once the document uses it.
   */
  setToken(token) {
    if (typeof token !== "string") return Promise.reject(new TypeError("the token must be a string"));
    return this.#call("setToken", token);
  }

  /** Stops (false) or resumes (true) syncing; local reads and writes go on either way. */
  setOnline(online) {
    return this.#call("setOnline", online);
  }

  /** The server's state held here, as the bytes of a `.sqlite` file. */
  export() {
    return this.#call("export");
  }

  /** Closes this tab's handle; if it owned the document, another tab takes over. */
  close() {
    this.#closed = true;
    this.#channel?.postMessage({ type: "bye", tab: this.#tab });
    this.#channel?.close();
    this.#worker?.terminate();
    this.#worker = null;
    this.#releaseLock?.();
    for (const id of [...this.#calls.keys()]) this.#finish(id, new Error("the database was closed"));
  }

  // ---- ownership ----

  // Every tab starts its worker (script and wasm) at once, and followers keep theirs warm: a tab
  // that takes over may have no server to load anything from.
  #spawnWorker() {
    const worker = new Worker(this.#options.workerUrl, { type: "module" });
    worker.onmessage = (e) => this.#onWorker(e.data);
    worker.onerror = (e) => {
      const why = `the pagesync worker failed: ${e.message ?? "it could not be loaded"}`;
      for (const call of this.#workerCalls.values()) call.reject(new Error(why));
      this.#workerCalls.clear();
    };
    this.#worker = worker;
    this.#warm = this.#toWorker("init", []).catch(() => {}); // a failure shows again at open
  }

  async #becomeOwner() {
    if (!this.#worker) this.#spawnWorker();
    const { workerUrl, ...options } = this.#options;
    for (let attempt = 0; ; attempt++) {
      try {
        const info = await this.#toWorker("open", [this.#docId, options]);
        this.storageKind = info.storageKind;
        break;
      } catch (e) {
        // The previous owner's worker may not have let go of the OPFS files yet.
        console.warn(`pagesync: opening ${this.#docId} (attempt ${attempt + 1}): ${e.message}`);
        if (!/open in another tab/.test(e.message) || attempt >= OPEN_RETRIES) throw e;
        await new Promise((r) => setTimeout(r, Math.min(50 + attempt * 25, 500)));
      }
    }
    this.role = "owner";
    this.#owner = this.#tab;
    this.#channel?.postMessage({ type: "owner", tab: this.#tab });
    this.#resendInFlight();
  }

  // In-flight calls went to an owner that is gone: re-send what is safe to repeat.
  #resendInFlight() {
    for (const [sub, s] of this.#subs) this.#send({ id: 0, op: "subscribe", args: [sub, s.sql, s.params] });
    for (const [id, call] of this.#calls) {
      if (call.op === "exec") {
        this.#finish(id, new Error("the tab that ran this document closed while this write was in flight; "
          + "it may or may not have been applied: check db.status() before writing it again"));
      } else {
        this.#send({ id, op: call.op, args: call.args });
      }
    }
  }

  #onChannel(msg) {
    const owner = this.role === "owner";
    if (msg.type === "owner") {
      // Re-announcements of the same owner (answers to other tabs' hellos) change nothing.
      if (msg.tab === this.#owner || owner) return;
      const first = this.#owner === null;
      this.role = "follower";
      this.#owner = msg.tab;
      this.#resendInFlight();
      if (first) this.#whenReady?.resolve();
    } else if (msg.type === "hello" && owner) {
      this.#channel.postMessage({ type: "owner", tab: this.#tab });
    } else if (msg.type === "call" && owner) {
      this.#toWorker(msg.op, msg.args).then(
        (result) => this.#channel.postMessage({ type: "reply", to: msg.tab, id: msg.id, result }),
        (e) => this.#channel.postMessage({ type: "reply", to: msg.tab, id: msg.id, error: e.message }),
      );
    } else if (msg.type === "bye" && owner) {
      this.#worker.postMessage({ id: 0, op: "forgetTab", args: [msg.tab] });
    } else if (msg.type === "reply" && msg.to === this.#tab) {
      this.#finish(msg.id, "error" in msg ? new Error(msg.error) : null, msg.result);
    } else if (msg.type === "event") {
      this.#onEvent(msg.event);
    }
  }

  // ---- calls ----

  #call(op, ...args) {
    return this.#callWithin(CALL_TIMEOUT_MS, op, ...args);
  }

  #callWithin(timeoutMs, op, ...args) {
    if (this.#closed) return Promise.reject(new Error("the database was closed"));
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => this.#finish(id, new Error(`no tab answered ${op} within ${timeoutMs / 1000} s`)),
        timeoutMs,
      );
      this.#calls.set(id, { op, args, resolve, reject, timer });
      this.#send({ id, op, args });
    });
  }

  #send({ id, op, args }) {
    if (this.role === "owner") {
      this.#toWorker(op, args).then(
        (result) => this.#finish(id, null, result),
        (e) => this.#finish(id, e),
      );
    } else if (this.#owner !== null && this.#channel) {
      this.#channel.postMessage({ type: "call", tab: this.#tab, id, op, args });
    } // else: queued in #calls, sent when an owner announces itself
  }

  #finish(id, error, result) {
    const call = this.#calls.get(id);
    if (!call) return;
    this.#calls.delete(id);
    clearTimeout(call.timer);
    if (error) call.reject(error);
    else call.resolve(result);
  }

  #toWorker(op, args) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#workerCalls.set(id, { resolve, reject });
      this.#worker.postMessage({ id, op, args });
    });
  }

  #onWorker(msg) {
    if (msg.event) {
      this.#onEvent(msg);
      this.#channel?.postMessage({ type: "event", event: msg });
      return;
    }
    const call = this.#workerCalls.get(msg.id);
    if (!call) return;
    this.#workerCalls.delete(msg.id);
    if ("error" in msg) call.reject(new Error(msg.error));
    else call.resolve(msg.result);
  }

  #onEvent(msg) {
    if (msg.event === "rows") {
      this.#subs.get(msg.sub)?.callback(msg.rows ?? null, msg.error ? new Error(msg.error) : undefined);
    } else if (msg.event === "settled") {
      this.#settled.get(msg.id)?.(msg.state);
      this.#settled.delete(msg.id);
    } else if (msg.event === "status") {
      for (const listener of this.#statusListeners) listener(msg.status);
    } else if (msg.event === "presence") {
      for (const listener of this.#presenceListeners) listener(msg.peers);
    } else if (msg.event === "token") {
      // The token a takeover opens the document with.
      this.#options.token = msg.token;
    }
  }
}
