// Sweeps: the tenant's sweeps, and one sweep's trials with its Pareto front drawn as a scatter
// (accuracy against size ratio, the point's size its latency); each point links to its job.

import { get, post } from "../api.js";
import { h, fill, table, facts, section } from "../dom.js";
import { ms, num, pct, ratio } from "../format.js";
import { badge, every, errorNote } from "./common.js";

const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const OVER = new Set(["succeeded", "failed", "cancelled", "pruned"]);

export const title = (params) => (params.id ? `Sweep ${params.id}` : "Sweeps");

export function render(view, params) {
  return params.id ? renderSweep(view, params.id) : renderList(view);
}

const jobLink = (id, text) => (id ? h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, text ?? id) : "–");

function renderList(view) {
  const body = h("div", { id: "sweeps-table" }, h("p", { class: "muted" }, "Loading…"));
  const columns = [
    { label: "Name", cell: (s) => h("a", { href: `#/sweeps/${encodeURIComponent(s.id)}` }, s.name) },
    { label: "State", cell: (s) => badge(s.state) },
    { label: "Method", cell: (s) => s.method },
    { label: "Trials", cell: (s) => s.total_trials, class: "num" },
    { label: "Now", cell: (s) => s.reason ?? "–" },
  ];
  async function load() {
    const page = await get("/v1/sweeps");
    fill(body, table(columns, page.items, { caption: "Sweeps, newest first", empty: "No sweeps yet: `slimtrain sweep submit FILE`." }));
  }
  const refresh = () => load().catch((err) => err.status !== 401 && fill(body, errorNote(err)));
  fill(view, h("div", { class: "page-head" }, h("h1", {}, "Sweeps")), body);
  return every(REFRESH_MS, refresh);
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** Accuracy (y) against size ratio (x, log scale) of the measured trials; front points filled. */
export function scatter(trials, front) {
  const pts = trials.filter((t) => t.accuracy != null && t.size_ratio != null && t.size_ratio > 0);
  const W = 560, H = 320, L = 56, R = 16, T = 16, B = 44;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Accuracy against size ratio of the trials", id: "sweep-scatter", class: "scatter" });
  if (!pts.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "No trial has a report yet."));
    return root;
  }
  const xs = pts.map((p) => Math.log10(p.size_ratio)), ys = pts.map((p) => p.accuracy);
  const pad = (lo, hi) => (hi - lo < 1e-9 ? [lo - 0.5, hi + 0.5] : [lo - (hi - lo) * 0.08, hi + (hi - lo) * 0.08]);
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs));
  const [y0, y1] = pad(Math.min(...ys), Math.max(...ys));
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - T - B);
  const lats = pts.map((p) => p.latency_ms ?? 0), maxLat = Math.max(...lats) || 1;
  root.append(
    svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
    svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" }, "size ratio (log)"),
    svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "accuracy"),
    svg("text", { x: L, y: H - B + 16, "text-anchor": "start" }, ratio(10 ** x0)),
    svg("text", { x: W - R, y: H - B + 16, "text-anchor": "end" }, ratio(10 ** x1)),
    svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, pct(y0)),
    svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, pct(y1)),
  );
  for (const p of pts) {
    const onFront = front.has(p.job_id);
    const r = 4 + 8 * ((p.latency_ms ?? 0) / maxLat);
    const label = `trial ${p.index}: accuracy ${pct(p.accuracy)}, size ${ratio(p.size_ratio)}, latency ${ms(p.latency_ms)}${onFront ? " (on the front)" : ""}`;
    root.append(
      svg(
        "a",
        { href: `#/jobs/${encodeURIComponent(p.job_id)}`, class: onFront ? "point front" : "point", "data-job": p.job_id },
        svg("circle", { cx: X(Math.log10(p.size_ratio)).toFixed(1), cy: Y(p.accuracy).toFixed(1), r: r.toFixed(1) }, svg("title", {}, label)),
      ),
    );
  }
  return root;
}

function renderSweep(view, id) {
  const head = h("div", { class: "page-head" }, h("h1", {}, "Sweep"));
  const summary = h("div", { id: "sweep-summary" }, h("p", { class: "muted" }, "Loading…"));
  const plot = h("div", { id: "sweep-plot" });
  const trials = h("div", { id: "trials-table" });
  const drop = h("input", { id: "max-drop", name: "max_accuracy_drop", type: "number", min: "0", max: "100", step: "0.1", value: "0.5" });
  const cancel = h("button", { type: "button", id: "cancel-sweep" }, "Cancel sweep");

  async function load() {
    const q = drop.value !== "" ? `?max_accuracy_drop=${encodeURIComponent(drop.value)}` : "";
    const s = await get(`/v1/sweeps/${encodeURIComponent(id)}${q}`);
    const front = new Set(s.pareto);
    cancel.disabled = OVER.has(s.state);
    fill(head, h("h1", {}, `Sweep ${s.name}`), badge(s.state), cancel);
    fill(
      summary,
      facts([
        ["Id", s.id],
        ["Method", s.method],
        ["Trials", `${s.trials.filter((t) => OVER.has(t.state)).length} of ${s.total_trials} over`],
        ["Now", s.reason],
        ["Objective", s.objective.map((o) => `${o.metric} ${o.direction}`).join(", ")],
        ["Dense baseline", s.baseline_job ? jobLink(s.baseline_job, `${s.baseline_state}${s.baseline_accuracy != null ? ` · ${pct(s.baseline_accuracy)}` : ""}`) : null],
        ["Best", s.best ? jobLink(s.best) : `none within ${drop.value} points`],
      ]),
    );
    fill(plot, scatter(s.trials, front));
    const paramNames = s.trials.length ? Object.keys(s.trials[0].params) : [];
    const columns = [
      { label: "#", cell: (t) => t.index, class: "num" },
      { label: "Job", cell: (t) => jobLink(t.job_id) },
      ...paramNames.map((p) => ({ label: p.split(".").pop(), cell: (t) => String(t.params[p]), class: "num" })),
      { label: "State", cell: (t) => badge(t.state) },
      { label: "Accuracy", cell: (t) => pct(t.accuracy), class: "num" },
      { label: "Size ratio", cell: (t) => ratio(t.size_ratio), class: "num" },
      { label: "Latency", cell: (t) => ms(t.latency_ms), class: "num" },
      { label: "Front", cell: (t) => (front.has(t.job_id) ? (t.job_id === s.best ? "★ best" : "★") : t.error ?? ""), class: "front" },
    ];
    fill(trials, table(columns, s.trials, { caption: "Trials (★: on the Pareto front)", empty: "No trial yet." }));
  }
  const refresh = () => load().catch((err) => err.status !== 401 && fill(summary, errorNote(err)));
  drop.addEventListener("change", refresh);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await post(`/v1/sweeps/${encodeURIComponent(id)}/cancel`);
    } catch (err) {
      fill(summary, errorNote(err));
    }
    refresh();
  });
  fill(
    view,
    head,
    summary,
    h("div", { class: "toolbar" }, h("label", { for: "max-drop" }, "Best within accuracy points "), drop),
    section("Front", h("p", { class: "help" }, "Accuracy against size ratio; larger points are slower. Filled points are on the Pareto front; each links to its job."), plot),
    section("Trials", trials),
  );
  return every(REFRESH_MS, refresh);
}
