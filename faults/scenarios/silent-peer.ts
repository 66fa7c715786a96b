// A peer that vanishes without a FIN (power loss, a cable pulled, a frozen VM): the link proxy
// between the sites stops carrying anything and closes nothing. The requester must drop the
// peer in bounded time (its lookups stop waiting on it), and reconnect once the link is back.
import { linkedFleet, narinfoLatencyMs, narinfoVia, addBlob } from "../fleet-tools.js";
import { eventually } from "../../test/helpers/fleet.js";
import { ProcessMeter, type Scenario } from "../scenario.js";

const LATENCY_MS = 60;
/** Dropped within this long, with the default ping interval (10 s). */
const DROP_GOAL_S = 30;

export const silentPeer: Scenario = {
  name: "silent-peer",
  title: "a peer behind a 60 ms link goes silent without a FIN, then comes back",
  goal: `B drops A within ${DROP_GOAL_S} s of the silence; reconnects once the link is back`,
  async run({ log }) {
    const net = await linkedFleet({ latencyMs: LATENCY_MS });
    const { a, b } = net;
    try {
      const path = await addBlob(a, "silent-a", 4096);
      await addBlob(b, "b-own", 1024);
      await a.start();
      await b.start(["--peer", net.aViaLink]);
      await eventually("B sees A's path", () => narinfoVia(b, path), 60_000);
      const meters = { a: ProcessMeter.of(a.agent!), b: ProcessMeter.of(b.agent!) };
      const connected = async () => (await b.status()).peers.find((p) => p.name === "a-1")?.connected === true;

      log("the link goes silent");
      const t0 = Date.now();
      net.proxy.kill("SIGUSR1");
      await eventually("B drops A", async () => !(await connected()), 120_000).catch(() => undefined);
      const dropS = (Date.now() - t0) / 1000;
      const dropped = !(await connected());
      const lookup = await narinfoLatencyMs(b, path);

      log("the link is back");
      const t1 = Date.now();
      net.proxy.kill("SIGUSR2");
      const back = await eventually("B reconnects to A", connected, 120_000).then(() => true, () => false);
      const reconnectS = (Date.now() - t1) / 1000;
      return {
        ok: dropped && dropS <= DROP_GOAL_S && back,
        figures: [
          ["link", `${LATENCY_MS} ms each way, then silent (no FIN, no RST)`],
          ["B dropped A after", dropped ? `${dropS.toFixed(1)} s` : `not within ${dropS.toFixed(0)} s`],
          ["narinfo of A's path on B once dropped", `${lookup.status} in ${lookup.ms.toFixed(1)} ms`],
          ["B reconnected after the link came back", back ? `${reconnectS.toFixed(1)} s` : "no"],
          ["agent A", meters.a.summary()],
          ["agent B", meters.b.summary()],
        ],
      };
    } finally {
      await net.destroy();
    }
  },
};
