// Serializes a filesystem path as a NAR, byte-identical to `nix-store --dump`, streamed with
// bounded memory and able to start at any byte offset (HTTP Range) without reading the contents
// of files that lie wholly before it.
//
// Paths are Buffers throughout: store paths may contain names that are not valid UTF-8.
// With the case hack (macOS), entries are named and ordered as Nix dumps them (case-hack.ts).
import { constants } from "node:fs";
import { lstat, open, readdir, readlink } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import type { Listing, ListingDirectory, ListingNode } from "../../protocol/listing.js";
import {
  DIRECTORY_OPEN,
  ENTRY_CLOSE,
  NAR_MAGIC,
  NODE_CLOSE,
  entryHead,
  regularHead,
  regularTail,
  symlinkNode,
} from "../../protocol/nar.js";
import { narEntries, type NarEntry } from "./case-hack.js";
import { narBuffers, type BufferPool } from "../buffer-pool.js";

/**
 * One walk of the tree, in NAR order. `bytes` events are literal NAR bytes; a `regular` event
 * stands for `size` content bytes read from `path`. The other events carry no bytes: they tell
 * the listing builder about the structure.
 */
type WalkEvent =
  | { kind: "bytes"; bytes: Buffer }
  | { kind: "regular"; name: Buffer | null; path: Buffer; size: number; executable: boolean }
  | { kind: "symlink"; name: Buffer | null; target: Buffer }
  | { kind: "dirOpen"; name: Buffer | null }
  | { kind: "dirClose" };

const SLASH = Buffer.from("/");

interface Frame {
  dir: Buffer;
  /** NAR names, in NAR order, with the names on disk. */
  entries: NarEntry<Buffer>[];
  next: number;
  isEntry: boolean; // the root directory has no enclosing "entry" to close
}

/** Events for one node; a directory also pushes a frame whose entries the caller walks. */
async function visit(path: Buffer, name: Buffer | null, stack: Frame[], caseHack: boolean): Promise<WalkEvent[]> {
  const st = await lstat(path);
  const head = name === null ? [] : [entryHead(name)];
  const tail = name === null ? [] : [ENTRY_CLOSE];
  if (st.isFile()) {
    // Nix keeps only the owner's execute bit (S_IXUSR).
    const executable = (st.mode & constants.S_IXUSR) !== 0;
    return [
      { kind: "bytes", bytes: Buffer.concat([...head, regularHead(executable, st.size)]) },
      { kind: "regular", name, path, size: st.size, executable },
      { kind: "bytes", bytes: Buffer.concat([regularTail(st.size), ...tail]) },
    ];
  }
  if (st.isSymbolicLink()) {
    const target = await readlink(path, { encoding: "buffer" });
    return [
      { kind: "symlink", name, target },
      { kind: "bytes", bytes: Buffer.concat([...head, symlinkNode(target), ...tail]) },
    ];
  }
  if (st.isDirectory()) {
    const onDisk = await readdir(path, { encoding: "buffer" });
    const entries = narEntries(onDisk, (n) => n, caseHack, path.toString());
    stack.push({ dir: path, entries, next: 0, isEntry: name !== null });
    return [
      { kind: "dirOpen", name },
      { kind: "bytes", bytes: Buffer.concat([...head, DIRECTORY_OPEN]) },
    ];
  }
  throw new Error(`cannot put ${path.toString()} in a NAR: not a regular file, symlink or directory`);
}

/** The tree at `root` in NAR order. An explicit stack, so deep trees cost no recursion. */
async function* walk(root: Buffer, caseHack: boolean): AsyncGenerator<WalkEvent> {
  yield { kind: "bytes", bytes: NAR_MAGIC };
  const stack: Frame[] = [];
  yield* await visit(root, null, stack, caseHack);
  while (stack.length > 0) {
    const top = stack[stack.length - 1]!;
    const entry = top.entries[top.next++];
    if (entry !== undefined) {
      yield* await visit(Buffer.concat([top.dir, SLASH, entry.onDisk]), entry.name, stack, caseHack);
    } else {
      stack.pop();
      yield { kind: "bytes", bytes: top.isEntry ? Buffer.concat([NODE_CLOSE, ENTRY_CLOSE]) : NODE_CLOSE };
      yield { kind: "dirClose" };
    }
  }
}

export interface WalkOptions {
  /** Undo Nix's case hack (`use-case-hack`): names on disk may carry ~nix~case~hack~N. */
  caseHack?: boolean;
}

export interface NarStreamOptions extends WalkOptions {
  /** First NAR byte to produce (default 0). */
  start?: number;
  /** One past the last NAR byte to produce (default: the end of the NAR). */
  end?: number;
  /**
   * Read size for file contents: a number, or a function asked before each read (the HTTP side
   * follows the client's pace with it, up to 256 KiB: see read-pace.ts). The default, 1 MiB,
   * measured best with a fresh buffer per read; with buffers that are released and reused,
   * 256 KiB costs less CPU per GB.
   */
  chunkSize?: number | (() => number);
  /**
   * Where the yielded buffers come from (default: the process's NAR pool). A consumer may give
   * a yielded buffer back with pool.release() once nothing reads it any more; one it keeps, or
   * drops, is never reused.
   */
  pool?: BufferPool;
}

/**
 * `length` content bytes of the file open as `fh`, from `offset`: what narPieces() yields instead
 * of reading them, so that a consumer can send them with sendfile(2). The handle is open only
 * until the consumer asks for the next piece (or closes the generator): use it before that.
 */
export interface FileRegion {
  fh: FileHandle;
  path: Buffer;
  offset: number;
  length: number;
}

/** Literal NAR bytes, or a region of a file's contents (narPieces with `regionMin`). */
export type NarPiece = Buffer | FileRegion;

export interface NarPiecesOptions extends NarStreamOptions {
  /**
   * File contents of at least this many bytes (of the range) come as FileRegions instead of
   * Buffers, except at the very start of the output: the first bytes are always a Buffer, so the
   * consumer's first write (with the HTTP headers) goes through the socket first. Default: never.
   */
  regionMin?: number;
}

const DEFAULT_CHUNK = 1 << 20;
/** Headers and small files are gathered into buffers of this size before being yielded. */
const COALESCE = 64 << 10;

/**
 * Gathers small pieces into one buffer; take() hands it out. The next buffer is taken only
 * when something is added: a stream of large files (or a slow client's) holds no idle one.
 */
class Gather {
  #buf: Buffer | undefined;
  len = 0;
  constructor(private readonly pool: BufferPool) {}
  get buf(): Buffer {
    return (this.#buf ??= this.pool.acquire(COALESCE).subarray(0, COALESCE));
  }
  room(): number {
    return COALESCE - this.len;
  }
  add(b: Buffer): void {
    this.len += b.copy(this.buf, this.len);
  }
  take(): Buffer {
    const out = this.buf.subarray(0, this.len);
    this.#buf = undefined;
    this.len = 0;
    return out;
  }
}

function changed(path: Buffer, what: string): Error {
  return new Error(`${path.toString()} ${what} while being put into a NAR`);
}

/**
 * Reads `len` bytes at file position `pos` into buf[off...]. When `probeEof` is set, buf must
 * have one spare byte: asking for one more than expected detects a file that grew (a regular
 * file returns a short read only at its end). A file that shrank runs out early.
 */
async function readExact(
  fh: FileHandle, path: Buffer, buf: Buffer, off: number, len: number, pos: number, probeEof: boolean,
): Promise<void> {
  const want = len + (probeEof ? 1 : 0);
  let got = 0;
  while (got < len) {
    const { bytesRead } = await fh.read(buf, off + got, want - got, pos + got);
    if (bytesRead === 0) throw changed(path, "shrank");
    got += bytesRead;
  }
  if (got > len) throw changed(path, "grew");
}

/**
 * The NAR of `fsPath`, bytes [start, end). Files before `start` are skipped by their size alone;
 * nothing is read past `end`. Memory stays around one chunk plus one gather buffer, as long as the
 * consumer does not hoard the yielded buffers. Each yielded buffer is the consumer's: it is
 * reused only if the consumer releases it to `opts.pool` (see NarStreamOptions.pool).
 * Throws if a file changes size or disappears while the stream runs, rather than yield a NAR
 * whose length disagrees with its headers.
 */
export function narStream(fsPath: string, opts: NarStreamOptions = {}): AsyncGenerator<Buffer> {
  // Without regionMin narPieces yields Buffers only.
  return narPieces(fsPath, { ...opts, regionMin: Infinity }) as AsyncGenerator<Buffer>;
}

/**
 * narStream(), with file contents of `opts.regionMin` bytes or more given as FileRegions. After a
 * region the file's size is checked again (a file that grew or shrank while the consumer sent
 * it throws, as narStream's reads do); a consumer sending a region must itself fail when the file
 * ends early (sendfile(2) returns 0).
 */
export async function* narPieces(fsPath: string, opts: NarPiecesOptions = {}): AsyncGenerator<NarPiece> {
  const regionMin = opts.regionMin ?? Infinity;
  const start = opts.start ?? 0;
  const end = opts.end ?? Number.MAX_SAFE_INTEGER;
  const sizing = opts.chunkSize ?? DEFAULT_CHUNK;
  const chunkSize = (): number => {
    const n = typeof sizing === "number" ? sizing : sizing();
    if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`bad chunk size ${n}`);
    return n;
  };
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    throw new RangeError(`bad NAR range [${start}, ${end})`);
  }
  chunkSize();
  if (start === end) return;

  const pool = opts.pool ?? narBuffers;
  const gather = new Gather(pool);
  let pos = 0; // NAR offset of the next byte the walk produces
  let produced = false; // a byte of the output has been yielded or gathered
  for await (const ev of walk(Buffer.from(fsPath), opts.caseHack ?? false)) {
    if (pos >= end) break;
    if (ev.kind === "bytes") {
      const b = ev.bytes;
      const lo = Math.max(start - pos, 0);
      const hi = Math.min(end - pos, b.length);
      pos += b.length;
      if (lo >= hi) continue;
      produced = true;
      const part = b.subarray(lo, hi);
      if (part.length > gather.room()) yield gather.take();
      if (part.length > gather.room()) yield Buffer.from(part); // larger than a whole gather buffer
      else gather.add(part);
    } else if (ev.kind === "regular") {
      const lo = Math.max(start - pos, 0);
      const hi = Math.min(end - pos, ev.size);
      pos += ev.size;
      if (lo >= hi) continue; // wholly outside the range (or empty): not even opened
      const fh = await open(ev.path, constants.O_RDONLY | constants.O_NOFOLLOW);
      try {
        // Catches a file replaced or resized since lstat, even when the range ends mid-file.
        const st = await fh.stat();
        if (!st.isFile() || st.size !== ev.size) throw changed(ev.path, "changed");
        const toEof = hi === ev.size;
        for (let at = lo; at < hi; ) {
          if (produced && hi - at >= regionMin) {
            if (gather.len > 0) yield gather.take();
            yield { fh, path: ev.path, offset: at, length: hi - at };
            // Sent by the consumer: the file must still be as large as its header said.
            if ((await fh.stat()).size !== ev.size) throw changed(ev.path, "changed size");
            break;
          }
          produced = true;
          const n = Math.min(chunkSize(), hi - at);
          const last = at + n === hi;
          const probe = last && toEof;
          if (n + 1 <= gather.room()) {
            // Small piece: read straight into the gather buffer (its spare byte takes the probe).
            await readExact(fh, ev.path, gather.buf, gather.len, n, at, probe);
            gather.len += n;
          } else {
            if (gather.len > 0) yield gather.take();
            if (n + 1 <= gather.room()) {
              await readExact(fh, ev.path, gather.buf, 0, n, at, probe);
              gather.len = n;
            } else {
              const buf = pool.acquire(n + (probe ? 1 : 0));
              try {
                await readExact(fh, ev.path, buf, 0, n, at, probe);
              } catch (e) {
                pool.release(buf); // never yielded: nobody else holds it
                throw e;
              }
              yield buf.subarray(0, n);
            }
          }
          at += n;
        }
      } finally {
        await fh.close();
      }
    }
  }
  if (gather.len > 0) yield gather.take();
}

/** Total NAR size of `fsPath`, from metadata only (no file contents are read). */
export async function narLength(fsPath: string, opts: WalkOptions = {}): Promise<number> {
  let len = 0;
  for await (const ev of walk(Buffer.from(fsPath), opts.caseHack ?? false)) {
    if (ev.kind === "bytes") len += ev.bytes.length;
    else if (ev.kind === "regular") len += ev.size;
  }
  return len;
}

/** Nix's NAR listing of `fsPath` (metadata only), with each regular file's narOffset. */
export async function narListing(fsPath: string, opts: WalkOptions = {}): Promise<Listing> {
  let root: ListingNode | undefined;
  const dirs: ListingDirectory[] = [];
  const place = (name: Buffer | null, node: ListingNode): void => {
    if (name === null) root = node;
    else dirs[dirs.length - 1]!.entries.push({ name, node });
  };
  let pos = 0;
  for await (const ev of walk(Buffer.from(fsPath), opts.caseHack ?? false)) {
    switch (ev.kind) {
      case "bytes":
        pos += ev.bytes.length;
        break;
      case "regular":
        place(ev.name, { type: "regular", size: ev.size, executable: ev.executable, narOffset: pos });
        pos += ev.size;
        break;
      case "symlink":
        place(ev.name, { type: "symlink", target: ev.target });
        break;
      case "dirOpen": {
        const dir: ListingDirectory = { type: "directory", entries: [] };
        place(ev.name, dir);
        dirs.push(dir);
        break;
      }
      case "dirClose":
        dirs.pop();
        break;
    }
  }
  if (root === undefined) throw new Error(`empty walk of ${fsPath}`);
  return { version: 1, root };
}
