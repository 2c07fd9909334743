// Browser tests: the real ringgate binary and Debian's headless chromium, driven over the
// DevTools protocol by puppeteer-core (which never downloads a browser). Run by tests/browser.rs
// with RINGGATE_BIN (the binary), RINGGATE_IO (uring or epoll) and CHROMIUM (its path).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer from "puppeteer-core";

const BIN = process.env.RINGGATE_BIN;
const IO = process.env.RINGGATE_IO || "epoll";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PATIENCE = 15000;

/** Starts ringgate on `port` (0: any) and resolves once it logged its address. */
function startServer(port = 0) {
  return new Promise((resolve, reject) => {
    const child = spawn(
      BIN,
      ["--host", "127.0.0.1", "--port", String(port), "--shards", "2", "--io", IO],
      { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "info", NO_COLOR: "1" } },
    );
    let buf = "";
    const timer = setTimeout(() => reject(new Error(`ringgate did not start: ${buf}`)), PATIENCE);
    child.stderr.on("data", (d) => {
      buf += d.toString();
      const m = buf.match(/ringgate listening.*?addr=(\S+)/);
      if (m && !child.addr) {
        clearTimeout(timer);
        child.addr = m[1].replace(/\x1b\[[0-9;]*m/g, "");
        child.port = Number(child.addr.split(":").pop());
        resolve(child);
      }
    });
    child.on("exit", (code) => {
      if (!child.addr) reject(new Error(`ringgate exited ${code}: ${buf}`));
    });
  });
}

function stopServer(child) {
  return new Promise((resolve) => {
    if (child.exitCode != null || child.signalCode != null) return resolve();
    child.on("exit", () => resolve());
    child.kill("SIGKILL");
  });
}

async function publish(port, topic, data) {
  const r = await fetch(`http://127.0.0.1:${port}/publish`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ topic, data }),
  });
  const text = await r.text();
  assert.equal(r.status, 200, text);
  return JSON.parse(text).seq;
}

let browser;
let profile;
let server;

before(async () => {
  assert.ok(BIN, "RINGGATE_BIN is not set (run through tests/browser.rs)");
  profile = mkdtempSync(join(tmpdir(), "ringgate-chromium-"));
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: profile,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  server = await startServer();
});

after(async () => {
  await browser?.close();
  if (server) await stopServer(server);
  if (profile) rmSync(profile, { recursive: true, force: true });
});

async function openPage(port, path = "/static/test_websocket.html") {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(`http://127.0.0.1:${port}${path}`, { waitUntil: "load" });
  page.errors = errors;
  return page;
}

/** Loads ringgate.js in the page and starts a client there that records what its handler gets. */
async function startClient(page, url, options = {}, topic = "feed") {
  await page.evaluate(
    async (url, options, topic) => {
      const { RinggateClient } = await import("/static/ringgate.js");
      window.t = { statuses: [], got: [] };
      const c = new RinggateClient(url, { backoffBase: 100, backoffCap: 1000, ...options });
      window.t.client = c;
      c.on("status", (s) => window.t.statuses.push(s));
      await c.subscribe(topic, (m) => window.t.got.push(m));
    },
    url,
    options,
    topic,
  );
}

const got = (page) => page.evaluate(() => window.t.got);
const dataOf = (msgs) => msgs.filter((m) => m.type === "message").map((m) => m.data);

test("the test page connects and shows open; a subscription receives messages", async () => {
  const page = await openPage(server.port, "/static/test_websocket.html?connect");
  await page.waitForFunction(() => document.getElementById("status").textContent === "open", {
    timeout: PATIENCE,
    polling: 50,
  });
  assert.equal(await page.$eval("#dot", (d) => d.className), "dot open");
  await page.click("#q-subscribe");
  await page.waitForFunction(() => window.ringgatePage.log.some((l) => l.payload?.type === "subscribed"), {
    timeout: PATIENCE,
    polling: 50,
  });
  await publish(server.port, "demo", { hello: 1 });
  await page.waitForFunction(
    () => window.ringgatePage.log.some((l) => l.direction === "←" && l.payload?.data?.hello === 1),
    { timeout: PATIENCE, polling: 50 },
  );
  // The statistics panel is fed by /ws/statistics.
  await page.waitForFunction(() => Number(document.getElementById("s-active").textContent) >= 1, {
    timeout: PATIENCE,
    polling: 50,
  });
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("a dropped connection recovers with no gap and no duplicate", async () => {
  const page = await openPage(server.port);
  await startClient(page, `ws://127.0.0.1:${server.port}/ws`);
  for (let i = 1; i <= 3; i++) await publish(server.port, "feed", i);
  await page.waitForFunction(() => window.t.got.length >= 3, { timeout: PATIENCE, polling: 50 });
  // Cut the socket; publish while the client is away.
  await page.evaluate(() => window.t.client._conn.ws.close());
  for (let i = 4; i <= 6; i++) await publish(server.port, "feed", i);
  await page.waitForFunction(() => window.t.got.length >= 6, { timeout: PATIENCE, polling: 50 });
  for (let i = 7; i <= 8; i++) await publish(server.port, "feed", i);
  await page.waitForFunction(() => window.t.got.length >= 8, { timeout: PATIENCE, polling: 50 });
  const msgs = await got(page);
  assert.deepEqual(dataOf(msgs), [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.ok(!msgs.some((m) => m.recovered === false));
  await page.evaluate(() => window.t.client.close());
  await page.close();
});

test("the server restarted mid-stream: the client reconnects and is told history is gone", async () => {
  const own = await startServer();
  const port = own.port;
  try {
    const page = await openPage(port);
    // WebSocket only: a restart slower than three backoffs (a loaded machine) would otherwise
    // move the client to SSE (the SSE restart test covers that path).
    await startClient(page, `ws://127.0.0.1:${port}/ws`, { transports: ["ws"] });
    for (let i = 1; i <= 3; i++) await publish(port, "feed", i);
    await page.waitForFunction(() => window.t.got.length >= 3, { timeout: PATIENCE, polling: 50 });
    await stopServer(own);
    await page.waitForFunction(() => window.t.statuses.includes("reconnecting"), { timeout: PATIENCE, polling: 50 });
    const again = await startServer(port);
    try {
      await page.waitForFunction(() => window.t.got.some((m) => m.recovered === false), {
        timeout: PATIENCE,
        polling: 50,
      });
      for (let i = 4; i <= 6; i++) await publish(port, "feed", i);
      await page.waitForFunction(() => window.t.got.length >= 7, { timeout: PATIENCE, polling: 50 });
      const msgs = await got(page);
      // Every message published reached the handler once, in order; the restart (which lost
      // the in-memory history and so the epoch) is announced in between.
      assert.deepEqual(dataOf(msgs), [1, 2, 3, 4, 5, 6]);
      assert.equal(msgs[3].type, "subscribed");
      assert.equal(msgs[3].recovered, false);
      const statuses = await page.evaluate(() => window.t.statuses);
      assert.equal(statuses.at(-1), "open");
      await page.evaluate(() => window.t.client.close());
      await page.close();
    } finally {
      await stopServer(again);
    }
  } finally {
    await stopServer(own);
  }
});

test("WebSockets refused: falls back to SSE and delivers in order", async () => {
  const page = await openPage(server.port);
  // Upgrades to this path fail (404); /sse, /poll and /publish are on the same origin.
  await startClient(page, `ws://127.0.0.1:${server.port}/ws-refused`, { probeInterval: 0 }, "sse-feed");
  await page.waitForFunction(() => window.t.statuses.includes("fallback:sse"), { timeout: PATIENCE, polling: 50 });
  for (let i = 1; i <= 5; i++) await publish(server.port, "sse-feed", i);
  await page.waitForFunction(() => window.t.got.length >= 5, { timeout: PATIENCE, polling: 50 });
  // Publishing from the fallback goes over POST /publish.
  const ack = await page.evaluate(() => window.t.client.publish("sse-feed", 6));
  assert.equal(ack.seq, 6);
  await page.waitForFunction(() => window.t.got.length >= 6, { timeout: PATIENCE, polling: 50 });
  assert.deepEqual(dataOf(await got(page)), [1, 2, 3, 4, 5, 6]);
  const statuses = await page.evaluate(() => window.t.statuses);
  assert.deepEqual(statuses.slice(0, 2), ["connecting", "reconnecting"]);
  await page.evaluate(() => window.t.client.close());
  await page.close();
});

test("WebSockets and SSE refused: falls back to long-poll and delivers in order", async () => {
  const own = await startServer();
  try {
    const page = await openPage(own.port);
    await page.setRequestInterception(true);
    page.on("request", (r) => {
      if (new URL(r.url()).pathname === "/sse") r.respond({ status: 503, body: "no SSE here" });
      else r.continue();
    });
    await startClient(page, `ws://127.0.0.1:${own.port}/ws-refused`, { probeInterval: 0 });
    await page.waitForFunction(() => window.t.statuses.includes("fallback:poll"), { timeout: PATIENCE, polling: 50 });
    for (let i = 1; i <= 5; i++) await publish(own.port, "feed", i);
    await page.waitForFunction(() => window.t.got.length >= 5, { timeout: PATIENCE, polling: 50 });
    for (let i = 6; i <= 9; i++) await publish(own.port, "feed", i);
    await page.waitForFunction(() => window.t.got.length >= 9, { timeout: PATIENCE, polling: 50 });
    assert.deepEqual(dataOf(await got(page)), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    await page.evaluate(() => window.t.client.close());
    await page.close();
  } finally {
    await stopServer(own);
  }
});

test("SSE with the server stopped and restarted: retried with backoff until it is back", async () => {
  const own = await startServer();
  const port = own.port;
  let again;
  try {
    const page = await openPage(port);
    // No long-poll to move to: only retrying SSE (or WebSocket, refused on this path) helps.
    await startClient(page, `ws://127.0.0.1:${port}/ws-refused`, { probeInterval: 0, transports: ["ws", "sse"] });
    await page.waitForFunction(() => window.t.statuses.includes("fallback:sse"), { timeout: PATIENCE, polling: 50 });
    for (let i = 1; i <= 3; i++) await publish(port, "feed", i);
    await page.waitForFunction(() => window.t.got.length >= 3, { timeout: PATIENCE, polling: 50 });
    let refused = 0;
    page.on("requestfailed", (r) => {
      if (new URL(r.url()).pathname === "/sse") refused += 1;
    });
    await stopServer(own);
    // Several attempts fail while the server is away.
    const deadline = Date.now() + PATIENCE;
    while (refused < 2) {
      assert.ok(Date.now() < deadline, "SSE was not tried again while the server was away");
      await new Promise((r) => setTimeout(r, 50));
    }
    again = await startServer(port);
    await page.waitForFunction(() => window.t.got.some((m) => m.recovered === false), {
      timeout: 2 * PATIENCE,
      polling: 50,
    });
    for (let i = 4; i <= 6; i++) await publish(port, "feed", i);
    await page.waitForFunction(() => window.t.got.length >= 7, { timeout: PATIENCE, polling: 50 });
    const msgs = await got(page);
    // The restart lost the in-memory history: announced, then delivery goes on in order.
    assert.deepEqual(dataOf(msgs), [1, 2, 3, 4, 5, 6]);
    assert.equal(msgs[3].recovered, false);
    const statuses = await page.evaluate(() => window.t.statuses);
    assert.ok(statuses.lastIndexOf("reconnecting") > statuses.indexOf("fallback:sse"), statuses.join());
    assert.equal(statuses.at(-1), "fallback:sse");
    assert.deepEqual(page.errors, []);
    await page.evaluate(() => window.t.client.close());
    await page.close();
  } finally {
    await stopServer(own);
    if (again) await stopServer(again);
  }
});

test("an SSE route that fails once: retried from the cursor, with no gap and no duplicate", async () => {
  const page = await openPage(server.port);
  let failing = false;
  const sseUrls = [];
  await page.setRequestInterception(true);
  page.on("request", (r) => {
    const url = new URL(r.url());
    if (url.pathname !== "/sse") return r.continue();
    sseUrls.push(url);
    if (failing) {
      failing = false;
      return r.respond({ status: 503, body: "not now" });
    }
    r.continue();
  });
  await startClient(page, `ws://127.0.0.1:${server.port}/ws-refused`, { probeInterval: 0, transports: ["ws", "sse"] }, "sse-retry");
  await page.waitForFunction(() => window.t.statuses.includes("fallback:sse"), { timeout: PATIENCE, polling: 50 });
  for (let i = 1; i <= 3; i++) await publish(server.port, "sse-retry", i);
  await page.waitForFunction(() => window.t.got.length >= 3, { timeout: PATIENCE, polling: 50 });
  // The stream is cut and the next attempt answered 503; published meanwhile: 4 to 6.
  failing = true;
  const before = sseUrls.length;
  await page.evaluate(() => window.t.client._conn.abort.abort());
  for (let i = 4; i <= 6; i++) await publish(server.port, "sse-retry", i);
  await page.waitForFunction(() => window.t.got.length >= 6, { timeout: PATIENCE, polling: 50 });
  assert.deepEqual(dataOf(await got(page)), [1, 2, 3, 4, 5, 6]);
  assert.ok(!(await got(page)).some((m) => m.recovered === false));
  // The refused attempt and the one after it both resumed from seq 3.
  const retries = sseUrls.slice(before);
  assert.ok(retries.length >= 2, retries.join("\n"));
  for (const u of retries) assert.match(u.searchParams.get("since") || "", /^sse-retry:3:/, String(u));
  const statuses = await page.evaluate(() => window.t.statuses);
  assert.equal(statuses.at(-1), "fallback:sse");
  await page.evaluate(() => window.t.client.close());
  await page.close();
});

test("/ws/agent streaming shows chunks on the page and cancel stops them", async () => {
  const page = await openPage(server.port);
  await page.click("#q-stream");
  await page.waitForFunction(() => document.getElementById("answer").textContent.trim().split(" ").length >= 2, {
    timeout: PATIENCE,
    polling: 50,
  });
  await page.click("#q-cancel");
  await page.waitForFunction(() => window.ringgatePage.log.some((l) => l.payload?.type === "cancelled"), {
    timeout: PATIENCE,
    polling: 50,
  });
  const log = await page.evaluate(() => window.ringgatePage.log.map((l) => l.payload));
  const cancelledAt = log.findIndex((p) => p?.type === "cancelled");
  const id = log[cancelledAt].id;
  // A ping round trip after the cancel: nothing of the stream arrives after `cancelled`.
  await page.evaluate(() => window.ringgatePage.agent.sendRaw({ type: "ping", id: "after" }));
  await page.waitForFunction(() => window.ringgatePage.log.some((l) => l.payload?.id === "after" && l.direction === "←"), {
    timeout: PATIENCE,
    polling: 50,
  });
  const after = (await page.evaluate(() => window.ringgatePage.log.map((l) => l.payload))).slice(cancelledAt + 1);
  assert.ok(!after.some((p) => p?.type === "stream_chunk" && p.id === id), JSON.stringify(after));
  assert.ok(!after.some((p) => p?.type === "stream_end" && p.id === id));
  const text = await page.$eval("#answer", (a) => a.textContent);
  assert.ok(text.startsWith("This is"), text);
  assert.ok(!text.includes("calculator tool works here too"), "the whole answer arrived: not cancelled");
  await page.close();
});
