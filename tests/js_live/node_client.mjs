// ringgate.js in Node 20 (global WebSocket via --experimental-websocket) against the real
// server at RINGGATE_WS: subscribe, publish with ack, history, the agent helper. Run by
// tests/js_client.rs; prints one line per check, and "N passed, 0 failed" at the end.
import assert from "node:assert/strict";
import { RinggateClient } from "../../static/ringgate.js";

const url = process.env.RINGGATE_WS;
const client = new RinggateClient(url, { browserEvents: false });
const got = [];
let passed = 0;
const ok = (what) => {
  passed += 1;
  console.log(`ok - ${what}`);
};

const sub = await client.subscribe("node", (m) => got.push(m));
assert.equal(sub.type, "subscribed");
assert.equal(client.status, "open");
ok("subscribed over a real WebSocket");

for (let i = 1; i <= 3; i++) {
  const ack = await client.publish("node", { i });
  assert.equal(ack.seq, i);
}
while (got.length < 3) await new Promise((r) => setTimeout(r, 10));
assert.deepEqual(got.map((m) => m.data.i), [1, 2, 3]);
ok("published with acks, delivered in order");

const h = await client.history("node", { since: 1 });
assert.deepEqual(h.messages.map((m) => m.seq), [2, 3]);
ok("history");

const agent = client.agent();
const r = await agent.tool("calculator", { expression: "2 * (3 + 4)" });
assert.equal(r, 14);
let text = "";
for await (const chunk of agent.stream("hi")) text += chunk;
assert.ok(text.startsWith("This is the ringgate demo agent."), text);
assert.equal(agent.demo, true);
ok("agent helper against the demo agent");

agent.close();
client.close();
assert.equal(client.status, "closed");
console.log(`${passed} passed, 0 failed`);
