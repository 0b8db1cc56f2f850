// Jobs: a live table of the tenant's jobs, newest first, filtered by state, cursor-paginated.

import { get } from "../api.js";
import { h, fill, table } from "../dom.js";
import { duration, pct, since } from "../format.js";
import { STATES, badge, every, errorNote, progressBar } from "./common.js";

const PAGE_SIZE = 20;
const REFRESH_MS = 3000;

export const title = () => "Jobs";

const COLUMNS = [
  { label: "Name", cell: (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.name) },
  { label: "State", cell: (j) => badge(j.state) },
  { label: "Progress", cell: progressBar },
  { label: "Strategy", cell: (j) => j.spec.parallel?.strategy ?? "–" },
  { label: "Workers", cell: (j) => j.spec.parallel?.workers ?? "–", class: "num" },
  { label: "Precision", cell: (j) => j.spec.precision ?? "–" },
  { label: "Sparsity", cell: (j) => pct(j.progress?.sparsity), class: "num" },
  { label: "Accuracy", cell: (j) => pct(j.progress?.val_accuracy), class: "num" },
  { label: "Age", cell: (j) => h("time", { datetime: j.created_at }, duration(since(j.created_at))), class: "num" },
];

export function render(view, { query }) {
  const state = STATES.includes(query.get("state")) ? query.get("state") : "";
  // The cursors of the pages before this one, so "Newer" can go back.
  const cursors = [];
  let cursor = null;
  let nextCursor = null;

  const select = h(
    "select",
    { id: "state-filter", name: "state" },
    h("option", { value: "" }, "all states"),
    STATES.map((s) => h("option", { value: s, selected: s === state }, s)),
  );
  select.addEventListener("change", () => {
    location.hash = select.value ? `#/jobs?state=${select.value}` : "#/jobs";
  });
  const newer = h("button", { type: "button", disabled: true }, "← Newer");
  const older = h("button", { type: "button", disabled: true }, "Older →");
  const status = h("span", { class: "muted", "aria-live": "polite" });
  const body = h("div", { id: "jobs-table" }, h("p", { class: "muted" }, "Loading…"));

  async function load() {
    const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (state) q.set("state", state);
    if (cursor) q.set("cursor", cursor);
    const page = await get(`/v1/jobs?${q}`);
    nextCursor = page.next_cursor;
    fill(body, table(COLUMNS, page.items, { caption: "Jobs, newest first", empty: "No jobs match." }));
    newer.disabled = cursors.length === 0;
    older.disabled = !nextCursor;
    fill(status, `page ${cursors.length + 1} · updated ${new Date().toLocaleTimeString("en-GB")}`);
  }

  const refresh = () => load().catch((err) => err.status !== 401 && fill(body, errorNote(err)));
  newer.addEventListener("click", () => {
    cursor = cursors.pop() ?? null;
    refresh();
  });
  older.addEventListener("click", () => {
    cursors.push(cursor);
    cursor = nextCursor;
    refresh();
  });

  fill(
    view,
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("a", { class: "button primary", href: "#/submit" }, "Submit a job"),
    ),
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "state-filter" }, "State "),
      select,
      h("span", { class: "spacer" }),
      status,
      h("nav", { class: "pager", "aria-label": "Pages" }, newer, older),
    ),
    body,
  );
  return every(REFRESH_MS, refresh);
}
