// Shared set-up of the Node tests: the worker, the user's token and a psql to check Postgres
// come from the Rust test that runs them (sync_worker/tests/jsclient.rs).
import { execFileSync } from 'node:child_process'

export const url = need(`PG_SYNC_URL`)
export const token = need(`PG_SYNC_TOKEN`)
export const headers = { Authorization: `Bearer ${token}` }

function need(name) {
  const v = process.env[name]
  if (!v) throw new Error(`${name} is not set: run these tests through cargo test -p sync_worker --test jsclient`)
  return v
}

/** Runs SQL in the app database; returns rows of `|`-separated text. */
export function sql(query) {
  const out = execFileSync(need(`PSQL`), [`-XAtq`, `-d`, need(`DATABASE_URL`), `-c`, query], {
    encoding: `utf8`,
  })
  return out.split(`\n`).filter((l) => l !== ``)
}

/** Resolves when `cond()` holds, polling; rejects after `ms`. */
export async function until(cond, ms = 10_000, what = `condition`) {
  const deadline = Date.now() + ms
  for (;;) {
    if (await cond()) return
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}
