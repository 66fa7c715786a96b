// What a peer NAR's request stream costs the two agents before any body byte: a mesh stream
// opened (yamux, multistream-select), one request frame, one answer frame, closed, between two
// mesh nodes in this process over loopback, one stream at a time after a warm-up. CPU (user +
// system, both nodes) and wall time per stream.
//
//   npx tsc -p . && node dist/bench/mesh-request.js [--streams 800] [--body KIB] [--root DIR]
//
// --body: the answer is followed by a body of that many KiB, written in 64 KiB pieces as a small
// NAR's is, and the requester reads it to its end (a small peer NAR's whole exchange).
//
// --root: the checkout whose dist/ is measured (default this one), so an older build in a scratch
// copy can be run by the same script; alternate the two for a comparison.
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { pino } from "pino";

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}
const STREAMS = Number(arg("streams", "800"));
const BODY = Number(arg("body", "0")) * 1024;
const root = resolve(arg("root", join(import.meta.dirname, "..", "..")));
const load = (path: string) => import(pathToFileURL(join(root, "dist", path)).href);

const { createMeshNode } = (await load("agent/mesh/node.js")) as typeof import("../agent/mesh/node.js");
const { generateKeyPair } = (await load("protocol/keys.js")) as typeof import("../protocol/keys.js");
const { writeFrame, writeAll } = (await load("agent/mesh/stream-io.js")) as typeof import("../agent/mesh/stream-io.js");
const { tuneGcForBuffers } = (await load("agent/gc-tuning.js")) as typeof import("../agent/gc-tuning.js");

tuneGcForBuffers();
const log = pino({ level: "silent" });
const ka = generateKeyPair("host-a-1");
const kb = generateKeyPair("host-b-1");
const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
const PROTOCOL = "/fleetcache-bench/request/1";
// A NAR request is about 80 bytes, a bulk answer's header about 70.
await b.handle(PROTOCOL, async ({ reader, stream }) => {
  await reader.readFrame(1024);
  await writeFrame(stream, new Uint8Array(70));
  if (BODY > 0) await writeAll(stream, pieces());
});
const PIECE = new Uint8Array(64 * 1024).fill(7);
function* pieces(): Generator<Uint8Array> {
  for (let left = BODY; left > 0; left -= PIECE.length) yield left >= PIECE.length ? PIECE : PIECE.subarray(0, left);
}
const one = async (to: Parameters<typeof a.open>[0]) => {
  const { stream, reader } = await a.open(to, PROTOCOL);
  await writeFrame(stream, new Uint8Array(80));
  await reader.readFrame(1024);
  let got = 0;
  if (BODY > 0) for await (const c of reader.chunks(BODY)) got += c.length;
  if (got !== BODY) throw new Error(`body: ${got} of ${BODY} bytes`);
  await stream.close();
};
await one(b.addresses()[0]!);
for (let i = 0; i < 300; i++) await one(b.peerId); // the JIT, the connection
const cpu0 = process.cpuUsage();
const t0 = performance.now();
for (let i = 0; i < STREAMS; i++) await one(b.peerId);
const cpu = process.cpuUsage(cpu0);
console.log(JSON.stringify({ root, streams: STREAMS, bodyKiB: BODY / 1024, cpuUsPerStream: Math.round((cpu.user + cpu.system) / STREAMS), wallUsPerStream: Math.round(((performance.now() - t0) * 1000) / STREAMS) }));
await a.stop();
await b.stop();
