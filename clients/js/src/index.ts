/**
 * `@gapless/client`: notifications from a gapless edge, at least once and in order, resumed
 * exactly after any disconnect, over WebSocket, Server-Sent Events or long-polling.
 *
 * ```ts
 * import { GaplessClient } from '@gapless/client';
 * const client = new GaplessClient({ url: 'https://edge.example.com', token: () => getToken() });
 * client.on('notification', async (n) => show(n.payload));
 * client.start();
 * ```
 */
export { GaplessClient } from './client.js';
export type { Internals } from './client.js';
export { backoff } from './backoff.js';
export type {
  ConnectionState,
  GaplessError,
  GaplessEvents,
  GaplessOptions,
  Notification,
  Position,
  Reset,
  StateChange,
  StorageLike,
  TransportName,
  WebSocketConstructor,
} from './types.js';
