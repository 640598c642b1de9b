// Rich values: media, tables, histograms, KDE curves and tensors.
// One card per (run, name); cards load lazily when scrolled into view and
// re-read their rows when the run summary's count for that name (at the rank
// the card shows) changes.  A name logged by several ranks gets a rank select
// on its card; one logged only by other ranks than 0 shows its lowest rank.

import { api } from "./api.js";
import { reportError } from "./state.js";
import { pageUrl } from "./session.js";
import { el, clear, fmtInt, fmtValue, fmtShort, fmtTime, fmtBytes, runColor, alpha, debounce } from "./util.js";
import { groupOf, joinSources } from "./charts.js";

const uPlot = window.uPlot;

export const KINDS = {
  media: { endpoint: "media", key: "media", label: "Media", empty: "No media logged yet." },
  tables: { endpoint: "tables", key: "table", label: "Tables", empty: "No tables logged yet." },
  histograms: { endpoint: "histograms", key: "histogram", label: "Histograms", empty: "No histograms logged yet." },
  kde: { endpoint: "kde", key: "kde", label: "Distributions", empty: "No distributions (KDE) logged yet." },
  tensors: { endpoint: "tensors", key: "tensor", label: "Tensors", empty: "No tensors logged yet." },
};

// ---- the step slider shared by every card ------------------------------------------

/** A slider over the exact logged steps of `rows`; follows the latest row until moved. */
class StepSlider {
  constructor(onChange) {
    this.onChange = onChange;
    this.rows = [];
    this.index = -1;
    this.follow = true;
    this.input = el("input.step-slider", { type: "range", min: "0", max: "0", step: "1", value: "0", "aria-label": "step" });
    this.label = el("span.step-label");
    this.prev = el("button.icon-btn", { type: "button", title: "previous step" }, "‹");
    this.next = el("button.icon-btn", { type: "button", title: "next step" }, "›");
    this.latest = el("button.icon-btn.follow", { type: "button", title: "jump to the latest step and follow new ones" }, "latest");
    this.input.addEventListener("input", () => this.set(Number(this.input.value), true));
    this.prev.addEventListener("click", () => this.set(this.index - 1, true));
    this.next.addEventListener("click", () => this.set(this.index + 1, true));
    this.latest.addEventListener("click", () => { this.follow = true; this.set(this.rows.length - 1, false); });
    this.el = el("div.step-ctl", this.prev, this.input, this.next, this.label, this.latest);
  }

  /** New rows: keep following the latest, else stay on the shown step (or the last one before it). */
  setRows(rows) {
    const old = this.index >= 0 ? this.rows[this.index] : null;
    this.rows = rows;
    this.input.max = String(Math.max(0, rows.length - 1));
    this.el.classList.toggle("single", rows.length <= 1);
    let i = rows.length - 1;
    if (!this.follow && old) {
      i = 0;
      for (let j = 0; j < rows.length; j++) if (rows[j].step <= old.step) i = j;
    }
    this.set(i, false, true);
  }

  set(i, byUser, force) {
    const n = this.rows.length;
    if (!n) { this.index = -1; this.label.textContent = "no rows"; return; }
    i = Math.max(0, Math.min(n - 1, i | 0));
    if (byUser) this.follow = i === n - 1;
    const changed = i !== this.index || force;
    this.index = i;
    this.input.value = String(i);
    const r = this.rows[i];
    this.label.textContent = `step ${fmtInt(r.step)}  (${i + 1}/${n})`;
    this.label.title = `global step ${fmtInt(r.global_step)} · ${fmtTime(r.wall)}`;
    this.latest.classList.toggle("on", this.follow);
    this.prev.disabled = i === 0;
    this.next.disabled = i === n - 1;
    if (changed) this.onChange(r, i);
  }

  /** Select the row whose step is `step` (or the closest one before it). */
  setStep(step) {
    let best = 0;
    for (let i = 0; i < this.rows.length; i++) if (this.rows[i].step <= step) best = i;
    this.set(best, true);
  }
}

// ---- colour maps -------------------------------------------------------------------

const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
function hexRgb(h) { const n = parseInt(h.slice(1), 16); return [(n >> 16) & 255, (n >> 8) & 255, n & 255]; }
const VIR_RGB = VIRIDIS.map(hexRgb);
function lerpStops(stops, t) {
  t = Math.max(0, Math.min(1, t));
  const f = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(f));
  const w = f - i;
  const a = stops[i], b = stops[i + 1];
  return [a[0] + (b[0] - a[0]) * w, a[1] + (b[1] - a[1]) * w, a[2] + (b[2] - a[2]) * w];
}
/** Sequential (count) colour: white for 0, then viridis. */
function seqColor(t) {
  if (t <= 0) return [250, 250, 252];
  return lerpStops(VIR_RGB, 0.08 + 0.92 * t);
}
// diverging blue - white - red (RdBu-like)
const DIV = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"].map(hexRgb);
function divColor(t) { return lerpStops(DIV, (t + 1) / 2); }

function gradientCss(fn, n = 16) {
  const stops = [];
  for (let i = 0; i <= n; i++) { const c = fn(i / n).map(Math.round); stops.push(`rgb(${c[0]},${c[1]},${c[2]}) ${(100 * i) / n}%`); }
  return `linear-gradient(to right, ${stops.join(",")})`;
}

// =============================================================================

export class ItemsPanel {
  /** kind: a key of KINDS; view: the run view (runs, summaries, runLabel, markReady) */
  constructor(view, kind) {
    this.view = view;
    this.kind = kind;
    this.spec = KINDS[kind];
    this.cards = new Map();          // "run|name" -> card
    this.groups = new Map();
    this.filter = el("input.item-filter", { type: "search", placeholder: `Filter ${this.spec.label.toLowerCase()} by name` });
    this.filter.addEventListener("input", debounce(() => this.applyFilter(), 150));
    this.body = el("div.item-groups");
    this.empty = el("div.empty", this.spec.empty);
    this.el = el("div.items-panel", { dataset: { kind } }, el("div.controls", el("div.ctl-row", this.filter)), this.body);
    this.io = new IntersectionObserver((entries) => {
      for (const e of entries) if (e.isIntersecting) e.target._card?.activate();
    }, { rootMargin: "300px 0px" });
    this.sync();
  }

  entries() {
    const out = [];
    for (const key of this.view.runs) {
      const s = this.view.summaries.get(key);
      const list = (s && s.items && s.items[this.spec.key]) || [];
      for (const it of list) out.push({ key, name: it.name, count: it.count ?? 0, info: it });
    }
    out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : this.view.runs.indexOf(a.key) - this.view.runs.indexOf(b.key)));
    return out;
  }

  sync() {
    const entries = this.entries();
    if (!entries.length) {
      if (!this.empty.isConnected) this.body.append(this.empty);
      this.view.markReady?.(`${this.kind}-empty`);
      return;
    }
    this.empty.remove();
    for (const e of entries) {
      const id = `${e.key}|${e.name}`;
      let card = this.cards.get(id);
      if (!card) {
        const Cls = CARD_CLASSES[this.kind];
        card = new Cls(this, e);
        this.cards.set(id, card);
        const g = this.group(groupOf(e.name));
        g.grid.append(card.el);
        this.io.observe(card.el);
      } else {
        card.setInfo(e.info);
      }
    }
    this.applyFilter();
  }

  /** The tab is shown again: cards whose rows changed while it was hidden re-read them. */
  shown() {
    for (const c of this.cards.values()) if (c.stale) { c.stale = false; c.reloadSoon(); }
  }

  group(name) {
    let g = this.groups.get(name);
    if (g) return g;
    const count = el("span.count");
    const grid = el(`div.item-grid.${this.kind}-grid`);
    const det = el("details.group", { open: true, dataset: { group: name } }, el("summary", el("span.group-name", name), count), grid);
    g = { el: det, grid, count };
    this.groups.set(name, g);
    const names = [...this.groups.keys()].sort((a, b) => (a === "general" ? -1 : b === "general" ? 1 : a < b ? -1 : 1));
    const next = names[names.indexOf(name) + 1];
    this.body.insertBefore(det, next ? this.groups.get(next).el : null);
    return g;
  }

  applyFilter() {
    const f = this.filter.value.trim().toLowerCase();
    for (const g of this.groups.values()) {
      let n = 0;
      for (const c of g.grid.children) {
        const ok = !f || c.dataset.item.toLowerCase().includes(f);
        c.hidden = !ok;
        if (ok) n++;
      }
      g.el.hidden = n === 0;
      g.count.textContent = String(n);
    }
  }

  destroy() {
    this.io.disconnect();
    for (const c of this.cards.values()) c.destroy();
  }
}

// =============================================================================

/** The ranks that logged an item (summary `ranks`, sorted), [0] for a summary without them. */
function itemRanks(info) {
  const r = info && Array.isArray(info.ranks) && info.ranks.length ? info.ranks : [0];
  return r.map(Number).sort((a, b) => a - b);
}

class ItemCard {
  constructor(panel, entry) {
    this.panel = panel;
    this.key = entry.key;
    this.name = entry.name;
    this.info = entry.info || {};
    this.count = entry.count;
    this.ranks = itemRanks(this.info);
    // rank 0 when it logged this item, else the lowest rank that did
    this.rank = this.ranks.includes(0) ? 0 : this.ranks[0];
    this.loaded = null;              // rows the server held for (rank) at the last load (before thinning)
    this.rows = [];
    this.active = false;
    this.slider = new StepSlider((row, i) => this.show(row, i));
    const multi = panel.view.runs.length > 1;
    this.body = el("div.item-body", el("div.item-loading", "loading…"));
    this.countEl = el("span.chart-info");
    this.rankSel = el("select.item-rank", { title: "rank", "aria-label": `rank of ${entry.name}` });
    this.rankSel.addEventListener("change", () => this.setRank(Number(this.rankSel.value)));
    this.rankTag = el("span.rank-tag");
    this.el = el(`div.item-card.${panel.kind}-card`, { dataset: { item: entry.name, kind: panel.kind, run: entry.key } },
      el("div.chart-head",
        multi ? el("span.swatch", { style: { background: runColor(entry.key) }, title: panel.view.runLabel(entry.key) }) : null,
        el("span.chart-title", { title: entry.name }, entry.name),
        multi ? el("span.run-tag", panel.view.runLabel(entry.key)) : null,
        el("span.spacer"), this.rankTag, this.rankSel, this.countEl),
      this.slider.el, this.body);
    this.el._card = this;
    this.updateRankSelect();
  }

  /** Rows the summary says the shown rank holds (the item's total for a summary without counts_by_rank). */
  expected() {
    const by = this.info.counts_by_rank;
    if (by && typeof by === "object") return by[String(this.rank)] ?? 0;
    return this.count ?? 0;
  }

  /** The summary's entry for this item changed (live): new ranks, new counts. */
  setInfo(info) {
    this.info = info || {};
    this.count = this.info.count ?? this.count;
    const ranks = itemRanks(this.info);
    let moved = false;
    if (ranks.join(",") !== this.ranks.join(",")) {
      this.ranks = ranks;
      if (!ranks.includes(this.rank)) {   // the shown rank holds no rows (an entry without ranks before)
        this.rank = ranks.includes(0) ? 0 : ranks[0];
        moved = true;
      }
      this.updateRankSelect();
    } else this.updateRankCounts();
    if (this.active && (moved || (this.loaded !== null && this.expected() !== this.loaded))) this.reloadSoon();
  }

  updateRankSelect() {
    const many = this.ranks.length > 1;
    clear(this.rankSel);
    if (many) {
      for (const r of this.ranks) this.rankSel.append(el("option", { value: String(r) }, `rank ${r}`));
      this.rankSel.value = String(this.rank);
    }
    this.rankSel.hidden = !many;
    // a single rank other than 0: say which one is shown
    this.rankTag.hidden = many || this.rank === 0;
    this.rankTag.textContent = `rank ${this.rank}`;
    this.updateRankCounts();
  }

  /** Rows per rank in the select's tooltip ("rank 0: 6 steps · rank 1: 6 steps"). */
  updateRankCounts() {
    const by = this.info.counts_by_rank || {};
    this.rankSel.title = this.ranks.map((r) => (by[String(r)] === undefined ? `rank ${r}` : `rank ${r}: ${fmtInt(by[String(r)])} steps`)).join(" · ");
  }

  /** Show another rank's rows (the rank select). */
  setRank(r) {
    if (r === this.rank || !this.ranks.includes(r)) return;
    this.rank = r;
    this.rankSel.value = String(r);
    this.rankTag.textContent = `rank ${r}`;
    if (this.active) this.load(); else this.activate();
  }

  /** Count label: rows shown (and rows held, when the server thinned them). */
  setCountLabel(data) {
    const n = this.rows.length;
    const total = typeof data.total === "number" ? data.total : n;
    this.countEl.textContent = total > n ? `${fmtInt(n)} of ${fmtInt(total)} steps` : `${fmtInt(n)} step${n === 1 ? "" : "s"}`;
    this.countEl.title = total > n ? `${fmtInt(total)} steps logged; ${fmtInt(n)} evenly spaced ones shown (first and last kept)` : "";
    this.el.classList.toggle("thinned", total > n);
  }

  /** Rows the server could not read back (a damaged or foreign record): said on the card, never silently left out. */
  showSkipped(skipped) {
    this.el.querySelector(".item-skipped")?.remove();
    if (!skipped.length) return;
    const steps = skipped.map((s) => s.step).filter((s) => s !== null && s !== undefined);
    this.el.append(el("div.item-skipped.warn-box", { role: "note", title: skipped.map((s) => s.reason).join("\n") },
      `${fmtInt(skipped.length)} row${skipped.length === 1 ? "" : "s"} could not be read and ${skipped.length === 1 ? "is" : "are"} left out`
      + (steps.length ? ` (step ${steps.slice(0, 5).map(fmtInt).join(", ")}${steps.length > 5 ? ", …" : ""})` : "")
      + `: ${skipped[0].reason}`));
  }

  activate() {
    if (this.active) return;
    this.active = true;
    this.panel.io.unobserve(this.el);
    this.load();
  }

  /** Re-read the rows soon (now if the tab is shown; when it is shown again otherwise). */
  reloadSoon() {
    if (!this.active) return;
    if (this.panel.el.hidden) { this.stale = true; return; }
    if (this.timer) return;
    this.timer = setTimeout(() => { this.timer = null; this.load(); }, 400);
  }

  async load() {
    const gen = (this.gen = (this.gen || 0) + 1);
    const rank = this.rank;
    try {
      const data = await api.items(this.key, this.panel.spec.endpoint, this.name, rank);
      if (gen !== this.gen) return;
      this.rows = data.rows || [];
      this.loaded = typeof data.total === "number" ? data.total : this.rows.length;
      this.el.dataset.rank = String(rank);
      this.setCountLabel(data);
      this.el.querySelector(".item-error")?.remove();
      this.showSkipped(data.skipped || []);
      if (!this.rows.length) {
        this.resetBody().append(el("div.chart-empty", "no rows yet"));
        this.slider.setRows([]);
        this.drawn();
        return;
      }
      this.rowsLoaded();
      this.slider.setRows(this.rows);
    } catch (e) {
      if (gen !== this.gen) return;
      this.loaded = null;
      this.resetBody();
      this.el.append(el("div.item-error.chart-error", e.message));
      reportError(e, `${this.panel.kind} ${this.name}`, { toast: false });
      this.drawn();
    }
  }

  rowsLoaded() {}

  /** Empty the body (a message goes there); cards that build a layout once drop it so the next rows rebuild it. */
  resetBody() {
    this.dropLayout();
    return clear(this.body);
  }

  dropLayout() {}

  drawn() {
    if (this.el.dataset.drawn !== "1") {
      this.el.dataset.drawn = "1";
      this.panel.view.markReady?.(this.panel.kind);
    }
  }

  destroy() { clearTimeout(this.timer); this.gen = (this.gen || 0) + 1; }
}

// ---- media ---------------------------------------------------------------------

function mediaNode(m, { thumb = false } = {}) {
  const type = m.media_type || "image";
  const url = pageUrl(m.url);   // the server's "/media/..." under the page's base path
  if (type === "video") return el("video", { controls: true, preload: "metadata", src: url, class: thumb ? "thumb" : "" });
  if (type === "audio") return el("audio", { controls: true, preload: "metadata", src: url, class: thumb ? "thumb" : "" });
  const img = el("img", { src: url, alt: m.caption || "", loading: "lazy", decoding: "async", class: thumb ? "thumb" : "" });
  if (m.width && m.height) { img.width = m.width; img.height = m.height; }
  if (m.width && m.width < 160) img.classList.add("pixelated");
  return el("a.media-link", { href: url, target: "_blank", rel: "noopener", title: "open full size" }, img);
}

class MediaCard extends ItemCard {
  show(row) {
    const frame = el(`div.media-frame.${row.media_type || "image"}`, mediaNode(row));
    const meta = el("div.media-meta",
      row.caption ? el("div.caption", row.caption) : null,
      el("div.muted", `step ${fmtInt(row.step)} · ${row.media_type || "image"}${row.width ? ` · ${row.width}×${row.height}` : ""}${row.size ? ` · ${fmtBytes(row.size)}` : ""}`));
    clear(this.body).append(frame, meta);
    const img = frame.querySelector("img");
    if (img && !img.complete) {
      img.addEventListener("load", () => this.drawn(), { once: true });
      img.addEventListener("error", () => { frame.append(el("div.chart-error", "image failed to load")); this.drawn(); }, { once: true });
    } else this.drawn();
  }
}

// ---- tables --------------------------------------------------------------------

function cellNode(v) {
  if (v && typeof v === "object" && v.$media) return mediaNode(v.$media, { thumb: true });
  if (v === null || v === undefined) return el("span.muted", "–");
  if (typeof v === "number") return el("span.num", fmtValue(v));
  if (typeof v === "boolean") return el("span.bool", String(v));
  if (typeof v === "object") return el("code", JSON.stringify(v));
  return String(v);
}

class TableCard extends ItemCard {
  show(row) {
    const cols = row.columns || [];
    const table = el("table.data-table",
      el("thead", el("tr", el("th.rownum", "#"), cols.map((c) => el("th", c)))),
      el("tbody", (row.rows || []).map((r, i) => el("tr", el("td.rownum", String(i)), r.map((c) => el("td", cellNode(c)))))));
    clear(this.body).append(el("div.table-scroll", table),
      el("div.muted.small", `${fmtInt((row.rows || []).length)} rows × ${cols.length} columns · step ${fmtInt(row.step)}`));
    this.drawn();
  }
}

// ---- histograms ------------------------------------------------------------------

/** Re-bin counts over `edges` onto `nb` equal bins in [lo, hi] by overlap. */
export function rebin(edges, counts, lo, hi, nb) {
  const out = new Float64Array(nb);
  const w = (hi - lo) / nb;
  if (!(w > 0)) { out[0] = counts.reduce((a, b) => a + (b || 0), 0); return out; }
  for (let i = 0; i < counts.length; i++) {
    const c = counts[i] || 0;
    if (!c) continue;
    const a = edges[i], b = edges[i + 1];
    if (!(b > a)) { const j = Math.min(nb - 1, Math.max(0, Math.floor((a - lo) / w))); out[j] += c; continue; }
    const j0 = Math.max(0, Math.floor((a - lo) / w)), j1 = Math.min(nb - 1, Math.floor((b - lo) / w));
    for (let j = j0; j <= j1; j++) {
      const l = Math.max(a, lo + j * w), r = Math.min(b, lo + (j + 1) * w);
      if (r > l) out[j] += (c * (r - l)) / (b - a);
    }
  }
  return out;
}

class HistogramCard extends ItemCard {
  constructor(panel, entry) {
    super(panel, entry);
    this.el.classList.add("wide");
  }

  rowsLoaded() {
    const rows = this.rows;
    let lo = Infinity, hi = -Infinity;
    for (const r of rows) {
      const e = r.edges || [];
      if (e.length) { lo = Math.min(lo, e[0]); hi = Math.max(hi, e[e.length - 1]); }
    }
    if (!(hi > lo)) { lo = (isFinite(lo) ? lo : 0) - 0.5; hi = lo + 1; }
    this.lo = lo; this.hi = hi;
    const nb = (this.nb = 96);
    this.grid = rows.map((r) => rebin(r.edges || [], r.counts || [], lo, hi, nb));
    // layout (kept across rows)
    if (!this.heat) {
      this.heat = el("canvas.heatmap");
      this.heatMarker = el("div.heat-marker");
      this.heatTip = el("div.chart-tip", { hidden: true });
      this.heatAxisX = el("div.heat-axis-x");
      this.heatAxisY = el("div.heat-axis-y");
      this.norm = el("select.heat-norm", { title: "colour scale" },
        el("option", { value: "row" }, "per-step max"), el("option", { value: "global" }, "global max"));
      this.norm.addEventListener("change", () => this.drawHeat());
      this.heatWrap = el("div.heat-wrap", this.heatAxisY, el("div.heat-canvas-wrap", this.heat, this.heatMarker, this.heatTip), this.heatAxisX);
      this.barEl = el("div.hist-bar");
      this.statsEl = el("div.hist-stats");
      this.heatLegend = el("div.heat-legend", el("span.muted", "count "), el("span.grad", { style: { background: gradientCss(seqColor) } }), this.norm);
      clear(this.body).append(
        el("div.sub-title", "over steps", el("span.spacer"), this.heatLegend),
        this.heatWrap,
        el("div.sub-title", "at the selected step", el("span.spacer"), this.statsEl),
        this.barEl);
      this.heat.addEventListener("mousemove", (ev) => this.heatHover(ev));
      this.heat.addEventListener("mouseleave", () => { this.heatTip.hidden = true; });
      this.heat.addEventListener("click", (ev) => {
        const { row } = this.heatPos(ev);
        if (row >= 0) this.slider.set(row, true);
      });
    }
    this.drawHeat();
  }

  drawHeat() {
    const rows = this.grid, nb = this.nb;
    const cv = this.heat;
    cv.width = nb;
    cv.height = rows.length;
    const ctx = cv.getContext("2d");
    const img = ctx.createImageData(nb, rows.length);
    const global = this.norm.value === "global";
    let gmax = 0;
    for (const r of rows) for (const v of r) if (v > gmax) gmax = v;
    rows.forEach((r, y) => {
      let m = global ? gmax : 0;
      if (!global) for (const v of r) if (v > m) m = v;
      for (let x = 0; x < nb; x++) {
        const c = seqColor(m > 0 ? r[x] / m : 0);
        const o = (y * nb + x) * 4;
        img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
      }
    });
    ctx.putImageData(img, 0, 0);
    // nearest-neighbour only while every step gets at least a pixel row; beyond that, let the browser average
    cv.style.imageRendering = rows.length > 150 ? "auto" : "pixelated";
    const n = rows.length;
    const steps = this.rows.map((r) => r.step);
    clear(this.heatAxisX).append(el("span", fmtShort(this.lo)), el("span", fmtShort((this.lo + this.hi) / 2)), el("span", fmtShort(this.hi)));
    clear(this.heatAxisY).append(el("span", `step ${fmtInt(steps[0])}`), n > 2 ? el("span", fmtInt(steps[Math.floor(n / 2)])) : null, n > 1 ? el("span", fmtInt(steps[n - 1])) : null);
    this.placeMarker();
  }

  heatPos(ev) {
    const r = this.heat.getBoundingClientRect();
    const fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
    const row = Math.min(this.rows.length - 1, Math.max(0, Math.floor(fy * this.rows.length)));
    const value = this.lo + fx * (this.hi - this.lo);
    return { row, value, fx, fy };
  }

  heatHover(ev) {
    const { row, value, fx } = this.heatPos(ev);
    const r = this.rows[row];
    if (!r) return;
    const e = r.edges || [], c = r.counts || [];
    let bin = -1;
    for (let i = 0; i < c.length; i++) if (value >= e[i] && value <= e[i + 1]) { bin = i; break; }
    clear(this.heatTip).append(
      el("div.tip-x", `step ${fmtInt(r.step)}`),
      bin >= 0
        ? el("div.tip-row", el("span.tip-label", `[${fmtValue(e[bin])}, ${fmtValue(e[bin + 1])})`), el("span.tip-val", fmtInt(c[bin])))
        : el("div.tip-row", el("span.tip-label", `${fmtValue(value)}`), el("span.tip-val", "outside the bins")));
    this.heatTip.hidden = false;
    const w = this.heat.clientWidth;
    const x = fx * w;
    this.heatTip.style.left = (x > w / 2 ? x - this.heatTip.offsetWidth - 12 : x + 12) + "px";
    this.heatTip.style.top = "4px";
  }

  placeMarker() {
    const n = this.rows.length, i = this.slider.index;
    if (i < 0 || !n) { this.heatMarker.hidden = true; return; }
    this.heatMarker.hidden = false;
    this.heatMarker.style.top = `${(100 * i) / n}%`;
    this.heatMarker.style.height = `max(2px, ${100 / n}%)`;
  }

  show(row) {
    if (!this.heat) return;
    this.placeMarker();
    const e = row.edges || [], c = row.counts || [];
    const st = [`total ${fmtInt(row.total)}`];
    for (const [k, lab] of [["nan", "NaN"], ["posinf", "+inf"], ["neginf", "-inf"]]) {
      st.push(el(`span.${row[k] > 0 ? "nf-badge.nf-" + k : "muted"}`, `${lab} ${fmtInt(row[k] || 0)}`));
    }
    clear(this.statsEl).append(el("span.muted", `step ${fmtInt(row.step)} · `), ...st.flatMap((s, i) => (i ? [" · ", s] : [s])));
    if (e.length < 2) { clear(this.barEl).append(el("div.chart-empty", "no finite values at this step")); this.drawn(); return; }
    const x = Float64Array.from(e);
    const y = Float64Array.from([...c, c[c.length - 1] || 0]);
    const w = this.barEl.clientWidth || 500;
    if (this.u) {
      this.u.setData([x, y]);
    } else {
      clear(this.barEl);
      const card = this;
      this.u = new uPlot({
        width: w, height: 170, legend: { show: false }, padding: [8, 10, 0, 2],
        cursor: { drag: { x: false, y: false }, points: { show: false } },
        scales: { x: { time: false } },
        axes: [axisStyle(), axisStyle({ size: 50 })],
        series: [{}, { stroke: "#3b5bdb", width: 1, fill: alpha("#3b5bdb", 0.35), paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } }],
        hooks: {
          setCursor: [(u) => card.barTip(u)],
          draw: [() => card.drawn()],
        },
      }, [x, y], this.barEl);
      this.barTipEl = el("div.chart-tip", { hidden: true });
      this.barEl.append(this.barTipEl);
      this.barEl.addEventListener("mouseleave", () => { this.barTipEl.hidden = true; });
      new ResizeObserver(debounce(() => { if (this.u && this.barEl.clientWidth) this.u.setSize({ width: this.barEl.clientWidth, height: 170 }); }, 100)).observe(this.barEl);
    }
  }

  barTip(u) {
    const i = u.cursor.idx;
    const x = u.data[0];
    if (i === null || i === undefined || i >= x.length - 1) { this.barTipEl.hidden = true; return; }
    clear(this.barTipEl).append(el("div.tip-row", el("span.tip-label", `[${fmtValue(x[i])}, ${fmtValue(x[i + 1])})`), el("span.tip-val", fmtInt(u.data[1][i]))));
    this.barTipEl.hidden = false;
    const left = u.cursor.left + u.bbox.left / (window.devicePixelRatio || 1);
    this.barTipEl.style.left = (left > this.barEl.clientWidth / 2 ? left - this.barTipEl.offsetWidth - 12 : left + 12) + "px";
    this.barTipEl.style.top = "4px";
  }

  dropLayout() {
    if (this.u) this.u.destroy();
    this.u = null;
    this.heat = null;
  }

  destroy() { super.destroy(); if (this.u) this.u.destroy(); }
}

function axisStyle(extra) {
  return Object.assign({
    stroke: "#5c6370", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#dfe2e6", width: 1, size: 4 },
    font: "11px system-ui, sans-serif",
  }, extra || {});
}

// ---- KDE ---------------------------------------------------------------------------

class KdeCard extends ItemCard {
  rowsLoaded() {
    if (!this.overlay) {
      this.overlay = el("input", { type: "checkbox", class: "kde-overlay" });
      this.overlay.addEventListener("change", () => this.show(this.rows[this.slider.index]));
      this.plot = el("div.kde-plot");
      this.metaEl = el("div.muted.small");
      clear(this.body).append(el("div.sub-title", el("label.ctl", this.overlay, " overlay steps (up to 8, light = early)"), el("span.spacer"), this.metaEl), this.plot);
    }
  }

  show(row) {
    if (!this.plot || !row) return;
    const picks = [];
    if (this.overlay.checked && this.rows.length > 1) {
      const n = this.rows.length, k = Math.min(8, n);
      for (let j = 0; j < k; j++) picks.push(Math.round((j * (n - 1)) / Math.max(1, k - 1)));
      if (!picks.includes(this.slider.index)) picks.push(this.slider.index);
    } else picks.push(this.slider.index);
    const uniq = [...new Set(picks)].sort((a, b) => a - b);
    const base = "#3b5bdb";
    const parts = uniq.map((i) => ({ x: Float64Array.from(this.rows[i].grid || []), cols: [Float64Array.from((this.rows[i].density || []).map((v) => (v === null ? NaN : v)))] }));
    const data = joinSources(parts);
    const series = [{ label: "x" }];
    uniq.forEach((i, j) => {
      const sel = i === this.slider.index;
      const t = uniq.length > 1 ? j / (uniq.length - 1) : 1;
      series.push({
        label: `step ${this.rows[i].step}`,
        stroke: sel ? "#c92a2a" : alpha(base, 0.25 + 0.75 * t),
        width: sel ? 2 : 1.2,
        fill: uniq.length === 1 ? alpha(base, 0.12) : undefined,
        points: { show: false },
      });
    });
    if (uniq.length === 1) series[1].stroke = base;
    this.metaEl.textContent = `step ${fmtInt(row.step)} · bandwidth ${fmtValue(row.bandwidth)} · ${fmtInt(row.count)} values`;
    if (this.u) this.u.destroy();
    clear(this.plot);
    const card = this;
    this.u = new uPlot({
      width: this.plot.clientWidth || 500, height: 220, legend: { show: false }, padding: [8, 10, 0, 2],
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false } },
      axes: [axisStyle(), axisStyle({ size: 50 })],
      series,
      hooks: { draw: [() => card.drawn()], setCursor: [(u) => card.tipAt(u)] },
    }, data, this.plot);
    this.tip = el("div.chart-tip", { hidden: true });
    this.plot.append(this.tip);
    if (!this.ro) {
      this.ro = new ResizeObserver(debounce(() => { if (this.u && this.plot.clientWidth) this.u.setSize({ width: this.plot.clientWidth, height: 220 }); }, 100));
      this.ro.observe(this.plot);
      this.plot.addEventListener("mouseleave", () => { if (this.tip) this.tip.hidden = true; });
    }
  }

  tipAt(u) {
    const i = u.cursor.idx;
    if (i === null || i === undefined) { this.tip.hidden = true; return; }
    const rows = [el("div.tip-x", `x ${fmtValue(u.data[0][i])}`)];
    for (let s = 1; s < u.series.length; s++) {
      const v = u.data[s][i];
      if (v === undefined || v === null) continue;
      rows.push(el("div.tip-row", el("span.swatch", { style: { background: u.series[s].stroke() } }), el("span.tip-label", u.series[s].label), el("span.tip-val", fmtValue(v))));
    }
    clear(this.tip).append(...rows);
    this.tip.hidden = false;
    const left = u.cursor.left + u.bbox.left / (window.devicePixelRatio || 1);
    this.tip.style.left = (left > this.plot.clientWidth / 2 ? left - this.tip.offsetWidth - 12 : left + 12) + "px";
    this.tip.style.top = "4px";
  }

  dropLayout() {
    if (this.u) this.u.destroy();
    this.u = null;
    this.overlay = null;
    this.plot = null;
    if (this.ro) this.ro.disconnect();
    this.ro = null;
  }

  destroy() { super.destroy(); if (this.u) this.u.destroy(); if (this.ro) this.ro.disconnect(); }
}

// ---- tensors -------------------------------------------------------------------------

class TensorCard extends ItemCard {
  constructor(panel, entry) {
    super(panel, entry);
    this.el.classList.add("wide");
  }

  dropLayout() { this.canvas = null; this.hm = null; }

  rowsLoaded() {
    if (!this.canvas) {
      this.canvas = el("canvas.tensor-heat");
      this.tip = el("div.chart-tip", { hidden: true });
      this.legendEl = el("div.heat-legend");
      this.info = el("div.tensor-info");
      this.heatBox = el("div.tensor-heat-box", this.canvas, this.tip);
      this.list = el("div.tensor-list");
      clear(this.body).append(el("div.tensor-layout", el("div.tensor-left", this.heatBox, this.legendEl), this.info), el("details.tensor-entries", { open: true }, el("summary", "all entries (click one to show it)"), this.list));
      this.canvas.addEventListener("mousemove", (ev) => this.hover(ev));
      this.canvas.addEventListener("mouseleave", () => { this.tip.hidden = true; });
    }
    const t = el("table.data-table.compact",
      el("thead", el("tr", ["step", "shape", "dtype", "namespace", "mean", "std", "min", "max"].map((h) => el("th", h)))),
      el("tbody", this.rows.map((r, i) => {
        const s = r.stats || {};
        const tr = el("tr.clickable", { dataset: { index: String(i) } },
          el("td", fmtInt(r.step)), el("td", `[${(r.shape || []).join(", ")}]`), el("td", r.dtype || ""), el("td", r.namespace || ""),
          el("td.num", fmtValue(s.mean)), el("td.num", fmtValue(s.std)), el("td.num", fmtValue(s.min)), el("td.num", fmtValue(s.max)));
        tr.addEventListener("click", () => this.slider.set(i, true));
        return tr;
      })));
    clear(this.list).append(el("div.table-scroll", t));
  }

  show(row) {
    if (!this.canvas || !row) return;
    for (const tr of this.list.querySelectorAll("tr.sel")) tr.classList.remove("sel");
    const tr = this.list.querySelector(`tr[data-index="${this.slider.index}"]`);
    if (tr) {
      tr.classList.add("sel");
      const sc = this.list.querySelector(".table-scroll");
      if (sc && (tr.offsetTop < sc.scrollTop + 30 || tr.offsetTop > sc.scrollTop + sc.clientHeight - 30)) {
        sc.scrollTop = tr.offsetTop - sc.clientHeight / 2;   // keep the shown entry in view (not the page)
      }
    }
    const s = row.stats || {};
    const kv = (k, v) => [el("dt", k), el("dd", v)];
    clear(this.info).append(el("dl.kv",
      kv("step", `${fmtInt(row.step)} (global ${fmtInt(row.global_step)})`),
      kv("shape", `[${(row.shape || []).join(", ")}]`),
      kv("dtype", row.source_dtype && row.source_dtype !== row.dtype ? `${row.dtype} (logged as ${row.source_dtype})` : row.dtype || "–"),
      row.namespace ? kv("namespace", row.namespace) : null,
      row.metadata && Object.keys(row.metadata).length ? kv("metadata", el("code", JSON.stringify(row.metadata))) : null,
      kv("min / max", `${fmtValue(s.min)} / ${fmtValue(s.max)}`),
      kv("mean ± std", `${fmtValue(s.mean)} ± ${fmtValue(s.std)}`),
      kv("size", fmtInt(s.size)),
      (s.nan || s.posinf || s.neginf) ? kv("non-finite", el("span", el("span.nf-badge.nf-nan", `NaN ${fmtInt(s.nan || 0)}`), " ", el("span.nf-badge.nf-posinf", `+inf ${fmtInt(s.posinf || 0)}`), " ", el("span.nf-badge.nf-neginf", `-inf ${fmtInt(s.neginf || 0)}`))) : null,
    ));
    const hm = row.heatmap;
    if (!hm || !hm.values) {
      this.heatBox.hidden = true;
      clear(this.legendEl).append(el("span.muted", "no heatmap (tensor larger than 65,536 elements)"));
      this.drawn();
      return;
    }
    this.heatBox.hidden = false;
    const R = hm.rows, C = hm.cols;
    const flat = Array.isArray(hm.values[0]) ? hm.values.flat() : hm.values;
    this.hm = { R, C, flat };
    let m = 0;
    for (const v of flat) if (v !== null && Number.isFinite(v) && Math.abs(v) > m) m = Math.abs(v);
    this.hmMax = m;
    this.canvas.width = C;
    this.canvas.height = R;
    const ctx = this.canvas.getContext("2d");
    const img = ctx.createImageData(C, R);
    for (let i = 0; i < R * C; i++) {
      const v = flat[i];
      const c = v === null || !Number.isFinite(v) ? [160, 160, 160] : divColor(m > 0 ? v / m : 0);
      img.data[i * 4] = c[0]; img.data[i * 4 + 1] = c[1]; img.data[i * 4 + 2] = c[2]; img.data[i * 4 + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    // display size: cells square, fit in 100% x 360px
    const maxW = Math.max(120, this.heatBox.parentElement.clientWidth || 400), maxH = 360;
    const cell = Math.max(0.25, Math.min(maxW / C, maxH / R, 48));
    this.canvas.style.imageRendering = cell < 1 ? "auto" : "pixelated";
    this.canvas.style.width = `${Math.round(C * cell)}px`;
    this.canvas.style.height = `${Math.round(R * cell)}px`;
    clear(this.legendEl).append(el("span", fmtShort(-m)), el("span.grad", { style: { background: gradientCss((t) => divColor(2 * t - 1)) } }), el("span", fmtShort(m)),
      el("span.muted", ` ${R}×${C}${(row.shape || []).length > 2 ? " (first 2-D slice)" : ""}`));
    this.drawn();
  }

  hover(ev) {
    if (!this.hm) return;
    const r = this.canvas.getBoundingClientRect();
    const c = Math.floor(((ev.clientX - r.left) / r.width) * this.hm.C), rr = Math.floor(((ev.clientY - r.top) / r.height) * this.hm.R);
    if (c < 0 || rr < 0 || c >= this.hm.C || rr >= this.hm.R) { this.tip.hidden = true; return; }
    const v = this.hm.flat[rr * this.hm.C + c];
    clear(this.tip).append(el("div.tip-row", el("span.tip-label", `[${rr}, ${c}]`), el("span.tip-val", v === null ? "non-finite" : fmtValue(v))));
    this.tip.hidden = false;
    const x = ev.clientX - r.left, w = this.heatBox.clientWidth;
    this.tip.style.left = (x > w / 2 ? x - this.tip.offsetWidth - 12 : x + 12) + "px";
    this.tip.style.top = Math.max(0, ev.clientY - r.top - 30) + "px";
  }
}

const CARD_CLASSES = { media: MediaCard, tables: TableCard, histograms: HistogramCard, kde: KdeCard, tensors: TensorCard };

/** window.koboSetStep(kind, name, step[, run]) -> true when a card moved its slider. */
export function installStepHook(getPanels) {
  window.koboSetStep = (kind, name, step, run) => {
    const p = getPanels()[kind];
    if (!p) return false;
    for (const c of p.cards.values()) {
      if (c.name === name && (!run || c.key === run) && c.rows.length) { c.slider.setStep(step); return true; }
    }
    return false;
  };
}

