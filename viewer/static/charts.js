// Scalars: one uPlot chart per metric, grouped by namespace prefix, with runs
// overlaid, server-side reduction (width=), zoom at full resolution (x0/x1),
// smoothing (smooth=), ranks (rank=N | all | band), non-finite markers, and
// a live tail (start=).

import { api, fetchSeries } from "./api.js";
import { koboState, koboPerf, reportError } from "./state.js";
import { el, clear, fmtInt, fmtValue, fmtRelAxis, fmtTime, runColor, alpha, debounce } from "./util.js";

const uPlot = window.uPlot;
const CHART_H = 210;
const CHART_H_BIG = 380;
const MARK_COLORS = { nan: "#e03131", posinf: "#f08c00", neginf: "#7048e8" };
const MARK_LABELS = { nan: "NaN", posinf: "+inf", neginf: "-inf" };
const DASHES = [[], [6, 3], [2, 3], [10, 3, 2, 3], [4, 4], [1, 2]];
const X_LABELS = { step: "step", global_step: "global step", relative: "time (relative)", wall: "wall time" };

export function groupOf(metric) {
  const i = metric.indexOf("/");
  return i > 0 ? metric.slice(0, i) : "general";
}

function metricMatcher(filter) {
  const f = (filter || "").trim();
  if (!f) return () => true;
  let re = null;
  if (/[\\^$.*+?()[\]{}|]/.test(f)) {
    try { re = new RegExp(f, "i"); } catch (_) { re = null; }
  }
  if (re) return (m) => re.test(m);
  const terms = f.toLowerCase().split(/\s+/);
  return (m) => { const l = m.toLowerCase(); return terms.every((t) => l.includes(t)); };
}

/** Tick labels with as many decimals as the tick spacing needs. */
export function fmtTicks(u, splits, axisIdx, space, incr) {
  const log = u.scales[u.axes[axisIdx].scale || "y"].distr === 3;
  let max = 0;
  for (const v of splits) if (v !== null && Math.abs(v) > max) max = Math.abs(v);
  if (log) {
    return splits.map((v) => {
      if (v === null) return "";
      const a = Math.abs(v);
      return a >= 1e-3 && a < 1e5 ? String(Number(v.toPrecision(3))) : fmtSci(v, null);
    });
  }
  if (max >= 1e6 || (max > 0 && max < 1e-3)) {
    return splits.map((v) => (v === null ? "" : v === 0 ? "0" : fmtSci(v, incr)));
  }
  let dec = incr > 0 ? Math.max(0, Math.min(10, -Math.floor(Math.log10(incr) + 1e-9))) : 0;
  while (dec < 10 && incr > 0 && Math.abs(incr * 10 ** dec - Math.round(incr * 10 ** dec)) > 1e-6 * incr * 10 ** dec) dec++;
  return splits.map((v) => (v === null ? "" : dec ? v.toFixed(dec) : fmtInt(Math.round(v))));
}

function fmtSci(v, incr) {
  const e = Math.floor(Math.log10(Math.abs(v)));
  let digits = 2;
  if (incr) digits = Math.max(0, Math.min(6, e - Math.floor(Math.log10(incr))));
  return (v / 10 ** e).toFixed(digits).replace(/\.?0+$/, "") + "e" + e;
}

/** Dynamic axis width from the longest tick label (uPlot axis.size callback). */
function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  let size = axis.ticks.size + axis.gap;
  const longest = (values || []).reduce((a, v) => (v && v.length > a.length ? v : a), "");
  if (longest) {
    u.ctx.font = axis.font[0];
    size += u.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size) + 2;
}

/**
 * Join several sources {x, cols:[...]} on x. Returns uPlot data [X, ...cols].
 * A value that is not finite becomes null (a gap); x positions a source has
 * no point at stay undefined (uPlot bridges them). Equal x values inside one
 * source are kept (the union keeps each x as many times as the source that
 * repeats it most), so min/max points of a bucket are not lost.
 */
export function joinSources(sources, { logScale = false } = {}) {
  // finite -> itself; NaN/+-inf -> null (a gap); on a log scale v <= 0 -> undefined (skipped)
  const clean = (v) => (Number.isFinite(v) ? (logScale && v <= 0 ? undefined : v) : null);
  if (sources.length === 1) {
    const s = sources[0];
    let ok = !logScale;
    if (ok) {
      outer: for (const c of s.cols) {
        for (let i = 0; i < c.length; i++) if (!Number.isFinite(c[i])) { ok = false; break outer; }
      }
    }
    if (ok) return [s.x, ...s.cols];                       // the buffer views, as fetched
    return [s.x, ...s.cols.map((c) => Array.from(c, clean))];
  }
  const k = sources.length;
  const p = new Int32Array(k);
  const X = [];
  for (;;) {
    let v = Infinity;
    for (let j = 0; j < k; j++) {
      const xs = sources[j].x;
      if (p[j] < xs.length && xs[p[j]] < v) v = xs[p[j]];
    }
    if (v === Infinity) break;
    let m = 0;
    for (let j = 0; j < k; j++) {
      const xs = sources[j].x;
      let c = 0;
      while (p[j] < xs.length && xs[p[j]] === v) { p[j]++; c++; }
      if (c > m) m = c;
    }
    for (let i = 0; i < m; i++) X.push(v);
  }
  const out = [X];
  for (const s of sources) {
    const cols = s.cols.map(() => new Array(X.length));
    let i = 0;
    for (let q = 0; q < s.x.length; q++) {
      const xv = s.x[q];
      while (i < X.length && X[i] < xv) i++;
      if (i >= X.length) break;
      for (let c = 0; c < cols.length; c++) cols[c][i] = clean(s.cols[c][q]);
      i++;
    }
    out.push(...cols);
  }
  return out;
}

/**
 * The expand / shrink arrows drawn as SVG: a symbol character (U+2922) is in no font the first
 * layout already has, and looking for one cost the first layout a few milliseconds.
 */
function expandIcon() {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  const path = document.createElementNS(NS, "path");
  for (const [k, v] of [["viewBox", "0 0 12 12"], ["width", "12"], ["height", "12"], ["aria-hidden", "true"]]) svg.setAttribute(k, v);
  for (const [k, v] of [["d", "M1.5 10.5l9-9M6.5 1.5h4v4M1.5 6.5v4h4"], ["fill", "none"], ["stroke", "currentColor"],
    ["stroke-width", "1.4"], ["stroke-linecap", "round"], ["stroke-linejoin", "round"]]) path.setAttribute(k, v);
  svg.append(path);
  return svg;
}

function sortedCheck(x) {
  for (let i = 1; i < x.length; i++) if (x[i] < x[i - 1]) return false;
  return true;
}

/** Sort a source's columns by x (only when a resumed run made x non-monotonic). */
function sortByX(x, cols) {
  const idx = Array.from(x.keys()).sort((a, b) => x[a] - x[b]);
  return [Float64Array.from(idx, (i) => x[i]), cols.map((c) => Float64Array.from(idx, (i) => c[i]))];
}

function concat(a, b) {
  if (!a || !a.length) return b;
  if (!b || !b.length) return a;
  const out = new Float64Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

// =============================================================================

export class ScalarsPanel {
  /**
   * view: {runs: [key], summaries: Map(key -> summary), runLabel(key), opts,
   *        setParam(k, v), markReady(), refreshSummary()}
   */
  constructor(view) {
    this.view = view;
    this.cards = new Map();          // metric -> ChartCard
    this.groups = new Map();         // group -> {el, grid, count}
    this.el = el("div.scalars");
    this.controls = this.buildControls();
    this.body = el("div.scalar-groups");
    this.empty = el("div.empty", "No metrics logged yet.");
    this.el.append(this.controls, this.body);
    this.io = new IntersectionObserver((entries) => {
      for (const e of entries) if (e.isIntersecting) e.target._card?.activate();
    }, { rootMargin: "300px 0px" });
    this.ro = new ResizeObserver(debounce(() => {
      for (const c of this.cards.values()) c.resize();
    }, 120));
    this.ro.observe(this.body);
    this.sync();
  }

  get opts() { return this.view.opts; }

  buildControls() {
    const o = this.view.opts;
    const xSel = el("select#x-axis", { title: "x axis" },
      Object.entries(X_LABELS).map(([v, t]) => el("option", { value: v, selected: o.x === v }, t)));
    xSel.addEventListener("change", () => this.setOpt("x", xSel.value));

    const logBox = el("input#log-y", { type: "checkbox", checked: o.log });
    logBox.addEventListener("change", () => this.setOpt("log", logBox.checked));

    const smoothVal = el("span.smooth-val", o.smooth.toFixed(2));
    const smooth = el("input#smoothing", { type: "range", min: "0", max: "0.99", step: "0.01", value: String(o.smooth) });
    const applySmooth = debounce(() => this.setOpt("smooth", Number(smooth.value)), 250);
    smooth.addEventListener("input", () => { smoothVal.textContent = Number(smooth.value).toFixed(2); applySmooth(); });

    this.rankSel = el("select#rank-select", { title: "rank" });
    this.rankSel.addEventListener("change", () => this.setOpt("rank", this.rankSel.value));
    this.rankWrap = el("label.ctl.rank-ctl", "Rank ", this.rankSel);

    const filter = el("input#metric-filter", { type: "search", placeholder: "Filter metrics (text or regex)", value: o.filter || "" });
    filter.addEventListener("input", debounce(() => { this.view.setParam("filter", filter.value); this.applyFilter(); }, 150));

    const expandAll = el("button.btn.small", { type: "button", title: "expand every group" }, "Expand all");
    expandAll.addEventListener("click", () => { for (const g of this.groups.values()) g.el.open = true; });
    const collapseAll = el("button.btn.small", { type: "button", title: "collapse every group" }, "Collapse all");
    collapseAll.addEventListener("click", () => { for (const g of this.groups.values()) g.el.open = false; });

    this.legend = el("div.run-legend");
    const bar = el("div.controls",
      el("div.ctl-row",
        filter,
        el("label.ctl", "X ", xSel),
        el("label.ctl", logBox, " Log y"),
        el("label.ctl.smooth", "Smoothing ", smooth, smoothVal),
        this.rankWrap,
        el("span.spacer"),
        el("span.btn-group", expandAll, collapseAll)),
      this.legend);
    return bar;
  }

  setOpt(k, v) {
    this.view.opts[k] = v;
    this.view.setParam(k, k === "log" ? (v ? "1" : "") : k === "smooth" ? (v ? String(v) : "") : v);
    for (const c of this.cards.values()) c.optionsChanged();
  }

  /** Metrics (union over runs) -> cards; keeps existing cards. */
  sync() {
    const metrics = new Map();
    const ranks = new Set();
    for (const key of this.view.runs) {
      const s = this.view.summaries.get(key);
      if (!s || !s.metrics) continue;
      for (const m of s.metrics) {
        if (!metrics.has(m.name)) metrics.set(m.name, []);
        metrics.get(m.name).push({ key, info: m });
        for (const r of m.ranks || [0]) ranks.add(r);
      }
      for (const r of s.ranks || []) ranks.add(r);
    }
    this.updateRankSelect([...ranks].sort((a, b) => a - b));
    this.updateLegend();
    const names = [...metrics.keys()].sort((a, b) => {
      const ga = groupOf(a), gb = groupOf(b);
      if (ga !== gb) return ga === "general" ? -1 : gb === "general" ? 1 : ga < gb ? -1 : 1;
      return a < b ? -1 : a > b ? 1 : 0;
    });
    if (!names.length) {
      if (!this.empty.isConnected) this.body.append(this.empty);
      this.view.markReady?.("scalars-empty");
      return;
    }
    this.empty.remove();
    for (const name of names) {
      let card = this.cards.get(name);
      if (!card) {
        card = new ChartCard(this, name);
        this.cards.set(name, card);
        const g = this.group(groupOf(name));
        // keep cards sorted inside the group
        const after = [...g.grid.children].find((c) => c.dataset.metric > name);
        g.grid.insertBefore(card.el, after || null);
        this.io.observe(card.el);
      }
      card.runs = metrics.get(name);
    }
    for (const g of this.groups.values()) g.count.textContent = String(g.grid.children.length);
    this.applyFilter();
    this.activateVisible();
  }

  shown() { this.activateVisible(); }

  /** Cards already on screen start loading now, not a frame later when the observer reports them. */
  activateVisible() {
    if (!this.body.isConnected) return;
    const bottom = window.innerHeight + 300;
    for (const card of this.cards.values()) {
      if (card.active) continue;
      const r = card.el.getBoundingClientRect();
      if (r.width > 0 && r.bottom > -300 && r.top < bottom) card.activate();
    }
  }

  group(name) {
    let g = this.groups.get(name);
    if (g) return g;
    const count = el("span.count");
    const grid = el("div.chart-grid");
    const det = el("details.group", { open: true, dataset: { group: name } },
      el("summary", el("span.group-name", name), count), grid);
    g = { el: det, grid, count };
    this.groups.set(name, g);
    const names = [...this.groups.keys()].sort((a, b) => (a === "general" ? -1 : b === "general" ? 1 : a < b ? -1 : 1));
    const next = names[names.indexOf(name) + 1];
    this.body.insertBefore(det, next ? this.groups.get(next).el : null);
    return g;
  }

  updateRankSelect(ranks) {
    const cur = String(this.view.opts.rank);
    clear(this.rankSel);
    for (const r of ranks) this.rankSel.append(el("option", { value: String(r) }, `rank ${r}`));
    if (ranks.length > 1) {
      this.rankSel.append(el("option", { value: "all" }, "all ranks"));
      this.rankSel.append(el("option", { value: "band" }, "min–max band"));
    }
    this.rankSel.value = cur;
    if (this.rankSel.value !== cur && this.rankSel.options.length) this.rankSel.value = this.rankSel.options[0].value;
    this.rankWrap.hidden = ranks.length <= 1;
  }

  updateLegend() {
    clear(this.legend);
    if (this.view.runs.length < 2) { this.legend.hidden = true; return; }
    this.legend.hidden = false;
    for (const key of this.view.runs) {
      this.legend.append(el("span.legend-item", { title: key },
        el("span.swatch", { style: { background: runColor(key) } }), this.view.runLabel(key)));
    }
  }

  applyFilter() {
    const match = metricMatcher(this.view.opts.filter);
    let shown = 0;
    for (const g of this.groups.values()) {
      let n = 0;
      for (const c of g.grid.children) {
        const ok = match(c.dataset.metric);
        c.hidden = !ok;
        if (ok) n++;
      }
      g.el.hidden = n === 0;
      g.count.textContent = n === g.grid.children.length ? String(n) : `${n} / ${g.grid.children.length}`;
      shown += n;
    }
    if (this.cards.size && !shown) {
      this.view.markReady?.("scalars-filtered");
      this.empty.textContent = "No metric matches the filter.";
      if (!this.empty.isConnected) this.body.append(this.empty);
    } else if (this.cards.size) {
      this.empty.remove();
      this.empty.textContent = "No metrics logged yet.";
    }
  }

  /** event: run -> {run, lengths: {"rank/metric": n}}.  Returns true when `lengths` names a metric, or a rank of one, that the summary did not list. */
  onLive(runKey, lengths) {
    let unknown = false;
    for (const [k, n] of Object.entries(lengths || {})) {
      const i = k.indexOf("/");
      const rank = Number(k.slice(0, i));
      const metric = k.slice(i + 1);
      const card = this.cards.get(metric);
      const run = card && card.runs.find((r) => r.key === runKey);
      if (!run) { unknown = true; continue; }
      const ranks = run.info && run.info.ranks && run.info.ranks.length ? run.info.ranks : [0];
      if (!ranks.includes(rank)) unknown = true;
      card.onLength(runKey, rank, n);
    }
    return unknown;
  }

  /** After a reconnect: every active chart re-reads its data. */
  resync() {
    for (const c of this.cards.values()) {
      c.offlineUntil = 0;
      if (c.active && !c.zoom) c.load();
    }
  }

  destroy() {
    this.io.disconnect();
    this.ro.disconnect();
    for (const c of this.cards.values()) c.destroy();
    this.cards.clear();
  }
}

// =============================================================================

class ChartCard {
  constructor(panel, metric) {
    this.panel = panel;
    this.metric = metric;
    this.runs = [];            // [{key, info}] runs holding this metric
    this.sources = [];         // fetched series, see makeSources()
    this.u = null;
    this.active = false;
    this.zoom = null;          // [x0, x1] or null
    this.gen = 0;              // bumps on every full load: stale tails are dropped
    this.big = false;
    this.fetchedWidth = 0;
    this.state = koboState.charts[metric] = {
      points: 0, reduced: false, zoomed: false, drawn: false, lastFetch: null, sources: {}, nonfinite: { nan: 0, posinf: 0, neginf: 0 },
    };

    const g = groupOf(metric);
    const short = g !== "general" ? metric.slice(g.length + 1) : metric;
    this.titleEl = el("span.chart-title", { title: metric },
      g !== "general" ? el("span.prefix", g + "/") : null, short);
    this.nfEl = el("span.nonfinite");
    this.infoEl = el("span.chart-info");
    this.resetBtn = el("button.icon-btn.reset-zoom", { type: "button", title: "reset zoom (or double-click the chart)", hidden: true }, "⟲ reset");
    this.resetBtn.addEventListener("click", () => this.resetZoom());
    this.csvMenu = el("details.csv-menu", el("summary", { title: "download CSV (every point)" }, "CSV"), el("div.menu"));
    const expand = el("button.icon-btn", { type: "button", title: "expand / shrink", "aria-label": "expand / shrink" }, expandIcon());
    expand.addEventListener("click", () => this.toggleBig());
    this.plotEl = el("div.chart-plot", el("div.chart-loading", "loading…"));
    this.tip = el("div.chart-tip", { hidden: true });
    this.el = el("div.chart-card", { dataset: { metric } },
      el("div.chart-head", this.titleEl, this.nfEl, el("span.spacer"), this.infoEl, this.resetBtn, this.csvMenu, expand),
      this.plotEl);
    this.el._card = this;
    this.plotEl.addEventListener("dblclick", () => { if (this.zoom) this.resetZoom(); });
    this.plotEl.addEventListener("mouseenter", () => { this.hovering = true; });
    this.plotEl.addEventListener("mouseleave", () => { this.hovering = false; this.tip.hidden = true; });
  }

  /** The series this chart shows under the current options. */
  makeSources() {
    const opts = this.panel.opts;
    const multiRun = this.runs.length > 1;
    const out = [];
    for (const { key, info } of this.runs) {
      const ranks = (info.ranks && info.ranks.length ? info.ranks : [0]).slice().sort((a, b) => a - b);
      const color = runColor(key);
      const label = this.panel.view.runLabel(key);
      if (opts.rank === "band" && ranks.length > 1) {
        out.push({ key, rank: "band", color, label: `${label} (rank min–max)`, band: true });
      } else if (opts.rank === "all" || opts.rank === "band") {
        ranks.forEach((r, i) => out.push({
          key, rank: r, label: ranks.length > 1 ? `${label} · rank ${r}` : label,
          color: multiRun || ranks.length === 1 ? color : runColor(key, i),
          dash: multiRun ? DASHES[i % DASHES.length] : [],
        }));
      } else {
        const want = Number(opts.rank) || 0;
        const r = ranks.includes(want) ? want : ranks[0];
        out.push({ key, rank: r, color, label: r !== 0 || ranks.length > 1 ? `${label} · rank ${r}` : label });
      }
    }
    for (const s of out) {
      s.id = `${s.key}@${s.rank}`;
      s.x = new Float64Array(0);
      s.y = null; s.ys = null; s.lo = null; s.hi = null;
      s.marks = []; s.nonfinite = { nan: 0, posinf: 0, neginf: 0 };
      s.committed = 0; s.total = 0; s.reduced = false; s.header = null;
      s.pending = false; s.again = 0;
    }
    return out;
  }

  activate() {
    if (this.active) return;
    this.active = true;
    this.panel.io.unobserve(this.el);
    this.load();
  }

  optionsChanged() {
    // the old chart stays until the new data is in (render() rebuilds it when its series change)
    this.zoom = null;
    this.resetBtn.hidden = true;
    if (this.active) this.load();
  }

  widthPx() {
    const w = this.plotEl.clientWidth || 600;
    return Math.max(64, Math.min(10000, Math.round(w * (window.devicePixelRatio || 1))));
  }

  seriesParams(s, extra) {
    const o = this.panel.opts;
    const p = { metric: this.metric, rank: s.rank, x: o.x };
    if (o.smooth > 0 && !s.band) p.smooth = o.smooth;
    return Object.assign(p, extra);
  }

  /** Full (reduced) fetch of every source, for the zoom window if any. */
  async load() {
    const gen = ++this.gen;
    const fresh = this.makeSources();
    const width = this.widthPx();
    const extra = { width };
    if (this.zoom) { extra.x0 = this.zoom[0]; extra.x1 = this.zoom[1]; }
    this.el.classList.add("loading");
    try {
      const results = await Promise.all(fresh.map((s) => fetchSeries(s.key, this.seriesParams(s, extra))
        .then((r) => ({ r }), (e) => ({ e }))));
      if (gen !== this.gen) return;
      const errors = [];
      results.forEach(({ r, e }, i) => {
        const s = fresh[i];
        if (e) { errors.push(`${s.label}: ${e.message}`); s.error = e.message; return; }
        this.applyFull(s, r);
      });
      this.sources = fresh.filter((s) => !s.error);
      if (!this.sources.length && errors.length) {
        this.showError(errors.join("; "));
        for (const m of errors) reportError(m, `chart ${this.metric}`, { toast: false });
        clear(this.plotEl).append(el("div.chart-empty", "could not load this chart"));
        this.panel.view.markReady?.("chart-error");
        return;
      }
      // the width the data was reduced for (an early answer may be up to 2x this chart's)
      this.fetchedWidth = Math.max(width, ...results.map(({ r }) => (r && r.width) || 0));
      this.updateCsv();
      this.render(true);
      this.showError(errors.length ? errors.join("; ") : null);
      for (const m of errors) reportError(m, `chart ${this.metric}`, { toast: false });
    } catch (e) {
      if (gen !== this.gen) return;
      this.showError(e.message);
      reportError(e, `chart ${this.metric}`, { toast: false });
      this.panel.view.markReady?.("chart-error");
    } finally {
      if (gen === this.gen) this.el.classList.remove("loading");
    }
  }

  applyFull(s, r) {
    const h = r.header;
    let x = r.arrays.x;
    let cols = s.band ? [r.arrays.lo, r.arrays.hi] : [r.arrays.y, r.arrays.ys].filter(Boolean);
    if (!sortedCheck(x)) [x, cols] = sortByX(x, cols);
    s.x = x;
    if (s.band) [s.lo, s.hi] = cols; else { s.y = cols[0]; s.ys = cols[1] || null; }
    s.header = h;
    s.committed = h.committed ?? h.total ?? 0;
    s.total = h.total ?? s.x.length;
    s.inRange = h.in_range ?? s.total;
    s.reduced = !!h.reduced;
    s.marks = (h.marks || []).slice();
    s.nonfinite = Object.assign({ nan: 0, posinf: 0, neginf: 0 }, h.nonfinite || {});
    this.recordFetch(s, h, r);
  }

  recordFetch(s, h, r) {
    const st = this.state;
    st.lastFetch = Object.assign({}, h, { url: r.url, bytes: r.bytes, timing: r.timing, source: s.id, early: !!r.early });
    st.sources[s.id] = { points: s.x.length, reduced: s.reduced, committed: s.committed, total: s.total };
    const srcs = this.sources.includes(s) ? this.sources : [...this.sources.filter((o) => o.id !== s.id), s];
    st.points = srcs.reduce((a, o) => a + o.x.length, 0);
    st.reduced = srcs.some((o) => o.reduced);
  }

  /** uPlot data + series for the current sources. */
  build() {
    const o = this.panel.opts;
    const smooth = o.smooth > 0;
    const series = [{}];
    const bands = [];
    const parts = [];
    this.legendMap = [];  // per source: {label, color, main: seriesIdx, raw: seriesIdx|null, lo, hi}
    let idx = 1;
    for (const s of this.sources) {
      if (s.band) {
        parts.push({ x: s.x, cols: [s.lo, s.hi] });
        series.push({ label: s.label + " min", stroke: alpha(s.color, 0.7), width: 1, points: { show: false } });
        series.push({ label: s.label + " max", stroke: alpha(s.color, 0.7), width: 1, points: { show: false } });
        bands.push({ series: [idx + 1, idx], fill: alpha(s.color, 0.18) });
        this.legendMap.push({ s, lo: idx, hi: idx + 1 });
        idx += 2;
      } else if (smooth && s.ys) {
        parts.push({ x: s.x, cols: [s.y, s.ys] });
        series.push({ label: s.label + " raw", stroke: alpha(s.color, 0.22), width: 1, dash: s.dash, points: { show: false } });
        series.push({ label: s.label, stroke: s.color, width: 1.6, dash: s.dash });
        this.legendMap.push({ s, raw: idx, main: idx + 1 });
        idx += 2;
      } else {
        parts.push({ x: s.x, cols: [s.y || new Float64Array(s.x.length)] });
        series.push({ label: s.label, stroke: s.color, width: 1.4, dash: s.dash });
        this.legendMap.push({ s, main: idx });
        idx += 1;
      }
    }
    const data = joinSources(parts, { logScale: o.log });
    return { data, series, bands };
  }

  render(resetScales) {
    const st = this.state;
    const nf = { nan: 0, posinf: 0, neginf: 0 };
    for (const s of this.sources) for (const k in nf) nf[k] += s.nonfinite[k] || 0;
    st.nonfinite = nf;
    const parts = Object.entries(nf).filter(([, v]) => v > 0).map(([k, v]) => {
      return el("span.nf-badge", { class: `nf-badge nf-${k}`, title: `${v} ${MARK_LABELS[k]} value(s) in range, drawn as markers` }, `${fmtInt(v)} ${MARK_LABELS[k]}`);
    });
    clear(this.nfEl).append(...parts);
    this.nfEl.title = parts.length ? "non-finite values (not drawn as line points)" : "";
    this.updateInfo();

    const pts = this.sources.reduce((a, s) => a + s.x.length, 0);
    if (!this.sources.length || pts === 0) {
      if (this.u) { this.u.destroy(); this.u = null; }
      const hasNf = nf.nan + nf.posinf + nf.neginf > 0;
      clear(this.plotEl).append(el("div.chart-empty", this.zoom ? "no points in this range" : hasNf ? "only non-finite values" : "no points yet"));
      this.markDrawn();
      return;
    }
    const { data, series, bands } = this.build();
    const sig = series.map((s) => s.label).join("|") + (this.panel.opts.log ? "L" : "") + this.panel.opts.x;
    if (this.u && this.sig === sig) {
      this.u.setData(data, !this.zoom && resetScales !== false);
      if (this.zoom) this.u.setScale("x", { min: this.zoom[0], max: this.zoom[1] });
      return;
    }
    if (this.u) this.u.destroy();
    this.sig = sig;
    clear(this.plotEl);
    this.u = this.create(data, series, bands);
    this.plotEl.append(this.tip);
    if (this.zoom) this.u.setScale("x", { min: this.zoom[0], max: this.zoom[1] });
  }

  create(data, series, bands) {
    const o = this.panel.opts;
    const card = this;
    const xTime = o.x === "wall";
    const xAxis = {
      stroke: "#5c6370", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#dfe2e6", width: 1, size: 4 },
      font: "11px system-ui, sans-serif", size: 30,
    };
    if (o.x === "relative") xAxis.values = (u, splits, ai, space, incr) => splits.map((v) => fmtRelAxis(v, incr));
    else if (!xTime) xAxis.values = fmtTicks;
    const yAxis = {
      stroke: "#5c6370", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#dfe2e6", width: 1, size: 4 },
      font: "11px system-ui, sans-serif", size: axisSize, values: fmtTicks,
    };
    const opts = {
      width: this.plotEl.clientWidth || 600,
      height: this.big ? CHART_H_BIG : CHART_H,
      series,
      bands,
      legend: { show: false },
      padding: [10, 18, 0, 4],
      scales: {
        x: { time: xTime },
        y: o.log ? { distr: 3, log: 10 } : { auto: true },
      },
      axes: [xAxis, yAxis],
      cursor: {
        drag: { x: true, y: false, setScale: false },
        sync: { key: "kobo-x" },
        points: { size: 6 },
        bind: { dblclick: () => null },   // our own dblclick handler resets a server zoom
      },
      hooks: {
        setSelect: [(u) => {
          const sel = u.select;
          if (sel.width > 4) {
            const x0 = u.posToVal(sel.left, "x"), x1 = u.posToVal(sel.left + sel.width, "x");
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
            card.zoomTo(x0, x1).catch((e) => reportError(e, `zoom ${card.metric}`));
          }
        }],
        setCursor: [(u) => card.updateTip(u)],
        draw: [(u) => { card.drawMarks(u); card.markDrawn(); }],
      },
    };
    return new uPlot(opts, data, this.plotEl);
  }

  drawMarks(u) {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const pr = window.devicePixelRatio || 1;
    const sz = 4 * pr;
    ctx.save();
    for (const s of this.sources) {
      for (const m of s.marks) {
        const px = u.valToPos(m.x, "x", true);
        if (!(px >= left - 1 && px <= left + width + 1)) continue;
        ctx.fillStyle = MARK_COLORS[m.kind] || "#e03131";
        ctx.beginPath();
        if (m.kind === "posinf") {          // triangle at the top, pointing up
          ctx.moveTo(px, top); ctx.lineTo(px - sz, top + sz * 1.6); ctx.lineTo(px + sz, top + sz * 1.6);
        } else if (m.kind === "neginf") {   // triangle at the bottom, pointing down
          const b = top + height;
          ctx.moveTo(px, b); ctx.lineTo(px - sz, b - sz * 1.6); ctx.lineTo(px + sz, b - sz * 1.6);
        } else {                            // NaN: a tick + dot on the bottom edge
          const b = top + height;
          ctx.rect(px - pr * 0.75, b - sz * 2.2, pr * 1.5, sz * 2.2);
          ctx.moveTo(px + sz * 0.8, b - sz * 2.2);
          ctx.arc(px, b - sz * 2.2, sz * 0.8, 0, Math.PI * 2);
        }
        ctx.closePath();
        ctx.fill();
      }
    }
    ctx.restore();
  }

  markDrawn() {
    if (!this.state.drawn) {
      this.state.drawn = true;
      this.el.dataset.drawn = "1";
      if (koboPerf.firstChartDraw === null) koboPerf.firstChartDraw = performance.now();
      this.panel.view.markReady?.("chart");
    }
  }

  updateTip(u) {
    const i = u.cursor.idx;
    // only the chart under the mouse shows values (the others follow with a synced cursor)
    if (!this.hovering || i === null || i === undefined || u.cursor.left < 0 || !this.legendMap) { this.tip.hidden = true; return; }
    const xs = u.data[0];
    const o = this.panel.opts;
    const xv = xs[i];
    const near = (sIdx) => {
      const ys = u.data[sIdx];
      if (!ys) return null;
      for (let d = 0; d < 64; d++) {
        for (const j of d ? [i - d, i + d] : [i]) {
          if (j >= 0 && j < ys.length && ys[j] !== undefined && ys[j] !== null) return [ys[j], xs[j]];
        }
      }
      return null;
    };
    const rows = [];
    for (const L of this.legendMap) {
      let val, raw = null, at;
      if (L.s.band) {
        const lo = near(L.lo), hi = near(L.hi);
        if (!lo && !hi) continue;
        val = `${fmtValue(lo && lo[0])} … ${fmtValue(hi && hi[0])}`;
        at = (lo || hi)[1];
      } else {
        const m = near(L.main);
        if (!m) continue;
        val = fmtValue(m[0]);
        at = m[1];
        if (L.raw) { const r = near(L.raw); raw = r ? fmtValue(r[0]) : null; }
      }
      rows.push(el("div.tip-row",
        el("span.swatch", { style: { background: L.s.color } }),
        el("span.tip-label", L.s.label),
        el("span.tip-val", val),
        el("span.tip-raw", raw !== null ? `raw ${raw}` : ""),
        el("span.tip-raw", at !== xv ? `@${this.fmtX(at)}` : "")));
    }
    if (!rows.length) { this.tip.hidden = true; return; }
    clear(this.tip).append(el("div.tip-x", `${X_LABELS[o.x]} ${this.fmtX(xv)}`), el("div.tip-grid", rows));
    this.tip.hidden = false;
    const pw = this.plotEl.clientWidth;
    const left = u.cursor.left + u.bbox.left / (window.devicePixelRatio || 1);
    const tw = this.tip.offsetWidth;
    this.tip.style.left = (left + 14 + tw > pw ? Math.max(0, left - tw - 14) : left + 14) + "px";
    this.tip.style.top = "8px";
  }

  fmtX(v) {
    const x = this.panel.opts.x;
    if (v === null || v === undefined) return "–";
    if (x === "wall") return fmtTime(v);
    if (x === "relative") return fmtRelAxis(v);
    return fmtInt(v);
  }

  updateInfo() {
    const received = this.sources.reduce((a, s) => a + s.x.length, 0);
    const total = this.sources.reduce((a, s) => a + (this.zoom ? s.inRange ?? s.total : s.total), 0);
    const reduced = this.sources.some((s) => s.reduced);
    this.infoEl.textContent = reduced ? `${fmtInt(received)} of ${fmtInt(total)} pts` : `${fmtInt(total)} pts`;
    this.infoEl.title = reduced
      ? "reduced on the server: first/min/max/last of every point per pixel column; zoom (drag) for full resolution"
      : "every point";
    this.state.zoomed = !!this.zoom;
  }

  updateCsv() {
    const menu = this.csvMenu.querySelector(".menu");
    clear(menu);
    const r = this.panel.opts.rank;
    const rankParam = r === "all" || r === "band" ? "all" : String(r);
    for (const { key } of this.runs) {
      const s = this.sources.find((o) => o.key === key);
      const rank = s && s.rank !== "band" && rankParam !== "all" ? s.rank : rankParam;
      menu.append(el("a.csv-link", {
        href: api.csvUrl(key, this.metric, rank), download: "", dataset: { run: key },
      }, `${this.panel.view.runLabel(key)} (${rank === "all" ? "all ranks" : "rank " + rank})`));
    }
  }

  showError(msg) {
    let e = this.el.querySelector(".chart-error");
    if (!msg) { if (e) e.remove(); return; }
    if (!e) { e = el("div.chart-error"); this.el.append(e); }
    e.textContent = msg;
  }

  /** Zoom to [x0, x1] at full resolution (re-asks the server). */
  async zoomTo(x0, x1) {
    if (!(x1 > x0)) return;
    this.zoom = [x0, x1];
    this.resetBtn.hidden = false;
    this.state.zoomed = true;
    if (!this.active) { this.active = true; this.panel.io.unobserve(this.el); }
    await this.load();
  }

  async resetZoom() {
    this.zoom = null;
    this.resetBtn.hidden = true;
    this.state.zoomed = false;
    await this.load();
  }

  toggleBig() {
    this.big = !this.big;
    this.el.classList.toggle("big", this.big);
    this.resize(true);
  }

  resize(force) {
    if (!this.u) return;
    const w = this.plotEl.clientWidth;
    const h = this.big ? CHART_H_BIG : CHART_H;
    if (!w || (!force && Math.abs(w - this.u.width) < 2 && h === this.u.height)) return;
    this.u.setSize({ width: w, height: h });
    if (this.widthPx() > this.fetchedWidth * 1.3 && this.sources.some((s) => s.reduced)) this.load();
  }

  // ---- live ---------------------------------------------------------------------

  onLength(key, rank, n) {
    if (!this.active) return;
    const srcs = this.sources.filter((s) => s.key === key && (s.rank === rank || s.rank === "band"));
    for (const s of srcs) {
      if (n <= s.committed && !s.band) continue;
      if (this.zoom) {          // leave zoomed data alone; just update the counts
        s.total = Math.max(s.total, n);
        this.updateInfo();
        continue;
      }
      if (s.band || (this.panel.opts.smooth > 0 && this.noTailSmooth)) { this.scheduleReload(); continue; }
      this.tail(s, n);
    }
  }

  scheduleReload() {
    if (this.reloadTimer) return;
    this.reloadTimer = setTimeout(() => { this.reloadTimer = null; if (!this.zoom) this.load(); }, 1500);
  }

  async tail(s, n) {
    if (s.pending) { s.again = Math.max(s.again, n); return; }
    if (this.offlineUntil && Date.now() < this.offlineUntil) return;   // the server was unreachable just now
    s.pending = true;
    const gen = this.gen;
    try {
      const start = s.committed;
      // with the chart's width: a tail of more than 4 points per pixel column comes reduced
      const r = await fetchSeries(s.key, this.seriesParams(s, { start, width: this.widthPx() }));
      if (gen !== this.gen || this.zoom || !this.sources.includes(s)) return;
      const h = r.header;
      const a = r.arrays;
      if (this.panel.opts.smooth > 0 && !a.ys) { this.noTailSmooth = true; this.scheduleReload(); return; }
      if (a.x.length) {
        const lastX = s.x.length ? s.x[s.x.length - 1] : -Infinity;
        if (a.x[0] < lastX) { this.scheduleReload(); return; }   // out of order: re-read
        s.x = concat(s.x, a.x);
        s.y = concat(s.y, a.y);
        if (s.ys || a.ys) s.ys = concat(s.ys || new Float64Array(s.x.length - a.x.length).fill(NaN), a.ys || new Float64Array(a.x.length).fill(NaN));
      }
      s.committed = h.committed ?? start + a.x.length;
      s.total = Math.max(s.total + (h.in_range ?? a.x.length), h.total ?? 0);
      if (h.reduced) s.reduced = true;
      s.inRange = s.total;
      for (const m of h.marks || []) s.marks.push(m);
      const nf = h.nonfinite || {};
      for (const k of ["nan", "posinf", "neginf"]) s.nonfinite[k] += nf[k] || 0;
      this.recordFetch(s, h, r);
      koboState.liveUpdates++;
      if (s.x.length > 4 * Math.max(this.widthPx(), this.fetchedWidth)) { this.scheduleReload(); }
      this.render(true);
    } catch (e) {
      if (e.status === 0) {          // server unreachable: wait; the stream's reconnect resyncs
        this.offlineUntil = Date.now() + 3000;
        s.again = 0;
        reportError(e, `live ${this.metric}`, { toast: false });
      } else reportError(e, `live ${this.metric}`);
    } finally {
      s.pending = false;
      if (s.again > s.committed) { const m = s.again; s.again = 0; this.tail(s, m); }
    }
  }

  destroy() {
    this.gen++;
    clearTimeout(this.reloadTimer);
    if (this.u) this.u.destroy();
    this.u = null;
  }
}

/** window.koboZoom(metric, x0, x1) -> Promise (resolves once the zoomed data is drawn). */
export function installZoomHook(getPanel) {
  window.koboZoom = async (metric, x0, x1) => {
    const p = getPanel();
    const c = p && p.cards.get(metric);
    if (!c) throw new Error(`no chart for metric ${metric}`);
    await c.zoomTo(x0, x1);
    return koboState.charts[metric];
  };
  window.koboResetZoom = async (metric) => {
    const p = getPanel();
    const c = p && p.cards.get(metric);
    if (!c) throw new Error(`no chart for metric ${metric}`);
    await c.resetZoom();
    return koboState.charts[metric];
  };
}

