// `node dist/bench/daemon-probe.js [--paths N] [--gc N]`: the Nix daemon's own answer time, with
// no agent. One raw connection asks QueryPathFromHashPart + QueryPathInfo (a narinfo hit's two
// round trips, alternating with a miss's one) in a loop, while (by phase) nothing else runs, a
// second connection lists the store (QueryAllValidPaths, in a worker thread, as the agent's
// watcher would), `nix-store --delete` removes paths one transaction each, or both. What is
// slow here is the daemon's (or the machine's) floor, not the agent's.
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import {
  ByteQueue, CLIENT_VERSION, Incremental, daemonInfo, encodeClientHello, encodeClientVersion, encodeQueryAllValidPaths,
  encodeQueryPathFromHashPart, encodeQueryPathInfo, queryAllValidPathHashParts, queryPathFromHashPartReply,
  queryPathInfoReply, serverHello, stderrStream, type Decoder,
} from "../protocol/daemon-wire.js";
import { addSyntheticPaths, sql } from "../test/helpers/scale-store.js";
import { randomHashParts } from "./nix32.js";
import { cleanup, installSignalHandlers, registerTempDir, run, spawnTracked } from "./proc.js";

/** One daemon connection, one exchange at a time, decoded as bytes come (no pacing, no pool). */
class RawConnection {
  private readonly q = new ByteQueue();
  private cur: { inc: Incremental<unknown>; done: (e?: Error) => void } | undefined;
  version = 0;
  private constructor(private readonly socket: Socket) {
    socket.on("data", (chunk: Buffer) => this.feed(chunk));
    socket.on("error", (e) => this.cur?.done(e));
  }

  static async open(path: string): Promise<RawConnection> {
    const c = new RawConnection(connect(path));
    const v = Math.min(await c.ask(encodeClientHello(), serverHello), CLIENT_VERSION);
    c.version = v;
    await c.ask(encodeClientVersion(v), function* (q) {
      yield* daemonInfo(q, v);
      yield* stderrStream(q, v);
    });
    return c;
  }

  ask<T>(payload: Buffer, decoder: (q: ByteQueue) => Decoder<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const inc = new Incremental(this.q, decoder);
      this.cur = { inc, done: (e) => (this.cur = undefined, e ? reject(e) : resolve(inc.value)) };
      this.socket.write(payload);
    });
  }

  request<T>(payload: Buffer, reply: (q: ByteQueue, v: number) => Decoder<T>): Promise<T> {
    const v = this.version;
    return this.ask(payload, function* (q) {
      yield* stderrStream(q, v);
      return yield* reply(q, v);
    });
  }

  private feed(chunk: Buffer): void {
    try {
      if (this.cur?.inc.push(chunk)) this.cur.done();
    } catch (e) {
      this.cur?.done(e as Error);
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

if (!isMainThread) {
  // The lister: QueryAllValidPaths back to back until told to stop; reports each listing's time.
  const { socket } = workerData as { socket: string };
  let stop = false;
  parentPort!.on("message", () => (stop = true));
  const c = await RawConnection.open(socket);
  while (!stop) {
    const t = performance.now();
    const list = await c.request(encodeQueryAllValidPaths(), (q) => queryAllValidPathHashParts(q));
    parentPort!.postMessage({ ms: performance.now() - t, paths: list.length / 32 });
  }
  c.close();
  process.exit(0);
}

const pct = (s: number[], q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
const fmt = (ms: number[]) => {
  const s = [...ms].sort((a, b) => a - b);
  return `n ${s.length}, p50 ${pct(s, 0.5).toFixed(2)}, p99 ${pct(s, 0.99).toFixed(2)}, max ${s[s.length - 1]!.toFixed(1)} ms`;
};

const { values } = parseArgs({ options: { paths: { type: "string" }, gc: { type: "string" }, idle: { type: "string" } } });
const paths = Number(values.paths ?? 1_000_000);
const gcEach = Number(values.gc ?? 20_000);
const idleMs = Number(values.idle ?? 8) * 1000;

installSignalHandlers({ keepTemp: false });
const tmp = mkdtempSync(join(tmpdir(), "fleetcache-daemon-probe-"));
registerTempDir(tmp);
const root = join(tmp, "store");
writeFileSync(join(tmp, "real"), "a path Nix added\n");
await run("nix-store", ["--store", root, "--add", join(tmp, "real")]);
await addSyntheticPaths(root, paths);
const rows = (await sql(root, "SELECT id % 10, path FROM ValidPaths ORDER BY id")).split("\n").filter(Boolean).map((l) => l.split("|"));
const hits = rows.filter(([k]) => k === "5").slice(0, 2000).map(([, p]) => p!);
const doomed = rows.filter(([k]) => k === "3").map(([, p]) => p!).slice(0, 2 * gcEach);
for (const p of doomed) writeFileSync(join(root, p), "");
const misses = randomHashParts(2000, new Set());

const socket = join(root, "nix/var/nix/daemon-socket/socket");
mkdirSync(join(root, "nix/var/nix/daemon-socket"), { recursive: true });
const daemon = spawnTracked("nix-daemon", ["--store", root], {
  env: { ...process.env, NIX_DAEMON_SOCKET_PATH: socket, NIX_CONFIG: "sandbox = false\nsubstituters =" },
});
for (let i = 0; i < 400 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 25));
process.stderr.write(`nix-daemon pid ${daemon.pid} (e.g. strace -f -p it)\n`);

const phases = new Map<string, number[]>();
let phase = "idle";
let running = true;
const lookups = (async () => {
  const c = await RawConnection.open(socket);
  for (let i = 0; running; i++) {
    const t = performance.now();
    if (i % 2 === 0) {
      const p = hits[(i >> 1) % hits.length]!;
      const found = await c.request(encodeQueryPathFromHashPart(p.slice(11, 43)), queryPathFromHashPartReply);
      if (found !== p) throw new Error(`hash part of ${p} answered ${found}`);
      await c.request(encodeQueryPathInfo(p), queryPathInfoReply);
    } else {
      await c.request(encodeQueryPathFromHashPart(misses[(i >> 1) % misses.length]!), queryPathFromHashPartReply);
    }
    const ms = performance.now() - t;
    if (!phases.has(phase)) phases.set(phase, []);
    phases.get(phase)!.push(ms);
  }
  c.close();
})();

const lag = monitorEventLoopDelay({ resolution: 10 });
lag.enable();
const lagMax = new Map<string, number>();
const listings: { phase: string; ms: number }[] = [];
async function inPhase(name: string, body: () => Promise<void>, lister: boolean): Promise<void> {
  phase = name;
  lag.reset();
  const w = lister ? new Worker(new URL(import.meta.url), { workerData: { socket } }) : undefined;
  w?.on("message", (m: { ms: number }) => listings.push({ phase: name, ms: m.ms }));
  await body();
  if (w) {
    const exited = new Promise((r) => w.once("exit", r));
    w.postMessage("stop");
    await exited;
  }
  lagMax.set(name, lag.max / 1e6);
}
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const del = async (list: string[]) => {
  for (let i = 0; i < list.length; i += 5000) await run("nix-store", ["--store", root, "--delete", ...list.slice(i, i + 5000)], { log: false });
};

try {
  await inPhase("idle", () => sleep(idleMs), false);
  await inPhase("listing", () => sleep(idleMs), true);
  await inPhase("gc", () => del(doomed.slice(0, gcEach)), false);
  await inPhase("gc+listing", () => del(doomed.slice(gcEach)), true);
  await inPhase("idle after", () => sleep(idleMs / 2), false);
  running = false;
  await lookups;
  console.log(`daemon probe: ${paths} paths, ${gcEach} deleted per gc phase; lookup = hit (2 round trips) or miss (1), ms`);
  for (const [name, ms] of phases) {
    const l = listings.filter((x) => x.phase === name).map((x) => x.ms.toFixed(0));
    console.log(`${name.padEnd(11)} ${fmt(ms)}; probe's own loop delay max ${lagMax.get(name)?.toFixed(0)} ms${l.length ? `; listings ms ${l.join(" ")}` : ""}`);
  }
} finally {
  daemon.kill("SIGKILL");
  await cleanup();
}
