// HTTP Range (RFC 9110 section 14) for one byte range of a body of known size.

export type RangeResult =
  | { kind: "full" }
  | { kind: "partial"; start: number; end: number /* exclusive */ }
  | { kind: "unsatisfiable" };

/**
 * Interprets a Range header for a body of `size` bytes. Forms other than a single byte range
 * (multiple ranges, other units, garbage) are ignored and the full body is sent, as the RFC allows.
 */
export function parseRange(header: string | undefined, size: number): RangeResult {
  if (header === undefined) return { kind: "full" };
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "") || header.length > 100) return { kind: "full" };
  if (m[1] === "") {
    // Suffix range: the last N bytes.
    const n = Number(m[2]);
    if (n === 0 || size === 0) return { kind: "unsatisfiable" };
    return { kind: "partial", start: Math.max(0, size - n), end: size };
  }
  const start = Number(m[1]);
  const last = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size) return { kind: "unsatisfiable" };
  if (m[2] !== "" && Number(m[2]) < start) return { kind: "full" }; // invalid: last < first
  return { kind: "partial", start, end: last + 1 };
}
