/**
 * The WebSocket transport (DESIGN.md §5): `GET /v1/ws` with the `gapless.v1.json`
 * subprotocol; the edge says `welcome`, the client answers `resume`, then notifications,
 * resets and pings arrive as text frames and acks and pongs go back.
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
  drainDelay,
  endpoint,
  query,
  refusal,
} from './transport.js';

const SUBPROTOCOL = 'gapless.v1.json';

export const websocket: Transport = {
  name: 'websocket',
  available: ({ WebSocket }) => typeof WebSocket === 'function',
  connect(params, handlers) {
    return new WsConnection(params, handlers);
  },
};

class WsConnection implements Connection {
  readonly #params: ConnectParams;
  readonly #handlers: Handlers;
  readonly #socket: WebSocket | null = null;
  readonly #watchdog: Watchdog;
  #open = false;
  #done = false;
  #acked = 0;

  constructor(params: ConnectParams, handlers: Handlers) {
    this.#params = params;
    this.#handlers = handlers;
    this.#watchdog = new Watchdog(() => this.#fail({ kind: 'network', message: 'no frame from the edge in time' }));
    const Ws = params.WebSocket;
    if (!Ws) {
      queueMicrotask(() => this.#end({ kind: 'network', message: 'no WebSocket in this runtime' }));
      return;
    }
    const url = query(endpoint(params.base, '/v1/ws', true), { token: params.token, device: params.device });
    let socket: WebSocket;
    try {
      socket = new Ws(url.href, SUBPROTOCOL);
    } catch (e) {
      queueMicrotask(() => this.#end({ kind: 'network', message: `cannot open a WebSocket: ${String(e)}` }));
      return;
    }
    this.#socket = socket;
    this.#watchdog.arm(params.connectTimeoutMs);
    socket.onmessage = (event) => this.#frame(event.data);
    socket.onclose = (event) => this.#closed(event.code, event.reason);
    // An error is followed by a close; the close says what happened.
    socket.onerror = () => {};
  }

  ack(position: Position): void {
    if (!this.#open || position.seq <= this.#acked) return;
    this.#acked = position.seq;
    this.#send({ type: 'ack', seq: position.seq });
  }

  close(): void {
    this.#done = true;
    this.#watchdog.stop();
    this.#detach();
  }

  #frame(data: unknown): void {
    if (this.#done) return;
    this.#watchdog.feed();
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(String(data));
    } catch {
      this.#fail({ kind: 'protocol', code: 'protocol_violation', message: 'the edge sent a frame that is not JSON' });
      return;
    }
    switch (message.type) {
      case 'welcome': {
        if (this.#open) return;
        this.#open = true;
        const heartbeatMs = Number(message.heartbeat_ms) || 30000;
        this.#watchdog.arm(heartbeatMs + this.#params.heartbeatGraceMs);
        const resume = this.#params.resume;
        if (resume.epoch !== undefined) this.#acked = resume.after ?? 0;
        this.#send({ type: 'resume', ...resume });
        this.#handlers.opened({ device: String(message.device ?? ''), edge: String(message.edge ?? ''), heartbeatMs });
        return;
      }
      case 'ping':
        this.#send({ type: 'pong' });
        return;
      default: {
        const m = delivery(message);
        if (m) this.#handlers.message(m);
        else this.#fail({ kind: 'protocol', code: 'protocol_violation', message: `unexpected frame ${String(data).slice(0, 200)}` });
      }
    }
  }

  #send(message: object): void {
    const socket = this.#socket;
    if (socket && socket.readyState === 1) socket.send(JSON.stringify(message));
  }

  #closed(code: number, reason: string): void {
    if (this.#done) return;
    if (code === 1012) {
      this.#end({ kind: 'drain', code: '1012', message: reason || 'edge draining', retryAfterMs: drainDelay(reason) });
    } else if (code === 4001) {
      this.#end({ kind: 'replaced', code: '4001', message: reason || 'replaced by a newer connection of this device' });
    } else if (code === 1013) {
      this.#end({ kind: 'retry', code: '1013', message: reason || 'try again later' });
    } else if ([1002, 1003, 1007, 1008, 1009].includes(code)) {
      this.#end({ kind: 'protocol', code: String(code), message: reason || `closed with ${code}` });
    } else if (!this.#open) {
      // The handshake failed: a browser says only 1006. Ask the same URL over plain HTTP
      // for the edge's JSON refusal (401, 429, 503, …); anything else is the network.
      void this.#diagnose();
    } else {
      this.#end({ kind: 'network', code: String(code), message: reason || `connection closed (${code})` });
    }
  }

  async #diagnose(): Promise<void> {
    const network: Ended = { kind: 'network', message: 'the WebSocket could not connect' };
    const fetchFn = this.#params.fetch;
    if (!fetchFn) return this.#end(network);
    const url = query(endpoint(this.#params.base, '/v1/ws'), { token: this.#params.token, device: this.#params.device });
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 5000);
    try {
      const response = await fetchFn(url.href, { signal: abort.signal, cache: 'no-store' });
      const ended = await refusal(response);
      // A refusal of the credentials or of the request itself; a 400 for the missing
      // upgrade headers means the credentials passed and something between broke the socket.
      const refused = ended.kind !== 'network' && ended.code !== 'not_a_websocket_upgrade' && response.status !== 426;
      this.#end(refused ? ended : network);
    } catch {
      this.#end(network);
    } finally {
      clearTimeout(timer);
    }
  }

  #fail(ended: Ended): void {
    if (this.#done) return;
    this.#end(ended);
    this.#detach();
  }

  #end(ended: Ended): void {
    if (this.#done) return;
    this.#done = true;
    this.#watchdog.stop();
    this.#handlers.closed(ended);
  }

  #detach(): void {
    const socket = this.#socket;
    if (!socket) return;
    socket.onmessage = null;
    socket.onclose = null;
    socket.onerror = null;
    try {
      socket.close(1000);
    } catch {
      // Already closing.
    }
  }
}
