// One document shared by every tab of an origin (one persistent Chromium profile): the tab
// holding the Web Lock runs the worker, the others go through it. Run by scripts/test-browser.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import {
  add, artifacts, chromiumArgs, chromiumPath, cliRows, freePort, logPage, randomDoc, startServer, stopServer,
  tempDir, titles, waitSynced, waitTitles,
} from "./harness.mjs";

const work = tempDir("tabs");
let port, server, context, base;
const figures = {};

before(async () => {
  port = await freePort();
  base = `http://127.0.0.1:${port}`;
  mkdirSync(artifacts, { recursive: true });
  server = await startServer(port, join(work, "server"));
  context = await chromium.launchPersistentContext(join(work, "profile"), {
    executablePath: chromiumPath, args: chromiumArgs, headless: true,
  });
});

after(async () => {
  await context?.close();
  if (server) await stopServer(server);
  writeFileSync(join(artifacts, "tabs-figures.json"), JSON.stringify(figures, null, 2));
  console.log("figures:", JSON.stringify(figures));
});

async function tab(url, name) {
  const page = await context.newPage();
  logPage(page, name);
  await page.goto(url);
  return page;
}

const role = (page) => page.evaluate(() => window.pagesyncDb?.role ?? window.db?.role);
const appDoc = randomDoc();
let one, two;

test("two tabs share one document, and see each other's writes with the server stopped", async () => {
  one = await tab(`${base}/?doc=${appDoc}`, "tab 1");
  await waitSynced(one);
  two = await tab(`${base}/?doc=${appDoc}`, "tab 2");
  await two.waitForFunction(() => window.pagesyncDb);
  assert.equal(await role(one), "owner");
  assert.equal(await role(two), "follower");
  await stopServer(server);
  server = null;
  await add(one, "from tab one");
  await add(two, "from tab two");
  await waitTitles(one, ["from tab one", "from tab two"]);
  await waitTitles(two, ["from tab one", "from tab two"]);
});

test("closing the owning tab loses no pending write; the other tab takes over and syncs later", async () => {
  await add(two, "pending in tab two");
  await waitTitles(one, ["pending in tab two"]);
  await one.close({ runBeforeUnload: true });
  // The handover waits for the closed tab's worker to let go of the OPFS files (retried for
  // about 15 s, each attempt logged as a warning).
  await two.waitForFunction(() => window.pagesyncDb.role === "owner", null, { timeout: 45_000 });
  // Still readable and writable in the new owner: the journals were reopened from OPFS.
  await add(two, "after the handover");
  await waitTitles(two, ["from tab one", "from tab two", "pending in tab two", "after the handover"]);
  server = await startServer(port, join(work, "server"));
  await waitSynced(two);
  const rows = cliRows(port, join(work, "cli"), appDoc, "query", "--json", "SELECT title FROM todos ORDER BY id");
  assert.deepEqual(rows.map((r) => r.title).sort(),
    ["after the handover", "from tab one", "from tab two", "pending in tab two"]);
  await two.close();
});

test("five tabs each write 200 rows concurrently; every tab and the server end with the same 1,000", async () => {
  const doc = randomDoc();
  const tabs = [];
  for (let i = 0; i < 5; i++) {
    const page = await tab(`${base}/healthz`, `writer ${i}`);
    await page.evaluate(async (doc) => {
      const { Database } = await import("/pagesync.js");
      window.db = await Database.open(doc);
    }, doc);
    tabs.push(page);
  }
  assert.deepEqual((await Promise.all(tabs.map(role))).sort(), ["follower", "follower", "follower", "follower", "owner"]);
  await tabs[0].evaluate(async () => (await window.db.exec("CREATE TABLE w (tab INTEGER, n INTEGER)")).settled);
  await Promise.all(tabs.map((page, t) => page.evaluate(async (t) => {
    for (let n = 0; n < 200; n++) await window.db.exec("INSERT INTO w VALUES (?, ?)", [t, n]);
  }, t)));
  for (const page of tabs) {
    await page.waitForFunction(async () => {
      const s = await window.db.status();
      const [{ c }] = await window.db.query("SELECT count(*) AS c FROM w");
      return s.pending === 0 && c === 1000;
    }, null, { timeout: 60_000, polling: 200 });
  }
  const [{ c, tabs: distinct }] = cliRows(port, join(work, "cli"), doc, "query", "--json",
    "SELECT count(*) AS c, count(DISTINCT tab) AS tabs FROM w");
  assert.equal(c, 1000);
  assert.equal(distinct, 5);

  // A write in one tab reaching a subscription in another: both are followers, so this is the
  // longest path (tab -> owner's worker -> tab).
  const [writer, reader] = [tabs[1], tabs[2]];
  await reader.evaluate(() => {
    window.seen = new Map();
    window.db.subscribe("SELECT max(n) AS n FROM w WHERE tab = 99", [], (rows) => {
      const n = rows?.[0]?.n;
      if (n != null) window.seen.set(n, performance.timeOrigin + performance.now());
    });
  });
  const sent = await writer.evaluate(async () => {
    const sent = [];
    for (let n = 1; n <= 200; n++) {
      sent.push(performance.timeOrigin + performance.now());
      await window.db.exec("INSERT INTO w VALUES (99, ?)", [n]);
      await new Promise((r) => setTimeout(r, 10));
    }
    return sent;
  });
  await reader.waitForFunction(() => window.seen.has(200), null, { timeout: 20_000 });
  const seen = new Map(await reader.evaluate(() => [...window.seen]));
  const ms = [...seen].map(([n, at]) => at - sent[n - 1]).sort((a, b) => a - b);
  assert.ok(ms.length >= 150, `the reader saw only ${ms.length} of 200 writes`);
  figures.cross_tab_write_to_subscription_ms = {
    samples: ms.length,
    p50: +ms[Math.floor(ms.length * 0.5)].toFixed(2),
    p99: +ms[Math.floor(ms.length * 0.99)].toFixed(2),
  };
  await Promise.all(tabs.map((p) => p.close()));
});
