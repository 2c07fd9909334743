// Types for ringgate.js (docs/BROWSER.md).

export type Status = "connecting" | "open" | "reconnecting" | "fallback:sse" | "fallback:poll" | "closed";
export type Transport = "ws" | "sse" | "poll";

export interface ClientOptions {
  /** JWT when the server has `[auth]`. */
  token?: string;
  /** How the token travels on WebSocket: `bearer.<token>` subprotocol (default) or `?token=`. */
  tokenIn?: "protocol" | "query";
  /** Backoff: full jitter in [0, min(backoffCap, backoffBase * 2^attempt)) ms. */
  backoffBase?: number;
  backoffCap?: number;
  /** Milliseconds before a request's promise rejects with code `timeout`. */
  requestTimeout?: number;
  /** Client ping period while idle (ms); silence for two periods replaces the connection. 0: off. */
  pingInterval?: number;
  /** Requests held while disconnected; more are refused with code `queue_full`. */
  maxQueue?: number;
  /** Failed attempts in a row on a transport before moving to the next; 0: never. Default 3. */
  fallbackAfter?: number;
  /** Transports in order of preference. */
  transports?: Transport[];
  /** While on a fallback, ms between WebSocket probes; 0: never move back. */
  probeInterval?: number;
  /** Seconds a long-poll waits on the server. */
  pollTimeout?: number;
  WebSocket?: unknown;
  fetch?: typeof fetch;
  random?: () => number;
  /** React to online/offline, page visibility and beforeunload (browsers). Default true. */
  browserEvents?: boolean;
}

/** A room message as `/ws` delivers it, or (with `recovered: false`) the `subscribed` reply
 * telling that history could not be replayed. */
export interface Delivery {
  type: string;
  topic: string;
  seq?: number;
  data?: unknown;
  from?: string;
  timestamp?: number;
  epoch?: string;
  recovered?: boolean;
  client_id?: string;
  user?: string;
  [key: string]: unknown;
}

export interface Subscribed {
  type: "subscribed";
  topic: string;
  seq: number;
  epoch: string;
  recovered?: boolean;
}

export declare class RinggateError extends Error {
  code: string;
  reply?: unknown;
}

/** The `data` of each event of a `text/event-stream` body. */
export declare function sseData(body: ReadableStream<Uint8Array>): AsyncGenerator<string>;
export declare function backoffDelay(attempt: number, base: number, cap: number, random?: () => number): number;

export declare class RinggateClient {
  constructor(url: string, options?: ClientOptions);
  readonly status: Status;
  readonly transport: Transport | null;
  connectionId?: string;
  subscribe(topic: string, handler: (msg: Delivery) => void, opts?: { since?: number; epoch?: string }): Promise<Subscribed>;
  unsubscribe(topic: string): Promise<unknown>;
  publish(topic: string, data: unknown, opts?: { type?: string }): Promise<{ type: "ack"; seq: number }>;
  presence(topic: string): Promise<{ topic: string; members: { client_id: string; user: string; joined_at: number }[] }>;
  history(topic: string, opts?: { since?: number; limit?: number }): Promise<{ topic: string; epoch: string; messages: Delivery[] }>;
  ping(): Promise<unknown>;
  on(event: "status", fn: (status: Status) => void): () => void;
  on(event: "message", fn: (msg: Delivery) => void): () => void;
  /** Every message in either direction on the WebSocket, or received on a fallback. */
  on(event: "raw", fn: (msg: any, direction: "in" | "out") => void): () => void;
  /** Sends `msg` unchanged on the WebSocket; false when not on one. */
  sendRaw(msg: unknown): boolean;
  off(event: string, fn: (...args: any[]) => void): void;
  close(): void;
  agent(options?: ClientOptions): RinggateAgent;
}

export interface AgentStream extends AsyncIterable<string> {
  id: string;
  cancel(): Promise<unknown>;
}

export declare class RinggateAgent {
  constructor(url: string, options?: ClientOptions);
  /** True when the server answers from its built-in demo agent. */
  demo?: boolean;
  query(query: string, opts?: { sessionId?: string }): Promise<{ type: "agent_response"; content: string; vendor?: string }>;
  stream(query: string, opts?: { sessionId?: string }): AgentStream;
  tool(toolName: string, params?: Record<string, unknown>): Promise<unknown>;
  cancel(id?: string): Promise<unknown>;
  connect(): Promise<RinggateAgent>;
  sendRaw(msg: unknown): void;
  on(event: "message" | "connected" | "closed", fn: (msg: any) => void): () => void;
  close(): void;
}

export default RinggateClient;
