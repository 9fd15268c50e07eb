// pagesync's dedicated worker: owns one document's Replica (SQLite, the VFS, the OPFS journals)
// and its WebSocket. The owning tab's pagesync.js talks to it with {id, op, args} messages, for
// itself and for the other tabs of the origin (subscription ids carry the tab's id).
// Replies are {id, result} or {id, error}; pushed events are {event: "rows" | "settled" | "status"}.
import init, { Replica } from "./pkg/pagesync_wasm.js";

let replica = null;
let config = null; // { url, token, online, doc }
let socket = null;
let timer = null;
let retryMs = 0;
let lastVersion = -1;
let lastPresence = -1;
const subscriptions = new Map(); // id -> { sql, params, json }
const waiting = new Set(); // mutation ids whose state someone awaits
const syncs = new Set(); // { ask, deadline, timeoutMs, resolve, reject }: `sync` calls under way
let syncTimer = null;
const SYNC_POLL_MS = 10;

const RETRY_MIN_MS = 250;
const RETRY_MAX_MS = 10_000;

function randomSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return (BigInt(words[0]) << 32n) | BigInt(words[1]);
}

function flush() {
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  for (const frame of replica.pollTransmit()) socket.send(frame);
}

function schedule() {
  clearTimeout(timer);
  const at = replica.pollTimeout();
  if (at === undefined) return;
  timer = setTimeout(() => {
    if (replica.handleTimeout(Date.now())) changed();
    flush();
    schedule();
  }, Math.max(0, at - Date.now()));
}

// Tells the tabs who else has the document open, when that changed.
function presenceChanged() {
  const version = replica.presenceVersion();
  if (version === lastPresence) return;
  lastPresence = version;
  postMessage({ event: "presence", peers: peers() });
}

function peers() {
  return replica.presence().map((p) => {
    let value = p.value;
    try {
      value = value === null ? null : JSON.parse(value);
    } catch {}
    return { ...p, value };
  });
}

// Ends the `sync` calls whose server head has arrived (every write settled, every entry the
// server had when asked is here), the server refused, or whose time is up; polls while any wait.
function checkSyncs() {
  clearTimeout(syncTimer);
  if (syncs.size === 0) return;
  const now = Date.now();
  for (const s of [...syncs]) {
    let outcome = null; // [resolve] or [reject, error]
    try {
      // Cheap while waiting (no rejections table); the whole status only to say why not.
      const error = replica.syncError();
      if (error) {
        outcome = [s.reject, new Error(`${error.code}: ${error.message}`)];
      } else if (replica.inSync(s.ask)) {
        outcome = [s.resolve];
      } else if (now >= s.deadline) {
        const st = replica.status();
        const where = (st.connected ? "" : ", offline") + (st.error ? `, last error ${st.error.code}: ${st.error.message}` : "");
        outcome = [s.reject, new Error(`not in sync after ${s.timeoutMs} ms (${st.pending} writes pending${where})`)];
      }
    } catch (e) {
      outcome = [s.reject, e];
    }
    if (outcome) {
      syncs.delete(s);
      outcome[0](outcome[1]);
    }
  }
  if (syncs.size > 0) syncTimer = setTimeout(checkSyncs, SYNC_POLL_MS);
}

// Re-runs subscriptions and settles awaited mutations when the replica changed.
function changed() {
  checkSyncs();
  presenceChanged();
  const version = replica.version();
  if (version === lastVersion) return;
  lastVersion = version;
  for (const [sub, s] of subscriptions) {
    let message;
    try {
      const rows = replica.query(s.sql, s.params);
      const json = JSON.stringify(rows, (_, v) => (typeof v === "bigint" ? v.toString() : v));
      if (json === s.json) continue;
      s.json = json;
      message = { event: "rows", sub, rows };
    } catch (e) {
      message = { event: "rows", sub, error: String(e.message ?? e) };
    }
    postMessage(message);
  }
  for (const id of [...waiting]) {
    const state = replica.state(id);
    if (state.state !== "pending") {
      waiting.delete(id);
      postMessage({ event: "settled", id, state });
    }
  }
  postMessage({ event: "status", status: replica.status() });
}

// The server a redirect named (the one holding the document's lease), and the connection
// attempts to it that failed in a row: after REDIRECT_ATTEMPTS, back to config.url, whose server
// redirects again or serves the document itself.
let redirectedTo = null;
let redirectFailures = 0;
const REDIRECT_ATTEMPTS = 3;
// Redirects that come one after another (servers whose views of the cluster differ for a
// moment) are followed with a growing delay, never in a tight loop.
let lastFollow = 0;
let followDelayMs = 0;

function follow(url) {
  const now = Date.now();
  followDelayMs = now - lastFollow < 10_000 ? Math.min(RETRY_MAX_MS, Math.max(100, followDelayMs * 2)) : 0;
  lastFollow = now;
  redirectedTo = url;
  redirectFailures = 0;
  retryMs = 0;
  const ws = socket;
  socket = null;
  if (ws) ws.close();
  replica.disconnected();
  changed();
  setTimeout(connect, followDelayMs);
}

// Back to the configured server (the redirected one cannot be reached, or cannot serve).
function goHome() {
  redirectedTo = null;
  redirectFailures = 0;
}

function retryLater() {
  // Bounded exponential backoff with jitter.
  retryMs = Math.min(RETRY_MAX_MS, Math.max(RETRY_MIN_MS, retryMs * 2));
  setTimeout(connect, retryMs / 2 + Math.random() * (retryMs / 2));
}

function connect() {
  if (!config.online || socket) return;
  const url = redirectedTo ?? config.url;
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (err) {
    // A URL the browser refuses (malformed, a blocked port, ws:// from an https:// page).
    console.error(`pagesync: cannot connect to ${url}:`, err);
    if (redirectedTo) goHome();
    retryLater();
    return;
  }
  ws.binaryType = "arraybuffer";
  socket = ws;
  let opened = false;
  ws.onopen = () => {
    opened = true;
    redirectFailures = 0;
    replica.connected(Date.now(), url);
    flush();
    schedule();
    lastVersion = -1;
    changed();
  };
  ws.onmessage = (e) => {
    if (!(e.data instanceof ArrayBuffer)) return;
    try {
      replica.receive(Date.now(), new Uint8Array(e.data));
    } catch (err) {
      console.error("pagesync: applying a frame from the server failed:", err);
    }
    const moved = replica.takeRedirect();
    if (moved) {
      follow(moved);
      return;
    }
    if (redirectedTo && replica.errorCode() === "unavailable") {
      // The server a redirect named cannot serve the document now: back home.
      goHome();
      ws.close();
      return;
    }
    flush();
    schedule();
    changed();
  };
  ws.onclose = () => {
    if (socket !== ws) return;
    socket = null;
    // A connection that was made starts the backoff over, unless the server refused it for
    // what it is (a wrong or expired token): that would be refused again at once.
    if (opened && !replica.refusedForGood()) retryMs = 0;
    replica.disconnected();
    clearTimeout(timer);
    lastVersion = -1;
    changed();
    if (!config.online) return;
    if (redirectedTo && !opened && ++redirectFailures >= REDIRECT_ATTEMPTS) {
      goHome();
    }
    retryLater();
  };
}

function setOnline(online) {
  config.online = online;
  if (online) connect();
  else if (socket) {
    const ws = socket;
    socket = null;
    ws.close();
    replica.disconnected();
    lastVersion = -1;
    changed();
  }
}

const ops = {
  // Loads the wasm module ahead of need (a tab that takes over later may be offline).
  async init() {
    await init();
  },
  async open(docId, options) {
    if (replica) throw new Error("this worker already runs a document");
    await init();
    config = { url: options.url, token: options.token ?? "", online: options.online !== false, doc: docId };
    // The timeline's key (a secret the server checks): used when this browser has none yet.
    const key = crypto.getRandomValues(new Uint8Array(32));
    replica = await Replica.open(docId, config.token, options.persist !== false, key);
    connect();
    return { storageKind: replica.storageKind() };
  },
  exec(sql, params) {
    const out = replica.exec(sql, params ?? [], Date.now(), randomSeed());
    waiting.add(out.id);
    flush();
    schedule();
    queueMicrotask(changed);
    return out;
  },
  call(name, args) {
    const out = replica.call(name, args ?? [], Date.now(), randomSeed());
    waiting.add(out.id);
    flush();
    schedule();
    queueMicrotask(changed);
    return out;
  },
  mutators() {
    return replica.mutators();
  },
  // Migrations: an array of SQL strings, version i + 1 at index i.
  migrate(migrations) {
    const submitted = [];
    migrations.forEach((sql, i) => {
      const out = replica.migrate(i + 1, sql, Date.now(), randomSeed());
      if (out) {
        waiting.add(out.id);
        submitted.push(out);
      }
    });
    flush();
    schedule();
    queueMicrotask(changed);
    return submitted;
  },
  query(sql, params) {
    return replica.query(sql, params ?? []);
  },
  // Resolves once every write so far is settled by the server and every entry the server had
  // when asked is here (it asks for its head now rather than trusting the last report).
  sync(timeoutMs) {
    if (typeof timeoutMs !== "number" || !(timeoutMs >= 0 && timeoutMs < 2 ** 31)) {
      throw new RangeError("timeoutMs must be a number of milliseconds below 2^31");
    }
    const ask = replica.askHead();
    flush();
    schedule();
    return new Promise((resolve, reject) => {
      syncs.add({ ask, deadline: Date.now() + timeoutMs, timeoutMs, resolve, reject });
      checkSyncs();
    });
  },
  subscribe(sub, sql, params) {
    subscriptions.set(sub, { sql, params: params ?? [], json: null });
    lastVersion = -1;
    queueMicrotask(changed);
  },
  unsubscribe(sub) {
    subscriptions.delete(sub);
  },
  // A tab that reached this worker through its owner went away: drop its subscriptions.
  forgetTab(tab) {
    for (const sub of [...subscriptions.keys()]) if (sub.startsWith(`${tab}:`)) subscriptions.delete(sub);
  },
  status() {
    return replica.status();
  },
  broadcast(value) {
    replica.broadcast(JSON.stringify(value ?? null));
    flush();
    presenceChanged();
  },
  presence() {
    return peers();
  },
  state(id) {
    return replica.state(id);
  },
  setOnline(online) {
    setOnline(online);
  },
  // A new token of the same subject: said at once on an open connection; a connection refused
  // for the old one (expired) is made again now rather than after its backoff. Every tab keeps
  // it, for when it takes over.
  setToken(token) {
    if (typeof token !== "string") throw new TypeError("the token must be a string");
    replica.setToken(token);
    config.token = token;
    postMessage({ event: "token", token });
    if (socket) flush();
    else if (config.online) {
      retryMs = 0;
      connect();
    }
    queueMicrotask(changed);
  },
  export() {
    return replica.export();
  },
  // A page of the document's history from its server (GET /v1/docs/{id}/history): the same
  // server this worker syncs with, the same token.
  async history(query) {
    const sync = new URL(redirectedTo ?? config.url);
    sync.protocol = sync.protocol === "wss:" ? "https:" : "http:";
    const url = new URL(`/v1/docs/${config.doc}/history`, sync);
    for (const key of ["since", "after", "limit"]) {
      if (query?.[key] !== undefined && query[key] !== null) url.searchParams.set(key, String(query[key]));
    }
    const headers = config.token ? { authorization: `Bearer ${config.token}` } : {};
    const response = await fetch(url, { headers });
    if (!response.ok) throw new Error(`history: ${response.status} ${(await response.text()).trim()}`);
    return response.json();
  },
};

onmessage = async (e) => {
  const { id, op, args } = e.data;
  try {
    const result = await ops[op](...(args ?? []));
    postMessage({ id, result });
  } catch (err) {
    postMessage({ id, error: String(err?.message ?? err) });
  }
};
