// The runs list: every project/run with status, filter (server-side q/regex),
// selection for the compare view, live refresh from api/events (event: runs).

import { api, LiveStream } from "./api.js";
import { koboState, reportError, runHash, replaceHash } from "./state.js";
import { statusBadge } from "./run.js";
import { el, clear, fmtInt, fmtTime, fmtAgo, fmtDuration, runColor, debounce } from "./util.js";

const COLUMNS = [
  // [key, label, sort value]
  ["status", "status", (r) => r.status || ""],
  ["name", "name", (r) => (r.name || r.run_id || "").toLowerCase()],
  ["run_id", "run id", (r) => r.run_id],
  ["project", "project", (r) => r.project],
  ["created_at", "created", (r) => r.created_at || 0],
  ["duration", "duration", (r) => r.duration ?? -1],
  ["last_step", "last step", (r) => r.last_step ?? -1],
  ["num_ranks", "ranks", (r) => r.num_ranks ?? 0],
  ["dropped_calls", "dropped", (r) => r.dropped_calls ?? 0],
  ["error", "error", (r) => r.error || ""],
];

export class RunsPage {
  constructor(root, route, onDir) {
    this.root = root;
    this.onDir = onDir;
    this.params = new URLSearchParams(route.params);
    this.selected = new Set((sessionStorage.getItem("kobo.selected") || "").split(",").filter(Boolean));
    this.sort = { key: this.params.get("sort") || "created_at", dir: this.params.get("dir") === "asc" ? 1 : -1 };
    this.data = null;
    this.gen = 0;

    this.q = el("input#run-filter", { type: "search", placeholder: "Filter runs: name, id, project, config (key=value)", value: this.params.get("q") || "", autocomplete: "off" });
    this.regex = el("input#run-regex", { type: "checkbox", checked: this.params.get("regex") === "1" });
    this.project = el("select#project-filter", el("option", { value: "" }, "all projects"));
    this.filterErr = el("div.filter-error#filter-error", { hidden: true, role: "alert" });
    this.compareBtn = el("button.btn.primary#compare-btn", { type: "button", disabled: true }, "Compare");
    this.clearBtn = el("button.btn#clear-selection", { type: "button", hidden: true }, "Clear selection");
    this.countEl = el("span.run-count");
    this.tbody = el("tbody");
    this.allBox = el("input.check-all", { type: "checkbox", title: "select every run shown" });
    this.thead = el("thead");
    this.table = el("table.data-table.runs-table#runs-table", this.thead, this.tbody);
    this.emptyEl = el("div.empty", { hidden: true });
    this.el = el("div.runs-page",
      el("div.page-head", el("h1", "Runs"), this.countEl, el("span.spacer"), this.clearBtn, this.compareBtn),
      el("div.controls", el("div.ctl-row",
        this.q,
        el("label.ctl", { title: "treat the filter as a Python regular expression" }, this.regex, " Regex"),
        this.project)),
      this.filterErr,
      el("div.table-wrap", this.table, this.emptyEl));
    root.append(this.el);
    koboState.view = "runs";
    document.title = "Runs · KohakuBoard";

    const refilter = debounce(() => { this.saveParams(); this.load(); }, 250);
    this.q.addEventListener("input", refilter);
    this.regex.addEventListener("change", () => { this.saveParams(); this.load(); });
    this.project.addEventListener("change", () => { this.saveParams(); this.load(); });
    this.compareBtn.addEventListener("click", () => this.openCompare());
    this.clearBtn.addEventListener("click", () => { this.selected.clear(); this.persistSel(); this.renderRows(); });
    this.allBox.addEventListener("change", () => {
      for (const r of this.visibleRuns()) { const k = `${r.project}/${r.run_id}`; if (this.allBox.checked) this.selected.add(k); else this.selected.delete(k); }
      this.persistSel();
      this.renderRows();
    });
    this.tbody.addEventListener("click", (ev) => this.rowClick(ev));
    this.renderHead();
    this.load();
    this.live = new LiveStream("api/events", {
      runs: debounce(() => this.load(true), 400),
      reconnect: () => this.load(true),
    });
    // the stream only says when the set of runs or a status changes: refresh
    // last step / duration of running runs every few seconds
    this.poll = setInterval(() => {
      if (this.data && (this.data.runs || []).some((r) => r.status === "running") && !document.hidden) this.load(true);
    }, 5000);
  }

  saveParams() {
    const p = new URLSearchParams();
    if (this.q.value) p.set("q", this.q.value);
    if (this.regex.checked) p.set("regex", "1");
    if (this.project.value) p.set("project", this.project.value);
    if (this.sort.key !== "created_at") p.set("sort", this.sort.key);
    if (this.sort.dir === 1) p.set("dir", "asc");
    const s = p.toString();
    replaceHash("#/" + (s ? "?" + s : ""));
  }

  applyRoute(route) {
    const q = route.params.get("q") || "";
    if (q !== this.q.value) { this.q.value = q; this.load(); }
  }

  async load(quiet) {
    if (quiet && this.q.classList.contains("invalid")) return;   // a live refresh with a bad regex: same 400
    const gen = ++this.gen;
    if (!quiet && !this.data) clear(this.tbody).append(el("tr", el("td.loading-cell", { colSpan: COLUMNS.length + 1 }, "Loading runs…")));
    try {
      const d = await api.runs({ q: this.q.value || undefined, regex: this.regex.checked ? 1 : undefined, project: this.project.value || undefined });
      if (gen !== this.gen) return;
      this.data = d;
      this.filterErr.hidden = true;
      this.q.classList.remove("invalid");
      this.table.parentElement.classList.remove("stale");
      this.onDir?.(d.dir);
      this.renderProjects(d.projects || []);
      this.renderRows();
    } catch (e) {
      if (gen !== this.gen) return;
      if (e.status === 400) {
        this.table.parentElement.classList.add("stale");
        this.filterErr.textContent = e.message;
        this.filterErr.hidden = false;
        this.q.classList.add("invalid");
      } else {
        reportError(e, "runs", { toast: false });
        this.filterErr.textContent = `Cannot list runs: ${e.message}`;
        this.filterErr.hidden = false;
        if (!this.data) clear(this.tbody);
      }
    } finally {
      if (gen === this.gen) koboState.ready = true;
    }
  }

  renderProjects(projects) {
    const cur = this.project.value || this.params.get("project") || "";
    clear(this.project).append(el("option", { value: "" }, "all projects"),
      ...projects.map((p) => el("option", { value: p.name }, `${p.name} (${p.runs})`)));
    this.project.value = cur;
    this.project.hidden = projects.length <= 1 && !cur;
  }

  renderHead() {
    clear(this.thead).append(el("tr", el("th.check", this.allBox), COLUMNS.map(([key, label]) => {
      const th = el("th.sortable", { dataset: { sort: key }, title: `sort by ${label}` }, label,
        this.sort.key === key ? el("span.sort-ind", this.sort.dir > 0 ? " ▲" : " ▼") : null);
      th.addEventListener("click", () => {
        if (this.sort.key === key) this.sort.dir = -this.sort.dir;
        else this.sort = { key, dir: key === "name" || key === "run_id" || key === "project" ? 1 : -1 };
        this.saveParams();
        this.renderHead();
        this.renderRows();
      });
      return th;
    })));
  }

  visibleRuns() {
    const runs = ((this.data && this.data.runs) || []).slice();
    const col = COLUMNS.find(([k]) => k === this.sort.key) || COLUMNS[4];
    const f = col[2], d = this.sort.dir;
    runs.sort((a, b) => { const x = f(a), y = f(b); return x < y ? -d : x > y ? d : 0; });
    return runs;
  }

  renderRows() {
    const runs = this.visibleRuns();
    const d = this.data || { total: 0, runs: [] };
    this.countEl.textContent = d.total !== undefined && d.total !== runs.length ? `${fmtInt(runs.length)} of ${fmtInt(d.total)}` : fmtInt(runs.length);
    const body = clear(this.tbody);
    const limit = this.showAll ? runs.length : 500;
    for (const r of runs.slice(0, limit)) {
      const key = `${r.project}/${r.run_id}`;
      const checked = this.selected.has(key);
      const dropped = r.dropped_calls || 0;
      body.append(el(`tr.run-row${checked ? ".selected" : ""}${r.error ? ".has-error" : ""}`, { dataset: { run: key } },
        el("td.check", el("input.run-check", { type: "checkbox", checked, "aria-label": `select ${key}` })),
        el("td", statusBadge(r.status)),
        el("td.name", el("span.swatch", { style: { background: runColor(key) } }),
          el("a.run-link", { href: runHash([key]) }, r.name || r.run_id),
          r.annotation ? el("span.annotation", r.annotation) : null),
        el("td", el("code.small", r.run_id)),
        el("td", r.project),
        el("td.nowrap", { title: fmtTime(r.created_at) }, fmtAgo(r.created_at)),
        el("td.nowrap.duration", { dataset: { created: r.created_at ?? "", status: r.status || "" } }, fmtDuration(r.duration)),
        el("td.num", fmtInt(r.last_step)),
        el("td.num", { title: r.world_size ? `world size ${r.world_size}` : "" }, fmtInt(r.num_ranks ?? 1)),
        el(`td.num${dropped > 0 ? ".dropped-warn" : ""}`, { title: dropped ? `${dropped} log() calls (${r.dropped_values || 0} values) dropped` : "" }, fmtInt(dropped)),
        el("td.error-cell", r.error ? el("span.error-text", { title: r.error }, r.error) : "")));
    }
    if (runs.length > limit) {
      const more = el("button.btn.small", { type: "button" }, `Show all ${fmtInt(runs.length)} runs`);
      more.addEventListener("click", () => { this.showAll = true; this.renderRows(); });
      body.append(el("tr.more-row", el("td", { colSpan: COLUMNS.length + 1 },
        el("span.muted", `${fmtInt(runs.length - limit)} more (narrow them with the filter) `), more)));
    }
    if (!runs.length) {
      this.emptyEl.hidden = false;
      this.emptyEl.textContent = this.q.value || this.project.value
        ? "No run matches the filter."
        : `No runs in ${d.dir || "this folder"} yet. Log one with Board(base_dir=...) and it appears here.`;
    } else this.emptyEl.hidden = true;
    const sel = [...this.selected];
    this.compareBtn.disabled = sel.length < 1;
    this.compareBtn.textContent = sel.length ? `Compare ${sel.length} run${sel.length === 1 ? "" : "s"}` : "Compare";
    this.clearBtn.hidden = !sel.length;
    this.allBox.checked = runs.length > 0 && runs.every((r) => this.selected.has(`${r.project}/${r.run_id}`));
  }

  rowClick(ev) {
    const tr = ev.target.closest("tr.run-row");
    if (!tr) return;
    const key = tr.dataset.run;
    if (ev.target.closest(".run-check")) {
      if (ev.target.checked) this.selected.add(key); else this.selected.delete(key);
      this.persistSel();
      this.renderRows();
      return;
    }
    if (ev.target.closest("a") || ev.target.closest("td.check")) return;
    if (window.getSelection && String(window.getSelection()).length) return;   // selecting text
    location.hash = runHash([key]);
  }

  persistSel() {
    sessionStorage.setItem("kobo.selected", [...this.selected].join(","));
  }

  openCompare() {
    const keys = [...this.selected];
    if (!keys.length) return;
    // keep the list's order
    const order = this.visibleRuns().map((r) => `${r.project}/${r.run_id}`);
    keys.sort((a, b) => order.indexOf(a) - order.indexOf(b));
    location.hash = runHash(keys);
  }

  destroy() {
    this.live.close();
    clearInterval(this.poll);
    this.el.remove();
  }
}
