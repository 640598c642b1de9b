// The run view: one run, or several overlaid (#/compare?runs=...).
// Header, tabs, and the live stream that feeds every panel.

import { api, LiveStream } from "./api.js";
import { koboState, reportError, runHash, replaceHash } from "./state.js";
import { ScalarsPanel } from "./charts.js";
import { ItemsPanel, KINDS } from "./items.js";
import { el, clear, fmtInt, fmtTime, fmtAgo, fmtDuration, fmtBytes, fmtConfigValue, flatten, runColor, throttle, debounce, cleanTerminal } from "./util.js";

export const TABS = [
  ["scalars", "Scalars"], ["media", "Media"], ["tables", "Tables"], ["histograms", "Histograms"],
  ["kde", "Distributions"], ["tensors", "Tensors"], ["output", "Output"], ["events", "Events"], ["config", "Config"],
];

export function statusBadge(status) {
  const s = status || "?";
  // "running?": stored as running, but no daemon holds the run and it has not committed lately
  const cls = s === "running?" ? "stale" : ["running", "finished", "crashed", "interrupted"].includes(s) ? s : "unknown";
  const title = s === "running?" ? "status: running? (no live writer: its clients and daemon are gone, or this is a copy)"
    : `status: ${s}`;
  return el(`span.badge.status-${cls}`, { title, dataset: { status: s } },
    cls === "running" ? el("span.pulse") : null, s === "?" ? "unknown" : s);
}

// Duration and last step come from the summary's `duration` / `last_step`, the
// runs list's own numbers (finished - created, or last commit - created while
// running), so both pages agree; older summaries without them fall back.
function duration(s) {
  if (!s) return null;
  if (s.duration !== undefined && s.duration !== null) return s.duration;
  if (s.finished_at && s.created_at) return s.finished_at - s.created_at;
  if (s.last_commit && s.created_at) return Math.max(0, s.last_commit - s.created_at);
  return null;
}

function lastStep(s) {
  if (s && s.last_step !== undefined && s.last_step !== null) return s.last_step;
  let m = null;
  for (const x of (s && s.metrics) || []) if (x.last_step !== null && x.last_step !== undefined && (m === null || x.last_step > m)) m = x.last_step;
  return m;
}

/** "just now" / "3 min ago" for the last commit (updated every second). */
function lastCommitText(s) {
  return s && s.last_commit ? fmtAgo(s.last_commit) : "–";
}

/** Ranks that logged anything: the metrics' and every item's (the runs list counts the same). */
function runRanks(s) {
  const r = new Set((s && s.ranks) || []);
  for (const list of Object.values((s && s.items) || {})) for (const it of list || []) for (const k of it.ranks || []) r.add(Number(k));
  return [...r].sort((a, b) => a - b);
}

/** "0, 1 (world size 2)": the ranks that logged, or their count when the summary knows of more. */
function ranksText(s) {
  const ranks = runRanks(s);
  const n = Math.max(ranks.length, s.num_ranks || 0);
  const list = ranks.length === n ? (ranks.length ? ranks.join(", ") : "0") : `${n}`;
  return `${list}${s.world_size ? ` (world size ${s.world_size})` : ""}`;
}

// The live event's `items` (largest row id per table) of the kinds that have names:
// media, tables, tensors, KDE (histograms: the event's `histograms`, rows per "rank/name").
const ITEM_TABLES = ["media", "tables", "tensors", "kde"];

/** Whether two `histograms` maps ({"<rank>/<name>": committed rows}) differ. */
function histogramsChanged(a, b) {
  const ka = Object.keys(a), kb = Object.keys(b);
  if (ka.length !== kb.length) return true;
  return ka.some((k) => a[k] !== b[k]);
}

export class RunView {
  constructor(root, route) {
    this.root = root;
    this.runs = route.runs.slice();
    this.params = new URLSearchParams(route.params);
    this.summaries = new Map();
    this.failed = new Map();
    this.panels = {};
    this.opts = {
      x: this.params.get("x") || "step",
      log: this.params.get("log") === "1",
      smooth: Math.min(0.99, Math.max(0, Number(this.params.get("smooth")) || 0)),
      rank: this.params.get("rank") || "0",
      filter: this.params.get("filter") || "",
    };
    if (!["step", "global_step", "relative", "wall"].includes(this.opts.x)) this.opts.x = "step";
    this.tab = TABS.some(([t]) => t === this.params.get("tab")) ? this.params.get("tab") : "scalars";
    this.isReady = false;
    this.live = null;
    this.liveLast = new Map();   // run -> {version, status, items, output, histograms} of its last event
    this.refreshSummary = throttle(() => this.reloadSummaries().catch((e) => reportError(e, "summary")), 1500);
    // header numbers (last step, duration, dropped) of a running run that committed: at most every 5 s,
    // as often as the runs list refreshes them
    this.refreshHeader = throttle(() => this.reloadSummaries().catch((e) => reportError(e, "summary")), 5000);

    this.headerEl = el("section.run-header", el("div.skeleton", "Loading run…"));
    this.tabsEl = el("nav.tabs#tabs", { role: "tablist" });
    this.panelsEl = el("div.panels");
    this.el = el("div.run-view", this.headerEl, this.tabsEl, this.panelsEl);
    root.append(this.el);
    koboState.view = "run";
    koboState.runs = this.runs.slice();
    koboState.tab = this.tab;
    this.init();
  }

  sameRuns(runs) {
    return runs.length === this.runs.length && runs.every((r, i) => r === this.runs[i]);
  }

  /** A hash change that keeps the same runs: switch tab if it changed. */
  applyRoute(route) {
    const tab = route.params.get("tab") || "scalars";
    this.params = new URLSearchParams(route.params);
    if (tab !== this.tab && TABS.some(([t]) => t === tab)) this.switchTab(tab, false);
  }

  setParam(k, v) {
    if (v === "" || v === null || v === undefined || (k === "x" && v === "step") || (k === "rank" && v === "0")) this.params.delete(k);
    else this.params.set(k, String(v));
    replaceHash(runHash(this.runs, this.params));
  }

  runLabel(key) {
    const s = this.summaries.get(key);
    const name = (s && s.name) || key.slice(key.indexOf("/") + 1);
    const dup = this.runs.filter((k) => {
      const o = this.summaries.get(k);
      return ((o && o.name) || k.slice(k.indexOf("/") + 1)) === name;
    }).length > 1;
    return dup ? `${name} (${key.slice(key.indexOf("/") + 1)})` : name;
  }

  markReady() {
    if (this.isReady || this.destroyed) return;
    this.isReady = true;
    koboState.ready = true;
  }

  async init() {
    const results = await Promise.all(this.runs.map((k) => api.summary(k).then((s) => ({ k, s }), (e) => ({ k, e }))));
    if (this.destroyed) return;
    for (const { k, s, e } of results) {
      if (e) { this.failed.set(k, e); reportError(e, `run ${k}`, { toast: false }); } else this.summaries.set(k, s);
    }
    this.renderHeader();
    if (!this.summaries.size) {
      this.tabsEl.hidden = true;
      this.headerEl.append(el("div", el("a", { href: "#/" }, "← All runs")));
      this.markReady();
      return;
    }
    // a finished run without scalars opens on its first tab that has something
    if (!this.params.get("tab") && this.tabCount("scalars") === 0
        && ![...this.summaries.values()].some((x) => x.status === "running")) {
      const t = ["media", "tables", "histograms", "kde", "tensors"].find((k) => this.tabCount(k) > 0);
      if (t) this.tab = t;
    }
    this.renderTabs();
    this.switchTab(this.tab, false);
    this.live = new LiveStream(`api/events?runs=${this.runs.map((k) => encodeURIComponent(k)).join(",")}`, {
      run: (d) => this.onRunEvent(d),
      reconnect: () => { this.liveLast.clear(); this.refreshSummary(); this.panels.scalars?.resync(); },
      status: (s) => this.setLiveDot(s),
    });
    this.tick = setInterval(() => this.updateDurations(), 1000);
  }

  async reloadSummaries() {
    const results = await Promise.all(this.runs.map((k) => api.summary(k).then((s) => ({ k, s }), (e) => ({ k, e }))));
    if (this.destroyed) return;
    let changed = false;
    for (const { k, s, e } of results) {
      if (e) continue;   // keep the last good summary; a transient read error is reported by the next one
      const old = this.summaries.get(k);
      this.summaries.set(k, s);
      if (this.failed.has(k)) { this.failed.delete(k); changed = true; }
      if (!old || old.version !== s.version || old.status !== s.status) changed = true;
    }
    if (!changed) return;
    this.renderHeader();
    this.renderTabs();
    for (const p of Object.values(this.panels)) p.sync?.();
  }

  /**
   * event: run -> what changed since the run's previous event decides what is re-read:
   * `lengths`    -> the scalar tails (the summary only for a metric or rank not in it);
   * `items`      -> the summary for media / tables / tensors / KDE (it holds their names and
   *                 per-rank counts; cards whose count changed re-read their rows), the
   *                 events tab for `events`;
   * `histograms` -> the summary when a rank/name's committed rows changed (or one appeared);
   * `output`     -> the output tail;
   * status       -> the summary.  A running run that committed also refreshes its header
   * numbers at most every 5 s.  An event without `items`/`histograms` (an older server):
   * the summary on every version change.
   */
  onRunEvent(d) {
    const key = d.run;
    const s = this.summaries.get(key);
    if (!s) return;
    const prev = this.liveLast.get(key);
    const hasItems = !!d.items && typeof d.items === "object" && typeof d.output === "number"
      && !!d.histograms && typeof d.histograms === "object";
    const cur = { version: d.version, status: d.status, items: hasItems ? d.items : null, output: hasItems ? d.output : null,
                  histograms: hasItems ? d.histograms : null };
    this.liveLast.set(key, cur);
    let summary = false;
    if (d.status && d.status !== s.status) {
      s.status = d.status;
      this.updateBadges();
      this.setLiveDot(koboState.sse);
      summary = true;
    }
    if (d.lengths) {
      if (this.panels.scalars) summary = this.panels.scalars.onLive(key, d.lengths) || summary;
      else {
        const known = new Set();
        for (const m of s.metrics || []) for (const r of m.ranks && m.ranks.length ? m.ranks : [0]) known.add(`${r}/${m.name}`);
        if (Object.keys(d.lengths).some((k) => !known.has(k))) summary = true;
      }
    }
    const versionChanged = !!d.version && d.version !== (prev ? prev.version : s.version);
    if (!hasItems) {
      if (versionChanged) {
        summary = true;
        this.panels.output?.onVersion?.(key);
        this.panels.events?.onVersion?.(key);
      }
    } else if (!prev || !prev.items) {
      // the first event after (re)connecting: compare with what the page read
      if (d.version !== s.version) summary = true;
      this.panels.output?.onOutput?.(key, d.output);
      if (d.version !== s.version) this.panels.events?.onVersion?.(key);
    } else {
      for (const t of ITEM_TABLES) if ((d.items[t] ?? 0) !== (prev.items[t] ?? 0)) summary = true;
      if (histogramsChanged(cur.histograms, prev.histograms)) summary = true;
      if ((d.items.events ?? 0) !== (prev.items.events ?? 0)) this.panels.events?.onVersion?.(key);
      if (d.output !== prev.output) this.panels.output?.onOutput?.(key, d.output);
    }
    if (summary) this.refreshSummary();
    else if (versionChanged && (d.status || s.status) === "running") this.refreshHeader();
  }

  // ---- header --------------------------------------------------------------------

  renderHeader() {
    const peekOpen = !!this.headerEl.querySelector("details.config-peek[open]");   // a live refresh keeps it open
    const h = clear(this.headerEl);
    for (const [k, e] of this.failed) {
      h.append(el("div.error-box", el("strong", `Cannot read run ${k}: `), e.message));
    }
    if (this.runs.length === 1) {
      const key = this.runs[0];
      const s = this.summaries.get(key);
      if (!s) return;
      const cfg = flatten(s.config || {});
      h.append(...[
        el("div.title-row",
          el("span.swatch.big", { style: { background: runColor(key) } }),
          el("h1.run-name", s.name || s.run_id),
          el("span.badge-slot", { dataset: { run: key } }, statusBadge(s.status)),
          el("span.spacer"),
          this.liveDot()),
        el("div.meta-row",
          meta("run id", el("code", s.run_id)),
          meta("project", s.project),
          meta("created", el("span", { title: fmtTime(s.created_at) }, `${fmtTime(s.created_at)} (${fmtAgo(s.created_at)})`)),
          meta("duration", el("span.duration", { dataset: { run: key } }, fmtDuration(duration(s)))),
          meta("last step", fmtInt(lastStep(s))),
          s.last_commit ? meta("last commit", el("span.last-commit", { title: fmtTime(s.last_commit), dataset: { run: key } }, lastCommitText(s))) : null,
          meta("ranks", ranksText(s)),
          meta("dropped", el(`span.${(s.dropped && (s.dropped.calls > 0 || s.dropped.lines > 0)) ? "dropped-warn" : "muted"}`, fmtInt((s.dropped && s.dropped.calls) || 0) + (s.dropped && s.dropped.lines > 0 ? ` (+${fmtInt(s.dropped.lines)} output lines)` : "")))),
        dropWarning(s),
        cfg.length ? el("details.config-peek", { open: peekOpen }, el("summary", `Config (${cfg.length} key${cfg.length === 1 ? "" : "s"})`), configTable([[key, s.config || {}]], () => key)) : null,
      ].filter(Boolean));
      document.title = `${s.name || s.run_id} · KohakuBoard`;
    } else {
      const rows = this.runs.filter((k) => this.summaries.has(k)).map((k) => {
        const s = this.summaries.get(k);
        const rm = el("button.icon-btn", { type: "button", title: "remove from the comparison" }, "×");
        rm.addEventListener("click", () => {
          const rest = this.runs.filter((r) => r !== k);
          location.hash = runHash(rest, this.params);
        });
        return el("tr", { dataset: { run: k } },
          el("td", el("span.swatch", { style: { background: runColor(k) } })),
          el("td", el("a", { href: runHash([k], { tab: this.tab }) }, this.runLabel(k))),
          el("td.badge-slot", { dataset: { run: k } }, statusBadge(s.status)),
          el("td", el("code", s.run_id)), el("td", s.project),
          el("td", { title: fmtTime(s.created_at) }, fmtAgo(s.created_at)),
          el("td.duration", { dataset: { run: k } }, fmtDuration(duration(s))),
          el("td.num", fmtInt(lastStep(s))),
          el("td", Math.max(runRanks(s).length, s.num_ranks || 0) > 1 ? `${Math.max(runRanks(s).length, s.num_ranks || 0)} ranks` : "1"),
          el(`td.num${(s.dropped && s.dropped.calls) > 0 ? ".dropped-warn" : ""}`, fmtInt((s.dropped && s.dropped.calls) || 0)),
          el("td", rm));
      });
      h.append(...[
        el("div.title-row", el("h1.run-name", `Comparing ${this.summaries.size} runs`), el("span.spacer"), this.liveDot()),
        el("table.compare-table.data-table.compact",
          el("thead", el("tr", ["", "name", "status", "run id", "project", "created", "duration", "last step", "ranks", "dropped", ""].map((t) => el("th", t)))),
          el("tbody", rows)),
        ...this.runs.map((k) => this.summaries.get(k)).filter(Boolean).map((s) => dropWarning(s, true)),
      ].filter(Boolean));
      document.title = `Compare ${this.runs.length} runs · KohakuBoard`;
    }
  }

  liveDot() {
    if (!this.dot) this.dot = el("span.live-dot", { title: "live updates" }, el("span.dot"), el("span.live-text", "live"));
    this.setLiveDot(koboState.sse);
    return this.dot;
  }

  setLiveDot(s) {
    if (!this.dot) return;
    const running = [...this.summaries.values()].some((x) => x.status === "running");
    this.dot.hidden = !running && s === "open";
    this.dot.dataset.state = s;
    this.dot.querySelector(".live-text").textContent = s === "open" ? "live" : s === "connecting" ? "reconnecting…" : "offline";
  }

  updateBadges() {
    for (const slot of this.headerEl.querySelectorAll(".badge-slot")) {
      const s = this.summaries.get(slot.dataset.run);
      if (s) clear(slot).append(statusBadge(s.status));
    }
  }

  /** Every second: "last commit 12 s ago" (the duration itself is the summary's, refreshed with it). */
  updateDurations() {
    for (const d of this.headerEl.querySelectorAll(".last-commit")) {
      const s = this.summaries.get(d.dataset.run);
      if (s) d.textContent = lastCommitText(s);
    }
  }

  // ---- tabs ----------------------------------------------------------------------

  tabCount(tab) {
    let n = 0;
    const names = new Set();
    for (const k of this.runs) {
      const s = this.summaries.get(k);
      if (!s) continue;
      if (tab === "scalars") for (const m of s.metrics || []) names.add(m.name);
      else if (KINDS[tab]) for (const it of (s.items && s.items[KINDS[tab].key]) || []) names.add(it.name);
    }
    n = names.size;
    return ["scalars", ...Object.keys(KINDS)].includes(tab) ? n : null;
  }

  renderTabs() {
    clear(this.tabsEl);
    for (const [t, label] of TABS) {
      const n = this.tabCount(t);
      const b = el("button.tab", {
        type: "button", role: "tab", dataset: { tab: t }, "aria-selected": String(t === this.tab),
        class: `tab${t === this.tab ? " active" : ""}${n === 0 ? " empty-tab" : ""}`,
      }, label, n !== null ? el("span.tab-count", String(n)) : null);
      b.addEventListener("click", () => this.switchTab(t, true));
      this.tabsEl.append(b);
    }
  }

  switchTab(tab, push) {
    this.tab = tab;
    koboState.tab = tab;
    for (const b of this.tabsEl.querySelectorAll(".tab")) {
      const on = b.dataset.tab === tab;
      b.classList.toggle("active", on);
      b.setAttribute("aria-selected", String(on));
    }
    if (tab === "scalars") this.params.delete("tab"); else this.params.set("tab", tab);
    const hash = runHash(this.runs, this.params);
    if (push && location.hash !== hash) history.pushState(null, "", hash);
    else replaceHash(hash);
    let p = this.panels[tab];
    if (!p) {
      try {
        p = this.panels[tab] = this.makePanel(tab);
        this.panelsEl.append(p.el);
      } catch (e) {
        reportError(e, `tab ${tab}`);
        this.panelsEl.append(el("div.error-box", `Cannot show ${tab}: ${e.message}`));
        this.markReady();
        return;
      }
    }
    for (const [t, q] of Object.entries(this.panels)) q.el.hidden = t !== tab;
    p.shown?.();
  }

  makePanel(tab) {
    if (tab === "scalars") return new ScalarsPanel(this);
    if (KINDS[tab]) return new ItemsPanel(this, tab);
    if (tab === "output") return new OutputPanel(this);
    if (tab === "events") return new EventsPanel(this);
    if (tab === "config") return new ConfigPanel(this);
    throw new Error(`unknown tab ${tab}`);
  }

  destroy() {
    this.destroyed = true;
    clearInterval(this.tick);
    this.refreshSummary.cancel?.();
    if (this.live) this.live.close();
    for (const p of Object.values(this.panels)) p.destroy?.();
    this.el.remove();
  }
}

function meta(k, v) {
  return el("span.meta", el("span.meta-k", k), el("span.meta-v", v));
}

function dropWarning(s, named) {
  const d = s.dropped || {};
  const calls = d.calls > 0, lines = d.lines > 0;
  if (!calls && !lines) return null;
  const what = [];
  if (calls) what.push(`${fmtInt(d.calls)} log() call${d.calls === 1 ? "" : "s"} (${fmtInt(d.values || 0)} values) never reached the run; the stored series do not hold them`);
  if (lines) what.push(`${fmtInt(d.lines)} line${d.lines === 1 ? "" : "s"} of captured output ${d.lines === 1 ? "was" : "were"} discarded (the Output tab marks where)`);
  return el("div.warn-box.dropped-banner", { role: "alert" },
    el("strong", "⚠ Data was dropped. "),
    named ? el("span", `${s.name || s.run_id}: `) : null,
    `${what.join("; ")}: the client's queue was full while its queue policy was "drop".`);
}

function configTable(runs, label) {
  // runs: [[key, config]]; one column per run; rows that differ are highlighted
  const maps = runs.map(([, c]) => new Map(flatten(c)));
  const keys = [...new Set(maps.flatMap((m) => [...m.keys()]))].sort();
  const multi = runs.length > 1;
  return el("table.data-table.config-table",
    multi ? el("thead", el("tr", el("th", "key"), runs.map(([k]) => el("th", el("span.swatch", { style: { background: runColor(k) } }), " ", label(k))))) : null,
    el("tbody", keys.map((k) => {
      const vals = maps.map((m) => (m.has(k) ? fmtConfigValue(m.get(k)) : undefined));
      const differs = multi && new Set(vals.map(String)).size > 1;
      return el(`tr${differs ? ".differs" : ""}`, { dataset: { key: k } }, el("td.key", k),
        vals.map((v) => el("td", v === undefined ? el("span.muted", "—") : v)));
    })));
}

// ---- Output ----------------------------------------------------------------------

class RunPicker {
  constructor(view, onChange) {
    this.view = view;
    this.key = view.runs.find((k) => view.summaries.has(k));
    this.el = el("span");
    if (view.runs.length > 1) {
      const sel = el("select.run-picker", view.runs.filter((k) => view.summaries.has(k)).map((k) => el("option", { value: k }, view.runLabel(k))));
      sel.addEventListener("change", () => { this.key = sel.value; onChange(); });
      this.el = el("label.ctl", "Run ", sel);
    }
  }
}

// The output tab reads logs/output.log in byte ranges: each response says where it
// starts (`offset`) and ends (`end`), so the page never counts bytes of decoded
// text (a chunk cut inside a UTF-8 character decodes with a replacement char).
const OUTPUT_KEEP = 4 << 20;         // bytes kept in the page while following; older chunks are dropped
const OUTPUT_JUMP = 1 << 20;         // more new output than this: read the tail afresh

class OutputPanel {
  constructor(view) {
    this.view = view;
    this.picker = new RunPicker(view, () => this.load());
    this.pre = el("pre.output#output-text");
    this.earlier = el("button.btn.small#load-earlier", { type: "button" }, "Load earlier output");
    this.earlier.addEventListener("click", () => this.loadEarlier());
    this.follow = el("input#follow-output", { type: "checkbox", checked: true });
    this.info = el("span.muted.small");
    this.el = el("div.output-panel",
      el("div.controls", el("div.ctl-row", this.picker.el, this.earlier, el("label.ctl", this.follow, " Follow the tail"), el("span.spacer"), this.info)),
      this.pre);
    this.pre.addEventListener("scroll", () => {
      const atEnd = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 4;
      if (this.follow.checked !== atEnd && !this.programmatic) this.follow.checked = atEnd;
    });
    this.tail = throttle(() => { if (this.el.hidden) this.stale = true; else this.loadNew(); }, 1000);
    this.chunks = [];                // [{offset, end, text}] in file order, contiguous
    this.size = 0;                   // committed bytes of output.log (last response or live event)
    this.load();
  }

  get start() { return this.chunks.length ? this.chunks[0].offset : this.end; }

  /** The live event's committed byte count of the shown run's output.log. */
  onOutput(key, size) {
    if (key !== this.picker.key || typeof size !== "number") return;
    if (size === this.end && size === this.size) return;
    this.size = size;
    this.tail();
  }

  /** The run changed (older servers, whose events carry no `output`). */
  onVersion(key) {
    if (!key || key === this.picker.key) this.tail();
  }

  async load() {
    const gen = (this.gen = (this.gen || 0) + 1);
    this.loading = false;            // a tail read still in flight belongs to the old generation
    this.chunks = [];
    this.end = undefined;
    this.pre.textContent = "loading…";
    try {
      const d = await api.logs(this.picker.key);
      if (gen !== this.gen) return;
      this.size = d.size ?? 0;
      this.end = this.chunkEnd(d, d.offset || 0);
      if (this.end > (d.offset || 0)) this.chunks.push({ offset: d.offset || 0, end: this.end, text: d.text || "" });
      this.draw(true);
    } catch (e) {
      if (gen !== this.gen) return;
      this.pre.textContent = "";
      this.pre.append(el("span.error-text", `Cannot read the output: ${e.message}`));
      reportError(e, "output", { toast: false });
    }
    this.view.markReady();
  }

  /** A response's end byte (the server's `end`: bytes [offset, end) were read). */
  chunkEnd(d, from) {
    if (typeof d.end !== "number") throw new Error("the logs response has no `end`");
    return Math.max(d.offset ?? from, d.end);
  }

  async loadNew() {
    if (this.loading || this.end === undefined) return;
    const gen = this.gen;
    this.loading = true;
    let more = false;
    try {
      if (this.follow.checked && this.size - this.end > OUTPUT_JUMP) { this.loading = false; return this.load(); }
      const d = await api.logs(this.picker.key, { offset: this.end });
      if (gen !== this.gen) return;
      this.size = d.size ?? this.size;
      const from = d.offset ?? this.end;
      const end = this.chunkEnd(d, from);
      if (d.size !== undefined && d.size < this.end) {
        this.loading = false;
        return this.load();        // the log shrank (replaced): start over
      }
      if (end > from && from === this.end) {
        this.chunks.push({ offset: from, end, text: d.text || "" });
        this.end = end;
        this.trim();
        this.draw(this.follow.checked);
      }
      more = this.end < this.size;  // the response was cut at its limit: read on
    } catch (e) {
      reportError(e, "output");
    } finally {
      if (gen === this.gen) this.loading = false;
    }
    if (more) { if (this.el.hidden) this.stale = true; else this.loadNew(); }
  }

  /** Keep at most OUTPUT_KEEP bytes while following (whole chunks; "Load earlier" reads them again). */
  trim() {
    if (!this.follow.checked) return;
    while (this.chunks.length > 1 && this.end - this.chunks[1].offset >= OUTPUT_KEEP) this.chunks.shift();
  }

  async loadEarlier() {
    const start = this.start;
    if (!start) return;
    const from = Math.max(0, start - 65536);
    try {
      let d = await api.logs(this.picker.key, { offset: from, limit: start - from });
      if (start !== this.start) return;
      let off = d.offset ?? from;
      let end = this.chunkEnd(d, off);
      if (end !== start || off >= start) return;   // not the bytes just before the shown ones
      const first = this.chunks[0];
      if (first && /\ufffd$/.test(d.text || "") && /^\ufffd/.test(first.text) && first.end - off <= OUTPUT_JUMP) {
        // the old cut fell inside a UTF-8 character: read both pieces as one range so it decodes whole
        d = await api.logs(this.picker.key, { offset: off, limit: first.end - off });
        if (start !== this.start || this.chunks[0] !== first) return;
        if ((d.offset ?? off) !== off || this.chunkEnd(d, off) !== first.end) return;
        end = first.end;
        this.chunks.shift();
      }
      const h0 = this.pre.scrollHeight;
      this.chunks.unshift({ offset: off, end, text: d.text || "" });
      this.draw(false);
      this.pre.scrollTop += this.pre.scrollHeight - h0;
    } catch (e) {
      reportError(e, "output");
    }
  }

  draw(scroll) {
    let raw = this.chunks.map((c) => c.text).join("");
    if (this.start > 0) raw = raw.slice(raw.indexOf("\n") + 1);   // hide the cut first line
    const text = cleanTerminal(raw);
    this.pre.textContent = text || "";
    if (!text) this.pre.append(el("span.muted", "No output captured yet."));
    this.earlier.hidden = !this.start;
    this.info.textContent = `${fmtBytes(this.end - this.start)} shown of ${fmtBytes(Math.max(this.end, this.size))}`;
    if (scroll) {
      this.programmatic = true;
      this.pre.scrollTop = this.pre.scrollHeight;
      requestAnimationFrame(() => { this.programmatic = false; });
    }
  }

  shown() {
    if (this.stale) { this.stale = false; this.loadNew(); }
    if (this.follow.checked) this.pre.scrollTop = this.pre.scrollHeight;
  }

  destroy() { this.tail.cancel?.(); this.gen = (this.gen || 0) + 1; }
}

// ---- Events ---------------------------------------------------------------------

class EventsPanel {
  constructor(view) {
    this.view = view;
    this.picker = new RunPicker(view, () => this.load());
    this.body = el("div.events-body", el("div.item-loading", "loading…"));
    this.el = el("div.events-panel", el("div.controls", el("div.ctl-row", this.picker.el)), this.body);
    this.reload = throttle(() => { if (this.el.hidden) this.stale = true; else this.load(); }, 3000);
    this.load();
  }

  /** The run committed new daemon events (live `items.events`), or changed (older servers). */
  onVersion(key) {
    if (!key || key === this.picker.key) this.reload();
  }

  shown() {
    if (this.stale) { this.stale = false; this.load(); }
  }

  async load() {
    const key = this.picker.key;
    const s = this.view.summaries.get(key);
    let events = null, err = null;
    try {
      events = (await api.runEvents(key)).events || [];
    } catch (e) {
      err = e;
      reportError(e, "events", { toast: false });
    }
    const body = clear(this.body);
    body.append(el("h3", "Daemon events"));
    if (err) body.append(el("div.error-box", `Cannot read the events: ${err.message}`));
    else if (!events.length) body.append(el("div.empty", "No events recorded for this run."));
    else {
      body.append(el("div.table-scroll.tall", el("table.data-table.events-table",
        el("thead", el("tr", el("th", "#"), el("th", "time"), el("th", "kind"), el("th", "detail"))),
        el("tbody", events.map((ev) => el("tr", { dataset: { kind: ev.kind } },
          el("td.num", String(ev.id ?? "")), el("td.nowrap", fmtTime(ev.wall)), el("td", el(`span.kind.kind-${String(ev.kind).replace(/[^\w-]/g, "")}`, ev.kind)),
          el("td.detail", typeof ev.detail === "string" ? ev.detail : JSON.stringify(ev.detail))))))));
    }
    const clients = (s && s.clients) || [];
    body.append(el("h3", "Clients"));
    if (!clients.length) body.append(el("div.empty", "No client information."));
    else {
      const cols = [...new Set(clients.flatMap((c) => Object.keys(c)))];
      body.append(el("div.table-scroll", el("table.data-table.compact.clients-table",
        el("thead", el("tr", cols.map((c) => el("th", c)))),
        el("tbody", clients.map((c) => el("tr", cols.map((k) => {
          const v = c[k];
          if (k === "status") return el("td", statusBadge(v));
          if (typeof v === "number" && /wall|time|_at$/.test(k)) return el("td.nowrap", fmtTime(v));
          return el("td", v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v));
        })))))));
    }
    this.view.markReady();
  }

  destroy() { this.reload.cancel?.(); }
}

// ---- Config ---------------------------------------------------------------------

class ConfigPanel {
  constructor(view) {
    this.view = view;
    this.onlyDiff = el("input#config-diff", { type: "checkbox" });
    this.filter = el("input.item-filter", { type: "search", placeholder: "Filter keys" });
    this.body = el("div.config-body");
    const ctl = [this.filter];
    if (view.runs.length > 1) ctl.push(el("label.ctl", this.onlyDiff, " Only keys that differ"));
    this.el = el("div.config-panel", el("div.controls", el("div.ctl-row", ...ctl)), this.body);
    this.onlyDiff.addEventListener("change", () => this.apply());
    this.filter.addEventListener("input", debounce(() => this.apply(), 120));
    this.sync();
  }

  sync() {
    const runs = this.view.runs.filter((k) => this.view.summaries.has(k));
    const body = clear(this.body);
    body.append(el("h3", "Config"));
    const any = runs.some((k) => Object.keys(this.view.summaries.get(k).config || {}).length);
    if (!any) body.append(el("div.empty", "No config was given to Board(config=...)."));
    else body.append(configTable(runs.map((k) => [k, this.view.summaries.get(k).config || {}]), (k) => this.view.runLabel(k)));
    body.append(el("h3", "Metadata"));
    const meta = (k) => {
      const m = Object.assign({}, this.view.summaries.get(k).metadata || {});
      delete m.config;   // shown above
      for (const f of Object.keys(m)) if (/_at$/.test(f) && typeof m[f] === "number") m[f] = fmtTime(m[f]);
      return m;
    };
    body.append(configTable(runs.map((k) => [k, meta(k)]), (k) => this.view.runLabel(k)));
    this.apply();
    this.view.markReady();
  }

  apply() {
    const f = this.filter.value.trim().toLowerCase();
    for (const tr of this.body.querySelectorAll("tbody tr")) {
      tr.hidden = (f && !tr.dataset.key.toLowerCase().includes(f)) || (this.onlyDiff.checked && !tr.classList.contains("differs"));
    }
  }
}
