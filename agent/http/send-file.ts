// Sending a region of a store file to an HTTP client with sendfile(2): the bytes go from the page
// cache to the socket without passing through the agent's memory (nginx does the same; the
// pooled read-then-write costs two copies per byte, about 60 % of the agent's CPU on a NAR).
// The native addon (native/sendfile.c, built by node-gyp at `npm ci`) is optional: without it,
// or with it switched off, regions are read into pooled buffers and written as before.
//
// libuv owns the socket and keeps it non-blocking, so sendfile(2) sends what fits in the socket's
// buffer and returns. As nginx does: send until the socket is full, then wait for it to be
// writable, and again. The rules that keep the bytes in order, the event loop free and memory
// bounded:
//  - sendfile is called only when nothing of Node's is queued on the socket: the callback of the
//    response's last write has run (so the headers and the framing before the region are in the
//    kernel), and no other write is made until the region is sent;
//  - on the event loop itself (sendfileNow) only when the addon has found the bytes in the page
//    cache: nothing to wait for. Else on libuv's thread pool, where a disk read may block;
//  - a partial count (or EAGAIN) means the socket's buffer is full: the addon's poll handle says
//    when it can take more (one poll per region; no bytes moved, no thread woken), and sendfile
//    resumes.
//    A slow client holds no buffer at all. Where the socket has an idle timeout (socket.timeout,
//    which node:http does not set for a response in progress) the wait is a 64 KiB piece written
//    the ordinary way instead, so that Node sees the client take bytes;
//  - a count of 0 with no error is the file's end before the region's: it shrank; the caller
//    destroys the socket, so the client sees a short body.
import { createRequire } from "node:module";
import { constants as osConstants } from "node:os";
import type { ServerResponse } from "node:http";
import type { Socket } from "node:net";
import type { FileRegion } from "../store/nar-dump.js";
import { narBuffers } from "../buffer-pool.js";

/** The addon's functions (native/sendfile.c). */
export interface SendfileBinding {
  /** One sendfile on libuv's thread pool. */
  sendfile(outFd: number, inFd: number, offset: number, length: number, cb: (err: NodeJS.ErrnoException | null, sent: number) => void): void;
  /** With `piece`: when the socket filled up, the next bytes are read into it too (pieceBytes of them). */
  sendfile(outFd: number, inFd: number, offset: number, length: number, piece: Buffer, cb: (err: NodeJS.ErrnoException | null, sent: number, pieceBytes: number) => void): void;
  /**
   * One sendfile on this thread if the bytes (up to 8 MiB of them) are in the page cache: the
   * count sent, or -errno; -ENODATA (nothing sent) when they are not. Older builds lack it.
   */
  sendfileNow?(outFd: number, inFd: number, offset: number, length: number): number;
  /** A poll for the socket's writability (on a dup of fd): while started, `cb` whenever it can take bytes. */
  pollOpen?(fd: number, cb: (status: number, sent: number) => void): PollHandle;
  /**
   * sendfileNow at each writability, in the addon, until `length` bytes are sent (cb status 0),
   * the next are not cached (-ENODATA), the file ended (0, fewer sent) or an error (-errno).
   * Returns 0, or an error (nothing started).
   */
  pollSend?(handle: PollHandle, inFd: number, offset: number, length: number): number;
  /** 0, or a negative libuv error. */
  pollStart?(handle: PollHandle): number;
  pollStop?(handle: PollHandle): void;
  /** Closes the poll and its dup; idempotent. */
  pollClose?(handle: PollHandle): void;
}

/** The addon's poll handle. */
export type PollHandle = { readonly __poll: unique symbol };

const ENODATA = -(osConstants.errno.ENODATA ?? 61);
const EPIPE = osConstants.errno.EPIPE;
const ECONNRESET = osConstants.errno.ECONNRESET;

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
/** At most this much per sendfileNow call (the addon's NOW_MAX). */
const NOW_MAX = 8 << 20;

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

/** What one sendfile did: the bytes sent; `full` when the socket's buffer filled up. */
interface Sent {
  sent: number;
  full: boolean;
  err?: NodeJS.ErrnoException | null;
  /** Bytes after those sent read into `piece` by the pool call (0 if none). */
  pieceBytes: number;
}

/**
 * Sends `region` on `res`'s socket. The caller has waited for the callback of its last write.
 * Resolves when every byte is sent; throws ERR_STREAM_PREMATURE_CLOSE if the client left, or an
 * error if the file changed. `count` is told of bytes as they go.
 */
export async function sendRegion(
  binding: SendfileBinding | undefined, res: ServerResponse, region: FileRegion, count?: (n: number) => void,
): Promise<void> {
  const socket = res.socket;
  let poll: Writability | undefined;
  try {
    await send(binding, res, region, count, () => (poll ??= Writability.open(binding, socket)));
  } finally {
    poll?.close();
  }
}

async function send(
  binding: SendfileBinding | undefined, res: ServerResponse, region: FileRegion, count: ((n: number) => void) | undefined,
  writability: () => Writability | undefined,
): Promise<void> {
  let off = region.offset;
  let left = region.length;
  const socket = res.socket;
  while (left > 0) {
    if (!socket || socket.destroyed || res.destroyed) throw prematureClose();
    const fd = binding ? socketFd(socket) : -1;
    // Waiting the addon's way needs its poll, and no idle timeout on the socket (above).
    const poll = fd >= 0 && !socket.timeout ? writability() : undefined;
    let full = true; // the socket's buffer is full: wait, or write the next piece the ordinary way
    let buf: Buffer | undefined; // that piece, if the addon has read it already
    let got = 0;
    if (fd >= 0) {
      const want = Math.min(left, MAX_CALL);
      const now = binding!.sendfileNow?.(fd, region.fh.fd, off, want) ?? ENODATA;
      let r: Sent;
      if (now === ENODATA) {
        // Not all in the page cache (or an old addon): on the pool, where a disk read may block.
        // The poll is stopped meanwhile: the socket may be writable all that time.
        poll?.pause();
        if (!poll) buf = narBuffers.acquire(PIECE);
        r = await call(binding!, fd, region.fh.fd, off, want, buf);
      } else {
        r = now >= 0 ? { sent: now, full: now < Math.min(want, NOW_MAX), pieceBytes: 0 } : { sent: 0, full: true, pieceBytes: 0, err: errnoError(-now) };
      }
      got = r.pieceBytes;
      if (r.sent > 0) {
        off += r.sent;
        left -= r.sent;
        count?.(r.sent);
        // sendfile bypasses the socket's own activity tracking: restart its idle timer, if any.
        if (socket.timeout) socket.setTimeout(socket.timeout);
      }
      const fail = (e: Error): Error => {
        if (buf) narBuffers.release(buf);
        return e;
      };
      const err = r.err;
      if (err) {
        if (err.code === "EPIPE" || err.code === "ECONNRESET") throw fail(prematureClose());
        // Out of descriptors for the dup(): this piece goes the ordinary way, the next tries again.
        if (err.code === "EMFILE" || err.code === "ENFILE") full = true;
        else if (err.code !== "EAGAIN") {
          // ENOSYS, EINVAL (a file system without sendfile support), ...: send it the ordinary way.
          if (r.sent === 0 && (err.code === "ENOSYS" || err.code === "EINVAL" || err.code === "ENOTSOCK")) binding = undefined;
          else throw fail(err);
        }
      } else if (r.sent === 0) {
        throw fail(new Error(`${region.path.toString()} shrank while being sent`));
      } else {
        full = r.full;
      }
    }
    if (!(left > 0 && full) || socket.destroyed || res.destroyed) {
      if (buf) narBuffers.release(buf);
      continue; // the loop's first check throws when the client left
    }
    if (poll) {
      // Wait for writability and send from there on, in the addon, while the bytes are cached.
      const r = await poll.send(region.fh.fd, off, Math.min(left, MAX_CALL));
      if (r) {
        if (r.sent > 0) {
          off += r.sent;
          left -= r.sent;
          count?.(r.sent);
        }
        // Errors: sendfileNow at the loop's top meets them again and tells what they are; the
        // bytes not cached go to the pool from there too.
        if (r.status === -EPIPE || r.status === -ECONNRESET) throw prematureClose();
        continue;
      }
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

/**
 * The addon's poll for one socket's writability, for one region: started while waited on,
 * closed at the region's end or when the socket closes (its dup would otherwise hold the
 * connection open, with nothing to wake it if the client never reads again).
 */
class Writability {
  #waiter: ((r: { status: number; sent: number }) => void) | undefined;
  #closed = false;
  readonly #onClose = (): void => this.close();

  private constructor(
    private readonly binding: SendfileBinding,
    private readonly socket: Socket,
    private readonly handle: PollHandle,
  ) {
    socket.once("close", this.#onClose);
  }

  /** Undefined when the addon has no poll, or cannot dup the socket now (out of descriptors). */
  static open(binding: SendfileBinding | undefined, socket: Socket | null): Writability | undefined {
    const fd = socket ? socketFd(socket) : -1;
    if (!binding?.pollOpen || fd < 0) return undefined;
    let w: Writability | undefined = undefined;
    try {
      const handle = binding.pollOpen(fd, (status, sent) => w?.ready(status, sent));
      w = new Writability(binding, socket!, handle);
    } catch {
      return undefined;
    }
    return w;
  }

  /**
   * Waits for the socket to take bytes, and sends what it takes, from the page cache, until
   * `length` bytes are sent or it cannot go on (see pollSend). Undefined if the poll could not
   * start (the caller writes a piece instead); status 0 and the bytes sent so far if the socket
   * closed meanwhile.
   */
  send(inFd: number, offset: number, length: number): Promise<{ status: number; sent: number }> | undefined {
    if (this.#closed) return Promise.resolve({ status: 0, sent: 0 });
    if (this.binding.pollSend!(this.handle, inFd, offset, length) !== 0) return undefined;
    return new Promise((resolve) => (this.#waiter = resolve));
  }

  /** Stops watching until the next wait. */
  pause(): void {
    if (!this.#closed) this.binding.pollStop!(this.handle);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.socket.off("close", this.#onClose);
    this.binding.pollClose!(this.handle);
    this.ready(0, 0);
  }

  private ready(status: number, sent: number): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    // Level-triggered: with nobody waiting (nobody sends), a writable socket would call back on
    // every turn of the event loop. (The addon stops it itself at the end of a pollSend.)
    if (!waiter) this.pause();
    waiter?.({ status, sent });
  }
}

function errnoError(errno: number): NodeJS.ErrnoException {
  const code = Object.entries(osConstants.errno).find(([, v]) => v === errno)?.[0] ?? "EUNKNOWN";
  return Object.assign(new Error(`sendfile: ${code}`), { code, errno: -errno });
}

function call(binding: SendfileBinding, outFd: number, inFd: number, off: number, len: number, piece: Buffer | undefined): Promise<Sent> {
  return new Promise((resolve) => {
    const done = (err: NodeJS.ErrnoException | null, sent: number, pieceBytes = 0): void =>
      resolve({ err, sent, pieceBytes, full: err ? err.code === "EAGAIN" : sent > 0 && sent < len });
    try {
      if (piece) binding.sendfile(outFd, inFd, off, len, piece, done);
      else binding.sendfile(outFd, inFd, off, len, done);
    } catch (e) {
      // The addon could not dup() the descriptors (EMFILE, ENFILE): nothing was sent.
      resolve({ err: e as NodeJS.ErrnoException, sent: 0, pieceBytes: 0, full: true });
    }
  });
}
