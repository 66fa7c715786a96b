// What slow NAR clients cost the agent: N clients each reading one NAR at a fixed rate, the
// agent's RSS sampled from /proc before, during and after. Loopback only; bounded in time.
//
//   node dist/bench/slow-clients.js [--clients 200] [--rate-kib 64] [--seconds 20] [--mib 64]
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { startAgentProcess, type AgentProcess } from "../test/helpers/agent.js";

const { values } = parseArgs({
  options: {
    clients: { type: "string", default: "200" },
    "rate-kib": { type: "string", default: "64" },
    seconds: { type: "string", default: "20" },
    mib: { type: "string", default: "64" },
  },
});
const CLIENTS = Number(values.clients);
const RATE = Number(values["rate-kib"]) * 1024;
const SECONDS = Number(values.seconds);
const MIB = Number(values.mib);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const mib = (n: number) => (n / 2 ** 20).toFixed(1);

function rssOf(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m![1]) * 1024;
}

/** One client: GET the NAR, then read at most `RATE` bytes a second (pausing the socket). */
function slowClient(port: number, path: string, received: { n: number }): Socket {
  const sock = connect(port, "127.0.0.1", () => sock.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`));
  const start = Date.now();
  let mine = 0;
  sock.on("data", (d: Buffer) => {
    mine += d.length;
    received.n += d.length;
    const ahead = mine / RATE - (Date.now() - start) / 1000; // seconds ahead of the allowed rate
    if (ahead > 0) {
      sock.pause();
      setTimeout(() => sock.resume(), ahead * 1000);
    }
  });
  sock.on("error", () => {});
  return sock;
}

async function narBytesServed(url: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  return [...text.matchAll(/^fleetcache_nar_bytes_served_total\{[^}]*\} (\d+)/gm)].reduce((a, m) => a + Number(m[1]), 0);
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "fleetcache-slow-"));
  let agent: AgentProcess | undefined;
  try {
    const root = join(dir, "store");
    writeFileSync(join(dir, "big.bin"), randomBytes(MIB << 20));
    const storePath = execFileSync("nix-store", ["--store", root, "--add", join(dir, "big.bin")], { encoding: "utf8" }).trim();
    agent = await startAgentProcess(["--store-root", root, "--state-dir", join(dir, "state")], { FLEETCACHE_LOG_LEVEL: "info" });
    const { port, url } = agent;
    const pid = agent.child.pid!; // the agent's own process: its RSS is what is measured
    for (let i = 0; i < 50; i++) {
      if ((await fetch(`${url}/${storePath.slice(11, 43)}.narinfo`)).status === 200) break;
      await sleep(100);
    }
    const narinfo = await (await fetch(`${url}/${storePath.slice(11, 43)}.narinfo`)).text();
    const narPath = "/" + /^URL: (.*)$/m.exec(narinfo)![1]!;
    await (await fetch(url + narPath)).arrayBuffer(); // one fast download: the file is cached, the code warm
    await sleep(2000);
    const before = rssOf(pid);
    console.error(`agent on ${url}, RSS ${mib(before)} MiB; starting ${CLIENTS} clients`);

    const received = { n: 0 };
    const servedBefore = await narBytesServed(url);
    const sockets: Socket[] = [];
    for (let i = 0; i < CLIENTS; i++) sockets.push(slowClient(port, narPath, received));
    let peak = 0;
    const samples: number[] = [];
    const t0 = Date.now();
    while (Date.now() - t0 < SECONDS * 1000) {
      await sleep(250);
      const r = rssOf(pid);
      peak = Math.max(peak, r);
      samples.push(r);
    }
    const served = (await narBytesServed(url)) - servedBefore;
    const lastHalf = samples.slice(samples.length >> 1);
    const steady = lastHalf.reduce((a, b) => a + b, 0) / lastHalf.length;
    for (const s of sockets) s.destroy();
    await sleep(5000);
    const afterwards = rssOf(pid);
    const rate = received.n / SECONDS / CLIENTS / 1024;
    console.log(`${CLIENTS} clients reading a ${MIB} MiB NAR at ${values["rate-kib"]} KiB/s each (measured ${rate.toFixed(0)} KiB/s each) for ${SECONDS} s`);
    console.log(`agent RSS: before ${mib(before)} MiB, steady ${mib(steady)} MiB (+${mib(steady - before)}), peak ${mib(peak)} MiB (+${mib(peak - before)}), 5 s after the clients left ${mib(afterwards)} MiB (+${mib(afterwards - before)})`);
    console.log(`per client: RSS +${((peak - before) / CLIENTS / 1024).toFixed(0)} KiB at peak; NAR bytes handed to sockets but not yet read by the client ${(((served - received.n) / CLIENTS) / 1024).toFixed(0)} KiB (incl. kernel socket buffers)`);
  } finally {
    await agent?.stop();
    execFileSync("chmod", ["-R", "u+w", dir]);
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
