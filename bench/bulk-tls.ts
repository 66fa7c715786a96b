// What a NAR body costs on the wire, per side, three ways between two Node processes on loopback
// (issue 11's bulk-path question): (a) one libp2p stream as the agent sets it up (TCP + noise +
// yamux, agent/mesh/node.ts), (b) node:tls 1.3 keyed by a one-time external PSK (a random 32-byte
// key and ticket id, as a holder would hand out over the libp2p stream), (c) plain TCP. This
// process is the requester (it reads and counts every byte), a forked child the holder (it
// writes fresh 1 MiB buffers, as the NAR responder's store reads are 1 MiB). Modes alternate
// round by round; each side measures its own CPU (user + system) per GB; medians are printed.
// Both processes use the agent's GC settings (agent/gc-tuning.ts) and its semi-space flag.
//   node --max-semi-space-size=16 dist/bench/bulk-tls.js [MiB, default 1024] [rounds, default 5] [--cipher NAME] [--hash]
// --cipher: the TLS 1.3 suite (default TLS_AES_128_GCM_SHA256; TLS_CHACHA20_POLY1305_SHA256);
// --hash: the requester also sha256es every byte, as B verifies every peer NAR.
// LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 before the command reaches the child too.
import { fork } from "node:child_process";
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { createConnection, createServer, type AddressInfo, type Socket } from "node:net";
import { connect as tlsConnect, createServer as createTlsServer } from "node:tls";
import { parseArgs } from "node:util";
import { pino } from "pino";
import { multiaddr } from "@multiformats/multiaddr";
import { formatPublicKey, formatSecretKey, generateKeyPair, parsePublicKey, parseSecretKey } from "../protocol/keys.js";
import { createMeshNode } from "../agent/mesh/node.js";
import { writeAll } from "../agent/mesh/stream-io.js";
import { tuneGcForBuffers } from "../agent/gc-tuning.js";

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: { cipher: { type: "string", default: "TLS_AES_128_GCM_SHA256" }, hash: { type: "boolean", default: false }, holder: { type: "boolean", default: false } },
});
const mib = Number(positionals[0] ?? 1024);
const rounds = Number(positionals[1] ?? 5);
const total = mib * 1024 * 1024;
const CHUNK = 1024 * 1024;
const PROTOCOL = "/fleetcache-bench/bulk/1";
const log = pino({ level: "silent" });
const cpuSeconds = (c: NodeJS.CpuUsage) => (c.user + c.system) / 1e6;

type Mode = "libp2p" | "tls" | "tcp";
/** Parent -> holder: get ready for a round (TLS: with this ticket), or report the round's CPU. */
type ToHolder = { prepare: Mode; id?: string; key?: string } | { report: true } | { stop: true };
type Ready = { ready: true; addr?: string; port?: number };
type FromHolder = Ready | { cpu: number };

function* chunks(): Generator<Buffer> {
  for (let sent = 0; sent < total; sent += CHUNK) yield Buffer.allocUnsafe(Math.min(CHUNK, total - sent)).fill(7);
}

/** Writes every chunk to a socket, waiting for 'drain' when it is full, then ends it. */
async function writeSocket(sock: Socket): Promise<void> {
  for (const c of chunks()) if (!sock.write(c)) await new Promise((r) => sock.once("drain", r));
  sock.end();
}

/** The holder: serves `total` bytes once per round on whatever the parent prepared. */
async function holder(): Promise<void> {
  tuneGcForBuffers();
  const { key, requesterKey } = JSON.parse(process.env.BULK_BENCH_HOLDER!) as { key: string; requesterKey: string };
  const node = await createMeshNode({ key: parseSecretKey(key), trusted: [parsePublicKey(requesterKey)], listen: "/ip4/127.0.0.1/tcp/0", log });
  await node.handle(PROTOCOL, async ({ stream }) => {
    await writeAll(stream, chunks());
  });
  // One ticket at a time: the identity the requester names must be it, else no key (alert).
  let ticket: { id: string; key: Buffer } | undefined;
  const tlsServer = createTlsServer(
    {
      minVersion: "TLSv1.3",
      ciphers: flags.cipher,
      pskCallback: (_sock, identity) => {
        const t = ticket;
        ticket = undefined; // one connection per ticket
        return t && identity.length === t.id.length && timingSafeEqual(Buffer.from(identity), Buffer.from(t.id)) ? t.key : null;
      },
    },
    (sock) => void writeSocket(sock),
  );
  const tcpServer = createServer((sock) => void writeSocket(sock));
  await new Promise<void>((r) => tlsServer.listen(0, "127.0.0.1", r));
  await new Promise<void>((r) => tcpServer.listen(0, "127.0.0.1", r));
  let cpu0 = process.cpuUsage();
  const send = (m: FromHolder) => process.send!(m);
  process.on("message", async (m: ToHolder) => {
    if ("stop" in m) {
      await node.stop();
      process.exit(0);
    }
    if ("report" in m) return send({ cpu: cpuSeconds(process.cpuUsage(cpu0)) });
    cpu0 = process.cpuUsage();
    if (m.prepare === "libp2p") send({ ready: true, addr: node.addresses()[0]!.toString() });
    else if (m.prepare === "tls") {
      ticket = { id: m.id!, key: Buffer.from(m.key!, "base64") };
      send({ ready: true, port: (tlsServer.address() as AddressInfo).port });
    } else send({ ready: true, port: (tcpServer.address() as AddressInfo).port });
  });
  send({ ready: true });
}

interface Figure {
  mbps: number;
  requester: number; // CPU s/GB
  holder: number;
}

async function requester(): Promise<void> {
  tuneGcForBuffers();
  const ka = generateKeyPair("bench-holder");
  const kb = generateKeyPair("bench-requester");
  const env = { ...process.env, BULK_BENCH_HOLDER: JSON.stringify({ key: formatSecretKey(ka), requesterKey: formatPublicKey(kb) }) };
  const child = fork(process.argv[1]!, [String(mib), "--holder", "--cipher", flags.cipher!], { env, execArgv: process.execArgv });
  const replies: FromHolder[] = [];
  let wake: (() => void) | undefined;
  child.on("message", (m: FromHolder) => {
    replies.push(m);
    wake?.();
  });
  const ask = async (m?: ToHolder): Promise<FromHolder> => {
    if (m) child.send(m);
    while (replies.length === 0) await new Promise<void>((r) => (wake = r));
    return replies.shift()!;
  };
  await ask(); // the holder is up
  const node = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });

  const hasher = () => (flags.hash ? createHash("sha256") : undefined);
  const countSocket = (sock: Socket) =>
    new Promise<number>((resolve, reject) => {
      let n = 0;
      const h = hasher();
      sock.on("data", (b: Buffer) => {
        n += b.length;
        h?.update(b);
      });
      sock.on("end", () => {
        h?.digest();
        resolve(n);
      });
      sock.on("error", reject);
    });
  const receive: Record<Mode, (ready: Ready) => Promise<number>> = {
    async libp2p(r) {
      const { stream, reader } = await node.open(multiaddr(r.addr!), PROTOCOL);
      let n = 0;
      const h = hasher();
      for await (const c of reader.chunks()) {
        n += c.length;
        h?.update(c);
      }
      h?.digest();
      await stream.close();
      return n;
    },
    async tls(r) {
      const sock = tlsConnect({
        port: r.port!,
        host: "127.0.0.1",
        minVersion: "TLSv1.3",
        ciphers: flags.cipher,
        pskCallback: () => ({ psk: ticketKey, identity: ticketId }),
        checkServerIdentity: () => undefined, // no certificate: the PSK authenticates the holder
      });
      return countSocket(sock);
    },
    async tcp(r) {
      return countSocket(createConnection(r.port!, "127.0.0.1"));
    },
  };
  let ticketId = "";
  let ticketKey = Buffer.alloc(0);
  const round = async (mode: Mode): Promise<Figure> => {
    ticketId = randomBytes(16).toString("hex");
    ticketKey = randomBytes(32);
    const ready = (await ask({ prepare: mode, id: ticketId, key: ticketKey.toString("base64") })) as Ready;
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const n = await receive[mode](ready);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const mine = cpuSeconds(process.cpuUsage(cpu0));
    if (n !== total) throw new Error(`${mode}: received ${n} of ${total} bytes`);
    const theirs = ((await ask({ report: true })) as { cpu: number }).cpu;
    const gb = total / 1e9;
    return { mbps: total / 1e6 / secs, requester: mine / gb, holder: theirs / gb };
  };

  const modes: Mode[] = ["libp2p", "tls", "tcp"];
  const figures: Record<Mode, Figure[]> = { libp2p: [], tls: [], tcp: [] };
  const fmt = (f: Figure) =>
    `${f.mbps.toFixed(0).padStart(5)} MB/s, holder ${f.holder.toFixed(2)} + requester ${f.requester.toFixed(2)} = ${(f.holder + f.requester).toFixed(2)} CPU s/GB`;
  console.log(
    `node ${process.version}, ${mib} MiB a round, ${rounds} rounds, TLS suite ${flags.cipher}${flags.hash ? ", requester hashes" : ""}` +
      `${process.env.LD_PRELOAD ? `, LD_PRELOAD=${process.env.LD_PRELOAD}` : ""}`,
  );
  for (let i = 0; i < rounds; i++) {
    for (const mode of i % 2 ? [...modes].reverse() : modes) {
      figures[mode].push(await round(mode));
      console.log(`round ${i + 1} ${mode.padEnd(6)} ${fmt(figures[mode].at(-1)!)}`);
    }
  }
  const median = (xs: number[]) => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  };
  for (const mode of modes) {
    const fs = figures[mode];
    const m = { mbps: median(fs.map((f) => f.mbps)), holder: median(fs.map((f) => f.holder)), requester: median(fs.map((f) => f.requester)) };
    console.log(`median ${mode.padEnd(6)} ${fmt(m)}`);
  }
  child.send({ stop: true } satisfies ToHolder);
  await node.stop();
}

if (flags.holder) await holder();
else await requester();
