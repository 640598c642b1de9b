// KohakuBoard viewer (`kobo open`, `kobo-serve`): the single-page app.  No build step:
// plain ES modules + vendored uPlot (window.uPlot, loaded by index.html).  Every URL is
// relative to the page, so kobo-serve may serve it under a --base-url (/kobo/).
//
// Modules: api.js (HTTP + binary series + SSE), state.js (test hooks, routes),
// session.js (the page's base path, who is logged in, 401 -> login page),
// runs.js (runs list), run.js (run / compare view, output, events, config),
// charts.js (scalar charts), items.js (media, tables, histograms, KDE, tensors),
// util.js (DOM and formatting helpers).
//
// ---- Hooks for browser tests ------------------------------------------------------
// window.koboState
//   .ready        true once the current view's first data is drawn: runs page =
//                 table rendered (or its error shown); run view = first chart
//                 drawn, or the open tab's first card / empty state / error drawn.
//                 Reset to false on navigation to another view (not on a tab switch:
//                 wait for the tab's own [data-drawn="1"] cards instead).
//   .view         "runs" | "run";  .runs: ["project/run_id", ...];  .tab: open tab
//   .charts       {<metric>: {points (points received, summed over shown series),
//                  reduced (bool), zoomed (bool), drawn (bool),
//                  nonfinite: {nan, posinf, neginf} (counts in the shown range),
//                  lastFetch: {...series header, url, bytes, timing, source, early (answered by
//                  index.html's boot request)},
//                  sources: {"p/r@rank" (or "p/r@band"): {points, reduced, committed, total}}}}
//   .errors       [{message, where, time, toast}] every error the page reported
//                 (also those shown in place; a failed fetch's console line is the browser's)
//   .sse          "connecting" | "open" | "closed";  .liveUpdates: live tail appends done
//   .user         kobo-serve: the logged-in user's name once api/session answered; null
//                 otherwise (`kobo open`, or not asked)
// window.koboPerf.firstChartDraw   performance.now() of the first chart draw (ms)
// window.koboZoom(metric, x0, x1)  -> Promise<koboState.charts[metric]>, resolved once the
//                                    full-resolution data of [x0, x1] is drawn
// window.koboResetZoom(metric)     -> Promise, back to the whole range
// window.koboSetStep(kind, name, step[, run]) -> bool: move the step slider of a
//                                    media/tables/histograms/kde/tensors card to the last
//                                    logged step <= step (the card must have loaded)
// DOM:
//   runs page: table#runs-table, tr.run-row[data-run="p/r"] (.selected when checked),
//              input.run-check, a.run-link, .badge[data-status], td.dropped-warn,
//              input#run-filter, input#run-regex, select#project-filter,
//              #filter-error (the server's 400 message), button#compare-btn
//   run view:  .run-header (.badge[data-status], .dropped-banner when calls were dropped,
//              .error-box when a run cannot be read, .duration and .last-commit from the
//              summary's duration / last_commit, as in the runs list), .live-dot[data-state]
//              nav#tabs button.tab[data-tab=scalars|media|tables|histograms|kde|tensors|
//              output|events|config] (or ?tab= in the hash)
//              scalars: select#x-axis, input#log-y, input#smoothing (range; set .value and
//              dispatch "input"), select#rank-select (N | all | band), input#metric-filter,
//              details.group[data-group], .chart-card[data-metric][data-drawn="1"] with
//              .nf-badge ("3 NaN"), .chart-info ("1,742 of 1,000,000 pts"),
//              a.csv-link[data-run], button.reset-zoom; drag on .u-over zooms,
//              double-click resets
//              items: .item-card[data-kind][data-item][data-run][data-drawn="1"] with
//              input.step-slider (set .value + dispatch "input", or koboSetStep) and
//              .step-label ("step 1,200  (7/11)"); data-rank = the rank whose rows are
//              shown (set once they loaded; 0, or the lowest rank that logged the item);
//              select.item-rank (only when several ranks logged it; set .value and
//              dispatch "change"), span.rank-tag ("rank 1") when the only rank is not 0;
//              .chart-info ("6 steps", or "500 of 800 steps" when the server thinned
//              histogram rows; the card then has class .thinned); histograms
//              canvas.heatmap; tensors canvas.tensor-heat
//              output: pre#output-text, button#load-earlier, input#follow-output
//   toasts:    #toasts .toast (errors not already shown in place)
//   top bar:   #folder (the served DIR); kobo-serve: #user-box (shown once logged in) with
//              #user-name and button#logout-btn (POST api/logout, then the login page)
//   #auth-error: `kobo open` only, shown when an API answer is 401/403 (reopen the printed URL);
//              under kobo-serve a 401 sends the page to `login` instead
// Playwright: wait_for_function("...") with a string compiles it with new Function,
// which this page's CSP (no 'unsafe-eval') refuses: use bypass_csp=True for such
// waits, or poll with page.evaluate / wait_for_selector.

import { koboState, koboPerf, reportError, onError, parseHash } from "./state.js";
import { RunsPage } from "./runs.js";
import { RunView } from "./run.js";
import { installZoomHook } from "./charts.js";
import { installStepHook } from "./items.js";
import { el } from "./util.js";
import { loadSession, logout, onAuthFailed, session } from "./session.js";

const root = document.getElementById("app");
const toasts = document.getElementById("toasts");
const folderEl = document.getElementById("folder");
let current = null;

koboPerf.navigationStart = performance.timeOrigin;

window.addEventListener("error", (ev) => reportError(ev.error || ev.message, "window"));
window.addEventListener("unhandledrejection", (ev) => {
  ev.preventDefault();   // reported in the page (and koboState.errors) instead of the console
  reportError(ev.reason, "promise");
});

const lastToast = new Map();
onError((e) => {
  if (!e.toast) return;   // already shown where it happened
  const text = e.where ? `${e.where}: ${e.message}` : e.message;
  if (Date.now() - (lastToast.get(text) || 0) < 10000) return;   // the same error again: once per 10 s
  lastToast.set(text, Date.now());
  const t = el("div.toast", { role: "alert" },
    el("span.toast-msg", text),
    el("button.icon-btn", { type: "button", title: "dismiss" }, "×"));
  t.querySelector("button").addEventListener("click", () => t.remove());
  toasts.append(t);
  while (toasts.children.length > 4) toasts.firstChild.remove();
  setTimeout(() => t.remove(), 10000);
});

function setDir(dir) {
  if (!dir) return;
  folderEl.textContent = "\u200e" + dir + "\u200e";   // LRM: keep the leading "/" on the left under direction: rtl
  folderEl.title = `serving ${dir}`;
}

// ---- who is logged in (kobo-serve) ----------------------------------------------

const userBox = document.getElementById("user-box");
const logoutBtn = document.getElementById("logout-btn");
const authError = document.getElementById("auth-error");

function showUser() {
  koboState.user = session.user;
  document.getElementById("user-name").textContent = session.user || "";
  userBox.hidden = !session.user;
}

logoutBtn.addEventListener("click", () => {
  logoutBtn.disabled = true;
  logout().catch((e) => { logoutBtn.disabled = false; reportError(e, "log out"); });
});

onAuthFailed((status) => {
  authError.textContent = status === 401
    ? "Not signed in: open the URL that `kobo open` printed (with its ?token=) again."
    : "Your session has expired or the viewer was restarted: open the URL that `kobo open` printed (with its ?token=) again.";
  authError.hidden = false;
});

// who is logged in (kobo-serve only), asked after the first view is built
setTimeout(() => loadSession().then(showUser, (e) => reportError(e, "session", { toast: false })), 0);

function route() {
  const r = parseHash();
  if (current && r.view === "run" && current instanceof RunView && current.sameRuns(r.runs)) {
    current.applyRoute(r);
    return;
  }
  if (current && r.view === "runs" && current instanceof RunsPage) {
    current.applyRoute(r);
    return;
  }
  if (current) current.destroy();
  koboState.ready = false;
  koboState.charts = {};
  document.querySelectorAll(".topnav a").forEach((a) => a.classList.toggle("active", r.view === "runs"));
  try {
    current = r.view === "run" ? new RunView(root, r) : new RunsPage(root, r, setDir);
  } catch (e) {
    reportError(e, "page");
    root.append(el("div.error-box", `The page failed to load: ${e.message}`));
    koboState.ready = true;
  }
  window.scrollTo(0, 0);
}

installZoomHook(() => (current instanceof RunView ? current.panels.scalars : null));
installStepHook(() => (current instanceof RunView ? current.panels : {}));

window.addEventListener("hashchange", route);
window.addEventListener("popstate", () => { if (location.hash) route(); });
route();

// the folder for the top bar when the first page is a run page (the runs page sets it itself)
if (!(current instanceof RunsPage)) {
  setTimeout(() => {
    fetch("api/runs", { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((d) => d && setDir(d.dir))
      .catch(() => {});
  }, 1500);
}
