// When to dial a fleet peer again after failed dials: capped exponential backoff with jitter, so
// a fleet does not redial a dead host in step, nor hammer it.
//
// The cap bounds how long a healed partition goes unnoticed: a dial into the dead link fails at
// its deadline (5 s), then the next waits up to the cap (+25 %). With 10 s that is 17.5 s at
// worst, so reconnect and summary resume fit in 25 s after any partition length (with the former
// 60 s cap a heal could wait 45-75 s). The cost is one TCP dial per dead peer every ~10 s.
// libp2p's own reconnect queue (KEEP_ALIVE tags) is not used: it gives up after a fixed number of
// retries and drops the tag, and a fleet peer must be redialed however long it is away.

/** Deadline of one dial (a dial into a dead link fails only at this deadline). */
export const DIAL_TIMEOUT_MS = 5_000;

/** Longest wait between two dials of a known fleet peer. */
export const MAX_REDIAL_MS = 10_000;

/**
 * Longest wait between two blind dials of a Tailscale host (no peer ID known yet): most hosts on a
 * tailnet are not fleet members, so these back off further.
 */
export const MAX_BLIND_REDIAL_MS = 60_000;

/**
 * Delay before the next dial after `failures` failed ones: `baseMs` doubled per failure up to
 * `maxMs`, then ±25 % (`random` in [0, 1), for tests).
 */
export function redialDelay(failures: number, baseMs: number, maxMs = MAX_REDIAL_MS, random: () => number = Math.random): number {
  const delay = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(failures, 1) - 1, 30));
  return Math.round(delay * (0.75 + random() * 0.5));
}
