// When to dial a fleet peer again after failed dials: capped exponential backoff with jitter, so
// a fleet does not redial a dead host in step, nor hammer it; and the schedule that does the
// dialing (for known peers: peer-manager.ts; for addresses without a peer ID: address-probes.ts).
//
// The cap bounds how long a healed partition goes unnoticed: a dial into the dead link fails at
// its deadline (5 s), then the next waits up to the cap (+25 %). With 10 s that is 17.5 s at
// worst, so reconnect and summary resume fit in 25 s after any partition length (with the former
// 60 s cap a heal could wait 45-75 s). The cost is one TCP dial per dead peer every ~10 s.
// libp2p's own reconnect queue (KEEP_ALIVE tags) is not used: it gives up after a fixed number of
// retries and drops the tag, and a fleet peer must be redialed however long it is away.

import { CallSignals } from "./call-signals.js";

/** Deadline of one dial (a dial into a dead link fails only at this deadline). */
export const DIAL_TIMEOUT_MS = 5_000;

/** Longest wait between two dials of a known fleet peer. */
export const MAX_REDIAL_MS = 10_000;

/**
 * Longest wait between two dials of a fleet peer in the first 30 s after it dropped: an agent
 * restarting is back in 2-5 s, and lookups of paths only it holds wait for it (fleet-table.ts).
 */
export const MAX_QUICK_REDIAL_MS = 2_000;
/** How long after a drop redials stay quick. */
export const QUICK_REDIAL_WINDOW_MS = 30_000;

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

/** Something the schedule dials: its state, kept by its owner. */
export interface Dialable {
  dialing: boolean;
  /** Failed dials since the last success. */
  failures: number;
  /** When the next dial is due (ms since the epoch); undefined: now. */
  nextDialAt?: number;
}

export interface DialScheduleOptions<T extends Dialable> {
  /** Everything that may need dialing. */
  items: () => Iterable<T>;
  /** Whether `item` needs a dial at all (not connected, not resolved). */
  wanted: (item: T) => boolean;
  /** One dial; throws if it failed. Success bookkeeping is the caller's. */
  dial: (item: T, signal: AbortSignal) => Promise<void>;
  /** Told of each failed dial (after the backoff is set). */
  failed?: (item: T, err: unknown) => void;
  /** First redial delay (default 1 s); it doubles per failure up to maxMs. */
  baseMs?: number;
  /** The backoff's cap, fixed or per item. */
  maxMs?: number | ((item: T) => number);
  timeoutMs?: number;
}

/**
 * Dials whatever is due, each with a deadline, and sets the next dial after a failure by the
 * backoff above; one timer wakes it for the next due dial. Nothing blocks a caller.
 */
export class DialSchedule<T extends Dialable> {
  readonly #o: DialScheduleOptions<T>;
  #stop = new AbortController();
  #running = false;
  #timer: NodeJS.Timeout | undefined;
  #timerAt = Infinity;
  /** Each dial's deadline, aborted by stop() too (no AbortSignal.any per dial: call-signals.ts). */
  readonly #calls = new CallSignals();

  constructor(opts: DialScheduleOptions<T>) {
    this.#o = opts;
  }

  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#stop = new AbortController();
    this.kick();
  }

  stop(): void {
    this.#running = false;
    this.#stop.abort(new Error("dialing stopped"));
    this.#calls.abortAll(new Error("dialing stopped"));
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#timerAt = Infinity;
  }

  /** Starts due dials and arms the timer for the next one. */
  kick(): void {
    if (!this.#running) return;
    const now = Date.now();
    let next = Infinity;
    for (const item of this.#o.items()) {
      if (item.dialing || !this.#o.wanted(item)) continue;
      const at = item.nextDialAt ?? now;
      if (at <= now) void this.#dial(item);
      else next = Math.min(next, at);
    }
    if (next < this.#timerAt) {
      clearTimeout(this.#timer);
      this.#timerAt = next;
      this.#timer = setTimeout(() => {
        this.#timerAt = Infinity;
        this.kick();
      }, Math.max(0, next - now));
      this.#timer.unref();
    }
  }

  async #dial(item: T): Promise<void> {
    item.dialing = true;
    const stop = this.#stop.signal;
    try {
      await this.#o.dial(item, this.#calls.signal(this.#o.timeoutMs ?? DIAL_TIMEOUT_MS));
    } catch (err) {
      if (stop.aborted) return;
      item.failures++;
      const max = typeof this.#o.maxMs === "function" ? this.#o.maxMs(item) : (this.#o.maxMs ?? MAX_REDIAL_MS);
      item.nextDialAt = Date.now() + redialDelay(item.failures, this.#o.baseMs ?? 1000, max);
      this.#o.failed?.(item, err);
    } finally {
      item.dialing = false;
      this.kick();
    }
  }
}
