// Submit: a YAML/JSON editor prefilled from the server's example specs. The API validates; each
// field it refuses is marked on the line where that field is written, with the API's message
// beside it. On success the page moves to the new job. Pickers above the editor (sources.js)
// write the data and the initial weights into the spec from the tenant's uploads and jobs.

import { ApiError, get, post } from "../api.js";
import { h, fill } from "../dom.js";
import { describeField, lineOf, parseSpec } from "../specdoc.js";
import { stringify } from "../../vendor/yaml.esm.js";
import { errorNote } from "./common.js";
import { sourcePickers } from "./sources.js";

export const title = () => "Submit a job";

// Where a spec starts when the server has no examples installed: the three required fields.
const MINIMAL = "name: my-job\nmodel: {name: mlp}\ndata: {name: digits}\n";

export function render(view) {
  let examples = [];
  let schema = null; // the spec's JSON Schema: explains each refused field beside its error
  let marks = []; // [{line, field, message}]
  // One key per intended submission: a double click or a retry after a lost answer cannot
  // create the job twice; editing the spec makes it a new submission.
  let idempotencyKey = crypto.randomUUID();

  const picker = h("select", { id: "example", name: "example" }, h("option", { value: "" }, "Loading examples…"));
  const format = h(
    "select",
    { id: "format", name: "format", "aria-label": "Editor format" },
    h("option", { value: "yaml" }, "YAML"),
    h("option", { value: "json" }, "JSON"),
  );
  const editor = h("textarea", {
    id: "spec-editor",
    name: "spec",
    spellcheck: false,
    wrap: "off",
    autocomplete: "off",
    "aria-describedby": "spec-errors",
    "aria-label": "Job spec",
  });
  const gutter = h("div", { class: "gutter", "aria-hidden": "true" });
  const overlay = h("div", { class: "overlay", "aria-hidden": "true" });
  const errors = h("div", { id: "spec-errors", class: "spec-errors", role: "alert" });
  const submit = h("button", { type: "submit", class: "primary", id: "submit-spec" }, "Submit job");
  const sources = sourcePickers({ edit: editSpec, read: readSpec });
  const form = h(
    "form",
    { class: "submit-form", novalidate: true },
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "example" }, "Start from "),
      picker,
      h("label", { for: "format" }, " as "),
      format,
    ),
    sources.element,
    h("div", { class: "editor" }, gutter, h("div", { class: "editor-main" }, overlay, editor)),
    errors,
    h("div", { class: "actions" }, submit),
  );

  fill(
    view,
    h("div", { class: "page-head" }, h("h1", {}, "Submit a job")),
    h(
      "p",
      { class: "help" },
      "Edit a spec in YAML or JSON; only name, model and data are required. The server checks it and names every field it cannot accept.",
    ),
    form,
  );

  function lines() {
    return editor.value.split("\n");
  }

  // The overlay repeats the text invisibly so marks line up with the textarea's lines.
  function paint() {
    const byLine = new Map();
    for (const m of marks) byLine.set(m.line, [...(byLine.get(m.line) || []), m]);
    const ls = lines();
    fill(
      gutter,
      ls.map((_, i) => h("div", { class: byLine.has(i + 1) ? "bad" : "" }, String(i + 1))),
    );
    fill(
      overlay,
      ls.map((text, i) => {
        const ms = byLine.get(i + 1);
        return h(
          "div",
          { class: ms ? "line bad" : "line" },
          h("span", { class: "ghost" }, text || " "),
          ms ? h("span", { class: "field-error", "data-field": ms.map((m) => m.field).join(" ") }, ms.map((m) => `◀ ${m.field}: ${m.message}`).join("  ")) : null,
        );
      }),
    );
    syncScroll();
  }

  function syncScroll() {
    overlay.style.transform = `translate(${-editor.scrollLeft}px, ${-editor.scrollTop}px)`;
    gutter.scrollTop = editor.scrollTop;
  }

  function setMarks(list, heading) {
    marks = list;
    paint();
    if (!list.length) {
      fill(errors);
      return;
    }
    fill(
      errors,
      h("p", { class: "error" }, heading),
      h(
        "ul",
        {},
        list.map((m) =>
          h(
            "li",
            {},
            h(
              "button",
              { type: "button", class: "link", onclick: () => goToLine(m.line) },
              `line ${m.line}`,
            ),
            " ",
            h("code", {}, m.field),
            `: ${m.message}`,
            describeField(schema, m.field) ? h("span", { class: "field-doc" }, ` — ${describeField(schema, m.field)}`) : null,
          ),
        ),
      ),
    );
  }

  function goToLine(line) {
    const ls = lines();
    const start = ls.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    editor.focus();
    editor.setSelectionRange(start, start + (ls[line - 1] || "").length);
  }

  function load(text) {
    editor.value = text;
    idempotencyKey = crypto.randomUUID();
    setMarks([], "");
    sources.sync();
  }

  function readSpec() {
    const parsed = parseSpec(editor.value);
    return parsed.errors.length ? null : parsed.doc.toJS();
  }

  // A picker's change applied to the spec's document (comments and order kept in YAML).
  function editSpec(change) {
    const parsed = parseSpec(editor.value);
    if (parsed.errors.length) {
      setMarks(parsed.errors, "Fix the syntax before choosing data or weights:");
      return false;
    }
    change(parsed.doc);
    load(format.value === "json" ? `${JSON.stringify(parsed.doc.toJS(), null, 2)}\n` : parsed.doc.toString());
    return true;
  }

  editor.addEventListener("scroll", syncScroll);
  editor.addEventListener("change", () => sources.sync()); // typed edits, once the editor is left
  editor.addEventListener("input", () => {
    idempotencyKey = crypto.randomUUID();
    if (marks.length) setMarks([], ""); // stale once the text changed
    else paint();
  });
  picker.addEventListener("change", () => {
    const ex = examples.find((e) => e.name === picker.value);
    load(ex ? ex.text : MINIMAL);
    format.value = "yaml";
  });
  format.addEventListener("change", () => {
    const parsed = parseSpec(editor.value);
    if (parsed.errors.length) {
      format.value = format.value === "json" ? "yaml" : "json";
      setMarks(parsed.errors, "Fix the syntax before converting.");
      return;
    }
    const data = parsed.doc.toJS();
    load(format.value === "json" ? `${JSON.stringify(data, null, 2)}\n` : stringify(data));
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const parsed = parseSpec(editor.value);
    if (parsed.errors.length) {
      setMarks(parsed.errors, "The spec is not valid YAML or JSON:");
      return;
    }
    submit.disabled = true;
    try {
      const job = await post("/v1/jobs", parsed.doc.toJS(), { headers: { "Idempotency-Key": idempotencyKey } });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (err instanceof ApiError && err.fields.length) {
        const list = err.fields.map((f) => ({ field: f.field, message: f.message, line: lineOf(parsed, f.field) }));
        setMarks(list, `The server refused the spec (${err.code}):`);
        goToLine(list[0].line);
      } else if (err.status !== 401) {
        setMarks([], "");
        fill(errors, errorNote(err));
      }
    } finally {
      submit.disabled = false;
    }
  });

  const schemaLoaded = get("/v1/spec/schema");
  schemaLoaded
    .then((s) => {
      schema = s;
    })
    .catch(() => {}); // only the explanations are missing without it; the API still names the field
  sources.load(schemaLoaded);
  get("/v1/spec/examples")
    .then((res) => {
      examples = res.items;
      fill(
        picker,
        examples.map((e) => h("option", { value: e.name }, e.title ? `${e.name} — ${e.title}` : e.name)),
        h("option", { value: "" }, "only the required fields"),
      );
      const first = examples.find((e) => e.name === "digits-gmp90") || examples[0];
      picker.value = first ? first.name : "";
      load(first ? first.text : MINIMAL);
    })
    .catch((err) => {
      if (err.status === 401) return;
      fill(picker, h("option", { value: "" }, "only the required fields"));
      load(MINIMAL);
      errors.append(errorNote(err));
    });
  load("");
  return null;
}
