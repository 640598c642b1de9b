// Small DOM and formatting helpers shared by every module.

/** el("div.card.wide", {title: "x", onclick: fn, dataset: {metric: "m"}}, child, "text", ...) */
export function el(spec, attrs, ...children) {
  const m = /^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i.exec(spec);
  const node = document.createElement((m && m[1]) || "div");
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === ".") node.classList.add(part.slice(1));
      else node.id = part.slice(1);
    }
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "style" && typeof v === "object") Object.assign(node.style, v);
      else if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k in node && typeof v !== "string") node[k] = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(node, c);
    else node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function debounce(fn, ms) {
  let t = null;
  const d = (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
  d.cancel = () => clearTimeout(t);
  return d;
}

/** Call fn at most once per ms; a call during the wait runs once at its end. */
export function throttle(fn, ms) {
  let last = 0, timer = null;
  const t = () => {
    const now = Date.now();
    const wait = last + ms - now;
    if (wait <= 0) {
      last = now;
      fn();
    } else if (!timer) {
      timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
    }
  };
  t.cancel = () => { clearTimeout(timer); timer = null; };
  return t;
}

// ---- formatting -------------------------------------------------------------

/**
 * 1234567.891 -> "1,234,567.891": thousands grouped with commas (the viewer's language is
 * English), at most 3 decimals, like Intl.NumberFormat("en-US") -- whose first use costs the
 * page ~15 ms of ICU start-up, on the way to the first chart.
 */
export function fmtInt(n) {
  if (n === null || n === undefined) return "–";
  if (typeof n !== "number") n = Number(n);
  if (Number.isNaN(n)) return "NaN";
  if (!Number.isFinite(n)) return n > 0 ? "∞" : "-∞";
  const a = Math.abs(n);
  if (a >= 1e21) return String(n);
  const [int, frac] = String(Math.round(a * 1000) / 1000).split(".");
  const txt = int.replace(/\B(?=(\d{3})+$)/g, ",") + (frac ? "." + frac : "");
  return n < 0 || Object.is(n, -0) ? "-" + txt : txt;   // Intl's "-0" for -0.0004 too
}

/** A value for hover/tooltips: up to 6 significant digits, exponent when tiny/huge. */
export function fmtValue(v) {
  if (v === null || v === undefined) return "–";
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+inf";
  if (v === -Infinity) return "-inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-4) return v.toExponential(4).replace(/\.?0+e/, "e");
  if (Number.isInteger(v)) return fmtInt(v);
  return String(Number(v.toPrecision(6)));
}

/** A short value for axis ends and legends: 4 significant digits. */
export function fmtShort(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return fmtValue(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2).replace(/\.?0+e/, "e");
  return String(Number(v.toPrecision(4)));
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + u[i];
}

const pad = (n) => String(n).padStart(2, "0");

/** Unix seconds -> "2026-11-30 14:03:22" (local time). */
export function fmtTime(sec) {
  if (sec === null || sec === undefined) return "–";
  const d = new Date(sec * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** Unix seconds -> "3 min ago" / "2 h ago" / date. */
export function fmtAgo(sec) {
  if (sec === null || sec === undefined) return "–";
  const d = Date.now() / 1000 - sec;
  if (d < 0) return fmtTime(sec);
  if (d < 60) return "just now";
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  if (d < 86400 * 7) return `${Math.floor(d / 86400)} d ago`;
  return fmtTime(sec).slice(0, 10);
}

/** Seconds -> "1h 02m", "3m 05s", "12.5s". */
export function fmtDuration(sec) {
  if (sec === null || sec === undefined || !Number.isFinite(sec)) return "–";
  if (sec < 0) sec = 0;
  if (sec < 10) return sec.toFixed(1) + "s";
  if (sec < 60) return Math.round(sec) + "s";
  const s = Math.round(sec);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h >= 48) return `${Math.floor(h / 24)}d ${h % 24}h`;
  if (h) return `${h}h ${pad(m)}m`;
  return `${m}m ${pad(r)}s`;
}

/** Short axis label for relative seconds. */
export function fmtRelAxis(sec, incr) {
  if (sec === null || sec === undefined) return "";
  const a = Math.abs(sec);
  if (a < 120 || (incr && incr < 1)) {
    const dec = incr > 0 ? Math.max(0, Math.min(6, Math.ceil(-Math.log10(incr) - 1e-9))) : 1;
    return `${+sec.toFixed(dec)}s`;
  }
  if (a < 7200) return `${+(sec / 60).toFixed(1)}m`;
  if (a < 172800) return `${+(sec / 3600).toFixed(1)}h`;
  return `${+(sec / 86400).toFixed(1)}d`;
}

// ---- colours ----------------------------------------------------------------

// Tableau-like, readable on white.
export const PALETTE = [
  "#1f77b4", "#e8590c", "#2b8a3e", "#c92a2a", "#7048e8", "#8c564b",
  "#d6336c", "#495057", "#a9a10b", "#0c8599", "#5c7cfa", "#f08c00",
];

export function hash32(s) {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** The stable colour of a run (hash of "project/run_id" into the palette). */
export function runColor(key, offset = 0) {
  return PALETTE[(hash32(key) + offset) % PALETTE.length];
}

/** "#rrggbb" + alpha -> "rgba(...)" */
export function alpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

/** Flatten a nested config into [["optim.lr", 0.1], ...]. */
export function flatten(obj, prefix = "", out = []) {
  if (obj && typeof obj === "object" && !Array.isArray(obj)) {
    const keys = Object.keys(obj);
    if (!keys.length && prefix) out.push([prefix, {}]);
    for (const k of keys) flatten(obj[k], prefix ? `${prefix}.${k}` : k, out);
  } else {
    out.push([prefix, obj]);
  }
  return out;
}

export function fmtConfigValue(v) {
  if (v === null) return "null";
  if (v === undefined) return "";
  if (typeof v === "number") return fmtValue(v);
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

/** Binary search: first index i with arr[i] >= v. */
export function lowerBound(arr, v) {
  let lo = 0, hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (arr[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/** Remove ANSI escapes and resolve carriage returns (progress bars) per line. */
export function cleanTerminal(text) {
  // eslint-disable-next-line no-control-regex
  text = text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "").replace(/\x1b\][^\x07]*\x07/g, "");
  if (text.indexOf("\r") < 0) return text;
  return text.split("\n").map((line) => {
    if (line.indexOf("\r") < 0) return line;
    const parts = line.split("\r").filter((p) => p.length);
    return parts.length ? parts[parts.length - 1] : "";
  }).join("\n");
}
