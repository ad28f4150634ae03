/**
 * The Server-Sent Events transport (DESIGN.md §5.1): `GET /v1/sse` read as a stream with
 * `fetch` (so the token travels in a header, a refusal's JSON can be read, and it runs in
 * Node too), acks by `POST /v1/ack`, one at a time and coalesced.
 * @internal
 */
import type { Position } from './types.js';
import {
  type Connection,
  type ConnectParams,
  type Ended,
  type Handlers,
  type Transport,
  Watchdog,
  delivery,
  endpoint,
  query,
  refusal,
  resumeQuery,
} from './transport.js';

export const sse: Transport = {
  name: 'sse',
  available: ({ fetch }) => typeof fetch === 'function' && typeof ReadableStream === 'function' && typeof TextDecoder === 'function',
  connect(params, handlers) {
    return new SseConnection(params, handlers);
  },
};

/** One parsed event of the stream. */
interface SseEvent {
  event: string;
  data: string;
}

/**
 * Splits an event stream into events (the WHATWG rules this edge needs: `event:`, `data:`,
 * comments, blank-line dispatch, CR LF or LF line ends). `id:` and `retry:` are not needed:
 * the client resumes from the position it handled, and backs off by its own rules.
 */
export class EventStreamParser {
  #buffer = '';
  #event = '';
  #data: string[] = [];

  /** Feeds a chunk; returns the events it completed. */
  push(chunk: string): SseEvent[] {
    this.#buffer += chunk;
    const events: SseEvent[] = [];
    let start = 0;
    for (;;) {
      const nl = this.#buffer.indexOf('\n', start);
      if (nl < 0) break;
      let line = this.#buffer.slice(start, nl);
      start = nl + 1;
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (this.#data.length > 0) events.push({ event: this.#event || 'message', data: this.#data.join('\n') });
        this.#event = '';
        this.#data = [];
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') this.#event = value;
      else if (field === 'data') this.#data.push(value);
    }
    this.#buffer = this.#buffer.slice(start);
    return events;
  }

  /** Bytes held of an unfinished line (bounded by the caller). */
  get pending(): number {
    return this.#buffer.length;
  }
}

/** An unfinished line longer than this is not an event stream the edge would send. */
const MAX_LINE = 1 << 20;

class SseConnection implements Connection {
  readonly #params: ConnectParams;
  readonly #handlers: Handlers;
  readonly #abort = new AbortController();
  readonly #watchdog: Watchdog;
  #done = false;
  #open = false;
  #device: string | undefined;
  #epoch: string | undefined;
  #acked = 0;
  #wanted: Position | null = null;
  #acking = false;

  constructor(params: ConnectParams, handlers: Handlers) {
    this.#params = params;
    this.#handlers = handlers;
    this.#device = params.device;
    this.#watchdog = new Watchdog(() => this.#fail({ kind: 'network', message: 'no event from the edge in time' }));
    this.#watchdog.arm(params.connectTimeoutMs);
    if (params.resume.epoch !== undefined) {
      this.#epoch = params.resume.epoch;
      this.#acked = params.resume.after ?? 0;
    }
    void this.#run();
  }

  ack(position: Position): void {
    if (!this.#open) return;
    if (position.epoch === this.#epoch && position.seq <= this.#acked) return;
    this.#wanted = position;
    void this.#flush();
  }

  close(): void {
    this.#done = true;
    this.#watchdog.stop();
    this.#abort.abort();
  }

  async #run(): Promise<void> {
    const p = this.#params;
    const url = query(endpoint(p.base, '/v1/sse'), { device: p.device, ...resumeQuery(p.resume) });
    let response: Response;
    try {
      response = await p.fetch!(url.href, {
        headers: { Authorization: `Bearer ${p.token}`, Accept: 'text/event-stream' },
        signal: this.#abort.signal,
        cache: 'no-store',
      });
    } catch (e) {
      return this.#fail({ kind: 'network', message: `the SSE request failed: ${String(e)}` });
    }
    if (!response.ok) return this.#fail(await refusal(response));
    if (!response.body || !(response.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
      return this.#fail({ kind: 'network', message: 'the answer is not an event stream (a proxy in between?)' });
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new EventStreamParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (this.#done) return;
        if (done) return this.#fail({ kind: 'network', message: 'the event stream ended' });
        this.#watchdog.feed();
        for (const event of parser.push(value)) {
          this.#event(event);
          if (this.#done) return;
        }
        if (parser.pending > MAX_LINE) {
          return this.#fail({ kind: 'protocol', code: 'protocol_violation', message: 'an event stream line beyond 1 MiB' });
        }
      }
    } catch (e) {
      this.#fail({ kind: 'network', message: `the event stream broke: ${String(e)}` });
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  #event({ event, data }: SseEvent): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(data);
    } catch {
      return this.#fail({ kind: 'protocol', code: 'protocol_violation', message: `event ${event} is not JSON` });
    }
    switch (event) {
      case 'welcome': {
        if (this.#open) return;
        this.#open = true;
        this.#device = String(message.device ?? this.#device ?? '');
        const heartbeatMs = Number(message.heartbeat_ms) || 30000;
        this.#watchdog.arm(heartbeatMs + this.#params.heartbeatGraceMs);
        this.#handlers.opened({ device: this.#device, edge: String(message.edge ?? ''), heartbeatMs });
        return;
      }
      case 'reconnect': {
        const delay = Number(message.delay_ms);
        return this.#fail({ kind: 'drain', code: 'reconnect', message: 'edge draining', retryAfterMs: Number.isFinite(delay) ? delay : undefined });
      }
      case 'close': {
        const code = Number(message.code);
        const reason = String(message.reason ?? `closed with ${code}`);
        if (code === 4001) return this.#fail({ kind: 'replaced', code: '4001', message: reason });
        if (code === 1013) return this.#fail({ kind: 'retry', code: '1013', message: reason });
        return this.#fail({ kind: 'protocol', code: String(code), message: reason });
      }
      default: {
        const m = delivery(message);
        if (m) {
          if (m.type === 'reset' || m.epoch !== this.#epoch) {
            this.#epoch = m.epoch;
            this.#acked = 0;
          }
          this.#handlers.message(m);
        } else {
          this.#fail({ kind: 'protocol', code: 'protocol_violation', message: `unexpected event ${event}` });
        }
      }
    }
  }

  /** Sends the newest wanted ack; one request at a time, so acks coalesce while one is out. */
  async #flush(): Promise<void> {
    if (this.#acking) return;
    this.#acking = true;
    try {
      while (!this.#done && this.#wanted) {
        const position = this.#wanted;
        this.#wanted = null;
        if (position.epoch === this.#epoch && position.seq <= this.#acked) continue;
        const url = query(endpoint(this.#params.base, '/v1/ack'), { device: this.#device });
        try {
          const response = await this.#params.fetch!(url.href, {
            method: 'POST',
            headers: { Authorization: `Bearer ${this.#params.token}`, 'Content-Type': 'application/json' },
            body: JSON.stringify({ epoch: position.epoch, seq: position.seq }),
            signal: this.#abort.signal,
          });
          if (response.ok && position.epoch === this.#epoch) this.#acked = Math.max(this.#acked, position.seq);
          // A refused ack changes nothing: the next one, or the resume, carries the position.
          await response.body?.cancel().catch(() => {});
        } catch {
          // Lost with the connection: the resume position acknowledges it.
        }
      }
    } finally {
      this.#acking = false;
    }
  }

  #fail(ended: Ended): void {
    if (this.#done) return;
    this.#done = true;
    this.#watchdog.stop();
    this.#abort.abort();
    this.#handlers.closed(ended);
  }
}
