// Markdown for the results, and BENCHMARKS.md: the intro above "## Results" is kept as it is,
// everything from that heading on is replaced by each full run.
import { existsSync, readFileSync, writeFileSync } from "node:fs";

export const RESULTS_HEADING = "## Results";

const DEFAULT_INTRO = `# Benchmarks

\`npm run bench\` (bench/run.ts) compares the fleetcache agent with nginx serving the same store
contents as a static binary cache, on one machine, over 127.0.0.1. It takes about 3.5 minutes
on an idle machine and about 10 GiB of temporary disk space (\`--nar-gib\` sets the big path's size, \`--quick\`
does a 45-second smoke run that leaves this file alone unless \`--write\` is given;
\`--help\` lists the rest). It is not part of \`npm test\`.

Method, in one run:

- **Fixture**: a temporary chroot Nix store gets a few hundred small paths (one \`nix-build\` of a
  derivation set whose outputs reference each other) and one big path (a single file of
  pseudo-random data, 3 GiB by default). \`nix copy --to 'file://…?compression=none'\` exports
  the same closure as a static uncompressed binary cache.
- **nginx** serves that directory with Debian's default settings (\`worker_processes auto\`,
  \`sendfile on\`, \`tcp_nopush on\`, keep-alive) and \`access_log off\`.
- **fleetcache** (\`node dist/agent/cli.js agent\`) serves the chroot store itself, signing
  narinfos with a fresh key. Each server's NAR URL is taken from its own narinfo.
- **Checks first**: the agent's narinfo fields equal those Nix wrote for nginx, its signatures
  verify, random hashes answer 404, and each server's big NAR downloads whole with the NarHash
  of the narinfo (which also puts both NARs' files in the page cache).
- **narinfo hits/misses per second**: wrk with a Lua script cycling over all existing narinfos
  (hits) or over 1000 random valid-looking hash parts (misses, 404); 1 connection with \`-t1\`,
  4 connections with \`-t2\`, after a 2-second warm-up. wrk shares the machine's 2 CPUs with
  the server. For the 1-connection runs wrk and the server are pinned to the same CPU
  (\`--pin1\`): on this VM a wake-up across CPUs costs about 100 µs, so unpinned 1-connection
  results jump between two levels depending on where the scheduler puts the two processes
  (nginx measured about 9,000/s apart and 26,000/s together). Pinned together, the rate reflects
  the CPU both sides spend per request.
- **NAR MB/s** (10^6 bytes/s): 1 or 4 parallel \`curl -o /dev/null\` processes downloading the big
  NAR again and again for the run's duration, unpinned; bytes received / wall time (a download
  still running at the deadline is cut off and its bytes counted). wrk's Transfer/sec is not
  used for multi-GiB bodies. Right before each NAR run the file the server reads (nginx: the
  .nar in the cache; agent: the store path's file) is read once into the page cache: this VM
  pages out file data left untouched for about 30 s (DAMON reclaim), and a run from disk would
  measure the disk. The details say how much of it was still cached.
- **Server CPU per unit of work**: user + system time of the server's processes (from /proc)
  during each run, per request or per GB. Unlike the rates, it does not depend on scheduling.
- **Memory**: the agent's VmRSS every 100 ms from /proc throughout, per phase, and VmHWM (reset
  via /proc/PID/clear_refs before the downloads), against its RSS before the first NAR
  download. A rate-limited slow client at the end shows whether the agent honours backpressure;
  a server that streams stays flat whatever the NAR's size.
- **Fairness**: the two servers alternate measurement by measurement. Other work on the machine
  spoils a run, so before each measurement the benchmark waits (up to 60 s) until the CPUs are
  idle, and it accounts for all CPU time used during the run: a run during which anything
  other than the server and the load generator used more than 20 % of a CPU is repeated (up to
  twice, \`--retries\`) and, if still disturbed, marked ⚠.
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

/**
 * Puts a section of its own (a bench case's figures) before the Results section, which every full
 * `npm run bench` rewrites, replacing an older section with the same heading.
 */
export function writeBenchSection(file: string, heading: string, intro: string, body: string): void {
  let text = readFileSync(file, "utf8");
  const start = text.indexOf(`\n${heading}\n`);
  if (start >= 0) {
    const end = text.indexOf("\n## ", start + heading.length + 2);
    text = text.slice(0, start) + text.slice(end);
  }
  const at = text.indexOf(`\n${RESULTS_HEADING}`);
  const section = `\n${heading}\n\n${intro.trim()}\n\n${body.trim()}\n`;
  text = at >= 0 ? text.slice(0, at) + section + text.slice(at) : text + section;
  writeFileSync(file, text);
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
