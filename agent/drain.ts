// Waiting out a writable's backpressure without hanging on a peer that went away.
import type { EventEmitter } from "node:events";

/** Resolves on the writable's next 'drain', or on 'close' (a drain never comes after that). */
export function drainOrClose(writable: EventEmitter): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      writable.off("drain", done);
      writable.off("close", done);
      resolve();
    };
    writable.on("drain", done);
    writable.on("close", done);
  });
}
