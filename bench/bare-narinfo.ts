// The floor for the agent's narinfo answers: a bare node:http server that answers each URL with
// a response recorded from the agent (same status, headers and body; Node adds Date, Connection
// and Keep-Alive to both alike), and every other URL with the agent's recorded 404. Started by
// bench/builds.ts --bare, so that it runs side by side with nginx and the agent builds.
//
//   node dist/bench/bare-narinfo.js RESPONSES.json PORT
import { createServer } from "node:http";
import { readFileSync } from "node:fs";

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

function main(): void {
  const [file, port] = process.argv.slice(2);
  if (!file || !port) throw new Error("usage: bare-narinfo RESPONSES.json PORT");
  const recorded = JSON.parse(readFileSync(file, "utf8")) as RecordedResponses;
  // Bodies as latin1 strings (the same bytes): res.end() sends a string in one write with the
  // headers, the cheapest way node:http has.
  const text = (r: Recorded) => ({ ...r, body: Buffer.from(r.body, "base64").toString("latin1") });
  const answers = new Map<string, { status: number; headers: string[]; body: string }>();
  for (const [path, r] of Object.entries(recorded.hits)) answers.set(path, text(r));
  const miss = text(recorded.miss);
  // The agent's keepAliveTimeout, so that the Keep-Alive header matches too.
  const server = createServer({ keepAliveTimeout: 30_000 }, (req, res) => {
    const a = answers.get(req.url ?? "") ?? miss;
    res.writeHead(a.status, a.headers);
    if (req.method === "HEAD") res.end();
    else res.end(a.body, "latin1");
  });
  server.listen(Number(port), "127.0.0.1");
  process.on("SIGTERM", () => process.exit(0));
}

main();
