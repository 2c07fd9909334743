#!/usr/bin/env node
// permessage-deflate interop client (Node `ws` 8) for ringgate's /ws/echo.
//
//   node tests/interop/client.js URL [--server-no-context-takeover]
//       [--client-no-context-takeover] [--server-max-window-bits N]
//       [--client-max-window-bits N] [--threshold N]
//
// Same sequence and checks as client.py: offers permessage-deflate with the given parameters,
// sends JSON text over the server's threshold, small text under it, binary, a fragmented
// message, a 1 MiB compressible message and a pipelined burst, and checks every echo byte for
// byte; compressible echoes of --threshold bytes (the server's, default 256) and more must
// arrive compressed (RSV1), shorter echoes uncompressed. ws compresses what it sends from its
// default threshold (1 KiB) up, so the server sees compressed and plain messages mixed.
//
// Prints `client=...`, `extensions=<Sec-WebSocket-Extensions of the 101>` and a final
// `result=ok ...` line; on any mismatch `result=FAIL ...` and exit status 1. Exit status 3:
// the `ws` module was not found (install: npm install --prefix target/node ws@8; the Rust tests
// put target/node/node_modules and tests/interop/node_modules on NODE_PATH).
'use strict';

const TIMEOUT_MS = 20000; // for any single step; generous for a loaded CI machine

let WebSocket;
try {
  WebSocket = require('ws');
} catch (e) {
  console.log(
    'result=FAIL the Node module `ws` is not installed (' + e.code + '); install it with: ' +
      'npm install --no-audit --no-fund --prefix target/node ws@8   (from the repository root)'
  );
  process.exit(3);
}

function parseArgs(argv) {
  const o = { threshold: 256 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--server-no-context-takeover') o.serverNoContextTakeover = true;
    else if (a === '--client-no-context-takeover') o.clientNoContextTakeover = true;
    else if (a === '--server-max-window-bits') o.serverMaxWindowBits = Number(argv[++i]);
    else if (a === '--client-max-window-bits') o.clientMaxWindowBits = Number(argv[++i]);
    else if (a === '--threshold') o.threshold = Number(argv[++i]);
    else if (!o.url && !a.startsWith('--')) o.url = a;
    else throw new Error('unknown argument ' + a);
  }
  if (!o.url) throw new Error('usage: client.js URL [options]');
  return o;
}

function jsonMessage(i) {
  const users = [];
  for (let k = 0; k < 8; k++) {
    users.push({ id: 1000 + i * 10 + k, name: `user-${i}-${k}`, status: ['online', 'away'][k % 2] });
  }
  return JSON.stringify({ type: 'presence', room: 'lobby', seq: i, users });
}

// Exactly `size` bytes of ASCII JSON lines: compressible, but not one repeated byte.
function bigText(size) {
  const parts = [];
  let total = 0;
  for (let i = 0; total < size; i++) {
    const line = `{"seq":${i},"topic":"stats","cpu":${(i * 37) % 100},"mem":${(i * 11) % 97}}\n`;
    parts.push(line);
    total += line.length;
  }
  return parts.join('').slice(0, size);
}

// Deterministic incompressible bytes (xorshift).
function noise(len, seed) {
  const b = Buffer.alloc(len);
  let x = seed | 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

// { data: string (text) | Buffer (binary), fragments, compressible }
function messages() {
  const seq = [];
  const m = (data, fragments, compressible) => seq.push({ data, fragments, compressible });
  for (let i = 0; i < 20; i++) m(jsonMessage(i), 1, true);
  m('hi', 1, false);
  m('', 1, false);
  m('héllo wörld €𝄞 日本語', 1, false);
  m('x'.repeat(200), 1, false);
  m(Buffer.from(Array.from({ length: 64 }, (_, i) => i)), 1, false);
  m(Buffer.alloc(0), 1, false);
  m(noise(4096, 7), 1, false); // incompressible
  // Repeats 6 KiB apart: compressible only with a window over 6 KiB, so a server that overran
  // a smaller window it agreed to would refer back too far.
  m(Buffer.concat(Array(4).fill(noise(6144, 11))), 1, false);
  const pattern = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  m(Buffer.concat(Array(256).fill(pattern)), 1, true); // 64 KiB compressible binary
  m(jsonMessage(100).repeat(4), 3, true); // fragmented, compressed as one message
  m(bigText(1 << 20), 1, true); // 1 MiB compressible text
  for (let i = 20; i < 25; i++) m(jsonMessage(i), 1, true);
  return seq;
}

const bytesOf = (data) => (typeof data === 'string' ? Buffer.from(data, 'utf8') : data);
const describe = (data, isBinary) =>
  `${isBinary ? 'binary' : 'text'} message of ${bytesOf(data).length} bytes`;

class Failure extends Error {}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const version = require('ws/package.json').version;
  console.log(`client=node ws=${version} node=${process.version}`);

  const perMessageDeflate = {};
  if (args.serverNoContextTakeover) perMessageDeflate.serverNoContextTakeover = true;
  if (args.clientNoContextTakeover) perMessageDeflate.clientNoContextTakeover = true;
  if (args.serverMaxWindowBits) perMessageDeflate.serverMaxWindowBits = args.serverMaxWindowBits;
  if (args.clientMaxWindowBits) perMessageDeflate.clientMaxWindowBits = args.clientMaxWindowBits;

  const ws = new WebSocket(args.url, {
    perMessageDeflate,
    maxPayload: 64 << 20,
    handshakeTimeout: TIMEOUT_MS,
  });

  // Incoming messages, in order, and whoever waits for the next one.
  const inbox = [];
  let waiter = null;
  let failure = null;
  const wake = () => {
    if (waiter) {
      const w = waiter;
      waiter = null;
      w();
    }
  };
  ws.on('message', (data, isBinary) => {
    // RSV1 of this message's first frame (ws 8 keeps it on the receiver while it emits).
    const compressed = ws._receiver ? ws._receiver._compressed : undefined;
    inbox.push({ data, isBinary, compressed });
    wake();
  });
  ws.on('error', (e) => {
    failure = failure || e;
    wake();
  });
  let closed = null;
  ws.on('close', (code, reason) => {
    closed = { code, reason: reason.toString() };
    wake();
  });
  let extensions = '';
  ws.on('upgrade', (res) => {
    extensions = res.headers['sec-websocket-extensions'] || '';
  });

  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  console.log(`extensions=${extensions}`);
  const negotiated = extensions.length > 0;

  const next = async (what) => {
    const deadline = Date.now() + TIMEOUT_MS;
    while (inbox.length === 0) {
      if (failure) throw failure;
      if (closed) throw new Failure(`server closed (${closed.code} ${closed.reason}) before ${what}`);
      if (Date.now() > deadline) throw new Failure(`timed out waiting for ${what}`);
      await new Promise((resolve) => {
        waiter = resolve;
        setTimeout(resolve, 1000);
      });
    }
    return inbox.shift();
  };

  const send = (data, fragments) => {
    const binary = typeof data !== 'string';
    if (fragments === 1) return ws.send(data, { binary });
    const step = Math.ceil(data.length / fragments);
    for (let k = 0; k < data.length; k += step) {
      ws.send(data.slice(k, k + step), { binary, fin: k + step >= data.length });
    }
  };

  let n = 0;
  let compressedEchoes = 0;
  const check = async (msg) => {
    const what = `message ${n} (${describe(msg.data, typeof msg.data !== 'string')})`;
    const got = await next(`the echo of ${what}`);
    const wantBinary = typeof msg.data !== 'string';
    if (got.isBinary !== wantBinary || !bytesOf(msg.data).equals(got.data)) {
      throw new Failure(`${what} came back as ${describe(got.data, got.isBinary)}, different`);
    }
    const size = bytesOf(msg.data).length;
    if (negotiated && typeof got.compressed === 'boolean') {
      if (msg.compressible && size >= args.threshold && !got.compressed) {
        throw new Failure(`${what} came back uncompressed`);
      }
      if (size < args.threshold && got.compressed) {
        throw new Failure(`${what} came back compressed, under the ${args.threshold}-byte threshold`);
      }
    }
    if (got.compressed) compressedEchoes++;
    n++;
  };

  const seq = messages();
  // One at a time...
  for (const msg of seq) {
    send(msg.data, msg.fragments);
    await check(msg);
  }
  // ...then all in flight at once.
  const small = seq.filter((m) => bytesOf(m.data).length < 100000);
  const burst = small.concat(small);
  for (const msg of burst) send(msg.data, msg.fragments);
  for (const msg of burst) await check(msg);

  ws.close(1000);
  const deadline = Date.now() + TIMEOUT_MS;
  while (!closed && !failure && Date.now() < deadline) {
    await new Promise((resolve) => {
      waiter = resolve;
      setTimeout(resolve, 1000);
    });
  }
  if (failure) throw failure;
  if (!closed || closed.code !== 1000) {
    throw new Failure(`closing: expected the server to echo 1000, got ${JSON.stringify(closed)}`);
  }
  console.log(`result=ok messages=${n} compressed_echoes=${compressedEchoes}`);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.log(`result=FAIL ${e instanceof Failure ? '' : e.name + ': '}${e.message}`);
    process.exit(1);
  }
);
