// Scenario 7: one compromised fleet host forges paths that an upstream cache signed. C (on B's
// bridge, so B asks it first) built the same derivations with other contents, signed only by its
// fleet key; A (behind a 30 ms link) got the genuine ones from the upstream cache (a file://
// cache signed with an upstream key). Nix on B, trusting the upstream key and every fleet key as
// a fleet host's Nix must, copies through its agent with require-sigs: first with the trust
// policy off (upstream_keys = none: the first verified answer wins, as before the policy), then
// on, then with the upstream check for a path only C holds.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { ChildProcess } from "node:child_process";
import { startProxy } from "../fleet-tools.js";
import { announcedTo, createFleet, eventually, P2P_PORT, type FleetHost } from "../../test/helpers/fleet.js";
import { createSites } from "../../test/helpers/netns.js";
import { NIX_FLAGS, OFFLINE, pathInfo, run, tempDir } from "../../test/helpers/nix.js";
import type { Scenario } from "../scenario.js";

const EXPR = `let
  mk = name: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/usr/bin/head -c 65536 /dev/urandom > $out" ]; };
in { shared = mk "forged-shared"; onlyC = mk "forged-only-c"; }
`;

export const forgedNarinfo: Scenario = {
  name: "forged-narinfo",
  title: "a compromised fleet host forges paths an upstream cache signed",
  goal: "Nix on another host never installs the forgery of a path a genuine holder has upstream-signed; with upstream_caches, not even of one only the forger holds",
  async run({ log }) {
    const tmp = tempDir("fleetcache-forged-");
    const sites = await createSites([2, 1]);
    const fleet = await createFleet(["a", "b", "c"], { hosts: [sites.sites[1]![0]!, sites.sites[0]![0]!, sites.sites[0]![1]!], destroy: sites.destroy });
    const [A, B, C] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
    let proxy: ChildProcess | undefined;
    try {
      const expr = join(tmp.dir, "forged.nix");
      writeFileSync(expr, EXPR);
      const build = async (root: string, attr: string) => (await run("nix-build", ["--store", root, ...OFFLINE, expr, "-A", attr, "--no-out-link"])).trim();
      const upSec = join(tmp.dir, "up.sec");
      await run("nix-store", ["--generate-binary-cache-key", "upstream-1", upSec, join(tmp.dir, "up.pub")]);
      const upPub = (await run("cat", [join(tmp.dir, "up.pub")])).trim();
      const builder = join(tmp.dir, "builder");
      const paths = [await build(builder, "shared"), await build(builder, "onlyC")];
      const [shared, onlyC] = paths as [string, string];
      await run("nix", [...NIX_FLAGS, "store", "sign", "--store", builder, "--key-file", upSec, ...paths]);
      const upstream = `file://${join(tmp.dir, "upstream")}`;
      await run("nix", [...NIX_FLAGS, "copy", "--from", builder, "--to", `${upstream}?compression=none`, ...paths]);
      await run("nix", [...NIX_FLAGS, "copy", "--from", upstream, "--to", A.storeRoot, "--option", "trusted-public-keys", upPub, shared]);
      await build(C.storeRoot, "shared");
      await build(C.storeRoot, "onlyC");
      writeFileSync(join(B.dir, "b.txt"), "b\n");
      await run("nix-store", ["--store", B.storeRoot, "--add", join(B.dir, "b.txt")]);
      const genuine = new Map((await pathInfo(builder, paths)).map((i) => [i.path, i.narHash]));
      const forged = new Map((await pathInfo(C.storeRoot, paths)).map((i) => [i.path, i.narHash]));

      const aViaLink = `${sites.link.linkIps[0]}:${P2P_PORT}`;
      proxy = (await startProxy(sites.link, aViaLink, `${A.net.ip}:${P2P_PORT}`, { latencyMs: 30 })).child;
      await A.start();
      await C.start(["--peer", `${B.net.ip}:${P2P_PORT}`]);
      const trusted = `${upPub} ${fleet.trustedKeys.join(" ")}`;

      /** Starts B's agent as told, copies `path` through it into a fresh store: what Nix installed. */
      const attempt = async (label: string, env: NodeJS.ProcessEnv, path: string): Promise<string> => {
        await B.start(["--peer", aViaLink], undefined, { NIX_CONFIG: `trusted-public-keys = ${trusted}`, ...env });
        await announcedTo(B, A);
        await announcedTo(B, C);
        await eventually("B asks C first", async () => {
          const peers = (await B.status()).peers as { name: string; rttMs?: number }[];
          const a = peers.find((p) => p.name === "a-1")?.rttMs;
          const c = peers.find((p) => p.name === "c-1")?.rttMs;
          return a !== undefined && c !== undefined && c < a;
        }, 60_000);
        const dest = join(tmp.dir, `dest-${label}`);
        const t0 = performance.now();
        const failed = await B.exec("nix", [...NIX_FLAGS, "copy", "--from", B.agent!.url, "--to", dest, "--option", "trusted-public-keys", trusted,
          "--option", "require-sigs", "true", "--option", "narinfo-cache-negative-ttl", "0", path]).then(() => false, () => true);
        const ms = Math.round(performance.now() - t0);
        const c = (await B.status()).peers.find((p) => p.name === "c-1") as { badNarinfos?: number } | undefined;
        const got = failed ? undefined : (await pathInfo(dest, [path]))[0]?.narHash;
        const what = got === undefined ? "nothing (nix copy failed)" : got === genuine.get(path) ? "the GENUINE contents" : got === forged.get(path) ? "the FORGERY" : "other contents";
        log(`${label}: ${what}`);
        return `${what}, in ${ms} ms; C's narinfos counted against it: ${c?.badNarinfos ?? 0}`;
      };
      const before = await attempt("policy-off", { FLEETCACHE_UPSTREAM_KEYS: "none" }, shared);
      const after = await attempt("policy-on", {}, shared);
      const soleNoCheck = await attempt("sole-forger", {}, onlyC);
      const soleCheck = await attempt("sole-forger-checked", { FLEETCACHE_UPSTREAM_CACHES: upstream }, onlyC);
      return {
        ok: after.startsWith("the GENUINE") && !soleCheck.includes("FORGERY"),
        figures: [
          ["set-up", "B and C on one bridge, A behind 30 ms each way; A has the path from upstream (signed), C a forgery signed by its fleet key"],
          ["before: first verified answer wins (upstream_keys = none)", before],
          ["after: trust policy (default upstream keys)", after],
          ["a path only C holds, no upstream check (the documented limit)", soleNoCheck],
          ["a path only C holds, upstream_caches set", soleCheck],
        ],
      };
    } finally {
      proxy?.kill("SIGTERM");
      await fleet.destroy();
      tmp.cleanup();
    }
  },
};
