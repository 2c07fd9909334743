// Unit tests of static/ringgate.js under Node's test runner (`node --test tests/js/`), with
// a fake WebSocket, fake fetch (SSE bodies streamed through real ReadableStreams) and mocked
// timers. Run by tests/js_client.rs.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { RinggateClient, backoffDelay, encodeCursor, sseData } from "../../static/ringgate.js";

class FakeWs {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closed = null;
    FakeWs.all.push(this);
  }
  send(text) {
    if (this.closed) throw new Error("closed");
    this.sent.push(JSON.parse(text));
  }
  close(code) {
    if (this.closed) return;
    this.closed = code ?? 1005;
    queueMicrotask(() => this.onclose?.({ code }));
  }
  // test side
  open(connectionId = "c1") {
    this.onopen?.();
    this.recv({ type: "connected", connection_id: connectionId });
  }
  recv(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  fail() {
    this.closed = 1006;
    this.onclose?.({ code: 1006 });
  }
  last(action) {
    return [...this.sent].reverse().find((m) => m.action === action);
  }
}

/** A `text/event-stream` response whose body the test writes event by event. */
class SseBody {
  constructor() {
    this.body = new ReadableStream({ start: (c) => (this.c = c) });
    this.enc = new TextEncoder();
  }
  response() {
    return { ok: true, status: 200, body: this.body };
  }
  send(msg) {
    this.c.enqueue(this.enc.encode(`id: x\ndata: ${JSON.stringify(msg)}\n\n`));
  }
  end() {
    this.c.close();
  }
}

const flush = () => new Promise((r) => setImmediate(r));

async function client(extra = {}) {
  FakeWs.all = [];
  const statuses = [];
  const c = new RinggateClient("ws://127.0.0.1:1/ws", {
    WebSocket: FakeWs,
    fetch: extra.fetch || (async () => ({ ok: true, json: async () => ({ messages: [] }) })),
    browserEvents: false,
    random: () => 0.5,
    probeInterval: 0,
    pingInterval: 0,
    ...extra,
  });
  c.on("status", (s) => statuses.push(s));
  await Promise.resolve();
  return { c, statuses };
}

test("backoff: full jitter below an exponential ceiling, capped", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 0.999), 499);
  assert.equal(backoffDelay(3, 500, 30000, () => 0.5), 2000);
  assert.equal(backoffDelay(20, 500, 30000, () => 0.999), 29970);
  assert.equal(backoffDelay(1000, 500, 30000, () => 0), 0);
});

test("cursor encoding escapes separators", () => {
  assert.equal(
    encodeCursor([["a,b", { seq: 3, epoch: "e:1" }], ["x", { seq: null }]]),
    "a%2Cb:3:e%3A1",
  );
});

test("token goes as the bearer subprotocol, or in the query", async () => {
  let { c } = await client({ token: "t.k.n" });
  assert.deepEqual(FakeWs.all[0].protocols, ["bearer.t.k.n"]);
  c.close();
  ({ c } = await client({ token: "tok", tokenIn: "query" }));
  assert.equal(FakeWs.all[0].url, "ws://127.0.0.1:1/ws?token=tok");
  c.close();
});

test("subscribe, deliver, publish with ack, request ids", async () => {
  const { c, statuses } = await client();
  const ws = FakeWs.all[0];
  ws.open();
  const got = [];
  const p = c.subscribe("room", (m) => got.push(m));
  const sub = ws.last("subscribe");
  assert.equal(sub.topic, "room");
  assert.equal(sub.since, undefined);
  ws.recv({ type: "subscribed", topic: "room", seq: 4, epoch: "E", id: sub.id });
  assert.equal((await p).seq, 4);
  ws.recv({ type: "message", topic: "room", seq: 5, data: 1 });
  ws.recv({ type: "message", topic: "room", seq: 5, data: 1 }); // duplicate: dropped
  ws.recv({ type: "message", topic: "room", seq: 6, data: 2 });
  assert.deepEqual(got.map((m) => m.data), [1, 2]);
  const ack = c.publish("room", { x: 1 });
  const pub = ws.last("publish");
  assert.deepEqual(pub.data, { x: 1 });
  ws.recv({ type: "ack", id: pub.id, seq: 7 });
  assert.equal((await ack).seq, 7);
  const bad = c.publish("room", 1);
  ws.recv({ type: "error", code: "rate_limited", error: "slow down", id: ws.last("publish").id });
  await assert.rejects(bad, (e) => e.code === "rate_limited");
  assert.deepEqual(statuses, ["connecting", "open"]);
  c.close();
  assert.equal(statuses.at(-1), "closed");
});

test("reconnect with backoff restores subscriptions with since and epoch", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    const { c, statuses } = await client();
    FakeWs.all[0].open();
    const got = [];
    c.subscribe("room", (m) => got.push(m));
    let ws = FakeWs.all[0];
    ws.recv({ type: "subscribed", topic: "room", seq: 0, epoch: "E", id: ws.last("subscribe").id });
    ws.recv({ type: "message", topic: "room", seq: 1, data: "a" });
    ws.fail();
    assert.equal(statuses.at(-1), "reconnecting");
    assert.equal(FakeWs.all.length, 1);
    mock.timers.tick(250); // random 0.5 × base 500
    assert.equal(FakeWs.all.length, 2);
    ws = FakeWs.all[1];
    ws.open("c2");
    const sub = ws.last("subscribe");
    assert.equal(sub.since, 1);
    assert.equal(sub.epoch, "E");
    ws.recv({ type: "subscribed", topic: "room", seq: 3, epoch: "E", recovered: true, id: sub.id });
    ws.recv({ type: "message", topic: "room", seq: 2, data: "b" });
    ws.recv({ type: "message", topic: "room", seq: 3, data: "c" });
    assert.deepEqual(got.map((m) => m.data), ["a", "b", "c"]);
    assert.equal(statuses.at(-1), "open");
    // A restart lost history: the handler is told, and delivery resumes from the new seq.
    ws.fail();
    mock.timers.tick(30000);
    ws = FakeWs.all.at(-1);
    ws.open("c3");
    const again = ws.last("subscribe");
    assert.equal(again.since, 3);
    ws.recv({ type: "subscribed", topic: "room", seq: 0, epoch: "F", recovered: false, id: again.id });
    ws.recv({ type: "message", topic: "room", seq: 1, data: "d" });
    assert.equal(got[3].type, "subscribed");
    assert.equal(got[3].recovered, false);
    assert.equal(got[4].data, "d");
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("backoff grows per failed attempt up to the cap", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    const { c } = await client({ random: () => 0.999, fallbackAfter: 0, backoffCap: 4000 });
    const waits = [];
    for (let i = 0; i < 6; i++) {
      const n = FakeWs.all.length;
      FakeWs.all.at(-1).fail();
      let waited = 0;
      while (FakeWs.all.length === n) {
        mock.timers.tick(1);
        waited += 1;
      }
      waits.push(waited);
    }
    assert.deepEqual(waits, [499, 999, 1998, 3996, 3996, 3996]);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("bounded send queue while disconnected", async () => {
  const { c } = await client({ maxQueue: 2 });
  const a = c.publish("t", 1);
  const b = c.publish("t", 2);
  await assert.rejects(c.publish("t", 3), (e) => e.code === "queue_full");
  const ws = FakeWs.all[0];
  ws.open();
  const pubs = ws.sent.filter((m) => m.action === "publish");
  assert.deepEqual(pubs.map((m) => m.data), [1, 2]);
  for (const p of pubs) ws.recv({ type: "ack", id: p.id, seq: p.data });
  assert.equal((await a).seq, 1);
  assert.equal((await b).seq, 2);
  c.close();
});

test("requests time out", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    const { c } = await client({ requestTimeout: 1000 });
    FakeWs.all[0].open();
    const p = c.presence("t");
    mock.timers.tick(1000);
    await assert.rejects(p, (e) => e.code === "timeout");
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("silent connection is replaced after two ping intervals", async () => {
  mock.timers.enable({ apis: ["setTimeout", "Date"] });
  try {
    const { c, statuses } = await client({ pingInterval: 1000 });
    const ws = FakeWs.all[0];
    ws.open();
    mock.timers.tick(1000);
    assert.ok(ws.last("ping"), "pings when idle");
    mock.timers.tick(1000);
    assert.equal(ws.closed, 4000);
    assert.equal(statuses.at(-1), "reconnecting");
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("SSE data: multi-line data, comments, CRLF, events split across chunks", async () => {
  const chunks = ["data: a\r\n", "data: b\r", "\n\r\n: heartbeat\n\nid: 1\ndata:", "c\n", "\n", "data: cut"];
  const enc = new TextEncoder();
  const body = new ReadableStream({
    start(c) {
      for (const x of chunks) c.enqueue(enc.encode(x));
      c.close();
    },
  });
  const got = [];
  for await (const d of sseData(body)) got.push(d);
  assert.deepEqual(got, ["a\nb", "c"]);
});

test("falls back to SSE after 3 failed attempts, with the token as a header; publishes over HTTP, probes back", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  const calls = [];
  const sse = new SseBody();
  const fetch = async (url, init) => {
    calls.push({ url, init });
    if (url.includes("/sse?")) return sse.response();
    return { ok: true, json: async () => ({ seq: 9 }) };
  };
  try {
    const { c, statuses } = await client({ fetch, probeInterval: 5000, token: "tok" });
    const got = [];
    c.subscribe("room", (m) => got.push(m));
    for (let i = 0; i < 3; i++) {
      FakeWs.all.at(-1).fail();
      mock.timers.tick(30000);
    }
    await flush();
    const open = calls.find((x) => x.url.includes("/sse?"));
    assert.match(open.url, /\/sse\?topics=room$/);
    assert.equal(open.init.headers.authorization, "Bearer tok");
    assert.equal(statuses.at(-1), "fallback:sse");
    sse.send({ type: "subscribed", topic: "room", seq: 2, epoch: "E" });
    sse.send({ type: "message", topic: "room", seq: 3, data: "x" });
    await flush();
    await flush();
    assert.deepEqual(got.map((m) => m.data), ["x"]);
    const ack = await c.publish("room", { y: 1 });
    assert.equal(ack.seq, 9);
    const post = calls.find((x) => x.url.endsWith("/publish"));
    assert.equal(post.url, "http://127.0.0.1:1/publish");
    assert.deepEqual(JSON.parse(post.init.body), { topic: "room", data: { y: 1 } });
    // The background probe finds WebSocket working again.
    const before = FakeWs.all.length;
    mock.timers.tick(5000);
    assert.equal(FakeWs.all.length, before + 1);
    const ws = FakeWs.all.at(-1);
    ws.open();
    assert.ok(open.init.signal.aborted, "SSE closed");
    assert.equal(statuses.at(-1), "open");
    const sub = ws.last("subscribe");
    assert.equal(sub.since, 3);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("an SSE stream that drops is reopened from the last position", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  const streams = [];
  const fetch = async (url) => {
    const s = new SseBody();
    streams.push({ url, s });
    return s.response();
  };
  try {
    const { c, statuses } = await client({ fetch, fallbackAfter: 1, probeInterval: 0 });
    const got = [];
    c.subscribe("room", (m) => got.push(m));
    FakeWs.all[0].fail();
    mock.timers.tick(30000);
    await flush();
    streams[0].s.send({ type: "subscribed", topic: "room", seq: 4, epoch: "E" });
    streams[0].s.send({ type: "message", topic: "room", seq: 5, data: "a" });
    streams[0].s.end();
    await flush();
    await flush();
    mock.timers.tick(30000);
    await flush();
    assert.equal(streams.length, 2);
    assert.match(streams[1].url, /since=room:5:E/);
    assert.equal(statuses.at(-1), "fallback:sse");
    assert.deepEqual(got.map((m) => m.data), ["a"]);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("SSE that never opens moves to long-poll after a backoff", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  const polls = [];
  let answer;
  const fetch = (url) => {
    if (url.includes("/sse?")) return Promise.resolve({ ok: false, status: 404 });
    polls.push(url);
    return new Promise((r) => (answer = r));
  };
  try {
    const { c, statuses } = await client({ fetch, fallbackAfter: 1 });
    const got = [];
    c.subscribe("room", (m) => got.push(m));
    FakeWs.all[0].fail();
    mock.timers.tick(30000);
    await flush();
    // SSE answered 404: one failed attempt on it, then the next transport after a backoff.
    assert.equal(statuses.at(-1), "reconnecting");
    mock.timers.tick(30000);
    await flush();
    assert.equal(statuses.at(-1), "fallback:poll");
    await flush();
    assert.match(polls[0], /\/poll\?topics=room&timeout=25$/);
    answer({
      ok: true,
      json: async () => ({
        messages: [
          { type: "subscribed", topic: "room", seq: 1, epoch: "E" },
          { type: "message", topic: "room", seq: 2, data: "p" },
        ],
      }),
    });
    await flush();
    await flush();
    assert.deepEqual(got.map((m) => m.data), ["p"]);
    assert.match(polls[1], /since=room:2:E/);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("every transport is retried alike: fallbackAfter failures each, then the next, then over again", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  const attempts = [];
  const fetch = async (url) => {
    attempts.push(new URL(url).pathname);
    throw new TypeError("connection refused");
  };
  try {
    const { c } = await client({ fetch, fallbackAfter: 2, transports: ["ws", "sse", "poll"] });
    c.subscribe("room", () => {});
    let seen = 0;
    for (let i = 0; i < 7; i++) {
      if (FakeWs.all.length > seen) {
        attempts.push("ws");
        seen = FakeWs.all.length;
        FakeWs.all.at(-1).fail();
      }
      await flush();
      mock.timers.tick(30000);
      await flush();
    }
    assert.deepEqual(attempts.slice(0, 7), ["ws", "ws", "/sse", "/sse", "/poll", "/poll", "ws"]);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("an SSE stream whose reopening fails is retried with backoff from the last position", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  const urls = [];
  const streams = [];
  let down = false;
  const fetch = async (url) => {
    urls.push(url);
    if (down) throw new TypeError("connection refused");
    const s = new SseBody();
    streams.push(s);
    return s.response();
  };
  try {
    // No long-poll to move to: SSE must be tried again.
    const { c, statuses } = await client({ fetch, fallbackAfter: 1, transports: ["ws", "sse"] });
    const got = [];
    c.subscribe("room", (m) => got.push(m));
    FakeWs.all[0].fail();
    mock.timers.tick(30000);
    await flush();
    streams[0].send({ type: "subscribed", topic: "room", seq: 4, epoch: "E" });
    streams[0].send({ type: "message", topic: "room", seq: 5, data: "a" });
    await flush();
    // The server goes away: the stream ends and the next attempts are refused.
    down = true;
    streams[0].end();
    for (let i = 0; i < 4; i++) {
      await flush();
      await flush();
      for (const ws of FakeWs.all) if (!ws.closed) ws.fail();
      mock.timers.tick(30000);
    }
    assert.ok(urls.filter((u) => u.includes("/sse?")).length >= 3, urls.join("\n"));
    assert.equal(statuses.at(-1), "reconnecting");
    down = false;
    for (let i = 0; i < 4 && streams.length < 2; i++) {
      for (const ws of FakeWs.all) if (!ws.closed) ws.fail();
      mock.timers.tick(30000);
      await flush();
      await flush();
    }
    assert.equal(streams.length, 2, urls.join("\n"));
    assert.match(urls.at(-1), /\/sse\?topics=room&since=room:5:E$/);
    streams[1].send({ type: "subscribed", topic: "room", seq: 6, epoch: "E", recovered: true });
    streams[1].send({ type: "message", topic: "room", seq: 6, data: "b" });
    await flush();
    await flush();
    assert.equal(statuses.at(-1), "fallback:sse");
    assert.deepEqual(got.map((m) => m.data), ["a", "b"]);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("agent helper: stream as an async iterator, cancel", async () => {
  const { c } = await client();
  const agent = c.agent();
  const s = agent.stream("hello");
  await flush();
  const ws = FakeWs.all.at(-1);
  assert.equal(ws.url, "ws://127.0.0.1:1/ws/agent");
  ws.recv({ type: "connected", connection_id: "a1", demo: true });
  await flush();
  const q = ws.sent[0];
  assert.equal(q.type, "streaming_query");
  ws.recv({ type: "stream_start", id: q.id });
  ws.recv({ type: "stream_chunk", id: q.id, content: "one " });
  ws.recv({ type: "stream_chunk", id: q.id, content: "two" });
  ws.recv({ type: "stream_end", id: q.id });
  const parts = [];
  for await (const part of s) parts.push(part);
  assert.deepEqual(parts, ["one ", "two"]);
  assert.equal(agent.demo, true);

  const s2 = agent.stream("again");
  await flush();
  const q2 = ws.sent.at(-1);
  ws.recv({ type: "stream_chunk", id: q2.id, content: "x" });
  const cancelled = s2.cancel();
  await flush();
  assert.deepEqual(ws.sent.at(-1), { type: "cancel", id: q2.id });
  ws.recv({ type: "cancelled", id: q2.id });
  await cancelled;
  const rest = [];
  for await (const part of s2) rest.push(part);
  assert.deepEqual(rest, ["x"]);

  const r = agent.tool("calculator", { expression: "1+1" });
  await flush();
  const t = ws.sent.at(-1);
  ws.recv({ type: "tool_result", id: t.id, tool_name: "calculator", result: 2 });
  assert.equal(await r, 2);
  agent.close();
  c.close();
});
