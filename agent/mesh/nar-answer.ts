// What a NAR request from a peer is answered with, whichever way it came (a mesh stream, or a
// bulk session connection): the store lookup and its errors, and a body's writes to a TLS
// connection with their stall watchdog.
import type { TLSSocket } from "node:tls";
import type { NarResponseHeader } from "../../protocol/peer-codec.js";
import { NAR_ERROR } from "../../protocol/peer-codec.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Logger } from "../log.js";
import type { LocalStore } from "../store/local-store.js";
import { narBuffers } from "../buffer-pool.js";
import { drainOrClose } from "../drain.js";

export async function lookup(local: LocalStore, hashPart: string, narHash: string, offset: number, log: Logger): Promise<PathInfo | NarResponseHeader> {
  let info: PathInfo | undefined;
  try {
    info = await local.pathInfo(hashPart);
  } catch (err) {
    log.warn({ hashPart, err: (err as Error).message }, "mesh: store lookup failed");
    return narError(NAR_ERROR.internal, "store lookup failed");
  }
  // The NAR hash pins the content: a path rebuilt with other bytes is not the NAR asked for.
  if (!info || info.narHash !== narHash) return narError(NAR_ERROR.notFound, "no such path with that NAR hash");
  if (offset > info.narSize) return narError(NAR_ERROR.badOffset, `offset ${offset} beyond NAR size ${info.narSize}`);
  return info;
}

export function narError(code: number, message: string): NarResponseHeader {
  return { type: "error", code, message };
}

/** Fires its signal when nothing passes through feed() for `ms` (a reader that stopped taking). */
export class Watchdog {
  readonly #ctl = new AbortController();
  #timer: NodeJS.Timeout | undefined;
  constructor(
    readonly ms: number,
    readonly reason: string,
  ) {
    this.#arm();
  }
  get signal(): AbortSignal {
    return this.#ctl.signal;
  }
  async *feed<T>(source: AsyncIterable<T>): AsyncGenerator<T> {
    // writeAll asks for the next chunk only once the previous one is sent: that is progress.
    for await (const item of source) {
      this.#arm();
      yield item;
    }
  }
  stop(): void {
    clearTimeout(this.#timer);
  }
  #arm(): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#ctl.abort(new Error(this.reason)), this.ms);
  }
}


/**
 * Writes a NAR body to a bulk connection; returns the bytes written. `pooled`: the chunks are
 * the store's reads, each back to the pool in its write's callback (libuv holds it until then:
 * buffer-pool.ts). Throws if the connection closes or its reader takes nothing for `stallMs`
 * (the socket is destroyed then).
 */
export async function writeBody(socket: TLSSocket, chunks: AsyncIterable<Uint8Array>, pooled: boolean, stallMs: number): Promise<number> {
  // A requester that goes away mid-body resets the connection: an error to end on, not to throw.
  let failure: Error | undefined;
  const onError = (err: Error) => (failure ??= err);
  socket.on("error", onError);
  const watchdog = new Watchdog(stallMs, `no progress for ${stallMs} ms`);
  const abort = () => socket.destroy(watchdog.signal.reason as Error);
  watchdog.signal.addEventListener("abort", abort);
  let n = 0;
  try {
    for await (const chunk of watchdog.feed(chunks)) {
      if (socket.destroyed) throw failure ?? new Error("bulk connection closed");
      const written = pooled ? socket.write(chunk, () => narBuffers.release(chunk as Buffer)) : socket.write(chunk);
      n += chunk.length;
      if (!written) await drainOrClose(socket);
    }
    if (socket.destroyed) throw failure ?? new Error("bulk connection closed");
    return n;
  } finally {
    watchdog.stop();
    watchdog.signal.removeEventListener("abort", abort);
    socket.off("error", onError);
  }
}
