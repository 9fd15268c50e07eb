// Page-level tests of the browser build: headless Debian chromium driven by playwright-core,
// against a real pagesync-server (which serves target/web) and the native `pagesync` CLI.
// Run by scripts/test-browser, which builds everything first. Environment:
//   PAGESYNC_BIN   directory holding pagesync-server and pagesync
//   PAGESYNC_WEB   the built bundle (target/web)
//   PAGESYNC_ARTIFACTS  where the screenshot and figures go
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import net from "node:net";
import { chromium } from "playwright-core";

const bin = process.env.PAGESYNC_BIN ?? "target/debug";
const web = process.env.PAGESYNC_WEB ?? "target/web";
const artifacts = process.env.PAGESYNC_ARTIFACTS ?? "target/browser-artifacts";
const work = mkdtempSync(join(tmpdir(), "pagesync-browser-"));
const doc = [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

let port, server, browser, base;
const figures = {};

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function startServer() {
  server = spawn(join(bin, "pagesync-server"), [
    "--listen", `127.0.0.1:${port}`, "--journal", `file://${join(work, "server")}`, "--web", web,
  ], { stdio: ["ignore", "inherit", "inherit"] });
  for (let i = 0; i < 200; i++) {
    try {
      if ((await fetch(`${base}/healthz`)).ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("pagesync-server did not start");
}

function cli(...args) {
  return execFileSync(join(bin, "pagesync"), [
    "--server", `ws://127.0.0.1:${port}/v1/sync`, "--data", join(work, "cli"), "--doc", doc, ...args,
  ], { encoding: "utf8" });
}

async function openApp(context) {
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "error" && console.log(`[page] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`[page error] ${e.message}`));
  await page.goto(`${base}/?doc=${doc}`);
  await waitSynced(page);
  return page;
}

const titles = (page) => page.$$eval("#todos li", (lis) => lis.map((li) => li.dataset.title));
const waitSynced = (page) =>
  page.waitForFunction(() => {
    const s = document.getElementById("sync");
    return s.dataset.state === "in sync" && s.dataset.pending === "0";
  }, null, { timeout: 20_000 });
const waitTitles = (page, want) =>
  page.waitForFunction((want) => {
    const have = [...document.querySelectorAll("#todos li")].map((li) => li.dataset.title);
    return want.every((t) => have.includes(t));
  }, want, { timeout: 20_000 });

async function add(page, title) {
  await page.fill("[data-testid=title]", title);
  await page.click("[data-testid=add]");
}

before(async () => {
  port = await freePort();
  base = `http://127.0.0.1:${port}`;
  mkdirSync(artifacts, { recursive: true });
  await startServer();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
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
  const rows = JSON.parse(`[${cli("query", "--json", "SELECT title FROM todos ORDER BY id").trim().split("\n").join(",")}]`);
  assert.deepEqual(rows.map((r) => r.title).sort(), ["bread", "eggs", "milk"]);
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
  const big = [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
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
