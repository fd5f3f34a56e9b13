// Zero's side of bench/peers: real `@rocicorp/zero` clients in Node, each with its own userID
// and in-memory store, subscribed to `events_zero` rows above a base id.
//
//   node zero_client.mjs latency SERVER CLIENTS BASE_ID
//     prints READY once every client has its complete (empty) result; then reads stdin:
//     `go` starts measuring now - ts (the writer's clock at insert, unix ms) for every row that
//     reaches every client; `stop ROWS DRAIN_SECS` waits until every client holds ROWS rows (or
//     DRAIN_SECS passed) and prints one JSON line: deliveries, expected, p50_ms, p99_ms. A row
//     still missing at the end is counted as missing, ranked above every delivered one.
//   node zero_client.mjs catchup SERVER BASE_ID ROWS TIMEOUT_SECS
//     one client; prints READY, then one JSON line {rows, done_ms} when it holds ROWS rows.
import {WebSocket} from 'ws';
import {Zero} from '@rocicorp/zero';
import {schema} from './schema.js';
import readline from 'node:readline';

// Node 20 has no global WebSocket: use `ws`. Unlike a browser's, a `ws` socket closed before it
// opened (Zero's connect timeout does that when the server is slow to answer) emits an 'error'
// event that crashes the process unless something listens; Zero's own handlers still get it.
class NodeWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    this.on('error', () => {});
  }
}
globalThis.WebSocket ??= NodeWebSocket;

const [mode, server, ...rest] = process.argv.slice(2);
const now = () => performance.timeOrigin + performance.now();

function client(i, base, onData) {
  const z = new Zero({server, userID: `u${i}`, schema, kvStore: 'mem', logLevel: 'error'});
  const view = z.query.events_zero.where('id', '>', base).orderBy('id', 'asc').materialize();
  let complete;
  const ready = new Promise(r => (complete = r));
  view.addListener((data, resultType) => {
    onData(data);
    if (resultType === 'complete') complete();
  });
  return {z, view, ready};
}

// Missing rows rank above every delivered one: a percentile that falls among them is null
// (not delivered within the drain), never a number.
function pct(sorted, missing, p) {
  const n = sorted.length + missing;
  const i = Math.max(1, Math.ceil(p * n)) - 1;
  return i < sorted.length ? sorted[i] : null;
}

const cpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

if (mode === 'latency') {
  const [n, base] = [Number(rest[0]), Number(rest[1])];
  const lat = [];
  let measuring = false;
  const clients = [];
  for (let i = 0; i < n; i++) {
    const seen = new Set();
    const state = {seen, count: 0};
    // Rows arrive sorted by id; writers on several connections commit slightly out of id
    // order, so walk back from the end until a run of already-seen rows.
    const c = client(i, base, data => {
      const t = now();
      let run = 0;
      for (let k = data.length - 1; k >= 0 && run < 256; k--) {
        const row = data[k];
        if (seen.has(row.id)) {
          run++;
          continue;
        }
        run = 0;
        seen.add(row.id);
        state.count++;
        if (measuring) lat.push(t - row.ts);
      }
    });
    c.state = state;
    clients.push(c);
  }
  await Promise.all(clients.map(c => c.ready));
  console.log('READY');
  const rl = readline.createInterface({input: process.stdin});
  for await (const line of rl) {
    const [cmd, a, b] = line.trim().split(/\s+/);
    if (cmd === 'go') {
      measuring = true;
    } else if (cmd === 'stop') {
      const rows = Number(a);
      const deadline = Date.now() + Number(b) * 1000;
      while (Date.now() < deadline && clients.some(c => c.state.count < rows)) {
        await new Promise(r => setTimeout(r, 20));
      }
      const delivered = clients.reduce((s, c) => s + Math.min(c.state.count, rows), 0);
      lat.sort((x, y) => x - y);
      console.log(
        JSON.stringify({
          deliveries: lat.length,
          expected: rows * n,
          missing: rows * n - delivered,
          p50_ms: pct(lat, rows * n - delivered, 0.5),
          p99_ms: pct(lat, rows * n - delivered, 0.99),
          client_cpu_s: cpuSeconds(),
        }),
      );
      break;
    }
  }
  process.exit(0);
} else if (mode === 'catchup') {
  const [base, rows, timeout] = rest.map(Number);
  let done = null;
  let have = 0;
  const c = client(0, base, data => {
    have = data.length;
    if (done === null && have >= rows) done = now();
  });
  await c.ready;
  console.log('READY');
  const deadline = Date.now() + timeout * 1000;
  while (done === null && Date.now() < deadline) await new Promise(r => setTimeout(r, 5));
  console.log(JSON.stringify({rows: have, done_ms: done}));
  process.exit(0);
} else {
  console.error('usage: zero_client.mjs latency|catchup ...');
  process.exit(2);
}
