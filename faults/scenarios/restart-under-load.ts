// The holder's agent restarted (an upgrade, a config change: SIGTERM, then start again) while a
// client substitutes from it. A is the only holder of many small paths; on B, WORKERS loops each
// run `nix copy --from` B's agent of one of them (in turn) into a fresh store with a fresh
// narinfo cache, so each is one real substitution that asks the agent (with require-sigs). Measured: substitutions that failed, and how long
// after A's agent is listening again B answers A's paths and substitutions succeed again.
import { rmSync } from "node:fs";
import { join } from "node:path";
import { createFleet, eventually, P2P_PORT, type FleetHost } from "../../test/helpers/fleet.js";
import { NIX_FLAGS } from "../../test/helpers/nix.js";
import { addBlob, narinfoVia } from "../fleet-tools.js";
import { percentiles, ProcessMeter, sleep, type Scenario } from "../scenario.js";

const PATHS = 100;
const WORKERS = 4;
const BEFORE_S = 10;
const AFTER_S = 30;
/** Goal: B serves A's paths again within this long of A's agent listening (B redials at 1 s, then 2 s, ...). */
const RECOVERY_GOAL_S = 5;

/** Nix's "error: ..." line from a failed command's message (which starts with the command line). */
function nixError(message: string): string {
  const stderr = message.slice(message.indexOf(" failed: ") + " failed: ".length);
  return stderr.split("\n").find((l) => /^error:/.test(l.trim()))?.trim() ?? stderr.split("\n")[0]!;
}

interface Sub {
  at: number;
  ms: number;
  ok: boolean;
  error?: string;
}

export const restartUnderLoad: Scenario = {
  name: "restart-under-load",
  title: `the only holder's agent restarted while ${WORKERS} Nix substitutions run back to back through another agent`,
  goal: `B serves the holder's paths again within ${RECOVERY_GOAL_S} s of its agent listening; no substitution fails once it does`,
  async run({ log }) {
    const fleet = await createFleet(["a", "b"]);
    const [a, b] = fleet.hosts as [FleetHost, FleetHost];
    try {
      log(`A holds ${PATHS} paths of 64 KiB; B knows A`);
      const paths: string[] = [];
      for (let i = 0; i < PATHS; i++) paths.push(await addBlob(a, `restart-${i}`, 64 << 10));
      await addBlob(b, "b-own", 1024);
      await a.start();
      await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`]);
      await eventually("B sees A's paths", () => narinfoVia(b, paths.at(-1)!), 60_000);
      const meterB = ProcessMeter.of(b.agent!);

      let next = 0;
      const subs: Sub[] = [];
      const running = { on: true };
      const worker = async (w: number) => {
        const dir = join(b.dir, `sub-${w}`);
        while (running.on) {
          const p = paths[next++ % PATHS]!;
          rmSync(dir, { recursive: true, force: true });
          const at = Date.now();
          const t0 = performance.now();
          // A narinfo cache per substitution: no answer comes from an earlier one, and parallel Nix
          // 2.8 processes creating one cache race on its SQLite rows ("constraint failed").
          const r = await b
            .exec("env", [
              `XDG_CACHE_HOME=${join(dir, "cache")}`, "nix", ...NIX_FLAGS, "copy", "--from", b.agent!.url, "--to", join(dir, "store"),
              "--option", "trusted-public-keys", fleet.trustedKeys.join(" "), "--option", "require-sigs", "true",
              // No other substituter: a fresh store would otherwise ask cache.nixos.org (no DNS here).
              "--option", "narinfo-cache-negative-ttl", "0", "--option", "substituters", "", p,
            ])
            .then(() => ({ ok: true }), (e: Error) => ({ ok: false, error: nixError(e.message) }));
          subs.push({ at, ms: performance.now() - t0, ...r });
        }
      };
      const workers = Array.from({ length: WORKERS }, (_, w) => worker(w));

      await sleep(BEFORE_S * 1000);
      log("SIGTERM to A's agent, then start it again");
      const tTerm = Date.now();
      await a.stop();
      const stoppedS = (Date.now() - tTerm) / 1000;
      await a.start();
      const tUp = Date.now();
      const upS = (tUp - tTerm) / 1000;
      // Recovered: B answers a path of A's it has not been asked for (no cache on B's side).
      const probe = paths[PATHS - 1]!;
      const recovered = await eventually("B answers A's paths again", () => narinfoVia(b, probe), 60_000).then(() => (Date.now() - tUp) / 1000, () => undefined);
      const tRec = tUp + (recovered ?? 0) * 1000;
      const meterA = ProcessMeter.of(a.agent!);
      await sleep(AFTER_S * 1000);
      running.on = false;
      await Promise.all(workers);

      const before = subs.filter((s) => s.at < tTerm);
      const during = subs.filter((s) => s.at >= tTerm && s.at < tRec);
      const after = subs.filter((s) => s.at >= tRec);
      const failed = (xs: Sub[]) => xs.filter((s) => !s.ok);
      const line = (xs: Sub[]) => `${xs.length - failed(xs).length} of ${xs.length} succeeded; ${percentiles(xs.map((s) => s.ms))}`;
      const failAt = failed(subs).map((s) => (s.at - tTerm) / 1000).sort((x, y) => x - y);
      const failedSpan = failAt.length > 0 ? `${failAt.length}, from ${failAt[0]!.toFixed(1)} s to ${failAt.at(-1)!.toFixed(1)} s after the SIGTERM` : "none";
      const errors = [...new Set(failed(subs).map((s) => (s.error ?? "").replace(/\/nix\/store\/[^']*/g, "PATH")))];
      return {
        ok: recovered !== undefined && recovered <= RECOVERY_GOAL_S && after.length > 0 && failed(after).length === 0,
        figures: [
          ["A's agent exited after SIGTERM in", `${stoppedS.toFixed(1)} s`],
          ["A's agent listening again after", `${upS.toFixed(1)} s (from the SIGTERM)`],
          ["B answers A's paths again", recovered === undefined ? "not within 60 s" : `${recovered.toFixed(1)} s after A's agent was listening`],
          ["substitutions before the restart", line(before)],
          ["substitutions started while A was down or B not yet back", line(during)],
          ["substitutions started after B was back", line(after)],
          ["failed substitutions started", failedSpan],
          ["distinct errors", errors.join(" | ") || "none"],
          ["agent A (after its restart)", meterA.summary()],
          ["agent B", meterB.summary()],
        ],
      };
    } finally {
      await fleet.destroy();
    }
  },
};
