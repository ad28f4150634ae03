// Drives a browser's own EventSource in headless Chromium (Debian's /usr/bin/chromium,
// through playwright-core) for edge/tests/browser.rs. Commands arrive as JSON lines on
// stdin; each gets one JSON line on stdout (logs go to stderr):
//   {"cmd":"open","origin":"http://127.0.0.1:1234","path":"/v1/sse?token=…"}
//       opens <origin>/healthz (a page of the edge's origin) and an EventSource on <path>
//   {"cmd":"wait","count":N,"timeout_ms":10000}
//       answers once the page has N notifications: {"seqs":[…],"ids":[…],"opens":k,…}
//   {"cmd":"stop"}  closes the browser and exits.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking'];
let browser = null;
let page = null;

function reply(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

async function open({ origin, path }) {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: FLAGS });
  page = await browser.newPage();
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  await page.goto(`${origin}/healthz`);
  await page.evaluate((url) => {
    const seen = { notes: [], ids: [], welcomes: 0, resets: [], opens: 0, errors: 0 };
    window.__seen = seen;
    const source = new EventSource(url);
    window.__source = source;
    source.addEventListener('open', () => { seen.opens += 1; });
    source.addEventListener('error', () => { seen.errors += 1; });
    source.addEventListener('welcome', () => { seen.welcomes += 1; });
    source.addEventListener('reset', (e) => { seen.resets.push(JSON.parse(e.data)); });
    source.addEventListener('notification', (e) => {
      const n = JSON.parse(e.data);
      seen.notes.push(n.seq);
      seen.ids.push(e.lastEventId);
    });
  }, path);
  return { ok: true };
}

async function wait({ count, timeout_ms: timeoutMs = 10000 }) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const seen = await page.evaluate(() => window.__seen);
    if (seen.notes.length >= count) {
      return { seqs: seen.notes, ids: seen.ids, opens: seen.opens, errors: seen.errors,
        welcomes: seen.welcomes, resets: seen.resets };
    }
    if (Date.now() > deadline) {
      return { error: `only ${seen.notes.length} of ${count} notifications`, seen };
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    if (command.cmd === 'open') reply(await open(command));
    else if (command.cmd === 'wait') reply(await wait(command));
    else if (command.cmd === 'stop') {
      if (browser) await browser.close();
      reply({ ok: true });
      process.exit(0);
    } else reply({ error: `unknown command ${command.cmd}` });
  } catch (e) {
    reply({ error: String(e && e.stack ? e.stack : e) });
  }
}
if (browser) await browser.close();
