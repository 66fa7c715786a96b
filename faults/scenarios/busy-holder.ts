// Scenario 2: Nix substitutes many paths at once. 16 NARs requested in parallel from one holder,
// then `nix copy` of the same 16 paths at Nix's default parallelism, through the requester's
// agent. The holder serves at most 8 transfers at a time; the goal is that a busy holder is
// never a failed download (16 of 16, and nix copy succeeds).
import { join } from "node:path";
import { createFleet, eventually, P2P_PORT, type FleetHost } from "../../test/helpers/fleet.js";
import { NIX_FLAGS } from "../../test/helpers/nix.js";
import { addBlob, downloadNar, narinfoVia } from "../fleet-tools.js";
import { logLines, percentiles, ProcessMeter, type Scenario } from "../scenario.js";

const PATHS = 16;
const SIZE = 8 << 20;
/** Slow enough (8 s each) that all 16 transfers are open at the holder at once. */
const DOWNLOAD_RATE = "1M";

export const busyHolder: Scenario = {
  name: "busy-holder",
  title: "16 parallel NAR downloads from one holder, then nix copy of the 16 paths",
  goal: "16 of 16 downloads complete; nix copy at Nix's default parallelism succeeds",
  async run({ log }) {
    const fleet = await createFleet(["a", "b"]);
    const [a, b] = fleet.hosts as [FleetHost, FleetHost];
    try {
      log(`A holds ${PATHS} paths of ${SIZE >> 20} MiB; B knows A`);
      const paths: string[] = [];
      for (let i = 0; i < PATHS; i++) paths.push(await addBlob(a, `busy-${i}`, SIZE));
      await addBlob(b, "b-own", 1024);
      await a.start();
      await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`]);
      const infos = await eventually("B sees A's paths", async () => {
        const all = await Promise.all(paths.map((p) => narinfoVia(b, p)));
        return all.every(Boolean) ? all.map((i) => i!) : undefined;
      }, 60_000);
      const meters = { a: ProcessMeter.of(a.agent!), b: ProcessMeter.of(b.agent!) };

      log(`${PATHS} downloads at once, each at ${DOWNLOAD_RATE}B/s`);
      const downloads = await Promise.all(infos.map((info) => downloadNar(b, info, DOWNLOAD_RATE)));
      const failed = downloads.filter((d) => !d.ok);

      log("nix copy of the same paths from B's agent (require-sigs)");
      const t0 = performance.now();
      let copyError: string | undefined;
      await b
        .exec("nix", [
          ...NIX_FLAGS, "copy", "--from", b.agent!.url, "--to", join(b.dir, "dest"),
          "--option", "trusted-public-keys", fleet.trustedKeys.join(" "), "--option", "require-sigs", "true",
          ...paths,
        ])
        .catch((e: Error) => (copyError = e.message.split("\n").find((l) => /error/.test(l)) ?? e.message));
      const copyMs = performance.now() - t0;

      const busy = logLines(b.agent, /.*/).filter((r) => /busy/.test(JSON.stringify(r)));
      const ok = failed.length === 0 && copyError === undefined;
      return {
        ok,
        figures: [
          ["parallel downloads", `${PATHS - failed.length} of ${PATHS} complete`],
          ...(failed.length > 0 ? [["first failure", failed[0]!.error ?? ""] as [string, string]] : []),
          ["download time (complete ones)", percentiles(downloads.filter((d) => d.ok).map((d) => d.ms))],
          ["download time (failed ones)", percentiles(failed.map((d) => d.ms))],
          ["nix copy of the 16 paths", copyError === undefined ? `succeeded in ${(copyMs / 1000).toFixed(1)} s` : `FAILED in ${(copyMs / 1000).toFixed(1)} s: ${copyError}`],
          ["B log lines mentioning busy", busy.length],
          ...(busy.length > 0 ? [["first of them", `${busy[0]!.msg}: ${String(busy[0]!.err ?? "")}`] as [string, string]] : []),
          ["agent A", meters.a.summary()],
          ["agent B", meters.b.summary()],
        ],
      };
    } finally {
      await fleet.destroy();
    }
  },
};
