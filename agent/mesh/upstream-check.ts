// The optional upstream check (config `upstream_caches`): before a peer's fleet-only narinfo is
// believed, ask the upstream caches whether they have the path, and with what contents. Answers
// are remembered (found: an hour, absent: 10 minutes); a cache that fails or does not answer in
// time is left alone for 30 s, so an unreachable upstream (an offline fleet) costs one timeout,
// not one per lookup. Every answer is hostile input until its signature by an upstream key checks.
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Verifier, type PublicKey } from "../../protocol/keys.js";
import { DEFAULT_MAX_NARINFO_BYTES, fingerprint, parseNarinfo, type Narinfo } from "../../protocol/narinfo.js";
import { storePathHashPart } from "../../protocol/store-path.js";
import type { Logger } from "../log.js";

export type UpstreamAnswer =
  /** An upstream cache has the path, with a valid upstream signature. */
  | { kind: "signed"; narinfo: Narinfo }
  /** No upstream cache has it (or none with a valid signature). */
  | { kind: "absent" }
  /** Some cache could not be asked, and none has it: nothing is known. */
  | { kind: "unknown"; reason: string };

export interface UpstreamCheckOptions {
  /** Per request (default 1500 ms, within the 2 s a lookup may take). */
  timeoutMs?: number;
  foundTtlMs?: number;
  absentTtlMs?: number;
  /** How long a cache that failed is not asked (default 30 s). */
  downMs?: number;
  log?: Logger;
}

const MAX_REMEMBERED = 50_000;

export class UpstreamCheck {
  /** Questions sent, and those that failed (errors, timeouts, a cache left alone after one). */
  readonly counters = { checks: 0, failures: 0 };
  readonly #timeoutMs: number;
  readonly #foundMs: number;
  readonly #absentMs: number;
  readonly #downMs: number;
  readonly #log: Logger | undefined;
  readonly #remembered = new Map<string, { answer: UpstreamAnswer; until: number }>();
  readonly #downUntil = new Map<string, number>();
  readonly #verifier: Verifier;

  constructor(
    readonly caches: readonly string[],
    readonly keys: readonly PublicKey[],
    opts: UpstreamCheckOptions = {},
  ) {
    this.#timeoutMs = opts.timeoutMs ?? 1500;
    this.#foundMs = opts.foundTtlMs ?? 3_600_000;
    this.#absentMs = opts.absentTtlMs ?? 600_000;
    this.#downMs = opts.downMs ?? 30_000;
    this.#log = opts.log;
    this.#verifier = new Verifier(keys);
  }

  /** What the upstream caches say of the path; never throws. */
  async lookup(hashPart: string, signal?: AbortSignal): Promise<UpstreamAnswer> {
    const known = this.#remembered.get(hashPart);
    if (known && known.until > Date.now()) return known.answer;
    this.counters.checks++;
    const answers = await Promise.all(this.caches.map((c) => this.#ask(c, hashPart, signal)));
    const answer = answers.find((a) => a.kind === "signed") ?? answers.find((a) => a.kind === "unknown") ?? { kind: "absent" as const };
    if (answer.kind === "unknown") {
      if (!signal?.aborted) this.counters.failures++; // not when the lookup ended first (a peer's upstream signature, the deadline)
    } else {
      if (this.#remembered.size >= MAX_REMEMBERED) this.#remembered.delete(this.#remembered.keys().next().value!);
      this.#remembered.set(hashPart, { answer, until: Date.now() + (answer.kind === "signed" ? this.#foundMs : this.#absentMs) });
    }
    return answer;
  }

  async #ask(cache: string, hashPart: string, signal?: AbortSignal): Promise<UpstreamAnswer> {
    const down = this.#downUntil.get(cache);
    if (down !== undefined && down > Date.now()) return { kind: "unknown", reason: `${cache} failed recently` };
    try {
      const body = await fetchNarinfoText(cache, hashPart, timeoutSignal(this.#timeoutMs, signal));
      if (body === undefined) return { kind: "absent" };
      const n = parseNarinfo(body);
      if (storePathHashPart(n.storePath) !== hashPart) throw new Error(`answer is for ${n.storePath}`);
      const fp = fingerprint(n);
      const sigs = n.sigs.filter((s) => this.#verifier.verify(fp, s));
      if (sigs.length === 0) {
        this.#log?.debug({ cache, hashPart }, "upstream narinfo has no signature by an upstream key: not evidence");
        return { kind: "absent" };
      }
      return { kind: "signed", narinfo: { ...n, sigs } };
    } catch (err) {
      if (signal?.aborted) return { kind: "unknown", reason: "lookup over" }; // our caller gave up: not the cache's fault
      this.#downUntil.set(cache, Date.now() + this.#downMs);
      const reason = `${cache}: ${(err as Error).message}`;
      this.#log?.warn({ cache, hashPart, err: (err as Error).message }, "upstream check failed; fleet-only answers are judged by the peers' answers alone for a while");
      return { kind: "unknown", reason };
    }
  }
}

/** The narinfo's text, undefined when the cache says it has no such path (404 or 403, as Nix takes them). */
async function fetchNarinfoText(cache: string, hashPart: string, signal: AbortSignal): Promise<Uint8Array | undefined> {
  const base = cache.replace(/\/+$/, "");
  if (base.startsWith("file://")) {
    try {
      const buf = await readFile(join(fileURLToPath(base), `${hashPart}.narinfo`), { signal });
      if (buf.length > DEFAULT_MAX_NARINFO_BYTES) throw new Error("narinfo too large");
      return buf;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  }
  const res = await fetch(`${base}/${hashPart}.narinfo`, { signal, redirect: "follow" });
  if (res.status === 404 || res.status === 403) {
    await res.body?.cancel();
    return undefined;
  }
  if (res.status !== 200) {
    await res.body?.cancel();
    throw new Error(`HTTP ${res.status}`);
  }
  return readBounded(res, DEFAULT_MAX_NARINFO_BYTES);
}

async function readBounded(res: Response, max: number): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let n = 0;
  for await (const c of res.body as unknown as AsyncIterable<Uint8Array>) {
    n += c.length;
    if (n > max) throw new Error(`narinfo larger than ${max} bytes`);
    chunks.push(c);
  }
  return Buffer.concat(chunks);
}

function timeoutSignal(ms: number, signal?: AbortSignal): AbortSignal {
  const t = AbortSignal.timeout(ms);
  return signal ? AbortSignal.any([signal, t]) : t;
}

/** Whether `url` is a cache the check can ask (http, https or file). */
export function isUpstreamCacheUrl(url: string): boolean {
  try {
    const u = new URL(url);
    return (u.protocol === "http:" || u.protocol === "https:" || u.protocol === "file:") && !u.search && !u.hash;
  } catch {
    return false;
  }
}
