// Summarizes a V8 .cpuprofile (from `npm run bench -- --agent-cpu-prof DIR`): the functions with
// the most self time, and the most inclusive time, so a profile can be read without DevTools.
// Usage: node dist/bench/profile-summary.js FILE.cpuprofile [TOP] [--from US --to US]
// --from/--to keep the samples taken in that window of the monotonic clock, in µs (V8 stamps
// samples with it; bench/mesh.js prints each copy's window as copyWindowsUs).
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

function label(n: ProfileNode): string {
  const f = n.callFrame;
  const name = f.functionName || "(anonymous)";
  if (!f.url) return name;
  const url = f.url.replace(/^file:\/\//, "").replace(/^.*\/(node_modules|dist)\//, "$1/");
  return `${name} ${url}:${f.lineNumber + 1}`;
}

function main(): void {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { from: { type: "string" }, to: { type: "string" } } });
  const [file, topText] = positionals;
  if (!file) {
    console.error("usage: profile-summary FILE.cpuprofile [TOP] [--from US --to US]");
    process.exit(2);
  }
  const top = Number(topText ?? 25);
  const from = Number(values.from ?? -Infinity);
  const to = Number(values.to ?? Infinity);
  const p = JSON.parse(readFileSync(file, "utf8")) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  // Self time per node from samples and their time deltas (µs).
  const selfUs = new Map<number, number>();
  const samples = p.samples ?? [];
  const deltas = p.timeDeltas ?? [];
  let at = p.startTime;
  for (let i = 0; i < samples.length; i++) {
    const id = samples[i] as number;
    at += deltas[i] ?? 0; // this sample's time stamp
    if (at < from || at > to) continue;
    const dt = deltas[i + 1] ?? deltas[i] ?? 0;
    selfUs.set(id, (selfUs.get(id) ?? 0) + dt);
  }
  const total = [...selfUs.values()].reduce((a, b) => a + b, 0);
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

  const self = new Map<string, number>();
  const incl = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const n = byId.get(id);
    if (!n) continue;
    self.set(label(n), (self.get(label(n)) ?? 0) + us);
    // Inclusive: credit each distinct function on the stack once.
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const node = byId.get(cur);
      if (!node) break;
      const l = label(node);
      if (seen.has(l)) continue;
      seen.add(l);
      incl.set(l, (incl.get(l) ?? 0) + us);
    }
  }
  const print = (title: string, m: Map<string, number>) => {
    console.log(`\n${title} (of ${(total / 1e6).toFixed(2)} s sampled)`);
    for (const [l, us] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top)) {
      console.log(`${((us / total) * 100).toFixed(1).padStart(6)} %  ${(us / 1e3).toFixed(0).padStart(8)} ms  ${l}`);
    }
  };
  print("Self time", self);
  print("Inclusive time", incl);
}

main();
