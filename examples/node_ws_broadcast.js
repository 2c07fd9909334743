// Baseline for the fan-out benchmark (`ringgate-load fanout`): a Node.js broadcast server on the
// `ws` package (v8) that speaks enough of ringgate's rooms protocol (PROTOCOL.md, `/ws`), written
// the way a fair Node broadcast server is written: each publish is serialised once (one Buffer)
// and that Buffer is sent to every subscriber of the topic.
//
//   npm install --prefix target/node ws@8      # once; node_modules is not committed
//   NODE_PATH=target/node/node_modules node examples/node_ws_broadcast.js --port 8006
//
// Options:
//   --port N    listen port (127.0.0.1 only), default 8006
//
// Client to server (JSON text frames; any path is accepted):
//   {"action":"subscribe","topic":T,"id"?}   -> {"type":"subscribed","topic":T,"seq":<last seq>,"id"?}
//   {"action":"unsubscribe","topic":T,"id"?} -> {"type":"unsubscribed","topic":T,"id"?}
//   {"action":"publish","topic":T,"type"?,"data":D,"id"?}
//       -> to every subscriber of T: {"type":"message"|type,"topic":T,"seq":N,"data":D,"timestamp":S}
//          with N = the topic's previous seq + 1; with an "id", the publisher also gets
//          {"type":"ack","id":…,"seq":N}
//   {"action":"ping","id"?}                  -> {"type":"pong","timestamp":S,"id"?}
// Anything else gets {"type":"error","error":…,"code":"bad_json"|"missing_field"|"unknown_action"}.
// No history, presence, auth or backpressure limits (ws buffers without bound, as typical code
// does). permessage-deflate is off, like ringgate's fan-out benchmark client.
'use strict';

const { WebSocketServer } = require('ws');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  if (i < 0) return dflt;
  const v = process.argv[i + 1];
  if (v === undefined || v.startsWith('--')) throw new Error(`${name} needs a value`);
  return v;
}

const port = Number(arg('--port', '8006'));

/** topic name -> { seq, subs: Set<WebSocket> } */
const topics = new Map();

function topicOf(name) {
  let t = topics.get(name);
  if (t === undefined) {
    t = { seq: 0, subs: new Set() };
    topics.set(name, t);
  }
  return t;
}

function now() {
  return Date.now() / 1000; // seconds, millisecond precision
}

function reply(ws, msg, id) {
  if (id !== undefined) msg.id = id;
  ws.send(JSON.stringify(msg));
}

function error(ws, code, text, id) {
  reply(ws, { type: 'error', error: text, code }, id);
}

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

wss.on('connection', (ws) => {
  const mine = new Set(); // topics this connection subscribed to
  ws.on('message', (raw) => {
    let m;
    try {
      m = JSON.parse(raw);
    } catch (e) {
      return error(ws, 'bad_json', 'invalid JSON');
    }
    if (m === null || typeof m !== 'object') return error(ws, 'bad_json', 'expected an object');
    const id = m.id;
    switch (m.action) {
      case 'subscribe': {
        if (typeof m.topic !== 'string') return error(ws, 'missing_field', 'topic is required', id);
        const t = topicOf(m.topic);
        t.subs.add(ws);
        mine.add(m.topic);
        return reply(ws, { type: 'subscribed', topic: m.topic, seq: t.seq }, id);
      }
      case 'unsubscribe': {
        if (typeof m.topic !== 'string') return error(ws, 'missing_field', 'topic is required', id);
        const t = topics.get(m.topic);
        if (t !== undefined) t.subs.delete(ws);
        mine.delete(m.topic);
        return reply(ws, { type: 'unsubscribed', topic: m.topic }, id);
      }
      case 'publish': {
        if (typeof m.topic !== 'string') return error(ws, 'missing_field', 'topic is required', id);
        const t = topicOf(m.topic);
        t.seq += 1;
        // Serialised once; the same Buffer goes to every subscriber as a text frame.
        const out = Buffer.from(
          JSON.stringify({
            type: typeof m.type === 'string' ? m.type : 'message',
            topic: m.topic,
            seq: t.seq,
            data: m.data,
            timestamp: now(),
          })
        );
        for (const sub of t.subs) {
          if (sub.readyState === 1) sub.send(out, { binary: false });
        }
        if (id !== undefined) reply(ws, { type: 'ack', seq: t.seq }, id);
        return;
      }
      case 'ping':
        return reply(ws, { type: 'pong', timestamp: now() }, id);
      default:
        return error(ws, 'unknown_action', `unknown action ${JSON.stringify(m.action)}`, id);
    }
  });
  ws.on('close', () => {
    for (const name of mine) {
      const t = topics.get(name);
      if (t !== undefined) t.subs.delete(ws);
    }
  });
  ws.on('error', () => ws.terminate());
});
wss.on('listening', () => {
  console.error(`node ${process.version} ws broadcast (rooms subset) on 127.0.0.1:${port}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
