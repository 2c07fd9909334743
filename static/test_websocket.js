// The test page's script (static/test_websocket.html): a hand-driven client for /ws and
// /ws/agent on top of ringgate.js. `window.ringgatePage` exposes its state to browser tests.
import { RinggateClient, RinggateAgent } from "/static/ringgate.js";

const $ = (id) => document.getElementById(id);

const EXAMPLES = {
  "/ws": {
    subscribe: { action: "subscribe", topic: "demo", id: 1 },
    "subscribe (resume)": { action: "subscribe", topic: "demo", since: 0, epoch: "", id: 2 },
    unsubscribe: { action: "unsubscribe", topic: "demo", id: 3 },
    publish: { action: "publish", topic: "demo", type: "message", data: { text: "hello" }, id: 4 },
    presence: { action: "presence", topic: "demo", id: 5 },
    history: { action: "history", topic: "demo", since: 0, limit: 10, id: 6 },
    ping: { action: "ping", id: 7 },
  },
  "/ws/agent": {
    ping: { type: "ping", id: "p1" },
    agent_query: { type: "agent_query", query: "What is ringgate?", id: "q1" },
    streaming_query: { type: "streaming_query", query: "Tell me about rooms", id: "q2" },
    tool_call: { type: "tool_call", tool_name: "calculator", params: { expression: "123 + 456" }, id: "t1" },
    cancel: { type: "cancel", id: "q2" },
    "cancel all": { type: "cancel" },
  },
};

const page = {
  status: "closed",
  client: null,
  agent: null,
  stream: null,
  sent: 0,
  received: 0,
  log: [],
};
window.ringgatePage = page;

function endpoint() {
  return $("endpoint").value;
}

function defaultUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

function log(direction, payload) {
  const li = document.createElement("li");
  li.className = direction === "→" ? "out" : direction === "←" ? "in" : "sys";
  const text = typeof payload === "string" ? payload : JSON.stringify(payload);
  const at = new Date().toISOString().slice(11, 23);
  li.textContent = `${at} ${direction} ${text}`;
  page.log.push({ at, direction, payload });
  const ol = $("log");
  ol.appendChild(li);
  while (ol.children.length > 500) ol.removeChild(ol.firstChild);
  ol.scrollTop = ol.scrollHeight;
  if (direction === "→") page.sent += 1;
  if (direction === "←") page.received += 1;
  $("s-page").textContent = `${page.sent} / ${page.received}`;
}

function setStatus(s) {
  page.status = s;
  $("status").textContent = s;
  const dot = $("dot");
  dot.className = "dot " + (s.startsWith("fallback") ? "fallback" : s);
  $("transport").textContent = page.client?.transport ? `transport: ${page.client.transport}` : "";
  const connected = s !== "closed";
  $("connect").disabled = connected;
  $("disconnect").disabled = !connected;
}

function fillExamples() {
  const sel = $("example");
  sel.innerHTML = "";
  for (const name of Object.keys(EXAMPLES[endpoint()])) {
    const o = document.createElement("option");
    o.value = name;
    o.textContent = name;
    sel.appendChild(o);
  }
  showExample();
}

function showExample() {
  const ex = EXAMPLES[endpoint()][$("example").value];
  $("editor").value = JSON.stringify(ex, null, 2);
  $("editor-error").textContent = "";
}

function connect() {
  disconnect();
  const url = $("url").value;
  const token = $("token").value.trim() || undefined;
  if (endpoint() === "/ws") {
    const client = new RinggateClient(url, { token });
    page.client = client;
    client.on("status", (s) => {
      setStatus(s);
      log("•", `status: ${s}`);
    });
    client.on("raw", (msg, dir) => log(dir === "out" ? "→" : "←", msg));
  } else {
    connectAgent(url, token);
  }
}

function connectAgent(url, token) {
  const agent = new RinggateAgent(url, { token });
  page.agent = agent;
  setStatus("connecting");
  agent.on("message", (msg) => log("←", msg));
  agent.on("connected", (msg) => {
    log("←", msg);
    setStatus("open");
  });
  agent.on("closed", () => {
    if (page.agent === agent) setStatus("closed");
  });
  agent.connect().catch(() => setStatus("closed"));
  return agent;
}

function disconnect() {
  page.client?.close();
  page.client = null;
  page.agent?.close();
  page.agent = null;
  setStatus("closed");
}

function sendEditor() {
  let msg;
  try {
    msg = JSON.parse($("editor").value);
  } catch (e) {
    $("editor-error").textContent = `Not JSON: ${e.message}`;
    return;
  }
  $("editor-error").textContent = "";
  if (page.client) {
    if (!page.client.sendRaw(msg)) log("•", "not connected over WebSocket");
  } else if (page.agent) {
    page.agent.sendRaw(msg);
    log("→", msg);
  } else {
    $("editor-error").textContent = "Connect first.";
  }
}

/** The agent for quick actions: the page's own on /ws/agent, else one beside the rooms client. */
function quickAgent() {
  if (page.agent) return page.agent;
  const url = defaultUrl("/ws/agent");
  const agent = new RinggateAgent(url, { token: $("token").value.trim() || undefined });
  agent.on("message", (msg) => log("←", msg));
  page.agent = agent;
  return agent;
}

async function quick(action) {
  const topic = $("topic").value;
  try {
    if (action === "ping") {
      if (page.client) await page.client.ping();
      else quickAgent().sendRaw({ type: "ping", id: `p${Date.now()}` });
    } else if (action === "subscribe") {
      if (!page.client) return log("•", "subscribe needs /ws: connect to it first");
      await page.client.subscribe(topic, (msg) => log("•", `delivery on ${msg.topic}: seq ${msg.seq ?? "-"}`));
    } else if (action === "publish") {
      if (!page.client) return log("•", "publish needs /ws: connect to it first");
      await page.client.publish(topic, { text: "hello from the test page", at: Date.now() });
    } else if (action === "stream") {
      const agent = quickAgent();
      const stream = agent.stream($("query").value);
      page.stream = stream;
      $("answer").textContent = "";
      log("→", { type: "streaming_query", query: $("query").value, id: stream.id });
      for await (const chunk of stream) $("answer").textContent += chunk;
      log("•", `stream ${stream.id} ended`);
    } else if (action === "cancel") {
      if (page.stream) {
        log("→", { type: "cancel", id: page.stream.id });
        await page.stream.cancel();
      }
    }
  } catch (e) {
    log("•", `${action} failed: ${e.code || ""} ${e.message}`);
  }
}

async function refreshStats() {
  try {
    const u = new URL($("url").value || defaultUrl("/ws"));
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    u.pathname = "/ws/statistics";
    u.search = "";
    const r = await fetch(u);
    // /ws/statistics is part of the admin surface: a public listener answers 404.
    $("s-note").hidden = r.status !== 404;
    if (!r.ok) return;
    const s = await r.json();
    $("s-active").textContent = s.active_connections;
    $("s-total").textContent = s.total_connections;
    $("s-messages").textContent = s.total_messages;
    page.stats = s;
  } catch {
    // The server may be down; the next tick tries again.
  }
}

function init() {
  $("url").value = defaultUrl("/ws");
  fillExamples();
  $("endpoint").addEventListener("change", () => {
    $("url").value = defaultUrl(endpoint());
    fillExamples();
  });
  $("example").addEventListener("change", showExample);
  $("conn-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("disconnect").addEventListener("click", disconnect);
  $("send").addEventListener("click", sendEditor);
  $("clear").addEventListener("click", () => ($("log").innerHTML = ""));
  for (const a of ["ping", "subscribe", "publish", "stream", "cancel"]) {
    $(`q-${a}`).addEventListener("click", () => quick(a));
  }
  setStatus("closed");
  refreshStats();
  setInterval(refreshStats, 2000);
  const params = new URLSearchParams(location.search);
  if (params.has("connect")) connect();
}

init();
