// NAR bodies with sendfile against pooled reads, in one process (the agent's HTTP server over a
// chroot store, curl as the client): CPU per GB of the server process for NARs of many files of
// one size (where the region threshold, REGION_MIN, should sit) and for one big file (with the
// sendfile calls it took per GB). Alternating, several rounds. Needs nix-store and curl.
//
//   node dist/bench/nar-sendfile.js [--sizes-kib 16,32,64,128,256] [--files 400] [--mb 400]
//        [--big-mib 1024] [--rounds 3]
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs, promisify } from "node:util";
import type { CacheContext } from "../agent/http/cache-routes.js";
import { loadSendfile, type SendfileBinding } from "../agent/http/send-file.js";
import { createHttpServer } from "../agent/http/server.js";
import { createLogger } from "../agent/log.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { narUrl } from "../protocol/nar-url.js";
import type { PathInfo } from "../protocol/path-info.js";
import type { NarPieceOptions } from "../agent/source.js";

const run = promisify(execFile);
const { values } = parseArgs({
  options: {
    "sizes-kib": { type: "string", default: "16,32,64,128,256" },
    files: { type: "string", default: "400" },
    mb: { type: "string", default: "400" },
    "big-mib": { type: "string", default: "1024" },
    rounds: { type: "string", default: "3" },
  },
});
const loaded = loadSendfile();
if (!loaded.binding) throw new Error(loaded.why);
const real = loaded.binding;

const dir = mkdtempSync(join(tmpdir(), "fleetcache-nar-sendfile-"));
const root = join(dir, "store");
try {
  const sizes = values["sizes-kib"].split(",").map((k) => Number(k) << 10);
  const cases: { name: string; path: string; regionMin: number }[] = [];
  for (const size of sizes) {
    const t = join(dir, `files-${size >> 10}k`);
    mkdirSync(t);
    for (let i = 0; i < Number(values.files); i++) writeFileSync(join(t, `f${i}`), randomBytes(size));
    cases.push({ name: `${values.files} files of ${size >> 10} KiB`, path: await add(t), regionMin: size });
  }
  const big = join(dir, "big");
  writeFileSync(big, randomBytes(Number(values["big-mib"]) << 20));
  cases.push({ name: `one file of ${values["big-mib"]} MiB`, path: await add(big), regionMin: 128 << 10 });

  const local = new LocalStore(root, new Signer([]));
  // The region threshold is set per case by a store whose narPieces passes its own regionMin.
  let regionMin = Infinity;
  const store = new Proxy(local, {
    get: (target, prop) => {
      if (prop === "narPieces") return (i: PathInfo, s: number, e: number, o: NarPieceOptions = {}) => target.narPieces(i, s, e, { ...o, regionMin });
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
  const calls = { n: 0 };
  const counting: SendfileBinding = {
    sendfile: ((...args: Parameters<SendfileBinding["sendfile"]>) => {
      calls.n++;
      (real.sendfile as (...a: unknown[]) => void)(...args);
    }) as SendfileBinding["sendfile"],
  };
  const ctx = { source: store, local: store, priority: 30, log: createLogger({ level: "silent", pretty: false }), sendfile: counting } as unknown as CacheContext;
  const server = createHttpServer(ctx);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const results = new Map<string, string[]>();
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const c of cases) {
      const modes = round % 2 === 0 ? ["sendfile", "pooled"] : ["pooled", "sendfile"];
      for (const mode of modes) {
        regionMin = mode === "sendfile" ? c.regionMin : Infinity;
        const info = (await local.pathInfo(c.path.slice(11, 43)))!;
        const url = base + "/" + narUrl(c.path.slice(11, 43), info.narHash);
        const reps = Math.max(1, Math.ceil((Number(values.mb) * 1e6) / info.narSize));
        const args = ["-s", "--fail"];
        for (let i = 0; i < reps; i++) args.push("-o", "/dev/null", url);
        calls.n = 0;
        const cpu0 = process.cpuUsage();
        const t0 = performance.now();
        await run("curl", args);
        const cpu = process.cpuUsage(cpu0);
        const gb = (reps * info.narSize) / 1e9;
        const line = `${((cpu.user + cpu.system) / 1e6 / gb).toFixed(3)} s/GB, ${Math.round((gb * 1000) / ((performance.now() - t0) / 1000))} MB/s${mode === "sendfile" ? `, ${Math.round(calls.n / gb)} calls/GB` : ""}`;
        const key = `${c.name}, ${mode}`;
        results.set(key, [...(results.get(key) ?? []), line]);
        console.error(`round ${round + 1} ${key}: ${line}`);
      }
    }
  }
  console.log("server process CPU per GB (user + system), MB/s, sendfile calls per GB; each round:");
  for (const [k, v] of results) console.log(`${k.padEnd(34)} ${v.join(" | ")}`);
  server.close();
  local.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}

async function add(path: string): Promise<string> {
  return (await run("nix-store", ["--store", root, "--add", path])).stdout.trim();
}
