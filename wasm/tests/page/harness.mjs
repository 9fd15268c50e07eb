// Shared by the page-level tests: a real pagesync-server (serving the built bundle), the native
// CLI, Chromium's launch flags, and waits on the demo app's DOM.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import net from "node:net";

export const bin = process.env.PAGESYNC_BIN ?? "target/debug";
export const web = process.env.PAGESYNC_WEB ?? "target/web";
export const artifacts = process.env.PAGESYNC_ARTIFACTS ?? "target/browser-artifacts";
export const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps dialing out of this closed network.
export const chromiumArgs = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

export const tempDir = (name) => mkdtempSync(join(tmpdir(), `pagesync-${name}-`));
export const randomDoc = () =>
  [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

export function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A pagesync-server on `port`, journals under `dir`; resolves once /healthz answers. */
export async function startServer(port, dir) {
  return started(port, ["--journal", `file://${dir}`]);
}

/** One server of a cluster over the object store in `dir` (`--advertise`). */
export async function startClusterServer(port, dir) {
  return started(port, [
    "--journal", `object+file://${dir}`, "--advertise", `ws://127.0.0.1:${port}`, "--lease-ms", "3000",
  ]);
}

/** A pagesync-server on `port` with more flags (auth, mutators, ...). */
export async function startServerWith(port, dir, flags) {
  return started(port, ["--journal", `file://${dir}`, ...flags]);
}

async function started(port, flags) {
  const server = spawn(join(bin, "pagesync-server"), [
    "--listen", `127.0.0.1:${port}`, ...flags, "--web", web,
  ], { stdio: ["ignore", "inherit", "inherit"] });
  for (let i = 0; i < 200; i++) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/healthz`)).ok) return server;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("pagesync-server did not start");
}

/** A counter or gauge from the server's /metrics. */
export async function metric(port, name) {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`no ${name} in /metrics`);
  return Number(line.slice(name.length + 1));
}

export async function stopServer(server) {
  const exited = new Promise((r) => server.once("exit", r));
  server.kill("SIGTERM");
  await exited;
}

/** Runs the native `pagesync` CLI on `doc` with its own data directory. */
export function cli(port, dataDir, doc, ...args) {
  return execFileSync(join(bin, "pagesync"), [
    "--server", `ws://127.0.0.1:${port}/v1/sync`, "--data", dataDir, "--doc", doc, ...args,
  ], { encoding: "utf8" });
}

/** `pagesync query --json` output: an array of objects, keys in column order. */
export const cliRows = (...args) => JSON.parse(cli(...args));

export function logPage(page, name) {
  page.on("console", (m) => ["error", "warning"].includes(m.type()) && console.log(`[${name}] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`[${name} error] ${e.message}`));
}

export const titles = (page) => page.$$eval("#todos li", (lis) => lis.map((li) => li.dataset.title));

export const waitSynced = (page) =>
  page.waitForFunction(() => {
    const s = document.getElementById("sync");
    return s.dataset.state === "in sync" && s.dataset.pending === "0";
  }, null, { timeout: 20_000 });

export const waitTitles = (page, want) =>
  page.waitForFunction((want) => {
    const have = [...document.querySelectorAll("#todos li")].map((li) => li.dataset.title);
    return want.every((t) => have.includes(t));
  }, want, { timeout: 20_000 });

export async function add(page, title) {
  await page.fill("[data-testid=title]", title);
  await page.click("[data-testid=add]");
}
