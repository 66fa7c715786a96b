// The holder's side of a bulk session connection (PEER-PROTOCOL.md, "Bulk sessions"): one peer's
// NarRequests, one after another on one TLS connection, each answered NarError, or NarOk and the
// NAR's bytes unframed. The checks and the per-peer transfer limit are the mesh stream's (the same
// TransferSlots): a session is only a cheaper way to ask.
import type { TLSSocket } from "node:tls";
import { MAX_BULK_FRAME_BYTES } from "../../protocol/bulk-session.js";
import { FrameDecoder, NAR_ERROR, decodeNarRequest, encodeFrame, encodeNarResponseHeader, type NarRequest, type NarResponseHeader } from "../../protocol/peer-codec.js";
import type { Logger } from "../log.js";
import type { LocalStore } from "../store/local-store.js";
import { NarGoneError, primed } from "../source.js";
import { SlotTimeoutError, type TransferSlots } from "./transfer-slots.js";
import { lookup, narError, writeBody } from "./nar-answer.js";

/** A session connection without a request for this long is closed (spec: 30 s; the requester closes at 20). */
export const SESSION_IDLE_MS = 30_000;

export interface SessionServeOptions {
  local: LocalStore;
  log: Logger;
  /** The mesh NAR service's slots: a peer's transfers on sessions and streams count together. */
  slots: TransferSlots;
  slotWaitMs: number;
  stallMs: number;
  idleMs?: number;
  /** The peer's name for logs. */
  name(peerId: string): string;
  /** The body on its way to the peer (compression.encode with identity counts its wire bytes). */
  wire(peerId: string, nar: AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array>;
  /** A NAR body sent whole. */
  onServed?(): void;
}

/** Answers `peerId`'s requests on `socket` until either side closes it. */
export function serveSessionConnection(socket: TLSSocket, peerId: string, o: SessionServeOptions, run: <R>(fn: () => R) => R = (fn) => fn()): void {
  const idleMs = o.idleMs ?? SESSION_IDLE_MS;
  const decoder = new FrameDecoder(MAX_BULK_FRAME_BYTES);
  let busy = false;
  let idle: NodeJS.Timeout | undefined;
  const armIdle = () => {
    clearTimeout(idle);
    idle = setTimeout(() => socket.destroy(), idleMs);
  };
  const close = (why: string) => {
    o.log.debug({ peer: o.name(peerId), why }, "mesh: bulk session connection closed");
    socket.destroy();
  };
  // A requester that resets the connection ends it; the answer under way sees that itself.
  socket.on("error", () => {});
  socket.once("close", () => clearTimeout(idle));
  socket.on("data", (chunk: Buffer) => {
    // A conforming requester sends nothing until the answer is whole: there is no way to tell
    // what such bytes belong to, so the connection ends.
    if (busy) return close("bytes during an answer");
    let req: NarRequest;
    try {
      decoder.push(chunk);
      const frame = decoder.next();
      if (frame === undefined) return;
      if (decoder.buffered > 0) return close("a request before the answer to the last one");
      req = decodeNarRequest(frame, 1);
    } catch (err) {
      return close((err as Error).message);
    }
    busy = true;
    clearTimeout(idle);
    run(() => answer(socket, peerId, req, o)).then(
      () => {
        busy = false;
        if (!socket.destroyed) armIdle();
      },
      (err: Error) => close(err.message),
    );
  });
  armIdle();
}

async function answer(socket: TLSSocket, peerId: string, req: NarRequest, o: SessionServeOptions): Promise<void> {
  const t0 = performance.now();
  const found = await lookup(o.local, req.hashPart, "sha256:" + req.narHash, req.offset, o.log);
  if (!("storePath" in found)) return header(socket, found);
  try {
    await o.slots.acquire(peerId, o.slotWaitMs);
  } catch (err) {
    if (!(err instanceof SlotTimeoutError)) throw err;
    return header(socket, narError(NAR_ERROR.busy, `more than ${o.slots.limit} transfers`));
  }
  try {
    let bytes: AsyncGenerator<Buffer>;
    try {
      // NarOk only once the first bytes are read: a path collected since the lookup is "not-found".
      bytes = await primed(o.local.narStream(found, req.offset, found.narSize));
    } catch (err) {
      if (!(err instanceof NarGoneError)) throw err;
      return header(socket, narError(NAR_ERROR.notFound, "collected since the lookup"));
    }
    try {
      socket.write(headerFrame({ type: "ok", narSize: found.narSize }));
      const sent = await writeBody(socket, o.wire(peerId, bytes), true, o.stallMs);
      // narStream throws rather than end early; this only guards against a bug there.
      if (sent !== found.narSize - req.offset) throw new Error(`sent ${sent} of ${found.narSize - req.offset} NAR bytes`);
    } finally {
      await bytes.return(undefined);
    }
    o.onServed?.();
    o.log.debug({ peer: o.name(peerId), path: found.storePath, offset: req.offset, totalMs: Math.round((performance.now() - t0) * 10) / 10 }, "mesh: NAR served on a bulk session");
  } finally {
    o.slots.release(peerId);
  }
}

function headerFrame(h: NarResponseHeader): Uint8Array {
  return encodeFrame(encodeNarResponseHeader(h), MAX_BULK_FRAME_BYTES);
}

function header(socket: TLSSocket, h: NarResponseHeader): void {
  if (!socket.destroyed) socket.write(headerFrame(h));
}
