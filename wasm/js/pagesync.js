// pagesync for web pages: `Database` runs one document in a dedicated worker (worker.js), where
// SQLite, the OPFS journals and the WebSocket live, and forwards calls to it.
//
//   const db = await Database.open(docId, { url: "ws://127.0.0.1:8787/v1/sync", token });
//   const m = await db.exec("INSERT INTO todos(title) VALUES (?)", ["milk"]);
//   m.id;               // the mutation's id
//   await m.settled;    // { state: "confirmed" } or { state: "rejected", code, message }
//   await db.query("SELECT * FROM todos");            // rows as objects
//   const stop = db.subscribe("SELECT * FROM todos", [], (rows) => render(rows));
//   await db.status();  // { pending, confirmed, rejected: [{ id, code, message }], error, ... }

export class Database {
  #worker;
  #next = 1;
  #calls = new Map();
  #subs = new Map();
  #settled = new Map();
  #statusListeners = new Set();
  #closed = false;

  constructor(worker) {
    this.#worker = worker;
    worker.onmessage = (e) => this.#receive(e.data);
    worker.onerror = (e) => this.#fail(`the pagesync worker failed: ${e.message ?? e}`);
  }

  /**
   * Opens a document (32 hex digits). Options: `url` (the server's /v1/sync WebSocket), `token`,
   * `persist` (default true: OPFS, surviving reloads), `online` (default true).
   */
  static async open(docId, options = {}) {
    const url = options.workerUrl ?? new URL("./worker.js", import.meta.url);
    const db = new Database(new Worker(url, { type: "module" }));
    const info = await db.#call("open", docId, {
      url: options.url ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sync`,
      token: options.token ?? "",
      persist: options.persist ?? true,
      online: options.online ?? true,
    });
    db.storageKind = info.storageKind;
    return db;
  }

  /** Runs a write at once on the local state and queues it for the server. */
  async exec(sql, params = []) {
    const { id, localError } = await this.#call("exec", sql, params);
    const settled = new Promise((resolve) => this.#settled.set(id, resolve));
    return { id, localError, settled };
  }

  /** A read-only query on the local state; rows are objects keyed by column name. */
  query(sql, params = []) {
    return this.#call("query", sql, params);
  }

  /** Calls `callback(rows)` now and whenever the result changes. Returns an unsubscribe function. */
  subscribe(sql, params, callback) {
    const sub = this.#next++;
    this.#subs.set(sub, callback);
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

  /** Where mutation `id` stands (also for writes made before a reload). */
  state(id) {
    return this.#call("state", id);
  }

  /** Stops (false) or resumes (true) syncing; local reads and writes go on either way. */
  setOnline(online) {
    return this.#call("setOnline", online);
  }

  /** The server's state held here, as the bytes of a `.sqlite` file. */
  export() {
    return this.#call("export");
  }

  close() {
    this.#closed = true;
    this.#worker.terminate();
    this.#fail("the database was closed");
  }

  #call(op, ...args) {
    if (this.#closed) return Promise.reject(new Error("the database was closed"));
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#calls.set(id, { resolve, reject });
      this.#worker.postMessage({ id, op, args });
    });
  }

  #fail(message) {
    for (const { reject } of this.#calls.values()) reject(new Error(message));
    this.#calls.clear();
  }

  #receive(msg) {
    if (msg.event === "rows") {
      this.#subs.get(msg.sub)?.(msg.rows ?? null, msg.error ? new Error(msg.error) : undefined);
    } else if (msg.event === "settled") {
      this.#settled.get(msg.id)?.(msg.state);
      this.#settled.delete(msg.id);
    } else if (msg.event === "status") {
      for (const listener of this.#statusListeners) listener(msg.status);
    } else {
      const call = this.#calls.get(msg.id);
      if (!call) return;
      this.#calls.delete(msg.id);
      if ("error" in msg) call.reject(new Error(msg.error));
      else call.resolve(msg.result);
    }
  }
}
