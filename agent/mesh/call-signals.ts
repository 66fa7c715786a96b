// Deadlines for a component's background calls (dials, peer exchanges) that its stop() cancels
// too. The obvious `AbortSignal.any([stop.signal, AbortSignal.timeout(ms)])` per call records
// every call's signal on the long-lived stop signal, and Node keeps memory for each even after
// it is collected (Node 24.22: 13-36 bytes a call, about 350 when calls come back to back;
// FAULTS.md, soak): a daemon that redials for months grows. Here nothing long-lived refers to a
// call once its deadline has passed or it was aborted.
export class CallSignals {
  /** Calls still within their deadline: what abortAll() reaches. */
  readonly #live = new Set<AbortController>();

  /** A signal that aborts after `ms` (a TimeoutError, as AbortSignal.timeout), or on abortAll(). */
  signal(ms: number): AbortSignal {
    const c = new AbortController();
    const timer = setTimeout(() => c.abort(new DOMException("The operation was aborted due to timeout", "TimeoutError")), ms);
    timer.unref(); // as AbortSignal.timeout: a deadline alone keeps no process alive
    this.#live.add(c);
    c.signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        this.#live.delete(c);
      },
      { once: true },
    );
    return c.signal;
  }

  /** Aborts every call still within its deadline. */
  abortAll(reason: Error): void {
    for (const c of [...this.#live]) c.abort(reason);
  }

  /** Calls within their deadline (for tests). */
  get live(): number {
    return this.#live.size;
  }
}
