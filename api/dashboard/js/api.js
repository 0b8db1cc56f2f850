// The one place that talks to the API. The bearer token lives in sessionStorage (gone when the
// tab closes, never in localStorage, a URL or a log line) and travels only in the Authorization
// header. Server-sent events are read with fetch() streaming because EventSource cannot send
// headers, and putting the token in the query string would leak it into logs and history.

const TOKEN_KEY = "slimtrain.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** An error answer of the API: {error: {code, message, fields?}} plus the HTTP status. */
export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_error";
    this.fields = err.fields || [];
  }
}

// Pages register here to hear that the token was refused (the app shows the login again).
const unauthorizedListeners = new Set();
export function onUnauthorized(fn) {
  unauthorizedListeners.add(fn);
}

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  const t = token.get();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

async function check(response) {
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null; // not JSON (a proxy's error page): the status says enough
  }
  const err = new ApiError(response.status, body);
  if (response.status === 401) unauthorizedListeners.forEach((fn) => fn(err));
  throw err;
}

/** fetch(path) with the token; JSON answers are parsed, others returned as the Response. */
export async function request(path, { method = "GET", body, headers: extra = {}, signal, raw = false } = {}) {
  const init = { method, headers: headers(extra), signal, cache: "no-store" };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await check(await fetch(path, init));
  if (raw) return response;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const get = (path, opts) => request(path, opts);
export const post = (path, body, opts = {}) => request(path, { ...opts, method: "POST", body });

/** Every item of a cursor-paginated list. */
export async function getAll(path, params = {}, { signal, max = 100000 } = {}) {
  const items = [];
  let cursor = null;
  do {
    const q = new URLSearchParams();
    // A list value is a repeated parameter (?state=queued&state=starting), as the API expects.
    for (const [key, value] of Object.entries(params)) [value].flat().forEach((v) => q.append(key, v));
    if (cursor) q.set("cursor", cursor);
    const page = await get(`${path}?${q}`, { signal });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

/** Save an artifact: fetched with the token, handed to the browser as a blob download. */
export async function download(path, filename) {
  const response = await request(path, { raw: true, headers: { Accept: "*/*" } });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/**
 * Follow a server-sent event stream: calls onEvent({id, event, data}) per event and resolves
 * when the server ends the stream (or rejects on a network error / abort).
 */
export async function streamEvents(path, { onEvent, signal, lastEventId = null }) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId !== null) extra["Last-Event-ID"] = String(lastEventId);
  const response = await check(await fetch(path, { headers: headers(extra), signal, cache: "no-store" }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // Lines end in \n, \r\n or \r (the SSE spec); an empty line ends an event.
    let match;
    while ((match = /\r\n|\n|\r/.exec(buffer))) {
      if (match[0] === "\r" && match.index === buffer.length - 1) break; // maybe half of \r\n
      const line = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      if (line === "") {
        if (event.data.length) onEvent({ id: event.id, event: event.event, data: event.data.join("\n") });
        event = { id: event.id, event: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue; // comment: sse-starlette's keep-alive ping
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") event.data.push(val);
      else if (field === "event") event.event = val;
      else if (field === "id") event.id = val;
    }
  }
}
