// The Submit page's pickers for what a job reads: its data (a built-in dataset or one of the
// tenant's uploads, `data.uri: store://datasets/<name>`, or a set of shards, `store://datasets/SET/`) and its initial weights (an uploaded
// model, `model.init.uri: store://models/<name>`, or a succeeded job, `model.init.job`). They
// edit the spec in the editor, which stays the one thing submitted: a choice rewrites only the
// keys it owns, and the pickers follow what the editor says when a spec is loaded or edited.

import { ApiError, get, getAll } from "../api.js";
import { fill, h } from "../dom.js";
import { isMap } from "../../vendor/yaml.esm.js";
import { bytes } from "../format.js";

const DATASET_PREFIX = "store://datasets/";
const MODEL_PREFIX = "store://models/";
// Keys of `data` that belong to one source: a new source drops them (a built-in's `args` mean
// nothing to a parquet file, a parquet's `label_column` nothing to digits). `val_fraction` and
// `streaming` apply to any source and stay.
const SOURCE_KEYS = [
  "name", "args", "uri", "format", "label_column", "feature_columns", "token_column",
  "text_column", "tokenizer", "seq_len", "layout", "image_size", "num_classes",
];
// The most succeeded jobs offered as a starting point (newest first).
const MAX_JOBS = 200;

/** The built-in datasets as the spec's schema lists them ("Registry dataset: a, b, c."). */
export function builtinDatasets(schema) {
  const text = schema?.$defs?.DataSpec?.properties?.name?.description || "";
  const m = /Registry dataset:\s*([^.]+)\./.exec(text);
  return m ? m[1].split(",").map((s) => s.trim()).filter(Boolean) : ["digits"];
}

function datasetNote(d) {
  const parts = [d.format];
  if (d.shards) parts.push(`${d.shards} shards`);
  parts.push(`${d.samples} samples`);
  if (d.num_classes) parts.push(`${d.num_classes} classes`);
  parts.push(bytes(d.size));
  return `${d.name} — ${parts.join(", ")}`;
}

/**
 * What the Dataset picker offers from `GET /v1/datasets`: each one-file upload, and each set of
 * shards (uploaded as SET/SHARD) as one entry named `SET/`, which a job reads whole as
 * `store://datasets/SET/` (its shards are not offered one by one). A set's columns are its first
 * shard's, as the job's readers take them. A tokenizer.json is no data (nor a set's shard).
 */
export function datasetChoices(items) {
  const sets = new Map();
  const out = [];
  for (const d of items) {
    if (d.format === "tokenizer") continue;
    const slash = d.name.indexOf("/");
    if (slash < 0) {
      out.push(d);
      continue;
    }
    const name = d.name.slice(0, slash + 1);
    if (!sets.has(name)) sets.set(name, []);
    sets.get(name).push(d);
  }
  for (const [name, shards] of sets) {
    shards.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const formats = [...new Set(shards.map((s) => s.format))].sort();
    out.push({
      name,
      shards: shards.length,
      format: formats.join("+"), // more than one: the server refuses the set at submission
      samples: shards.reduce((n, s) => n + s.samples, 0),
      size: shards.reduce((n, s) => n + s.size, 0),
      // Each shard's labels are 0..K-1, every class present (the check on arrival): the set's
      // classes are the most of any shard's.
      num_classes: shards.every((s) => s.num_classes != null) ? Math.max(...shards.map((s) => s.num_classes)) : null,
      columns: shards[0].columns,
    });
  }
  return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

function hint(what, command) {
  return [`No ${what} uploaded yet: `, h("code", {}, command)];
}

/**
 * Build the pickers. `edit(fn)` runs fn(doc) on the editor's parsed spec and writes it back (it
 * returns false when the text cannot be parsed); `read()` is the spec as JS, or null.
 */
export function sourcePickers({ edit, read }) {
  let builtins = ["digits"];
  let datasets = null; // null: not loaded (or the server has no /v1/datasets)
  let models = [];
  let jobs = [];

  const dataset = h("select", { id: "dataset-picker", name: "dataset" });
  const labelColumn = h("select", { id: "label-column", name: "label_column" });
  const labelRow = h("span", { class: "pick", hidden: true }, h("label", { for: "label-column" }, "label column "), labelColumn);
  // The parquet readers need the features named too: every other column, until unticked.
  const features = h("span", { id: "feature-columns", class: "columns" });
  const featureRow = h("div", { class: "pick", hidden: true }, h("span", {}, "Feature columns "), features);
  const datasetHint = h("p", { id: "dataset-hint", class: "help" });
  const init = h("select", { id: "init-picker", name: "init" });
  const initHint = h("p", { id: "init-hint", class: "help" });
  const element = h(
    "fieldset",
    { class: "sources" },
    h("legend", {}, "Data and initial weights"),
    h("div", { class: "pick" }, h("label", { for: "dataset-picker" }, "Dataset "), dataset, labelRow),
    featureRow,
    datasetHint,
    h("div", { class: "pick" }, h("label", { for: "init-picker" }, "Initial weights "), init),
    initHint,
  );

  function options() {
    const uploads = datasetChoices(datasets || []);
    fill(
      dataset,
      h("option", { value: "" }, "as written in the spec"),
      h("optgroup", { label: "Built-in" }, builtins.map((n) => h("option", { value: `builtin:${n}` }, n))),
      uploads.length
        ? h("optgroup", { label: "Uploaded" }, uploads.map((d) => h("option", { value: `upload:${d.name}` }, datasetNote(d))))
        : null,
    );
    if (datasets === null) fill(datasetHint, "This server lists no uploaded datasets; the built-in ones are offered.");
    else fill(datasetHint, uploads.length ? null : hint("datasets", "slimtrain dataset push FILE NAME"));
    fill(
      init,
      h("option", { value: "none" }, "none (random initialisation)"),
      h("option", { value: "" }, "as written in the spec"),
      models.length
        ? h("optgroup", { label: "Uploaded models" }, models.map((m) => h("option", { value: `model:${m.name}` }, `${m.name} — ${m.tensors} tensors, ${bytes(m.size)}`)))
        : null,
      jobs.length
        ? h("optgroup", { label: "Finished jobs" }, jobs.map((j) => h("option", { value: `job:${j.id}` }, `${j.name} · ${j.spec?.model?.name ?? "?"} · ${j.id}`)))
        : null,
    );
    fill(initHint, models.length ? null : hint("models", "slimtrain model push FILE NAME"));
    sync();
  }

  /** Show what the editor's spec says; a choice the lists do not hold shows as "as written". */
  function sync() {
    const spec = read();
    const data = spec && typeof spec.data === "object" && spec.data ? spec.data : {};
    let d = "";
    if (typeof data.uri === "string" && data.uri.startsWith(DATASET_PREFIX)) d = `upload:${data.uri.slice(DATASET_PREFIX.length)}`;
    else if (!data.uri && typeof data.name === "string") d = `builtin:${data.name}`;
    dataset.value = [...dataset.options].some((o) => o.value === d) ? d : "";
    showColumns(data);
    const given = spec?.model?.init;
    let i = "";
    if (!given) i = "none";
    else if (typeof given.uri === "string" && given.uri.startsWith(MODEL_PREFIX)) i = `model:${given.uri.slice(MODEL_PREFIX.length)}`;
    else if (given.job) i = `job:${given.job}`;
    init.value = [...init.options].some((o) => o.value === i) ? i : "";
  }

  function chosenUpload() {
    const name = dataset.value.startsWith("upload:") ? dataset.value.slice(7) : null;
    return datasetChoices(datasets || []).find((d) => d.name === name) || null;
  }

  // A parquet upload's columns, to choose the label and the features from, as the spec has them.
  function showColumns(data) {
    const d = chosenUpload();
    labelRow.hidden = featureRow.hidden = !(d && d.format === "parquet" && d.columns && d.columns.length);
    if (labelRow.hidden) return;
    fill(labelColumn, d.columns.map((c) => h("option", { value: c }, c)));
    labelColumn.value = d.columns.includes(data.label_column) ? data.label_column : defaultLabel(d);
    const chosen = new Set(Array.isArray(data.feature_columns) ? data.feature_columns : []);
    fill(
      features,
      d.columns
        .filter((c) => c !== labelColumn.value)
        .map((c) =>
          h("label", { class: "column" }, h("input", { type: "checkbox", value: c, checked: chosen.has(c), onchange: writeFeatures }), ` ${c}`),
        ),
    );
  }

  // "label" is what the upload's check took when no ?label_column= was given.
  const defaultLabel = (d) => (d.columns.includes("label") ? "label" : d.columns[0]);
  const parquetChoice = (d, label) => ({ label_column: label, feature_columns: d.columns.filter((c) => c !== label) });

  function writeFeatures() {
    const ticked = [...features.querySelectorAll("input:checked")].map((i) => i.value);
    edit((doc) => blockMap(doc, "data").set("feature_columns", doc.createNode(ticked, { flow: true })));
  }

  // `key`'s map in the spec (made one when it is not), in block style: a flow map that grows
  // past a line is wrapped by the YAML writer into something nobody would type.
  function blockMap(doc, key) {
    if (!isMap(doc.get(key, true))) doc.set(key, doc.createNode({}));
    const node = doc.get(key, true);
    node.flow = false;
    return node;
  }

  function setData(doc, values) {
    const node = blockMap(doc, "data");
    for (const key of SOURCE_KEYS) node.delete(key);
    for (const [k, v] of Object.entries(values)) node.set(k, v);
  }

  dataset.addEventListener("change", () => {
    const value = dataset.value;
    if (!value) return;
    const d = chosenUpload();
    const ok = edit((doc) => {
      if (value.startsWith("builtin:")) setData(doc, { name: value.slice(8) });
      else if (d && d.format === "parquet" && d.columns?.length) {
        const { label_column, feature_columns } = parquetChoice(d, defaultLabel(d));
        setData(doc, { uri: `${DATASET_PREFIX}${d.name}`, label_column });
        doc.setIn(["data", "feature_columns"], doc.createNode(feature_columns, { flow: true }));
      } else setData(doc, { uri: `${DATASET_PREFIX}${value.slice(7)}` });
    });
    if (ok) sync();
    else dataset.value = "";
  });

  labelColumn.addEventListener("change", () => {
    const d = chosenUpload();
    if (!d) return;
    const { label_column, feature_columns } = parquetChoice(d, labelColumn.value);
    if (edit((doc) => {
      const data = blockMap(doc, "data");
      data.set("label_column", label_column);
      data.set("feature_columns", doc.createNode(feature_columns, { flow: true }));
    })) sync();
  });

  init.addEventListener("change", () => {
    const value = init.value;
    if (!value) return;
    const ok = edit((doc) => {
      if (value === "none") {
        const given = doc.get("model", true);
        if (isMap(given)) given.delete("init");
        return;
      }
      const model = blockMap(doc, "model");
      if (value.startsWith("model:")) model.set("init", doc.createNode({ uri: `${MODEL_PREFIX}${value.slice(6)}` }, { flow: true }));
      else model.set("init", doc.createNode({ job: value.slice(4) }, { flow: true }));
    });
    if (ok) sync();
    else init.value = "";
  });

  // A failed list is a missing part of the page, never a broken one: 404 is a server without
  // the route (then no uploads are offered), anything else says so in the hint.
  const quietly = (promise, onError) => promise.catch((err) => (err instanceof ApiError && err.status === 401 ? null : onError(err)));

  /** Load the lists (the schema gives the built-in names); resolves when all have answered. */
  function load(schemaPromise) {
    return Promise.all([
      schemaPromise.then((s) => {
        builtins = builtinDatasets(s);
      }).catch(() => {}),
      quietly(get("/v1/datasets").then((r) => {
        datasets = r.items;
      }), (err) => {
        datasets = null;
        if (!(err instanceof ApiError && err.status === 404)) console.warn("datasets:", err.message);
      }),
      quietly(get("/v1/models").then((r) => {
        models = r.items;
      }), (err) => console.warn("models:", err.message)),
      quietly(getAll("/v1/jobs", { state: "succeeded" }, { max: MAX_JOBS }).then((items) => {
        jobs = items.slice(0, MAX_JOBS);
      }), (err) => console.warn("jobs:", err.message)),
    ]).then(options);
  }

  options();
  return { element, load, sync };
}
