// Real-browser tests of the client library (/v1/micromsg.js) and the demo page
// (/demo): headless Chromium through playwright-core, against the real msgserver and
// msghandler binaries. Run with `scripts/browser-test` (or `node --test tests/browser/`
// after `cargo build -p msgserver -p msghandler`).
//
// Environment: MICROMSG_BIN_DIR (default <repo>/target/debug), MICROMSG_CHROMIUM
// (default /usr/bin/chromium).
import { after, before, describe, test as nodeTest } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { SignJWT } from "jose";
import { chromium } from "playwright-core";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const binDir = process.env.MICROMSG_BIN_DIR || path.join(repo, "target/debug");
const chromiumPath = process.env.MICROMSG_CHROMIUM || "/usr/bin/chromium";
const WAIT_MS = 10_000; // upper bound for anything the page should do by itself
const BACKEND_KEY = "browser-test-backend-key"; // for /v1/backend/kick
const TOKEN_SECRET = "browser-test-token-secret-0123456789abcdef"; // auth = "token"

let dir; // temporary directory: socket, logs
let children = [];
let socket; // msgserver's socket
let port; // msghandler's
let base; // http://127.0.0.1:<port>
let core; // the msgserver child
let handler; // the msghandler child
let browser;
let failed = false; // print the servers' logs at the end

// node:test's test(), remembering failures for the logs.
function test(name, options, fn) {
  return nodeTest(name, options, async (t) => {
    try {
      await fn(t);
    } catch (e) {
      failed = true;
      throw e;
    }
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitFor(what, check, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => resolve(socket.end() && true));
    socket.once("error", () => resolve(false));
  });
}

function start(name, args, extraEnv = {}) {
  const bin = path.join(binDir, name);
  assert.ok(fs.existsSync(bin), `${bin} is missing: cargo build -p msgserver -p msghandler`);
  const log = fs.openSync(path.join(dir, `${name}.log`), "a");
  // No MICROMSG_* settings from the environment: the test chooses them all.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("MICROMSG_")));
  Object.assign(env, extraEnv);
  const child = spawn(bin, args, { stdio: ["ignore", log, log], env });
  child.name = name;
  children.push(child);
  return child;
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 3000);
  await exited;
  clearTimeout(timer);
}

async function startCore() {
  fs.rmSync(socket, { force: true });
  core = start("msgserver", ["--socket", socket, "--delivery", "ack"]);
  await waitFor("msgserver's socket", () => fs.existsSync(socket));
}

// Open connections get 1 s instead of 5 to finish when it stops (the restart case).
async function startHandler() {
  handler = start("msghandler", ["--socket", socket, "--listen", `127.0.0.1:${port}`], {
    MICROMSG_SHUTDOWN_GRACE: "1",
    MICROMSG_BACKEND_KEY: BACKEND_KEY,
  });
  await waitFor("msghandler's port", () => canConnect(port));
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "micromsg-browser-"));
  socket = path.join(dir, "msgserver.sock");
  port = await freePort();
  base = `http://127.0.0.1:${port}`;
  // ack delivery: what a page was given and did not acknowledge comes back (the
  // reload cases depend on it; x0 mode may lose what was in flight to a tab that
  // died). The default visibility_timeout (30 s) is kept on purpose: a reloaded
  // page gets what its predecessor left unread at once, by POST /v1/release.
  await startCore();
  await startHandler();
  browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  for (const child of children.reverse()) await stop(child);
  if (failed && dir) {
    for (const name of ["msgserver", "msghandler"]) {
      const log = path.join(dir, `${name}.log`);
      if (fs.existsSync(log)) console.error(`----- ${name}.log -----\n${fs.readFileSync(log, "utf8")}`);
    }
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// Opens /demo in a fresh context (its own sessionStorage) and waits for its session
// id. block.ws: the WebSocket to /v1/ws is closed by the test before any frame;
// block.sse: requests to /v1/events fail as a network error.
async function openDemo(block = {}, query = "") {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(e));
  // The library's own complaints; the browser's "connection failed" lines for the
  // blocked transports are expected.
  page.on("console", (m) => {
    if (m.type() === "error" && m.text().includes("micromsg")) page.errors.push(new Error(m.text()));
  });
  if (block.ws) await page.routeWebSocket(/\/v1\/ws/, (ws) => ws.close({ code: 1011, reason: "blocked by the test" }));
  if (block.sse) await page.route("**/v1/events**", (route) => route.abort("connectionrefused"));
  await page.goto(`${base}/demo${query}`);
  const session = await page.textContent("#session");
  assert.match(session, /\S/);
  return { page, session };
}

async function transportOf(page) {
  return page.evaluate(() => {
    const el = document.getElementById("transport");
    return el.dataset.state === "open" ? el.textContent : null;
  });
}

async function waitTransport(page, expected) {
  try {
    await waitFor(`transport ${expected}`, async () => (await transportOf(page)) === expected);
  } catch (e) {
    const shown = await page.textContent("#transport").catch(() => "?");
    throw new Error(`${e.message} (the page shows ${JSON.stringify(shown)})`);
  }
}

function received(page) {
  return page.$$eval("#received li", (lis) => lis.map((li) => ({ id: li.dataset.id, text: li.textContent })));
}

// Sends through the form, as a person would, and waits for the publish answer.
async function send(from, dst, field1, field2) {
  await from.fill("#dst", dst);
  await from.fill("#field1", field1);
  await from.fill("#field2", field2);
  await from.click("#send");
  await waitFor("the publish answer", async () => /^sent #\d+/.test(await from.textContent("#status")));
}

async function waitReceived(page, data) {
  const text = JSON.stringify(data);
  await waitFor(`${text} in #received`, async () => (await received(page)).some((r) => r.text === text));
}

// A sends to B and B back to A over the demo's form; each list ends up with exactly
// the one message sent to it.
async function exchange(a, b, tag) {
  await send(a.page, b.session, `hello ${tag}`, "from A");
  await waitReceived(b.page, { Field1: `hello ${tag}`, Field2: "from A" });
  await send(b.page, a.session, `re: ${tag}`, "from B");
  await waitReceived(a.page, { Field1: `re: ${tag}`, Field2: "from B" });
  assert.equal((await received(a.page)).length, 1);
  assert.equal((await received(b.page)).length, 1);
}

async function closeAll(...pages) {
  for (const { page } of pages) {
    assert.deepEqual(page.errors.map(String), [], "errors on the page");
    await page.context().close();
  }
}

describe("demo page", { timeout: 60_000 }, () => {
  test("default transports: WebSocket", { timeout: 20_000 }, async () => {
    const a = await openDemo();
    const b = await openDemo();
    await waitTransport(a.page, "websocket");
    await waitTransport(b.page, "websocket");
    await exchange(a, b, "ws");
    await closeAll(a, b);
  });

  test("WebSocket blocked: falls back to SSE", { timeout: 20_000 }, async () => {
    const a = await openDemo({ ws: true });
    const b = await openDemo({ ws: true });
    await waitTransport(a.page, "sse");
    await waitTransport(b.page, "sse");
    await exchange(a, b, "sse");
    await closeAll(a, b);
  });

  test("WebSocket and SSE blocked: falls back to long-poll", { timeout: 20_000 }, async () => {
    const a = await openDemo({ ws: true, sse: true });
    const b = await openDemo({ ws: true, sse: true });
    await waitTransport(a.page, "poll");
    await waitTransport(b.page, "poll");
    await exchange(a, b, "poll");
    await closeAll(a, b);
  });

  test("?transports=sse,poll forces the order", { timeout: 20_000 }, async () => {
    const a = await openDemo({}, "?transports=sse,poll");
    const b = await openDemo({}, "?transports=poll");
    await waitTransport(a.page, "sse");
    await waitTransport(b.page, "poll");
    await exchange(a, b, "forced");
    await closeAll(a, b);
  });

  // The library itself, loaded as an ES module: channel subscriptions, the answers'
  // shapes (the same over the WebSocket and over HTTP), refusals, close().
  for (const transports of [["websocket"], ["poll"]]) {
    test(`library API over ${transports}: module, channels, refusals`, { timeout: 20_000 }, async () => {
      const { page } = await openDemo();
      const out = await page.evaluate(async (transports) => {
        const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
        const module = await import("/v1/micromsg.mjs");
        const session = `lib-${Math.random().toString(36).slice(2)}`;
        const mm = new module.default({ session, transports });
        const got = [];
        const states = [];
        mm.on("message", (message, id) => got.push({ message, id }));
        mm.on("state", (state) => states.push(state));
        const opened = new Promise((resolve) => mm.on("state", (s) => s === "open" && resolve(mm.transport)));
        const transport = await opened;
        const channel = `news.${session}`;
        const sub = await mm.subscribe({ channel: "news.*" });
        const pub = await mm.publish({ target: { channel }, data: { n: 1 } });
        for (let i = 0; i < 200 && !got.length; i++) await sleep(25);
        const unsub = await mm.unsubscribe({ channel: "news.*" });
        const pub2 = await mm.publish({ target: { channel }, data: { n: 2 } });
        let refused = null;
        try {
          await mm.publish({ target: { user: "u1" }, data: {} });
        } catch (e) {
          refused = { name: e.name, exception_id: e.exception_id, status: e.status ?? null };
        }
        await sleep(300);
        mm.close();
        let afterClose = null;
        try {
          await mm.publish({ target: { session }, data: {} });
        } catch (e) {
          afterClose = e.exception_id;
        }
        return {
          same: module.default === module.MicroMsg && typeof module.default === "function",
          transport, channel, sub, pub, unsub, pub2, got, states, refused, afterClose, state: mm.state,
        };
      }, transports);
      assert.ok(out.same, "default and named export are the class");
      assert.equal(out.transport, transports[0]);
      assert.equal(out.sub.subscribed, true);
      assert.equal(typeof out.sub.complete, "boolean");
      assert.equal(out.pub.recipients, 1);
      assert.equal(out.got.length, 1, "one message: none after unsubscribing");
      assert.equal(out.got[0].id, out.pub.id);
      assert.deepEqual(out.got[0].message.target, { channel: out.channel });
      assert.deepEqual(out.got[0].message.data, { n: 1 });
      assert.equal(out.unsub.unsubscribed, 1);
      assert.equal(out.pub2.recipients, 0);
      assert.equal(out.refused?.exception_id, "Forbidden");
      assert.equal(out.afterClose, "Closed");
      assert.deepEqual(out.states, ["connecting", "open", "closed"]);
      assert.equal(out.state, "closed");
      await closeAll({ page });
    });
  }

  // A kicked session hears it over whichever transport it uses, and the client
  // stops (reconnecting would only be refused again).
  test("kicked: the page says so and stops, over each transport", { timeout: 20_000 }, async () => {
    const pages = [];
    for (const [block, expected] of [[{}, "websocket"], [{ ws: true }, "sse"], [{ ws: true, sse: true }, "poll"]]) {
      const p = await openDemo(block);
      await waitTransport(p.page, expected);
      pages.push(p);
    }
    for (const { page, session } of pages) {
      const reply = await fetch(`${base}/v1/backend/kick`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${BACKEND_KEY}` },
        body: JSON.stringify({ session, reason: "browser test" }),
      });
      assert.equal(reply.status, 200, await reply.clone().text());
      await waitFor(`${session} to show the kick`, async () => /^Kicked/.test(await page.textContent("#status")));
      await waitFor(`${session} to stop`, () => page.$eval("#transport", (el) => el.dataset.state === "closed"));
    }
    await closeAll(...pages);
  });

  // msghandler restarts under two open pages: they reconnect on their own (back on
  // the WebSocket), and what was sent meanwhile arrives.
  test("msghandler restart: pages reconnect and get what was sent meanwhile", { timeout: 25_000 }, async () => {
    const a = await openDemo();
    const b = await openDemo();
    await waitTransport(a.page, "websocket");
    await waitTransport(b.page, "websocket");
    await stop(handler);
    await waitFor("B to notice", async () => (await transportOf(b.page)) === null);
    await startHandler();
    // Sent by a third session over plain HTTP, maybe before B is back.
    const reply = await fetch(`${base}/v1/publish`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ session: "node-test", target: { session: b.session }, data: { Field1: "meanwhile", Field2: "node" } }),
    });
    assert.equal(reply.status, 200, await reply.clone().text());
    await waitReceived(b.page, { Field1: "meanwhile", Field2: "node" });
    await waitTransport(a.page, "websocket");
    await waitTransport(b.page, "websocket");
    await send(a.page, b.session, "after the restart", "from A");
    await waitReceived(b.page, { Field1: "after the restart", Field2: "from A" });
    assert.equal((await received(b.page)).length, 2);
    await closeAll(a, b);
  });

  // The core restarts (memory only: it forgets everything) under two open pages:
  // they carry on, with no error shown (CoreUnavailable only means "reconnect").
  test("msgserver restart: pages carry on without showing an error", { timeout: 25_000 }, async () => {
    const a = await openDemo();
    const b = await openDemo();
    await waitTransport(a.page, "websocket");
    await waitTransport(b.page, "websocket");
    await stop(core);
    await new Promise((r) => setTimeout(r, 1500)); // longer than msghandler's core_wait
    await startCore();
    await waitTransport(a.page, "websocket");
    await waitTransport(b.page, "websocket");
    // The first send may still meet the core coming up: the test, not the page,
    // retries it, as a person would click again.
    await waitFor("a send to go through", async () => {
      await send(a.page, b.session, "after the core restart", "from A").catch(() => {});
      return /^sent #/.test(await a.page.textContent("#status"));
    });
    await waitReceived(b.page, { Field1: "after the core restart", Field2: "from A" });
    for (const { page } of [a, b]) {
      assert.doesNotMatch(await page.textContent("#status"), /CoreUnavailable|ShuttingDown/);
    }
    await closeAll(a, b);
  });

  // B reloads twice while A publishes: every message shows up in B's list exactly
  // once (the list and what the library handled survive the reload in
  // sessionStorage), over every transport: the library acknowledges SSE events
  // itself (ack=client) and releases what a dying page left unread.
  for (const [name, block, expected] of [
    ["WebSocket", {}, "websocket"],
    ["SSE", { ws: true }, "sse"],
    ["long-poll", { ws: true, sse: true }, "poll"],
  ]) {
    test(`resume after a reload over ${name}: each message exactly once`, { timeout: 25_000 }, async (t) => {
      const a = await openDemo();
      const b = await openDemo(block);
      await waitTransport(a.page, "websocket");
      await waitTransport(b.page, expected);
      const count = 40;
      const sending = a.page.evaluate(
        async ({ dst, count }) => {
          const sent = [];
          for (let i = 0; i < count; i++) {
            const before = Date.now();
            const { id } = await window.mm.publish({ target: { session: dst }, data: { Field1: `n${i}`, Field2: "reload" } });
            sent.push({ id, before, after: Date.now() });
            await new Promise((r) => setTimeout(r, 20));
          }
          return sent;
        },
        { dst: b.session, count },
      );
      const reloads = []; // [from, to]: from the reload until the page is open again
      const reloading = (async () => {
        for (const wait of [150, 300]) {
          await new Promise((r) => setTimeout(r, wait));
          const from = Date.now();
          await b.page.reload();
          assert.equal(await b.page.textContent("#session"), b.session, "the session survives a reload");
          await waitTransport(b.page, expected);
          reloads.push([from, Date.now()]);
        }
      })();
      const [sent] = await Promise.all([sending, reloading]);
      const ids = sent.map((s) => s.id);
      const want = Array.from({ length: count }, (_, i) => JSON.stringify({ Field1: `n${i}`, Field2: "reload" }));
      try {
        // Well inside the 30 s visibility timeout: nothing may wait for it.
        await waitFor(`${count} messages in B's list`, async () => (await received(b.page)).length >= count);
      } catch (e) {
        const texts = (await received(b.page)).map((r) => r.text);
        const missing = want.filter((w) => !texts.includes(w));
        e.message += `: got ${texts.length}, missing ${missing.join(" ")} (reloads ${JSON.stringify(reloads)})`;
        throw e;
      }
      await new Promise((r) => setTimeout(r, 300)); // a duplicate would show up by now
      const got = await received(b.page);
      assert.deepEqual(got.map((r) => r.text).sort(), [...want].sort(), "each message exactly once");
      const byValue = (x, y) => x - y;
      const gotIds = got.map((r) => Number(r.id)).sort(byValue);
      assert.equal(new Set(gotIds).size, gotIds.length, "no id twice");
      assert.ok(gotIds.every((id) => ids.includes(id)), "with the ids publish answered");
      assert.equal(await transportOf(b.page), expected);
      await closeAll(a, b);
    });
  }
});

// auth = "token": a second msghandler on the same core requires tokens, which the
// test signs as an application's backend would (jose), with a short life so that
// they run out while the page is connected.
describe("tokens", { timeout: 60_000 }, () => {
  let tokenBase;
  before(async () => {
    const tokenPort = await freePort();
    tokenBase = `http://127.0.0.1:${tokenPort}`;
    start("msghandler", ["--socket", socket, "--listen", `127.0.0.1:${tokenPort}`], {
      MICROMSG_AUTH: "token",
      MICROMSG_TOKEN_SECRET: TOKEN_SECRET,
      MICROMSG_TOKEN_LEEWAY: "0",
      MICROMSG_BACKEND_KEY: BACKEND_KEY,
    });
    await waitFor("the token msghandler's port", () => canConnect(tokenPort));
  });

  function sign(claims, seconds) {
    return new SignJWT(claims)
      .setProtectedHeader({ alg: "HS256" })
      .setExpirationTime(Math.floor(Date.now() / 1000) + seconds)
      .sign(new TextEncoder().encode(TOKEN_SECRET));
  }

  async function backendPublish(session, data) {
    const reply = await fetch(`${tokenBase}/v1/backend/publish`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${BACKEND_KEY}` },
      body: JSON.stringify({ target: { session }, data }),
    });
    assert.equal(reply.status, 200, await reply.clone().text());
  }

  // A page of the token msghandler's origin with the library and a client whose
  // token function asks the test (standing in for the app's backend) for a token.
  async function openClient(transport, session, claimsFor) {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.tokens = 0;
    await page.exposeFunction("fetchToken", async () => {
      page.tokens++;
      return sign(claimsFor(session), 3);
    });
    await page.goto(`${tokenBase}/v1/micromsg.js`);
    await page.addScriptTag({ url: "/v1/micromsg.js" });
    await page.evaluate(
      ([session, transport]) => {
        window.got = [];
        window.errors = [];
        window.mm = new MicroMsg({ session, transports: [transport], token: () => window.fetchToken() });
        window.mm.on("message", (m) => window.got.push(m.data));
        window.mm.on("error", (e) => window.errors.push(e.exception_id));
      },
      [session, transport],
    );
    return page;
  }

  const got = (page) => page.evaluate(() => window.got);

  for (const transport of ["websocket", "sse", "poll"]) {
    test(`${transport}: messages keep coming across token expiry, with fresh tokens`, { timeout: 25_000 }, async () => {
      const session = `tok-${transport}-${Date.now()}`;
      const page = await openClient(transport, session, (sid) => ({ sid }));
      await waitFor("the client to open", () => page.evaluate(() => window.mm.state === "open"));
      await backendPublish(session, { n: 1 });
      await waitFor("message 1", async () => (await got(page)).length === 1);
      // The first token has run out: the WebSocket was closed with 4401, the event
      // stream ended with TokenExpired, a poll was refused with 401.
      await new Promise((r) => setTimeout(r, 4000));
      await backendPublish(session, { n: 2 });
      await waitFor("message 2", async () => (await got(page)).length === 2);
      assert.deepEqual(await got(page), [{ n: 1 }, { n: 2 }]);
      assert.ok(page.tokens >= 2, `fetched ${page.tokens} tokens`);
      assert.deepEqual(await page.evaluate(() => window.errors), [], "the app heard of no error");
      await page.context().close();
    });
  }

  test("a token for another session is refused and the app hears why", { timeout: 20_000 }, async () => {
    const page = await openClient("websocket", `tok-mine-${Date.now()}`, () => ({ sid: "someone-else" }));
    await waitFor("the refusal", async () => (await page.evaluate(() => window.errors)).includes("Forbidden"));
    assert.notEqual(await page.evaluate(() => window.mm.state), "open");
    await page.context().close();
  });
});
