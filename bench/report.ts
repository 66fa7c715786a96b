// Markdown for the results, and BENCHMARKS.md: the intro above "## Results" is kept as it is,
// everything from that heading on is replaced by each full run.
import { existsSync, readFileSync, writeFileSync } from "node:fs";

export const RESULTS_HEADING = "## Results";

const DEFAULT_INTRO = `# Benchmarks

\`npm run bench\` (bench/run.ts) compares the fleetcache agent with nginx serving the same store
contents as a static binary cache, on one machine, over 127.0.0.1.

Method, in one run:

- **Fixture**: a temporary chroot Nix store gets a few hundred small paths (one \`nix-build\` of a
  derivation set whose outputs reference each other) and one big path (a single file of
  pseudo-random data, 3 GiB by default, \`--nar-gib N\` to change). \`nix copy --to
  'file://…?compression=none'\` exports the same closure as a static uncompressed binary cache.
- **nginx** serves that directory with Debian's default settings (\`worker_processes auto\`,
  \`sendfile on\`, \`tcp_nopush on\`, keep-alive) and \`access_log off\`.
- **fleetcache** (\`node dist/agent/cli.js agent\`) serves the chroot store itself, signing
  narinfos with a fresh key. Each server's NAR URL is taken from its own narinfo.
- Before measuring, the benchmark checks both servers: narinfo fields equal (agent vs Nix's own
  export), the agent's signature verifies, misses answer 404, and each big NAR downloads whole
  with the NarHash from the narinfo (this also warms the page cache).
- **narinfo hits/misses**: wrk, with a Lua script cycling over all existing narinfos (hits) or
  over 1000 random valid-looking hash parts (misses, 404), 1 connection with \`-t1\` and 4
  connections with \`-t2\`, after a short warm-up. wrk shares the 2 cores with the server.
- **NAR MB/s** (10^6 bytes/s): 1 or 4 parallel \`curl -o /dev/null\` processes downloading the big
  NAR over and over for the run's duration; bytes received / wall time (downloads still running
  at the deadline are cut off and their bytes counted).
- **Memory**: the agent's VmRSS sampled every 100 ms from /proc during its NAR downloads
  (including a rate-limited slow client, which shows whether it honours backpressure), and
  VmHWM, against its RSS before them. A streaming server stays flat regardless of the NAR size.

Nothing here is a test: \`npm test\` does not run it. \`npm run bench -- --quick\` is a smoke run
(small NAR, short runs) that does not touch this file unless \`--write\` is given.
`;

export function writeBenchmarksMd(file: string, results: string): void {
  let intro = DEFAULT_INTRO;
  if (existsSync(file)) {
    const text = readFileSync(file, "utf8");
    const at = text.indexOf(`\n${RESULTS_HEADING}`);
    if (at >= 0) intro = text.slice(0, at + 1);
    else if (text.trim()) intro = text.endsWith("\n") ? text : `${text}\n`;
  }
  writeFileSync(file, `${intro.trimEnd()}\n\n${results.trimEnd()}\n`);
}

/** A Markdown table; numbers right-aligned. */
export function table(header: string[], rows: string[][], align?: Array<"l" | "r">): string {
  const a = align ?? header.map((_, i) => (i === 0 ? "l" : "r"));
  const sep = a.map((x) => (x === "r" ? "---:" : ":---"));
  const line = (cells: string[]) => `| ${cells.join(" | ")} |`;
  return [line(header), line(sep), ...rows.map(line)].join("\n");
}

export function fmtNum(n: number | undefined, digits = 0): string {
  if (n === undefined || !Number.isFinite(n)) return "–";
  return n.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function fmtRatio(a: number | undefined, b: number | undefined): string {
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return "–";
  return `${(a / b).toFixed(2)}×`;
}
