// Page-level tests of the browser build: headless Debian chromium driven by playwright-core,
// against a real pagesync-server (which serves target/web) and the native `pagesync` CLI.
// Run by scripts/test-browser, which builds everything first (environment: see harness.mjs).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { chromium } from "playwright-core";
import {
  add, artifacts, bin, chromiumArgs, chromiumPath, cliRows, cli as runCli, freePort, logPage, randomDoc, startServer,
  startServerWith, stopServer, tempDir, titles, waitSynced, waitTitles,
} from "./harness.mjs";

const work = tempDir("browser");
const doc = randomDoc();
let port, server, browser, base;
const figures = {};
const cli = (...args) => runCli(port, join(work, "cli"), doc, ...args);

async function openApp(context) {
  const page = await context.newPage();
  logPage(page, "page");
  await page.goto(`${base}/?doc=${doc}`);
  await waitSynced(page);
  return page;
}

before(async () => {
  port = await freePort();
  base = `http://127.0.0.1:${port}`;
  mkdirSync(artifacts, { recursive: true });
  server = await startServer(port, join(work, "server"));
  browser = await chromium.launch({ executablePath: chromiumPath, args: chromiumArgs });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
  writeFileSync(join(artifacts, "figures.json"), JSON.stringify(figures, null, 2));
  console.log("figures:", JSON.stringify(figures));
});

let contextA, contextB, pageA, pageB;

test("two browser contexts edit one document and converge", async () => {
  contextA = await browser.newContext();
  contextB = await browser.newContext();
  pageA = await openApp(contextA);
  pageB = await openApp(contextB);
  await add(pageA, "milk");
  await add(pageB, "eggs");
  await waitTitles(pageA, ["milk", "eggs"]);
  await waitTitles(pageB, ["milk", "eggs"]);
  await waitSynced(pageA);
  await waitSynced(pageB);
  assert.deepEqual(await titles(pageA), await titles(pageB));
});

test("the document's history lists both contexts' writes, from either", async () => {
  const history = await pageB.evaluate(() => window.pagesyncDb.history());
  const adds = history.records.filter((r) => r.statements[0]?.sql.startsWith("INSERT INTO todos"));
  assert.deepEqual(adds.map((r) => r.statements[0].params[0]).sort(), ["eggs", "milk"]);
  assert.equal(new Set(adds.map((r) => r.timeline)).size, 2, "one timeline per context");
  for (const r of history.records) {
    assert.equal(r.outcome, "applied");
    assert.ok(r.client_ms <= r.received_ms && r.received_ms <= r.applied_ms, JSON.stringify(r));
  }
  // Paged: one record at a time gives the same list.
  const paged = [];
  let after;
  do {
    const page = await pageA.evaluate((after) => window.pagesyncDb.history({ after, limit: 1 }), after);
    paged.push(...page.records);
    after = page.next ?? undefined;
  } while (after);
  assert.deepEqual(paged, history.records);
});

test("offline edits survive a reload as pending, then reach the other context and the CLI", async () => {
  await pageB.check("[data-testid=offline]");
  await pageB.waitForFunction(() => document.getElementById("sync").dataset.state === "offline");
  await add(pageB, "bread");
  await waitTitles(pageB, ["bread"]);
  await pageB.reload();
  await waitTitles(pageB, ["milk", "eggs", "bread"]);
  await pageB.waitForFunction(() => document.getElementById("sync").dataset.pending === "1");
  assert.equal(await pageB.isChecked("[data-testid=offline]"), true, "offline mode is remembered");
  assert.ok(!(await titles(pageA)).includes("bread"), "the offline edit has not left context B");

  await pageB.uncheck("[data-testid=offline]");
  await waitTitles(pageA, ["bread"]);
  await waitSynced(pageB);
  const rows = cliRows(port, join(work, "cli"), doc, "query", "--json", "SELECT title FROM todos ORDER BY id");
  assert.deepEqual(rows.map((r) => r.title).sort(), ["bread", "eggs", "milk"]);
  // Both contexts shipped the demo's migrations; each ran once.
  const once = cliRows(port, join(work, "cli"), doc, "query", "--json", "SELECT key FROM _pagesync_once ORDER BY key");
  assert.deepEqual(once, [{ key: "migration:1" }, { key: "migration:2" }]);
});

test("a rejected mutation shows the server's error", async () => {
  await add(pageA, "x".repeat(61));
  await pageA.waitForFunction(() => document.getElementById("rejected").textContent.includes("CHECK constraint failed"),
    null, { timeout: 20_000 });
  const text = await pageA.textContent("[data-testid=rejected]");
  assert.match(text, /rejected by the server: .*CHECK constraint failed/);
  assert.ok(!(await titles(pageA)).includes("x".repeat(61)), "the rejected write left nothing");
  // The CLI's own write still goes through beside it.
  cli("exec", "INSERT INTO todos (title) VALUES ('from the cli')");
  await waitTitles(pageA, ["from the cli"]);
  await pageA.screenshot({ path: join(artifacts, "demo.png"), fullPage: true });
});

test("a 10 MB document opens from OPFS after a reload", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  const big = randomDoc();
  await page.goto(`${base}/healthz`); // any page of the origin: the module is imported below
  const open = (docId) => page.evaluate(async (docId) => {
    const { Database } = await import("/pagesync.js");
    const t0 = performance.now();
    const db = await Database.open(docId);
    const rows = await db.query("SELECT count(*) AS n, sum(length(v)) AS bytes FROM big");
    const ms = performance.now() - t0;
    window.db = db;
    return { ms, rows, kind: db.storageKind };
  }, docId);
  await page.evaluate(async (docId) => {
    const { Database } = await import("/pagesync.js");
    const db = await Database.open(docId);
    await db.exec("CREATE TABLE big (k INTEGER PRIMARY KEY, v TEXT)");
    const m = await db.exec(`WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 10000)
      INSERT INTO big SELECT i, hex(zeroblob(500)) FROM c`);
    const state = await m.settled;
    if (state.state !== "confirmed") throw new Error(JSON.stringify(state));
    db.close();
  }, big);
  await page.reload();
  const cold = await open(big);
  assert.equal(cold.kind, "opfs");
  assert.equal(cold.rows[0].n, 10000);
  assert.equal(cold.rows[0].bytes, 10_000_000);
  figures.open_10mb_after_reload_ms = Math.round(cold.ms);
  await context.close();
});

// A TCP proxy to the server that holds every byte the server sends for `delayMs` (in order):
// the page hears of a write long after the server committed it.
function slowDownstream(delayMs) {
  const sockets = new Set();
  const proxy = net.createServer((client) => {
    const upstream = net.connect(port, "127.0.0.1");
    sockets.add(client).add(upstream);
    client.pipe(upstream);
    upstream.on("data", (d) => setTimeout(() => client.destroyed || client.write(d), delayMs));
    upstream.on("close", () => setTimeout(() => client.destroy(), delayMs));
    client.on("close", () => upstream.destroy());
    for (const s of [client, upstream]) s.on("error", () => {});
  });
  return new Promise((resolve) => proxy.listen(0, "127.0.0.1", () => resolve({
    url: `ws://127.0.0.1:${proxy.address().port}/v1/sync`,
    close: () => { for (const s of sockets) s.destroy(); proxy.close(); },
  })));
}

test("sync waits for a write the server took a moment ago, not the head it last reported", async () => {
  const d = randomDoc();
  const dir = join(work, "cli-sync");
  runCli(port, dir, d, "exec", "CREATE TABLE t (n INTEGER)");
  const proxy = await slowDownstream(400);
  const context = await browser.newContext();
  try {
    await syncsThroughSlowProxy(context, d, dir, proxy.url);
  } finally {
    await context.close();
    proxy.close();
  }
});

async function syncsThroughSlowProxy(context, d, dir, url) {
  const page = await context.newPage();
  logPage(page, "sync");
  await page.goto(`${base}/healthz`);
  await page.evaluate(async ({ d, url }) => {
    const { Database } = await import("/pagesync.js");
    window.db = await Database.open(d, { url, persist: false });
    await window.db.sync();
  }, { d, url });
  const count = () => page.evaluate(async () => (await window.db.query("SELECT count(*) AS n FROM t"))[0].n);
  assert.equal(await count(), 0);
  for (let n = 1; n <= 3; n++) {
    // Committed on the server when the CLI returns; the page hears of it 400 ms later.
    runCli(port, dir, d, "exec", "INSERT INTO t VALUES (1)");
    await page.evaluate(() => window.db.sync());
    assert.equal(await count(), n, "sync returned before the server's newest entry arrived");
  }
  const bad = await page.evaluate(() => window.db.sync({ timeoutMs: Infinity }).then(() => "resolved", (e) => e.name));
  assert.equal(bad, "RangeError", "a timeout setTimeout cannot keep is refused");
  // Offline, sync gives up with a reason rather than waiting forever.
  await page.evaluate(() => window.db.setOnline(false));
  const offline = await page.evaluate(() => window.db.sync({ timeoutMs: 300 }).then(() => "in sync", (e) => e.message));
  assert.match(offline, /not in sync after 300 ms \(0 writes pending, offline\)/);
}

test("two contexts see each other's presence, and one that closes is dropped", async () => {
  const room = randomDoc();
  const open = async (name) => {
    const context = await browser.newContext();
    const page = await context.newPage();
    logPage(page, name);
    await page.goto(`${base}/?doc=${room}&name=${name}`);
    await waitSynced(page);
    return { context, page };
  };
  const sees = (page, names) =>
    page.waitForFunction((names) => {
      const here = JSON.parse(document.getElementById("here").dataset.peers ?? "[]");
      return JSON.stringify(here) === JSON.stringify(names);
    }, names, { timeout: 20_000 });
  const carol = await open("carol");
  const dave = await open("dave");
  await sees(carol.page, ["dave"]);
  await sees(dave.page, ["carol"]);
  // The CLI says who is here too: both contexts, with what each broadcast.
  const peers = JSON.parse(runCli(port, join(work, "cli-presence"), room, "presence", "--json"));
  assert.deepEqual(peers.map((p) => JSON.parse(p.value).name).sort(), ["carol", "dave"]);
  await dave.context.close();
  await sees(carol.page, []);
  await carol.context.close();
});

test("a list deleted on the server shows as deleted, stays readable, and takes no more writes", async () => {
  const gone = randomDoc();
  const context = await browser.newContext();
  const page = await context.newPage();
  logPage(page, "deleted");
  await page.goto(`${base}/?doc=${gone}`);
  await waitSynced(page);
  await add(page, "soon gone");
  await waitSynced(page);
  const response = await fetch(`${base}/v1/docs/${gone}`, { method: "DELETE" });
  assert.equal(response.status, 200, await response.text());
  await page.waitForFunction(() => document.getElementById("sync").dataset.state === "deleted", null, {
    timeout: 20_000,
  });
  assert.deepEqual(await titles(page), ["soon gone"]);
  assert.ok(await page.$eval("[data-testid=add]", (b) => b.disabled), "adding is off");
  assert.match(await page.$eval("#error", (e) => e.textContent), /deleted/);
  await context.close();
});

test("a page renews its token: a write made after the old one expired reaches the server", async () => {
  const dir = tempDir("token");
  const secret = join(dir, "secret");
  writeFileSync(secret, "a browser token renewal test secret of 32+ bytes");
  const port2 = await freePort();
  const server2 = await startServerWith(port2, join(dir, "server"), ["--auth-secret-file", secret]);
  try {
    const list = randomDoc();
    const mint = (sub, ttl) => execFileSync(join(bin, "pagesync-server"), [
      "--auth-secret-file", secret, "token", "--doc", list, "--write", "--sub", sub, "--ttl", ttl,
    ], { encoding: "utf8" }).trim();
    const tokens = { doc: list, short: mint("ann", "3s"), fresh: mint("ann", "1h"), other: mint("bob", "1h") };
    const context = await browser.newContext();
    const page = await context.newPage();
    logPage(page, "token");
    await page.goto(`http://127.0.0.1:${port2}/healthz`);
    const out = await page.evaluate(async ({ doc, short, fresh, other }) => {
      const { Database } = await import("/pagesync.js");
      const db = await Database.open(doc, { token: short, persist: false });
      await db.exec("CREATE TABLE t(x)");
      await db.sync({ timeoutMs: 10_000 });
      // At the short token's exp the server closes the connection, and refuses it after.
      let status = await db.status();
      for (let i = 0; i < 300 && status.error?.code !== "unauthorized"; i++) {
        await new Promise((r) => setTimeout(r, 50));
        status = await db.status();
      }
      const expired = status.error;
      const m = await db.exec("INSERT INTO t VALUES (1)");
      const otherSubject = await db.setToken(other).then(() => "taken", (e) => e.message);
      await db.setToken(fresh);
      const synced = await db.sync({ timeoutMs: 15_000 }).then(() => "in sync", (e) => e.message);
      return { expired, otherSubject, synced, settled: await m.settled, after: (await db.status()).error };
    }, tokens);
    await context.close();
    assert.equal(out.expired?.code, "unauthorized", JSON.stringify(out));
    assert.match(out.otherSubject, /subject "bob"/);
    assert.equal(out.synced, "in sync", JSON.stringify(out));
    assert.equal(out.settled.state, "confirmed", JSON.stringify(out));
    assert.equal(out.after, null, "the old token's refusal still shows");
  } finally {
    await stopServer(server2);
  }
});

test("with the server's mutators, each context writes as its own subject and deletes only its own todos", async () => {
  const dir = tempDir("mutators");
  const secret = join(dir, "secret");
  writeFileSync(secret, "a browser mutators test secret of 32+ bytes");
  const port2 = await freePort();
  const flags = ["--auth-secret-file", secret, "--mutators", "wasm/demo/mutators.sql"];
  const server2 = await startServerWith(port2, join(dir, "server"), flags);
  try {
    const list = randomDoc();
    // Tokens that may call every mutator and send no SQL of their own.
    const mint = (sub) => execFileSync(join(bin, "pagesync-server"), [
      "--auth-secret-file", secret, "token", "--doc", list, "--call", "*", "--sub", sub, "--ttl", "1h",
    ], { encoding: "utf8" }).trim();
    const open = async (sub) => {
      const context = await browser.newContext();
      const page = await context.newPage();
      logPage(page, sub);
      await page.goto(`http://127.0.0.1:${port2}/?doc=${list}&name=${sub}&token=${mint(sub)}`);
      await waitSynced(page);
      return { context, page };
    };
    // A token the server refuses: `sync` says so at once rather than waiting out its timeout.
    const refused = await browser.newContext();
    const page = await refused.newPage();
    await page.goto(`http://127.0.0.1:${port2}/healthz`);
    const why = await page.evaluate(async (doc) => {
      const { Database } = await import("/pagesync.js");
      const db = await Database.open(doc, { token: "not a token", persist: false });
      const t0 = performance.now();
      const message = await db.sync({ timeoutMs: 20_000 }).then(() => "in sync", (e) => e.message);
      return { message, ms: performance.now() - t0 };
    }, list);
    await refused.close();
    assert.match(why.message, /^unauthorized: /);
    assert.ok(why.ms < 10_000, `the refusal took ${why.ms} ms`);
    const ann = await open("ann");
    const bob = await open("bob");
    await add(ann.page, "ann's");
    await add(bob.page, "bob's");
    for (const { page } of [ann, bob]) await waitTitles(page, ["ann's", "bob's"]);
    const owners = await bob.page.$$eval("#todos li", (lis) => lis.map((li) => li.textContent));
    assert.ok(owners.some((t) => t.includes("ann's") && t.includes("(ann)")), JSON.stringify(owners));
    // Bob deletes ann's todo: the app's message, and it stays for both.
    await bob.page.click("#todos li[data-title=\"ann's\"] [data-testid=delete]");
    await bob.page.waitForFunction(() => document.getElementById("rejected").textContent.includes("only its owner"),
      null, { timeout: 20_000 });
    await waitSynced(bob.page);
    for (const { page } of [ann, bob]) assert.deepEqual((await titles(page)).sort(), ["ann's", "bob's"]);
    // His own he may delete: gone for both.
    await bob.page.click("#todos li[data-title=\"bob's\"] [data-testid=delete]");
    for (const { page } of [ann, bob]) {
      await page.waitForFunction(() => ![...document.querySelectorAll("#todos li")].some((li) => li.dataset.title === "bob's"),
        null, { timeout: 20_000 });
    }
    // Raw SQL with a mutator-only token: refused by the server, never run.
    const raw = await ann.page.evaluate(async () => (await window.pagesyncDb.exec("DELETE FROM todos")).settled);
    assert.equal(raw.state, "rejected");
    assert.equal(raw.code, "forbidden");
    await waitSynced(ann.page);
    assert.deepEqual(await titles(ann.page), ["ann's"]);
    // Reloaded offline, the app still knows the server's mutators (kept in OPFS): a call runs
    // locally at once, then reaches the server when the page is back online.
    await ann.page.check("[data-testid=offline]");
    await ann.page.waitForFunction(() => document.getElementById("sync").dataset.state === "offline");
    await ann.page.reload();
    await ann.page.waitForFunction(() => document.getElementById("sync").dataset.state === "offline");
    const offline = await ann.page.evaluate(async () => (await window.pagesyncDb.call("add_todo", ["while offline"])).localError);
    assert.equal(offline, null, "the call ran locally with the kept definitions");
    await waitTitles(ann.page, ["ann's", "while offline"]);
    await ann.page.uncheck("[data-testid=offline]");
    await waitSynced(ann.page);
    await waitTitles(bob.page, ["ann's", "while offline"]);
    await ann.context.close();
    await bob.context.close();
  } finally {
    await stopServer(server2);
  }
});
