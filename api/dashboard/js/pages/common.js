// Pieces several pages share: state badges, progress bars, repeating refreshes, error notes.

import { h } from "../dom.js";
import { pct } from "../format.js";

export const STATES = ["queued", "starting", "running", "succeeded", "failed", "cancelled"];
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function badge(state) {
  return h("span", { class: `badge state-${STATES.includes(state) ? state : "unknown"}` }, state);
}

/** Fraction of the job's steps done, or null before the driver reported its total. */
export function fractionDone(job) {
  const p = job.progress || {};
  if (job.state === "succeeded") return 1;
  if (!p.total_steps || p.step === null || p.step === undefined) return null;
  return Math.min(1, p.step / p.total_steps);
}

export function progressBar(job) {
  const f = fractionDone(job);
  const p = job.progress || {};
  const text = f === null ? "–" : `${pct(f, 0)}${p.total_steps ? ` (${p.step ?? 0}/${p.total_steps})` : ""}`;
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: 1, value: f ?? 0, "aria-label": `progress ${text}` }),
    h("span", { class: "progress-text" }, text),
  );
}

export function errorNote(err) {
  return h("p", { class: "error", role: "alert" }, err && err.message ? err.message : String(err));
}

/**
 * Run `fn` now and then every `ms` while the page stays (and the tab is visible), never two
 * at once. Returns a stop function.
 */
export function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    if (document.visibilityState !== "hidden") {
      try {
        await fn();
      } catch (err) {
        if (err.name !== "AbortError" && err.status !== 401) console.warn("refresh failed:", err.message);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
