// micromsg browser client: WebSocket, Server-Sent Events or long-polling to
// msghandler, one API for all three (docs/TRANSPORTS.md is the contract).
//
//   const mm = new MicroMsg({session: "tab-123"});
//   // or, when msghandler has auth = "token", with a token the app's backend signed:
//   const mm = new MicroMsg({session, token: () => fetch("/app/token").then((r) => r.text())});
//   mm.on("message", (message, id) => ...);
//   await mm.publish({target: {session: "tab-456"}, data: {...}});
//
// Served as /v1/micromsg.js (a classic script: defines globalThis.MicroMsg) and as
// /v1/micromsg.mjs (this same file with `export default MicroMsg; export { MicroMsg };`
// appended). Hence: no build step, no import/export here, and every top-level name
// carries the MicroMsg / MICROMSG_ prefix so that it clashes with nothing on a page.
"use strict";

const MICROMSG_TRANSPORTS = ["websocket", "sse", "poll"];
const MICROMSG_BACKOFF_MIN_MS = 500; // first reconnect delay (before jitter)
const MICROMSG_BACKOFF_MAX_MS = 30000; // the doubling stops here
// A connection that stayed up this long counts as healthy: its loss starts the
// backoff from the beginning again. Without it a server that accepts and at once
// drops connections would be hammered every 0.5 s forever.
const MICROMSG_STABLE_MS = 10000;
const MICROMSG_OPEN_TIMEOUT_MS = 10000; // a transport that is not open by then failed
// Running on a fallback transport, try the preferred one again after this long,
// doubling (up to the maximum) each time it still fails...
const MICROMSG_PROMOTE_MS = 60000;
const MICROMSG_PROMOTE_MAX_MS = 600000;
// ... or after this long when the preferred one probably failed because the server
// was away rather than because something blocks it: it has worked for this client
// before, or every transport had failed before the fallback opened.
const MICROMSG_PROMOTE_SOON_MS = 2000;
const MICROMSG_WS_WINDOW = 32; // prefetch window asked for over WebSocket
// WebSocket liveness: browsers answer the server's pings without telling us, so a
// dead network would go unnoticed until TCP gives up. After this much silence we
// send an application ping and expect some frame back within the wait.
const MICROMSG_WS_IDLE_MS = 25000;
const MICROMSG_WS_PONG_WAIT_MS = 10000;
const MICROMSG_POLL_TIMEOUT_S = 20; // long-poll timeout asked for (the core caps it)
const MICROMSG_POLL_MAX = 100;
const MICROMSG_SEEN_MAX = 200; // handled ids remembered exactly (see MicroMsgSeen)
const MICROMSG_STORAGE_PREFIX = "micromsg.seen.";

/** A refusal from msghandler ({exception_id, exception}) or a client-side failure. */
class MicroMsgError extends Error {
  constructor(exception_id, exception, status) {
    super(`${exception_id}: ${exception}`);
    this.name = "MicroMsgError";
    this.exception_id = exception_id;
    this.exception = exception;
    if (status !== undefined) this.status = status; // HTTP status, when there was one
  }
}

// Which message ids this session has handled: every id up to `floor`, and the ids
// in `ids` above it. A plain "highest id handled" is not enough: a message given to
// a connection that died (a tab reloaded just as a poll answered) comes back later,
// after higher ids were handled, and must still be handled once. The most recent
// MICROMSG_SEEN_MAX ids are kept exactly; when one more comes, the lowest is folded
// into the floor. Kept per session in sessionStorage (when there is one), so that a
// reloaded tab that keeps its session goes on where it stopped.
class MicroMsgSeen {
  constructor(session) {
    this.key = MICROMSG_STORAGE_PREFIX + session;
    this.floor = 0;
    this.ids = new Set();
    try {
      const saved = JSON.parse(globalThis.sessionStorage.getItem(this.key) || "null");
      if (saved && Number.isSafeInteger(saved.floor) && Array.isArray(saved.ids)) {
        this.floor = saved.floor;
        this.ids = new Set(saved.ids.filter((id) => Number.isSafeInteger(id) && id > saved.floor));
      }
    } catch {
      // no storage (worker, privacy mode) or garbage in it: start afresh
    }
  }

  has(id) {
    return id <= this.floor || this.ids.has(id);
  }

  // The highest id handled: the resume point (since, last_event_id).
  get last() {
    let last = this.floor;
    for (const id of this.ids) if (id > last) last = id;
    return last;
  }

  add(id) {
    this.ids.add(id);
    if (this.ids.size > MICROMSG_SEEN_MAX) {
      const lowest = Math.min(...this.ids);
      this.ids.delete(lowest);
      this.floor = lowest;
    }
    try {
      globalThis.sessionStorage.setItem(this.key, JSON.stringify({ floor: this.floor, ids: [...this.ids] }));
    } catch {
      // see the constructor
    }
  }
}

// Refusals that mean "try again": reconnecting is the answer, not the app's business
// (over WebSocket and SSE they come just before the server closes the connection).
const MICROMSG_TRANSIENT = new Set(["CoreUnavailable", "ShuttingDown"]);
// Refusals of the token itself (auth = "token"): with a token function, the client
// fetches a new token and tries again instead of telling the app.
const MICROMSG_TOKEN_ERRORS = new Set(["TokenExpired", "InvalidToken", "Unauthorized"]);

function microMsgSupported(transport) {
  if (transport === "websocket") return typeof globalThis.WebSocket === "function";
  if (transport === "sse") return typeof globalThis.EventSource === "function";
  return transport === "poll" && typeof globalThis.fetch === "function";
}

// Turns a WebSocket answer frame into what the same request answers over HTTP, so
// that a caller sees one shape whichever way its request went.
function microMsgAnswer(op, frame) {
  const out = Object.assign({}, frame);
  delete out.op;
  delete out.ref;
  if (op === "subscribe") out.subscribed = true;
  if (op === "unsubscribe") {
    out.unsubscribed = out.count;
    delete out.count;
  }
  return out;
}

function microMsgSubKey(sub) {
  return JSON.stringify([sub.channel, sub.subject ?? null, sub.group ?? null]);
}

class MicroMsg {
  /**
   * @param {{url?: string, session: string, transports?: string[],
   *          token?: string | (() => string | Promise<string>)}} options
   *   url: base URL of msghandler ("" = same origin); session: this client's
   *   session id; transports: order of preference among "websocket", "sse", "poll";
   *   token: the session's token when msghandler requires one, or a function that
   *   fetches a fresh one (called before the first connection and whenever the
   *   token in use is refused or expires).
   */
  constructor(options = {}) {
    if (!options.session) throw new TypeError("MicroMsg: options.session is required");
    this.url = String(options.url ?? "").replace(/\/+$/, "");
    this.session = String(options.session);
    const wanted = options.transports ?? MICROMSG_TRANSPORTS;
    for (const t of wanted) {
      if (!MICROMSG_TRANSPORTS.includes(t)) throw new TypeError(`MicroMsg: unknown transport ${t}`);
    }
    this.transports = wanted.filter(microMsgSupported);
    if (!this.transports.length) throw new TypeError("MicroMsg: none of the transports works here");
    this.state = "connecting"; // "connecting" | "open" | "closed"
    this.transport = null; // the transport in use while open
    this._seen = new MicroMsgSeen(this.session);
    this._tokenSource = options.token ?? null;
    this._token = typeof this._tokenSource === "function" ? null : this._tokenSource;
    this._tokenStale = false; // the token in use was refused: fetch another first

    this._handlers = { message: [], state: [], error: [] };
    this._subs = new Map(); // subscriptions to restore on reconnect, by their keys
    this._pending = new Map(); // WebSocket requests awaiting an answer, by ref
    this._ref = 0;
    this._conn = null; // the current connection attempt or connection
    this._index = 0; // which of this.transports it uses
    this._failures = 0; // consecutive failures: the backoff exponent
    this._failedKinds = new Set(); // transports that failed to open since the last open
    this._workedKinds = new Set(); // transports that opened at least once
    this._promoteDelay = 0; // last delay before trying the preferred transport again
    this._closed = false;
    this._emitted = null; // last state told to "state" callbacks
    // msg_id prefix for WebSocket publishes (see _request).
    this._msgIdPrefix = `mm-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}-`;
    this._msgIdSeq = 0;
    // Connect on the next tick, so that handlers registered right after `new` see
    // the first "connecting".
    this._retryTimer = setTimeout(() => this._connect(), 0);
  }

  /** The highest id handed to callbacks: where a reconnect resumes. */
  get lastId() {
    return this._seen.last;
  }

  /** Registers a callback for "message" (message, id), "state" (state) or "error" (error). */
  on(event, callback) {
    if (!this._handlers[event]) throw new TypeError(`MicroMsg: unknown event ${event}`);
    this._handlers[event].push(callback);
    return this;
  }

  /** {channel, subject?, group?, since?} -> {subscribed, recovered, complete} */
  async subscribe(options) {
    const sub = Object.assign({}, options);
    const answer = await this._request("subscribe", sub);
    delete sub.since; // a resume passes the last id handled instead
    this._subs.set(microMsgSubKey(sub), sub);
    return answer;
  }

  /** {channel, subject?, group?} -> {unsubscribed} */
  async unsubscribe(options) {
    const sub = Object.assign({}, options);
    delete sub.since;
    this._subs.delete(microMsgSubKey(sub));
    return this._request("unsubscribe", sub);
  }

  /** {target?, subject?, reference?, data, ttl?, msg_id?, expect_reply?} -> {id, recipients, ...} */
  publish(options) {
    return this._request("publish", Object.assign({}, options));
  }

  /** Stops for good: closes the connection, rejects requests still waiting. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._retryTimer);
    if (this._conn) this._drop(this._conn);
    for (const p of this._pending.values()) p.reject(new MicroMsgError("Closed", "the client was closed"));
    this._pending.clear();
    this._setState("closed");
  }

  // ---- connection management ----------------------------------------------------

  _connect() {
    this._retryTimer = null;
    if (this._closed) return;
    this._setState("connecting");
    const kind = this.transports[this._index];
    const conn = { kind, open: false, openedAt: 0, close() {}, send: null };
    this._conn = conn;
    conn.openTimer = setTimeout(() => this._lost(conn), MICROMSG_OPEN_TIMEOUT_MS);
    // What an earlier connection or page of this session was handed and never
    // acknowledged (a poll answer or SSE events that reached a dying page) comes
    // back at once, instead of after the core's visibility timeout. Failing that
    // (msghandler away), the transport's own failure says so.
    this._tokenNow()
      .then(() => this._http("release", {}, undefined, 5000).catch(() => {}))
      .catch((e) => {
        // The token function failed (the app's backend is away, the user logged out).
        this._emitError(new MicroMsgError("TokenUnavailable", String(e?.message ?? e)));
        if (conn === this._conn) this._lost(conn);
      })
      .then(() => {
        if (conn !== this._conn || this._closed) return;
        try {
          if (kind === "websocket") this._openWebSocket(conn);
          else if (kind === "sse") this._openSse(conn);
          else this._openPoll(conn);
        } catch (e) {
          // e.g. a URL the WebSocket constructor refuses: counts as failing to open.
          console.warn("micromsg:", kind, e);
          this._lost(conn);
        }
      });
  }

  // ---- tokens -------------------------------------------------------------------

  // The token to send, fetching a fresh one first when there is none yet or the
  // last one was refused.
  async _tokenNow() {
    if (typeof this._tokenSource !== "function") return this._token;
    if (this._token === null || this._tokenStale) {
      this._tokenStale = false;
      this._token = String(await this._tokenSource());
    }
    return this._token;
  }

  // Whether a refusal is of the token, which a token function can fix: the next
  // connection or request then fetches a new one. Refused again and again (fresh
  // tokens included), it is the app's to hear about: its backend signs tokens that
  // msghandler does not take.
  _tokenRefused(exceptionId) {
    if (typeof this._tokenSource !== "function" || !MICROMSG_TOKEN_ERRORS.has(exceptionId)) return false;
    this._tokenStale = true;
    this._tokenRefusals = (this._tokenRefusals ?? 0) + 1;
    return this._tokenRefusals <= 2;
  }

  // The transport works: it answered (WebSocket welcome, SSE stream, first poll).
  _opened(conn) {
    if (conn !== this._conn || conn.open) return;
    conn.open = true;
    conn.openedAt = Date.now();
    this._tokenRefusals = 0;
    clearTimeout(conn.openTimer);
    this.transport = conn.kind;
    const resume = this._workedKinds.size > 0; // opened before: this is a reconnect
    this._setState("open");
    // Subscriptions live in the core, but a session that was away longer than the
    // core's session_timeout, or a memory-only core that restarted, has lost them:
    // subscribe again, asking for what the channels' history holds after the last id
    // we handled. Copies of what is still queued come back with ids we have already
    // seen and are skipped. (Not on the first open: subscribe() has just done it.)
    if (resume) {
      for (const sub of this._subs.values()) {
        const body = Object.assign({}, sub, this.lastId > 0 ? { since: this.lastId } : {});
        this._request("subscribe", body).catch((e) => this._emitError(e));
      }
    }
    const outage = this._failedKinds.size === this.transports.length;
    this._failedKinds.clear();
    this._workedKinds.add(conn.kind);
    if (this._index > 0) {
      // On a fallback: try the preferred transport again later.
      if (this._promoteDelay) {
        this._promoteDelay = Math.min(this._promoteDelay * 2, MICROMSG_PROMOTE_MAX_MS);
      } else {
        const soon = outage || this._workedKinds.has(this.transports[0]);
        this._promoteDelay = soon ? MICROMSG_PROMOTE_SOON_MS : MICROMSG_PROMOTE_MS;
      }
      const delay = this._promoteDelay * (0.5 + Math.random() / 2);
      conn.promoteTimer = setTimeout(() => {
        if (conn !== this._conn) return;
        this._drop(conn);
        this._index = 0;
        this._failures = 0; // the fallback worked: no reason to wait long for it again
        this._connect();
      }, delay);
    } else {
      this._promoteDelay = 0;
    }
  }

  // Tears a connection down without deciding what comes next.
  _drop(conn) {
    if (this._conn === conn) this._conn = null;
    clearTimeout(conn.openTimer);
    clearTimeout(conn.promoteTimer);
    clearInterval(conn.pingTimer);
    try {
      conn.close();
    } catch {
      // already closed
    }
    this.transport = null;
    // WebSocket requests that got no answer go again over HTTP. Safe: subscribing
    // and unsubscribing are idempotent and publishes carry a msg_id (see _request).
    for (const [ref, p] of this._pending) {
      if (p.conn !== conn) continue;
      this._pending.delete(ref);
      if (this._closed) p.reject(new MicroMsgError("Closed", "the client was closed"));
      else this._http(p.op, p.body).then(p.resolve, p.reject);
    }
  }

  // The connection failed to open or ended: reconnect after a backoff.
  _lost(conn) {
    if (conn !== this._conn) return; // an old connection's late event
    this._drop(conn);
    if (this._closed) return;
    if (conn.open) {
      // It worked and then dropped: start over from the preferred transport.
      if (Date.now() - conn.openedAt >= MICROMSG_STABLE_MS) this._failures = 0;
      this._index = 0;
    } else {
      // It never opened: the next transport (wrapping round to the preferred one).
      this._failedKinds.add(conn.kind);
      this._index = (this._index + 1) % this.transports.length;
    }
    this._failures++;
    this._setState("connecting");
    // Exponential backoff with full jitter: uniformly random up to the cap, so that
    // many tabs cut off by one outage do not all come back at the same moment.
    const cap = Math.min(MICROMSG_BACKOFF_MAX_MS, MICROMSG_BACKOFF_MIN_MS * 2 ** (this._failures - 1));
    this._retryTimer = setTimeout(() => this._connect(), Math.random() * cap);
  }

  // ---- the three transports --------------------------------------------------------

  _openWebSocket(conn) {
    const url = new URL(`${this.url}/v1/ws`, globalThis.location?.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ session: this.session, flow: "window", window: String(MICROMSG_WS_WINDOW) });
    // A browser cannot set headers on a WebSocket: the token goes in the URL.
    if (this._token) url.searchParams.set("token", this._token);
    const ws = new WebSocket(url.href);
    ws.binaryType = "arraybuffer";
    conn.close = () => {
      ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close(1000);
    };
    conn.send = (frame) => ws.send(JSON.stringify(frame));
    conn.lastSeen = Date.now();
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (event) => {
      if (event.code === 4401 && typeof this._tokenSource === "function") this._tokenStale = true;
      this._lost(conn);
    };
    ws.onmessage = (event) => {
      if (conn !== this._conn) return;
      conn.lastSeen = Date.now();
      let frame;
      try {
        const text = typeof event.data === "string" ? event.data : new TextDecoder().decode(event.data);
        frame = JSON.parse(text);
      } catch {
        console.warn("micromsg: a WebSocket frame that is not JSON");
        return;
      }
      this._wsFrame(conn, frame);
    };
  }

  _wsFrame(conn, frame) {
    switch (frame.op) {
      case "welcome":
        this._opened(conn);
        conn.pingTimer = setInterval(() => this._wsCheck(conn), MICROMSG_WS_PONG_WAIT_MS / 2);
        return;
      case "message":
        this._deliver(frame.message, frame.id);
        // Acknowledged after the callbacks ran, so that the window (flow "window")
        // makes room only for messages really handled; copies we skipped as well.
        // By id, not by cursor: a lower id given after a higher one (given again
        // after a connection died, or from a higher-priority channel) may already
        // be on its way unhandled, and a cursor would acknowledge it.
        conn.send({ op: "ack", ids: [frame.id] });
        return;
      case "error": {
        const p = this._pending.get(frame.ref);
        const error = new MicroMsgError(frame.exception_id, frame.exception);
        if (frame.ref !== undefined && p) {
          this._pending.delete(frame.ref);
          p.reject(error);
        } else if (!MICROMSG_TRANSIENT.has(error.exception_id) && !this._tokenRefused(error.exception_id)) {
          this._emitError(error); // e.g. Kicked, before the server closes with 4403
        }
        return;
      }
      default: {
        // published, subscribed, unsubscribed: answers to our requests. Others
        // (pong, acked, ok) need nothing beyond the lastSeen update already done.
        const p = frame.ref !== undefined && this._pending.get(frame.ref);
        if (p) {
          this._pending.delete(frame.ref);
          p.resolve(microMsgAnswer(p.op, frame));
        }
      }
    }
  }

  _wsCheck(conn) {
    const now = Date.now();
    if (conn.pingSent && conn.lastSeen < conn.pingSent) {
      if (now - conn.pingSent > MICROMSG_WS_PONG_WAIT_MS) this._lost(conn); // no answer: dead
    } else if (now - conn.lastSeen > MICROMSG_WS_IDLE_MS) {
      conn.pingSent = now;
      conn.send({ op: "ping" });
    }
  }

  _openSse(conn) {
    // ack=client: written is not read, so we acknowledge what we handled ourselves
    // (POST /v1/ack) rather than let the stream count it acknowledged once written.
    const query = new URLSearchParams({ session: this.session, ack: "client" });
    // We open every EventSource ourselves (closing the old one on any error) rather
    // than letting the browser reconnect, so Last-Event-ID is never sent: the resume
    // point is always the query parameter, taken from the last id handled.
    if (this.lastId > 0) query.set("last_event_id", String(this.lastId));
    if (this._token) query.set("token", this._token);
    const es = new EventSource(`${this.url}/v1/events?${query}`);
    conn.close = () => es.close();
    es.onopen = () => this._opened(conn);
    es.addEventListener("message", (event) => {
      if (conn !== this._conn) return;
      this._opened(conn); // in case the first event beat the open event
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        console.warn("micromsg: an SSE event that is not JSON");
        return;
      }
      this._deliver(message, event.lastEventId);
      this._sseAck(event.lastEventId);
    });
    // "error" is both the connection failing (a plain Event) and the server's
    // `event: error` (a MessageEvent carrying the JSON error body, after which the
    // stream ends and a plain error follows).
    es.addEventListener("error", (event) => {
      if (conn !== this._conn) return;
      if (typeof event.data === "string") {
        let body = {};
        try {
          body = JSON.parse(event.data);
        } catch {
          // keep the empty body
        }
        const error = new MicroMsgError(body.exception_id ?? "Error", body.exception ?? event.data);
        if (!MICROMSG_TRANSIENT.has(error.exception_id) && !this._tokenRefused(error.exception_id)) this._emitError(error);
        return;
      }
      // EventSource shows nothing of why a stream did not open: a refused token
      // looks like any failure, so a stream that never opened gets a fresh one.
      if (!conn.open && typeof this._tokenSource === "function") this._tokenStale = true;
      this._lost(conn);
    });
  }

  async _openPoll(conn) {
    const abort = new AbortController();
    conn.close = () => abort.abort();
    try {
      // What a previous connection (or page) handled but may not have acknowledged.
      if (this._seen.ids.size) await this._http("ack", { ids: [...this._seen.ids] }, abort.signal);
      // The first poll answers at once: it says whether the transport works.
      let timeout = 0;
      while (conn === this._conn) {
        const reply = await this._http(
          "poll",
          { timeout, max: MICROMSG_POLL_MAX, auto_ack: false },
          abort.signal,
          (timeout + 15) * 1000, // an answer that does not come: the network is gone
        );
        // A reply that arrived although we switched away meanwhile is still handed
        // on: its messages were given to this session and are not given again until
        // the core's visibility timeout.
        if (this._closed) return;
        this._opened(conn);
        const messages = reply.messages ?? [];
        const ids = reply.ids ?? [];
        messages.forEach((m, i) => this._deliver(m, ids[i]));
        // After the callbacks ran, by id (see the WebSocket's ack): this batch,
        // copies we skipped included.
        if (ids.length) await this._http("ack", { ids }, abort.signal);
        timeout = MICROMSG_POLL_TIMEOUT_S;
      }
    } catch (e) {
      if (conn !== this._conn) return; // we aborted it ourselves
      // A refusal other than "try again" deserves a word; network errors and
      // transient refusals are what reconnecting is for.
      // (5xx: CoreUnavailable, ShuttingDown, or a proxy in front that lost msghandler.)
      if (e instanceof MicroMsgError && e.status >= 400 && e.status < 500 && !this._tokenRefused(e.exception_id)) this._emitError(e);
      this._lost(conn);
    }
  }

  // Acknowledges SSE events after the callbacks ran, a few at a time: one POST per
  // burst, not per event. A lost acknowledgement only means the event comes again,
  // and is then dropped as handled.
  _sseAck(id) {
    id = Number(id);
    if (!Number.isSafeInteger(id) || id <= 0) return;
    (this._sseAcks ??= []).push(id);
    if (this._sseAckTimer) return;
    this._sseAckTimer = setTimeout(() => {
      this._sseAckTimer = null;
      const ids = this._sseAcks.splice(0);
      this._http("ack", { ids }).catch(() => {});
    }, 20);
  }

  // ---- requests --------------------------------------------------------------------

  // Over the WebSocket when that is the open transport, else POST /v1/<op>.
  _request(op, body) {
    if (this._closed) return Promise.reject(new MicroMsgError("Closed", "the client was closed"));
    const conn = this._conn;
    if (!conn || !conn.open || conn.kind !== "websocket") return this._http(op, body);
    // A publish whose connection drops before the answer is sent again over HTTP;
    // an idempotency key makes sure that the core stores it once.
    if (op === "publish" && body.msg_id === undefined) body = Object.assign({}, body, { msg_id: this._msgIdPrefix + ++this._msgIdSeq });
    return new Promise((resolve, reject) => {
      const ref = ++this._ref;
      this._pending.set(ref, { op, body, conn, resolve, reject });
      try {
        conn.send(Object.assign({}, body, { op, ref }));
      } catch {
        // The socket is closing: its close event will re-send this over HTTP.
      }
    });
  }

  // POST /v1/<op>; a refusal of the token, with a token function, is retried once
  // with a fresh token.
  async _http(op, body, signal, timeoutMs) {
    try {
      return await this._httpOnce(op, body, signal, timeoutMs);
    } catch (e) {
      if (!(e instanceof MicroMsgError) || e.status !== 401 || !this._tokenRefused(e.exception_id)) throw e;
      await this._tokenNow();
      return this._httpOnce(op, body, signal, timeoutMs);
    }
  }

  async _httpOnce(op, body, signal, timeoutMs) {
    const controller = new AbortController();
    const cancel = () => controller.abort();
    signal?.addEventListener("abort", cancel);
    const timer = timeoutMs ? setTimeout(cancel, timeoutMs) : null;
    try {
      const response = await fetch(`${this.url}/v1/${op}`, {
        method: "POST",
        headers: Object.assign(
          { "Content-Type": "application/json" },
          this._token ? { Authorization: `Bearer ${this._token}` } : {},
        ),
        body: JSON.stringify(Object.assign({}, body, { session: this.session })),
        cache: "no-store",
        signal: controller.signal,
      });
      let json = null;
      try {
        json = await response.json();
      } catch {
        // not JSON: reported below
      }
      if (!response.ok || !json || json.error) {
        throw new MicroMsgError(json?.exception_id ?? "HttpError", json?.exception ?? `HTTP ${response.status}`, response.status);
      }
      return json;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", cancel);
    }
  }

  // ---- delivery and events -------------------------------------------------------------

  // Hands a message to the "message" callbacks unless it was handled already: a copy
  // given again after a reconnect, a resume or a transport switch.
  _deliver(message, id) {
    id = Number(id);
    if (Number.isSafeInteger(id) && id > 0) {
      if (this._seen.has(id)) return;
      this._seen.add(id);
    }
    for (const callback of this._handlers.message) {
      try {
        callback(message, id);
      } catch (e) {
        // A failing callback must not stall delivery; the message still counts as
        // handled (and is acknowledged), as redelivering it would fail again.
        console.error("micromsg: message callback failed", e);
      }
    }
  }

  _emitError(error) {
    const info = { exception_id: error.exception_id ?? "Error", exception: error.exception ?? String(error) };
    this._emit("error", info);
    // A kicked session is refused for a while: reconnecting would only be refused again.
    if (info.exception_id === "Kicked") this.close();
  }

  _setState(state) {
    this.state = state;
    if (this._emitted === state) return;
    this._emitted = state;
    this._emit("state", state);
  }

  _emit(event, value) {
    for (const callback of this._handlers[event]) {
      try {
        callback(value);
      } catch (e) {
        console.error(`micromsg: ${event} callback failed`, e);
      }
    }
  }
}

MicroMsg.Error = MicroMsgError;
globalThis.MicroMsg = MicroMsg;
