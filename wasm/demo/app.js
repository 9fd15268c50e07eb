// The demo todo app: every write is a local mutation, synced through the server. With a token
// that may call mutators (its `call` claim), every write is a call of the server's mutators
// (wasm/demo/mutators.sql): each todo records its owner, and only the owner may delete it.
import { Database } from "./pagesync.js";

const params = new URLSearchParams(location.search);
const docId = params.get("doc") ?? "00000000000000000000000000000001";
const offlineKey = `pagesync-demo-offline-${docId}`;
const $ = (id) => document.getElementById(id);

// Migrations: version 1 first. Each runs once per document, whichever tab or client brings it.
const MIGRATIONS = [`CREATE TABLE todos (
  id INTEGER PRIMARY KEY,
  title TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 60),
  done INTEGER NOT NULL DEFAULT 0
)`, "ALTER TABLE todos ADD COLUMN owner TEXT NOT NULL DEFAULT ''"];

// The token's claims (its payload, base64url JSON; the server checks the signature).
function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch {
    return {};
  }
}

let pendingIds = new Set();

async function main() {
  const offline = localStorage.getItem(offlineKey) === "1";
  $("offline").checked = offline;
  const token = params.get("token") ?? "";
  const db = await Database.open(docId, { token, online: !offline });
  // Calls of the server's mutators, or plain SQL.
  const calls = Array.isArray(claims(token).call);
  window.pagesyncDb = db; // for tests and the console
  if (db.storageKind !== "opfs") $("error").textContent = "OPFS is not available: writes are kept in memory only.";

  if (calls) await db.call("setup", []);
  else await db.migrate(MIGRATIONS);
  const write = {
    add: (title) => (calls ? db.call("add_todo", [title]) : db.exec("INSERT INTO todos (title) VALUES (?)", [title])),
    done: (id, done) => (calls ? db.call("set_done", [id, done]) : db.exec("UPDATE todos SET done = ? WHERE id = ?", [done, id])),
    remove: (id) => (calls ? db.call("delete_own", [id]) : db.exec("DELETE FROM todos WHERE id = ?", [id])),
  };

  db.subscribe("SELECT id, title, done, owner FROM todos ORDER BY id", [], (rows, err) => {
    // Before the table exists (its setup call still on its way) there is nothing to show.
    if (err) return void (calls && /no such table/.test(err.message) ? render([]) : ($("error").textContent = err.message));
    render(rows ?? []);
  });
  db.onStatus(showStatus);
  showStatus(await db.status());

  // Presence: each context says who it is (a name from the URL, or a made-up one), and shows
  // who else has the list open. Nothing of it is stored.
  const me = params.get("name") ?? `guest-${Math.floor(Math.random() * 1000)}`;
  $("here").dataset.me = me;
  await db.broadcast({ name: me });
  db.subscribePresence(showPresence);

  $("add").addEventListener("submit", async (e) => {
    e.preventDefault();
    const title = $("title").value;
    $("title").value = "";
    try {
      await write.add(title);
    } catch (err) {
      $("error").textContent = err.message;
    }
  });
  $("offline").addEventListener("change", async () => {
    localStorage.setItem(offlineKey, $("offline").checked ? "1" : "0");
    await db.setOnline(!$("offline").checked);
  });
  $("todos").addEventListener("change", async (e) => {
    const id = Number(e.target.dataset.id);
    if (id) await write.done(id, e.target.checked ? 1 : 0);
  });
  $("todos").addEventListener("click", async (e) => {
    const id = Number(e.target.dataset.remove);
    if (id) await write.remove(id);
  });
}

function render(rows) {
  const list = $("todos");
  list.replaceChildren(
    ...rows.map((row) => {
      const li = document.createElement("li");
      li.className = row.done ? "done" : "";
      li.dataset.title = row.title;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = !!row.done;
      box.dataset.id = row.id;
      const span = document.createElement("span");
      span.textContent = row.title;
      const owner = document.createElement("small");
      owner.textContent = row.owner ? ` (${row.owner})` : "";
      const remove = document.createElement("button");
      remove.textContent = "✕";
      remove.title = "delete";
      remove.dataset.remove = row.id;
      remove.dataset.testid = "delete";
      li.append(box, span, owner, remove);
      return li;
    }),
  );
}

function showPresence(peers) {
  const names = peers.map((p) => p.value?.name ?? p.subject ?? `peer ${p.id}`).sort();
  $("here").dataset.peers = JSON.stringify(names);
  $("here").textContent = names.length ? `also here: ${names.join(", ")}` : "only you have this list open";
}

function showStatus(s) {
  const state = s.deleted ? "deleted" : s.connected ? (s.caughtUp ? "in sync" : "syncing") : "offline";
  // Deleted on the server: what is here stays readable, and nothing more can be added.
  for (const el of $("add").elements) el.disabled = s.deleted;
  $("sync").className = s.connected ? "online" : "";
  $("sync-text").textContent = `${state} · ${s.pending} pending · ${s.confirmed} confirmed · ${s.rejected.length} rejected`;
  $("sync").dataset.pending = s.pending;
  $("sync").dataset.state = state;
  const db = window.pagesyncDb;
  if (db) $("sync").dataset.role = db.role;
  if (db) $("sync-text").textContent += db.role === "owner" ? " · this tab runs the document" : " · through another tab";
  $("rejected").replaceChildren(
    ...s.rejected.map((r) => {
      const div = document.createElement("div");
      div.textContent = `write #${r.id} rejected by the server: ${r.message}`;
      return div;
    }),
  );
  if (s.deleted) $("error").textContent = "This list was deleted on the server: it is kept here for reading only.";
  else if (s.error && s.error.code !== "storage") $("error").textContent = `${s.error.code}: ${s.error.message}`;
}

main().catch((e) => {
  $("error").textContent = e.message;
  console.error(e);
});
