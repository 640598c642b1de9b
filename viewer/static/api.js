// The HTTP API of docs/viewer-api.md: JSON helpers, the binary series format,
// and a Server-Sent Events stream that reconnects with backoff.  Every URL is
// relative to the page (`api/...`), so the server may live under a --base-url.

import { koboState } from "./state.js";
import { authFailed, session } from "./session.js";

export class ApiError extends Error {
  constructor(status, message, url) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.url = url;
  }
}

const enc = encodeURIComponent;

/** "api/runs/<p>/<r>" (relative to the page) for a "project/run_id" key. */
export function runBase(key) {
  const i = key.indexOf("/");
  return `api/runs/${enc(key.slice(0, i))}/${enc(key.slice(i + 1))}`;
}

export function query(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    p.set(k, String(v));
  }
  const s = p.toString();
  return s ? "?" + s : "";
}

async function errorFrom(resp, url) {
  let msg = `${resp.status} ${resp.statusText}`;
  try {
    const text = await resp.text();
    try {
      const j = JSON.parse(text);
      if (j && j.error) msg = j.error;
    } catch (_) {
      if (text && text.length < 300 && !/<html/i.test(text)) msg = text.trim() || msg;
    }
  } catch (_) { /* body unreadable */ }
  if ((resp.status === 401 || resp.status === 403) && session.mode !== "serve" && !msg.includes("kobo open")) {
    msg += " (open the URL that `kobo open` printed, with its ?token=, to sign in)";
  }
  return new ApiError(resp.status, msg, url);
}

/**
 * The answer index.html's boot script asked for early (before the modules loaded), taken once:
 * a Promise of {response, json} (json: the parsed body of a 2xx answer), or for a series
 * {width, buffer: Promise of its bytes}; undefined when there is none.
 */
function takeEarly(url) {
  const boot = window.koboBoot;
  return boot ? boot.take(url) : undefined;
}

/** GET `url`, or take `answered` (a Response the boot script already has) through the same checks. */
async function doFetch(url, opts = {}, answered = null) {
  if (session.leaving) return new Promise(() => {});   // going to the login page: nothing more to ask
  let resp = answered;
  try {
    if (!resp) resp = await fetch(url, { credentials: "same-origin", cache: "no-store", ...opts });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the viewer server (${e && e.message ? e.message : e})`, url);
  }
  if (resp.status === 401 || resp.status === 403) {
    // kobo-serve: the session ended (expired, logged out, user removed) -> the login page;
    // `kobo open`: a banner says to open the printed URL again (and the error is reported)
    if (await authFailed(resp.status) === "login") return new Promise(() => {});   // the page is leaving
  }
  if (!resp.ok) throw await errorFrom(resp, url);
  return resp;
}

export async function getJSON(url, opts) {
  const early = opts ? undefined : takeEarly(url);
  if (early) {
    let got = null;
    try { got = await early; } catch (_) { /* it failed: ask again below, and report that */ }
    if (got && got.json !== undefined) return got.json;   // already read and parsed: no task to wait for
    if (got) return (await doFetch(url, opts, got.response)).json();   // an error answer
  }
  const resp = await doFetch(url, opts);
  return resp.json();
}

export const api = {
  runs: (params, opts) => getJSON("api/runs" + query(params || {}), opts),
  summary: (key, opts) => getJSON(runBase(key), opts),
  items: (key, kind, name, rank, extra, opts) =>
    getJSON(`${runBase(key)}/${kind}` + query({ name, rank, ...(extra || {}) }), opts),
  logs: (key, params, opts) => getJSON(`${runBase(key)}/logs` + query(params || {}), opts),
  runEvents: (key, opts) => getJSON(`${runBase(key)}/run-events`, opts),
  csvUrl: (key, metric, rank) => `${runBase(key)}/series.csv` + query({ metric, rank }),
};

/**
 * GET .../series as binary. Returns {header, arrays: {x, y, ys|lo, hi}, bytes, timing, width, early}.
 * Arrays are Float64Array views into the response buffer (no copy) when the
 * header's padding keeps them 8-byte aligned, as the API promises.
 * A whole-range request may be answered by the boot script's early request for the same
 * series when that was reduced for a width in [width, 2 * width]: `width` is then its width.
 */
export async function fetchSeries(key, params, opts) {
  const t0 = performance.now();
  const whole = !("x0" in params || "x1" in params || "start" in params || "end" in params);
  if (!opts && params.width && whole && window.koboBoot) {
    const { width: _, ...rest } = params;
    await window.koboBoot.ready;   // the boot script has made its series requests (or none)
    const e = takeEarly(`${runBase(key)}/series` + query(rest));
    if (e && e.width >= params.width && e.width <= 2 * params.width) {
      let buf = null;
      try { buf = await e.buffer; } catch (_) { /* not in that answer: ask for it below */ }
      if (buf) {
        const parsed = parseSeries(buf);
        return Object.assign(parsed, {
          url: `${runBase(key)}/series` + query({ ...rest, width: e.width }), width: e.width, early: true,
          timing: { fetchMs: Math.round(performance.now() - t0), server: null },
        });
      }
    }
  }
  const url = `${runBase(key)}/series` + query(params);
  const resp = await doFetch(url, opts);
  const buf = await resp.arrayBuffer();
  const t1 = performance.now();
  const parsed = parseSeries(buf);
  parsed.url = url;
  parsed.width = params.width;
  parsed.early = false;
  parsed.timing = {
    fetchMs: Math.round(t1 - t0),
    server: resp.headers.get("Server-Timing") || null,
  };
  return parsed;
}

export function parseSeries(buf) {
  if (buf.byteLength < 4) throw new Error("series response too short");
  const dv = new DataView(buf);
  const hlen = dv.getUint32(0, true);
  if (4 + hlen > buf.byteLength) throw new Error("series header length exceeds the response");
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, hlen)));
  const n = header.n | 0;
  let off = 4 + hlen;
  const arrays = {};
  const names = header.arrays || ["x", "y"];
  if (off + names.length * n * 8 > buf.byteLength) throw new Error("series response shorter than its header says");
  for (const name of names) {
    arrays[name] = off % 8 === 0
      ? new Float64Array(buf, off, n)                       // a view, no copy
      : new Float64Array(buf.slice(off, off + n * 8));      // misaligned: copy (should not happen)
    off += n * 8;
  }
  return { header, arrays, bytes: buf.byteLength };
}

/**
 * An EventSource that reconnects with exponential backoff when the server
 * closes it (EventSource only retries by itself on network errors).
 * handlers: {run(data), runs(data), open(), reconnect()}
 */
export class LiveStream {
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    this.backoff = 1000;
    this.closed = false;
    this.hadError = false;
    this.timer = null;
    this.connect();
  }

  connect() {
    if (this.closed || session.leaving) return;
    koboState.sse = "connecting";
    const es = (this.es = new EventSource(this.url, { withCredentials: true }));
    es.addEventListener("open", () => {
      koboState.sse = "open";
      this.backoff = 1000;
      this.handlers.status?.("open");
      if (this.hadError) this.handlers.reconnect?.();
      this.hadError = false;
    });
    for (const name of ["run", "runs"]) {
      es.addEventListener(name, (ev) => {
        let data;
        try { data = JSON.parse(ev.data); } catch (_) { return; }
        this.handlers[name]?.(data);
      });
    }
    es.addEventListener("error", () => {
      if (this.closed) return;
      this.hadError = true;
      if (es.readyState === EventSource.CLOSED) {
        koboState.sse = "closed";
        this.handlers.status?.("closed");
        this.checkAuth();
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 30000);
      } else {
        koboState.sse = "connecting";
        this.handlers.status?.("connecting");
      }
    });
  }

  /**
   * The server refused the stream (EventSource does not say why): a cheap authenticated
   * request tells whether the session ended (-> authFailed: the login page or the banner).
   * Any other failure is left to the reconnects (and the live dot).
   */
  checkAuth() {
    if (session.leaving) return;
    fetch("api/stats", { credentials: "same-origin", cache: "no-store" })
      .then((r) => { if ((r.status === 401 || r.status === 403) && !this.closed) authFailed(r.status); })
      .catch(() => {});
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    koboState.sse = "closed";
  }
}
