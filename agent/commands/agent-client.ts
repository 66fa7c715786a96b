// Talking to a running agent from the operator commands: which URL, and plain GETs with a
// deadline whose failures say what to check.
import { DEFAULT_PORT } from "../config.js";

export const DEFAULT_AGENT_URL = `http://127.0.0.1:${DEFAULT_PORT}`;
const TIMEOUT_MS = 5000;

export class UsageError extends Error {}

/** --agent, else FLEETCACHE_AGENT, else the default listen address; without a trailing slash. */
export function agentUrl(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  const raw = flag ?? (env.FLEETCACHE_AGENT || DEFAULT_AGENT_URL);
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new UsageError(`--agent: ${JSON.stringify(raw)} is not a URL (e.g. ${DEFAULT_AGENT_URL})`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw new UsageError(`--agent: expected an http:// URL, got ${raw}`);
  return url.toString().replace(/\/+$/, "");
}

/** An agent that could not be asked (down, wrong address) or answered with an error status. */
export class AgentError extends Error {
  constructor(message: string, readonly status?: number) {
    super(message);
  }
}

export interface AgentResponse {
  status: number;
  body: string;
}

/** GET url+path; network failures become AgentError with the reason (refused, timeout, ...). */
export async function agentGet(url: string, path: string, timeoutMs = TIMEOUT_MS): Promise<AgentResponse> {
  let res: Response;
  try {
    res = await fetch(url + path, { signal: AbortSignal.timeout(timeoutMs), redirect: "error" });
  } catch (e) {
    throw new AgentError(`cannot reach the fleetcache agent at ${url}: ${networkReason(e)}`);
  }
  return { status: res.status, body: await res.text() };
}

/** GET a JSON document; non-200 answers are AgentErrors carrying the status. */
export async function agentJson(url: string, path: string): Promise<unknown> {
  const r = await agentGet(url, path);
  if (r.status !== 200) throw new AgentError(`${url}${path} answered ${r.status}: ${r.body.trim().slice(0, 200)}`, r.status);
  try {
    return JSON.parse(r.body);
  } catch {
    throw new AgentError(`${url}${path} did not answer JSON (is this a fleetcache agent?)`);
  }
}

function networkReason(e: unknown): string {
  const err = e as { name?: string; message?: string; cause?: { code?: string; message?: string } };
  if (err.name === "TimeoutError") return "no answer in time";
  const code = err.cause?.code;
  if (code === "ECONNREFUSED") return "connection refused (nothing listens there)";
  return code ?? err.cause?.message ?? err.message ?? String(e);
}

/** "key: value" lines of /nix-cache-info. */
export function parseCacheInfo(text: string): Map<string, string> {
  const fields = new Map<string, string>();
  for (const line of text.split("\n")) {
    const colon = line.indexOf(":");
    if (colon > 0) fields.set(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  return fields;
}
