// ringgate.js on SSE (WebSocket left out of `transports`) against the real server at
// RINGGATE_WS under `[auth]` without `query_token`: the stream is read with fetch and the token
// sent as `Authorization`. Run by tests/js_client.rs; "N passed, 0 failed" at the end.
import assert from "node:assert/strict";
import { RinggateClient } from "../../static/ringgate.js";

// Bounded: a client that never gets there fails instead of hanging the suite.
setTimeout(() => {
  console.error("timed out");
  process.exit(1);
}, 30000).unref();

const url = process.env.RINGGATE_WS;
const token = process.env.RINGGATE_TOKEN;
const statuses = [];
const client = new RinggateClient(url, { browserEvents: false, token, transports: ["sse"] });
client.on("status", (s) => statuses.push(s));
let passed = 0;
const ok = (what) => {
  passed += 1;
  console.log(`ok - ${what}`);
};

const got = [];
const done = new Promise((resolve) => {
  client.subscribe("news", (m) => {
    got.push(m);
    if (got.length === 3) resolve();
  });
});
await new Promise((r) => {
  const check = () => (client.status === "fallback:sse" ? r() : setTimeout(check, 20));
  check();
});
ok("on SSE with a header token");
for (let i = 1; i <= 3; i++) {
  const ack = await client.publish("news", { i });
  assert.equal(ack.seq, i);
}
ok("published over HTTP with acks");
await done;
assert.deepEqual(got.map((m) => m.data.i), [1, 2, 3]);
assert.ok(got.every((m) => m.from === "ann"), JSON.stringify(got));
ok("received in order over SSE, from the token's user");
assert.ok(!statuses.includes("fallback:poll"), statuses.join(","));
client.close();
console.log(`${passed} passed, 0 failed`);
