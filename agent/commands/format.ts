// Human-readable numbers for the operator commands.

export function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.round(seconds % 60)} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

/** "3 s ago" for a time given as ms since the epoch or an ISO string. */
export function formatAgo(when: unknown, now = Date.now()): string | undefined {
  const t = typeof when === "number" ? when : typeof when === "string" ? Date.parse(when) : NaN;
  if (!Number.isFinite(t)) return undefined;
  return `${formatDuration(Math.max(0, (now - t) / 1000))} ago`;
}
