// The dashboard's shell: sign-in, hash routing between the pages, and clean-up of the page left
// (its timers and event streams) before the next one renders.

import { get, onUnauthorized, token } from "./api.js";
import { h, fill } from "./dom.js";
import * as jobs from "./pages/jobs.js";
import * as job from "./pages/job.js";
import * as submit from "./pages/submit.js";
import * as compare from "./pages/compare.js";
import * as cluster from "./pages/cluster.js";
import * as sweeps from "./pages/sweeps.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOut = document.getElementById("sign-out");
let cleanup = null;
// While the sign-in form checks a token, a 401 is its own answer, not a revoked session.
let signingIn = false;

/** "#/jobs/ID?x=1" -> {path: ["jobs", "ID"], query: URLSearchParams} */
function parseHash() {
  const raw = location.hash.startsWith("#/") ? location.hash.slice(2) : "jobs";
  const [path, q = ""] = raw.split("?");
  return { path: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(q) };
}

function pageFor(path) {
  if (path[0] === "jobs" && path[1]) return [job, { id: path[1] }];
  if (path[0] === "submit") return [submit, {}];
  if (path[0] === "compare") return [compare, {}];
  if (path[0] === "cluster") return [cluster, {}];
  if (path[0] === "sweeps") return [sweeps, { id: path[1] }];
  return [jobs, {}];
}

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  if (!token.get()) {
    showLogin();
    return;
  }
  nav.hidden = false;
  signOut.hidden = false;
  const { path, query } = parseHash();
  const [page, params] = pageFor(path);
  for (const a of nav.querySelectorAll("a")) {
    const here = a.dataset.page === (path[0] || "jobs") && !(path[0] === "jobs" && path[1]);
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  fill(main);
  const view = h("div", { class: "page" });
  main.append(view);
  cleanup = page.render(view, { ...params, query }) || null;
  document.title = `${page.title(params)} · slimtrain`;
}

function showLogin(message = "") {
  nav.hidden = true;
  signOut.hidden = true;
  document.title = "Sign in · slimtrain";
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "current-password",
    required: true,
    "aria-describedby": "login-help login-error",
  });
  const error = h("p", { id: "login-error", class: "error", role: "alert" }, message);
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "login panel", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in to slimtrain"),
    h("label", { for: "token" }, "API token"),
    input,
    h(
      "p",
      { id: "login-help", class: "help" },
      "A token from SLIMTRAIN_API_TOKENS (or the one `slimtrain serve` printed). It is kept in this tab only.",
    ),
    error,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    fill(error);
    token.set(input.value.trim());
    signingIn = true;
    try {
      await get("/v1/jobs?limit=1"); // proves the token before anything else is shown
      signingIn = false;
      route();
    } catch (err) {
      signingIn = false;
      token.clear();
      fill(error, err.status === 401 ? "That token was not accepted." : `Cannot reach the API: ${err.message}`);
      button.disabled = false;
      input.focus();
    }
  });
  fill(main, form);
  input.focus();
}

onUnauthorized(() => {
  if (signingIn || !token.get()) return;
  token.clear();
  if (cleanup) cleanup();
  cleanup = null;
  showLogin("Your token was refused (revoked or mistyped); sign in again.");
});

signOut.addEventListener("click", () => {
  token.clear();
  route();
});

// The skip link moves focus without touching the hash, which is the router's.
document.getElementById("skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

window.addEventListener("hashchange", () => {
  route();
  // Keyboard and screen-reader users land on the new page, not on the link they left.
  if (token.get() && !main.contains(document.activeElement)) main.focus({ preventScroll: true });
});
route();
