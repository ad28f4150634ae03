// Drives the ingest's status page in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core) for edge/tests/browser.rs. Commands arrive as JSON lines on stdin; each
// gets one JSON line on stdout (logs go to stderr):
//   {"cmd":"open","url":"http://127.0.0.1:1234/status","key":"…"}
//       opens the page as a browser does: the 401's Basic challenge is answered with the
//       API key as the password (playwright's httpCredentials); answers {"status":200}.
//       The page's polls of /v1/status are held until "release", so a first screenshot
//       shows the page before any figure.
//   {"cmd":"release"}  lets the page's polls through from now on.
//   {"cmd":"figures","after":N,"shot":"/tmp/x.png","timeout_ms":10000}
//       waits until the page has rendered at least N times, then answers what it shows:
//       {"figures":{"connections":"3",…},"edges":[{"edge":…,"cells":[…]}],"rendered":k,
//        "shot":{"path":…,"bytes":…,"figures_sha256":…}} (a digest of the figures' pixels)
//   {"cmd":"stop"}  closes the browser and exits.
import { createInterface } from 'node:readline';
import { statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { chromium } from 'playwright-core';

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking'];
let browser = null;
let page = null;
let releaseFn = null;
const released = new Promise((resolve) => { releaseFn = resolve; });

function reply(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

async function open({ url, key }) {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: FLAGS });
  const context = await browser.newContext({
    httpCredentials: { username: 'operator', password: key },
    viewport: { width: 1000, height: 700 },
  });
  page = await context.newPage();
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  page.on('pageerror', (e) => process.stderr.write(`[page error] ${e}\n`));
  await page.route('**/v1/status', async (route) => {
    await released;
    await route.continue();
  });
  const answer = await page.goto(url);
  return { status: answer.status() };
}

async function figures({ after = 1, shot, timeout_ms: timeoutMs = 10000 }) {
  if (after === 0) return { shot: await screenshot(shot) };
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const rendered = Number(await page.evaluate(() => document.body.dataset.rendered || 0));
    if (rendered >= after) break;
    if (Date.now() > deadline) {
      const error = await page.evaluate(() => document.getElementById('error').textContent);
      return { error: `rendered ${rendered} times, not ${after}: ${error}` };
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const shown = await page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    return {
      figures: {
        connections: text('connections'), appends: text('appends'), deliveries: text('deliveries'),
        p99: text('p99'), redis: text('redis'), error: text('error'),
      },
      edges: [...document.querySelectorAll('#edges tr')].map((row) => ({
        edge: row.dataset.edge ?? null,
        cells: [...row.cells].map((c) => c.textContent),
        classes: [...row.cells].map((c) => c.className),
      })),
      rendered: Number(document.body.dataset.rendered),
      last: window.gaplessStatus,
    };
  });
  if (shot) shown.shot = await screenshot(shot);
  return shown;
}

/// The whole page to `path`, and a digest of the figures' pixels.
async function screenshot(path) {
  await page.screenshot({ path, fullPage: true });
  const figures = await page.locator('.figures').screenshot();
  return {
    path,
    bytes: statSync(path).size,
    figures_sha256: createHash('sha256').update(figures).digest('hex'),
  };
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    if (command.cmd === 'open') reply(await open(command));
    else if (command.cmd === 'figures') reply(await figures(command));
    else if (command.cmd === 'release') { releaseFn(); reply({ ok: true }); }
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
