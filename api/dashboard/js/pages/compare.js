// Compare: two or more jobs' curves overlaid, and each finished job's report as a point of
// accuracy against compression ratio. The chosen ids live in the URL (#/compare?ids=a,b).

import { get, getAll } from "../api.js";
import { LineChart, PALETTE, scatter } from "../charts.js";
import { fill, h, section, table } from "../dom.js";
import { bytes, ms, pct, ratio } from "../format.js";
import { badge, errorNote } from "./common.js";

export const title = () => "Compare jobs";

const MAX_JOBS = PALETTE.length;

/** (step, value) tables of one metric key, cutting repeated steps as a resumed run does. */
function tableOf(records, kind, key) {
  const xs = [];
  const ys = [];
  for (const r of records) {
    if (r.kind !== kind || typeof r.data[key] !== "number" || typeof r.step !== "number") continue;
    while (xs.length && xs[xs.length - 1] >= r.step) {
      xs.pop();
      ys.pop();
    }
    xs.push(r.step);
    ys.push(r.data[key]);
  }
  return [xs, ys];
}

export function render(view, { query }) {
  const abort = new AbortController();
  const chosen = (query.get("ids") || "").split(",").filter(Boolean).slice(0, MAX_JOBS);
  const picker = h("fieldset", { class: "picker", id: "compare-picker" }, h("legend", {}, "Jobs to compare"), h("p", { class: "muted" }, "Loading jobs…"));
  const results = h("div", { id: "compare-results" });
  const charts = [];

  fill(
    view,
    h("div", { class: "page-head" }, h("h1", {}, "Compare jobs")),
    h("p", { class: "help" }, `Pick two or more jobs (up to ${MAX_JOBS}); finished jobs with a report also appear in the scatter.`),
    picker,
    results,
  );

  function setChosen(ids) {
    location.hash = `#/compare?ids=${ids.map(encodeURIComponent).join(",")}`;
  }

  async function loadPicker() {
    const page = await get("/v1/jobs?limit=50", { signal: abort.signal });
    const jobs = page.items;
    // Chosen jobs older than the newest 50 still get a box.
    for (const id of chosen) {
      if (!jobs.some((j) => j.id === id)) {
        try {
          jobs.push(await get(`/v1/jobs/${encodeURIComponent(id)}`, { signal: abort.signal }));
        } catch (err) {
          if (err.status !== 404) throw err;
        }
      }
    }
    const boxes = jobs.map((j) => {
      const box = h("input", { type: "checkbox", value: j.id, id: `cmp-${j.id}`, checked: chosen.includes(j.id) });
      box.addEventListener("change", () => {
        const ids = [...picker.querySelectorAll("input:checked")].map((b) => b.value);
        setChosen(ids.slice(0, MAX_JOBS));
      });
      return h("label", { for: `cmp-${j.id}`, class: "pick" }, box, " ", j.name, " ", badge(j.state), " ", h("code", { class: "muted" }, j.id));
    });
    fill(picker, h("legend", {}, "Jobs to compare"), boxes.length ? boxes : h("p", { class: "muted" }, "No jobs yet."));
  }

  async function loadJob(id) {
    const base = `/v1/jobs/${encodeURIComponent(id)}`;
    const [job, records] = await Promise.all([
      get(base, { signal: abort.signal }),
      getAll(`${base}/metrics`, { kind: ["train", "eval"], limit: "10000" }, { signal: abort.signal }),
    ]);
    let report = null;
    if (job.state === "succeeded") {
      report = await get(`${base}/report`, { signal: abort.signal }).catch((err) => {
        if (err.status === 404) return null;
        throw err;
      });
    }
    return { job, records, report };
  }

  async function loadResults() {
    if (chosen.length < 2) {
      fill(results, h("p", { class: "muted" }, "Choose at least two jobs."));
      return;
    }
    fill(results, h("p", { class: "muted" }, "Loading curves…"));
    const runs = await Promise.all(chosen.map(loadJob));
    const color = (i) => PALETTE[i % PALETTE.length];
    const boxes = {
      loss: h("div", { id: "cmp-loss" }),
      accuracy: h("div", { id: "cmp-accuracy" }),
      sparsity: h("div", { id: "cmp-sparsity" }),
      scatter: h("div", { id: "cmp-scatter" }),
    };
    fill(
      results,
      section("Curves", h("div", { class: "charts" }, boxes.loss, boxes.accuracy, boxes.sparsity)),
      section("Accuracy vs compression", boxes.scatter, h("div", { id: "compare-table" }, summaryTable(runs))),
    );
    const seriesOf = () => runs.map((r, i) => ({ label: r.job.name, color: color(i) }));
    const overlay = (box, chartTitle, yLabel, kind, key, yRange) => {
      const c = new LineChart(box, { title: chartTitle, yLabel, series: seriesOf(), yRange });
      c.setData(runs.map((r) => tableOf(r.records, kind, key)));
      charts.push(c);
    };
    overlay(boxes.loss, "Training loss", "loss", "train", "loss");
    overlay(boxes.accuracy, "Validation accuracy", "accuracy", "eval", "val_accuracy");
    overlay(boxes.sparsity, "Sparsity", "sparsity", "train", "sparsity", [0, 1]);
    const points = runs
      .map((r, i) => ({ r, i }))
      .filter(({ r }) => r.report && typeof r.report.accuracy === "number" && typeof r.report.size?.ratio === "number")
      .map(({ r, i }) => ({ x: r.report.size.ratio, y: r.report.accuracy, label: r.job.name, color: color(i) }));
    scatter(boxes.scatter, points, { title: "Artifact accuracy vs compression ratio", xLabel: "compression ratio (×)", yLabel: "accuracy", yBounds: [0, 1] });
  }

  function summaryTable(runs) {
    return table(
      [
        { label: "Job", cell: (r) => h("a", { href: `#/jobs/${encodeURIComponent(r.job.id)}` }, r.job.name) },
        { label: "State", cell: (r) => badge(r.job.state) },
        { label: "Accuracy", cell: (r) => (r.report ? pct(r.report.accuracy, 2) : "no report"), class: "num" },
        { label: "Ratio", cell: (r) => ratio(r.report?.size?.ratio), class: "num" },
        { label: "Packed size", cell: (r) => bytes(r.report?.size?.compressed_bytes), class: "num" },
        { label: "Sparsity", cell: (r) => pct(r.report?.sparsity?.global), class: "num" },
        { label: "Latency", cell: (r) => ms(r.report?.latency_ms?.compressed), class: "num" },
      ],
      runs,
      { caption: "Reports of the compared jobs" },
    );
  }

  const fail = (err) => {
    if (err.name !== "AbortError" && err.status !== 401) results.append(errorNote(err));
  };
  loadPicker().catch(fail);
  loadResults().catch(fail);

  return () => {
    abort.abort();
    charts.forEach((c) => c.destroy());
  };
}
