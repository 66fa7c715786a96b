// The holder's side of a mesh NAR transfer on its own: this process serves a NAR from a Nix
// chroot store with the agent's responder (serveNar), a child process fetches it with the
// agent's requester (openNar, hashing every byte), over TCP on 127.0.0.1. Each process measures
// its own CPU, so the holder's CPU per GB is not mixed with the requester's (bench/stream.ts runs
// both ends in one process; bench/mesh.ts adds Nix and HTTP).
//   node dist/bench/nar-send.js [MiB, default 256] [rounds, default 4] [--parallel N]
// --parallel fetches the NAR N times at once on the one connection (each round moves N x MiB).
// Prints per round MB/s, each side's CPU seconds per GB of NAR (the holder's split into user and
// system time) and the holder's full GCs. CPU per GB moves ±30 % with the machine's load: compare
// builds in alternating runs.
import { fork } from "node:child_process";
import { PerformanceObserver, constants as perfConstants } from "node:perf_hooks";
import { randomBytes } from "node:crypto";
import { appendFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { pino } from "pino";
import { multiaddr } from "@multiformats/multiaddr";
import { formatPublicKey, formatSecretKey, generateKeyPair, parsePublicKey, parseSecretKey } from "../protocol/keys.js";
import { storePathHashPart } from "../protocol/store-path.js";
import { createMeshNode } from "../agent/mesh/node.js";
import { NarVerifier, openNar, serveNar, type NarFetchRequest } from "../agent/mesh/nar-service.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { tuneGcForBuffers } from "../agent/gc-tuning.js";
import { addToStore, tempDir } from "../test/helpers/nix.js";

const log = pino({ level: "silent" });
const cpuSeconds = (c: NodeJS.CpuUsage) => (c.user + c.system) / 1e6;

/** V8's full (mark-compact) collections in this process, the costly ones (agent/gc-tuning.ts). */
let majorGcs = 0;
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) if ((e as unknown as { detail?: { kind?: number } }).detail?.kind === perfConstants.NODE_PERFORMANCE_GC_MAJOR) majorGcs++;
}).observe({ entryTypes: ["gc"] });

type ToRequester = { round: number } | { stop: true };
type FromRequester = { ready: true } | { round: number; cpu: number; bytes: number };

/** Child: dials the holder, then fetches and hashes the NAR `parallel` times per round asked. */
async function requester(): Promise<void> {
  const { key, holderKey, addr, req, parallel } = JSON.parse(process.env.NAR_SEND_REQUESTER!) as {
    key: string; holderKey: string; addr: string; req: NarFetchRequest; parallel: number;
  };
  const node = await createMeshNode({ key: parseSecretKey(key), trusted: [parsePublicKey(holderKey)], listen: "/ip4/127.0.0.1/tcp/0", log });
  const conn = await node.libp2p.dial(multiaddr(addr));
  const peer = conn.remotePeer.toString();
  const one = async () => {
    const v = new NarVerifier(req.narHash, req.narSize);
    for await (const c of await openNar(node, peer, req)) v.update(c);
    v.finish();
    return req.narSize;
  };
  process.on("message", async (m: ToRequester) => {
    if ("stop" in m) {
      await node.stop();
      process.exit(0);
    }
    const c0 = process.cpuUsage();
    const sizes = await Promise.all(Array.from({ length: parallel }, one));
    process.send!({ round: m.round, cpu: cpuSeconds(process.cpuUsage(c0)), bytes: sizes.reduce((a, b) => a + b, 0) } satisfies FromRequester);
  });
  process.send!({ ready: true } satisfies FromRequester);
}

async function holder(): Promise<void> {
  const { values: flags, positionals } = parseArgs({ allowPositionals: true, options: { parallel: { type: "string", default: "1" } } });
  const mib = Number(positionals[0] ?? 256);
  const rounds = Number(positionals[1] ?? 4);
  const parallel = Number(flags.parallel);
  const tmp = tempDir("fleetcache-nar-send-");
  try {
    const file = join(tmp.dir, "data");
    for (let i = 0; i < mib; i += 16) appendFileSync(file, randomBytes(Math.min(16, mib - i) << 20)); // not in peak RSS
    const root = join(tmp.dir, "store");
    const path = await addToStore(root, file);
    const [ka, kb] = [generateKeyPair("nar-send-a"), generateKeyPair("nar-send-b")];
    const local = new LocalStore(root, new Signer([ka]));
    const info = (await local.pathInfo(storePathHashPart(path)))!;
    const node = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
    await serveNar(node, local, log);
    const req: NarFetchRequest = { hashPart: storePathHashPart(path), narHash: info.narHash, narSize: info.narSize, offset: 0 };
    const env = { ...process.env, NAR_SEND_REQUESTER: JSON.stringify({ key: formatSecretKey(kb), holderKey: formatPublicKey(ka), addr: node.addresses()[0]!.toString(), req, parallel }) };
    const child = fork(process.argv[1]!, [], { env });
    const next = () => new Promise<FromRequester>((resolve) => child.once("message", resolve));
    await next(); // ready
    console.log(`node ${process.version}, NAR of ${mib} MiB x ${parallel} a round, ${rounds} rounds; CPU s per GB of NAR`);
    const holderRates: number[] = [];
    for (let round = 0; round < rounds; round++) {
      const c0 = process.cpuUsage();
      const gc0 = majorGcs;
      const t0 = process.hrtime.bigint();
      const answer = next();
      child.send({ round } satisfies ToRequester);
      const r = (await answer) as { cpu: number; bytes: number };
      await new Promise((resolve) => setImmediate(resolve)); // GC entries arrive after the collection
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      const gb = r.bytes / 1e9;
      const used = process.cpuUsage(c0);
      const holderCpu = cpuSeconds(used);
      holderRates.push(holderCpu / gb);
      console.log(
        `round ${round + 1}: ${(r.bytes / 1e6 / secs).toFixed(0)} MB/s; holder ${(holderCpu / gb).toFixed(2)} ` +
          `(user ${(used.user / 1e6 / gb).toFixed(2)}, system ${(used.system / 1e6 / gb).toFixed(2)}, ${majorGcs - gc0} full GCs), requester ${(r.cpu / gb).toFixed(2)}`,
      );
    }
    const sorted = [...holderRates].sort((a, b) => a - b);
    console.log(`holder CPU s/GB: median ${sorted[sorted.length >> 1]!.toFixed(2)}, min ${sorted[0]!.toFixed(2)}`);
    child.send({ stop: true } satisfies ToRequester);
    await new Promise((r) => child.once("exit", r));
    await node.stop();
    local.close();
  } finally {
    tmp.cleanup();
  }
}

tuneGcForBuffers(); // as the agent does
if (process.env.NAR_SEND_REQUESTER) await requester();
else await holder();
