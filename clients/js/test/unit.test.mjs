// Unit tests of the client's state machine (position, duplicates, acks, backoff, resets,
// transport choice) with a scripted transport in place of the network. The transports
// themselves meet real edges in e2e.test.mjs.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { GaplessClient, backoff } from '../dist/index.js';

/** A transport the test drives: each connect is recorded with its params and handlers. */
function fakeTransport(name, { available = true } = {}) {
  const t = {
    name,
    connects: [],
    available: () => (typeof available === 'function' ? available() : available),
    connect(params, handlers) {
      const conn = {
        params,
        handlers,
        acks: [],
        closed: false,
        ack(position) {
          conn.acks.push({ ...position, sentMax: conn.sentMax });
        },
        close() {
          conn.closed = true;
        },
        sentMax: 0,
        open(welcome = {}) {
          handlers.opened({ device: 'dev-1', edge: 'edge-a', heartbeatMs: 30000, ...welcome });
        },
        deliver(epoch, ...seqs) {
          for (const seq of seqs) {
            conn.sentMax = Math.max(conn.sentMax, seq);
            handlers.message({ type: 'notification', epoch, seq, ts: 1, payload: { n: seq } });
          }
        },
        reset(epoch, first_seq, reason = 'gap_trimmed') {
          handlers.message({ type: 'reset', epoch, first_seq, reason });
        },
        end(ended) {
          handlers.closed(ended);
        },
      };
      t.connects.push(conn);
      return conn;
    },
  };
  return t;
}

function setup(options = {}, transports = {}) {
  const ws = transports.websocket ?? fakeTransport('websocket');
  const sse = transports.sse ?? fakeTransport('sse');
  const poll = transports.poll ?? fakeTransport('poll');
  const tokens = [];
  const client = new GaplessClient(
    {
      url: 'http://127.0.0.1:9',
      token: () => {
        tokens.push(tokens.length + 1);
        return `token-${tokens.length}`;
      },
      minReconnectDelayMs: 1,
      maxReconnectDelayMs: 5,
      ackDelayMs: 5,
      ...options,
    },
    { transports: { websocket: ws, sse, poll }, random: options.random },
  );
  const seen = { notes: [], resets: [], states: [], errors: [], order: [] };
  client.on('notification', (n) => {
    seen.notes.push(n.seq);
    seen.order.push(`n${n.seq}`);
  });
  client.on('reset', (r) => {
    seen.resets.push(r);
    seen.order.push(`r${r.first_seq}`);
  });
  client.on('state', (s) => seen.states.push(s));
  client.on('error', (e) => seen.errors.push(e));
  return { client, ws, sse, poll, seen, tokens };
}

async function until(check, what, ms = 2000) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

const network = { kind: 'network', message: 'cut' };

test('the position resumes the next connection and duplicates after it are dropped', async () => {
  const { client, ws, seen } = setup();
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  assert.deepEqual(ws.connects[0].params.resume, {}, 'a first connect names no position');
  ws.connects[0].open();
  ws.connects[0].deliver('E', 1, 2, 3);
  await until(() => seen.notes.length === 3, 'three notifications');
  assert.deepEqual(client.position, { epoch: 'E', seq: 3 });
  ws.connects[0].end(network);
  await until(() => ws.connects.length === 2, 'a reconnect');
  assert.deepEqual(ws.connects[1].params.resume, { epoch: 'E', after: 3 });
  ws.connects[1].open();
  ws.connects[1].deliver('E', 2, 3, 4, 4, 5);
  await until(() => seen.notes.length === 5, 'five notifications');
  await sleep(20);
  assert.deepEqual(seen.notes, [1, 2, 3, 4, 5], 'each seq once, in order');
  client.stop();
});

test('after a welcome without any notification, a reconnect resumes with after: 0', async () => {
  const { client, ws } = setup();
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  ws.connects[0].end(network);
  await until(() => ws.connects.length === 2, 'a reconnect');
  assert.deepEqual(ws.connects[1].params.resume, { after: 0 });
  assert.equal(ws.connects[1].params.device, 'dev-1', 'the device the edge assigned is named again');
  client.stop();
});

test('acks are cumulative, coalesced, sent only after the handler resolved, never beyond what the connection sent', async () => {
  const ws = fakeTransport('websocket');
  const { client, seen } = setup({ ackDelayMs: 20 }, { websocket: ws });
  let release;
  const gate = new Promise((r) => (release = r));
  client.on('notification', async (n) => {
    if (n.seq === 1) await gate;
  });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  const c1 = ws.connects[0];
  c1.open();
  c1.deliver('E', 1, 2, 3, 4, 5);
  await sleep(60);
  assert.deepEqual(c1.acks, [], 'nothing is acked while the first handler is pending');
  // The connection drops while the handler still holds seq 1; the next one replays.
  c1.end(network);
  await until(() => ws.connects.length === 2, 'a reconnect');
  const c2 = ws.connects[1];
  assert.deepEqual(c2.params.resume, { after: 0 }, 'nothing handled yet: no position');
  c2.open();
  release();
  await until(() => seen.notes.length === 5, 'the queued five');
  await sleep(60);
  assert.deepEqual(c2.acks, [], 'c2 sent nothing yet: acking 5 on it would be beyond what it sent');
  c2.deliver('E', 1, 2, 3);
  await until(() => c2.acks.length > 0, 'an ack');
  for (const a of c2.acks) assert.ok(a.seq <= a.sentMax, `ack ${a.seq} beyond sent ${a.sentMax}`);
  c2.deliver('E', 4, 5, 6, 7, 8, 9, 10);
  await until(() => c2.acks.at(-1)?.seq === 10, 'the ack of 10');
  assert.ok(c2.acks.length <= 4, `acks coalesce: ${JSON.stringify(c2.acks)}`);
  assert.deepEqual(seen.notes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  client.stop();
});

test('a reset is handed over before the notifications it concerns and moves the position', async () => {
  const { client, ws, seen } = setup();
  let resetDone = false;
  client.on('reset', async () => {
    await sleep(30);
    resetDone = true;
  });
  client.on('notification', (n) => {
    if (n.seq >= 10) assert.ok(resetDone, 'notification 10 waited for the reset handler');
  });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  const c = ws.connects[0];
  c.open();
  c.deliver('E', 1, 2, 3);
  c.reset('E', 10, 'gap_trimmed');
  c.deliver('E', 10, 11);
  await until(() => seen.notes.length === 5, 'five');
  assert.deepEqual(seen.order, ['n1', 'n2', 'n3', 'r10', 'n10', 'n11']);
  assert.deepEqual(seen.resets[0], { epoch: 'E', first_seq: 10, reason: 'gap_trimmed' });
  // A new epoch: seqs start again.
  c.reset('F', 1, 'epoch_changed');
  c.deliver('F', 1, 2);
  await until(() => seen.notes.length === 7, 'seven');
  assert.deepEqual(client.position, { epoch: 'F', seq: 2 });
  assert.deepEqual(seen.order.slice(-3), ['r1', 'n1', 'n2']);
  client.stop();
});

test('a reset covering only entries already held is not surfaced', async () => {
  const { client, ws, seen } = setup();
  let release;
  const gate = new Promise((r) => (release = r));
  client.on('notification', async (n) => {
    if (n.seq === 1) await gate;
  });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  ws.connects[0].deliver('E', 1, 2, 3, 4);
  ws.connects[0].end(network);
  await until(() => ws.connects.length === 2, 'a reconnect');
  // The edge trimmed up to 3 meanwhile, but the client holds 1..4 already.
  ws.connects[1].open();
  ws.connects[1].reset('E', 3);
  ws.connects[1].deliver('E', 3, 4, 5);
  release();
  await until(() => seen.notes.length === 5, 'five');
  assert.deepEqual(seen.resets, []);
  assert.deepEqual(seen.notes, [1, 2, 3, 4, 5]);
  client.stop();
});

test('a gap without a reset is never skipped: error, then resume from the position', async () => {
  const { client, ws, seen } = setup();
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  ws.connects[0].deliver('E', 1, 3);
  await until(() => ws.connects.length === 2, 'a reconnect');
  assert.equal(seen.errors[0].code, 'gap');
  assert.ok(ws.connects[0].closed);
  assert.deepEqual(ws.connects[1].params.resume, { epoch: 'E', after: 1 });
  ws.connects[1].open();
  ws.connects[1].deliver('E', 2, 3);
  await until(() => seen.notes.length === 3, 'three');
  assert.deepEqual(seen.notes, [1, 2, 3]);
  client.stop();
});

test('full-jitter backoff stays within [0, min(max, min * 2^n)]', () => {
  assert.equal(backoff(500, 20000, 1, () => 0), 0);
  assert.equal(backoff(500, 20000, 1, () => 0.999999), 1000);
  assert.equal(backoff(500, 20000, 3, () => 0.999999), 4000);
  assert.equal(backoff(500, 20000, 10, () => 0.999999), 20000);
  assert.equal(backoff(500, 20000, 1000, () => 0.999999), 20000);
  for (let attempt = 0; attempt < 40; attempt++) {
    const d = backoff(100, 2000, attempt);
    assert.ok(d >= 0 && d <= Math.min(2000, 100 * 2 ** attempt), `${attempt}: ${d}`);
  }
});

test('reconnect delays follow the backoff and reset after a welcome', async () => {
  // random() = 1: each delay is its bound (min 20, max 80): 40, 80, 80, then after a welcome 40.
  const { client, ws } = setup({ minReconnectDelayMs: 20, maxReconnectDelayMs: 80, random: () => 0.999999, transportAttempts: 100 });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  const gaps = [];
  for (let i = 1; i <= 3; i++) {
    const t0 = Date.now();
    ws.connects[i - 1].end(network);
    await until(() => ws.connects.length === i + 1, 'a reconnect');
    gaps.push(Date.now() - t0);
  }
  ws.connects[3].open();
  const t0 = Date.now();
  ws.connects[3].end(network);
  await until(() => ws.connects.length === 5, 'a reconnect');
  gaps.push(Date.now() - t0);
  const bounds = [40, 80, 80, 40];
  gaps.forEach((g, i) => assert.ok(g >= bounds[i] - 2 && g < bounds[i] + 60, `delay ${i}: ${g} ms, bound ${bounds[i]}`));
  client.stop();
});

test('an auth refusal calls token() again; repeated refusals end in error and closed', async () => {
  const { client, ws, seen, tokens } = setup({ maxAuthFailures: 3 });
  client.start();
  for (let i = 1; i <= 3; i++) {
    await until(() => ws.connects.length === i, `connect ${i}`);
    assert.equal(ws.connects[i - 1].params.token, `token-${i}`, 'a fresh token for each connect');
    ws.connects[i - 1].end({ kind: 'refused', status: 401, code: 'unauthorized', message: 'invalid token' });
  }
  await until(() => seen.states.at(-1)?.state === 'closed', 'closed');
  assert.equal(tokens.length, 3);
  assert.ok(seen.errors.length >= 3 && seen.errors.every((e) => e.code === 'unauthorized'), JSON.stringify(seen.errors));
  await sleep(30);
  assert.equal(ws.connects.length, 3, 'no connect after closed');
});

test('a transport that cannot connect is given up for the next; the preferred one is tried again later', async () => {
  const { client, ws, sse, seen } = setup({ transportAttempts: 2, returnToPreferredMs: 40 });
  client.start();
  await until(() => ws.connects.length === 1, 'ws 1');
  ws.connects[0].end(network);
  await until(() => ws.connects.length === 2, 'ws 2');
  ws.connects[1].end(network);
  await until(() => sse.connects.length === 1, 'sse');
  sse.connects[0].open();
  sse.connects[0].deliver('E', 1, 2);
  await until(() => seen.notes.length === 2, 'two over sse');
  // After returnToPreferredMs it tries the WebSocket again, from the position held.
  await until(() => ws.connects.length === 3, 'a return to ws');
  assert.ok(sse.connects[0].closed, 'the fallback connection was closed for the return');
  assert.deepEqual(ws.connects[2].params.resume, { epoch: 'E', after: 2 });
  // Still broken: straight back to SSE, and the next return waits longer.
  ws.connects[2].end(network);
  await until(() => sse.connects.length === 2, 'back on sse');
  const t0 = Date.now();
  sse.connects[1].open();
  await until(() => ws.connects.length === 4, 'a second return', 3000);
  assert.ok(Date.now() - t0 >= 70, 'the second return waited twice as long');
  ws.connects[3].open();
  ws.connects[3].deliver('E', 2, 3);
  await until(() => seen.notes.length === 3, 'three');
  assert.deepEqual(seen.notes, [1, 2, 3]);
  assert.equal(seen.states.at(-1).transport, 'websocket');
  client.stop();
});

test('a transport this runtime lacks is skipped at once', async () => {
  const ws = fakeTransport('websocket', { available: false });
  const { client, sse } = setup({}, { websocket: ws });
  client.start();
  await until(() => sse.connects.length === 1, 'sse');
  assert.equal(ws.connects.length, 0);
  client.stop();
});

test('a drain waits the delay the edge hints, then reconnects', async () => {
  const { client, ws } = setup({ minReconnectDelayMs: 1, maxReconnectDelayMs: 2 });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  const t0 = Date.now();
  ws.connects[0].end({ kind: 'drain', message: 'edge draining; reconnect in 120 ms', retryAfterMs: 120 });
  await until(() => ws.connects.length === 2, 'a reconnect');
  assert.ok(Date.now() - t0 >= 118, `waited ${Date.now() - t0} ms`);
  client.stop();
});

test('a connection replaced by a newer one of the device closes the client', async () => {
  const { client, ws, seen } = setup();
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  ws.connects[0].end({ kind: 'replaced', code: '4001', message: 'replaced' });
  await until(() => seen.states.at(-1)?.state === 'closed', 'closed');
  assert.equal(seen.errors.at(-1).code, 'replaced');
  await sleep(20);
  assert.equal(ws.connects.length, 1);
});

test('storage keeps the position (and an assigned device) across instances', async () => {
  const map = new Map();
  const storage = { getItem: (k) => map.get(k) ?? null, setItem: (k, v) => map.set(k, v) };
  const first = setup({ storage });
  first.client.start();
  await until(() => first.ws.connects.length === 1, 'a connect');
  first.ws.connects[0].open({ device: 'assigned-7' });
  first.ws.connects[0].deliver('E', 1, 2);
  await until(() => first.seen.notes.length === 2, 'two');
  first.client.stop();
  assert.deepEqual(JSON.parse(map.get('gapless:position')), { epoch: 'E', seq: 2, device: 'assigned-7' });

  const second = setup({ storage });
  second.client.start();
  await until(() => second.ws.connects.length === 1, 'a connect');
  assert.deepEqual(second.ws.connects[0].params.resume, { epoch: 'E', after: 2 });
  assert.equal(second.ws.connects[0].params.device, 'assigned-7');
  second.ws.connects[0].open({ device: 'assigned-7' });
  second.ws.connects[0].deliver('E', 2, 3);
  await until(() => second.seen.notes.length === 1, 'one');
  assert.deepEqual(second.seen.notes, [3], 'the duplicate of 2 is not handed over');
  second.client.stop();
});

test('stop() during a backoff wait cancels the reconnect and closes the connection', async () => {
  const { client, ws, seen } = setup({ minReconnectDelayMs: 50, maxReconnectDelayMs: 50, random: () => 0.999999 });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  ws.connects[0].end(network);
  client.stop();
  await sleep(150);
  assert.equal(ws.connects.length, 1);
  assert.equal(seen.states.at(-1).state, 'closed');
  // And a connection open at stop() is closed.
  client.start();
  await until(() => ws.connects.length === 2, 'a connect');
  client.stop();
  assert.ok(ws.connects[1].closed);
});

test('stop() while a handler runs: that seq is not handed over again after start()', async () => {
  const { client, ws, seen } = setup();
  let release;
  const gate = new Promise((r) => (release = r));
  client.on('notification', async (n) => {
    if (n.seq === 2) await gate;
  });
  client.start();
  await until(() => ws.connects.length === 1, 'a connect');
  ws.connects[0].open();
  ws.connects[0].deliver('E', 1, 2, 3);
  await until(() => seen.notes.length === 2, 'two');
  client.stop();
  client.start();
  await until(() => ws.connects.length === 2, 'a reconnect');
  assert.deepEqual(ws.connects[1].params.resume, { epoch: 'E', after: 1 });
  ws.connects[1].open();
  ws.connects[1].deliver('E', 2, 3);
  release();
  await until(() => seen.notes.length === 3, 'three');
  await sleep(20);
  assert.deepEqual(seen.notes, [1, 2, 3]);
  client.stop();
});

test('long-poll asks for a device; a client without one invents and keeps it', async () => {
  const { client, poll } = setup({ transports: ['poll'] });
  client.start();
  await until(() => poll.connects.length === 1, 'a poll connect');
  assert.match(poll.connects[0].params.device, /^web-[0-9a-f]{16}$/);
  const device = poll.connects[0].params.device;
  poll.connects[0].end(network);
  await until(() => poll.connects.length === 2, 'again');
  assert.equal(poll.connects[1].params.device, device);
  client.stop();
});
