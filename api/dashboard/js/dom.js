// Building the page without innerHTML: every string a job or the API provides becomes a text
// node, so a job named `<img onerror=...>` is shown, never run.

/** h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", childNode, [more]) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" || (key in el && typeof value !== "string")) {
      el[key] = value; // properties: a textarea's value, checked, disabled, hidden
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's content. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A table from column definitions [{label, cell(row) -> node|string, class}]. */
export function table(columns, rows, { caption, empty = "Nothing here yet." } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.label)));
  const body = rows.length
    ? rows.map((r) => h("tr", {}, columns.map((c) => h("td", { class: c.class, "data-label": c.label }, c.cell(r)))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty))];
  return h(
    "div",
    { class: "table-wrap" },
    h("table", {}, caption ? h("caption", {}, caption) : null, h("thead", {}, head), h("tbody", {}, body)),
  );
}

/** A definition list of [label, value] pairs, skipping missing values. */
export function facts(pairs) {
  const items = pairs.filter(([, v]) => v !== undefined && v !== null && v !== "");
  return h("dl", { class: "facts" }, items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

export function section(title, ...children) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...children);
}
