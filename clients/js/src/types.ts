/** The transports of the edge (DESIGN.md §5, §5.1), in the client's default order of preference. */
export type TransportName = 'websocket' | 'sse' | 'poll';

/** Where a device stands in its user's log: the last seq it processed in that epoch. */
export interface Position {
  epoch: string;
  seq: number;
}

/** One notification, as the edge delivers it. */
export interface Notification {
  seq: number;
  epoch: string;
  /** When the ingest accepted it, ms since the Unix epoch. */
  ts: number;
  payload: unknown;
}

/**
 * The edge could not serve the exact gap: entries were trimmed by retention
 * (`gap_trimmed`), or the log was lost or expired and began again (`epoch_changed`).
 * Delivery continues from `first_seq` of `epoch`.
 */
export interface Reset {
  epoch: string;
  first_seq: number;
  reason: 'gap_trimmed' | 'epoch_changed' | string;
}

/** The connection's lifecycle. */
export type ConnectionState = 'connecting' | 'connected' | 'disconnected' | 'closed';

/** A `state` event. */
export interface StateChange {
  state: ConnectionState;
  /** The transport in use or being tried; `null` once closed. */
  transport: TransportName | null;
  /** The edge the client is connected to (from `welcome` or the poll's headers). */
  edge?: string;
  /** The device the edge knows this client as. */
  device?: string;
}

/** An `error` event: a refusal, a protocol fault, a failing handler. */
export interface GaplessError {
  /**
   * The edge's error code (`unauthorized`, `too_many_connections`, `draining`, …) or the
   * client's own: `protocol_violation`, `gap`, `handler_failed`, `token_failed`, `replaced`,
   * `closed_by_edge`, `position_ahead`.
   */
  code: string;
  message: string;
  /** The HTTP status of a refused request. */
  status?: number;
  transport?: TransportName;
}

/** The part of the Web Storage API the client uses (`window.localStorage` fits). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem?(key: string): void;
}

/** A constructor of WebSockets (the browser's global, or e.g. the `ws` package's in Node). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocket;

/** Options of {@link GaplessClient}. Only `url` and `token` are required. */
export interface GaplessOptions {
  /** The edge's base URL, `http(s)://host[:port][/prefix]`; `ws(s)://` is derived from it. */
  url: string;
  /** The device's JWT, or a (sync or async) function returning it, called on every (re)connect. */
  token: string | (() => string | Promise<string>);
  /** The device id, when the token names none; else one the edge assigns (kept in `storage`). */
  device?: string;
  /** Transports in order of preference [default: `['websocket', 'sse', 'poll']`]. */
  transports?: TransportName[];
  /** Keeps `{epoch, seq}` (and an assigned device id) across page loads. */
  storage?: StorageLike;
  /** The key in `storage` [default: `'gapless:position'`]. */
  storageKey?: string;
  /** Lower bound of the reconnect backoff, ms [default: 500]. */
  minReconnectDelayMs?: number;
  /** Upper bound of the reconnect backoff, ms [default: 20000]. */
  maxReconnectDelayMs?: number;
  /** Failed connects on one transport before the next one is tried [default: 2]. */
  transportAttempts?: number;
  /** While on a fallback, try the preferred transport again after this long, ms (doubling after each failed return) [default: 60000]. */
  returnToPreferredMs?: number;
  /** Consecutive auth refusals (each after a fresh `token()`) before the client closes [default: 3]. */
  maxAuthFailures?: number;
  /** Silence beyond the edge's `heartbeat_ms` after which the connection counts as dead, ms [default: 5000]. */
  heartbeatGraceMs?: number;
  /** A connection that has not said `welcome` within this long has failed, ms [default: 10000]. */
  connectTimeoutMs?: number;
  /** Acks of handled notifications are gathered for this long and sent as one, ms [default: 100]. */
  ackDelayMs?: number;
  /** How long a long-poll is held by the edge, ms [default: 25000, at most 60000]. */
  pollWaitMs?: number;
  /** Most messages one long-poll answer carries [default: 100, at most 1000]. */
  pollLimit?: number;
  /** The WebSocket constructor [default: `globalThis.WebSocket`; none: the transport is skipped]. */
  WebSocket?: WebSocketConstructor;
  /** The fetch function [default: `globalThis.fetch`]. */
  fetch?: typeof fetch;
}

/** The events of {@link GaplessClient} and what their handlers receive. */
export interface GaplessEvents {
  notification: Notification;
  reset: Reset;
  state: StateChange;
  error: GaplessError;
}
