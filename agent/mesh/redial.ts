// When to dial a fleet peer again after failed dials: capped exponential backoff with jitter, so
// a fleet does not redial a dead host in step, nor hammer it.

/** Deadline of one dial (a dial into a dead link fails only at this deadline). */
export const DIAL_TIMEOUT_MS = 5_000;

/** Longest wait between two dials of a known fleet peer. */
export const MAX_REDIAL_MS = 60_000;

/**
 * Delay before the next dial after `failures` failed ones: `baseMs` doubled per failure up to
 * `maxMs`, then ±25 % (`random` in [0, 1), for tests).
 */
export function redialDelay(failures: number, baseMs: number, maxMs = MAX_REDIAL_MS, random: () => number = Math.random): number {
  const delay = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(failures, 1) - 1, 30));
  return Math.round(delay * (0.75 + random() * 0.5));
}
