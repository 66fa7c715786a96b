// How long a new client waits while another holds every connection slot with idle keep-alive
// sockets. Starts an agent (no store needed for /health), opens N idle sockets to it, then times
// fresh GET /health requests. Loopback only; bounded in count and time. With --path
// /nix-cache-info the idle sockets' one request is one the HTTP fast path answers
// (agent/http/fast-path.ts), so they stay on it; /health hands them to node:http.
//
//   node dist/bench/idle-sockets.js [--sockets 4200] [--tries 5] [--path /health]
import { execFileSync } from "node:child_process";
import { get } from "node:http";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { startAgentProcess } from "../test/helpers/agent.js";

const { values } = parseArgs({
  options: { sockets: { type: "string", default: "4200" }, tries: { type: "string", default: "5" }, path: { type: "string", default: "/health" } },
});
const SOCKETS = Number(values.sockets);

function idle(port: number): Promise<Socket> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1", () => s.write(`GET ${values.path} HTTP/1.1\r\nHost: x\r\n\r\n`));
    s.once("data", () => resolve(s)); // answered: now an idle keep-alive socket
    s.once("close", () => resolve(s)); // refused
    s.on("error", () => {});
  });
}

/** Milliseconds until a fresh client got a 200, or the error after at most 40 s. */
function timed(port: number): Promise<string> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const req = get({ host: "127.0.0.1", port, path: "/health", agent: false, timeout: 40_000 }, (res) => {
      res.resume();
      res.on("end", () => resolve(`${res.statusCode} in ${(performance.now() - t0).toFixed(1)} ms`));
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", (e: NodeJS.ErrnoException) => resolve(`${e.code ?? e.message} after ${(performance.now() - t0).toFixed(1)} ms`));
  });
}

const dir = mkdtempSync(join(tmpdir(), "fleetcache-idle-"));
writeFileSync(join(dir, "f"), "f\n");
execFileSync("nix-store", ["--store", join(dir, "store"), "--add", join(dir, "f")]); // a store to serve
const agent = await startAgentProcess(["--store-root", join(dir, "store"), "--state-dir", join(dir, "state")], { FLEETCACHE_LOG_LEVEL: "info" });
try {
  const { port } = agent;
  const sockets: Socket[] = [];
  for (let i = 0; i < SOCKETS; i++) sockets.push(await idle(port));
  const open = sockets.filter((s) => !s.destroyed).length;
  console.log(`${SOCKETS} idle keep-alive sockets opened, ${open} still open`);
  for (let i = 0; i < Number(values.tries); i++) console.log(`new client ${i + 1}: ${await timed(port)}`);
  console.log(`idle sockets still open: ${sockets.filter((s) => !s.destroyed).length}`);
  for (const s of sockets) s.destroy();
} finally {
  await agent.stop();
  execFileSync("chmod", ["-R", "u+w", dir]);
  rmSync(dir, { recursive: true, force: true });
}
