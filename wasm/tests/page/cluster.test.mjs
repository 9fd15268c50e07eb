// The browser in a cluster: two real pagesync-servers over one object store (`--advertise`).
// The page is served by one of them and opens a document whose lease the other holds: the
// worker follows the server's redirect, syncs there, and its writes reach the native CLI.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { chromium } from "playwright-core";
import {
  add, chromiumArgs, chromiumPath, cliRows, cli, freePort, logPage, metric, randomDoc, startClusterServer,
  stopServer, tempDir, waitSynced, waitTitles,
} from "./harness.mjs";

const work = tempDir("cluster");
let portA, portB, serverA, serverB, browser;

before(async () => {
  [portA, portB] = [await freePort(), await freePort()];
  serverA = await startClusterServer(portA, join(work, "bucket"));
  serverB = await startClusterServer(portB, join(work, "bucket"));
  // Until each has seen the other, both would place documents on themselves alone.
  for (let i = 0; (await metric(portA, "pagesync_cluster_live_servers")) < 2 ||
    (await metric(portB, "pagesync_cluster_live_servers")) < 2; i++) {
    if (i > 200) throw new Error("the two servers never saw each other");
    await new Promise((r) => setTimeout(r, 50));
  }
  browser = await chromium.launch({ executablePath: chromiumPath, args: chromiumArgs });
});

after(async () => {
  await browser?.close();
  for (const s of [serverA, serverB]) if (s) await stopServer(s);
});

test("a page on one server syncs a document another server holds, through the redirect", async () => {
  // A document whose lease B takes: created through B, and B holds one more lease after.
  let doc;
  for (let i = 0; !doc; i++) {
    if (i > 40) throw new Error("rendezvous hashing never picked B");
    const candidate = randomDoc();
    const before = await metric(portB, "pagesync_cluster_owned_documents");
    cli(portB, join(work, `cli-${i}`), candidate, "exec", "CREATE TABLE IF NOT EXISTS probe(x)");
    if ((await metric(portB, "pagesync_cluster_owned_documents")) > before) doc = candidate;
  }
  const redirects = await metric(portA, "pagesync_redirects_total");
  const context = await browser.newContext();
  const page = await context.newPage();
  logPage(page, "page");
  await page.goto(`http://127.0.0.1:${portA}/?doc=${doc}`);
  await waitSynced(page);
  await add(page, "from the page on A");
  await waitTitles(page, ["from the page on A"]);
  await waitSynced(page);
  assert.ok((await metric(portA, "pagesync_redirects_total")) > redirects, "A redirected the page");
  // The write is on B, which holds the document: the CLI asks B directly.
  const rows = cliRows(portB, join(work, "check"), doc, "query", "--json", "SELECT title FROM todos");
  assert.deepEqual(rows.map((r) => r.title), ["from the page on A"]);
  await context.close();
});
