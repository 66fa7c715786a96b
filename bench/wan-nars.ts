// Many small NARs over a WAN link, as a host at one site substitutes a closure held at another:
// host B reaches host A only through the link proxy (latency each way), and fetches COUNT paths
// of KIB KiB through its agent, narinfos first and then the NARs, JOBS at a time (current Nix
// substitutes up to 16 at once). Each NAR is checked against its narinfo. What this measures is
// the round trips a relayed NAR costs across the link, not bandwidth (the link is unshaped).
// The fetching is one Node process in B's namespace (this file with --client), so that no
// process is started per request.
// Usage: node dist/bench/wan-nars.js [--latency-ms 30] [--count 96] [--kib 64] [--jobs 16] [--rounds 3]
// (root: network namespaces). Prints JSON on stdout, progress on stderr.
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { addBlob, hashPart, linkedFleet, narinfoVia } from "../faults/fleet-tools.js";
import { eventually } from "../test/helpers/fleet.js";
import { parseNarinfo } from "../protocol/narinfo.js";
import { normalizeHash } from "../protocol/hash.js";

async function pool<T, R>(items: T[], jobs: number, f: (t: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await f(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(jobs, items.length) }, worker));
  return out;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

interface Round {
  seconds: number;
  narinfoSeconds: number;
  medianNarMs: number;
}

/** In B's namespace: narinfos, then NARs (each checked against its narinfo), `jobs` at a time. */
async function client(base: string, hashParts: string[], jobs: number): Promise<Round> {
  const t0 = performance.now();
  const infos = await pool(hashParts, jobs, async (h) => {
    const r = await fetch(`${base}/${h}.narinfo`);
    if (r.status !== 200) throw new Error(`narinfo ${h}: ${r.status}`);
    return parseNarinfo(await r.text());
  });
  const t1 = performance.now();
  const ms = await pool(infos, jobs, async (info) => {
    const t = performance.now();
    const r = await fetch(`${base}/${info.url}`);
    if (r.status !== 200) throw new Error(`${info.url}: ${r.status}`);
    const body = Buffer.from(await r.arrayBuffer());
    const got = normalizeHash(`sha256:${createHash("sha256").update(body).digest("hex")}`);
    if (body.length !== info.narSize || got !== normalizeHash(info.narHash)) throw new Error(`${info.url}: wrong bytes`);
    return performance.now() - t;
  });
  const t2 = performance.now();
  return { seconds: (t2 - t0) / 1000, narinfoSeconds: (t1 - t0) / 1000, medianNarMs: median(ms) };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      "latency-ms": { type: "string", default: "30" },
      count: { type: "string", default: "96" },
      kib: { type: "string", default: "64" },
      jobs: { type: "string", default: "16" },
      rounds: { type: "string", default: "3" },
      client: { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log("Usage: node dist/bench/wan-nars.js [--latency-ms 30] [--count 96] [--kib 64] [--jobs 16] [--rounds 3]");
    return;
  }
  if (values.client) {
    const hashParts = values.client.split(",").slice(1);
    console.log(JSON.stringify(await client(values.client.split(",")[0]!, hashParts, Number(values.jobs))));
    return;
  }
  const latencyMs = Number(values["latency-ms"]);
  const count = Number(values.count);
  const kib = Number(values.kib);
  const jobs = Number(values.jobs);
  const rounds = Number(values.rounds);
  const log = (s: string) => process.stderr.write(`wan-nars: ${s}\n`);

  const net = await linkedFleet({ latencyMs });
  const { a, b } = net;
  try {
    const paths: string[] = [];
    for (let i = 0; i < count; i++) paths.push(await addBlob(a, `wan-nar-${i}`, kib * 1024));
    await addBlob(b, "b-own", 1024);
    await a.start();
    await b.start(["--peer", net.aViaLink]);
    await eventually("B sees A's paths", () => narinfoVia(b, paths.at(-1)!), 60_000);
    log(`${count} paths of ${kib} KiB on A; B reaches A with ${latencyMs} ms each way; ${jobs} at a time`);
    const results: Round[] = [];
    for (let r = 0; r < rounds; r++) {
      const arg = [b.agent!.url, ...paths.map(hashPart)].join(",");
      const child = b.net.spawn(process.execPath, [fileURLToPath(import.meta.url), "--jobs", String(jobs), "--client", arg], { stdio: ["ignore", "pipe", "inherit"] });
      let out = "";
      child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
      const code = await new Promise<number | null>((res) => child.once("close", res));
      if (code !== 0) throw new Error(`the client failed (${code})`);
      const row = JSON.parse(out) as Round;
      log(`round ${r + 1}: ${row.seconds.toFixed(2)} s (narinfos ${row.narinfoSeconds.toFixed(2)} s), median NAR ${row.medianNarMs.toFixed(0)} ms`);
      results.push(row);
    }
    console.log(JSON.stringify({ latencyMs, count, kib, jobs, results }));
  } finally {
    await net.destroy();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
