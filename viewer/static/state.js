// Page-wide state: the test hooks (window.koboState / koboPerf), error reporting,
// and the URL hash <-> route mapping.  See the comment at the top of app.js.

// uPlot has loaded (a classic script before every module): Intl's real constructors back (index.html)
if (window.koboBoot && window.koboBoot.restoreIntl) window.koboBoot.restoreIntl();

export const koboState = {
  ready: false,        // true once the current view's first data is drawn
  view: null,          // "runs" | "run"
  runs: [],            // the "project/run_id" keys shown in the run view
  tab: null,           // the run view's open tab
  charts: {},          // metric -> {points, reduced, zoomed, drawn, lastFetch, sources}
  errors: [],          // [{message, where, time}]
  sse: "closed",       // "connecting" | "open" | "closed" (the current EventSource)
  liveUpdates: 0,      // number of live tail appends done
  user: null,          // kobo-serve: the logged-in user (null under kobo open)
};
export const koboPerf = { firstChartDraw: null, navigationStart: 0 };

window.koboState = koboState;
window.koboPerf = koboPerf;

const errorListeners = new Set();

/** Record an error and show it in the page (toast). */
export function reportError(err, where = "", { toast = true } = {}) {
  const message = (err && (err.message || err.reason || String(err))) || "unknown error";
  const entry = { message, where, time: Date.now(), toast };
  koboState.errors.push(entry);
  if (koboState.errors.length > 200) koboState.errors.splice(0, koboState.errors.length - 200);
  for (const fn of errorListeners) {
    try { fn(entry); } catch (_) { /* never throw from error reporting */ }
  }
  return entry;
}

export function onError(fn) {
  errorListeners.add(fn);
}

// ---- routes ---------------------------------------------------------------------
// #/                                    runs list          (?q=&regex=1&project=)
// #/run/<project>/<run_id>?tab=scalars  one run            (&x=step&log=1&smooth=0.6&rank=0|all|band&filter=)
// #/compare?runs=p/r,p/r&tab=scalars    several runs overlaid (same parameters)

export function parseHash(hash = location.hash) {
  let h = hash.replace(/^#/, "");
  if (!h.startsWith("/")) h = "/" + h;
  const qi = h.indexOf("?");
  const path = qi >= 0 ? h.slice(0, qi) : h;
  const params = new URLSearchParams(qi >= 0 ? h.slice(qi + 1) : "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "run" && parts.length >= 3) {
    return { view: "run", runs: [`${parts[1]}/${parts[2]}`], params };
  }
  if (parts[0] === "compare") {
    const runs = (params.get("runs") || "").split(",").map((s) => s.trim()).filter((s) => s.includes("/"));
    if (runs.length === 1) return { view: "run", runs, params, compare: true };
    if (runs.length) return { view: "run", runs, params, compare: true };
  }
  return { view: "runs", runs: [], params };
}

/** The hash for a run view over `runs` with `params` (URLSearchParams or object). */
export function runHash(runs, params) {
  const p = new URLSearchParams(params || {});
  p.delete("runs");
  if (runs.length === 1) {
    const [project, ...rest] = runs[0].split("/");
    const s = p.toString();
    return `#/run/${encodeURIComponent(project)}/${encodeURIComponent(rest.join("/"))}${s ? "?" + s : ""}`;
  }
  const s = p.toString();
  return `#/compare?runs=${runs.map((r) => encodeURIComponent(r).replace(/%2F/g, "/")).join(",")}${s ? "&" + s : ""}`;
}

/** Replace the current hash without a history entry and without a hashchange. */
export function replaceHash(hash) {
  if (location.hash === hash) return;
  history.replaceState(history.state, "", hash);
}
