// Anyone who can reach the mesh port, without a key: a host holds N idle TCP connections to an
// agent's mesh port (sending nothing, reopening each one when it is closed), then a trusted agent
// starts and dials that agent. Measured: how long until both sides' status shows the connection,
// and the target's CPU while the flood runs (issue 10, scenario 5).
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { createFleet, eventually, P2P_PORT } from "../../test/helpers/fleet.js";
import { addBlob } from "../fleet-tools.js";
import { ProcessMeter, sleep, type Scenario } from "../scenario.js";

const FLOOD_MAIN = fileURLToPath(new URL("../idle-flood-main.js", import.meta.url));
const COUNT = Number(process.env.FLEETCACHE_FLOOD_COUNT ?? 300);
/** How long the flood runs before the trusted agent starts (the CPU figure is over this). */
const WARMUP_MS = 20_000;
/** How long the joiner is given while the flood holds. */
const JOIN_CAP_MS = Number(process.env.FLEETCACHE_FLOOD_JOIN_CAP_S ?? 90) * 1000;
const JOIN_GOAL_S = 2;

export const idleFlood: Scenario = {
  name: "idle-flood",
  title: `${COUNT} idle TCP connections to an agent's mesh port (reopened when closed), then a trusted agent joins`,
  goal: `trusted join < ${JOIN_GOAL_S} s`,
  async run({ log }) {
    const fleet = await createFleet(["a", "b", "x"]);
    const [a, b, x] = fleet.hosts as [typeof fleet.hosts[0], typeof fleet.hosts[0], typeof fleet.hosts[0]];
    try {
      await addBlob(a, "flood-a", 1024);
      await addBlob(b, "flood-b", 1024);
      await a.start();
      const idle = ProcessMeter.of(a.agent!);
      await sleep(5000);
      const idleCpu = idle.summary();

      log(`x opens ${COUNT} idle connections to A's mesh port`);
      const flood = x.net.spawn(process.execPath, [FLOOD_MAIN, "--target", `${a.net.ip}:${P2P_PORT}`, "--count", String(COUNT)], {
        stdio: ["ignore", "pipe", "inherit"],
      });
      let last = "";
      createInterface({ input: flood.stdout! }).on("line", (l) => (last = l));
      try {
        const meter = ProcessMeter.of(a.agent!);
        await sleep(WARMUP_MS);
        const floodCpu = meter.summary();
        const floodState = last;

        log("B starts and dials A");
        const t0 = Date.now();
        await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`]);
        const started = Date.now();
        const bSeesA = async () => (await b.status()).peers.find((p) => p.publicKey === a.publicKey)?.connected === true;
        const aSeesB = async () => (await a.status()).peers.find((p) => p.publicKey === b.publicKey)?.connected === true;
        const joined = await eventually("B connected to A, both sides", async () => (await bSeesA()) && (await aSeesB()), JOIN_CAP_MS).then(
          () => true,
          () => false,
        );
        const joinS = (Date.now() - started) / 1000;
        const duringJoin = last;

        let afterStopS: number | undefined;
        if (!joined) {
          log("not joined while the flood holds: stopping the flood");
          flood.kill("SIGTERM");
          const t1 = Date.now();
          await eventually("B connected to A once the flood stopped", async () => (await bSeesA()) && (await aSeesB()), 60_000).catch(() => undefined);
          afterStopS = (Date.now() - t1) / 1000;
        }
        return {
          ok: joined && joinS < JOIN_GOAL_S,
          figures: [
            ["idle connections held (attacker x)", `${COUNT} requested; after ${WARMUP_MS / 1000} s: ${floodState || "no report"}; during the join: ${duringJoin}`],
            ["B's agent started in", `${((started - t0) / 1000).toFixed(1)} s`],
            ["trusted join (B and A both connected)", joined ? `${joinS.toFixed(1)} s after B's agent was up` : `not within ${(JOIN_CAP_MS / 1000).toFixed(0)} s`],
            ...(afterStopS === undefined ? [] : [["joined after the flood stopped", `${afterStopS.toFixed(1)} s`] as [string, string]]),
            ["agent A before the flood (5 s)", idleCpu],
            [`agent A during the flood (${WARMUP_MS / 1000} s)`, floodCpu],
          ],
        };
      } finally {
        flood.kill("SIGTERM");
      }
    } finally {
      await fleet.destroy();
    }
  },
};
