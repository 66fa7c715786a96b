// Prefetch progress: a bar (paths, bytes, rate, ETA) on a terminal, plain lines otherwise so
// that logs of unattended runs stay readable.
import cliProgress from "cli-progress";
import { formatBytes, formatDuration } from "./format.js";

/** Plain lines are written at most this often unless the count of finished paths changes. */
const PLAIN_QUIET_MS = 10_000;

export class Progress {
  private readonly started = Date.now();
  private bar: cliProgress.SingleBar | undefined;
  private lastLine = 0;
  private lastPaths = -1;

  constructor(
    private readonly totalPaths: number,
    private readonly totalBytes: number,
    private readonly out: NodeJS.WriteStream | NodeJS.WritableStream = process.stderr,
    tty = (out as NodeJS.WriteStream).isTTY === true,
  ) {
    if (tty) {
      this.bar = new cliProgress.SingleBar(
        {
          stream: out as NodeJS.WriteStream,
          format: "prefetch [{bar}] {paths} paths | {bytes} | {rate} | ETA {etaText}",
          hideCursor: true,
          clearOnComplete: false,
        },
        cliProgress.Presets.shades_classic,
      );
      this.bar.start(totalBytes, 0, this.payload(0, 0));
    }
  }

  private payload(paths: number, bytes: number) {
    const elapsed = (Date.now() - this.started) / 1000;
    const rate = elapsed > 0 ? bytes / elapsed : 0;
    return {
      paths: `${paths}/${this.totalPaths}`,
      bytes: `${formatBytes(bytes)}/${formatBytes(this.totalBytes)}`,
      rate: `${formatBytes(rate)}/s`,
      etaText: bytes >= this.totalBytes ? "0 s" : rate > 0 ? formatDuration((this.totalBytes - bytes) / rate) : "?",
    };
  }

  update(paths: number, bytes: number, force = false): void {
    const p = this.payload(paths, bytes);
    if (this.bar) {
      this.bar.update(bytes, p);
      return;
    }
    const now = Date.now();
    if (!force && paths === this.lastPaths && now - this.lastLine < PLAIN_QUIET_MS) return;
    this.lastLine = now;
    this.lastPaths = paths;
    this.out.write(`prefetch: ${p.paths} paths, ${p.bytes}, ${p.rate}, ETA ${p.etaText}\n`);
  }

  /** The final line: how much came in and how fast. */
  finish(paths: number, bytes: number): void {
    this.update(paths, bytes, true);
    this.bar?.stop();
    const elapsed = (Date.now() - this.started) / 1000;
    this.out.write(`prefetch: done, ${paths} paths, ${formatBytes(bytes)} in ${elapsed.toFixed(1)} s (${formatBytes(elapsed > 0 ? bytes / elapsed : bytes)}/s)\n`);
  }

  /** Stops the bar without a completion line (on failure). */
  abort(): void {
    this.bar?.stop();
  }
}
