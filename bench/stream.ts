// Raw throughput of one mesh stream (TCP + noise + yamux, the agent's own node and writer) against
// plain TCP, both on loopback in this one process, so the figures compare Node versions and
// libp2p releases without Nix or HTTP in the way. Prints MB/s and CPU seconds per GB. The
// process uses the agent's GC settings (agent/gc-tuning.ts; FLEETCACHE_V8_DEFAULTS=1: V8's).
//   node dist/bench/stream.js [MiB, default 512] [rounds, default 3] [--parallel N] [--chunk-kib K] [--fresh]
// --parallel splits the bytes over N streams on the one connection; --chunk-kib is the writer's
// chunk size (64; the NAR responder writes the store's 1024 KiB reads); --fresh writes a newly
// allocated buffer per chunk, as the NAR responder does, instead of one reused buffer. Each round
// also counts V8's full (mark-compact) collections.
import { createConnection, createServer, type AddressInfo } from "node:net";
import { PerformanceObserver, constants as perfConstants } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { createMeshNode } from "../agent/mesh/node.js";
import { StreamReader, writeAll } from "../agent/mesh/stream-io.js";
import { tuneGcForBuffers } from "../agent/gc-tuning.js";

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: { parallel: { type: "string", default: "1" }, "chunk-kib": { type: "string", default: "64" }, fresh: { type: "boolean", default: false } },
});
const CHUNK = Number(flags["chunk-kib"]) * 1024;
const parallel = Number(flags.parallel);
const mib = Number(positionals[0] ?? 512);
const rounds = Number(positionals[1] ?? 3);
const total = mib * 1024 * 1024;
const payload = new Uint8Array(CHUNK).fill(7);

function* chunks(bytes = total): Generator<Uint8Array> {
  for (let sent = 0; sent < bytes; sent += CHUNK) {
    const n = Math.min(CHUNK, bytes - sent);
    yield flags.fresh ? Buffer.allocUnsafe(n).fill(7) : payload.subarray(0, n);
  }
}

/** Full collections since the last call (the costly ones; see agent/gc-tuning.ts). */
let majorGcs = 0;
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) if ((e as unknown as { detail?: { kind?: number } }).detail?.kind === perfConstants.NODE_PERFORMANCE_GC_MAJOR) majorGcs++;
}).observe({ entryTypes: ["gc"] });
const takeMajorGcs = () => {
  const n = majorGcs;
  majorGcs = 0;
  return n;
};

interface Figure {
  mbps: number;
  cpuPerGb: number;
  majorGcs: number;
}

/** Wall time and CPU (user + system, whole process) of one transfer of `total` bytes. */
async function measure(transfer: () => Promise<number>): Promise<Figure> {
  takeMajorGcs();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const n = await transfer();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  // Entries arrive after the collection: let the observer run before counting.
  await new Promise((r) => setImmediate(r));
  if (n !== total) throw new Error(`received ${n} of ${total} bytes`);
  return { mbps: total / 1e6 / secs, cpuPerGb: (cpu.user + cpu.system) / 1e6 / (total / 1e9), majorGcs: takeMajorGcs() };
}

async function tcpRound(): Promise<Figure> {
  let received = 0;
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const server = createServer((sock) => {
    sock.on("data", (b: Buffer) => (received += b.length));
    sock.on("end", done);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  try {
    return await measure(async () => {
      const sock = createConnection(port, "127.0.0.1");
      await new Promise<void>((r) => sock.once("connect", r));
      for (const c of chunks()) if (!sock.write(c)) await new Promise((r) => sock.once("drain", r));
      sock.end();
      await finished;
      return received;
    });
  } finally {
    server.close();
  }
}

async function main(): Promise<void> {
  tuneGcForBuffers();
  const log = pino({ level: "silent" });
  const ka = generateKeyPair("bench-a");
  const kb = generateKeyPair("bench-b");
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  const PROTOCOL = "/fleetcache-bench/stream/1";
  await a.handle(PROTOCOL, async ({ stream }) => {
    await writeAll(stream, chunks(total / parallel));
  }, { maxInboundStreams: parallel + 4 });
  const one = async () => {
    const { stream, reader } = await b.open(a.addresses()[0]!, PROTOCOL);
    let n = 0;
    for await (const c of (reader as StreamReader).chunks()) n += c.length;
    await stream.close(); // or open streams pile up past the handler's limit round by round
    return n;
  };
  const meshRound = () =>
    measure(async () => (await Promise.all(Array.from({ length: parallel }, one))).reduce((x, y) => x + y, 0));
  const fmt = (f: Figure) => `${f.mbps.toFixed(0)} MB/s, ${f.cpuPerGb.toFixed(2)} CPU s/GB, ${f.majorGcs} full GCs`;
  console.log(
    `node ${process.version}, ${mib} MiB a round in ${parallel} stream(s), ${CHUNK / 1024} KiB ${flags.fresh ? "fresh" : "reused"} chunks, ` +
      `${rounds} rounds (best shown last)`,
  );
  const best = (fs: Figure[]) => fs.reduce((x, y) => (y.mbps > x.mbps ? y : x));
  const mesh: Figure[] = [];
  const tcp: Figure[] = [];
  for (let i = 0; i < rounds; i++) {
    mesh.push(await meshRound());
    tcp.push(await tcpRound());
    console.log(`round ${i + 1}: mesh ${fmt(mesh.at(-1)!)}; tcp ${fmt(tcp.at(-1)!)}`);
  }
  console.log(`best: mesh ${fmt(best(mesh))}; tcp ${fmt(best(tcp))}`);
  await a.stop();
  await b.stop();
}

await main();
