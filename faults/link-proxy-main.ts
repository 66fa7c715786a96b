// The link proxy as a process, for running it inside a network namespace:
//   node dist/faults/link-proxy-main.js --listen IP:PORT --target IP:PORT [--also PORT=IP:PORT ...] [--latency-ms N] [--rate 4MiB]
// Latency and rate apply to each direction; --also carries another port over the same link. Prints one JSON line when listening; SIGUSR1 cuts
// the link (--cut freeze, the default: silent, nothing closed; --cut refuse: open connections
// reset, new ones refused), SIGUSR2 heals it; SIGHUP prints the byte counts so far (one JSON line); SIGTERM closes it.
import { parseArgs } from "node:util";
import { parseRate, startLinkProxy } from "./link-proxy.js";

const { values } = parseArgs({
  options: {
    listen: { type: "string" },
    target: { type: "string" },
    "latency-ms": { type: "string", default: "0" },
    rate: { type: "string" },
    cut: { type: "string", default: "freeze" },
    also: { type: "string", multiple: true, default: [] },
  },
});

function hostPort(text: string | undefined, what: string): { host: string; port: number } {
  const m = /^(.+):(\d+)$/.exec(text ?? "");
  if (!m) throw new Error(`--${what} IP:PORT is required`);
  return { host: m[1]!.replace(/^\[|\]$/g, ""), port: Number(m[2]) };
}

const listen = hostPort(values.listen, "listen");
const link = { latencyMs: Number(values["latency-ms"]), ...(values.rate ? { rateBytesPerSec: parseRate(values.rate) } : {}) };
const also = values.also.map((text) => {
  const [port, target] = text.split("=");
  if (!/^\d+$/.test(port ?? "") || target === undefined) throw new Error(`--also expects PORT=IP:PORT, got "${text}"`);
  return { port: Number(port), target: hostPort(target, "also") };
});
const proxy = await startLinkProxy({ host: listen.host, port: listen.port, target: hostPort(values.target, "target"), also, up: link, down: link });
console.log(JSON.stringify({ listening: `${proxy.host}:${proxy.port}`, ...link }));
if (values.cut !== "freeze" && values.cut !== "refuse") throw new Error(`--cut expects freeze or refuse, got "${values.cut}"`);
process.on("SIGUSR1", () => (values.cut === "refuse" ? void proxy.refuse() : proxy.freeze()));
process.on("SIGUSR2", () => void proxy.heal());
process.on("SIGHUP", () => console.log(JSON.stringify(proxy.stats())));
// While refusing nothing else holds the event loop open (signal handlers do not): until SIGTERM.
const alive = setInterval(() => {}, 1 << 30);
process.on("SIGTERM", () => {
  clearInterval(alive);
  console.log(JSON.stringify(proxy.stats()));
  void proxy.close().then(() => process.exit(0));
});
