// Where the page lives and who is logged in.
//
// Every URL the page requests is relative to the page (`api/runs`, `static/...`), so
// kobo-serve may run under a --base-url (the page at /kobo/, the API at /kobo/api/...).
// The server sends media URLs as absolute paths (`/media/...`): pageUrl() puts the
// page's base in front of them.
//
// Who: kobo-serve answers GET api/session with {user, csrf, projects}; `kobo open` has no
// such route (404, which the browser logs as an error).  So the page asks only under
// kobo-serve, which the server writes into the page (<html data-kobo="serve">): no
// localStorage read on the way to the first chart (its first use blocks ~10 ms).
// An API answer 401 also asks: kobo-serve -> the login page; `kobo open` -> a banner that
// says to open the URL `kobo open` printed again.

/** The page's directory: "/" or "/kobo/" (location.pathname up to its last "/"). */
export const BASE = location.pathname.slice(0, location.pathname.lastIndexOf("/") + 1) || "/";

/** A server path ("/media/p/r/x.png") under the page's base ("/kobo/media/p/r/x.png"); other URLs unchanged. */
export function pageUrl(url) {
  if (typeof url !== "string" || !url.startsWith("/") || url.startsWith("//")) return url;
  return BASE + url.slice(1);
}

/** Whether this page is under kobo-serve: the server writes it into <html data-kobo> (app.py StaticCache.page). */
function serveHint() {
  return document.documentElement.dataset.kobo === "serve";
}

/** mode: "serve" (kobo-serve answered api/session), "open" (it did not), null (not asked). */
/** leaving: the page is going to the login page (logging out, or the session ended): no more API requests. */
export const session = { mode: null, user: null, csrf: null, projects: null, leaving: false };

async function askSession() {
  let r;
  try {
    r = await fetch("api/session", { credentials: "same-origin", cache: "no-store" });
  } catch (_) {
    return undefined;   // the server is unreachable: nothing learned
  }
  if (!r.ok) return null;
  try {
    const d = await r.json();
    return d && typeof d === "object" && "csrf" in d ? d : null;
  } catch (_) {
    return null;
  }
}

function apply(d) {
  if (d === undefined) return;
  if (d === null) {
    session.mode = "open";
    session.user = session.csrf = session.projects = null;
    return;
  }
  session.mode = "serve";
  session.user = d.user || null;
  session.csrf = d.csrf || null;
  session.projects = d.projects ?? null;
}

/** On load: who is logged in (only asked where the page knows it is under kobo-serve). */
export async function loadSession() {
  if (!serveHint()) return session;
  apply(await askSession());
  return session;
}

/** POST api/logout with the session's CSRF token, then the login page. */
export async function logout() {
  session.leaving = true;   // no list refresh in between, which the ended session would refuse
  try {
    const r = await fetch("api/logout", {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "x-kobo-csrf": session.csrf || "" },
    });
    if (!r.ok && r.status !== 403) {   // 403: the session already ended (expired, user removed)
      let msg = `log out failed (${r.status})`;
      try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
  } catch (e) {
    session.leaving = false;
    throw e;
  }
  location.replace("login");
}

const authListeners = new Set();
/** fn(status) when an API answer says the page is not signed in under `kobo open`. */
export function onAuthFailed(fn) { authListeners.add(fn); }

let pending = null;

/**
 * An API answered 401 (or 403).  Resolves "login" when the page is leaving for the
 * login page (kobo-serve, not logged in any more), "open" under `kobo open` (the
 * banner is shown), "ok" when the session is fine (some other refusal).
 */
export function authFailed(status) {
  if (!pending) {
    pending = (async () => {
      if (session.mode !== "open") apply(await askSession());
      if (session.mode === "serve") {
        if (!session.user) {
          session.leaving = true;
          location.replace("login");
          return "login";
        }
        return "ok";
      }
      if (session.mode === "open") for (const fn of authListeners) fn(status);
      return session.mode || "ok";
    })().finally(() => { setTimeout(() => { pending = null; }, 2000); });
  }
  return pending;
}
