// Preloaded into zero-cache (NODE_OPTIONS=--require) by bench/peers/run.sh: zero-cache 0.22
// hard-codes `host: '::'` for its listeners (no flag or env var), and a benchmark here must not
// listen beyond loopback. Every net listen on a port with no host, '::' or '0.0.0.0' is bound to
// 127.0.0.1 instead; run.sh checks the result with `ss -ltnp`.
'use strict';
const net = require('node:net');
const wildcard = h => h === undefined || h === null || h === '' || h === '::' || h === '0.0.0.0';
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const a = args[0];
  if (a !== null && typeof a === 'object' && !Array.isArray(a) && a.port !== undefined && a.path === undefined) {
    if (wildcard(a.host)) args[0] = {...a, host: '127.0.0.1', ipv6Only: false};
  } else if (typeof a === 'number' || (typeof a === 'string' && /^\d+$/.test(a))) {
    if (typeof args[1] === 'string') {
      if (wildcard(args[1])) args[1] = '127.0.0.1';
    } else {
      args.splice(1, 0, '127.0.0.1');
    }
  }
  return listen.apply(this, args);
};
