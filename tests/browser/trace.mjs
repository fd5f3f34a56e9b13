// What the browser tests' pages did, for their failure messages: console messages, failed
// requests, and every request to the worker's sync endpoints with its answer, timestamped from
// the start. A test prints it when it fails, so a timeout says which request was slow, lost or
// answered what, instead of only what was awaited.
export function createTrace(appOrigin) {
  const started = Date.now();
  const lines = [];
  const short = (u) => u.replace(/token=[^&]*/, "token=...").replace(appOrigin, "");
  const synced = (u) => /\/v1\/shape|\/sync\/(mutate|bootstrap|deltas)/.test(u);
  const note = (s) => lines.push(`${String(Date.now() - started).padStart(6)} ms ${s}`);
  return {
    note,
    /** Records `page`'s console, failed requests and sync requests with their answers. */
    watch(page, name) {
      page.on("console", (m) => note(`${name} console.${m.type()}: ${m.text()}`));
      page.on("requestfailed", (r) =>
        note(`${name} request failed: ${r.method()} ${short(r.url())} ${r.failure()?.errorText}`));
      page.on("websocket", (ws) => {
        note(`${name} websocket open ${short(ws.url())}`);
        ws.on("close", () => note(`${name} websocket closed ${short(ws.url())}`));
      });
      page.on("request", (r) => {
        if (synced(r.url())) note(`${name} -> ${r.method()} ${short(r.url())} ${r.postData() ?? ""}`);
      });
      page.on("response", async (r) => {
        if (!synced(r.url())) return;
        let body = "";
        try {
          // An SSE answer never ends: only its status.
          if (!r.url().includes("live_sse")) body = (await r.text()).slice(0, 600);
        } catch (e) {
          body = `(body: ${e.message})`;
        }
        note(`${name} <- ${r.status()} ${short(r.url())} ${body}`);
      });
    },
    /** Condition-based wait: polls `check` until it returns true; on timeout throws with the
     * last thing it returned (a value that says what the page showed instead). */
    async until(what, check, ms) {
      const start = Date.now();
      const deadline = start + ms;
      let last;
      note(`waiting for ${what}`);
      while (Date.now() < deadline) {
        try {
          last = await check();
          if (last === true) {
            note(`waited ${Date.now() - start} ms for ${what}`);
            return;
          }
        } catch (e) {
          last = e;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${
        typeof last === "string" || last instanceof Error ? last : JSON.stringify(last)})`);
    },
    dump: () => lines.join("\n"),
  };
}
