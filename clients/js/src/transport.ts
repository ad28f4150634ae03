/**
 * What the client's state machine needs of a transport, and what the three transports share:
 * URLs, refusals read from JSON error bodies, and the watchdog.
 * @internal
 */
import type { Notification, Position, Reset, TransportName, WebSocketConstructor } from './types.js';

/** A message of the edge that the state machine handles. */
export type Delivery = ({ type: 'notification' } & Notification) | ({ type: 'reset' } & Reset);

/** What `welcome` (or a poll's headers) told the client. */
export interface Welcome {
  device: string;
  edge: string;
  heartbeatMs: number;
}

/** How a connection ended, as the state machine needs to know it. */
export interface Ended {
  /**
   * `network`: it could not connect or was cut; `refused`: the edge answered an error
   * before any stream; `drain`: the edge is stopping (reconnect after `retryAfterMs`);
   * `replaced`: a newer connection of the device took its place (4001); `protocol`: a
   * close for a protocol violation; `retry`: the edge asked to come back later (1013, 429,
   * 503; `retryAfterMs` when it said how long).
   */
  kind: 'network' | 'refused' | 'drain' | 'replaced' | 'protocol' | 'retry';
  message: string;
  /** The edge's error code of a refusal, or the WebSocket close code as text. */
  code?: string;
  status?: number;
  retryAfterMs?: number;
}

/** Where the connection starts (DESIGN.md §1.5): `{epoch, after}`, `{after: 0}` or nothing. */
export interface Resume {
  epoch?: string;
  after?: number;
}

/** Everything a transport needs to open one connection. */
export interface ConnectParams {
  base: URL;
  token: string;
  device: string | undefined;
  resume: Resume;
  heartbeatGraceMs: number;
  connectTimeoutMs: number;
  pollWaitMs: number;
  pollLimit: number;
  fetch: typeof fetch | undefined;
  WebSocket: WebSocketConstructor | undefined;
  /** Resolves once every delivery handed over so far was handled, with the position then. */
  idle(): Promise<Position | null>;
}

/** The callbacks of one connection. After `closed`, none is called again. */
export interface Handlers {
  opened(welcome: Welcome): void;
  message(message: Delivery): void;
  closed(ended: Ended): void;
}

/** One open (or opening) connection. */
export interface Connection {
  /** Acknowledge everything up to `position` (cumulative; the transport coalesces). */
  ack(position: Position): void;
  /** Close it; `closed` is not called for a close the client asked for. */
  close(): void;
}

/** A transport: opens connections. `available` is false where the runtime lacks what it needs. */
export interface Transport {
  name: TransportName;
  available(params: Pick<ConnectParams, 'fetch' | 'WebSocket'>): boolean;
  connect(params: ConnectParams, handlers: Handlers): Connection;
}

/** `http(s)://host/prefix/v1/<endpoint>` (or `ws(s)://` for the WebSocket) of the base URL. */
export function endpoint(base: URL, path: string, websocket = false): URL {
  const url = new URL(base.href);
  const secure = url.protocol === 'https:' || url.protocol === 'wss:';
  url.protocol = websocket ? (secure ? 'wss:' : 'ws:') : secure ? 'https:' : 'http:';
  url.pathname = url.pathname.replace(/\/+$/, '').replace(/\/v1\/(ws|sse|poll)$/, '') + path;
  url.search = '';
  url.hash = '';
  return url;
}

/** The credentials and position of a request, in its query. */
export function query(url: URL, params: Record<string, string | number | undefined>): URL {
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined) url.searchParams.set(key, String(value));
  }
  return url;
}

/** `?epoch=&after=` of a resume. */
export function resumeQuery(resume: Resume): Record<string, string | number | undefined> {
  return { epoch: resume.epoch, after: resume.after };
}

/** Reads a refused answer (JSON `{"error":{"code","message"}}` with its status). */
export async function refusal(response: Response): Promise<Ended> {
  let code = `http_${response.status}`;
  let message = `the edge answered ${response.status}`;
  try {
    const body = (await response.json()) as { error?: { code?: unknown; message?: unknown } };
    if (typeof body?.error?.code === 'string') code = body.error.code;
    if (typeof body?.error?.message === 'string') message = body.error.message;
  } catch {
    // Not JSON (a proxy's page): the status says enough.
  }
  const retryAfter = Number(response.headers.get('retry-after'));
  const retryAfterMs = Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : undefined;
  const status = response.status;
  const kind = status === 429 || status === 503 ? 'retry' : status >= 500 ? 'network' : 'refused';
  return { kind, code, message, status, retryAfterMs };
}

/** The number of ms in a drain's close reason (`edge draining; reconnect in 1234 ms`). */
export function drainDelay(reason: string): number | undefined {
  const match = /(\d+)\s*ms/.exec(reason);
  return match ? Number(match[1]) : undefined;
}

/** Checks a message of the edge has the fields the state machine relies on. */
export function delivery(value: unknown): Delivery | null {
  if (typeof value !== 'object' || value === null) return null;
  const m = value as Record<string, unknown>;
  if (typeof m.epoch !== 'string' || m.epoch === '') return null;
  if (m.type === 'notification' && isSeq(m.seq) && m.seq >= 1) {
    return { type: 'notification', seq: m.seq, epoch: m.epoch, ts: Number(m.ts) || 0, payload: m.payload };
  }
  if (m.type === 'reset' && isSeq(m.first_seq) && m.first_seq >= 1) {
    return { type: 'reset', epoch: m.epoch, first_seq: m.first_seq, reason: String(m.reason ?? '') };
  }
  return null;
}

function isSeq(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value);
}

/** A timer restarted by every sign of life; fires once when there was none for `ms`. */
export class Watchdog {
  #timer: ReturnType<typeof setTimeout> | undefined;
  #ms = 0;
  constructor(private readonly fire: () => void) {}
  /** (Re)arms it for `ms`. */
  arm(ms: number): void {
    this.#ms = ms;
    this.feed();
  }
  /** A sign of life: starts the interval again. */
  feed(): void {
    if (this.#ms <= 0) return;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(this.fire, this.#ms);
  }
  stop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#ms = 0;
  }
}
