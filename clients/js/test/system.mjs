// A real gapless system for the browser client's end-to-end tests: a redis-server on a free
// port with a fresh directory, `gapless migrate`, one ingest and two edges (the debug
// binaries), a TCP load balancer in front of the edges that the tests can cut, a static
// server for the test page, and headless Chromium (Debian's /usr/bin/chromium through
// playwright-core, a fresh --user-data-dir each time).
import { spawn, spawnSync } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '../../..');

export const CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/** The directory of the gapless binaries: GAPLESS_BIN_DIR, else <CARGO_TARGET_DIR or repo/target>/debug. */
export function binDir() {
  const dir = process.env.GAPLESS_BIN_DIR ?? join(process.env.CARGO_TARGET_DIR ? resolve(repo, process.env.CARGO_TARGET_DIR) : join(repo, 'target'), 'debug');
  for (const bin of ['gapless', 'gapless-ingest', 'gapless-edge']) {
    if (!existsSync(join(dir, bin))) {
      throw new Error(`${join(dir, bin)} is missing: run \`cargo build --workspace\` first (or set GAPLESS_BIN_DIR)`);
    }
  }
  return dir;
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** Waits until `check()` is truthy (it may be async); returns its value. */
export async function eventually(check, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await sleep(25);
  }
}

/** An HS256 device token, as the edge verifies it. */
export function mintToken(secret, user, device, ttlSecs = 3600) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, ...(device ? { device } : {}), iat: now, exp: now + ttlSecs })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** A child process whose output is kept (the tail is printed when a test fails). */
class Proc {
  constructor(name, bin, args) {
    this.name = name;
    this.bin = bin;
    this.args = args;
    this.log = [];
    this.start();
  }
  start() {
    this.child = spawn(this.bin, this.args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } });
    this.exited = new Promise((ok) => this.child.once('exit', (code, signal) => ok({ code, signal })));
    for (const stream of [this.child.stdout, this.child.stderr]) {
      stream.on('data', (d) => {
        this.log.push(d.toString());
        if (this.log.length > 200) this.log.shift();
      });
    }
  }
  kill(signal = 'SIGKILL') {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return this.exited;
  }
  tail() {
    return `--- ${this.name} ---\n${this.log.join('').split('\n').slice(-30).join('\n')}`;
  }
}

/**
 * A TCP load balancer in front of the edges: each new connection goes to the first edge
 * that accepts a TCP connect, in order. It can cut every connection (a network switch) and
 * refuse WebSocket upgrades (a proxy that breaks WebSockets).
 */
class Balancer {
  constructor(targets) {
    this.targets = targets; // [{name, port}]
    this.sockets = new Set();
    this.connections = 0;
    this.byEdge = {};
    this.blockWs = false;
    this.server = createServer((client) => this.#accept(client));
  }
  listen() {
    return new Promise((ok) => this.server.listen(0, '127.0.0.1', () => ok(this.server.address().port)));
  }
  #accept(client) {
    this.connections += 1;
    this.sockets.add(client);
    client.on('close', () => this.sockets.delete(client));
    client.on('error', () => {});
    client.once('data', (first) => {
      if (this.blockWs && /^GET \/v1\/ws[?\s]/.test(first.toString('latin1', 0, 64))) {
        client.destroy();
        return;
      }
      client.pause();
      this.#connect(client, first, 0);
    });
  }
  #connect(client, first, index) {
    const target = this.targets[index];
    if (!target) {
      client.destroy();
      return;
    }
    const upstream = createConnection({ host: '127.0.0.1', port: target.port });
    let connected = false;
    upstream.once('connect', () => {
      connected = true;
      this.byEdge[target.name] = (this.byEdge[target.name] ?? 0) + 1;
      this.sockets.add(upstream);
      upstream.on('close', () => this.sockets.delete(upstream));
      upstream.write(first);
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
      upstream.on('close', () => client.destroy());
      client.on('close', () => upstream.destroy());
    });
    upstream.on('error', () => {
      if (!connected) this.#connect(client, first, index + 1);
      else client.destroy();
    });
  }
  /** Destroys every current connection, both sides. */
  killConnections() {
    for (const s of [...this.sockets]) s.destroy();
  }
  close() {
    this.killConnections();
    return new Promise((ok) => this.server.close(() => ok()));
  }
}

/** Serves the test page and the built client on 127.0.0.1. */
function pageServer() {
  const dist = join(here, '../dist/index.js');
  const server = createHttpServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (path === '/gapless.js') {
      res.writeHead(200, { 'content-type': 'text/javascript', 'cache-control': 'no-store' });
      res.end(readFileSync(dist));
    } else if (path === '/' || path === '/index.html') {
      res.writeHead(200, { 'content-type': 'text/html', 'cache-control': 'no-store' });
      res.end(readFileSync(join(here, 'page/index.html')));
    } else {
      res.writeHead(404).end();
    }
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok(server)));
}

/** The whole system. `await System.start()`, then `await sys.stop()`. */
export class System {
  static async start() {
    const sys = new System();
    try {
      await sys.#start();
    } catch (e) {
      await sys.stop();
      throw e;
    }
    return sys;
  }

  constructor() {
    this.bin = binDir();
    this.dir = mkdtempSync(join(tmpdir(), 'gapless-js-e2e-'));
    this.apiKey = `key-${randomBytes(8).toString('hex')}`;
    this.secret = randomBytes(24).toString('hex');
    this.edges = {};
    this.procs = [];
  }

  async #start() {
    this.redisPort = await freePort();
    this.redis = new Proc('redis', 'redis-server', ['--port', String(this.redisPort), '--bind', '127.0.0.1', '--dir', this.dir,
      '--save', '', '--appendonly', 'yes', '--appendfsync', 'always']);
    this.procs.push(this.redis);
    this.redisUrl = `redis://127.0.0.1:${this.redisPort}`;
    await eventually(() => this.redisCli('PING') === 'PONG', 'redis-server to answer');
    const migrate = spawnSync(join(this.bin, 'gapless'), ['migrate', '--redis', this.redisUrl], { encoding: 'utf8' });
    if (migrate.status !== 0) throw new Error(`gapless migrate failed: ${migrate.stderr}`);

    this.page = await pageServer();
    this.pageOrigin = `http://127.0.0.1:${this.page.address().port}`;

    this.ingestPort = await freePort();
    this.ingest = new Proc('ingest', join(this.bin, 'gapless-ingest'), ['--listen', `127.0.0.1:${this.ingestPort}`, '--redis', this.redisUrl,
      '--api-keys', this.apiKey]);
    this.procs.push(this.ingest);
    for (const name of ['edge-a', 'edge-b']) {
      const port = await freePort();
      const edge = new Proc(name, join(this.bin, 'gapless-edge'), ['--listen', `127.0.0.1:${port}`, '--redis', this.redisUrl,
        '--edge-id', name, '--jwt-secret', this.secret, '--cors-origins', this.pageOrigin, '--heartbeat-ms', '2000',
        '--drain-window-ms', '300', '--sse-retry-ms', '200']);
      edge.port = port;
      this.edges[name] = edge;
      this.procs.push(edge);
    }
    await eventually(() => this.#ready(this.ingestPort), 'the ingest to be ready');
    for (const edge of Object.values(this.edges)) await eventually(() => this.#ready(edge.port), `${edge.name} to be ready`);
    this.lb = new Balancer(Object.values(this.edges).map((e) => ({ name: e.name, port: e.port })));
    this.lbPort = await this.lb.listen();
    this.url = `http://127.0.0.1:${this.lbPort}`;
  }

  async #ready(port) {
    try {
      return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
    } catch {
      return false;
    }
  }

  /** Runs redis-cli against this system's Redis; returns its trimmed output. */
  redisCli(...args) {
    const r = spawnSync('redis-cli', ['-p', String(this.redisPort), ...args], { encoding: 'utf8' });
    return (r.stdout ?? '').trim();
  }

  /** A device token of this system's edges. */
  token(user, device) {
    return mintToken(this.secret, user, device);
  }

  /** Appends one notification through the ingest; returns its answer ({user, epoch, seq}). */
  async send(user, payload = {}) {
    const response = await fetch(`http://127.0.0.1:${this.ingestPort}/v1/notifications`, {
      method: 'POST',
      headers: { authorization: `Bearer ${this.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ user, payload }),
    });
    const body = await response.json();
    if (response.status !== 200) throw new Error(`ingest answered ${response.status}: ${JSON.stringify(body)}`);
    return body;
  }

  /** SIGKILLs an edge (its sockets die with it). */
  killEdge(name) {
    return this.edges[name].kill('SIGKILL');
  }

  /** SIGTERM: the edge drains (close 1012 with a delay hint) and exits. */
  drainEdge(name) {
    return this.edges[name].kill('SIGTERM');
  }

  /** Starts a stopped edge again on its port. */
  async restartEdge(name) {
    const edge = this.edges[name];
    edge.start();
    await eventually(() => this.#ready(edge.port), `${name} to be ready again`);
  }

  /** Headless Chromium with a fresh profile, and one page of the test origin. */
  async browser() {
    const { chromium } = await import('playwright-core');
    const profile = mkdtempSync(join(this.dir, 'chromium-'));
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      headless: true,
      args: CHROMIUM_FLAGS,
    });
    this.contexts = [...(this.contexts ?? []), context];
    return context;
  }

  /** The tails of every process's log, for a failed test. */
  logs() {
    return this.procs.map((p) => p.tail()).join('\n');
  }

  async stop() {
    for (const context of this.contexts ?? []) await context.close().catch(() => {});
    await this.lb?.close();
    await new Promise((ok) => (this.page ? this.page.close(() => ok()) : ok()));
    await Promise.all(this.procs.map((p) => p.kill('SIGKILL')));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
