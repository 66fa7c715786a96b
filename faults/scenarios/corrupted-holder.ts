// A holder serving wrong bytes next to an intact holder (issue 10, scenario 3): A's store file
// changed on disk under its agent (bit rot, a broken disk, an edit: its database keeps the old
// NarHash), C holds the same path intact, and B's Nix copies it through B's agent with
// `nix copy --from` and require-sigs, once, as a user would. B asks A first (B learnt the path's
// narinfo from A before C had it). A NAR small enough to be held whole until verified, and one
// larger than that hold-back (8 MiB), each with Nix 2.8 and Nix 2.26 (when installed).
import { existsSync } from "node:fs";
import { join } from "node:path";
import { announcedTo, eventually, type FleetHost } from "../../test/helpers/fleet.js";
import { NIX_FLAGS } from "../../test/helpers/nix.js";
import { addBlob, corruptOnDisk, holdersAroundB, narinfoVia } from "../fleet-tools.js";
import { ProcessMeter, type Scenario } from "../scenario.js";

const SIZES = [2 << 20, 24 << 20];
/** Nix 2.26 in its chroot (test/nix/current-nix/setup); Debian's Nix 2.8 is on PATH. */
const CURRENT_NIX = "/opt/fc-nix-current/bin";

interface Copy {
  ok: boolean;
  ms: number;
  /** Nix's error, warning and retry lines. */
  said: string;
}

/** One `nix copy --from` B's agent of `path` into a fresh store, with the given Nix. */
async function nixCopy(b: FleetHost, keys: string[], dest: string, path: string, nixBin?: string): Promise<Copy> {
  const t0 = performance.now();
  const env = nixBin ? [`PATH=${nixBin}:${process.env.PATH}`] : [];
  const child = b.net.spawn("env", [
    ...env, "nix", ...NIX_FLAGS, "copy", "--from", b.agent!.url, "--to", dest, "--option", "trusted-public-keys", keys.join(" "),
    "--option", "require-sigs", "true", "--option", "narinfo-cache-negative-ttl", "0", "--option", "substituters", "", path,
  ], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const code = await new Promise<number | null>((r) => child.once("close", r));
  const said = out.split("\n").map((l) => l.trim()).filter((l) => /error|warning|retrying|mismatch/i.test(l)).join(" | ");
  return { ok: code === 0, ms: performance.now() - t0, said: said.replace(/\/nix\/store\/[0-9a-z]{32}-/g, "/nix/store/…-").slice(0, 400) };
}

const fmt = (c: Copy) => `${c.ok ? "succeeded" : "FAILED"} in ${(c.ms / 1000).toFixed(1)} s${c.said ? `: ${c.said}` : ""}`;

export const corruptedHolder: Scenario = {
  name: "corrupted-holder",
  title: "a holder with a corrupted store file next to an intact holder; B's Nix copies the path once (2 MiB and 24 MiB NARs, Nix 2.8 and 2.26)",
  goal: "every first nix copy succeeds (Nix's default retries allowed) with the right bytes; the corrupted holder is penalised",
  async run({ log }) {
    const { fleet, a, b, c } = await holdersAroundB();
    const nixes: [string, string | undefined][] = [["Nix 2.8", undefined], ...(existsSync(join(CURRENT_NIX, "nix")) ? [["Nix 2.26", CURRENT_NIX] as [string, string]] : [])];
    try {
      const meterB = ProcessMeter.of(b.agent!);
      const figures: [string, string | number][] = [];
      let ok = true;
      for (const [nixName, nixBin] of nixes) {
        for (const size of SIZES) {
          const label = `${size >> 20} MiB NAR, ${nixName}`;
          log(`${label}: A holds it (B learns it from A), then C; A's file is corrupted; B's Nix copies it`);
          const name = `rot-${size >> 20}-${nixName.replace(/\W/g, "")}`;
          const path = await addBlob(a, name, size);
          await announcedTo(b, a);
          await eventually("B answers the path (from A)", () => narinfoVia(b, path), 30_000);
          if ((await addBlob(c, name, size)) !== path) throw new Error("A and C made different paths");
          await announcedTo(b, c);
          await corruptOnDisk(a, path, size >> 1);
          const bad0 = (await b.status()).counters.verifyFailures ?? 0;
          const first = await nixCopy(b, fleet.trustedKeys, join(b.dir, `dest-${name}-1`), path, nixBin);
          const rerun = first.ok ? undefined : await nixCopy(b, fleet.trustedKeys, join(b.dir, `dest-${name}-2`), path, nixBin);
          const caught = ((await b.status()).counters.verifyFailures ?? 0) - bad0;
          figures.push([`${label}: first nix copy`, fmt(first)]);
          if (rerun) figures.push([`${label}: rerun`, fmt(rerun)]);
          figures.push([`${label}: wrong NARs caught by B`, caught]);
          if (!first.ok || caught < 1) ok = false;
        }
      }
      const aSeen = (await b.status()).peers.find((p) => p.name === "a-1") as { badNars?: number; penalisedUntil?: unknown } | undefined;
      figures.push(["A as B's status shows it", `badNars ${aSeen?.badNars ?? "?"}, penalisedUntil ${JSON.stringify(aSeen?.penalisedUntil ?? null)}`]);
      figures.push(["agent b", meterB.summary()]);
      return { ok, figures };
    } finally {
      await fleet.destroy();
    }
  },
};
