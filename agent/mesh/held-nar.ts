// What FleetSource holds back of a peer's NAR until its hash checks out. Nix resumes a cut
// download with a Range from the byte it reached and keeps what it had (filetransfer.cc), so a
// wrong byte that reached it can only be undone by failing the whole copy: a NAR must go out
// whole and verified or not at all. The first `memoryBytes` stay in memory; the rest goes to a
// temporary file (unlinked at once, so it vanishes with the process), read back once verified.
// A NAR too large to spool (`spool: false`) keeps the old shape instead: everything but the
// last chunk flows on as it comes, so a wrong one is cut short, never complete.
import { mkdtemp, open, rm, type FileHandle } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Reads back from the spool file in pieces of this size. */
const READ_BYTES = 1 << 20;

export class HeldNar {
  #memory: Buffer[] = [];
  #memoryBytes = 0;
  #file: FileHandle | undefined;
  #fileBytes = 0;

  constructor(
    private readonly memoryBytes: number,
    private readonly spool: boolean,
    private readonly dir = tmpdir(),
  ) {}

  /** Bytes held so far. */
  get size(): number {
    return this.#memoryBytes + this.#fileBytes;
  }

  /**
   * Holds `chunk`, as a view: the caller hands it over and never writes into it again (peer NAR
   * chunks are the receiver's to keep, PeerRequests.nar). Returns what may go to the client
   * now: nothing when spooling; without a spool, what is beyond the memory limit (all but the last chunk).
   */
  async push(chunk: Uint8Array): Promise<Buffer[]> {
    if (this.spool && (this.#file || this.#memoryBytes + chunk.length > this.memoryBytes)) {
      this.#file ??= await openUnlinked(this.dir);
      const { bytesWritten } = await this.#file.write(chunk, 0, chunk.length, this.#fileBytes);
      if (bytesWritten !== chunk.length) throw new Error(`spool file: wrote ${bytesWritten} of ${chunk.length} bytes`);
      this.#fileBytes += chunk.length;
      return [];
    }
    this.#memory.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.#memoryBytes += chunk.length;
    const out: Buffer[] = [];
    while (!this.spool && this.#memoryBytes > this.memoryBytes && this.#memory.length > 1) {
      const b = this.#memory.shift()!;
      this.#memoryBytes -= b.length;
      out.push(b);
    }
    return out;
  }

  /** Everything held, in order (call once the NAR is verified); the file is closed at the end. */
  async *drain(): AsyncGenerator<Buffer> {
    try {
      // Taken as a whole, not shift()ed: on a slow link the held chunks are small and many, and
      // shifting each off the front of a long array cost a profile's largest share of CPU.
      const memory = this.#memory;
      this.#memory = [];
      this.#memoryBytes = 0;
      for (const b of memory) yield b;
      for (let pos = 0; this.#file && pos < this.#fileBytes; ) {
        const buf = Buffer.allocUnsafe(Math.min(READ_BYTES, this.#fileBytes - pos));
        const { bytesRead } = await this.#file.read(buf, 0, buf.length, pos);
        if (bytesRead === 0) throw new Error(`spool file ended at ${pos} of ${this.#fileBytes} bytes`);
        pos += bytesRead;
        yield buf.subarray(0, bytesRead);
      }
    } finally {
      await this.discard();
    }
  }

  /** Drops what is held (a wrong NAR, or the client gone). */
  async discard(): Promise<void> {
    this.#memory.length = 0;
    this.#memoryBytes = 0;
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
