// Where a field of a spec is written: the API names bad fields by path ("train.lr",
// "compression.pruning.end_step", "(body)"); this finds the line of that key in the YAML or JSON
// text the user typed, so the error can be shown next to it.

import { LineCounter, isMap, isPair, isScalar, isSeq, parseDocument } from "../vendor/yaml.esm.js";

/** Parse YAML or JSON (JSON is read as YAML 1.2, which keeps positions for both). */
export function parseSpec(text) {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const errors = doc.errors.map((e) => ({
    field: "(syntax)",
    message: e.message.split("\n")[0],
    line: lineCounter.linePos(e.pos[0]).line,
  }));
  return { doc, lineCounter, errors };
}

/** The 1-based line where the deepest existing part of `path` is written (1 when none is). */
export function lineOf(parsed, field) {
  const { doc, lineCounter } = parsed;
  const parts = String(field).split(".").filter((p) => p && !p.startsWith("("));
  let node = doc.contents;
  let offset = node && node.range ? node.range[0] : 0;
  for (const part of parts) {
    if (isMap(node)) {
      const pair = node.items.find((it) => isPair(it) && isScalar(it.key) && String(it.key.value) === part);
      if (!pair) break;
      offset = pair.key.range ? pair.key.range[0] : offset;
      node = pair.value;
    } else if (isSeq(node) && /^\d+$/.test(part) && node.items[Number(part)]) {
      node = node.items[Number(part)];
      offset = node.range ? node.range[0] : offset;
    } else {
      break;
    }
  }
  return lineCounter.linePos(offset).line;
}

/** The JSON Schema node of a field path ("train.lr"), following $ref and nullable anyOf. */
function schemaNode(schema, field) {
  const deref = (node) => {
    for (let i = 0; node && i < 8; i += 1) {
      if (node.$ref) node = schema.$defs?.[node.$ref.split("/").pop()];
      else if (node.anyOf) node = node.anyOf.find((n) => n.type !== "null") ?? null;
      else break;
    }
    return node;
  };
  let node = deref(schema);
  for (const part of String(field).split(".")) {
    if (!node || part.startsWith("(")) return null;
    node = deref(node.properties?.[part] ?? (node.items && /^\d+$/.test(part) ? node.items : null));
  }
  return node;
}

/** What the spec's schema says of a field: its description, default and allowed values. */
export function describeField(schema, field) {
  const node = schema && schemaNode(schema, field);
  if (!node || node === schema) return "";
  const parts = [];
  if (node.description) parts.push(node.description);
  if (node.enum) parts.push(`allowed: ${node.enum.join(", ")}`);
  if (node.default !== undefined && node.default !== null && typeof node.default !== "object") {
    parts.push(`default: ${node.default}`);
  }
  return parts.join(" · ");
}
