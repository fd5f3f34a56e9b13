// The demo page in headless Chromium, driven by playwright-core: two pages (separate browser
// contexts, like two people) show each other's changes, and a change made in psql shows in
// both. Run by sync_worker/tests/browser.rs, which starts Postgres and the worker and passes:
//   DEMO_URL      http://127.0.0.1:<port>/demo?token=<token of demo-user>
//   DATABASE_URL  libpq connection string of the demo database
//   PSQL          the psql binary
//   SCREENSHOT    where to save a screenshot of the final page (optional)
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import assert from "node:assert/strict";
import { createTrace } from "./trace.mjs";

const { DEMO_URL, DATABASE_URL, PSQL = "psql", SCREENSHOT } = process.env;
assert.ok(DEMO_URL && DATABASE_URL, "set DEMO_URL and DATABASE_URL");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = 10_000;

const step = (s) => console.log(`browser: ${s}`);
const psql = (sql) =>
  execFileSync(PSQL, ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", DATABASE_URL, "-c", sql], {
    encoding: "utf8",
  }).trim();

// What a page shows: [title, done, pending] per task, sorted by title.
const shown = (page) =>
  page.$$eval("#tasks li", (lis) =>
    lis.map((li) => [li.querySelector("span").textContent, li.classList.contains("done"),
                     li.classList.contains("pending")]));

// Printed when the test fails: what the pages did (requests, answers, console), timestamped.
const trace = createTrace(new URL(DEMO_URL).origin);
const until = (what, check) => trace.until(what, check, WAIT);

const titles = async (page) => (await shown(page)).map(([t]) => t);
const hasTitle = (page, title) => async () => (await titles(page)).includes(title);
const lacksTitle = (page, title) => async () => !(await titles(page)).includes(title);
const row = (page, title) => page.locator("#tasks li", { hasText: title });

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const pages = [];
  for (const who of ["A", "B"]) {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("pageerror", (e) => { console.error(`page ${who} error: ${e.message}`); failed = true; });
    page.on("console", (m) => { if (m.type() === "error") console.error(`page ${who} console: ${m.text()}`); });
    trace.watch(page, `page ${who}`);
    await page.goto(DEMO_URL);
    await until(`page ${who} to go live`, async () =>
      (await page.textContent("#status")).startsWith("live"));
    pages.push(page);
  }
  const [a, b] = pages;
  step("both pages are live");
  for (const page of pages) {
    assert.deepEqual(await titles(page), ["Register a table", "Try pg_sync"]);
  }

  // A adds a task: B sees it; A's own copy stops being optimistic when its delta comes back.
  await a.fill("#title", "Buy milk");
  await a.press("#title", "Enter");
  await until("B to show A's new task", hasTitle(b, "Buy milk"));
  await until("A's optimistic copy to be confirmed", async () =>
    (await shown(a)).some(([t, , pending]) => t === "Buy milk" && !pending));
  step("a task added in A shows in B");

  // B ticks it: A sees it done.
  await row(b, "Buy milk").locator("input[type=checkbox]").check();
  await until("A to show the task done", async () =>
    (await shown(a)).some(([t, done]) => t === "Buy milk" && done));
  step("a task ticked in B shows done in A");

  // A deletes a seeded task: B loses it.
  await row(a, "Register a table").locator("button.delete").click();
  await until("B to drop the deleted task", lacksTitle(b, "Register a table"));
  step("a task deleted in A disappears from B");

  // psql: an insert and an update in the demo project show in both; a task of another
  // project shows in neither.
  psql(`INSERT INTO tasks (project_id, title) VALUES ('demo', 'From psql'), ('secret', 'Not for demo-user');
        UPDATE tasks SET title = 'Try pg_sync today' WHERE title = 'Try pg_sync'`);
  for (const [name, page] of [["A", a], ["B", b]]) {
    await until(`${name} to show the psql insert`, hasTitle(page, "From psql"));
    await until(`${name} to show the psql update`, hasTitle(page, "Try pg_sync today"));
  }
  step("changes made in psql show in both pages");

  // Offline, A's writes wait in its outbox (shown pending) and B sees none of them. Back online
  // they are sent; the first answer is lost on the way, so A sends them again: each is applied
  // once.
  await a.context().setOffline(true);
  for (const title of ["Offline one", "Offline two"]) {
    await a.fill("#title", title);
    await a.press("#title", "Enter");
  }
  await row(a, "From psql").locator("input[type=checkbox]").check();
  await until("A to queue three writes", async () =>
    (await a.textContent("#status")).startsWith("offline: 3") || (await a.textContent("#status")));
  assert.equal((await shown(a)).filter(([, , pending]) => pending).length, 3);
  await new Promise((r) => setTimeout(r, 500));
  assert.ok(!(await titles(b)).includes("Offline one"), "B must not see A's queued writes");
  let sent = 0;
  await a.route("**/sync/mutate*", async (route) => {
    if (sent++ === 0) {
      await route.fetch();   // the server applies the batch...
      await route.abort();   // ...and A never hears back
    } else {
      await route.continue();
    }
  });
  await a.context().setOffline(false);
  for (const title of ["Offline one", "Offline two"]) {
    await until(`B to show ${title}`, hasTitle(b, title));
  }
  await until("B to show the offline tick", async () =>
    (await shown(b)).some(([t, done]) => t === "From psql" && done));
  await until("A's queue to drain and confirm", async () =>
    (await shown(a)).every(([, , pending]) => !pending) && sent >= 2);
  const clientId = await a.evaluate(() => sessionStorage.getItem("pg_sync_client"));
  const [actions, txns, offline] = psql(
    `SELECT count(*), count(DISTINCT client_tx_id),
            (SELECT count(*) FROM tasks WHERE title LIKE 'Offline%')
       FROM pg_sync.sync_actions WHERE client_id = '${clientId}'`).split("|").map(Number);
  assert.equal(offline, 2, "each offline insert applied once");
  assert.equal(actions, txns, "one action per client transaction: nothing applied twice");
  assert.ok(txns >= 5, `A's transactions: ${txns}`);
  step("offline writes queue, replay after a lost answer, and apply once");

  // Both pages now show exactly the database's demo tasks, and nothing of 'secret'.
  const expected = psql(
    "SELECT string_agg(title || '|' || done, E'\\n' ORDER BY title) FROM tasks WHERE project_id = 'demo'")
    .split("\n").map((l) => { const [t, d] = l.split("|"); return [t, d === "true", false]; });
  for (const page of pages) {
    await until("the page to equal the database", async () => {
      const got = await shown(page);
      return JSON.stringify(got) === JSON.stringify(expected) || got;
    });
  }
  step("both pages equal the database");

  // A reload bootstraps from scratch and shows the same.
  await b.reload();
  await until("B to go live again", async () =>
    (await b.textContent("#status")).startsWith("live"));
  assert.deepEqual(await shown(b), expected);
  step("a reloaded page bootstraps to the same state");

  if (SCREENSHOT) await a.screenshot({ path: SCREENSHOT, fullPage: true });
} catch (e) {
  console.error(`browser: FAILED: ${e.stack || e}`);
  console.error(`browser: what the pages did:\n${trace.dump()}`);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
