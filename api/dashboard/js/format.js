// Number and time formatting shared by the pages; missing values show as an en dash.

const DASH = "–";

export function num(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return DASH;
  if (Number.isInteger(v) || Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en");
  const s = Number(v).toPrecision(digits);
  // Trailing zeros go only after a decimal point: 0.0500 -> 0.05, 1.50e-7 -> 1.5e-7.
  if (s.includes("e")) return s.replace(/\.?0+e/, "e");
  return s.includes(".") ? s.replace(/\.?0+$/, "") : s;
}

export function pct(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return DASH;
  return `${(v * 100).toFixed(digits)}%`;
}

export function bytes(v) {
  if (v === null || v === undefined) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

export function ratio(v) {
  return v === null || v === undefined ? DASH : `${num(v, 3)}×`;
}

export function ms(v) {
  return v === null || v === undefined ? DASH : `${num(v, 3)} ms`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return DASH;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

/** Seconds since an ISO timestamp. */
export function since(iso, now = Date.now()) {
  return iso ? (now - Date.parse(iso)) / 1000 : null;
}

export function when(iso) {
  if (!iso) return DASH;
  const d = new Date(iso);
  return d.toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "medium" });
}
