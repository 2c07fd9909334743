// ringgate.js: the browser (and Node 20+) client for ringgate's rooms (`/ws`) and agent
// gateway (`/ws/agent`). An ES module without dependencies or build step; types in
// ringgate.d.ts; usage in docs/BROWSER.md.
//
// Guarantees: every subscription is restored after a reconnect with the last seen seq and
// epoch, so a handler sees each message once, in seq order, or is told that recovery was
// impossible (a `subscribed` object with `recovered: false`). Every transport reconnects the
// same way (backoff with full jitter, capped); after `fallbackAfter` failed attempts in a row
// on one the client moves to the next: WebSocket, Server-Sent Events (+ HTTP POST to publish),
// long-polling, and back to the first once all failed. While on a fallback it probes
// WebSocket in the background to move back.

const DEFAULTS = {
  token: undefined,
  // "protocol": the `bearer.<token>` subprotocol (kept out of URLs and logs); "query": ?token=
  tokenIn: "protocol",
  backoffBase: 500,
  backoffCap: 30000,
  requestTimeout: 10000,
  // Client pings while idle; a connection silent for twice this long is replaced.
  pingInterval: 25000,
  // Sends held while disconnected; beyond this the newest is refused (see queue policy).
  maxQueue: 100,
  // Failed attempts in a row on a transport before moving to the next (0: never move).
  fallbackAfter: 3,
  transports: ["ws", "sse", "poll"],
  // While on a fallback, how often to try WebSocket again.
  probeInterval: 30000,
  pollTimeout: 25,
  WebSocket: undefined,
  fetch: undefined,
  random: Math.random,
  // Browser hooks (online/offline, visibility, beforeunload); false in tests.
  browserEvents: true,
};

export const STATUSES = ["connecting", "open", "reconnecting", "fallback:sse", "fallback:poll", "closed"];

/** Full-jitter exponential backoff: a random delay in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt, base, cap, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** `a:S:E,b:S:E` with each part percent-encoded: the `since` of /sse and /poll. */
export function encodeCursor(entries) {
  return entries
    .filter(([, s]) => s.seq != null)
    .map(([t, s]) => [t, String(s.seq), s.epoch || ""].map(encodeURIComponent).join(":"))
    .join(",");
}

function httpBase(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = "";
  u.search = "";
  u.hash = "";
  return u.toString().replace(/\/$/, "");
}

/**
 * The `data` of each event of a `text/event-stream` body (a ReadableStream of bytes): lines
 * split on LF, CRLF or CR; `data:` lines joined with LF; a blank line ends an event; comments
 * and other fields are skipped.
 */
export async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let data = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.search(/\r\n|\r|\n/)) >= 0) {
        // A CR at the very end may be the first half of a CRLF: wait for the next bytes.
        if (buf[i] === "\r" && i === buf.length - 1) break;
        const line = buf.slice(0, i);
        buf = buf.slice(i + (buf.startsWith("\r\n", i) ? 2 : 1));
        if (line === "") {
          if (data !== null) yield data;
          data = null;
        } else if (line.startsWith("data:")) {
          const v = line.slice(line[5] === " " ? 6 : 5);
          data = data === null ? v : data + "\n" + v;
        }
      }
    }
  } finally {
    reader.releaseLock?.();
  }
}

class Emitter {
  constructor() {
    this._l = new Map();
  }
  on(ev, fn) {
    if (!this._l.has(ev)) this._l.set(ev, new Set());
    this._l.get(ev).add(fn);
    return () => this._l.get(ev)?.delete(fn);
  }
  off(ev, fn) {
    this._l.get(ev)?.delete(fn);
  }
  emit(ev, ...args) {
    for (const fn of [...(this._l.get(ev) || [])]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the client.
        if (typeof console !== "undefined") console.error(e);
      }
    }
  }
}

export class RinggateError extends Error {
  constructor(message, code, reply) {
    super(message);
    this.name = "RinggateError";
    this.code = code;
    this.reply = reply;
  }
}

export class RinggateClient extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    const g = globalThis;
    this._WS = this.options.WebSocket || g.WebSocket;
    this._fetch = this.options.fetch || (g.fetch && g.fetch.bind(g));
    this.base = httpBase(url);
    this.status = "closed";
    this.transport = null;
    this.subs = new Map();
    this._pending = new Map();
    this._queue = [];
    this._nextId = 1;
    this._attempt = 0;
    // Failed attempts in a row per transport (an attempt that opened resets its count).
    this._failures = { ws: 0, sse: 0, poll: 0 };
    this._closed = false;
    this._timers = new Set();
    this._conn = null;
    this._hooks = [];
    if (this.options.browserEvents) this._installBrowserHooks();
    // Next microtask: listeners added right after construction see `connecting`.
    queueMicrotask(() => this._connect());
  }

  // ---- public API ---------------------------------------------------------------------------

  /** Subscribes `handler` to `topic`; resolves with the `subscribed` reply. */
  subscribe(topic, handler, { since, epoch } = {}) {
    let sub = this.subs.get(topic);
    if (!sub) {
      sub = { topic, handler, seq: since ?? null, epoch: epoch ?? null, asked: since != null };
      this.subs.set(topic, sub);
    } else {
      sub.handler = handler;
    }
    return new Promise((resolve, reject) => {
      sub.waiters = sub.waiters || [];
      sub.waiters.push({ resolve, reject });
      this._subscribeOn(sub);
    });
  }

  /** Stops delivery for `topic`. */
  unsubscribe(topic) {
    const sub = this.subs.get(topic);
    if (!sub) return Promise.resolve();
    this.subs.delete(topic);
    for (const w of sub.waiters || []) w.reject(new RinggateError("unsubscribed", "unsubscribed"));
    if (this.transport === "ws" && this.status === "open") {
      return this._request({ action: "unsubscribe", topic }).catch(() => undefined);
    }
    if (this.transport === "sse") this._restartSse();
    return Promise.resolve();
  }

  /** Publishes `data`; resolves with the ack (`{seq}`). Queued while disconnected. */
  publish(topic, data, { type } = {}) {
    const msg = { action: "publish", topic, data };
    if (type) msg.type = type;
    return this._send(msg);
  }

  presence(topic) {
    if (this.transport !== "ws") return this._get(`/presence?topic=${encodeURIComponent(topic)}`);
    return this._send({ action: "presence", topic });
  }

  history(topic, { since = 0, limit } = {}) {
    if (this.transport !== "ws") {
      let q = `/history?topic=${encodeURIComponent(topic)}&since=${since}`;
      if (limit != null) q += `&limit=${limit}`;
      return this._get(q);
    }
    const msg = { action: "history", topic, since };
    if (limit != null) msg.limit = limit;
    return this._send(msg);
  }

  ping() {
    if (this.transport !== "ws") return Promise.resolve({ type: "pong" });
    return this._send({ action: "ping" });
  }

  /** Closes for good: nothing reconnects, pending promises are rejected. */
  close() {
    if (this._closed) return;
    this._closed = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    for (const h of this._hooks) h();
    this._hooks = [];
    this._teardown(1000);
    this._failPending(new RinggateError("client closed", "closed"));
    for (const q of this._queue) q.reject(new RinggateError("client closed", "closed"));
    this._queue = [];
    this._setStatus("closed");
  }

  /** An agent-gateway client on `/ws/agent` of the same server. */
  agent(options = {}) {
    const u = new URL(this.url);
    u.pathname = u.pathname.replace(/\/ws\/?$/, "") + "/ws/agent";
    return new RinggateAgent(u.toString(), { ...this.options, ...options });
  }

  // ---- connection management ----------------------------------------------------------------

  _setStatus(s) {
    if (this.status === s) return;
    this.status = s;
    this.emit("status", s);
  }

  _timer(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimer(t) {
    if (t == null) return;
    clearTimeout(t);
    this._timers.delete(t);
  }

  _wsUrl() {
    const o = this.options;
    if (o.token && o.tokenIn === "query") {
      const u = new URL(this.url);
      u.searchParams.set("token", o.token);
      return [u.toString(), undefined];
    }
    return [this.url, o.token ? [`bearer.${o.token}`] : undefined];
  }

  _connect() {
    if (this._closed || this._conn) return;
    const next = this._pickTransport();
    if (!next) return this._setStatus("closed");
    if (next !== "ws") return this._startFallback(next);
    this._setStatus(this._everOpen ? "reconnecting" : "connecting");
    this._openWs(false);
  }

  /** The first allowed transport that has not failed `fallbackAfter` times in a row. When all
   * have, the server itself is likely away (not one transport blocked): counts start over. */
  _pickTransport() {
    const o = this.options;
    const usable = o.transports.filter((t) => this._usable(t));
    if (usable.length === 0) return null;
    if (!(o.fallbackAfter > 0)) return usable[0];
    const next = usable.find((t) => this._failures[t] < o.fallbackAfter);
    if (next) return next;
    for (const t of usable) this._failures[t] = 0;
    return usable[0];
  }

  _usable(t) {
    if (t === "ws") return !!this._WS;
    return (t === "sse" || t === "poll") && !!this._fetch;
  }

  /** A transport opened: its failure count and the backoff start over. */
  _opened(kind) {
    this._everOpen = true;
    this._failures[kind] = 0;
    this._attempt = 0;
    this._clearTimer(this._retry);
  }

  /** Opens a WebSocket; `probe`: only to see whether WebSocket works again. */
  _openWs(probe) {
    const [url, protocols] = this._wsUrl();
    let ws;
    try {
      ws = protocols ? new this._WS(url, protocols) : new this._WS(url);
    } catch (e) {
      if (!probe) this._failed("ws");
      return;
    }
    let opened = false;
    const conn = { kind: "ws", ws, lastSeen: Date.now(), pingTimer: null };
    ws.onopen = () => {
      opened = true;
      if (probe) {
        // WebSocket works again: leave the fallback.
        this._teardown(1000);
      }
      this._conn = conn;
      this.transport = "ws";
      this._opened("ws");
      this._clearTimer(this._probe);
      this._probe = null;
      this._watchdog(conn);
    };
    ws.onmessage = (ev) => {
      conn.lastSeen = Date.now();
      if (this._conn !== conn) return;
      let msg;
      try {
        msg = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return;
      }
      this._onMessage(msg);
    };
    ws.onclose = () => {
      this._clearTimer(conn.pingTimer);
      if (this._conn === conn) {
        this._conn = null;
        this._connectionLost();
      } else if (!opened && !probe) {
        this._failed("ws");
      } else if (!opened && probe) {
        this._scheduleProbe();
      }
    };
    ws.onerror = () => {};
    if (!probe) this._pendingWs = conn;
  }

  /** An attempt on `kind` failed before it opened. */
  _failed(kind) {
    this._failures[kind] += 1;
    this._scheduleReconnect();
  }

  /** A connection that had opened (any transport) is gone: reconnect, resuming every topic. */
  _connectionLost() {
    this._failPending(new RinggateError("connection lost", "disconnected"));
    for (const sub of this.subs.values()) sub.active = false;
    if (this._closed) return;
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._closed) return;
    this._setStatus("reconnecting");
    if (this._offline) return; // 'online' reconnects
    const o = this.options;
    const delay = backoffDelay(this._attempt++, o.backoffBase, o.backoffCap, o.random);
    this._clearTimer(this._retry);
    this._retry = this._timer(() => this._connect(), delay);
  }

  /** Pings while idle; a connection silent for two intervals is dead (half-open TCP). */
  _watchdog(conn) {
    const every = this.options.pingInterval;
    if (!every) return;
    const tick = () => {
      if (this._conn !== conn) return;
      const silent = Date.now() - conn.lastSeen;
      if (silent >= 2 * every) {
        try {
          conn.ws.close(4000, "heartbeat timeout");
        } catch {}
        this._conn = null;
        this._connectionLost();
        return;
      }
      if (silent >= every) this._raw({ action: "ping" });
      conn.pingTimer = this._timer(tick, every / 2);
    };
    conn.pingTimer = this._timer(tick, every / 2);
  }

  _onOpen() {
    this._setStatus(this.transport === "ws" ? "open" : `fallback:${this.transport}`);
    for (const sub of this.subs.values()) this._subscribeOn(sub);
    const queued = this._queue;
    this._queue = [];
    for (const q of queued) this._dispatch(q);
  }

  _teardown(code) {
    const c = this._conn;
    this._conn = null;
    if (!c) return;
    this._clearTimer(c.pingTimer);
    if (c.kind === "ws") {
      try {
        c.ws.close(code);
      } catch {}
    } else {
      c.stopped = true;
      c.abort?.abort();
    }
  }

  _failPending(err) {
    for (const [, p] of this._pending) {
      this._clearTimer(p.timer);
      p.reject(err);
    }
    this._pending.clear();
  }

  // ---- requests -----------------------------------------------------------------------------

  /** Sends `msg` as it is over the WebSocket (no id, no promise); false when not on one. */
  sendRaw(msg) {
    return this._raw(msg);
  }

  _raw(msg) {
    const c = this._conn;
    if (!c || c.kind !== "ws") return false;
    try {
      c.ws.send(JSON.stringify(msg));
      this.emit("raw", msg, "out");
      return true;
    } catch {
      return false;
    }
  }

  /** A request with an id, settled by the reply with that id or the timeout. */
  _request(msg) {
    return new Promise((resolve, reject) => this._dispatch({ msg, resolve, reject }));
  }

  _dispatch(q) {
    if (this.transport !== "ws" || !this._conn) {
      if (this._conn && this.transport !== "ws") return this._dispatchHttp(q);
      return this._enqueue(q);
    }
    const id = this._nextId++;
    const timer = this._timer(() => {
      this._pending.delete(id);
      q.reject(new RinggateError("request timed out", "timeout"));
    }, this.options.requestTimeout);
    this._pending.set(id, { resolve: q.resolve, reject: q.reject, timer });
    if (!this._raw({ ...q.msg, id })) {
      this._pending.delete(id);
      this._clearTimer(timer);
      this._enqueue(q);
    }
  }

  /** Queue policy: held in order while disconnected, sent on reconnect; when `maxQueue` are
   * held the new request is refused at once (`queue_full`) so memory stays bounded and the
   * caller knows. */
  _enqueue(q) {
    if (this._closed) return q.reject(new RinggateError("client closed", "closed"));
    if (this._queue.length >= this.options.maxQueue) {
      return q.reject(new RinggateError("send queue is full", "queue_full"));
    }
    this._queue.push(q);
  }

  _send(msg) {
    return this._request(msg);
  }

  async _dispatchHttp(q) {
    const m = q.msg;
    try {
      if (m.action === "publish") {
        const body = { topic: m.topic, data: m.data };
        if (m.type) body.type = m.type;
        const r = await this._http("/publish", { method: "POST", body: JSON.stringify(body) });
        q.resolve({ type: "ack", seq: r.seq });
      } else if (m.action === "presence") {
        q.resolve(await this.presence(m.topic));
      } else if (m.action === "history") {
        q.resolve(await this.history(m.topic, m));
      } else {
        q.resolve({ type: "pong" });
      }
    } catch (e) {
      q.reject(e);
    }
  }

  async _http(path, init = {}) {
    const headers = { "content-type": "application/json" };
    if (this.options.token) headers.authorization = `Bearer ${this.options.token}`;
    const ctl = typeof AbortController !== "undefined" ? new AbortController() : null;
    const t = ctl ? this._timer(() => ctl.abort(), this.options.requestTimeout) : null;
    try {
      const r = await this._fetch(this.base + path, { ...init, headers, signal: ctl?.signal });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new RinggateError(body.error || `HTTP ${r.status}`, body.code || "http", body);
      return body;
    } finally {
      this._clearTimer(t);
    }
  }

  _get(path) {
    return this._http(path, { method: "GET" });
  }

  // ---- subscriptions and delivery -----------------------------------------------------------

  _subscribeOn(sub) {
    if (!this._conn) return;
    if (this.transport === "ws") {
      const msg = { action: "subscribe", topic: sub.topic };
      if (sub.seq != null) {
        msg.since = sub.seq;
        if (sub.epoch) msg.epoch = sub.epoch;
      }
      // Settled synchronously with the reply, before any message that follows it.
      this._dispatch({
        msg,
        resolve: (reply) => this._subscribed(sub, reply),
        reject: (err) => {
          // A lost connection re-subscribes on reconnect; a refusal is final.
          if (err.code === "disconnected" || err.code === "timeout" || err.code === "queue_full") return;
          this.subs.delete(sub.topic);
          for (const w of sub.waiters || []) w.reject(err);
          sub.waiters = [];
        },
      });
    } else if (this.transport === "sse") {
      this._restartSse();
    } else if (this.transport === "poll") {
      this._restartPoll();
    }
  }

  /** A `subscribed` reply (any transport). */
  _subscribed(sub, reply) {
    if (this.subs.get(sub.topic) !== sub) return;
    const asked = reply.recovered !== undefined;
    if (!asked || reply.recovered === false || sub.seq == null) {
      // No replay: live messages start after the topic's current seq.
      sub.seq = reply.seq;
    }
    sub.epoch = reply.epoch;
    sub.active = true;
    if (reply.recovered === false) sub.handler({ ...reply });
    for (const w of sub.waiters || []) w.resolve(reply);
    sub.waiters = [];
  }

  _onMessage(msg) {
    this.emit("raw", msg, "in");
    if (msg.id != null && this._pending.has(msg.id)) {
      const p = this._pending.get(msg.id);
      this._pending.delete(msg.id);
      this._clearTimer(p.timer);
      if (msg.type === "error") p.reject(new RinggateError(msg.error, msg.code, msg));
      else p.resolve(msg);
      return;
    }
    switch (msg.type) {
      case "connected":
        this.connectionId = msg.connection_id;
        this._onOpen();
        return;
      case "subscribed": {
        // Fallback transports announce each topic this way.
        const sub = this.subs.get(msg.topic);
        if (sub) this._subscribed(sub, msg);
        return;
      }
      case "pong":
      case "ack":
      case "error":
      case "unsubscribed":
        this.emit("message", msg);
        return;
      default:
        this._deliver(msg);
    }
  }

  _deliver(msg) {
    const sub = msg.topic != null ? this.subs.get(msg.topic) : null;
    if (!sub) {
      this.emit("message", msg);
      return;
    }
    if (typeof msg.seq === "number") {
      // Replays overlap live traffic at transport changes: each seq is handed over once.
      if (sub.seq != null && msg.seq <= sub.seq) return;
      sub.seq = msg.seq;
    }
    sub.handler(msg);
  }

  // ---- fallbacks ----------------------------------------------------------------------------

  _startFallback(kind) {
    this.transport = kind;
    if (kind === "sse") this._openSse();
    else this._openPoll();
    this._scheduleProbe();
  }

  _scheduleProbe() {
    if (this._closed || !this.options.probeInterval || !this._usable("ws") || !this.options.transports.includes("ws")) return;
    if (this._probe != null) return; // one pending probe, whatever reconnects meanwhile
    this._probe = this._timer(() => {
      this._probe = null;
      if (this._closed || this.transport === "ws") return;
      // Between attempts the reconnect loop tries WebSocket itself when its turn comes.
      if (!this._conn) return this._scheduleProbe();
      this._openWs(true);
    }, this.options.probeInterval);
  }

  _topicsQuery() {
    const entries = [...this.subs.entries()];
    let q = "topics=" + entries.map(([t]) => encodeURIComponent(t)).join(",");
    const since = encodeCursor(entries.map(([t, s]) => [t, s]));
    if (since) q += "&since=" + since;
    return q;
  }

  _restartSse() {
    // Only a running stream: between attempts the next one carries the new topic list.
    if (this._conn?.kind !== "sse") return;
    this._teardown();
    this._openSse();
  }

  // SSE is read with fetch rather than EventSource: fetch can send the token as an
  // `Authorization` header (EventSource cannot send headers, and servers take `?token=` only
  // with `query_token`), and it runs in Node without a polyfill. A stream that drops after it
  // opened is reopened after a backoff from the cursors of the messages seen, as EventSource
  // would with `Last-Event-ID`; one that fails to open is retried as any transport is.
  _openSse() {
    const conn = { kind: "sse", opened: false, abort: typeof AbortController !== "undefined" ? new AbortController() : null };
    this._conn = conn;
    if (this.subs.size === 0) {
      // Nothing to stream: idle on this transport until a subscribe.
      this._sseOpened(conn);
      return;
    }
    const headers = { accept: "text/event-stream" };
    if (this.options.token) headers.authorization = `Bearer ${this.options.token}`;
    (async () => {
      let r;
      try {
        r = await this._fetch(`${this.base}/sse?${this._topicsQuery()}`, { headers, signal: conn.abort?.signal });
        if (!r.ok || !r.body) throw new RinggateError(`HTTP ${r.status}`, "http");
      } catch {
        if (this._conn === conn) this._sseEnded(conn);
        return;
      }
      if (this._conn !== conn) return;
      this._sseOpened(conn);
      try {
        for await (const data of sseData(r.body)) {
          if (this._conn !== conn) return;
          let msg;
          try {
            msg = JSON.parse(data);
          } catch {
            continue;
          }
          this._onMessage(msg);
        }
      } catch {}
      if (this._conn === conn) this._sseEnded(conn);
    })();
  }

  _sseOpened(conn) {
    conn.opened = true;
    this._opened("sse");
    this._setStatus("fallback:sse");
    const queued = this._queue;
    this._queue = [];
    for (const q of queued) this._dispatch(q);
  }

  /** The stream failed to open, or ended: reconnect as after any transport's failure. */
  _sseEnded(conn) {
    this._teardown();
    if (conn.opened) this._connectionLost();
    else this._failed("sse");
  }

  _restartPoll() {
    const c = this._conn;
    if (c && c.kind === "poll") {
      // The running request carries the old topic list: end it and start over.
      this._teardown();
      c.wake?.();
      this._openPoll();
    }
  }

  // Each poll is a request of its own: the first that succeeds opens the transport, and a
  // failed one ends it, to be reconnected as any transport is.
  _openPoll() {
    const conn = { kind: "poll", stopped: false, opened: false, abort: null };
    this._conn = conn;
    this._setStatus("fallback:poll");
    const queued = this._queue;
    this._queue = [];
    for (const q of queued) this._dispatch(q);
    const loop = async () => {
      while (!conn.stopped && this._conn === conn) {
        if (this.subs.size === 0) {
          await new Promise((r) => (conn.wake = r));
          continue;
        }
        conn.abort = typeof AbortController !== "undefined" ? new AbortController() : null;
        try {
          const url = `${this.base}/poll?${this._topicsQuery()}&timeout=${this.options.pollTimeout}`;
          // fetch can send the token as a header (servers accept ?token= only with query_token).
          const headers = this.options.token ? { authorization: `Bearer ${this.options.token}` } : {};
          const r = await this._fetch(url, { headers, signal: conn.abort?.signal });
          const body = await r.json();
          if (!r.ok) throw new RinggateError(body.error || `HTTP ${r.status}`, body.code || "http", body);
          if (conn.stopped || this._conn !== conn) return;
          if (!conn.opened) {
            conn.opened = true;
            this._opened("poll");
          }
          for (const m of body.messages || []) this._onMessage(m);
        } catch (e) {
          if (conn.stopped || this._conn !== conn) return;
          this._teardown();
          if (conn.opened) this._connectionLost();
          else this._failed("poll");
          return;
        }
      }
    };
    loop();
  }

  // ---- browser awareness --------------------------------------------------------------------

  _installBrowserHooks() {
    const w = typeof window !== "undefined" ? window : null;
    const d = typeof document !== "undefined" ? document : null;
    const add = (target, ev, fn) => {
      if (!target?.addEventListener) return;
      target.addEventListener(ev, fn);
      this._hooks.push(() => target.removeEventListener(ev, fn));
    };
    add(w, "online", () => {
      this._offline = false;
      this._attempt = 0;
      if (!this._conn) {
        this._clearTimer(this._retry);
        this._connect();
      }
    });
    add(w, "offline", () => {
      this._offline = true;
    });
    add(d, "visibilitychange", () => {
      // A tab coming back may have slept through its timers: reconnect now, not after backoff.
      if (d.visibilityState === "visible" && !this._conn && !this._closed) {
        this._clearTimer(this._retry);
        this._connect();
      }
    });
    add(w, "beforeunload", () => this.close());
  }
}

/** `/ws/agent`: queries, streams, tool calls and cancel over one WebSocket. */
export class RinggateAgent extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this._WS = this.options.WebSocket || globalThis.WebSocket;
    this._pending = new Map();
    this._nextId = 1;
    this._ready = null;
  }

  /** Opens the connection now (otherwise the first request does); resolves on `connected`. */
  connect() {
    return this._open();
  }

  /** Sends `msg` unchanged (the connection must be open). */
  sendRaw(msg) {
    this.ws?.send(JSON.stringify(msg));
  }

  _open() {
    if (this._ready) return this._ready;
    this._ready = new Promise((resolve, reject) => {
      const o = this.options;
      let url = this.url;
      let protocols;
      if (o.token && o.tokenIn === "query") {
        const u = new URL(url);
        u.searchParams.set("token", o.token);
        url = u.toString();
      } else if (o.token) protocols = [`bearer.${o.token}`];
      const ws = protocols ? new this._WS(url, protocols) : new this._WS(url);
      this.ws = ws;
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          return;
        }
        if (msg.type === "connected") {
          this.demo = msg.demo === true;
          this.emit("connected", msg);
          resolve(this);
          return;
        }
        this.emit("message", msg);
        const key = msg.id ?? (msg.type === "cancelled" ? "__all" : null);
        const p = key != null ? this._pending.get(key) : null;
        if (p) p(msg);
      };
      ws.onclose = () => {
        this._ready = null;
        this.emit("closed");
        reject(new RinggateError("agent connection closed", "disconnected"));
        for (const [, p] of this._pending) p({ type: "error", code: "disconnected", error: "agent connection closed" });
        this._pending.clear();
      };
      ws.onerror = () => {};
    });
    return this._ready;
  }

  async _call(msg, until) {
    await this._open();
    const id = msg.id ?? `a${this._nextId++}`;
    return new Promise((resolve, reject) => {
      this._pending.set(id, (m) => {
        if (m.type === "error" || m.type === "cancelled") {
          this._pending.delete(id);
          reject(new RinggateError(m.error || m.type, m.code || m.type, m));
        } else if (m.type === until) {
          this._pending.delete(id);
          resolve(m);
        }
      });
      this.ws.send(JSON.stringify({ ...msg, id }));
    });
  }

  /** `agent_query` → the `agent_response`. */
  query(query, { sessionId } = {}) {
    const m = { type: "agent_query", query };
    if (sessionId) m.session_id = sessionId;
    return this._call(m, "agent_response");
  }

  /** `tool_call` → the `tool_result`'s `result`. */
  async tool(toolName, params = {}) {
    const r = await this._call({ type: "tool_call", tool_name: toolName, params }, "tool_result");
    return r.result;
  }

  /** `streaming_query` → an async iterator of chunk texts, with `id` and `cancel()`. */
  stream(query, { sessionId } = {}) {
    const id = `s${this._nextId++}`;
    const chunks = [];
    let wake = null;
    let done = false;
    let failure = null;
    const push = () => {
      wake?.();
      wake = null;
    };
    const started = this._open().then(() => {
      this._pending.set(id, (m) => {
        if (m.type === "stream_chunk") chunks.push(m.content);
        else if (m.type === "stream_end" || m.type === "cancelled") done = true;
        else if (m.type === "error") failure = new RinggateError(m.error, m.code, m);
        else return;
        if (done || failure) this._pending.delete(id);
        push();
      });
      const msg = { type: "streaming_query", query, id };
      if (sessionId) msg.session_id = sessionId;
      this.ws.send(JSON.stringify(msg));
    });
    const agent = this;
    return {
      id,
      cancel: () => agent.cancel(id),
      async *[Symbol.asyncIterator]() {
        await started;
        for (;;) {
          if (chunks.length) {
            yield chunks.shift();
            continue;
          }
          if (failure) throw failure;
          if (done) return;
          await new Promise((r) => (wake = r));
        }
      },
    };
  }

  /** `cancel` (one request by id, or all); resolves on `cancelled`. */
  async cancel(id) {
    await this._open();
    const cid = id ?? null;
    return new Promise((resolve) => {
      const key = cid ?? "__all";
      const prev = this._pending.get(cid);
      const handler = (m) => {
        prev?.(m);
        if (m.type === "cancelled") {
          if (cid == null) this._pending.delete(key);
          resolve(m);
        }
      };
      if (cid == null) this._pending.set(key, handler);
      else this._pending.set(cid, handler);
      const msg = { type: "cancel" };
      if (cid != null) msg.id = cid;
      this.ws.send(JSON.stringify(msg));
    });
  }

  close() {
    this.ws?.close(1000);
    this._ready = null;
  }
}

export default RinggateClient;
