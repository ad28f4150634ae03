// End-to-end tests of @gapless/client in headless Chromium against a real system
// (redis-server, the ingest, two edges behind a TCP load balancer: test/system.mjs).
// Every test uses its own user; the page records what the client's handlers saw.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { System, eventually } from './system.mjs';

let sys;
let context;

before(async () => {
  sys = await System.start();
  context = await sys.browser();
});

after(async () => {
  await sys?.stop();
});

let users = 0;
function freshUser() {
  users += 1;
  return `js-${process.pid}-${users}`;
}

/** A new page of the test origin, with the client's module loaded. */
async function openPage({ init } = {}) {
  const page = await context.newPage();
  // A first navigation of a fresh browser on a loaded 2-core machine can take a while.
  page.setDefaultNavigationTimeout(60000);
  if (init) await page.addInitScript(init);
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') process.stderr.write(`[page] ${m.text()}\n`);
  });
  page.on('pageerror', (e) => process.stderr.write(`[page error] ${e}\n`));
  await page.goto(`${sys.pageOrigin}/`);
  await page.waitForFunction(() => window.__ready === true);
  return page;
}

function options(user, extra = {}) {
  return {
    url: sys.url,
    token: sys.token(user, extra.device ?? 'laptop'),
    minReconnectDelayMs: 100,
    maxReconnectDelayMs: 1000,
    heartbeatGraceMs: 1500,
    ...extra,
  };
}

async function startClient(page, opts, extras = {}) {
  await page.evaluate(([o, e]) => window.startClient(o, e), [opts, extras]);
}

const seen = (page) => page.evaluate(() => window.__seen);

async function waitState(page, check, what) {
  try {
    return await eventually(async () => {
      const s = await seen(page);
      return s.states.length > 0 && check(s.states.at(-1)) ? s.states.at(-1) : false;
    }, what);
  } catch (e) {
    const s = await seen(page).catch(() => null);
    throw new Error(`${e.message}; states ${JSON.stringify(s?.states.slice(-8))}, errors ${JSON.stringify(s?.errors.slice(-5))}`);
  }
}

async function waitNotes(page, count, timeoutMs = 20000) {
  try {
    return await eventually(async () => {
      const s = await seen(page);
      return s.notes.length >= count ? s : false;
    }, `${count} notifications`, timeoutMs);
  } catch (e) {
    // What the page saw, and the servers' logs, say why.
    const s = await seen(page).catch(() => null);
    const saw = s && { notes: s.notes.map((n) => n.seq), states: s.states.slice(-8), errors: s.errors.slice(-5), tokenCalls: s.tokenCalls };
    process.stderr.write(`${sys.logs()}\n`);
    throw new Error(`${e.message}; the page saw ${JSON.stringify(saw)}`);
  }
}

/** Each seq of `expected` exactly once, in order, and nothing else. */
function assertExactly(notes, expected, what = '') {
  const seqs = notes.map((n) => n.seq);
  assert.deepEqual(seqs, expected, `${what}: got ${seqs.length} (${summarise(seqs)})`);
}

function summarise(seqs) {
  const dups = seqs.filter((s, i) => seqs.indexOf(s) !== i);
  return `first ${seqs.slice(0, 3)}, last ${seqs.slice(-3)}, duplicates ${dups.slice(0, 5)}`;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

async function sendN(user, n) {
  const answers = [];
  for (let i = 0; i < n; i++) answers.push(await sys.send(user, { i }));
  return answers;
}

test('live delivery over WebSocket: each notification once, in order, with the seqs the ingest answered', async () => {
  const user = freshUser();
  const page = await openPage();
  await startClient(page, options(user));
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'websocket', 'connected over websocket');
  const answers = await sendN(user, 5);
  const s = await waitNotes(page, 5);
  assertExactly(s.notes, answers.map((a) => a.seq), 'live');
  assert.ok(s.notes.every((n) => n.epoch === answers[0].epoch));
  await page.close();
});

test("the page's connection killed: after the reconnect, exactly the gap", async () => {
  const user = freshUser();
  const page = await openPage();
  // A slow handler: the kill lands while some are received but not yet handled, so the
  // edge sends those again after the reconnect and the client must drop them.
  await startClient(page, options(user), { handlerDelayMs: 100 });
  await waitState(page, (s) => s.state === 'connected', 'connected');
  await sendN(user, 8);
  await waitNotes(page, 2);
  sys.lb.killConnections();
  await sendN(user, 4); // sent while the client is away
  const s = await waitNotes(page, 12);
  await sendN(user, 2);
  const end = await waitNotes(page, 14);
  await sleep(300);
  assertExactly((await seen(page)).notes, range(1, 14), 'across the kill');
  assert.ok(end.notes.length === 14);
  assert.ok(s.tokenCalls >= 2, 'token() was called again for the reconnect');
  await page.close();
});

test('the edge it is on SIGKILLed: it resumes on the other edge with nothing lost', async () => {
  const user = freshUser();
  const page = await openPage();
  await startClient(page, options(user));
  const first = await waitState(page, (s) => s.state === 'connected', 'connected');
  await sendN(user, 3);
  await waitNotes(page, 3);
  await sys.killEdge(first.edge);
  await sendN(user, 5);
  const other = await waitState(page, (s) => s.state === 'connected' && s.edge !== first.edge, 'connected to the other edge');
  assert.notEqual(other.edge, first.edge);
  const s = await waitNotes(page, 8);
  assertExactly(s.notes, range(1, 8), 'across the edge kill');
  await sys.restartEdge(first.edge);
  await page.close();
});

test('without window.WebSocket it works over SSE, exact across a connection kill', async () => {
  const user = freshUser();
  const page = await openPage({ init: () => { delete window.WebSocket; } });
  await startClient(page, options(user));
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'sse', 'connected over sse');
  await sendN(user, 3);
  await waitNotes(page, 3);
  sys.lb.killConnections();
  await sendN(user, 3);
  await waitNotes(page, 6);
  await sendN(user, 1);
  const s = await waitNotes(page, 7);
  assertExactly(s.notes, range(1, 7), 'over sse');
  assert.ok(s.states.every((st) => st.transport !== 'websocket'), 'never tried a WebSocket it does not have');
  // The acks went by POST /v1/ack: the stored position is the last seq handled.
  await eventually(() => sys.redisCli('HGET', `gl:{${user}}:a`, 'laptop').split(':')[1] === '7', 'the stored ack to reach 7');
  await page.close();
});

test('without WebSocket and with SSE blocked it works over long-polling', async () => {
  const user = freshUser();
  const page = await openPage({ init: () => { delete window.WebSocket; } });
  await page.route('**/v1/sse**', (route) => route.abort('blockedbyclient'));
  // Short holds: one clean-clone run timed out waiting for these notifications over
  // long-poll (not reproduced in 17 runs since; cause unknown). A hold that is not woken
  // ends after 5 s and the next poll reads from the position, so a missed wakeup costs
  // seconds here; waitNotes prints what the page saw and the servers' logs if it recurs.
  await startClient(page, { ...options(user), pollWaitMs: 5000 });
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'poll', 'connected over poll');
  await sendN(user, 4);
  await waitNotes(page, 4);
  sys.lb.killConnections();
  await sendN(user, 3);
  const s = await waitNotes(page, 7);
  assertExactly(s.notes, range(1, 7), 'over poll');
  await page.close();
});

test('a page reload with localStorage continues after the last seq handled, with no duplicate', async () => {
  const user = freshUser();
  const page = await openPage();
  // The handler takes a while, so the reload lands while some are delivered but not yet handled.
  await startClient(page, { ...options(user), storage: 'local', storageKey: `gapless:${user}` }, { handlerDelayMs: 20 });
  await waitState(page, (s) => s.state === 'connected', 'connected');
  await sendN(user, 30);
  await waitNotes(page, 10);
  const before = (await seen(page)).notes;
  const stored = await page.evaluate((k) => JSON.parse(localStorage.getItem(k)), `gapless:${user}`);
  await page.reload();
  await page.waitForFunction(() => window.__ready === true);
  // The stored position is at least what the first page saw handled before reloading.
  const beforeReload = (await page.evaluate((k) => JSON.parse(localStorage.getItem(k)), `gapless:${user}`)).seq;
  assert.ok(beforeReload >= stored.seq);
  await startClient(page, { ...options(user), storage: 'local', storageKey: `gapless:${user}` });
  await sendN(user, 5);
  const s = await waitNotes(page, 35 - beforeReload);
  const firstPage = before.map((n) => n.seq).filter((q) => q <= beforeReload);
  const all = [...range(1, beforeReload), ...s.notes.map((n) => n.seq)];
  assert.deepEqual(all, range(1, 35), `first page handled ${firstPage.length}, stored ${beforeReload}; second page got ${summarise(s.notes.map((n) => n.seq))}`);
  assert.equal(s.notes[0].seq, beforeReload + 1, 'the second page starts right after the last seq handled');
  await page.close();
});

test('a trimmed gap: reset first, then delivery from first_seq', async () => {
  const user = freshUser();
  const page = await openPage();
  await startClient(page, options(user));
  await waitState(page, (s) => s.state === 'connected', 'connected');
  await sendN(user, 3);
  await waitNotes(page, 3);
  await page.evaluate(() => window.__client.stop());
  await sendN(user, 60);
  sys.redisCli('XTRIM', `gl:{${user}}:s`, 'MAXLEN', '10');
  const firstKept = Number(sys.redisCli('XRANGE', `gl:{${user}}:s`, '-', '+', 'COUNT', '1').split('\n')[0].split('-')[0]);
  assert.equal(firstKept, 54);
  await page.evaluate(() => window.__client.start());
  const s = await waitNotes(page, 3 + 10);
  assert.equal(s.resets.length, 1, JSON.stringify(s.resets));
  assert.equal(s.resets[0].reason, 'gap_trimmed');
  assert.equal(s.resets[0].first_seq, firstKept);
  assert.deepEqual(s.order, ['n1', 'n2', 'n3', `r${firstKept}`, ...range(firstKept, 63).map((q) => `n${q}`)]);
  await page.close();
});

test('a bad token: an error event, then closed; stop() afterwards is harmless', async () => {
  const user = freshUser();
  const page = await openPage();
  const bad = { ...options(user), token: sys.token(user, 'laptop').replace(/.$/, (c) => (c === 'A' ? 'B' : 'A')) };
  await startClient(page, { ...bad, maxAuthFailures: 2 });
  const last = await waitState(page, (s) => s.state === 'closed', 'closed');
  assert.equal(last.transport, null);
  const s = await seen(page);
  assert.ok(s.errors.length > 0 && s.errors.every((e) => e.code === 'unauthorized'), JSON.stringify(s.errors));
  assert.ok(s.tokenCalls >= 2, 'the token was asked for again after the refusal');
  await page.evaluate(() => window.__client.stop());
  await page.close();
});

test('a draining edge: the client waits the hinted delay and resumes on the other edge', async () => {
  const user = freshUser();
  const page = await openPage();
  await startClient(page, options(user));
  const first = await waitState(page, (s) => s.state === 'connected', 'connected');
  await sendN(user, 3);
  await waitNotes(page, 3);
  const exited = sys.drainEdge(first.edge);
  await waitState(page, (s) => s.state === 'connected' && s.edge !== first.edge, 'connected to the other edge');
  await sendN(user, 3);
  const s = await waitNotes(page, 6);
  assertExactly(s.notes, range(1, 6), 'across the drain');
  assert.ok(!s.errors.length, JSON.stringify(s.errors));
  assert.equal((await exited).code, 0, 'the edge drained and exited cleanly');
  await sys.restartEdge(first.edge);
  await page.close();
});

test('WebSocket blocked by a proxy: it falls back to SSE, then returns to WebSocket when it works again', async () => {
  const user = freshUser();
  const page = await openPage();
  await startClient(page, { ...options(user), returnToPreferredMs: 2000 });
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'websocket', 'websocket');
  await sendN(user, 2);
  await waitNotes(page, 2);
  sys.lb.blockWs = true;
  sys.lb.killConnections();
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'sse', 'fallen back to sse');
  await sendN(user, 2);
  await waitNotes(page, 4);
  sys.lb.blockWs = false;
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'websocket', 'back on websocket');
  await sendN(user, 2);
  const s = await waitNotes(page, 6);
  assertExactly(s.notes, range(1, 6), 'across both switches');
  await page.close();
});

test('stop() leaves nothing running: no connection, timer or request afterwards', async () => {
  const user = freshUser();
  const page = await openPage();
  const requests = [];
  const pending = new Set();
  page.on('request', (r) => {
    requests.push(r.url());
    pending.add(r);
  });
  page.on('requestfinished', (r) => pending.delete(r));
  page.on('requestfailed', (r) => pending.delete(r));
  await startClient(page, { ...options(user), transports: ['poll'], pollWaitMs: 1000 });
  await waitState(page, (s) => s.state === 'connected' && s.transport === 'poll', 'polling');
  await sendN(user, 2);
  await waitNotes(page, 2);
  await page.evaluate(() => window.__client.stop());
  const n = requests.length;
  const connections = sys.lb.connections;
  await sendN(user, 2);
  await sleep(3000);
  assert.equal(requests.length, n, `requests after stop: ${requests.slice(n)}`);
  assert.equal(sys.lb.connections, connections, 'no connection reached the edges after stop');
  // The held poll was aborted: no request is left in flight (idle keep-alive sockets are the
  // browser's pool, not the client's).
  assert.deepEqual([...pending].map((r) => r.url()), [], 'requests still in flight after stop');
  const s = await seen(page);
  assert.equal(s.notes.length, 2);
  assert.equal(s.states.at(-1).state, 'closed');
  await page.close();
});

test('20 forced disconnects while 1,000 notifications are sent: each received exactly once, in order', async () => {
  const user = freshUser();
  const page = await openPage();
  // Handlers take a few ms, so disconnects land while some are received but not handled.
  await startClient(page, { ...options(user), returnToPreferredMs: 1500, transportAttempts: 1 }, { handlerDelayMs: 25 });
  await waitState(page, (s) => s.state === 'connected', 'connected');
  const total = 1000;
  const t0 = Date.now();
  let sent = 0;
  const producer = (async () => {
    while (sent < total) {
      await sys.send(user, { i: sent });
      sent += 1;
      if (sent % 10 === 0) await sleep(200);
    }
  })();
  const kinds = { connections_killed: 0, edge_killed: 0, websocket_blocked: 0 };
  for (let i = 0; i < 20; i++) {
    await sleep(700);
    if (i % 4 === 1) {
      const current = (await seen(page)).states.filter((s) => s.state === 'connected').at(-1)?.edge ?? 'edge-a';
      await sys.killEdge(current);
      kinds.edge_killed += 1;
      await sleep(300);
      await sys.restartEdge(current);
    } else if (i % 4 === 3) {
      sys.lb.blockWs = true;
      sys.lb.killConnections();
      kinds.websocket_blocked += 1;
      await sleep(800);
      sys.lb.blockWs = false;
    } else {
      sys.lb.killConnections();
      kinds.connections_killed += 1;
    }
  }
  await producer;
  const s = await waitNotes(page, total, 60000);
  await sleep(500);
  const final = await seen(page);
  assertExactly(final.notes, range(1, total), 'the soak');
  const transports = [...new Set(s.states.filter((x) => x.state === 'connected').map((x) => x.transport))];
  const edges = [...new Set(s.states.filter((x) => x.state === 'connected').map((x) => x.edge))];
  process.stderr.write(`soak: ${total} sent, ${final.notes.length} handed over, 0 lost, 0 duplicates handed over, ` +
    `disconnects ${JSON.stringify(kinds)}, connects ${s.states.filter((x) => x.state === 'connected').length}, ` +
    `transports ${transports}, edges ${edges}, errors ${final.errors.length}, ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
  await page.close();
});
