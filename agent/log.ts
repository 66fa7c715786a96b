// Structured logs: JSON lines by default (for journald and collectors), readable on a terminal.
import { pino, type Logger, type LevelWithSilent } from "pino";

export type { Logger };

export function createLogger(opts: { level?: LevelWithSilent; pretty?: boolean } = {}): Logger {
  const level = opts.level ?? (process.env.FLEETCACHE_LOG_LEVEL as LevelWithSilent | undefined) ?? "info";
  const pretty = opts.pretty ?? process.stderr.isTTY;
  if (pretty) {
    return pino({
      level,
      transport: { target: "pino-pretty", options: { destination: 2, translateTime: "SYS:HH:MM:ss.l", ignore: "pid,hostname" } },
    });
  }
  // Logs go to stderr so that stdout stays free for command output (keygen prints the public key there).
  // Written synchronously, as Node writes process.stderr to a pipe: an asynchronous write hands
  // every line to libuv's thread pool and back, which cost about 100 µs a line on these VMs, twice
  // the line itself (BENCHMARKS.md, "Debug lines"). A stalled reader blocks the agent rather than
  // growing an unbounded buffer.
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}
