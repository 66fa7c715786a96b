// What every fault scenario shares: its shape, the figures it reports, and measurements of the
// agents it runs (RSS and CPU from /proc, latency percentiles, what their logs say happened).
import { readFileSync } from "node:fs";
import type { AgentProcess } from "../test/helpers/agent.js";

export interface ScenarioContext {
  /** How long a timed scenario's main phase runs, in ms (its default, or --minutes); 0 for the others. */
  durationMs: number;
  /** Progress lines for the operator (stderr). */
  log(line: string): void;
}

export interface ScenarioResult {
  /** Whether the scenario's goal (its row in the table) was met. */
  ok: boolean;
  /** What happened, in numbers and short phrases, in the order they should be printed. */
  figures: [string, string | number][];
}

export interface Scenario {
  name: string;
  title: string;
  /** The goal, as the table states it. */
  goal: string;
  /** For timed scenarios (soaks, long runs): how long they run unless --minutes says otherwise. */
  defaultMinutes?: number;
  run(ctx: ScenarioContext): Promise<ScenarioResult>;
}

/** Samples one process's resident memory and CPU time (the agent runs as the pid `ip netns exec` exec'd). */
export class ProcessMeter {
  readonly #pid: number;
  readonly #start: { cpu: number; at: number };
  #maxRss = 0;
  readonly firstRss: number;
  #lastRss = 0;

  constructor(pid: number) {
    this.#pid = pid;
    this.#start = { cpu: this.#cpuMs(), at: performance.now() };
    this.firstRss = this.sample();
  }

  static of(agent: AgentProcess): ProcessMeter {
    return new ProcessMeter(agent.child.pid!);
  }

  /** RSS in bytes now (0 once the process is gone); tracks the maximum. */
  sample(): number {
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${this.#pid}/status`, "utf8"));
      this.#lastRss = Number(m?.[1] ?? 0) * 1024;
    } catch {
      this.#lastRss = 0;
    }
    this.#maxRss = Math.max(this.#maxRss, this.#lastRss);
    return this.#lastRss;
  }

  #cpuMs(): number {
    try {
      // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
      const stat = readFileSync(`/proc/${this.#pid}/stat`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100; // USER_HZ is 100 on Linux
    } catch {
      return NaN;
    }
  }

  /** "RSS 80→84 MiB (max 90), CPU 3.2 % of a core" since the meter was made. */
  summary(): string {
    this.sample();
    const cpu = ((this.#cpuMs() - this.#start.cpu) / (performance.now() - this.#start.at)) * 100;
    return `RSS ${mib(this.firstRss)}→${mib(this.#lastRss)} MiB (max ${mib(this.#maxRss)}), CPU ${cpu.toFixed(1)} % of a core`;
  }
}

export const mib = (bytes: number) => (bytes / (1 << 20)).toFixed(1);

/** "p50 1.2 ms, p99 3.4 ms, max 5.6 ms (n=100)". */
export function percentiles(ms: number[]): string {
  if (ms.length === 0) return "no samples";
  const s = [...ms].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
  const f = (v: number) => (v < 10 ? v.toFixed(2) : v.toFixed(0));
  return `p50 ${f(at(0.5))} ms, p99 ${f(at(0.99))} ms, max ${f(s.at(-1)!)} ms (n=${s.length})`;
}

/** The agent's JSON log lines whose message matches. */
export function logLines(agent: AgentProcess | undefined, msg: RegExp): { time: number; msg: string; [k: string]: unknown }[] {
  if (!agent) return [];
  const out = [];
  for (const line of agent.logs().split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      const rec = JSON.parse(line) as { time: number; msg: string };
      if (msg.test(rec.msg)) out.push(rec);
    } catch {
      // a line cut by the read: not ours to judge
    }
  }
  return out;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
