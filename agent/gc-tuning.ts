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
//
// The heap may grow to only 1.3 times what the last full collection left alive before the next
// one (V8 otherwise lets it grow up to 4 times). A busy agent's live heap is some 30-40 MiB, but
// under a steady stream of NAR transfers and reconnections the Buffers and objects that outlive
// two scavenges piled up to 80-120 MiB of old space and external memory between full collections,
// and RSS kept that high-water mark (V8 keeps its pages, glibc's heap cannot give back what lies
// below its top): the 10-minute soak's agent climbed to a plateau near 250 MiB over 5 minutes.
// With the tighter limit it stayed at 160-170 MiB from the first minute (FAULTS.md, soak).
// Both flags are read at each collection, so setting them at run time works (checked: the same
// collections and peak as on node's command line).
import { setFlagsFromString } from "node:v8";

const EXTERNAL_IN_GLOBAL_LIMIT = "--external-memory-accounted-in-global-limit";
/** Growth allowed over the live heap before the next full collection, in percent. */
export const HEAP_GROWING_PERCENT = 30;

/** Applies the settings; takes effect for the rest of the process, also when called late. */
export function tuneGcForBuffers(): void {
  if (process.env.FLEETCACHE_V8_DEFAULTS === "1") return; // to measure against V8's defaults
  setFlagsFromString(`--heap-growing-percent=${HEAP_GROWING_PERCENT}`);
  // Older V8s (Node 20's 11.3) print "unrecognized flag" for it; Node 24 has V8 13.6.
  if (Number(process.versions.v8.split(".")[0]) < 13) return;
  setFlagsFromString(EXTERNAL_IN_GLOBAL_LIMIT);
}
