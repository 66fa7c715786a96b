// The nix-daemon killed and restarted (an upgrade, a crash, `systemctl restart nix-daemon`) under
// an agent that reads the store through it (store_backend = daemon, as an unprivileged service
// does), while Nix substitutes from that agent. One host, loopback: the agent serves a chroot
// store whose own `nix-daemon --store DIR` is SIGKILLed (with its per-connection children) and
// started again after RESTART_GAP_S. Meanwhile WORKERS loops run `nix copy --from` the agent
// (each a real substitution into a fresh store, require-sigs), and a probe asks for a narinfo
// every PROBE_MS, compared with the answer before the kill. Measured: the window of 503s, how long
// after the daemon is back the agent answers again, and wrong answers (a 404 or another body for
// a path the store has; must be 0: Nix would remember a 404 as "not in this cache").
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { keygen, startAgentProcess } from "../../test/helpers/agent.js";
import { addToStore, NIX_FLAGS, run, tempDir } from "../../test/helpers/nix.js";
import { Daemon } from "../../test/helpers/nix-daemon.js";
import { percentiles, ProcessMeter, sleep, type Scenario } from "../scenario.js";

const PATHS = 100;
const WORKERS = 4;
const BEFORE_S = 10;
const RESTART_GAP_S = 1;
const AFTER_S = 20;
const PROBE_MS = 50;
/** Goal: the agent answers within this long of the daemon's socket being back. */
const BACK_GOAL_S = 2;

interface Probe {
  at: number;
  ms: number;
  status: number;
  wrong: boolean;
}

interface Sub {
  at: number;
  ok: boolean;
  error?: string;
}

export const daemonRestartUnderLoad: Scenario = {
  name: "daemon-restart",
  title: `the nix-daemon behind an agent (store_backend = daemon) killed and restarted while ${WORKERS} Nix substitutions run through the agent`,
  goal: `0 wrong answers (only 200 or 503 while the daemon is away); the agent answers within ${BACK_GOAL_S} s of the daemon being back; no substitution started after that fails`,
  async run({ log }) {
    const tmp = tempDir("fleetcache-daemon-restart-");
    const root = join(tmp.dir, "store");
    const daemon = new Daemon(root);
    let agent: Awaited<ReturnType<typeof startAgentProcess>> | undefined;
    try {
      log(`a chroot store with ${PATHS} paths of 64 KiB, its nix-daemon, an agent with --store-backend daemon`);
      const paths: string[] = [];
      for (let i = 0; i < PATHS; i++) {
        const f = join(tmp.dir, `blob-${i}`);
        writeFileSync(f, Buffer.alloc(64 << 10, `daemon-restart-${i}\n`));
        paths.push(await addToStore(root, f));
      }
      const key = join(tmp.dir, "key.sec");
      const publicKey = await keygen("daemon-restart-1", key);
      await daemon.start();
      agent = await startAgentProcess(["--store-root", root, "--sign-key", key, "--state-dir", join(tmp.dir, "state"), "--store-backend", "daemon"]);
      const url = agent.url;
      const meter = ProcessMeter.of(agent);
      const expected = new Map<string, string>();
      for (const p of paths) expected.set(p, await (await fetch(`${url}/${p.slice(11, 43)}.narinfo`)).text());

      // The narinfo latency with no load, for comparison with the same under the Nix loops.
      const idle: number[] = [];
      for (let i = 0, until = Date.now() + 3000; Date.now() < until; i++) {
        const t0 = Date.now();
        await (await fetch(`${url}/${paths[i % PATHS]!.slice(11, 43)}.narinfo`)).text();
        idle.push(Date.now() - t0);
      }
      const running = { on: true };
      const probes: Probe[] = [];
      const probe = (async () => {
        for (let i = 0; running.on; i++) {
          const p = paths[i % PATHS]!;
          const at = Date.now();
          const r = await fetch(`${url}/${p.slice(11, 43)}.narinfo`).then(
            async (res) => ({ status: res.status, body: await res.text() }),
            () => ({ status: 0, body: "" }),
          );
          probes.push({ at, ms: Date.now() - at, status: r.status, wrong: r.status === 200 ? r.body !== expected.get(p) : r.status !== 503 });
          await sleep(PROBE_MS);
        }
      })();
      const subs: Sub[] = [];
      let next = 0;
      const worker = async (w: number) => {
        const dir = join(tmp.dir, `sub-${w}`);
        while (running.on) {
          const p = paths[next++ % PATHS]!;
          rmSync(dir, { recursive: true, force: true });
          const at = Date.now();
          const r = await run("env", [
            `XDG_CACHE_HOME=${join(dir, "cache")}`, "nix", ...NIX_FLAGS, "copy", "--from", url, "--to", join(dir, "store"),
            "--option", "trusted-public-keys", publicKey, "--option", "require-sigs", "true",
            "--option", "narinfo-cache-negative-ttl", "0", "--option", "substituters", "", p,
          ]).then(() => ({ ok: true }), (e: Error) => ({ ok: false, error: e.message.split("\n").find((l) => /error:/.test(l))?.trim() ?? e.message.slice(0, 200) }));
          subs.push({ at, ...r });
        }
      };
      const workers = Array.from({ length: WORKERS }, (_, w) => worker(w));

      await sleep(BEFORE_S * 1000);
      log(`SIGKILL to the nix-daemon; started again after ${RESTART_GAP_S} s`);
      const tKill = Date.now();
      await daemon.stop();
      await sleep(RESTART_GAP_S * 1000);
      await daemon.start();
      const tUp = Date.now();
      await sleep(AFTER_S * 1000);
      running.on = false;
      await Promise.all([probe, ...workers]);

      const s = (t: number) => ((t - tKill) / 1000).toFixed(2);
      const after = probes.filter((p) => p.at >= tKill);
      const unavailable = after.filter((p) => p.status === 503);
      const wrong = probes.filter((p) => p.wrong);
      const firstBack = after.find((p) => p.at >= tUp && p.status === 200 && !p.wrong && !after.some((q) => q.at > p.at && q.status !== 200));
      const backS = firstBack ? (firstBack.at - tUp) / 1000 : undefined;
      const tBack = firstBack?.at ?? Infinity;
      const failed = subs.filter((x) => !x.ok);
      const failedAfterBack = subs.filter((x) => !x.ok && x.at >= tBack);
      const errors = [...new Set(failed.map((x) => (x.error ?? "").replace(/\/nix\/store\/[^' ]*/g, "PATH").replace(/127\.0\.0\.1:\d+/g, "AGENT")))];
      const byStatus = new Map<number, number>();
      for (const p of after) byStatus.set(p.status, (byStatus.get(p.status) ?? 0) + 1);
      return {
        ok: wrong.length === 0 && backS !== undefined && backS <= BACK_GOAL_S && failedAfterBack.length === 0,
        figures: [
          ["daemon down for", `${((tUp - tKill) / 1000).toFixed(1)} s (SIGKILL, ${RESTART_GAP_S} s, start until its socket exists)`],
          ["narinfo probes from the kill on", [...byStatus].map(([k, v]) => `${v} × ${k}`).join(", ")],
          ["503 window", unavailable.length > 0 ? `${s(unavailable[0]!.at)} s to ${s(unavailable.at(-1)!.at)} s after the kill` : "none"],
          ["agent answers again", backS === undefined ? "not by the end" : `${backS.toFixed(2)} s after the daemon was back`],
          ["wrong answers (404 or another narinfo for a path the store has)", wrong.length],
          ["substitutions", `${subs.length - failed.length} of ${subs.length} succeeded`],
          ["failed substitutions started", failed.length > 0 ? `${failed.length}, from ${s(Math.min(...failed.map((x) => x.at)))} s to ${s(Math.max(...failed.map((x) => x.at)))} s after the kill` : "none"],
          ["failed substitutions started after the agent was back", failedAfterBack.length],
          ["distinct errors", errors.join(" | ") || "none"],
          ["narinfo latency, no load (3 s, back to back)", percentiles(idle)],
          [`narinfo latency under the ${WORKERS} Nix loops, before the kill`, percentiles(probes.filter((p) => p.at < tKill).map((p) => p.ms))],
          ["narinfo latency while 503", percentiles(unavailable.map((p) => p.ms))],
          ["agent", meter.summary()],
        ],
      };
    } finally {
      await agent?.stop();
      await daemon.stop();
      tmp.cleanup();
    }
  },
};
