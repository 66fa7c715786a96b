// Garbage collection settings for a process that moves a lot of short-lived Buffers.
//
// Node 24's V8 (13.6) starts a full mark-compact whenever the memory held by ArrayBuffers
// (every Buffer's bytes live outside the JS heap) has grown by a fixed step since the last one,
// whatever the JS heap's own size. A libp2p stream allocates several fresh buffers per 64 KiB
// noise message (socket reads, ciphertext, plaintext), so on Node 24 a mesh transfer ran a full
// GC about every 5 MB moved (measured: 44-52 mark-compacts per 512 MiB) and spent a large part
// of its CPU marking. With external memory counted in V8's global limit instead (the V8 flag
// below, off by default in Node 24), the same transfer ran 21-25 and took about a quarter less
// CPU per GB, for 50-90 MiB more peak memory (BENCHMARKS.md, "Mesh transfer: where the time
// goes"). Short-lived Buffers are still freed by the young-generation collections as before.
import { setFlagsFromString } from "node:v8";

const FLAG = "--external-memory-accounted-in-global-limit";

/** Applies the settings; takes effect for the rest of the process, also when called late. */
export function tuneGcForBuffers(): void {
  if (process.env.FLEETCACHE_V8_DEFAULTS === "1") return; // to measure against V8's defaults
  // Older V8s (Node 20's 11.3) print "unrecognized flag" for it; Node 24 has V8 13.6.
  if (Number(process.versions.v8.split(".")[0]) < 13) return;
  setFlagsFromString(FLAG);
}
