// Resolving a closure through an agent's narinfos: the paths asked for plus everything they
// reference, recursively, with their NAR sizes (so progress knows the total up front).
import { parseNarinfo, type Narinfo } from "../../protocol/narinfo.js";
import { STORE_DIR } from "../../protocol/path-info.js";
import { isValidHashPart, parseBaseName } from "../../protocol/store-path.js";
import { AgentError, agentGet, UsageError } from "./agent-client.js";

const CONCURRENCY = 16;

/** What the user named: a hash part, and the name when given (checked against the narinfo). */
export interface Wanted {
  arg: string;
  hashPart: string;
  name?: string;
}

/**
 * Accepts "/nix/store/<hash>-<name>[/file/inside]", "<hash>-<name>" and a bare "<hash>";
 * anything else is a usage error.
 */
export function parseWanted(arg: string): Wanted {
  let base = arg;
  if (arg.startsWith(STORE_DIR + "/")) base = arg.slice(STORE_DIR.length + 1).split("/")[0]!;
  if (isValidHashPart(base)) return { arg, hashPart: base };
  try {
    const { hashPart, name } = parseBaseName(base);
    return { arg, hashPart, name };
  } catch (e) {
    throw new UsageError(`${JSON.stringify(arg)} is not a store path, <hash>-<name> or 32-character hash part: ${(e as Error).message}`);
  }
}

export interface Missing {
  /** The path (or what the user typed) that no one has. */
  what: string;
  /** The path that references it, when it is not one the user asked for. */
  referrer?: string;
}

export interface Closure {
  roots: string[];
  infos: Map<string, Narinfo>;
  missing: Missing[];
}

/** Every path of the closure with its narinfo, or the ones the agent (and so the fleet) lacks. */
export async function resolveClosure(agent: string, wanted: Wanted[]): Promise<Closure> {
  const infos = new Map<string, Narinfo>();
  const missing: Missing[] = [];
  const roots: string[] = [];
  const seen = new Set<string>();
  type Job = { hashPart: string; name?: string; what: string; referrer?: string; root: boolean };
  const queue: Job[] = wanted.map((w) => ({ hashPart: w.hashPart, ...(w.name ? { name: w.name } : {}), what: w.arg, root: true }));
  for (const j of queue) seen.add(j.hashPart);

  const work = async (job: Job): Promise<void> => {
    const r = await agentGet(agent, `/${job.hashPart}.narinfo`, 60_000);
    if (r.status === 404) {
      missing.push({ what: job.what, ...(job.referrer ? { referrer: job.referrer } : {}) });
      return;
    }
    if (r.status !== 200) throw new AgentError(`${agent}/${job.hashPart}.narinfo answered ${r.status}: ${r.body.trim().slice(0, 200)}`, r.status);
    let info: Narinfo;
    try {
      info = parseNarinfo(r.body);
    } catch (e) {
      throw new AgentError(`the agent's narinfo for ${job.what} is malformed: ${(e as Error).message}`);
    }
    const got = parseBaseName(info.storePath.slice(STORE_DIR.length + 1));
    if (got.hashPart !== job.hashPart || (job.name !== undefined && got.name !== job.name)) {
      // Same hash, other name: not the path asked for (Nix would refuse it too).
      missing.push({ what: `${job.what} (the fleet has ${info.storePath} under that hash)` });
      return;
    }
    infos.set(info.storePath, info);
    if (job.root) roots.push(info.storePath);
    for (const ref of info.references) {
      const h = ref.slice(STORE_DIR.length + 1, STORE_DIR.length + 33);
      if (seen.has(h)) continue;
      seen.add(h);
      queue.push({ hashPart: h, what: ref, referrer: info.storePath, root: false });
    }
  };

  // A small pool of workers draining a queue that grows as references are discovered.
  let active = 0;
  await new Promise<void>((resolve, reject) => {
    let failed = false;
    const pump = () => {
      if (failed) return;
      if (queue.length === 0 && active === 0) return resolve();
      while (active < CONCURRENCY && queue.length > 0) {
        const job = queue.shift()!;
        active++;
        work(job).then(
          () => {
            active--;
            pump();
          },
          (e) => {
            failed = true;
            reject(e);
          },
        );
      }
    };
    pump();
  });
  return { roots, infos, missing };
}
