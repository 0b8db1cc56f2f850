// Cluster: Ray's nodes, CPUs and GPUs in use by slimtrain jobs and free, and the queue with the
// scheduler's reason for every job that waits.

import { get, getAll } from "../api.js";
import { facts, fill, h, section, table } from "../dom.js";
import { duration, num, since } from "../format.js";
import { badge, every, errorNote } from "./common.js";

export const title = () => "Cluster";

const REFRESH_MS = 5000;

function meter(label, used, total) {
  const free = Math.max(0, total - used);
  return h(
    "div",
    { class: "card" },
    h("div", { class: "card-label" }, label),
    h("div", { class: "card-value" }, `${num(free)} free`),
    h("meter", { min: 0, max: total || 1, value: Math.min(used, total), "aria-label": `${label} used` }),
    h("div", { class: "card-note" }, `${num(used)} used by jobs of ${num(total)}`),
  );
}

export function render(view) {
  const body = h("div", { id: "cluster" }, h("p", { class: "muted" }, "Loading…"));
  fill(view, h("div", { class: "page-head" }, h("h1", {}, "Cluster")), body);

  async function load() {
    const [c, waiting] = await Promise.all([
      get("/v1/cluster"),
      getAll("/v1/jobs", { state: ["queued", "starting"], limit: "200" }),
    ]);
    // In admission order: higher priority first, then older first (service/scheduler.py).
    const queue = waiting.sort((a, b) => b.priority - a.priority || a.created_at.localeCompare(b.created_at));
    fill(
      body,
      c.reachable ? null : h("p", { class: "error", role: "alert" }, `The Ray cluster does not answer: ${c.error ?? "unknown error"}`),
      h(
        "div",
        { class: "cards" },
        meter("CPUs", c.reserved.CPU, c.capacity.CPU),
        meter("GPUs", c.reserved.GPU, c.capacity.GPU),
        h("div", { class: "card" }, h("div", { class: "card-label" }, "Queue"), h("div", { class: "card-value" }, `${c.queue_length} queued`), h("div", { class: "card-note" }, "all tenants")),
      ),
      facts([
        ["Ray Jobs API", c.dashboard_url],
        ["Your jobs", Object.entries(c.jobs).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ") || "none"],
      ]),
      section(
        "Nodes",
        table(
          [
            { label: "Node", cell: (n) => h("code", {}, n.node_id.slice(0, 16)) },
            { label: "Alive", cell: (n) => (n.alive ? "yes" : "no") },
            { label: "CPUs", cell: (n) => num(n.resources.CPU ?? 0), class: "num" },
            { label: "GPUs", cell: (n) => num(n.resources.GPU ?? 0), class: "num" },
            { label: "Memory", cell: (n) => (n.resources.memory ? `${num(n.resources.memory / 2 ** 30)} GiB` : "–"), class: "num" },
          ],
          c.nodes,
          { caption: "Ray nodes", empty: "No nodes (or the cluster does not answer)." },
        ),
      ),
      section(
        "Queue",
        table(
          [
            { label: "Job", cell: (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.name) },
            { label: "State", cell: (j) => badge(j.state) },
            { label: "Priority", cell: (j) => j.priority, class: "num" },
            { label: "Workers", cell: (j) => j.spec.parallel?.workers ?? "–", class: "num" },
            { label: "Waiting because", cell: (j) => j.reason ?? "–", class: "reason" },
            { label: "Waiting for", cell: (j) => duration(since(j.created_at)), class: "num" },
          ],
          queue,
          { caption: "Your jobs that wait to run, first in line first", empty: "Nothing is waiting." },
        ),
      ),
    );
  }

  return every(REFRESH_MS, () => load().catch((err) => err.status !== 401 && fill(body, errorNote(err))));
}
