// A limit on concurrent NAR transfers per peer, with a first-come first-served queue. The NAR
// service answers "busy" past its limit (8 per requesting peer), and Nix opens many downloads at
// once (up to http-connections, 25), so both ends keep to the limit: the requester waits here for
// a slot on a holder instead of being refused, and the responder waits briefly before saying busy.

export class SlotTimeoutError extends Error {
  override name = "SlotTimeoutError";
}

interface Waiter {
  grant: () => void;
}

export class TransferSlots {
  readonly #used = new Map<string, number>();
  readonly #queues = new Map<string, Waiter[]>();
  #total = 0;

  constructor(readonly limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`invalid transfer limit ${limit}`);
  }

  inUse(peer: string): number {
    return this.#used.get(peer) ?? 0;
  }

  /** Slots in use on all peers together: transfers under way. */
  get total(): number {
    return this.#total;
  }

  /** Requests waiting for a slot on `peer`. */
  waiting(peer: string): number {
    return this.#queues.get(peer)?.length ?? 0;
  }

  /** Whether a slot is free now and nobody is queued ahead. */
  hasRoom(peer: string): boolean {
    return this.inUse(peer) < this.limit && this.waiting(peer) === 0;
  }

  tryAcquire(peer: string): boolean {
    if (!this.hasRoom(peer)) return false;
    this.#used.set(peer, this.inUse(peer) + 1);
    this.#total++;
    return true;
  }

  /**
   * A slot on `peer`, in arrival order. Rejects with SlotTimeoutError after `timeoutMs`, or with
   * the signal's reason when it aborts; either way the place in the queue is given up.
   */
  acquire(peer: string, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    if (this.tryAcquire(peer)) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const queue = this.#queues.get(peer) ?? [];
      this.#queues.set(peer, queue);
      const leave = (err: Error) => {
        const i = queue.indexOf(waiter);
        if (i < 0) return; // already granted
        queue.splice(i, 1);
        if (queue.length === 0) this.#queues.delete(peer);
        cleanup();
        reject(err);
      };
      const onAbort = () => leave(signal!.reason instanceof Error ? signal!.reason : new Error("aborted"));
      const timer = setTimeout(() => leave(new SlotTimeoutError(`waited ${timeoutMs} ms for a transfer slot`)), timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      };
      const waiter: Waiter = {
        grant: () => {
          cleanup();
          resolve();
        },
      };
      if (signal?.aborted) return reject(signal.reason instanceof Error ? signal.reason : new Error("aborted"));
      signal?.addEventListener("abort", onAbort, { once: true });
      queue.push(waiter);
    });
  }

  /** Frees a slot; the longest waiter for this peer gets it. */
  release(peer: string): void {
    const queue = this.#queues.get(peer);
    const next = queue?.shift();
    if (queue && queue.length === 0) this.#queues.delete(peer);
    if (next) return next.grant(); // the slot passes on: the count stays
    const n = this.inUse(peer) - 1;
    if (n < 0) return;
    this.#total--;
    if (n === 0) this.#used.delete(peer);
    else this.#used.set(peer, n);
  }
}
