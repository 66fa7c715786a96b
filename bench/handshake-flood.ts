// What a flood of complete, untrusted handshakes costs an agent: H attacker "hosts" (source
// addresses 127.0.1.1, 127.0.1.2, ... on loopback), each a real libp2p node with a key of its own
// that the fleet does not trust, dial the agent's mesh port over and over. Each dial runs the
// whole noise handshake (the agent proves its key and checks the attacker's), then the agent's
// gater refuses the untrusted key and closes. Reported: handshakes the agent completed and
// refused (its counters.refusedConnections), per second, and the agent's CPU over the flood.
//
//   npx tsc -p . && node dist/bench/handshake-flood.js [--hosts 20] [--rate 4] [--seconds 20]
//
// --rate is dials a second per host: libp2p admits 5 new sockets a second per remote host
// (admission.ts), so a host gets about that many handshakes; more addresses, more handshakes.
// Needs Nix (nix-store, for the agent's store); everything stays on loopback.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { createLibp2p, type Libp2p } from "libp2p";
import { tcp, type TCPSocketOptions } from "@libp2p/tcp";
import { noise } from "@chainsafe/libp2p-noise";
import { yamux } from "@chainsafe/libp2p-yamux";
import { multiaddr } from "@multiformats/multiaddr";
import { freePort, startAgentProcess } from "../test/helpers/agent.js";

const { values: opt } = parseArgs({
  options: { hosts: { type: "string", default: "20" }, rate: { type: "string", default: "4" }, seconds: { type: "string", default: "20" } },
});
const HOSTS = Number(opt.hosts);
const RATE = Number(opt.rate);
const SECONDS = Number(opt.seconds);

/** CPU time of a process so far, in ms (utime + stime; USER_HZ is 100). */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
}

async function refused(url: string): Promise<number> {
  const st = (await (await fetch(`${url}/api/v1/status`)).json()) as { counters: { refusedConnections: number } };
  return st.counters.refusedConnections;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(tmpdir(), "fleetcache-hsflood-"));
  const attackers: Libp2p[] = [];
  let agent: Awaited<ReturnType<typeof startAgentProcess>> | undefined;
  try {
    const store = join(tmp, "store");
    writeFileSync(join(tmp, "hit.txt"), "a path\n");
    execFileSync("nix-store", ["--store", store, "--add", join(tmp, "hit.txt")]);
    const port = await freePort();
    agent = await startAgentProcess(["--store-root", store, "--state-dir", join(tmp, "state"), "--p2p-listen", `127.0.0.1:${port}`], { FLEETCACHE_LOG_LEVEL: "info" });
    const pid = agent.child.pid!;
    const target = multiaddr(`/ip4/127.0.0.1/tcp/${port}`);

    // Idle first: what the agent costs with nothing happening.
    let c0 = cpuMs(pid);
    let t0 = performance.now();
    await sleep(5000);
    const idlePct = ((cpuMs(pid) - c0) / (performance.now() - t0)) * 100;

    for (let h = 0; h < HOSTS; h++) {
      attackers.push(
        await createLibp2p({
          // dialOpts go to net.connect (tcp.js), which takes localAddress; the type does not list it.
          transports: [tcp({ dialOpts: { localAddress: `127.0.1.${h + 1}` } as TCPSocketOptions })],
          connectionEncrypters: [noise()],
          streamMuxers: [yamux()],
          connectionMonitor: { enabled: false },
        }),
      );
    }
    let dials = 0;
    let stop = false;
    const loops = attackers.map(async (node) => {
      while (!stop) {
        const next = performance.now() + 1000 / RATE;
        dials++;
        // A controller cleared after each dial: a timeout signal firing after the dial ended
        // surfaced as an uncaught TimeoutError from libp2p's listeners.
        const ctl = new AbortController();
        const timer = setTimeout(() => ctl.abort(), 5000);
        await node.dial(target, { signal: ctl.signal }).then((c) => c.close(), () => undefined).catch(() => undefined);
        clearTimeout(timer);
        await sleep(Math.max(0, next - performance.now()));
      }
    });
    const r0 = await refused(agent.url);
    c0 = cpuMs(pid);
    t0 = performance.now();
    await sleep(SECONDS * 1000);
    const secs = (performance.now() - t0) / 1000;
    const cpu = cpuMs(pid) - c0;
    const handshakes = (await refused(agent.url)) - r0;
    stop = true;
    await Promise.all(loops);

    const pct = (cpu / (secs * 1000)) * 100;
    console.log(`${HOSTS} attacker hosts, ${RATE} dials a second each, ${secs.toFixed(1)} s`);
    console.log(`  agent idle                          ${idlePct.toFixed(1)} % of a core`);
    console.log(`  dials made                          ${dials}`);
    console.log(`  handshakes completed and refused    ${handshakes} (${(handshakes / secs).toFixed(0)} a second)`);
    console.log(`  agent CPU during the flood          ${pct.toFixed(1)} % of a core`);
    if (handshakes > 0) console.log(`  agent CPU per refused handshake     ${((cpu - (idlePct / 100) * secs * 1000) / handshakes).toFixed(2)} ms (idle subtracted)`);
  } finally {
    await Promise.allSettled(attackers.map((n) => n.stop()));
    await agent?.stop();
    rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
