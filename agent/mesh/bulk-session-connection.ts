// One requester's TLS connection of a bulk session (PEER-PROTOCOL.md, "Bulk sessions"): it sends a
// NarRequest, reads the answer's header frame and then exactly the body's bytes, and is ready for
// the next request. As on a one-time bulk connection (BulkBody), Node's TLS decrypts straight into
// pooled buffers (the socket's `onread` option) and whole buffers are handed on; here a read may
// also hold a header frame, which is copied out and never handed on, and a body's end, after
// which the rest of that buffer is dropped (it went on with the body's last bytes).
import type { TLSSocket } from "node:tls";
import { MAX_BULK_FRAME_BYTES } from "../../protocol/bulk-session.js";
import { FrameCollector, decodeNarResponseHeader, encodeFrame, encodeNarRequest, type NarResponseHeader } from "../../protocol/peer-codec.js";
import { narBuffers, type BufferPool } from "../buffer-pool.js";
import { BULK_GATHER_BYTES, BULK_GATHER_MS, BULK_QUEUE_BYTES, ChunkQueue } from "./bulk-client.js";
/** A read buffer while no body is under way: a header frame and maybe a body's first bytes. */
const HEADER_BUFFER_BYTES = 64 << 10;

/** The connection closed or broke the protocol; `beforeAnswer`: no byte of the answer had come. */
export class SessionConnectionError extends Error {
  override name = "SessionConnectionError";
  constructor(
    message: string,
    readonly beforeAnswer: boolean,
  ) {
    super(message);
  }
}

type State = "idle" | "header" | "body";

export class SessionConnection {
  #socket: TLSSocket | undefined;
  #state: State = "idle";
  readonly #collector = new FrameCollector(MAX_BULK_FRAME_BYTES);
  #remaining = 0;
  #header: { resolve(h: NarResponseHeader): void; reject(e: Error): void } | undefined;
  readonly #queue = new ChunkQueue();
  #bodyEnded = false;
  /** The buffer being filled: bytes [#handed, #filled) are not handed on yet. */
  #cur: Buffer | undefined;
  #filled = 0;
  #handed = 0;
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;
  #failure: SessionConnectionError | undefined;
  /** The offset of the request under way (its body is narSize - offset bytes). */
  #offset = 0;
  /** Answers read whole on this connection. */
  answered = 0;

  constructor(private readonly pool: BufferPool = narBuffers) {}

  /** Once connected (connectBulk with this object's onread). */
  attach(socket: TLSSocket): void {
    this.#socket = socket;
    socket.on("error", (err) => this.#fail(err.message));
    socket.once("end", () => this.#fail("closed by the holder"));
    socket.once("close", () => this.#fail("closed"));
  }

  get usable(): boolean {
    return this.#state === "idle" && this.#failure === undefined && this.#socket !== undefined && !this.#socket.destroyed;
  }

  /** Ends the connection (between answers, or abandoning one). */
  destroy(): void {
    this.#fail("closed by us");
  }

  /**
   * Sends one request; resolves with the answer's header (NarOk or NarError). After NarOk, read
   * the body with body() before the next request.
   */
  request(req: { hashPart: string; narHash: string; offset: number }): Promise<NarResponseHeader> {
    if (!this.usable) return Promise.reject(new SessionConnectionError("connection not usable", true));
    this.#state = "header";
    this.#offset = req.offset;
    this.#bodyEnded = false;
    const answer = new Promise<NarResponseHeader>((resolve, reject) => (this.#header = { resolve, reject }));
    this.#socket!.write(encodeFrame(encodeNarRequest({ ...req }), MAX_BULK_FRAME_BYTES));
    return answer;
  }

  readonly onread = {
    buffer: (): Buffer => {
      // Sized to what is expected: a small one for a header, up to a gather buffer for a body.
      this.#cur ??= this.pool.acquire(this.#state === "body" ? Math.min(BULK_GATHER_BYTES, Math.max(this.#remaining, HEADER_BUFFER_BYTES)) : HEADER_BUFFER_BYTES);
      return this.#cur.subarray(this.#filled);
    },
    callback: (n: number): boolean => {
      const cur = this.#cur!;
      let pos = this.#filled;
      const end = pos + n;
      this.#filled = end;
      while (pos < end && this.#failure === undefined) {
        if (this.#state === "header") pos = this.#takeHeader(cur, pos, end);
        else if (this.#state === "body") pos = this.#takeBody(cur, pos, end);
        else this.#fail("bytes from the holder outside an answer");
      }
      if (this.#failure !== undefined) return false;
      if (this.#cur === cur && this.#filled === cur.length) {
        // Full: what is body goes on; a buffer that held only a header goes back to the pool.
        if (this.#filled > this.#handed) this.#queue.push(cur.subarray(this.#handed));
        else this.pool.release(cur);
        this.#drop();
      } else if (this.#cur === cur && this.#state === "body" && this.#filled > this.#handed && this.#timer === undefined) {
        // Armed by a buffer's first body bytes, not per read (a timer per 16 KiB costs more than it saves).
        this.#timer = setTimeout(() => this.#flushPartial(), BULK_GATHER_MS);
      }
      this.#stopped = this.#queue.queued >= BULK_QUEUE_BYTES;
      return !this.#stopped;
    },
  };

  #takeHeader(cur: Buffer, pos: number, end: number): number {
    try {
      pos += this.#collector.take(cur.subarray(pos, end));
    } catch (err) {
      this.#fail(`a bad answer: ${(err as Error).message}`, false);
      return end;
    }
    this.#handed = pos; // a header's bytes are never handed on
    if (!this.#collector.done) return pos;
    let h: NarResponseHeader;
    try {
      h = decodeNarResponseHeader(this.#collector.frame());
    } catch (err) {
      this.#fail(`a bad answer: ${(err as Error).message}`, false);
      return end;
    }
    const waiter = this.#header!;
    this.#header = undefined;
    if (h.type === "ok") {
      this.#remaining = h.narSize - this.#offset;
      if (this.#remaining < 0) {
        this.#fail(`NAR size ${h.narSize} under the offset asked for`, false);
        return end;
      }
      this.#state = "body";
      if (this.#remaining === 0) this.#endBody(cur, pos);
    } else {
      this.answered++;
      this.#state = "idle";
    }
    waiter.resolve(h);
    return pos;
  }

  #takeBody(cur: Buffer, pos: number, end: number): number {
    const k = Math.min(this.#remaining, end - pos);
    pos += k;
    this.#remaining -= k;
    if (this.#remaining === 0) this.#endBody(cur, pos);
    return pos;
  }

  /** The body's last byte is at `pos` of `cur`: hand on what is left of it, and start the next read in a fresh buffer. */
  #endBody(cur: Buffer, pos: number): void {
    if (pos > this.#handed) this.#queue.push(cur.subarray(this.#handed, pos));
    else this.pool.release(cur); // nothing of this buffer went on (or only copies did)
    this.#drop();
    // Bytes after the body in the same read are the holder's protocol error (the loop sees state idle).
    this.#state = "idle";
    this.#bodyEnded = true;
    this.answered++;
    this.#queue.notify();
  }

  #drop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#cur = undefined;
    this.#filled = this.#handed = 0;
  }

  #flushPartial(): void {
    this.#timer = undefined;
    if (this.#cur === undefined || this.#filled === this.#handed) return;
    this.#queue.push(Buffer.from(this.#cur.subarray(this.#handed, this.#filled))); // a copy: the buffer goes on filling
    this.#handed = this.#filled;
  }

  #fail(why: string, beforeAnswer = this.#state === "header" && this.#collector.empty): void {
    if (this.#failure) return;
    this.#failure = new SessionConnectionError(why, beforeAnswer);
    clearTimeout(this.#timer);
    this.#timer = undefined;
    // The buffer being filled is dropped, not released: Node may still write into it.
    this.#cur = undefined;
    this.#socket?.destroy();
    this.#header?.reject(this.#failure);
    this.#header = undefined;
    this.#queue.notify();
  }

  /**
   * The body after a NarOk: yields exactly its bytes (pooled buffers: the consumer releases them)
   * and returns, or throws SessionConnectionError if the connection ends first. Breaking out
   * destroys the connection (its rest cannot be told from the next answer).
   */
  async *body(): AsyncGenerator<Buffer> {
    let complete = false;
    try {
      for (;;) {
        const chunk = this.#queue.shift();
        if (chunk) {
          if (this.#stopped && this.#queue.queued < BULK_QUEUE_BYTES) {
            this.#stopped = false;
            this.#socket?.resume(); // starts the reads again
          }
          yield chunk;
          continue;
        }
        if (this.#bodyEnded) break;
        if (this.#failure) throw this.#failure;
        await this.#queue.wait();
      }
      complete = true;
    } finally {
      if (!complete) this.destroy();
    }
  }
}
