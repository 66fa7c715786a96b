// What a process's resident memory is made of, from /proc/PID/smaps: the mappings grouped by
// who made them, so a soak can say whether growth is V8's heap, malloc or files.
import { readFileSync } from "node:fs";

export interface MemoryMap {
  /** All resident memory (the sum of every mapping's Rss), bytes. */
  rss: number;
  /** Mapped files: the node binary, shared libraries (mostly shared and clean). */
  files: number;
  /** glibc malloc's main arena (the brk heap, "[heap]"). */
  brk: number;
  /**
   * glibc malloc's other arenas: each a 64 MiB-aligned reservation of exactly 64 MiB, the used
   * part read-write and the rest inaccessible. Threads that malloc at once (libuv's pool,
   * V8's GC helpers, OpenSSL) get arenas of their own, up to 8 per CPU.
   */
  arenas: number;
  /** The other anonymous mappings: V8's heap pages, large mallocs (mmap'd), thread stacks. */
  otherAnon: number;
  /** Of all of the above, what transparent huge pages back. */
  hugePages: number;
}

const ARENA = 64 << 20;

interface Region {
  start: number;
  end: number;
  perms: string;
  path: string;
  rss: number;
  huge: number;
}

function regions(text: string): Region[] {
  const out: Region[] = [];
  for (const line of text.split("\n")) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      // Addresses fit in a double's 53 bits (user space is below 2^47).
      out.push({ start: parseInt(head[1]!, 16), end: parseInt(head[2]!, 16), perms: head[3]!, path: head[4]!, rss: 0, huge: 0 });
      continue;
    }
    const field = /^(Rss|AnonHugePages):\s+(\d+) kB/.exec(line);
    const r = out.at(-1);
    if (field && r) r[field[1] === "Rss" ? "rss" : "huge"] = Number(field[2]) * 1024;
  }
  return out;
}

/** Reads /proc/PID/smaps once; undefined when the process is gone. */
export function memoryMap(pid: number): MemoryMap | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/smaps`, "utf8");
  } catch {
    return undefined;
  }
  const rs = regions(text);
  const m: MemoryMap = { rss: 0, files: 0, brk: 0, arenas: 0, otherAnon: 0, hugePages: 0 };
  for (let i = 0; i < rs.length; i++) {
    const r = rs[i]!;
    m.rss += r.rss;
    m.hugePages += r.huge;
    if (r.path === "[heap]") m.brk += r.rss;
    else if (r.path.startsWith("/")) m.files += r.rss;
    else if (r.path === "" && isArena(r, rs[i + 1])) m.arenas += r.rss;
    else m.otherAnon += r.rss; // includes [stack], [vdso] and the like: a few pages
  }
  return m;
}

/** A malloc arena's heap: 64 MiB-aligned, read-write, with the inaccessible rest of its 64 MiB after it. */
function isArena(r: Region, next: Region | undefined): boolean {
  if (r.start % ARENA !== 0 || !r.perms.startsWith("rw")) return false;
  if (r.end - r.start === ARENA) return true;
  return next !== undefined && next.start === r.end && next.perms.startsWith("---") && next.path === "" && next.end - r.start === ARENA;
}
