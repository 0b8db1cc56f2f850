// Job detail, live: the job's record, its curves over server-sent events, the compression
// report, attempts and errors, artifacts, the driver's log, and cancelling with a confirmation.

import { download, get, post, streamEvents } from "../api.js";
import { LineChart, PALETTE, bars } from "../charts.js";
import { facts, fill, h, section, table } from "../dom.js";
import { bytes, duration, ms, num, pct, ratio, since, when } from "../format.js";
import { TERMINAL, badge, every, errorNote, progressBar } from "./common.js";

const SIDE_REFRESH_MS = 5000;
const LOG_LINES = 200;

export const title = ({ id }) => `Job ${id}`;

/** Metric records -> per-quantity (step, value) tables. A resumed attempt reports some steps
 * again: a step at or below the last one cuts the tail, so the curve shows the run that won. */
class Series {
  constructor() {
    this.tables = {};
  }

  add(key, step, value) {
    if (typeof step !== "number" || typeof value !== "number" || !Number.isFinite(value)) return;
    const t = (this.tables[key] ||= [[], []]);
    let n = t[0].length;
    while (n && t[0][n - 1] >= step) n -= 1;
    if (n !== t[0].length) {
      t[0].length = n;
      t[1].length = n;
    }
    t[0].push(step);
    t[1].push(value);
  }

  get(key) {
    return this.tables[key] || [[], []];
  }

  record(r) {
    if (r.kind === "train") {
      for (const k of ["loss", "lr", "samples_per_second", "sparsity", "target_sparsity"]) this.add(k, r.step, r[k]);
    } else if (r.kind === "eval") {
      for (const k of ["val_loss", "val_accuracy"]) this.add(k, r.step, r[k]);
    } else if (r.event === "start" && Array.isArray(r.target_curve)) {
      // The whole schedule, known from the start: the target is drawn ahead of the run.
      this.tables.target_curve = [r.target_curve.map((p) => p[0]), r.target_curve.map((p) => p[1])];
    }
  }
}

function artifactPath(id, name) {
  return `/v1/jobs/${encodeURIComponent(id)}/artifacts/${name.split("/").map(encodeURIComponent).join("/")}`;
}

// The driver's phase, while it speaks for the job: when running, and while `starting` once the
// driver's own first phases arrive (Ray reports the job running up to a reconcile tick later).
// Later phases while `starting` can only be an earlier attempt's (a retry): not shown.
const EARLY_PHASES = new Set(["starting", "preparing"]);
const showsPhase = (j) =>
  Boolean(j.progress?.phase) && (j.state === "running" || (j.state === "starting" && EARLY_PHASES.has(j.progress.phase)));

/** format(v), or null (the row is left out) when the report lacks the value. */
const opt = (v, format) => (v === null || v === undefined ? null : format(v));

/** The latency card's note: the dense latency and how many times faster the artifact is, or
 * slower (the inverse ratio: "0.7× faster" would read as a speed-up). */
export function latencyNote(dense, compressed, sameArtifact = false) {
  // Nothing was quantized: the artifact is the dense model, and a ratio of it with itself is no speed-up.
  if (sameArtifact) return "the dense model.onnx ships as is";
  const base = `dense ${ms(dense)}`;
  if (!dense || !compressed) return base;
  const r = dense / compressed;
  if (Math.abs(r - 1) < 0.005) return `${base} · as fast`;
  return r > 1 ? `${base} · ${num(r)}× faster` : `${base} · ${num(1 / r)}× slower`;
}

function reportView(report) {
  const size = report.size || {};
  const lat = report.latency_ms || {};
  const params = report.params || {};
  const headline = h(
    "div",
    { class: "cards", id: "report-cards" },
    card("Artifact accuracy", pct(report.accuracy, 2), report.accuracy_source),
    card("Compression ratio", ratio(size.ratio), `${bytes(size.compressed_bytes)} packed, ${bytes(size.dense_bytes)} dense fp32`),
    card("Latency", ms(lat.compressed), latencyNote(lat.dense, lat.compressed, report.latency_setup?.same_artifact)),
    card("Sparsity", pct(report.sparsity?.global, 1), `${num(params.nonzero)} of ${num(params.total)} weights non-zero`),
  );
  const details = facts([
    ["Dense accuracy", report.dense_accuracy != null ? pct(report.dense_accuracy, 2) : null],
    ["Float accuracy (before quantization)", report.float_accuracy != null ? pct(report.float_accuracy, 2) : null],
    ["Validation loss of the artifact", opt(report.val_loss, num)],
    ["ONNX size", size.onnx_bytes != null ? bytes(size.onnx_bytes) : null],
    ["Quantized ONNX size", size.onnx_quantized_bytes != null ? bytes(size.onnx_quantized_bytes) : null],
    ["Quantization", report.quantization?.mode],
    ["Latency measured", report.latency_setup ? `${report.latency_setup.statistic}, ${report.latency_setup.runtime}` : null],
    ["Input", report.input ? `${JSON.stringify(report.input.shape)} ${report.input.dtype}` : null],
    ["Trained on", devicesText(report.devices)],
    ["Steps", opt(report.steps, num)],
    ["Wall time", opt(report.wall_seconds, duration)],
    ["Throughput", report.samples_per_second != null ? `${num(report.samples_per_second)} samples/s` : null],
  ]);
  const warnings = (report.warnings || []).length
    ? h("ul", { class: "warnings" }, report.warnings.map((w) => h("li", {}, typeof w === "string" ? w : JSON.stringify(w))))
    : null;
  return [headline, details, warnings];
}

// The report's `devices` (one per rank) as the CLI shows them (api/render.py: devices_text):
// "2 x cpu", "cuda:0 (NVIDIA H200)"; null for reports written before the key existed.
function devicesText(devices) {
  if (!devices || !devices.length) return null;
  const counts = new Map();
  for (const d of devices) counts.set(d, (counts.get(d) || 0) + 1);
  return [...counts].map(([d, n]) => (n === 1 ? d : `${n} x ${d}`)).join(", ");
}

function card(label, value, note) {
  return h("div", { class: "card" }, h("div", { class: "card-label" }, label), h("div", { class: "card-value" }, value), note ? h("div", { class: "card-note" }, note) : null);
}

function confirmCancel(job) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "button", class: "danger", value: "yes" }, "Cancel job");
    const no = h("button", { type: "button", value: "no", autofocus: true }, "Keep it");
    const dialog = h(
      "dialog",
      { class: "confirm", "aria-labelledby": "confirm-title" },
      h("h2", { id: "confirm-title" }, "Cancel this job?"),
      h("p", {}, "“", job.name, "” (", job.id, ") will be stopped on the cluster. This cannot be undone."),
      h("div", { class: "actions" }, no, yes),
    );
    const done = (answer) => {
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    yes.addEventListener("click", () => done(true));
    no.addEventListener("click", () => done(false));
    dialog.addEventListener("cancel", () => done(false)); // Escape
    document.body.append(dialog);
    dialog.showModal();
  });
}

export function render(view, { id }) {
  const abort = new AbortController();
  const series = new Series();
  let job = null;
  let sideDone = false;
  let reportShown = false;

  const head = h("div", { class: "page-head" }, h("h1", {}, "Job"));
  const summary = h("div", { id: "job-summary" }, h("p", { class: "muted" }, "Loading…"));
  const live = h("p", { class: "muted", id: "stream-status", "aria-live": "polite" });
  const chartBoxes = {
    loss: h("div", { id: "chart-loss" }),
    accuracy: h("div", { id: "chart-accuracy" }),
    lr: h("div", { id: "chart-lr" }),
    throughput: h("div", { id: "chart-throughput" }),
    sparsity: h("div", { id: "chart-sparsity" }),
  };
  const report = h("div", { id: "report" }, h("p", { class: "muted" }, "The report is written when the job succeeds."));
  const layers = h("div", { id: "layer-sparsity", class: "chart" });
  const history = h("div", { id: "history" });
  const artifacts = h("div", { id: "artifacts" });
  const log = h("pre", { id: "log", class: "log", tabindex: "0", "aria-label": "Driver log, last lines" }, "");

  fill(
    view,
    head,
    summary,
    section("Curves", live, h("div", { class: "charts" }, Object.values(chartBoxes))),
    section("Compression report", report, layers),
    section("Attempts and errors", history),
    section("Artifacts", artifacts),
    section("Log (last lines)", log),
  );

  const charts = {
    loss: new LineChart(chartBoxes.loss, {
      title: "Loss",
      yLabel: "loss",
      series: [{ label: "train loss" }, { label: "val loss", color: PALETTE[1] }],
    }),
    accuracy: new LineChart(chartBoxes.accuracy, {
      title: "Validation accuracy",
      yLabel: "accuracy",
      series: [{ label: "val accuracy", color: PALETTE[2] }],
    }),
    lr: new LineChart(chartBoxes.lr, { title: "Learning rate", yLabel: "lr", series: [{ label: "lr", color: PALETTE[4] }] }),
    throughput: new LineChart(chartBoxes.throughput, {
      title: "Throughput",
      yLabel: "samples/s",
      series: [{ label: "samples/s", color: PALETTE[3] }],
    }),
    sparsity: new LineChart(chartBoxes.sparsity, {
      title: "Sparsity: measured vs scheduled target",
      yLabel: "sparsity",
      yRange: [0, 1],
      series: [{ label: "measured" }, { label: "target (schedule)", color: PALETTE[1], dash: [6, 4], stepped: true }],
    }),
  };

  function redrawCharts() {
    charts.loss.setData([series.get("loss"), series.get("val_loss")]);
    charts.accuracy.setData([series.get("val_accuracy")]);
    charts.lr.setData([series.get("lr")]);
    charts.throughput.setData([series.get("samples_per_second")]);
    // Jobs whose start record predates target_curve: the target as logged, up to now.
    const target = series.tables.target_curve ? series.get("target_curve") : series.get("target_sparsity");
    charts.sparsity.setData([series.get("sparsity"), target]);
  }

  function showJob(j) {
    job = j;
    const p = j.progress || {};
    const cancel = TERMINAL.has(j.state)
      ? null
      : h("button", { type: "button", class: "danger", id: "cancel", onclick: onCancel }, "Cancel job");
    fill(
      head,
      h("h1", {}, j.name),
      badge(j.state),
      h("span", { class: "spacer" }),
      h("a", { class: "button", href: `#/compare?ids=${encodeURIComponent(j.id)}` }, "Compare…"),
      cancel,
    );
    const spec = j.spec || {};
    const pruning = spec.compression?.pruning;
    const quant = spec.compression?.quantization;
    fill(
      summary,
      facts([
        ["Id", h("code", {}, j.id)],
        ["State", j.state],
        ["Why", j.reason],
        // What the driver does now (starting, preparing, waiting for workers, training, ...).
        ["Phase", showsPhase(j) ? p.phase.replaceAll("_", " ") : null],
        ["Progress", progressBar(j)],
        ["Loss", num(p.loss)],
        ["Validation accuracy", pct(p.val_accuracy, 2)],
        ["Sparsity", p.sparsity != null ? `${pct(p.sparsity)} (target ${pct(p.target_sparsity)})` : null],
        ["Model", spec.model?.name],
        ["Data", spec.data?.name || spec.data?.uri],
        ["Parallel", spec.parallel ? `${spec.parallel.strategy} × ${spec.parallel.workers}` : null],
        ["Precision", spec.precision],
        ["Pruning", pruning ? `${pruning.schedule} to ${pct(pruning.final_sparsity, 0)}, steps ${pruning.start_step}–${pruning.end_step}` : "none"],
        ["Quantization", quant && quant.mode !== "none" ? `${quant.mode} int${quant.bits}` : "none"],
        ["Attempts", `${j.attempts} of ${j.max_attempts}`],
        ["Submitted", `${when(j.created_at)} (${duration(since(j.created_at))} ago)`],
        ["Started", j.started_at ? when(j.started_at) : null],
        ["Finished", j.finished_at ? when(j.finished_at) : null],
      ]),
      j.error ? h("p", { class: "error", role: "alert", id: "job-error" }, `${j.error.code}: ${j.error.message ?? ""}`) : null,
      h("details", { class: "spec" }, h("summary", {}, "Spec (with defaults)"), h("pre", {}, JSON.stringify(spec, null, 2))),
    );
    document.title = `${j.name} · slimtrain`;
  }

  async function onCancel() {
    if (!job || !(await confirmCancel(job))) return;
    try {
      showJob(await post(`/v1/jobs/${encodeURIComponent(id)}/cancel`));
    } catch (err) {
      summary.prepend(errorNote(err));
    }
  }

  async function refreshSide() {
    if (sideDone) return;
    const j = await get(`/v1/jobs/${encodeURIComponent(id)}`, { signal: abort.signal }).catch((err) => {
      if (err.status === 404) sideDone = true; // no such job (for this tenant): nothing to refresh
      throw err;
    });
    showJob(j);
    const base = `/v1/jobs/${encodeURIComponent(id)}`;
    const [attempts, arts, logText] = await Promise.all([
      get(`${base}/attempts`, { signal: abort.signal }),
      get(`${base}/artifacts?limit=1000`, { signal: abort.signal }),
      get(`${base}/logs`, { signal: abort.signal }).catch((err) => `(log unavailable: ${err.message})`),
    ]);
    showHistory(j, attempts.items);
    showArtifacts(arts.items);
    showLog(logText);
    if (j.state === "succeeded" && !reportShown) await showReport();
    if (TERMINAL.has(j.state)) sideDone = true; // nothing changes any more
  }

  async function showReport() {
    try {
      const r = await get(`/v1/jobs/${encodeURIComponent(id)}/report`, { signal: abort.signal });
      reportShown = true;
      fill(report, reportView(r));
      const rows = Object.entries(r.sparsity?.layers || {}).map(([label, value]) => ({ label, value }));
      bars(layers, rows, { title: "Per-layer sparsity" });
    } catch (err) {
      if (err.status === 404) return; // written at the very end; the next refresh tries again
      fill(report, errorNote(err));
    }
  }

  function showHistory(j, attempts) {
    fill(
      history,
      j.error ? h("p", { class: "error" }, `Failed: ${j.error.code}: ${j.error.message ?? ""}`) : null,
      table(
        [
          { label: "#", cell: (a) => a.number, class: "num" },
          { label: "Ray submission", cell: (a) => h("code", {}, a.submission_id) },
          { label: "Submitted", cell: (a) => when(a.submitted_at) },
          { label: "Started", cell: (a) => when(a.started_at) },
          { label: "Ended", cell: (a) => when(a.ended_at) },
          { label: "Outcome", cell: (a) => a.outcome ?? "open" },
          { label: "Message", cell: (a) => a.message ?? "" },
        ],
        attempts,
        { caption: "Driver submissions to Ray, oldest first", empty: "Not submitted to Ray yet." },
      ),
    );
  }

  function showArtifacts(items) {
    const row = (a) =>
      h(
        "button",
        {
          type: "button",
          class: "link",
          "aria-label": `Download ${a.name}`,
          onclick: () => download(artifactPath(id, a.name), a.name.split("/").pop()).catch((err) => artifacts.append(errorNote(err))),
        },
        "Download",
      );
    const cols = [
      { label: "Name", cell: (a) => h("code", {}, a.name) },
      { label: "Size", cell: (a) => bytes(a.size), class: "num" },
      { label: "", cell: row },
    ];
    const main = items.filter((a) => !a.name.startsWith("checkpoints/"));
    const ckpt = items.filter((a) => a.name.startsWith("checkpoints/"));
    fill(
      artifacts,
      table(cols, main, { empty: "No artifacts yet." }),
      ckpt.length ? h("details", {}, h("summary", {}, `Checkpoint files (${ckpt.length})`), table(cols, ckpt)) : null,
    );
  }

  function showLog(text) {
    const lines = String(text).split("\n");
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = lines.slice(-LOG_LINES).join("\n") || "(empty)";
    if (stick) log.scrollTop = log.scrollHeight;
  }

  async function follow() {
    let last = null;
    while (!abort.signal.aborted) {
      try {
        fill(live, "Live: following the job's events.");
        await streamEvents(`/v1/jobs/${encodeURIComponent(id)}/events`, {
          signal: abort.signal,
          lastEventId: last,
          onEvent: (e) => {
            last = e.id;
            const data = JSON.parse(e.data);
            if (e.event === "metric") {
              series.record(data);
              redrawCharts();
              if (data.kind === "phase" && job && !TERMINAL.has(job.state)) {
                showJob({ ...job, progress: { ...job.progress, phase: data.phase } });
              }
            } else if (e.event === "state" && job && data.state !== job.state) {
              refreshSide().catch(() => {});
            }
          },
        });
        if (job && TERMINAL.has(job.state)) break;
        // The stream ends after the final state; when it ended otherwise, read the job again.
        const j = await get(`/v1/jobs/${encodeURIComponent(id)}`, { signal: abort.signal });
        showJob(j);
        if (TERMINAL.has(j.state)) break;
      } catch (err) {
        if (abort.signal.aborted || err.status === 401 || err.status === 404) return;
        fill(live, `Connection lost (${err.message}); reconnecting…`);
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
    sideDone = false;
    await refreshSide().catch(() => {});
    fill(live, `Finished: ${job ? job.state : "over"}.`);
  }

  get(`/v1/jobs/${encodeURIComponent(id)}`, { signal: abort.signal })
    .then((j) => {
      showJob(j);
      follow();
    })
    .catch((err) => {
      if (err.name !== "AbortError") fill(summary, errorNote(err));
    });
  const stop = every(SIDE_REFRESH_MS, refreshSide);

  return () => {
    abort.abort();
    stop();
    Object.values(charts).forEach((c) => c.destroy());
    document.querySelectorAll("dialog.confirm").forEach((d) => d.remove());
  };
}
