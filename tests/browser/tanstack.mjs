// A page built from clients/js (TanStack DB + offline-transactions, real IndexedDB) in headless
// Chromium, driven by playwright-core: writes made offline survive closing the page, are sent
// by the next page load, the first answer is lost on purpose, and Postgres holds each write
// exactly once. Then a page from another origin (CORS) whose collection reads live changes
// over SSE (live_sse) and writes through /sync/mutate. Run by sync_worker/tests/browser.rs,
// which passes:
//   APP_URL       http://127.0.0.1:<port> (the worker; the page is served under its origin)
//   TOKEN         a token of alice (member of p1)
//   BUNDLE        the page's bundled script (clients/js/dist-test/page.js)
//   DATABASE_URL  libpq connection string of the app database
//   PSQL          the psql binary
// On failure it prints what the pages did (requests, answers, console); TANSTACK_TRACE=1 prints
// that on success too.
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import assert from "node:assert/strict";
import { createTrace } from "./trace.mjs";

const { APP_URL, TOKEN, BUNDLE, DATABASE_URL, PSQL = "psql" } = process.env;
assert.ok(APP_URL && TOKEN && BUNDLE && DATABASE_URL, "set APP_URL, TOKEN, BUNDLE and DATABASE_URL");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = 20_000;

const step = (s) => console.log(`tanstack: ${s}`);
const trace = createTrace(APP_URL);
const { note } = trace;
const psql = (sql) =>
  execFileSync(PSQL, ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", DATABASE_URL, "-c", sql], {
    encoding: "utf8",
  }).trim();

const until = (what, check) => trace.until(what, check, WAIT);

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const context = await browser.newContext();
  // Every write request of the context, whichever page (or a page being closed) sends it.
  context.on("request", (r) => {
    if (r.url().includes("/sync/mutate")) note(`context -> ${r.method()} ${r.postData() ?? ""}`);
  });
  // The page lives under the worker's origin (so IndexedDB, /v1/shape and /sync/mutate share
  // it); playwright serves its two files, everything else goes to the worker.
  const bundle = readFileSync(BUNDLE, "utf8");
  await context.route(`${APP_URL}/tanstack-test/**`, (route) => {
    const path = new URL(route.request().url()).pathname;
    if (path.endsWith("/page.js")) {
      return route.fulfill({ contentType: "text/javascript", body: bundle });
    }
    return route.fulfill({
      contentType: "text/html",
      body: `<!doctype html><title>pg_sync TanStack test</title><script type="module" src="/tanstack-test/page.js"></script>`,
    });
  });
  let opened = 0;
  const open = async () => {
    const page = await context.newPage();
    page.on("pageerror", (e) => { console.error(`page error: ${e.message}`); failed = true; });
    page.on("console", (m) => { if (m.type() === "error") console.error(`page console: ${m.text()}`); });
    trace.watch(page, `page${++opened}`);
    await page.goto(`${APP_URL}/tanstack-test/index.html?token=${TOKEN}`);
    await page.waitForFunction(() => window.app);
    const storage = await page.evaluate(() => window.app.ready);
    assert.match(storage, /IndexedDB/, "the outbox is in IndexedDB");
    return page;
  };

  const first = await open();
  assert.deepEqual(await first.evaluate(() => window.app.rows()), ["101|alices"]);
  step("the page synced alice's rows through /v1/shape");

  // Offline: the writes show at once and wait in the outbox (IndexedDB).
  await context.setOffline(true);
  await first.evaluate(() => {
    window.app.insert(300, "offline one");
    window.app.insert(301, "offline two");
    window.app.rename(101, "renamed offline");
  });
  assert.deepEqual(await first.evaluate(() => window.app.rows()),
    ["101|renamed offline", "300|offline one", "301|offline two"]);
  await until("the outbox to hold three writes", async () =>
    (await first.evaluate(() => window.app.outbox())) === 3 || "not yet");
  assert.equal(psql("SELECT count(*) FROM todos WHERE id IN (300, 301)"), "0");
  step("offline writes are optimistic and queued");

  // The page is closed while offline; later the user is online and opens it again. The first
  // answer to the update is lost on the way back, so it is sent again (an update, because
  // applying it twice would show: a second insert would be refused by the primary key).
  await first.close();
  await context.setOffline(false);
  let sent = 0;
  let lost = 0;
  await context.route("**/sync/mutate*", async (route) => {
    sent++;
    if (lost === 0 && route.request().postData().includes('"action":"U"')) {
      lost++;
      await route.fetch(); // the server applies it...
      await route.abort(); // ...and the page never hears back
    } else {
      await route.continue();
    }
  });
  const second = await open();
  await until("the outbox to drain", async () => {
    const queued = await second.evaluate(() => window.app.outboxState());
    return queued.length === 0 || JSON.stringify(queued);
  });
  await until("the page to show the confirmed writes", async () => {
    const rows = await second.evaluate(() => window.app.rows());
    return JSON.stringify(rows) === JSON.stringify(["101|renamed offline", "300|offline one", "301|offline two"]) || rows;
  });
  assert.equal(lost, 1, "the update's answer was lost");
  assert.ok(sent >= 4, `one answer lost, then resent: ${sent} requests`);
  assert.equal(psql("SELECT string_agg(id || '|' || title, ',' ORDER BY id) FROM todos"),
    "100|bobs,101|renamed offline,300|offline one,301|offline two");
  const [actions, txns] = psql(
    "SELECT count(*), count(DISTINCT client_tx_id) FROM pg_sync.sync_actions WHERE client_tx_id IS NOT NULL",
  ).split("|").map(Number);
  assert.deepEqual([actions, txns], [3, 3], "each write applied exactly once");
  // A second application of the update would change no row (same title) but would be a client
  // transaction of its own.
  assert.equal(psql("SELECT count(*) FROM pg_sync.client_transactions WHERE user_id = 'alice'"), "3",
    "three client transactions applied, none twice");
  step("after a reload the writes were sent, one answer lost, each applied once");
  await second.close();

  // Another origin, live over SSE: the page is served by a server of its own on another
  // loopback port, the worker stays at APP_URL, so every /v1/shape and /sync/mutate request is
  // cross-origin (preflighted: it sends Authorization), and the collection reads live changes
  // over SSE. (A real loopback server: Chromium refuses requests from a page it does not know
  // to be local to loopback addresses, CORS or not.)
  const server = createServer((req, res) => {
    if (req.url.startsWith("/page.js")) {
      res.writeHead(200, { "content-type": "text/javascript" }).end(bundle);
    } else {
      res.writeHead(200, { "content-type": "text/html" }).end(
        `<!doctype html><title>pg_sync cross-origin SSE test</title><script type="module" src="/page.js"></script>`);
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const ORIGIN = `http://127.0.0.1:${server.address().port}`;
  assert.notEqual(ORIGIN, APP_URL);
  const other = await browser.newContext();
  const third = await other.newPage();
  trace.watch(third, "page3");
  third.on("pageerror", (e) => { console.error(`page error: ${e.message}`); failed = true; });
  third.on("console", (m) => { if (m.type() === "error") console.error(`page console: ${m.text()}`); });
  const sse = [];
  third.on("response", (r) => {
    if (r.url().includes("live_sse=true")) sse.push(`${r.status()} ${r.headers()["content-type"]}`);
  });
  await third.goto(`${ORIGIN}/index.html?token=${TOKEN}&sse=1&worker=${encodeURIComponent(APP_URL)}`);
  await third.waitForFunction(() => window.app);
  await third.evaluate(() => window.app.ready);
  assert.equal(await third.evaluate(() => location.origin), ORIGIN);
  assert.deepEqual(await third.evaluate(() => window.app.rows()),
    ["101|renamed offline", "300|offline one", "301|offline two"]);
  step("a page from another origin synced through CORS");
  psql("INSERT INTO todos VALUES (400, 'from psql', 'p1')");
  await until("the psql row to arrive over SSE", async () => {
    const rows = await third.evaluate(() => window.app.rows());
    return rows.includes("400|from psql") || rows;
  });
  assert.ok(sse.some((s) => s === "200 text/event-stream"), `live requests over SSE: ${sse}`);
  await third.evaluate(() => window.app.insert(401, "cross-origin write"));
  await until("the cross-origin write to be confirmed", async () =>
    (await third.evaluate(() => window.app.outbox())) === 0 &&
      psql("SELECT count(*) FROM todos WHERE id = 401 AND title = 'cross-origin write'") === "1" || "not yet");
  await until("the write's change to come back over SSE", async () => {
    const rows = await third.evaluate(() => window.app.rows());
    return rows.includes("401|cross-origin write") || rows;
  });
  step("live over SSE and writes through /sync/mutate from another origin");
  await third.close();
  server.close();
} catch (e) {
  console.error(`tanstack: FAILED: ${e.stack || e}`);
  console.error(`tanstack: what the pages did:\n${trace.dump()}`);
  failed = true;
} finally {
  if (process.env.TANSTACK_TRACE && !failed) console.error(`tanstack: what the pages did:\n${trace.dump()}`);
  await browser.close();
}
process.exit(failed ? 1 : 0);
