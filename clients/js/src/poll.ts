/**
 * The long-polling transport (DESIGN.md §5.1): a loop of `GET /v1/poll`, each naming the
 * last seq the client handled (which acknowledges it). The first poll of a connection asks
 * for `wait_ms=0`, so the client knows at once that the edge answers; later polls are held
 * until a message is deliverable or `pollWaitMs` passed.
 * @internal
 */
import type { Position } from './types.js';
import {
  type Connection,
  type ConnectParams,
  type Ended,
  type Handlers,
  type Resume,
  type Transport,
  delivery,
  endpoint,
  query,
  refusal,
  resumeQuery,
} from './transport.js';

export const poll: Transport = {
  name: 'poll',
  available: ({ fetch }) => typeof fetch === 'function',
  connect(params, handlers) {
    return new PollConnection(params, handlers);
  },
};

class PollConnection implements Connection {
  readonly #params: ConnectParams;
  readonly #handlers: Handlers;
  readonly #abort = new AbortController();
  #done = false;

  constructor(params: ConnectParams, handlers: Handlers) {
    this.#params = params;
    this.#handlers = handlers;
    void this.#run();
  }

  /** Polls carry the position themselves. */
  ack(_position: Position): void {}

  close(): void {
    this.#done = true;
    this.#abort.abort();
  }

  async #run(): Promise<void> {
    const p = this.#params;
    let resume: Resume = p.resume;
    let device = p.device;
    let waitMs = 0;
    let open = false;
    while (!this.#done) {
      const url = query(endpoint(p.base, '/v1/poll'), {
        device,
        ...resumeQuery(resume),
        wait_ms: waitMs,
        limit: p.pollLimit,
      });
      // The edge answers within wait_ms; silence beyond it (and a grace) is a dead network.
      const timer = setTimeout(() => this.#fail({ kind: 'network', message: 'the poll was not answered in time' }), waitMs + Math.max(p.heartbeatGraceMs, open ? 0 : p.connectTimeoutMs));
      let messages: unknown;
      try {
        const response = await p.fetch!(url.href, {
          headers: { Authorization: `Bearer ${p.token}` },
          signal: this.#abort.signal,
          cache: 'no-store',
        });
        if (!response.ok) return this.#fail(await refusal(response));
        messages = await response.json();
        if (!open) {
          open = true;
          device = response.headers.get('gapless-device') ?? device;
          this.#handlers.opened({
            device: device ?? '',
            edge: response.headers.get('gapless-edge') ?? '',
            heartbeatMs: Number(response.headers.get('gapless-heartbeat-ms')) || 30000,
          });
        }
      } catch (e) {
        return this.#fail({ kind: 'network', message: `the poll failed: ${String(e)}` });
      } finally {
        clearTimeout(timer);
      }
      if (this.#done) return;
      if (!Array.isArray(messages)) {
        return this.#fail({ kind: 'protocol', code: 'protocol_violation', message: 'a poll answer that is not a JSON array' });
      }
      for (const value of messages) {
        const m = delivery(value);
        if (!m) return this.#fail({ kind: 'protocol', code: 'protocol_violation', message: 'a poll answer with an unknown message' });
        this.#handlers.message(m);
        if (this.#done) return;
      }
      // The next poll names what the application handled of this answer: wait for it.
      const handled = messages.length > 0 ? await p.idle() : null;
      if (this.#done) return;
      if (handled) resume = { epoch: handled.epoch, after: handled.seq };
      // Past the first answer, a device without a position says `after=0`: its stored
      // position, else the log's start. Naming nothing would fall back to the live end if
      // the stored position went missing meanwhile (expired, or lost with Redis), and skip
      // what was appended since the first poll.
      else if (resume.after === undefined) resume = { after: 0 };
      waitMs = p.pollWaitMs;
    }
  }

  #fail(ended: Ended): void {
    if (this.#done) return;
    this.#done = true;
    this.#abort.abort();
    this.#handlers.closed(ended);
  }
}
