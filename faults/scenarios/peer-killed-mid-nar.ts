// A holder killed (SIGKILL: a crash, the OOM killer, a power cut) in the middle of a NAR transfer.
// A and C hold the same large path; B's Nix copies it from B's agent (`nix copy --from`, with
// require-sigs), and the holder B's agent is taking it from is killed once it has sent part of
// it. Expected: the transfer goes on from the other holder at the byte reached (or fails cleanly
// and Nix's retry succeeds); what lands in B's store is checked by `nix store verify` and by the
// NAR hash of `nix-store --dump`. Then a path only one holder has, with that holder killed mid-NAR:
// the answer must fail cleanly (Nix fails, curl sees an error, never a short body passed off as
// complete), and B's agent lives on.
import { createHash } from "node:crypto";
import { join } from "node:path";
import { createFleet, eventually, P2P_PORT, type FleetHost } from "../../test/helpers/fleet.js";
import { dumpPath, NIX_FLAGS } from "../../test/helpers/nix.js";
import { normalizeHash } from "../../protocol/hash.js";
import type { Narinfo } from "../../protocol/narinfo.js";
import { addBlob, downloadNar, narinfoVia, type Download } from "../fleet-tools.js";
import { mib, ProcessMeter, sleep, type Scenario } from "../scenario.js";

const NAR_SIZE = Number(process.env.FLEETCACHE_MIDNAR_MIB ?? 256) << 20;
/** The holder is killed once it has sent this much of the NAR to B. */
const KILL_AT = 48 << 20;

/** NAR bytes B's agent has received, by peer name ("a-1"). */
async function bytesByPeer(b: FleetHost): Promise<Record<string, number>> {
  const s = await b.status();
  return Object.fromEntries(s.peers.map((p) => [p.name, (p as { bytesReceived?: number }).bytesReceived ?? 0]));
}

/**
 * Watches B's per-peer byte counts while `transfer` runs; kills the first of `holders` that has
 * sent KILL_AT bytes of it. Returns which one and how much it had sent.
 */
async function killMidway(b: FleetHost, holders: FleetHost[], transfer: Promise<unknown>): Promise<{ killed?: FleetHost; sentMiB?: string; at?: number }> {
  const base = await bytesByPeer(b);
  let finished = false;
  void transfer.finally(() => (finished = true));
  while (!finished) {
    const now = await bytesByPeer(b);
    const h = holders.find((x) => (now[`${x.name}-1`] ?? 0) - (base[`${x.name}-1`] ?? 0) >= KILL_AT);
    if (h) {
      const at = Date.now();
      await h.crash();
      const after = await bytesByPeer(b);
      return { killed: h, sentMiB: mib((after[`${h.name}-1`] ?? 0) - (base[`${h.name}-1`] ?? 0)), at };
    }
    await sleep(20);
  }
  return {};
}

/** Runs a command in the host's namespace: its exit code and its stdout and stderr together. */
function runAll(h: FleetHost, cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
  const child = h.net.spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  return new Promise((r) => child.once("close", (code) => r({ code, out })));
}

/** `nix copy --from` B's agent into `dest`, with require-sigs; Nix's error and retry lines. */
async function nixCopy(b: FleetHost, keys: string[], dest: string, path: string): Promise<{ ok: boolean; ms: number; error?: string; retried: boolean }> {
  const t0 = performance.now();
  const { code, out } = await runAll(b, "nix", [
    ...NIX_FLAGS, "copy", "--from", b.agent!.url, "--to", dest, "--option", "trusted-public-keys", keys.join(" "),
    "--option", "require-sigs", "true", "--option", "narinfo-cache-negative-ttl", "0", path,
  ]);
  const lines = out.split("\n").filter((l) => /error|retrying|warning/i.test(l)).map((l) => l.trim());
  return { ok: code === 0, ms: performance.now() - t0, retried: /retrying/.test(out), ...(lines.length > 0 ? { error: lines.join(" | ").slice(0, 500) } : {}) };
}

/** Whether the path in `dest` is sound: `nix store verify` passes and its NAR hashes to the narinfo's NarHash. */
async function checkCopy(b: FleetHost, dest: string, path: string, info: Narinfo): Promise<string> {
  const verify = await b.exec("nix", [...NIX_FLAGS, "store", "verify", "--no-trust", "--store", dest, path]).then(() => "verify ok", (e: Error) => `verify FAILED: ${e.message.split("\n").at(-2)}`);
  const dump = dumpPath(dest, path);
  const hash = createHash("sha256");
  let bytes = 0;
  dump.on("data", (d: Buffer) => {
    hash.update(d);
    bytes += d.length;
  });
  await dump.done;
  const same = bytes === info.narSize && normalizeHash(`sha256:${hash.digest("hex")}`) === normalizeHash(info.narHash);
  return `${verify}; nix-store --dump: ${bytes} bytes, ${same ? "NarHash matches" : "NarHash DIFFERS"}`;
}

export const peerKilledMidNar: Scenario = {
  name: "peer-killed-mid-nar",
  title: `a holder SIGKILLed in the middle of a ${NAR_SIZE >> 20} MiB NAR that B's Nix is copying (another holder has it; then the only holder)`,
  goal: "with another holder: nix copy succeeds (at once or by Nix's retry) and the copy verifies; with the only holder killed: a clean failure (never a short body passed off as complete), B's agent lives on",
  async run({ log }) {
    const fleet = await createFleet(["a", "b", "c"]);
    const [a, b, c] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
    try {
      log(`A and C hold a ${NAR_SIZE >> 20} MiB path; A alone holds a second one; B knows both`);
      const shared = await addBlob(a, "midnar-shared", NAR_SIZE);
      if ((await addBlob(c, "midnar-shared", NAR_SIZE)) !== shared) throw new Error("A and C made different paths");
      const onlyA = await addBlob(a, "midnar-only-a", NAR_SIZE);
      const small = await addBlob(a, "midnar-small", 4096);
      await addBlob(b, "b-own", 1024);
      await a.start();
      await c.start();
      await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`, "--peer", `${c.net.ip}:${P2P_PORT}`]);
      const sharedInfo = await eventually("B answers the shared path", () => narinfoVia(b, shared), 60_000);
      const onlyInfo = await eventually("B answers A's own path", () => narinfoVia(b, onlyA), 60_000);
      await eventually("B connected to both", async () => (await b.status()).peers.filter((p) => p.connected).length === 2, 60_000);
      const meterB = ProcessMeter.of(b.agent!);

      // 0. For comparison: the same copy, undisturbed.
      log("B's Nix copies the shared path, undisturbed");
      const r0 = await nixCopy(b, fleet.trustedKeys, join(b.dir, "dest-undisturbed"), shared);

      // 1. Two holders; the one sending is killed.
      log("B's Nix copies the shared path; the holder sending it is killed mid-NAR");
      const failovers0 = (await b.status()).counters.failovers ?? 0;
      const before1 = await bytesByPeer(b);
      const dest1 = join(b.dir, "dest-shared");
      const copy1 = nixCopy(b, fleet.trustedKeys, dest1, shared);
      const k1 = await killMidway(b, [a, c], copy1);
      const r1 = await copy1;
      const after1 = await bytesByPeer(b);
      const survivor = k1.killed === a ? c : a;
      const fromSurvivor = mib((after1[`${survivor.name}-1`] ?? 0) - (before1[`${survivor.name}-1`] ?? 0));
      const failovers = ((await b.status()).counters.failovers ?? 0) - failovers0;
      const check1 = r1.ok ? await checkCopy(b, dest1, shared, sharedInfo) : "nothing copied";

      // Back to two live hosts for the second part (the killed one restarts with its store).
      if (k1.killed) {
        await k1.killed.start();
        await eventually("B connected to both again", async () => (await b.status()).peers.filter((p) => p.connected).length === 2, 60_000);
      }
      await eventually("B answers A's own path again", () => narinfoVia(b, onlyA), 60_000);

      // 2. The only holder killed mid-NAR, with Nix and curl both fetching through B.
      log("B's Nix and curl fetch A's own path; A is killed mid-NAR");
      const dest2 = join(b.dir, "dest-only");
      const copy2 = nixCopy(b, fleet.trustedKeys, dest2, onlyA);
      const curl2: Promise<Download> = downloadNar(b, onlyInfo);
      const k2 = await killMidway(b, [a], Promise.all([copy2, curl2]));
      const [r2, d2] = await Promise.all([copy2, curl2]);
      const inDest2 = await b.exec("nix", [...NIX_FLAGS, "path-info", "--store", dest2, onlyA]).then(() => true, () => false);
      const bAlive = b.agent!.child.exitCode === null && b.agent!.child.signalCode === null;
      await a.start();
      const bServes = await eventually("B answers A's small path after A is back", () => narinfoVia(b, small), 60_000).then(() => true, () => false);
      // curl's error is a clean failure; ok with the wrong bytes or a short body would be a lie.
      const curlClean = !d2.ok && d2.bytes < onlyInfo.narSize;

      const ok = k1.killed !== undefined && r1.ok && /verify ok.*NarHash matches/.test(check1) && k2.killed !== undefined && !r2.ok && !inDest2 && curlClean && bAlive && bServes;
      return {
        ok,
        figures: [
          ["undisturbed nix copy of the shared path", r0.ok ? `succeeded in ${(r0.ms / 1000).toFixed(1)} s` : `FAILED: ${r0.error}`],
          ["two holders: killed", k1.killed ? `${k1.killed.name} after it had sent ${k1.sentMiB} MiB of ${NAR_SIZE >> 20} MiB` : "nobody: the transfer ended before a holder had sent 48 MiB"],
          ["two holders: nix copy", r1.ok ? `succeeded in ${(r1.ms / 1000).toFixed(1)} s${r1.retried ? ` (after a Nix retry: ${r1.error})` : " (no Nix retry)"}` : `FAILED in ${(r1.ms / 1000).toFixed(1)} s: ${r1.error}`],
          ["two holders: bytes B took from the survivor", `${fromSurvivor} MiB from ${survivor.name}; B's failovers ${failovers}`],
          ["two holders: the copy in B's store", check1],
          ["only holder: killed", k2.killed ? `a after it had sent ${k2.sentMiB} MiB` : "nobody: the transfer ended before A had sent 48 MiB"],
          ["only holder: nix copy", r2.ok ? `SUCCEEDED (${(r2.ms / 1000).toFixed(1)} s)` : `failed in ${(r2.ms / 1000).toFixed(1)} s${r2.retried ? " after Nix's retries" : ""}: ${r2.error}`],
          ["only holder: path in B's destination store", inDest2 ? "YES" : "no"],
          ["only holder: curl of the NAR", d2.ok ? `COMPLETE (${d2.bytes} bytes)` : `failed after ${mib(d2.bytes)} MiB: ${d2.error}`],
          ["B's agent afterwards", `${bAlive ? "running" : "DEAD"}; answers A's paths once A is back: ${bServes ? "yes" : "NO"}`],
          ["agent b", meterB.summary()],
        ],
      };
    } finally {
      await fleet.destroy();
    }
  },
};
