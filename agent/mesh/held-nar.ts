// What FleetSource holds back of a peer's NAR until its hash checks out. Nix resumes a cut
// download with a Range from the byte it reached and keeps what it had (filetransfer.cc), so a
// wrong byte that reached it can only be undone by failing the whole copy: a NAR must go out
// whole and verified or not at all. The first `memoryBytes` stay in memory; the rest goes to a
// temporary file (unlinked at once, so it vanishes with the process), read back once verified.
// A NAR too large to spool (`spool: false`) keeps the old shape instead: everything but the
// last chunk flows on as it comes, so a wrong one is cut short, never complete.
//
// Chunks from the NAR buffer pool (a bulk body's, bulk-client.ts) go back to it once written to
// the spool file, and the file is read back into pooled buffers (the HTTP response gives those
// back once written): a fresh megabyte costs its page faults (buffer-pool.ts), a reused one not.
import { mkdtemp, open, rm, type FileHandle } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { narBuffers, type BufferPool } from "../buffer-pool.js";

/** Reads back from the spool file in pieces of this size. */
const READ_BYTES = 1 << 20;
/** Chunks bound for the spool file are written together once this many bytes are waiting. */
const SPOOL_BATCH_BYTES = 1 << 20;

const EMPTY = Buffer.alloc(0);

export class HeldNar {
  /** Held chunks in order, from #memoryStart (the slots before it went to the client). */
  #memory: Buffer[] = [];
  #memoryStart = 0;
  #memoryBytes = 0;
  #file: FileHandle | undefined;
  #fileBytes = 0;
  /** Chunks bound for the file, not yet written (after the file's bytes). */
  #pending: Buffer[] = [];
  #pendingBytes = 0;

  constructor(
    private readonly memoryBytes: number,
    private readonly spool: boolean,
    private readonly dir = tmpdir(),
    private readonly pool: BufferPool = narBuffers,
  ) {}

  /** Bytes held so far. */
  get size(): number {
    return this.#memoryBytes + this.#fileBytes + this.#pendingBytes;
  }

  /** Writes the pending chunks to the spool file (opened on first use). */
  async #flush(): Promise<void> {
    if (this.#pendingBytes === 0) return;
    this.#file ??= await openUnlinked(this.dir);
    const { bytesWritten } = await this.#file.writev(this.#pending, this.#fileBytes);
    this.#fileBytes += bytesWritten;
    if (bytesWritten === this.#pendingBytes) {
      // In the file now, and read by nobody else (push's rule): pooled ones can be reused.
      for (const b of this.#pending) this.pool.release(b);
      this.#pending = [];
      this.#pendingBytes = 0;
      return;
    }
    // A short write (a full disk): what was written is in the file, the rest stays pending.
    let skip = bytesWritten;
    while (skip >= this.#pending[0]!.length) skip -= this.#pending.shift()!.length;
    this.#pending[0] = this.#pending[0]!.subarray(skip);
    this.#pendingBytes -= bytesWritten;
    throw new Error(`spool file: wrote ${bytesWritten} of ${this.#pendingBytes + bytesWritten} bytes`);
  }

  /**
   * Holds `chunk`, as a view: the caller hands it over and never writes into it again (peer NAR
   * chunks are the receiver's to keep, PeerRequests.nar), and is done reading it before its next
   * push() (which may write it to the spool file and give it back to the buffer pool). Returns what may go to the client
   * now: nothing when spooling; without a spool, what is beyond the memory limit (all but the last chunk).
   */
  async push(chunk: Uint8Array): Promise<Buffer[]> {
    const view = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    if (this.spool && (this.#file || this.#pendingBytes > 0 || this.#memoryBytes + chunk.length > this.memoryBytes)) {
      // Written in batches: one file write per chunk cost a thread-pool round trip per 64 KiB,
      // and per read's worth of bytes on a slow link. A failed write throws before this chunk is
      // taken, so what push() accepted is held whatever fails later (fleet-source resumes there).
      if (this.#pendingBytes + chunk.length > SPOOL_BATCH_BYTES) await this.#flush();
      this.#pending.push(view);
      this.#pendingBytes += chunk.length;
      return [];
    }
    this.#memory.push(view);
    this.#memoryBytes += chunk.length;
    if (this.spool || this.#memoryBytes <= this.memoryBytes) return [];
    // Without a spool the oldest chunks go out. Taken by moving a start index, not by shift():
    // on a slow link the held chunks are small and many, and every shift() moves all of them.
    const out: Buffer[] = [];
    while (this.#memoryBytes > this.memoryBytes && this.#memory.length - this.#memoryStart > 1) {
      const b = this.#memory[this.#memoryStart]!;
      this.#memory[this.#memoryStart++] = EMPTY; // the chunk is the client's now, not ours to keep alive
      this.#memoryBytes -= b.length;
      out.push(b);
    }
    // Now and then drop the taken slots in one go (amortised: at least as many pushes as slots).
    if (this.#memoryStart >= 1024 && this.#memoryStart * 2 >= this.#memory.length) {
      this.#memory = this.#memory.slice(this.#memoryStart);
      this.#memoryStart = 0;
    }
    return out;
  }

  /** Everything held, in order (call once the NAR is verified); the file is closed at the end. */
  async *drain(): AsyncGenerator<Buffer> {
    try {
      // Taken as a whole, not shift()ed: on a slow link the held chunks are small and many, and
      // shifting each off the front of a long array cost a profile's largest share of CPU.
      const memory = this.#memory;
      const start = this.#memoryStart;
      this.#memory = [];
      this.#memoryStart = 0;
      this.#memoryBytes = 0;
      for (let i = start; i < memory.length; i++) yield memory[i]!;
      for (let pos = 0; this.#file && pos < this.#fileBytes; ) {
        const buf = this.pool.acquire(READ_BYTES);
        const { bytesRead } = await this.#file.read(buf, 0, Math.min(READ_BYTES, this.#fileBytes - pos), pos);
        if (bytesRead === 0) throw new Error(`spool file ended at ${pos} of ${this.#fileBytes} bytes`);
        pos += bytesRead;
        yield buf.subarray(0, bytesRead);
      }
      const pending = this.#pending;
      this.#pending = [];
      this.#pendingBytes = 0;
      for (const b of pending) yield b;
    } finally {
      await this.discard();
    }
  }

  /** Drops what is held (a wrong NAR, or the client gone). */
  async discard(): Promise<void> {
    this.#memory = [];
    this.#memoryStart = 0;
    this.#memoryBytes = 0;
    this.#pending = [];
    this.#pendingBytes = 0;
    const f = this.#file;
    this.#file = undefined;
    this.#fileBytes = 0;
    await f?.close();
  }
}

/** A new file in `dir` that no other process can find: its directory entry is removed at once. */
async function openUnlinked(dir: string): Promise<FileHandle> {
  const d = await mkdtemp(join(dir, "fleetcache-nar-"));
  try {
    return await open(join(d, "nar"), "w+", 0o600);
  } finally {
    await rm(d, { recursive: true, force: true });
  }
}
