/**
 * The client's state machine (DESIGN.md §5.2): which transport to try, when to reconnect,
 * the position it resumes from, duplicates, gaps and resets, and when to ack. The
 * transports (`ws`, `sse`, `poll`) only move messages.
 */
import { backoff } from './backoff.js';
import { poll } from './poll.js';
import { sse } from './sse.js';
import type { Connection, Delivery, Ended, Resume, Transport, Welcome } from './transport.js';
import type {
  GaplessError,
  GaplessEvents,
  GaplessOptions,
  Notification,
  Position,
  Reset,
  StateChange,
  TransportName,
} from './types.js';
import { websocket } from './ws.js';

type Listener<K extends keyof GaplessEvents> = (event: GaplessEvents[K]) => unknown;
type Listeners = { [K in keyof GaplessEvents]: Set<Listener<K>> };

/** What was kept in `storage`. */
interface Stored {
  epoch?: string;
  seq?: number;
  device?: string;
}

/** The options with their defaults filled in. */
type Settings = Required<Omit<GaplessOptions, 'device' | 'storage' | 'WebSocket' | 'fetch'>> & GaplessOptions;

/** The transports and randomness the client uses: the unit tests pass fakes (not for applications). */
export interface Internals {
  transports?: Partial<Record<TransportName, Transport>>;
  random?: () => number;
}

const TRANSPORTS: Record<TransportName, Transport> = { websocket, sse, poll };

/** Deliveries handed over but not yet handled are bounded: past this the connection is dropped and resumed later. */
const MAX_QUEUE = 10_000;

/**
 * A gapless client. Create it, subscribe to its events, `start()` it. Each seq reaches the
 * `notification` handlers once, in order; the ack for it is sent after they returned (or
 * their promises resolved).
 */
export class GaplessClient {
  readonly #options: Settings;
  readonly #base: URL;
  readonly #transports: Transport[];
  readonly #random: () => number;
  readonly #listeners: Listeners = { notification: new Set(), reset: new Set(), state: new Set(), error: new Set() };

  /** The last position handled by the application. */
  #position: Position | null = null;
  /** The last position handed over (handled or queued): what a duplicate is judged by. */
  #received: Position | null = null;
  #device: string | undefined;
  /** A connection has been welcomed before: resume with `{after: 0}` even without a position. */
  #welcomed = false;

  #running = false;
  /** Increases with every connection and with `stop()`; callbacks of older ones are ignored. */
  #generation = 0;
  #connection: Connection | null = null;
  #connected = false;
  /** The highest seq the current connection delivered (duplicates too), in its epoch. */
  #sent: Position | null = null;
  #state: StateChange = { state: 'closed', transport: null };

  /** Index into `#transports` of the one in use or being tried. */
  #transport = 0;
  #transportFailures = 0;
  /** Consecutive failed connects, for the backoff. */
  #attempt = 0;
  #authFailures = 0;
  /** A try of the preferred transport from a fallback: where to go back when it fails. */
  #returnFrom: number | null = null;
  #returnDelay: number;

  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #returnTimer: ReturnType<typeof setTimeout> | undefined;
  #ackTimer: ReturnType<typeof setTimeout> | undefined;

  #queue: Delivery[] = [];
  #dispatching = false;
  /** The delivery whose handlers are running. */
  #inProgress: Position | null = null;
  #idleWaiters: Array<() => void> = [];

  constructor(options: GaplessOptions, internals: Internals = {}) {
    if (!options || typeof options.url !== 'string') throw new TypeError('GaplessClient: options.url is required');
    if (typeof options.token !== 'string' && typeof options.token !== 'function') {
      throw new TypeError('GaplessClient: options.token must be a string or a function');
    }
    this.#options = {
      transports: ['websocket', 'sse', 'poll'],
      storageKey: 'gapless:position',
      minReconnectDelayMs: 500,
      maxReconnectDelayMs: 20_000,
      transportAttempts: 2,
      returnToPreferredMs: 60_000,
      maxAuthFailures: 3,
      heartbeatGraceMs: 5_000,
      connectTimeoutMs: 10_000,
      ackDelayMs: 100,
      pollWaitMs: 25_000,
      pollLimit: 100,
      ...definedOnly(options),
    } as Settings;
    this.#base = new URL(options.url);
    const impls = { ...TRANSPORTS, ...internals.transports };
    const names = this.#options.transports;
    if (!Array.isArray(names) || names.length === 0 || names.some((n) => !(n in TRANSPORTS))) {
      throw new TypeError("GaplessClient: options.transports lists 'websocket', 'sse' and/or 'poll'");
    }
    this.#transports = names.map((n) => impls[n]);
    this.#random = internals.random ?? Math.random;
    this.#returnDelay = this.#options.returnToPreferredMs;
    this.#device = options.device;
  }

  /** The last position the application handled: `{epoch, seq}`, or `null` before any. */
  get position(): Position | null {
    return this.#position ? { ...this.#position } : null;
  }

  /** The current state, transport and edge. */
  get state(): StateChange {
    return { ...this.#state };
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof GaplessEvents>(event: K, listener: Listener<K>): () => void {
    const set = this.#listeners[event] as Set<Listener<K>> | undefined;
    if (!set) throw new TypeError(`GaplessClient: no event ${String(event)}`);
    set.add(listener);
    return () => this.off(event, listener);
  }

  off<K extends keyof GaplessEvents>(event: K, listener: Listener<K>): void {
    (this.#listeners[event] as Set<Listener<K>> | undefined)?.delete(listener);
  }

  /** Connects, and keeps connecting until `stop()`. */
  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#load();
    this.#received = this.#inProgress ?? this.#position;
    this.#transport = 0;
    this.#transportFailures = 0;
    this.#attempt = 0;
    this.#authFailures = 0;
    this.#returnFrom = null;
    this.#returnDelay = this.#options.returnToPreferredMs;
    void this.#connect();
  }

  /**
   * Closes the connection and cancels every timer and request. Deliveries not yet handled
   * are dropped (they were not acked; the next `start()` gets them again).
   */
  stop(): void {
    if (!this.#running) return;
    this.#running = false;
    this.#generation += 1;
    this.#dropConnection();
    this.#clearTimers();
    this.#queue = [];
    // What a handler is still busy with counts as handed over: it must not come again.
    this.#received = this.#inProgress ?? this.#position;
    this.#releaseIdle();
    this.#setState({ state: 'closed', transport: null });
  }

  // ---- connecting ----

  async #connect(): Promise<void> {
    const generation = ++this.#generation;
    this.#reconnectTimer = undefined;
    const transport = this.#pickTransport();
    if (!transport) {
      this.#fatal({ code: 'no_transport', message: 'none of the configured transports can run here (no WebSocket, no fetch)' });
      return;
    }
    this.#setState({ state: 'connecting', transport: transport.name });
    let token: string;
    try {
      const t = this.#options.token;
      token = typeof t === 'function' ? await t() : t;
      if (typeof token !== 'string' || token === '') throw new Error('token() gave no token');
    } catch (e) {
      if (generation !== this.#generation) return;
      this.#emit('error', { code: 'token_failed', message: `token() failed: ${errorText(e)}` });
      this.#retry(this.#nextDelay());
      return;
    }
    if (generation !== this.#generation || !this.#running) return;
    this.#sent = null;
    this.#connected = false;
    const resume = this.#resume();
    this.#connection = transport.connect(
      {
        base: this.#base,
        token,
        device: this.#device ?? (transport.name === 'poll' ? this.#inventDevice() : undefined),
        resume,
        heartbeatGraceMs: this.#options.heartbeatGraceMs,
        connectTimeoutMs: this.#options.connectTimeoutMs,
        pollWaitMs: Math.min(Math.max(this.#options.pollWaitMs, 0), 60_000),
        pollLimit: Math.min(Math.max(this.#options.pollLimit, 1), 1000),
        fetch: this.#fetch(),
        WebSocket: this.#webSocket(),
        idle: () => this.#idle(),
      },
      {
        opened: (welcome) => generation === this.#generation && this.#opened(welcome, transport, resume),
        message: (message) => generation === this.#generation && this.#message(message),
        closed: (ended) => generation === this.#generation && this.#closed(ended, transport),
      },
    );
  }

  /** The transport to try: the current one, skipping those this runtime cannot run. */
  #pickTransport(): Transport | null {
    const env = { fetch: this.#fetch(), WebSocket: this.#webSocket() };
    for (let i = 0; i < this.#transports.length; i++) {
      const index = (this.#transport + i) % this.#transports.length;
      const transport = this.#transports[index]!;
      if (transport.available(env)) {
        if (index !== this.#transport) {
          this.#transport = index;
          this.#transportFailures = 0;
        }
        return transport;
      }
    }
    return null;
  }

  /** Where to start: the handled position, else `{after: 0}` after a first welcome, else the edge's rules. */
  #resume(): Resume {
    if (this.#position) return { epoch: this.#position.epoch, after: this.#position.seq };
    if (this.#welcomed) return { after: 0 };
    return {};
  }

  #opened(welcome: Welcome, transport: Transport, resume: Resume): void {
    this.#connected = true;
    this.#welcomed = true;
    if (resume.epoch !== undefined) this.#sent = { epoch: resume.epoch, seq: resume.after ?? 0 };
    if (welcome.device && welcome.device !== this.#device) {
      this.#device = welcome.device;
      this.#save();
    }
    this.#attempt = 0;
    this.#transportFailures = 0;
    this.#authFailures = 0;
    this.#returnFrom = null;
    this.#setState({ state: 'connected', transport: transport.name, edge: welcome.edge, device: welcome.device });
    // On a fallback, try the preferred transport again later.
    const preferred = this.#firstAvailable();
    if (this.#transport === preferred) this.#returnDelay = this.#options.returnToPreferredMs;
    else if (preferred !== null) {
      clearTimeout(this.#returnTimer);
      this.#returnTimer = setTimeout(() => this.#tryPreferred(preferred), this.#returnDelay);
    }
    this.#scheduleAck();
  }

  #firstAvailable(): number | null {
    const env = { fetch: this.#fetch(), WebSocket: this.#webSocket() };
    const index = this.#transports.findIndex((t) => t.available(env));
    return index < 0 ? null : index;
  }

  #tryPreferred(preferred: number): void {
    this.#returnTimer = undefined;
    if (!this.#running || !this.#connected || this.#transport === preferred) return;
    this.#returnFrom = this.#transport;
    this.#dropConnection();
    this.#transport = preferred;
    this.#transportFailures = 0;
    void this.#connect();
  }

  #closed(ended: Ended, transport: Transport): void {
    const wasConnected = this.#connected;
    this.#connection = null;
    this.#connected = false;
    this.#sent = null;
    clearTimeout(this.#returnTimer);
    this.#returnTimer = undefined;
    clearTimeout(this.#ackTimer);
    this.#ackTimer = undefined;
    const error = (code: string): GaplessError => ({
      code: ended.code && ended.kind === 'refused' ? ended.code : code,
      message: ended.message,
      ...(ended.status !== undefined ? { status: ended.status } : {}),
      transport: transport.name,
    });
    switch (ended.kind) {
      case 'replaced':
        // The device is live elsewhere (another tab, another page): do not fight over it.
        this.#fatal(error('replaced'));
        return;
      case 'refused':
        return this.#refused(error(ended.code ?? 'refused'), ended);
      case 'drain':
        this.#setState({ state: 'disconnected', transport: transport.name });
        this.#attempt = 0;
        this.#retry(ended.retryAfterMs ?? this.#nextDelay());
        return;
      case 'retry':
        this.#setState({ state: 'disconnected', transport: transport.name });
        this.#retry(Math.max(ended.retryAfterMs ?? 0, this.#nextDelay()));
        return;
      case 'protocol':
        this.#emit('error', error(ended.code === 'protocol_violation' ? 'protocol_violation' : 'closed_by_edge'));
        this.#setState({ state: 'disconnected', transport: transport.name });
        this.#retry(this.#nextDelay());
        return;
      case 'network':
        this.#setState({ state: 'disconnected', transport: transport.name });
        if (!wasConnected) this.#transportFailed();
        this.#retry(this.#nextDelay());
        return;
    }
  }

  #refused(error: GaplessError, ended: Ended): void {
    this.#emit('error', error);
    if (ended.status === 401 || ended.status === 403) {
      // token() is called again on the next connect; a token that keeps being refused ends it.
      this.#authFailures += 1;
      if (this.#authFailures >= this.#options.maxAuthFailures) {
        this.#fatal({ code: error.code, message: `closed after ${this.#authFailures} refusals in a row: ${error.message}` });
        return;
      }
      this.#setState({ state: 'disconnected', transport: this.#state.transport });
      this.#retry(this.#authFailures === 1 ? 0 : this.#nextDelay());
      return;
    }
    if (ended.status === 409) {
      // The held position is beyond the log (storage from another deployment, or a log that
      // lost entries without a new epoch): start from the device's stored ack instead.
      this.#position = null;
      this.#received = null;
      this.#save();
      this.#setState({ state: 'disconnected', transport: this.#state.transport });
      this.#retry(this.#nextDelay());
      return;
    }
    // 400, 404, 413: the request itself is wrong, and repeating it will not help.
    this.#fatal(null);
  }

  /** A transport that could not connect: after `transportAttempts`, the next one. */
  #transportFailed(): void {
    if (this.#returnFrom !== null) {
      // The preferred one still does not work: back to the fallback, and wait longer next time.
      this.#transport = this.#returnFrom;
      this.#returnFrom = null;
      this.#transportFailures = 0;
      this.#returnDelay = Math.min(this.#returnDelay * 2, 16 * this.#options.returnToPreferredMs);
      this.#attempt = 0;
      return;
    }
    this.#transportFailures += 1;
    if (this.#transportFailures >= this.#options.transportAttempts && this.#transports.length > 1) {
      this.#transport = (this.#transport + 1) % this.#transports.length;
      this.#transportFailures = 0;
    }
  }

  #nextDelay(): number {
    this.#attempt += 1;
    return backoff(this.#options.minReconnectDelayMs, this.#options.maxReconnectDelayMs, this.#attempt, this.#random);
  }

  #retry(delayMs: number): void {
    if (!this.#running) return;
    clearTimeout(this.#reconnectTimer);
    this.#generation += 1;
    this.#reconnectTimer = setTimeout(() => void this.#connect(), Math.max(0, delayMs));
  }

  /** Ends in `closed`, after reporting `error` when given one. */
  #fatal(error: GaplessError | null): void {
    if (error) this.#emit('error', error);
    this.stop();
  }

  #dropConnection(): void {
    const connection = this.#connection;
    this.#connection = null;
    this.#connected = false;
    this.#sent = null;
    connection?.close();
  }

  #clearTimers(): void {
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#returnTimer);
    clearTimeout(this.#ackTimer);
    this.#reconnectTimer = this.#returnTimer = this.#ackTimer = undefined;
  }

  // ---- delivering ----

  #message(message: Delivery): void {
    this.#noteSent(message);
    const received = this.#received;
    if (message.type === 'reset') {
      // A reset that only says entries we already hold are gone changes nothing for us.
      const covered = received !== null && received.epoch === message.epoch && message.first_seq <= received.seq + 1;
      if (covered) return;
      this.#received = { epoch: message.epoch, seq: message.first_seq - 1 };
      this.#enqueue(message);
      return;
    }
    if (received && received.epoch === message.epoch) {
      if (message.seq <= received.seq) return; // a duplicate of what at-least-once resent
      if (message.seq !== received.seq + 1) {
        return this.#lost(`seq ${message.seq} follows ${received.seq}: ${message.seq - received.seq - 1} missing`);
      }
    } else if (received) {
      return this.#lost(`epoch changed to ${message.epoch} without a reset`);
    }
    this.#received = { epoch: message.epoch, seq: message.seq };
    this.#enqueue(message);
  }

  /** The edge broke its contract (a gap without a reset): never skip, resume from the position instead. */
  #lost(message: string): void {
    this.#emit('error', { code: 'gap', message, transport: this.#state.transport ?? undefined });
    this.#dropConnection();
    this.#setState({ state: 'disconnected', transport: this.#state.transport });
    this.#retry(this.#nextDelay());
  }

  #noteSent(message: Delivery): void {
    if (message.type === 'reset') {
      this.#sent = null;
      return;
    }
    const sent = this.#sent;
    if (!sent || sent.epoch !== message.epoch || message.seq > sent.seq) {
      this.#sent = { epoch: message.epoch, seq: message.seq };
      // A replay of what was handled on an earlier connection makes its ack sendable here.
      this.#scheduleAck();
    }
  }

  #enqueue(message: Delivery): void {
    if (this.#queue.length >= MAX_QUEUE) {
      // The application is far behind: stop taking more, resume from what it handled later.
      this.#received = this.#lastQueued();
      this.#dropConnection();
      this.#setState({ state: 'disconnected', transport: this.#state.transport });
      this.#retry(this.#nextDelay());
      return;
    }
    this.#queue.push(message);
    void this.#dispatch();
  }

  #lastQueued(): Position | null {
    const last = this.#queue[this.#queue.length - 1];
    if (!last) return this.#position;
    return last.type === 'reset' ? { epoch: last.epoch, seq: last.first_seq - 1 } : { epoch: last.epoch, seq: last.seq };
  }

  /** Hands queued deliveries to the application one at a time, in order. */
  async #dispatch(): Promise<void> {
    if (this.#dispatching) return;
    this.#dispatching = true;
    try {
      let item: Delivery | undefined;
      while ((item = this.#queue.shift()) !== undefined) {
        this.#inProgress = item.type === 'reset' ? { epoch: item.epoch, seq: item.first_seq - 1 } : { epoch: item.epoch, seq: item.seq };
        if (item.type === 'reset') {
          const reset: Reset = { epoch: item.epoch, first_seq: item.first_seq, reason: item.reason };
          await this.#handOver('reset', reset);
          this.#handled({ epoch: reset.epoch, seq: reset.first_seq - 1 });
        } else {
          const n: Notification = { seq: item.seq, epoch: item.epoch, ts: item.ts, payload: item.payload };
          await this.#handOver('notification', n);
          this.#handled({ epoch: n.epoch, seq: n.seq });
        }
      }
    } finally {
      this.#inProgress = null;
      this.#dispatching = false;
      if (this.#queue.length > 0) void this.#dispatch();
      else this.#releaseIdle();
    }
  }

  /** Calls every listener and waits for them; a failing one is reported, not retried. */
  async #handOver<K extends 'notification' | 'reset'>(event: K, value: GaplessEvents[K]): Promise<void> {
    const listeners = [...this.#listeners[event]] as Listener<K>[];
    const results = await Promise.allSettled(listeners.map(async (listener) => listener(value)));
    for (const result of results) {
      if (result.status === 'rejected') {
        this.#emit('error', { code: 'handler_failed', message: `a ${event} handler failed: ${errorText(result.reason)}` });
      }
    }
  }

  #handled(position: Position): void {
    this.#position = position;
    this.#save();
    this.#scheduleAck();
  }

  #scheduleAck(): void {
    if (this.#ackTimer !== undefined || !this.#connected) return;
    this.#ackTimer = setTimeout(() => {
      this.#ackTimer = undefined;
      this.#flushAck();
    }, this.#options.ackDelayMs);
  }

  /** Acks what was handled, but never beyond what this connection sent (the edge refuses that). */
  #flushAck(): void {
    const position = this.#position;
    const sent = this.#sent;
    const connection = this.#connection;
    if (!position || !sent || !connection || !this.#connected || sent.epoch !== position.epoch) return;
    const seq = Math.min(position.seq, sent.seq);
    // Below the position, the rest follows when the connection's replay reaches it.
    if (seq >= 1) connection.ack({ epoch: position.epoch, seq });
  }

  #idle(): Promise<Position | null> {
    if (!this.#dispatching && this.#queue.length === 0) return Promise.resolve(this.position);
    return new Promise((resolve) => this.#idleWaiters.push(() => resolve(this.position)));
  }

  #releaseIdle(): void {
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }

  // ---- storage, state, events ----

  #load(): void {
    const storage = this.#options.storage;
    if (!storage) return;
    try {
      const raw = storage.getItem(this.#options.storageKey);
      if (!raw) return;
      const stored = JSON.parse(raw) as Stored;
      if (typeof stored.epoch === 'string' && stored.epoch !== '' && Number.isSafeInteger(stored.seq) && (stored.seq ?? -1) >= 0) {
        this.#position = { epoch: stored.epoch, seq: stored.seq! };
      }
      if (this.#options.device === undefined && typeof stored.device === 'string' && stored.device !== '') {
        this.#device = stored.device;
      }
    } catch {
      // Unreadable storage (private mode, foreign content): start without it.
    }
  }

  #save(): void {
    const storage = this.#options.storage;
    if (!storage) return;
    const stored: Stored = { ...(this.#position ?? {}), ...(this.#device && this.#options.device === undefined ? { device: this.#device } : {}) };
    try {
      storage.setItem(this.#options.storageKey, JSON.stringify(stored));
    } catch {
      // A full or refusing storage: the position still lives in memory.
    }
  }

  #inventDevice(): string {
    const bytes = new Uint8Array(8);
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(this.#random() * 256);
    this.#device = `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
    this.#save();
    return this.#device;
  }

  #setState(next: StateChange): void {
    const same = next.state === this.#state.state && next.transport === this.#state.transport && next.edge === this.#state.edge;
    this.#state = next;
    if (!same) this.#emit('state', { ...next });
  }

  #emit<K extends keyof GaplessEvents>(event: K, value: GaplessEvents[K]): void {
    for (const listener of [...this.#listeners[event]] as Listener<K>[]) {
      try {
        const result = listener(value);
        if (result instanceof Promise) result.catch(rethrowLater);
      } catch (e) {
        rethrowLater(e);
      }
    }
  }

  #fetch(): typeof fetch | undefined {
    const f = this.#options.fetch ?? globalThis.fetch;
    return typeof f === 'function' ? f.bind(globalThis) : undefined;
  }

  #webSocket(): GaplessOptions['WebSocket'] {
    return this.#options.WebSocket ?? (globalThis as { WebSocket?: GaplessOptions['WebSocket'] }).WebSocket;
  }
}

/** A listener's error must not break the client; it is reported where uncaught errors go. */
function rethrowLater(error: unknown): void {
  setTimeout(() => {
    throw error;
  }, 0);
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function definedOnly<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}
