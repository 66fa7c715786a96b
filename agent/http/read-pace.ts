// How much of a NAR to read from the store at a time, following the client's pace. A read is held
// in memory until the client has taken it: a 1 MiB read for a client taking 64 KiB/s sits in the
// socket's queue for 16 s, and 500 such clients held 700-1,000 MiB. Larger reads make fast
// transfers cheaper, up to a point: with reused buffers (buffer-pool.ts) 256 KiB reads cost
// 0.47-0.59 CPU s per GB here, 128 KiB 0.65-0.94, 512 KiB 0.64-0.74 and 1 MiB 0.65-0.76 (a
// buffer that stays in the CPU's cache between the read and the socket write is copied faster;
// measured 2026-12-01, see BENCHMARKS.md). So reads start small and grow to 256 KiB only while
// the client keeps taking them quickly.
//
// The kernel's socket buffers take the first few MiB of any client at once, slow or not (3-4.5
// MiB measured on loopback here): reads stay small until a client has taken more than that, and
// then grow by at most doubling per window, so such a burst cannot make a slow client look fast.

export const MIN_READ = 64 << 10;
export const MAX_READ = 256 << 10;
/** Bytes a client must have taken before reads grow: more than kernel buffers absorb. */
const RAMP_AFTER = 8 << 20;
/** Read about what the client took in this long; also the shortest time between two decisions. */
const WINDOW_MS = 50;

export class ReadPace {
  /** The size of the next read. */
  size = MIN_READ;
  #since: number;
  #bytes = 0;
  #total = 0;

  constructor(private readonly now: () => number = () => performance.now()) {
    this.#since = now();
  }

  /** The client has taken `bytes` more (the consumer asked for the next chunk). */
  took(bytes: number): void {
    this.#bytes += bytes;
    this.#total += bytes;
    const ms = this.now() - this.#since;
    if (ms < WINDOW_MS) return;
    if (this.#total < RAMP_AFTER) {
      this.#since = this.now();
      this.#bytes = 0;
      return;
    }
    const want = (this.#bytes / ms) * WINDOW_MS;
    const pow2 = 2 ** Math.ceil(Math.log2(Math.max(want, 1)));
    this.size = Math.max(MIN_READ, Math.min(MAX_READ, this.size * 2, pow2));
    this.#since = this.now();
    this.#bytes = 0;
  }
}
