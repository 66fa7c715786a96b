// What a narinfo miss and a hit cost the agent with each store backend: one chroot store, its own
// nix-daemon on a socket, and two agents on it (database, daemon); sequential keep-alive
// `GET /<hash>.narinfo` for random hash parts (misses) and for a path in the store (hits).
//
//   npx tsc -p . && node dist/bench/miss-latency.js [--requests 2000] [--rounds 5]
//
// Needs root and Nix (nix-store, nix-daemon); everything stays on loopback and in a temp dir.
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NIX32_ALPHABET } from "../protocol/nix32.js";
import { startAgentProcess } from "../test/helpers/agent.js";

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}
const REQUESTS = Number(arg("requests", "2000"));
const ROUNDS = Number(arg("rounds", "5"));

const children: ChildProcess[] = [];

async function startAgent(args: string[]): Promise<string> {
  const agent = await startAgentProcess(args, { FLEETCACHE_LOG_LEVEL: "info" });
  children.push(agent.child);
  return agent.url;
}

/** Microseconds a request over one keep-alive connection, for `paths` asked in turn. */
async function round(base: string, paths: string[], expect: number): Promise<number> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = (path: string) =>
    new Promise<void>((resolve, reject) => {
      http.get(`${base}${path}`, { agent }, (res) => {
        res.resume();
        res.on("end", () => (res.statusCode === expect ? resolve() : reject(new Error(`${path}: ${res.statusCode}`))));
      }).on("error", reject);
    });
  await get(paths[0]!); // the connection
  const start = process.hrtime.bigint();
  for (const p of paths) await get(p);
  const us = Number(process.hrtime.bigint() - start) / 1000 / paths.length;
  agent.destroy();
  return us;
}

function randomHashPart(): string {
  return Array.from(randomBytes(32), (b) => NIX32_ALPHABET[b & 31]).join("");
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(tmpdir(), "fleetcache-misses-"));
  try {
    const store = join(tmp, "store");
    writeFileSync(join(tmp, "hit.txt"), "a path in the store\n");
    const hit = execFileSync("nix-store", ["--store", store, "--add", join(tmp, "hit.txt")], { encoding: "utf8" }).trim();
    // The chroot store's own daemon, as the systemd-unit test runs it.
    const socket = join(store, "nix/var/nix/daemon-socket/socket");
    mkdirSync(join(tmp, "conf"));
    writeFileSync(join(tmp, "conf/nix.conf"), "sandbox = false\nbuild-users-group =\nsubstituters =\n");
    const daemon = spawn("nix-daemon", ["--store", store], {
      stdio: "ignore",
      env: { ...process.env, NIX_DAEMON_SOCKET_PATH: socket, NIX_CONF_DIR: join(tmp, "conf"), HOME: tmp },
    });
    children.push(daemon);
    for (let i = 0; i < 100 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 50));
    const agents = {
      database: await startAgent(["--store-root", store, "--state-dir", join(tmp, "db-state"), "--store-backend", "database"]),
      daemon: await startAgent(["--store-root", store, "--state-dir", join(tmp, "daemon-state"), "--store-backend", "daemon", "--daemon-socket", socket]),
    };
    const misses = Array.from({ length: REQUESTS }, () => `/${randomHashPart()}.narinfo`);
    const hits = Array.from({ length: REQUESTS }, () => `/${hit.slice(11, 43)}.narinfo`);
    console.log(`${REQUESTS} sequential keep-alive requests a round, best of ${ROUNDS} rounds (µs a request)`);
    for (const [backend, url] of Object.entries(agents)) {
      const best = { miss: Infinity, hit: Infinity };
      for (let r = 0; r < ROUNDS; r++) {
        best.miss = Math.min(best.miss, await round(url, misses, 404));
        best.hit = Math.min(best.hit, await round(url, hits, 200));
      }
      console.log(`${backend.padEnd(8)}  miss ${best.miss.toFixed(0)} µs  hit ${best.hit.toFixed(0)} µs`);
    }
  } finally {
    for (const c of children) c.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 300));
    rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});

