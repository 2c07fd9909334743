// Baseline for bench/COMPRESSION.md: a Node.js echo server on the `ws` package (v8), written the
// way a typical user would, with or without permessage-deflate.
//
//   npm install --prefix target-bench/node ws@8      # once; node_modules is not committed
//   NODE_PATH=target-bench/node/node_modules node examples/node_ws_echo.js --port 8005 [options]
//
// Options:
//   --port N          listen port (127.0.0.1 only), default 8005
//   --deflate         perMessageDeflate: true (ws defaults: threshold 1024 bytes, zlib level 6
//                     (Z_DEFAULT_COMPRESSION), memLevel 8, 15-bit windows, context takeover in
//                     both directions, at most 10 concurrent zlib jobs)
//   --threshold N     with --deflate: perMessageDeflate.threshold (replies below N bytes go
//                     out uncompressed); ringgate's default is 256
//   --level N         with --deflate: perMessageDeflate.zlibDeflateOptions.level; ringgate's
//                     default is 1
//
// Every text or binary message is sent back as it came (compressed by ws when negotiated and at
// least `threshold` bytes). ws disables Nagle itself (setNoDelay), like ringgate.
'use strict';

const { WebSocketServer } = require('ws');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  if (i < 0) return dflt;
  const v = process.argv[i + 1];
  if (v === undefined || v.startsWith('--')) throw new Error(`${name} needs a value`);
  return v;
}

const port = Number(arg('--port', '8005'));
const deflate = process.argv.includes('--deflate');
const threshold = arg('--threshold', undefined);
const level = arg('--level', undefined);

let perMessageDeflate = false;
if (deflate) {
  if (threshold === undefined && level === undefined) {
    perMessageDeflate = true;
  } else {
    perMessageDeflate = {};
    if (threshold !== undefined) perMessageDeflate.threshold = Number(threshold);
    if (level !== undefined) perMessageDeflate.zlibDeflateOptions = { level: Number(level) };
  }
}

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => ws.terminate());
});
wss.on('listening', () => {
  console.error(
    `node ${process.version} ws echo on 127.0.0.1:${port}, perMessageDeflate ${JSON.stringify(perMessageDeflate)}`
  );
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
