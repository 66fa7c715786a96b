// The floor for the agent's narinfo answers, and the steps from it to the agent. Step "bare" is
// a bare node:http server that answers each URL with a response recorded from the agent (same
// status, headers and body; Node adds Date, Connection and Keep-Alive to both alike), and every
// other URL with the agent's recorded 404. The later steps add the agent's own pieces one at a
// time, from this checkout's dist/, so that one run says what each costs (bench/builds.ts --steps):
//   net      the recorded answers from the agent's fast path (agent/http/fast-path.ts) in front
//            of the bare server: its own request-head parser, one socket write an answer;
//   options  the agent's server options, half-open flag, clientError and connection limiter
//            (agent/http/server.ts's createListener), still the recorded answers;
//   routing  the agent's HTTP layer (createHttpServer: route, dispatch, handleNarinfo, rendered
//            answers) over a source that answers from a Map of PathInfos read once;
//   lookup   the same over the agent's LocalStore (database backend, watcher running);
//   metrics  the same with the agent's AgentMetrics and GC setting: all of the agent but its CLI,
//            config and (off in the benchmarks) mesh.
// The steps from "routing" on sign with the agent's key, so their answers are the agent's bytes.
//
//   node dist/bench/bare-narinfo.js RESPONSES.json PORT [STEP STORE_ROOT KEY_FILE]
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

export interface Recorded {
  status: number;
  /** Header names and values, flat, as res.writeHead takes them. */
  headers: string[];
  /** Base64. */
  body: string;
}

export interface RecordedResponses {
  /** By request path. */
  hits: Record<string, Recorded>;
  miss: Recorded;
}

export const STEPS = ["bare", "net", "options", "routing", "lookup", "metrics"] as const;
export type Step = (typeof STEPS)[number];

async function main(): Promise<void> {
  const [file, port, step = "bare", storeRoot, keyFile] = process.argv.slice(2) as [string?, string?, Step?, string?, string?];
  if (!file || !port || !STEPS.includes(step)) throw new Error(`usage: bare-narinfo RESPONSES.json PORT [${STEPS.join("|")} STORE_ROOT KEY_FILE]`);
  const server = step === "bare" || step === "net" || step === "options" ? await recordedServer(file, step) : await agentServer(step, storeRoot!, keyFile!, file);
  server.listen(Number(port), "127.0.0.1");
  process.on("SIGTERM", () => process.exit(0));
}

async function recordedServer(file: string, step: "bare" | "net" | "options") {
  const recorded = JSON.parse(readFileSync(file, "utf8")) as RecordedResponses;
  // Bodies as latin1 strings (the same bytes): res.end() sends a string in one write with the
  // headers, the cheapest way node:http has.
  const text = (r: Recorded) => ({ ...r, body: Buffer.from(r.body, "base64").toString("latin1") });
  const answers = new Map<string, { status: number; headers: string[]; body: string }>();
  for (const [path, r] of Object.entries(recorded.hits)) answers.set(path, text(r));
  const miss = text(recorded.miss);
  const answer = (req: IncomingMessage, res: ServerResponse) => {
    const a = answers.get(req.url ?? "") ?? miss;
    res.writeHead(a.status, a.headers);
    if (req.method === "HEAD") res.end();
    else res.end(a.body, "latin1");
  };
  // The agent's keepAliveTimeout, so that the Keep-Alive header matches too.
  if (step === "bare") return createServer({ keepAliveTimeout: 30_000 }, answer);
  if (step === "net") {
    // The same answers from the agent's fast path (agent/http/fast-path.ts: its own request-head
    // parser on the sockets, one write an answer), no node:http request or response objects.
    const { installFastPath } = await import("../agent/http/fast-path.js");
    const server = createServer({ keepAliveTimeout: 30_000 }, answer);
    const replies = new Map<string, import("../agent/http/fast-path.js").Reply>();
    const reply = (a: { status: number; headers: string[]; body: string }) => ({ status: a.status, head: a.headers, body: a.body, encoding: "latin1" as const });
    for (const [path, a] of answers) replies.set(path, reply(a));
    const missReply = reply(miss);
    if (!installFastPath(server, (_method, target) => replies.get(target) ?? missReply)) throw new Error("no fast path on this Node");
    return server;
  }
  return agentListener(answer);
}

/** The agent's node:http server (agent/http/server.ts) answering with `answer`. */
async function agentListener(answer: (req: IncomingMessage, res: ServerResponse) => void) {
  const { createListener } = await import("../agent/http/server.js");
  return createListener(answer);
}

async function agentServer(step: "routing" | "lookup" | "metrics", storeRoot: string, keyFile: string, file: string) {
  const { createHttpServer } = await import("../agent/http/server.js");
  const { LocalStore } = await import("../agent/store/local-store.js");
  const { Signer } = await import("../agent/signer.js");
  const { readSecretKeyFile } = await import("../agent/keys-file.js");
  const { createLogger } = await import("../agent/log.js");
  const { AgentMetrics } = await import("../agent/metrics.js");
  const { tuneGcForBuffers } = await import("../agent/gc-tuning.js");
  type PathInfo = import("../protocol/path-info.js").PathInfo;
  const log = createLogger({ pretty: false });
  if (step === "metrics") tuneGcForBuffers();
  const store = new LocalStore(storeRoot, new Signer([readSecretKeyFile(keyFile)]));
  store.watch();
  let source: import("../agent/source.js").PathSource = store;
  if (step === "routing") {
    // Every recorded hit's PathInfo, read once: lookups become a Map.get.
    const infos = new Map<string, PathInfo>();
    const recorded = JSON.parse(readFileSync(file, "utf8")) as RecordedResponses;
    for (const path of Object.keys(recorded.hits)) {
      const h = path.slice(1, -".narinfo".length);
      const info = store.pathInfoNow(h);
      if (info && typeof info === "object") infos.set(h, info);
    }
    source = {
      pathInfo: async (h) => infos.get(h),
      pathInfoNow: (h) => infos.get(h),
      narStream: () => { throw new Error("no NARs in this step"); },
    };
  }
  const metrics = step === "metrics" ? new AgentMetrics({ storePaths: () => store.pathCount(), peers: () => [], mesh: () => undefined }) : undefined;
  return createHttpServer({ source, local: store, priority: 30, log, ...(metrics ? { metrics } : {}) });
}

// Run as a script; bench/builds.ts imports STEPS from here.
if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) void main();
