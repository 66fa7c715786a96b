// Sending a region of a store file to an HTTP client with sendfile(2): the bytes go from the page
// cache to the socket without passing through the agent's memory (nginx does the same; the
// pooled read-then-write costs two copies per byte, about 60 % of the agent's CPU on a NAR).
// The native addon (native/sendfile.c, built by node-gyp at `npm ci`) is optional: without it,
// or with it switched off, regions are read into pooled buffers and written as before.
//
// libuv owns the socket and keeps it non-blocking, so sendfile(2) sends what fits in the socket's
// buffer and returns. The rules that keep the bytes in order and memory bounded:
//  - sendfile is called only when nothing of Node's is queued on the socket: the callback of the
//    response's last write has run (so the headers and the framing before the region are in the
//    kernel), and no other write is made while it runs;
//  - a partial count (or EAGAIN) means the socket's buffer is full: the next small piece is read
//    into a pooled buffer (by the addon, on the same pool thread, right after the sendfile) and
//    written the ordinary way, and sendfile resumes in that write's callback, when libuv has
//    found the socket writable again. A slow client so holds one small buffer at most, as with
//    pooled reads;
//  - a count of 0 with no error is the file's end before the region's: it shrank; the caller
//    destroys the socket, so the client sees a short body.
import { createRequire } from "node:module";
import type { ServerResponse } from "node:http";
import type { Socket } from "node:net";
import type { FileRegion } from "../store/nar-dump.js";
import { narBuffers } from "../buffer-pool.js";

/** The addon's one function (native/sendfile.c). */
export interface SendfileBinding {
  sendfile(outFd: number, inFd: number, offset: number, length: number, cb: (err: NodeJS.ErrnoException | null, sent: number) => void): void;
  /** With `piece`: when the socket filled up, the next bytes are read into it too (pieceBytes of them). */
  sendfile(outFd: number, inFd: number, offset: number, length: number, piece: Buffer, cb: (err: NodeJS.ErrnoException | null, sent: number, pieceBytes: number) => void): void;
}

/**
 * Regions smaller than this are read like any other bytes. A region costs a sendfile call, the
 * wait for earlier writes and an fstat after it (each a trip to the thread pool): for NARs of 400
 * files of one size, sendfile cost more CPU per GB than pooled reads at 16 and 32 KiB, about
 * the same at 64 and 128 KiB, less from 256 KiB (BENCHMARKS.md, "NAR: sendfile").
 */
export const REGION_MIN = 128 << 10;
/** Bytes written the ordinary way while waiting for a full socket buffer to drain. */
const PIECE = 64 << 10;
/** At most this much per sendfile call, so that progress (metrics, timeouts) is seen often. */
const MAX_CALL = 16 << 20;

/** Where the addon is, from dist/agent/http/ (and from agent/http/ under ts-node-like loaders). */
const ADDON = new URL("../../../build/Release/sendfile.node", import.meta.url);

/** Loads the addon; undefined (and why) when it was not built or cannot be loaded here. */
export function loadSendfile(): { binding: SendfileBinding; why?: undefined } | { binding?: undefined; why: string } {
  if (process.platform !== "linux" && process.platform !== "darwin") return { why: `no sendfile to sockets on ${process.platform}` };
  try {
    const binding = createRequire(import.meta.url)(ADDON.pathname) as SendfileBinding;
    if (typeof binding.sendfile !== "function") return { why: `${ADDON.pathname} has no sendfile function` };
    return { binding };
  } catch (e) {
    return { why: `the sendfile addon could not be loaded (${(e as Error).message.split("\n")[0]}); build it with npm ci or npx node-gyp rebuild` };
  }
}

/** The socket's file descriptor, when it is a plain TCP or Unix socket libuv owns; else -1. */
function socketFd(socket: Socket): number {
  const fd = (socket as Socket & { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : -1;
}

function prematureClose(): Error {
  return Object.assign(new Error("the client closed the connection"), { code: "ERR_STREAM_PREMATURE_CLOSE" });
}

/**
 * Writes `buf` to the response and resolves once its write callback has run (the bytes are in
 * the kernel, or dropped) or the socket closed. The buffer goes back to the pool in that callback.
 */
export function writeAndWait(res: ServerResponse, buf: Buffer): Promise<void> {
  return new Promise((resolve) => {
    const socket = res.socket;
    const done = (): void => {
      socket?.off("close", done);
      resolve();
    };
    socket?.on("close", done);
    res.write(buf, () => {
      narBuffers.release(buf);
      done();
    });
  });
}

/**
 * Sends `region` on `res`'s socket. The caller has waited for the callback of its last write.
 * Resolves when every byte is sent; throws ERR_STREAM_PREMATURE_CLOSE if the client left, or an
 * error if the file changed. `count` is told of bytes as they go.
 */
export async function sendRegion(
  binding: SendfileBinding | undefined, res: ServerResponse, region: FileRegion, count?: (n: number) => void,
): Promise<void> {
  let off = region.offset;
  let left = region.length;
  const socket = res.socket;
  while (left > 0) {
    if (!socket || socket.destroyed || res.destroyed) throw prematureClose();
    const fd = binding ? socketFd(socket) : -1;
    let full = true; // the socket's buffer is full: write the next piece the ordinary way
    let buf: Buffer | undefined; // that piece, if the addon has read it already
    let got = 0;
    if (fd >= 0) {
      const want = Math.min(left, MAX_CALL);
      buf = narBuffers.acquire(PIECE);
      const { err, sent, pieceBytes } = await call(binding!, fd, region.fh.fd, off, want, buf);
      got = pieceBytes;
      if (sent > 0) {
        off += sent;
        left -= sent;
        count?.(sent);
        // sendfile bypasses the socket's own activity tracking: restart its idle timer, if any.
        if (socket.timeout) socket.setTimeout(socket.timeout);
      }
      const fail = (e: Error): Error => {
        narBuffers.release(buf!);
        return e;
      };
      if (err) {
        if (err.code === "EPIPE" || err.code === "ECONNRESET") throw fail(prematureClose());
        // Out of descriptors for the dup(): this piece goes the ordinary way, the next tries again.
        if (err.code === "EMFILE" || err.code === "ENFILE") full = true;
        else if (err.code !== "EAGAIN") {
          // ENOSYS, EINVAL (a file system without sendfile support), ...: send it the ordinary way.
          if (sent === 0 && (err.code === "ENOSYS" || err.code === "EINVAL" || err.code === "ENOTSOCK")) binding = undefined;
          else throw fail(err);
        }
      } else if (sent === 0) {
        throw fail(new Error(`${region.path.toString()} shrank while being sent`));
      } else {
        full = sent < want;
      }
    }
    if (!(left > 0 && full) || socket.destroyed || res.destroyed) {
      if (buf) narBuffers.release(buf);
      continue; // the loop's first check throws when the client left
    }
    {
      const n = Math.min(PIECE, left);
      buf ??= narBuffers.acquire(n);
      if (got > n) got = 0; // not expected: read it again
      try {
        while (got < n) {
          const { bytesRead } = await region.fh.read(buf, got, n - got, off + got);
          if (bytesRead === 0) throw new Error(`${region.path.toString()} shrank while being sent`);
          got += bytesRead;
        }
      } catch (e) {
        narBuffers.release(buf);
        throw e;
      }
      await writeAndWait(res, buf.subarray(0, n));
      off += n;
      left -= n;
      count?.(n);
    }
  }
}

function call(binding: SendfileBinding, outFd: number, inFd: number, off: number, len: number, piece: Buffer): Promise<{ err: NodeJS.ErrnoException | null; sent: number; pieceBytes: number }> {
  return new Promise((resolve) => {
    try {
      binding.sendfile(outFd, inFd, off, len, piece, (err, sent, pieceBytes) => resolve({ err, sent, pieceBytes }));
    } catch (e) {
      // The addon could not dup() the descriptors (EMFILE, ENFILE): nothing was sent.
      resolve({ err: e as NodeJS.ErrnoException, sent: 0, pieceBytes: 0 });
    }
  });
}
