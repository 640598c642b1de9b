// The kobo-serve login page: fetch a CSRF token (and a pre-login session cookie) from
// api/session, then POST the credentials to api/login with it.  Paths are relative to
// the page, so the server may live under a --base-url.

const form = document.getElementById("login-form");
const errorBox = document.getElementById("login-error");
const submit = document.getElementById("login-submit");
let csrf = null;

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function session() {
  const r = await fetch("api/session", { credentials: "same-origin", cache: "no-store" });
  const d = await r.json();
  if (d.user) {
    location.replace("./");   // already logged in
    return;
  }
  csrf = d.csrf;
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  submit.disabled = true;
  try {
    if (!csrf) await session();
    const r = await fetch("api/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", "x-kobo-csrf": csrf || "" },
      body: JSON.stringify({ user: form.username.value, password: form.password.value }),
    });
    if (r.ok) {
      location.replace("./");
      return;
    }
    let message = `login failed (${r.status})`;
    try { message = (await r.json()).error || message; } catch (_) { /* not JSON */ }
    if (r.status === 403) { csrf = null; await session(); }
    showError(message);
    form.password.select();
  } catch (err) {
    showError(`cannot reach the server: ${err.message || err}`);
  } finally {
    submit.disabled = false;
  }
});

submit.disabled = false;   // disabled in the HTML: without this script the form cannot be sent
session().catch((err) => showError(`cannot reach the server: ${err.message || err}`));
