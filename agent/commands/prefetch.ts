// `fleetcache prefetch`: bring a closure into the local store from the fleet ahead of time. The
// local agent resolves it (asking its peers), Nix copies it — checking signatures as the user's
// Nix configuration requires — and progress is measured by which paths have become valid.
import { spawn } from "node:child_process";
import { AgentError, agentJson, agentUrl } from "./agent-client.js";
import { resolveClosure, parseWanted, type Missing } from "./closure.js";
import { formatBytes } from "./format.js";
import { Progress } from "./progress.js";
import { readStatus } from "./status-doc.js";
import { invalidPaths } from "./store-validity.js";

export interface PrefetchOptions {
  agent?: string;
  /** Destination store URI or chroot directory; Nix's default store when absent. */
  store?: string;
  /** How often to look which paths have arrived (ms). */
  pollMs?: number;
}

export async function runPrefetch(args: string[], opts: PrefetchOptions, err: NodeJS.WriteStream | NodeJS.WritableStream = process.stderr): Promise<number> {
  const url = agentUrl(opts.agent);
  const wanted = args.map(parseWanted); // usage errors surface before any network traffic
  const say = (s: string) => err.write(`prefetch: ${s}\n`);

  let closure;
  try {
    closure = await resolveClosure(url, wanted);
  } catch (e) {
    if (!(e instanceof AgentError)) throw e;
    say(`${e.message}\nCheck that the agent runs and that --agent or FLEETCACHE_AGENT is its --listen URL.`);
    return 1;
  }
  if (closure.missing.length > 0) {
    say(`not found in the fleet:\n${closure.missing.map((m) => `  ${describeMissing(m)}`).join("\n")}\n${await whoWasAsked(url)}`);
    return 1;
  }

  const all = [...closure.infos.keys()];
  let todo: string[];
  try {
    const invalid = await invalidPaths(all, opts.store);
    todo = all.filter((p) => invalid.has(p));
  } catch (e) {
    say((e as Error).message);
    return 1;
  }
  const size = (paths: Iterable<string>) => [...paths].reduce((n, p) => n + closure.infos.get(p)!.narSize, 0);
  const totalBytes = size(todo);
  say(`${all.length} paths in the closure, ${all.length - todo.length} already present; fetching ${todo.length} paths (${formatBytes(totalBytes)}) from ${url}`);
  if (todo.length === 0) return 0;

  const progress = new Progress(todo.length, totalBytes, err);
  // Progress: the paths that became valid since the copy started.
  let pending = new Set(todo);
  const poll = async () => {
    try {
      const still = await invalidPaths([...pending], opts.store);
      pending = new Set([...pending].filter((p) => still.has(p)));
    } catch {
      // The store may be busy mid-copy; the next poll will tell.
    }
    const done = todo.filter((p) => !pending.has(p));
    return { paths: done.length, bytes: size(done) };
  };
  progress.update(0, 0, true);
  let polling = Promise.resolve();
  const timer = setInterval(() => {
    polling = polling.then(async () => {
      const d = await poll();
      progress.update(d.paths, d.bytes);
    });
  }, opts.pollMs ?? 1000);

  const copy = await nixCopy(url, opts.store, closure.roots);
  clearInterval(timer);
  await polling;
  const final = await poll();
  if (copy.code !== 0 || final.paths < todo.length) {
    progress.abort();
    const missingNow = todo.filter((p) => pending.has(p));
    say(`nix copy ${copy.code !== 0 ? `failed (exit ${copy.code})` : "ended"}; ${missingNow.length} of ${todo.length} paths did not arrive${missingNow.length ? ` (${missingNow.slice(0, 3).join(" ")}${missingNow.length > 3 ? " ..." : ""})` : ""}. Nix said:\n${copy.stderr.trim().split("\n").slice(-20).join("\n") || "(nothing)"}`);
    if (/signature/i.test(copy.stderr)) {
      say("Nix requires the paths to be signed by a trusted key: add the fleet's keys (`fleetcache status` shows them) to trusted-public-keys.");
    }
    return 1;
  }
  progress.finish(final.paths, final.bytes);
  return 0;
}

function describeMissing(m: Missing): string {
  return m.referrer ? `${m.what} (referenced by ${m.referrer})` : m.what;
}

/** Which peers the agent could have asked, from its status (when it answers it). */
async function whoWasAsked(url: string): Promise<string> {
  try {
    const s = readStatus(await agentJson(url, "/api/v1/status"));
    if (!s.self.peerId) return `The agent at ${url} has the mesh off: only its own store was searched.`;
    const connected = s.peers.filter((p) => p.connected).map((p) => p.name);
    return connected.length
      ? `The agent at ${url} searched its store and its connected peers (${connected.join(", ")}); none holds it. Build it, or copy it from where it was built.`
      : `The agent at ${url} searched its own store; it has no connected peers (\`fleetcache doctor\` tells why).`;
  } catch {
    return `The agent at ${url} does not have it (its status, naming the peers asked, is unavailable).`;
  }
}

/** Runs `nix copy --from <agent>` for the roots (Nix copies their closures), capturing stderr. */
function nixCopy(url: string, store: string | undefined, roots: string[]): Promise<{ code: number; stderr: string }> {
  const args = [
    "--extra-experimental-features", "nix-command",
    "copy", "--from", url, ...(store ? ["--to", store] : []),
    // Nix must ask the agent now, not trust a miss it remembered from an earlier lookup.
    "--option", "narinfo-cache-negative-ttl", "0",
    ...roots,
  ];
  return new Promise((resolve) => {
    const child = spawn("nix", args, { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
      if (stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 19));
    });
    child.on("error", (e) => resolve({ code: 127, stderr: `cannot run nix: ${e.message}` }));
    child.on("close", (code) => resolve({ code: code ?? 1, stderr }));
  });
}
