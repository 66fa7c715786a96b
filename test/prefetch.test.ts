// `fleetcache prefetch` against a real agent serving a chroot store: the closure arrives in an
// empty store with Nix checking the agent's signatures, progress lines are printed, and a path
// the fleet lacks is named.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { Progress } from "../agent/commands/progress.js";
import { runCli as fleetcache } from "./helpers/agent.js";
import { startShapesAgent } from "./helpers/fixtures.js";
import { NIX_FLAGS, needNix, pathInfo, run, tempDir, UNSIGNED_REFUSED } from "./helpers/nix.js";



test("prefetch brings a closure from the agent into an empty store, signed and verified, with plain progress lines", async (t) => {
  if (!(await needNix(t))) return;
  const shapes = (await startShapesAgent())!;
  const tmp = tempDir();
  try {
    const { closure, agent, publicKey, storeRoot } = shapes;
    // Nix checks signatures as configured: the user trusts the agent's key (here through
    // NIX_CONFIG, as one would for a one-off run); prefetch never disables require-sigs.
    const trust = { NIX_CONFIG: `trusted-public-keys = ${publicKey}\nrequire-sigs = true` };
    const roots = [closure.built, closure.builtSymlink, closure.tree];
    const expected = new Set((await pathInfo(storeRoot, roots, true)).map((i) => i.path));
    assert.ok(expected.size >= 4, "the closure has references to follow");

    // Without the agent's key trusted, Nix refuses the input-addressed paths and prefetch says so.
    const untrusted = join(tmp.dir, "untrusted");
    const refused = await fleetcache(["prefetch", "--agent", agent.url, "--store", untrusted, closure.built], {
      NIX_CONFIG: "trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\nrequire-sigs = true",
    });
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr, /nix copy failed/);
    assert.match(refused.stderr, UNSIGNED_REFUSED); // Nix's own words, passed on
    assert.match(refused.stderr, /add the fleet's keys .* to trusted-public-keys/);

    // Paths given in every accepted form: a file inside a path, a path, <hash>-<name>, a hash part.
    const dest = join(tmp.dir, "dest");
    const base = (p: string) => p.slice("/nix/store/".length);
    const args = [`${closure.built}/self`, closure.builtSymlink, base(closure.tree), base(closure.tree).slice(0, 32)];
    const r = await fleetcache(["prefetch", "--agent", agent.url, "--store", dest, ...args], trust);
    assert.equal(r.code, 0, r.stderr);
    const got = new Set((await pathInfo(dest, roots, true)).map((i) => i.path));
    assert.deepEqual([...got].sort(), [...expected].sort());
    // Nix re-hashes every path and checks the agent's signature on the input-addressed ones.
    await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "-r", ...roots, "--trusted-public-keys", publicKey]);

    // Not a terminal: plain lines only, from 0/N to N/N, then the completion line.
    const lines = r.stderr.trim().split("\n");
    for (const l of lines) assert.match(l, /^prefetch: /);
    assert.match(lines[0]!, new RegExp(`^prefetch: ${expected.size} paths in the closure, 0 already present; fetching ${expected.size} paths`));
    const progress = lines.filter((l) => /^prefetch: \d+\/\d+ paths, /.test(l));
    assert.match(progress[0]!, new RegExp(`^prefetch: 0/${expected.size} paths, 0 B/\\S+ \\S+, \\S+ \\S+/s, ETA `));
    assert.match(progress.at(-1)!, new RegExp(`^prefetch: ${expected.size}/${expected.size} paths, (\\S+ \\S+)/\\1, .*ETA 0 s$`));
    assert.match(lines.at(-1)!, new RegExp(`^prefetch: done, ${expected.size} paths, \\S+ \\S+ in [\\d.]+ s`));

    // Again: everything is present, nothing to do.
    const again = await fleetcache(["prefetch", "--agent", agent.url, "--store", dest, closure.built], trust);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /already present; fetching 0 paths/);
  } finally {
    await shapes.stop();
    tmp.cleanup();
  }
});

test("prefetch names a path the fleet does not have and exits 1; bad arguments exit 2", async (t) => {
  if (!(await needNix(t))) return;
  const shapes = (await startShapesAgent())!;
  const tmp = tempDir();
  try {
    const unknown = "/nix/store/00000000000000000000000000000000-not-in-the-fleet";
    const r = await fleetcache(["prefetch", "--agent", shapes.agent.url, "--store", join(tmp.dir, "dest"), shapes.closure.built, unknown]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /not found in the fleet:\n {2}\/nix\/store\/00000000000000000000000000000000-not-in-the-fleet\n/);
    assert.match(r.stderr, /mesh off: only its own store was searched/);
    assert.equal((await fleetcache(["prefetch", "--agent", shapes.agent.url, "not-a-path"])).code, 2);
    assert.equal((await fleetcache(["prefetch"])).code, 2);
  } finally {
    await shapes.stop();
    tmp.cleanup();
  }
});

test("on a terminal, progress is a bar with paths, bytes, rate and ETA", () => {
  const out = Object.assign(new PassThrough(), { isTTY: true, columns: 120 });
  let text = "";
  out.on("data", (d: Buffer) => (text += d.toString()));
  const p = new Progress(4, 4_000_000, out as unknown as NodeJS.WriteStream);
  p.update(1, 1_000_000, true);
  p.finish(4, 4_000_000);
  // The bar redraws at most 10 times a second, so the first and last states are the sure ones.
  assert.match(text, /prefetch \[░+\] 0\/4 paths \| 0 B\/4\.0 MB \| 0 B\/s \| ETA \?/);
  assert.match(text, /prefetch \[█+\] 4\/4 paths \| 4\.0 MB\/4\.0 MB \| \S+ \S+\/s \| ETA 0 s/);
  assert.match(text, /\nprefetch: done, 4 paths, 4\.0 MB in [\d.]+ s/);
  assert.doesNotMatch(text, /^prefetch: \d+\/\d+ paths,/m, "no plain lines on a terminal");
});
