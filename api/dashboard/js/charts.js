// Line charts (uPlot), a scatter plot and bar rows. Every chart states how many points it
// draws in `data-points`, and says in its aria-label what it shows, for screen readers and tests.

import uPlot from "../vendor/uplot.esm.js";
import { h, fill } from "./dom.js";
import { num } from "./format.js";

export const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4d7c0f"];

const HEIGHT = 220;

/**
 * A line chart of one or more series against the optimizer step. Each series has its own
 * (step, value) table; they are merged on the step axis, gaps bridged.
 */
export class LineChart {
  constructor(container, { title, yLabel, series, yRange = null }) {
    this.container = container;
    this.title = title;
    this.yLabel = yLabel;
    this.series = series;
    this.yRange = yRange;
    this.tables = series.map(() => [[], []]);
    this.plot = null;
    this.pending = false;
    container.classList.add("chart");
    container.setAttribute("role", "img");
    this.box = h("div", { class: "chart-body" });
    this.note = h("p", { class: "chart-empty" }, "No data yet.");
    fill(container, h("h3", {}, title), this.note, this.box);
    this.describe();
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resize.observe(container);
  }

  size() {
    return { width: Math.max(200, this.box.clientWidth || this.container.clientWidth - 16), height: HEIGHT };
  }

  /** tables[i] = [steps, values] for series i. Redraws at most once per frame. */
  setData(tables) {
    this.tables = tables;
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  points() {
    return Math.max(0, ...this.tables.map((t) => t[0].length));
  }

  describe() {
    const n = this.points();
    this.container.dataset.points = String(n);
    const last = this.series
      .map((s, i) => {
        const ys = this.tables[i][1];
        return ys.length ? `${s.label} ${num(ys[ys.length - 1])}` : null;
      })
      .filter(Boolean)
      .join(", ");
    this.container.setAttribute("aria-label", `${this.title} against step: ${n} points${last ? `; last: ${last}` : ""}`);
  }

  draw() {
    const present = this.tables.map((t) => t[0].length > 0);
    this.describe();
    if (!present.some(Boolean)) return;
    this.note.hidden = true;
    // uPlot wants one shared x array: join the per-series tables on the step.
    const data = uPlot.join(this.tables.map((t) => [t[0], t[1]]));
    if (this.plot && this.plot.series.length === data.length) {
      this.plot.setData(data);
      return;
    }
    if (this.plot) this.plot.destroy();
    const opts = {
      ...this.size(),
      scales: { x: { time: false }, y: this.yRange ? { range: this.yRange } : {} },
      axes: [{ label: "step" }, { label: this.yLabel, size: 60 }],
      series: [
        { label: "step" },
        ...this.series.map((s, i) => ({
          label: s.label,
          stroke: s.color || PALETTE[i % PALETTE.length],
          width: 2,
          dash: s.dash,
          // stepped: a value holds until the next point (a schedule's staircase).
          paths: s.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
          spanGaps: true,
          value: (u, v) => num(v),
        })),
      ],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
    };
    this.plot = new uPlot(opts, data, this.box);
  }

  destroy() {
    this.resize.disconnect();
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}

function ticks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toPrecision(12));
  return out;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** Scatter of labelled points [{x, y, label, color}] with axes; SVG, scales to its box. */
export function scatter(container, points, { title, xLabel, yLabel, yBounds = [-Infinity, Infinity] }) {
  container.classList.add("chart");
  container.dataset.points = String(points.length);
  container.setAttribute("role", "img");
  container.setAttribute(
    "aria-label",
    `${title}: ${points.map((p) => `${p.label} (${xLabel} ${num(p.x)}, ${yLabel} ${num(p.y)})`).join("; ") || "no points"}`,
  );
  if (!points.length) {
    fill(container, h("h3", {}, title), h("p", { class: "chart-empty" }, "No reports to plot yet."));
    return;
  }
  const W = 640;
  const H = 300;
  const m = { l: 56, r: 16, t: 12, b: 44 };
  // A margin of a tenth of the span (of the value itself for a single point) around the data.
  const pad = (lo, hi) => {
    const d = (hi - lo || Math.abs(hi) || 1) * 0.1;
    return [lo - d, hi + d];
  };
  const [x0, x1] = pad(Math.min(...points.map((p) => p.x)), Math.max(...points.map((p) => p.x)));
  let [y0, y1] = pad(Math.min(...points.map((p) => p.y)), Math.max(...points.map((p) => p.y)));
  [y0, y1] = [Math.max(y0, yBounds[0]), Math.min(y1, yBounds[1])];
  const sx = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
  const sy = (v) => H - m.b - ((v - y0) / (y1 - y0)) * (H - m.t - m.b);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "scatter", "aria-hidden": "true" });
  root.append(svg("line", { x1: m.l, y1: H - m.b, x2: W - m.r, y2: H - m.b, class: "axis" }));
  root.append(svg("line", { x1: m.l, y1: m.t, x2: m.l, y2: H - m.b, class: "axis" }));
  for (const t of ticks(x0, x1)) {
    root.append(svg("line", { x1: sx(t), y1: m.t, x2: sx(t), y2: H - m.b, class: "grid" }));
    root.append(svg("text", { x: sx(t), y: H - m.b + 16, "text-anchor": "middle" }, num(t)));
  }
  for (const t of ticks(y0, y1)) {
    root.append(svg("line", { x1: m.l, y1: sy(t), x2: W - m.r, y2: sy(t), class: "grid" }));
    root.append(svg("text", { x: m.l - 6, y: sy(t) + 4, "text-anchor": "end" }, num(t)));
  }
  root.append(svg("text", { x: (W + m.l) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, xLabel));
  root.append(
    svg("text", { x: 14, y: (H - m.b) / 2, transform: `rotate(-90 14 ${(H - m.b) / 2})`, "text-anchor": "middle", class: "label" }, yLabel),
  );
  points.forEach((p) => {
    const g = svg("g", { class: "point" });
    g.append(svg("title", {}, `${p.label}: ${xLabel} ${num(p.x)}, ${yLabel} ${num(p.y)}`));
    g.append(svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 6, fill: p.color }));
    // Labels of points in the right half go to their left, so they stay inside the plot.
    const right = sx(p.x) > (W + m.l) / 2;
    const at = { x: sx(p.x) + (right ? -9 : 9), y: sy(p.y) - 8, "text-anchor": right ? "end" : "start" };
    g.append(svg("text", { ...at, class: "point-label" }, p.label));
    root.append(g);
  });
  fill(container, h("h3", {}, title), root);
}

/** Horizontal bars for fractions in [0, 1]: [{label, value}]. */
export function bars(container, rows, { title }) {
  container.dataset.points = String(rows.length);
  fill(
    container,
    h("h3", {}, title),
    h(
      "ul",
      { class: "bars" },
      rows.map((r) => {
        const fillEl = h("span", { class: "bar-fill" });
        fillEl.style.width = `${Math.max(0, Math.min(1, r.value)) * 100}%`; // CSSOM: allowed by the CSP
        return h(
          "li",
          {},
          h("span", { class: "bar-label" }, r.label),
          h("span", { class: "bar-track", "aria-hidden": "true" }, fillEl),
          h("span", { class: "bar-value" }, `${(r.value * 100).toFixed(1)}%`),
        );
      }),
    ),
  );
}
