// Where the CPU of a NAR download goes, for nginx and agent builds side by side: a fixed number
// of downloads of the fixture's big NAR (1 GiB) by curl, and per GiB sent: the server's CPU
// (user and system), the clients' (curl), ksoftirqd's, the whole machine's (/proc/stat, all
// CPUs, softirq included) and the rest; TCP segments and bytes per segment; with --perf, the
// server's system calls and context switches. Measurements alternate between the servers, the
// order reversed every round; medians of the rounds.
//
//   node dist/bench/nar-cost.js [--rounds 3] [--clients 1,4] [--downloads 4] [--keep-fixture DIR]
//        [--nginx LABEL:WORKERS:DIRECTIVES ...] [--perf] [--perf-record DIR] LABEL=REPO_DIR ...
//
// It runs itself in a network namespace of its own (`unshare -n`, loopback only), so that the
// segment counters (/proc/net/snmp is per namespace) count this benchmark's traffic alone. The
// CPU figures are the machine's: other engineers' work shows as "rest". --nginx adds nginx
// variants beside the bench's configuration (`nginx`), e.g. `--nginx 'nocork::tcp_nopush off;'`
// or `--nginx 'one:1:'` (one worker). --perf-record DIR: `perf record -a -g` (the whole machine)
// around each measurement, DIR/LABEL-CLIENTS-ROUND.data (and .pids: the server's processes). Needs root, nginx, curl (and perf).
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { hashPart, keptFixture, type Fixture } from "./fixture.js";
import { descendants, selfAndChildrenCpuSeconds, warmFile } from "./load.js";
import { cleanup, installSignalHandlers, registerTempDir, run } from "./proc.js";
import { httpGet, parseNarinfo, startAgent, startNginx, type Server } from "./servers.js";

if (process.env.FLEETCACHE_NAR_COST_NETNS !== "1") {
  // Again, inside a fresh network namespace with its loopback up.
  const r = spawnSync("unshare", ["-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", process.execPath, ...process.argv.slice(1)], {
    stdio: "inherit",
    env: { ...process.env, FLEETCACHE_NAR_COST_NETNS: "1" },
  });
  process.exit(r.status ?? 1);
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    rounds: { type: "string", default: "3" },
    clients: { type: "string", default: "1,4" },
    downloads: { type: "string", default: "4" },
    "keep-fixture": { type: "string" },
    nginx: { type: "string", multiple: true, default: [] },
    perf: { type: "boolean", default: false },
    "perf-record": { type: "string" },
  },
});
const rounds = Number(values.rounds);
const clientCounts = values.clients.split(",").map(Number);
const downloads = Number(values.downloads);
const log = (m: string) => process.stderr.write(m + "\n");
const CLK_TCK = 100;

/** utime and stime (seconds) of a process and its live descendants, all threads. */
function procCpu(pids: number[]): { user: number; sys: number } {
  let user = 0;
  let sys = 0;
  for (const p of pids) {
    try {
      const stat = readFileSync(`/proc/${p}/stat`, "utf8");
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      user += Number(f[11]);
      sys += Number(f[12]);
    } catch {
      /* exited */
    }
  }
  return { user: user / CLK_TCK, sys: sys / CLK_TCK };
}

const ksoftirqd = readdirSync("/proc").filter((p) => /^\d+$/.test(p)).map(Number).filter((p) => {
  try {
    return readFileSync(`/proc/${p}/comm`, "utf8").startsWith("ksoftirqd/");
  } catch {
    return false;
  }
});

/** /proc/stat's first line: busy seconds (user, nice, system, irq, softirq) and softirq alone. */
function machine(): { busy: number; softirq: number } {
  const v = (readFileSync("/proc/stat", "utf8").split("\n")[0] ?? "").trim().split(/\s+/).slice(1).map(Number);
  const at = (i: number) => v[i] ?? 0;
  return { busy: (at(0) + at(1) + at(2) + at(5) + at(6)) / CLK_TCK, softirq: at(6) / CLK_TCK };
}

/** TcpOutSegs and IpExtOutOctets of this network namespace. */
function segments(): { segs: number; octets: number } {
  const table = (file: string, proto: string, field: string): number => {
    const lines = readFileSync(file, "utf8").split("\n").filter((l) => l.startsWith(proto + ":"));
    const names = lines[0]!.split(/\s+/);
    return Number(lines[1]!.split(/\s+/)[names.indexOf(field)]);
  };
  return { segs: table("/proc/net/snmp", "Tcp", "OutSegs"), octets: table("/proc/net/netstat", "IpExt", "OutOctets") };
}

interface Snapshot {
  server: { user: number; sys: number };
  clients: number;
  ksoftirqd: number;
  machine: { busy: number; softirq: number };
  net: { segs: number; octets: number };
  t: bigint;
}

function snapshot(serverPids: number[]): Snapshot {
  const k = procCpu(ksoftirqd);
  return {
    server: procCpu(serverPids),
    clients: selfAndChildrenCpuSeconds(),
    ksoftirqd: k.user + k.sys,
    machine: machine(),
    net: segments(),
    t: process.hrtime.bigint(),
  };
}

const PERF_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_sendfile64", "syscalls:sys_enter_preadv2", "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait", "context-switches"];

/** perf stat on the server's processes until stopped: event counts. */
function perfStat(pids: number[]): { stop(): Promise<Map<string, number>> } {
  const child: ChildProcess = spawn("perf", ["stat", "-x,", "-e", PERF_EVENTS.join(","), "-p", pids.join(",")], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  return {
    stop: () =>
      new Promise((res) => {
        child.on("exit", () => {
          const m = new Map<string, number>();
          for (const line of err.split("\n")) {
            const f = line.split(",");
            if (f.length > 3 && PERF_EVENTS.includes(f[2]!)) m.set(f[2]!, Number(f[0]));
          }
          res(m);
        });
        child.kill("SIGINT");
      }),
  };
}

async function download(url: string, size: number, n: number): Promise<number> {
  let bytes = 0;
  for (let i = 0; i < n; i++) {
    const r = await run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url], { allowFail: true, log: false });
    const [code, got] = r.stdout.trim().split(" ");
    if (r.code !== 0 || code !== "200" || Number(got) !== size) throw new Error(`${url}: curl exit ${r.code}, HTTP ${code}, ${got} of ${size} bytes`);
    bytes += size;
  }
  return bytes;
}

type Row = Record<string, number>;

/** perf record of the whole machine, with call graphs, until stopped. */
function perfRecord(file: string): { stop(): Promise<void> } {
  const child = spawn("perf", ["record", "-a", "-g", "-q", "-o", file], { stdio: "ignore" });
  return { stop: () => new Promise((res) => (child.on("exit", () => res()), child.kill("SIGINT"))) };
}

async function measure(s: Server, nar: { url: string; size: number; file: string }, clients: number, round: number): Promise<Row> {
  await warmFile(nar.file);
  const pids = [s.pid, ...descendants(s.pid)];
  const perf = values.perf ? perfStat(pids) : undefined;
  const recFile = values["perf-record"] ? join(resolve(values["perf-record"]), `${s.name}-${clients}-${round + 1}.data`) : undefined;
  if (recFile) writeFileSync(`${recFile}.pids`, pids.join("\n") + "\n"); // whose samples are the server's
  const rec = recFile ? perfRecord(recFile) : undefined;
  if (perf || rec) await new Promise((r) => setTimeout(r, 500)); // perf attached
  const a = snapshot(pids);
  const each = Math.max(1, Math.round(downloads / clients));
  const bytes = (await Promise.all(Array.from({ length: clients }, () => download(nar.url, nar.size, each)))).reduce((x, y) => x + y, 0);
  const b = snapshot(pids);
  const counts = await perf?.stop();
  await rec?.stop();
  const gib = bytes / 2 ** 30;
  const per = (x: number) => x / gib;
  const server = b.server.user - a.server.user + b.server.sys - a.server.sys;
  const clientCpu = b.clients - a.clients;
  const ksoft = b.ksoftirqd - a.ksoftirqd;
  const busy = b.machine.busy - a.machine.busy;
  const segs = b.net.segs - a.net.segs;
  const row: Row = {
    "MB/s": bytes / (Number(b.t - a.t) / 1e9) / 1e6,
    "server s/GiB": per(server),
    "server user": per(b.server.user - a.server.user),
    "server sys": per(b.server.sys - a.server.sys),
    "clients s/GiB": per(clientCpu),
    "ksoftirqd s/GiB": per(ksoft),
    "machine s/GiB": per(busy),
    "softirq (in the above)": per(b.machine.softirq - a.machine.softirq),
    "rest s/GiB": per(busy - server - clientCpu - ksoft),
    "segments/GiB": per(segs),
    "bytes/segment": (b.net.octets - a.net.octets) / segs,
  };
  for (const [k, v] of counts ?? []) row[`${k === "raw_syscalls:sys_enter" ? "all syscalls" : k.replace("syscalls:sys_enter_", "")}/GiB`] = per(v);
  return row;
}

function fixture(): Promise<Fixture> {
  const keep = values["keep-fixture"] ? resolve(values["keep-fixture"]) : undefined;
  return keptFixture(keep, "fleetcache-nar-cost-", { smallCount: 10, bigBytes: 2 ** 30 }, log);
}

async function main(): Promise<void> {
  installSignalHandlers({ keepTemp: false });
  const fx = await fixture();
  const runDir = mkdtempSync(join(tmpdir(), "fleetcache-nar-cost-run-"));
  chmodSync(runDir, 0o755);
  registerTempDir(runDir);
  const servers: Server[] = [await startNginx(join(runDir, "nginx"), fx.cacheDir, "nginx")];
  for (const spec of values.nginx) {
    const [label, workers, ...rest] = spec.split(":");
    servers.push(await startNginx(join(runDir, `nginx-${label}`), fx.cacheDir, label, { workers: workers || undefined, serverExtra: rest.join(":") || undefined }));
  }
  for (const p of positionals) {
    const i = p.indexOf("=");
    if (i <= 0) throw new Error(`expected LABEL=REPO_DIR, got ${p}`);
    const agent = await startAgent(join(runDir, `agent-${p.slice(0, i)}`), resolve(p.slice(i + 1)), fx.storeRoot);
    servers.push({ ...agent, name: p.slice(0, i) });
  }
  const nars = new Map<Server, { url: string; size: number; file: string }>();
  for (const s of servers) {
    const r = await httpGet(`${s.baseUrl}/${hashPart(fx.bigPath)}.narinfo`);
    const f = parseNarinfo(r.body.toString()).fields;
    const url = new URL(f.get("URL") ?? "", `${s.baseUrl}/`).toString();
    const file = s.name === "nginx" || s.child.spawnfile === "nginx" ? join(fx.cacheDir, decodeURIComponent(new URL(url).pathname)) : join(fx.storeRoot, fx.bigPath);
    nars.set(s, { url, size: Number(f.get("NarSize")), file });
  }
  const results = new Map<string, Row[]>();
  for (let round = 0; round < rounds; round++) {
    for (const clients of clientCounts) {
      for (const s of round % 2 === 0 ? servers : [...servers].reverse()) {
        const row = await measure(s, nars.get(s)!, clients, round);
        const key = `${clients} ${s.name}`;
        results.set(key, [...(results.get(key) ?? []), row]);
        log(`round ${round + 1}, ${clients} client(s), ${s.name}: ${Object.entries(row).map(([k, v]) => `${k} ${fmt(v)}`).join(", ")}`);
      }
    }
  }
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor((xs.length - 1) / 2)]!;
  for (const clients of clientCounts) {
    const cols = servers.map((s) => results.get(`${clients} ${s.name}`)!);
    const keys = [...new Set(cols.flatMap((c) => Object.keys(c[0]!)))];
    const out = [`${clients} client(s), per GiB sent, medians of ${rounds} (each round):`, "", `| | ${servers.map((s) => s.name).join(" | ")} |`, `| :--- |${servers.map(() => " ---: |").join("")}`];
    for (const k of keys) out.push(`| ${k} | ${cols.map((c) => `${fmt(median(c.map((r) => r[k] ?? NaN)))} (${c.map((r) => fmt(r[k] ?? NaN)).join(", ")})`).join(" | ")} |`);
    process.stdout.write(out.join("\n") + "\n\n");
  }
}

function fmt(v: number): string {
  return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toFixed(3);
}

main()
  .then(() => cleanup())
  .then(() => process.exit(0))
  .catch(async (e: unknown) => {
    log(`FAILED: ${(e as Error).stack ?? String(e)}`);
    await cleanup();
    process.exit(1);
  });
