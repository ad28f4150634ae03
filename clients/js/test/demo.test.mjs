// The demo page of `gapless dev` (clients/js/demo/index.html, served by the ingest at /demo),
// end to end in headless Chromium: the real `gapless dev` binary (its own redis-server, the
// ingest, one edge) prints the page's URL; the page connects, a notification sent with its
// form and one sent by this test through the ingest show up, newest first, and a screenshot
// proves the received item is really painted on screen. Stop/Start and a reload resume from
// the held position; the SSE and long-poll fallbacks work from the page too. Ends with
// SIGINT, which must stop `gapless dev` with status 0.
//
// Needs the binaries (`cargo build --workspace`; GAPLESS_BIN_DIR overrides
// <repo>/target/debug), redis-server on PATH and Chromium (CHROMIUM, default /usr/bin/chromium).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { inflateSync } from 'node:zlib';
import { chromium } from 'playwright-core';

import { CHROMIUM_FLAGS, binDir, freePort } from './system.mjs';

/** How long one step may take before the test fails. */
const STEP_MS = 20_000;

/** The colours of a notification item (`li.note` in the page's CSS: --note and --accent). */
const NOTE_BACKGROUND = [0xea, 0xf3, 0xff];
const NOTE_ACCENT = [0x1f, 0x6f, 0xeb];

test('the demo page of gapless dev shows the connection and renders notifications as they arrive', { timeout: 180_000 }, async (t) => {
  const gapless = join(binDir(), 'gapless');
  const dir = await mkdtemp(join(tmpdir(), 'gapless-demo-'));
  const dev = startDev(gapless, dir, await freePort());
  let context = null;
  let page = null;
  let passed = false;
  t.after(async () => {
    if (context) await context.close().catch(() => {});
    await dev.stop().catch(() => {});
    if (passed) await rm(dir, { recursive: true, force: true });
  });

  try {
    const printed = await dev.printed;
    const demoUrl = printed.match(/^\s*(http:\/\/\S+\/demo#\S+)$/m)?.[1];
    assert.ok(demoUrl, `no demo URL in the output of gapless dev:\n${printed}`);
    const url = new URL(demoUrl);
    const secrets = new URLSearchParams(url.hash.slice(1));
    const ingest = url.origin;
    const key = secrets.get('key');
    assert.ok(key && secrets.get('token') && secrets.get('edge'), `the demo URL lacks a secret: ${demoUrl}`);
    assert.equal(secrets.get('user'), 'demo');
    // The console snippet is gone; the app snippet is there.
    assert.doesNotMatch(printed, /new WebSocket\(/);
    assert.match(printed, /import \{ GaplessClient \} from '@gapless\/client'/);

    context = await chromium.launchPersistentContext(join(dir, 'chromium'), {
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      headless: true,
      args: CHROMIUM_FLAGS,
      // A phone's width: the page must work there.
      viewport: { width: 390, height: 844 },
      deviceScaleFactor: 1,
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(STEP_MS);
    const problems = [];
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      // The one refusal this test asks for (the 422 below) is logged by Chromium too.
      if (m.type() === 'error' && !/status of 422 \(Unprocessable Entity\)/.test(m.text())) {
        problems.push(`console error: ${m.text()}`);
      }
    });

    await page.goto(demoUrl);
    await connected(page, 'websocket');
    assert.equal(await page.locator('#edge').textContent(), 'dev-edge');
    assert.equal(await page.locator('#device').textContent(), 'browser');

    // The form: a JSON payload, appended through the page's own origin.
    await page.getByLabel('Payload').fill('{"text": "hello from the form", "n": 1}');
    await page.getByRole('button', { name: 'Send' }).click();
    await page.locator('#answer', { hasText: /appended as seq \d+/ }).waitFor();
    const formSeq = Number((await page.locator('#answer').textContent()).match(/seq (\d+)/)[1]);
    const formItem = page.locator(`#feed li.note[data-seq="${formSeq}"]`);
    await formItem.waitFor();
    assert.match(await formItem.locator('pre').textContent(), /"text": "hello from the form",\n\s+"n": 1/);
    await assertPainted(page, formItem, dir);

    // One from the producer's side, with the key the URL carries: it arrives on top.
    const sent = await append(ingest, key, { text: 'hello from the test' });
    const testItem = page.locator(`#feed li.note[data-seq="${sent.seq}"]`);
    await testItem.waitFor();
    assert.equal(await page.locator('#feed li').first().getAttribute('data-seq'), String(sent.seq));
    assert.match(await testItem.textContent(), /hello from the test/);
    await assertPainted(page, testItem, dir);

    // Plain text travels as a JSON string; a refusal shows the error body.
    await page.getByLabel('Payload').fill('just words');
    await page.getByRole('button', { name: 'Send' }).click();
    await page.locator('#answer', { hasText: /appended as seq/ }).waitFor();
    await page.locator('#feed li.note pre', { hasText: /^just words$/ }).waitFor();
    const tooDeep = '['.repeat(100) + ']'.repeat(100);
    await page.getByLabel('Payload').fill(tooDeep);
    await page.getByRole('button', { name: 'Send' }).click();
    await page.locator('#answer', { hasText: /refused: HTTP 422/ }).waitFor();
    assert.match(await page.locator('#answer pre').textContent(), /"code": "payload_too_deep"/);

    // Nothing wider than the phone's screen.
    const widths = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
    assert.ok(widths[0] <= widths[1], `the page scrolls sideways at 390 px: ${widths}`);

    // Stopped, it misses nothing: what came meanwhile arrives after Start.
    await page.getByRole('button', { name: 'Stop client' }).click();
    await page.locator('#state[data-state="closed"]').waitFor();
    const whileStopped = await append(ingest, key, { text: 'sent while stopped' });
    await page.waitForTimeout(300);
    assert.equal(await page.locator(`#feed li.note[data-seq="${whileStopped.seq}"]`).count(), 0);
    await page.getByRole('button', { name: 'Start client' }).click();
    await connected(page, 'websocket');
    await page.locator(`#feed li.note[data-seq="${whileStopped.seq}"]`).waitFor();

    // A reload resumes from the position in localStorage: only what is new shows up.
    await page.reload();
    await connected(page, 'websocket');
    const afterReload = await append(ingest, key, { text: 'after the reload' });
    await page.locator(`#feed li.note[data-seq="${afterReload.seq}"]`).waitFor();
    assert.deepEqual(await seqsShown(page), [afterReload.seq]);

    // The HTTP fallbacks reach the edge from this origin too (CORS), and resume exactly.
    for (const transport of ['sse', 'poll']) {
      await page.goto('about:blank');
      await page.goto(`${demoUrl}&transports=${transport}`);
      await connected(page, transport);
      const n = await append(ingest, key, { text: `over ${transport}` });
      await page.locator(`#feed li.note[data-seq="${n.seq}"]`).waitFor();
      assert.deepEqual(await seqsShown(page), [n.seq], `${transport} replayed what the page had handled`);
      await assertPainted(page, page.locator(`#feed li.note[data-seq="${n.seq}"]`), dir);
    }

    assert.deepEqual(problems, [], 'the page reported errors (a Content-Security-Policy refusal shows here)');
    assert.equal(await page.locator('#errors li').count(), 0, 'the page listed client errors');

    await context.close();
    context = null;
    const status = await dev.stop();
    assert.deepEqual(status, { code: 0, signal: null }, `gapless dev did not stop cleanly on SIGINT:\n${dev.stderr()}`);
    passed = true;
  } catch (error) {
    if (page && !page.isClosed()) {
      const path = join(dir, 'failure.png');
      await page.screenshot({ path, fullPage: true }).then(
        () => console.error(`demo test failed; screenshot of the page: ${path}`),
        () => {},
      );
    }
    console.error(`gapless dev stderr (last lines):\n${dev.stderr().split('\n').slice(-40).join('\n')}`);
    throw error;
  }
});

/** Waits until the page shows the client connected over `transport`. */
async function connected(page, transport) {
  await page.locator('#state[data-state="connected"]').waitFor();
  await page.locator('#transport', { hasText: new RegExp(`^${transport}$`) }).waitFor();
}

/** The seqs of the notification items on the page, top first. */
function seqsShown(page) {
  return page.locator('#feed li.note').evaluateAll((items) => items.map((li) => Number(li.dataset.seq)));
}

/** POSTs one notification for the demo user; answers the ingest's JSON. */
async function append(ingest, key, payload) {
  const response = await fetch(`${ingest}/v1/notifications`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ user: 'demo', payload }),
  });
  const body = await response.json();
  assert.equal(response.status, 200, JSON.stringify(body));
  return body;
}

/**
 * Screenshots the viewport with `item` scrolled into it and checks, pixel by pixel, that the
 * item's box is painted as a notification: mostly its background colour, its accent bar on
 * the left, and text on it (not a blank box). Saves the screenshot when it is not.
 */
async function assertPainted(page, item, dir) {
  await item.scrollIntoViewIfNeeded();
  const box = await item.boundingBox();
  assert.ok(box && box.width > 50 && box.height > 20, `the item has no size: ${JSON.stringify(box)}`);
  const png = await page.screenshot({ animations: 'disabled', caret: 'hide' });
  const image = decodePng(png);
  const fail = async (message) => {
    const path = join(dir, `unpainted-${Date.now()}.png`);
    await writeFile(path, png);
    assert.fail(`${message} (item at ${JSON.stringify(box)}; screenshot: ${path})`);
  };
  const left = Math.ceil(box.x);
  const top = Math.ceil(box.y);
  const right = Math.floor(box.x + box.width) - 1;
  const bottom = Math.floor(box.y + box.height) - 1;
  if (left < 0 || top < 0 || right >= image.width || bottom >= image.height) {
    await fail('the item is not inside the viewport');
  }
  // The accent bar: the item's leftmost 6 px, away from the rounded corners.
  let bar = 0;
  let barArea = 0;
  for (let y = top + 6; y <= bottom - 6; y++) {
    for (let x = left + 1; x <= left + 4; x++) {
      barArea += 1;
      if (near(image.at(x, y), NOTE_ACCENT)) bar += 1;
    }
  }
  // The body, right of the bar: background, and text that differs from it.
  let background = 0;
  let ink = 0;
  let area = 0;
  for (let y = top + 2; y <= bottom - 2; y++) {
    for (let x = left + 10; x <= right - 2; x++) {
      area += 1;
      const pixel = image.at(x, y);
      if (near(pixel, NOTE_BACKGROUND)) background += 1;
      else if (distance(pixel, NOTE_BACKGROUND) > 120) ink += 1;
    }
  }
  if (bar < barArea * 0.9) await fail(`the accent bar is missing (${bar} of ${barArea} px)`);
  if (background < area * 0.5) await fail(`the background covers ${background} of ${area} px`);
  if (ink < 150) await fail(`no text drawn on the item (${ink} dark px)`);
}

function distance(a, b) {
  return Math.abs(a[0] - b[0]) + Math.abs(a[1] - b[1]) + Math.abs(a[2] - b[2]);
}

function near(a, b) {
  return distance(a, b) <= 12;
}

/**
 * Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium's screenshots are):
 * chunks, the inflated IDAT stream, and the five row filters of the PNG spec.
 */
function decodePng(buffer) {
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  assert.ok(buffer.subarray(0, 8).equals(signature), 'not a PNG');
  let width = 0;
  let height = 0;
  let channels = 0;
  const data = [];
  for (let at = 8; at < buffer.length;) {
    const length = buffer.readUInt32BE(at);
    const type = buffer.toString('latin1', at + 4, at + 8);
    const body = buffer.subarray(at + 8, at + 8 + length);
    at += 12 + length;
    if (type === 'IHDR') {
      width = body.readUInt32BE(0);
      height = body.readUInt32BE(4);
      const [depth, colour, , , interlace] = body.subarray(8, 13);
      assert.ok(depth === 8 && (colour === 2 || colour === 6) && interlace === 0,
        `unsupported PNG: depth ${depth}, colour type ${colour}, interlace ${interlace}`);
      channels = colour === 6 ? 4 : 3;
    } else if (type === 'IDAT') {
      data.push(body);
    } else if (type === 'IEND') {
      break;
    }
  }
  const raw = inflateSync(Buffer.concat(data));
  const stride = width * channels;
  const pixels = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = y * stride;
    const up = row - stride;
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? pixels[row + x - channels] : 0;
      const b = y > 0 ? pixels[up + x] : 0;
      const c = x >= channels && y > 0 ? pixels[up + x - channels] : 0;
      let predicted;
      switch (filter) {
        case 0: predicted = 0; break;
        case 1: predicted = a; break;
        case 2: predicted = b; break;
        case 3: predicted = (a + b) >> 1; break;
        case 4: {
          const p = a + b - c;
          const pa = Math.abs(p - a);
          const pb = Math.abs(p - b);
          const pc = Math.abs(p - c);
          predicted = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
          break;
        }
        default: throw new Error(`PNG row ${y} has filter ${filter}`);
      }
      pixels[row + x] = (line[x] + predicted) & 0xff;
    }
  }
  return {
    width,
    height,
    at: (x, y) => {
      const i = y * stride + x * channels;
      return [pixels[i], pixels[i + 1], pixels[i + 2]];
    },
  };
}

/**
 * Starts `gapless dev` on free ports with its own redis-server under `dir`. `printed` is
 * its stdout up to the last line of the instructions; `stop()` sends SIGINT (SIGKILL after
 * 30 s) and answers how it exited.
 */
function startDev(gapless, dir, redisPort) {
  const child = spawn(gapless, ['dev', '--redis-port', String(redisPort), '--dir', join(dir, 'dev'),
    '--ingest-listen', '127.0.0.1:0', '--edge-listen', '127.0.0.1:0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' },
  });
  let stdout = '';
  let stderr = '';
  const exited = new Promise((resolveExit) => {
    child.once('exit', (code, signal) => resolveExit({ code, signal }));
  });
  const printed = new Promise((resolvePrinted, reject) => {
    const timer = setTimeout(() => reject(new Error(`gapless dev printed no instructions within 60 s:\n${stdout}\n${stderr}`)), 60_000);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      if (stdout.includes('Ctrl-C stops everything')) {
        clearTimeout(timer);
        resolvePrinted(stdout);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`gapless dev exited (${code ?? signal}) during start-up:\n${stdout}\n${stderr}`));
    });
  });
  printed.catch(() => {});
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  let stopping = null;
  return {
    printed,
    stderr: () => stderr,
    stop() {
      if (!stopping) {
        stopping = (async () => {
          if (child.exitCode === null && child.signalCode === null) {
            child.kill('SIGINT');
            const killer = setTimeout(() => child.kill('SIGKILL'), 30_000);
            const status = await exited;
            clearTimeout(killer);
            return status;
          }
          return exited;
        })();
      }
      return stopping;
    },
  };
}
