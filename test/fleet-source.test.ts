// FleetSource, the router, against a fake fleet: a fake of the fleet table (who is connected,
// who is reconnecting, in "fastest first" order) and holders that are plain objects serving a
// NAR's bytes (or wrong ones, or "busy" past their transfer limit, as the real NAR service does),
// so failover order, queueing, penalties, verification and the wait for a reconnecting holder
// can be checked without a network.
import { EventEmitter } from "node:events";
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { createLogger } from "../agent/log.js";
import { FleetSource, type FleetSourceOptions, type NarRequestFromPeer, type PeerRequests } from "../agent/mesh/fleet-source.js";
import type { FleetView } from "../agent/mesh/fleet-table.js";
import { HolderPenalties, type PenaltyOptions } from "../agent/mesh/holder-penalties.js";
import { NarFetchError } from "../agent/mesh/nar-service.js";
import type { LocalStore } from "../agent/store/local-store.js";
import type { Narinfo } from "../protocol/narinfo.js";
import { encodeNix32 } from "../protocol/nix32.js";
import type { PathInfo } from "../protocol/path-info.js";
import { NOT_NOW } from "../agent/source.js";
import { TrustPolicy } from "../agent/mesh/trust-policy.js";
import { generateKeyPair } from "../protocol/keys.js";

const HASH_PART = "0".repeat(31) + "1";
const log = createLogger({ level: "silent", pretty: false });

type Options = FleetSourceOptions & PenaltyOptions;

/**
 * The fleet table as FleetSource sees it: every peer in `order` (fastest first) announces the
 * path; each is connected, reconnecting (away, within its grace) or forgotten.
 */
class FakeFleet implements FleetView {
  readonly holderPenalties: HolderPenalties;
  readonly connected: Set<string>;
  readonly reconnecting = new Set<string>();
  readonly #events = new EventEmitter();
  constructor(
    readonly order: string[],
    opts: PenaltyOptions = {},
  ) {
    this.connected = new Set(order);
    this.holderPenalties = new HolderPenalties(opts);
  }
  holders(): string[] {
    return this.order.filter((p) => this.connected.has(p));
  }
  reconnectingHolders(): string[] {
    return this.order.filter((p) => this.reconnecting.has(p));
  }
  onChange(fn: () => void): () => void {
    this.#events.on("change", fn);
    return () => this.#events.off("change", fn);
  }
  listeners(): number {
    return this.#events.listenerCount("change");
  }
  /** The peer's connection closed: it is reconnecting. */
  leave(peer: string): void {
    this.connected.delete(peer);
    this.reconnecting.add(peer);
    this.#events.emit("change");
  }
  /** Connected again, its summary back. */
  back(peer: string): void {
    this.reconnecting.delete(peer);
    this.connected.add(peer);
    this.#events.emit("change");
  }
  /** Its grace is over. */
  forget(peer: string): void {
    this.reconnecting.delete(peer);
    this.#events.emit("change");
  }
}

interface FakeHolder {
  /** The bytes it serves (may differ from the real NAR). */
  bytes: Buffer;
  /** Concurrent transfers it allows; more are answered "busy" (the NAR service's limit). */
  limit: number;
  active: number;
  maxActive: number;
  requests: NarRequestFromPeer[];
  /** Chunks it sends, and a pause between them so transfers overlap. */
  chunk: number;
  delayMs: number;
  busyAnswers: number;
}

function holder(bytes: Buffer, opts: Partial<FakeHolder> = {}): FakeHolder {
  return { bytes, limit: 8, active: 0, maxActive: 0, requests: [], chunk: 4096, delayMs: 0, busyAnswers: 0, ...opts };
}

function nar(size: number): { bytes: Buffer; info: PathInfo; narinfo: Narinfo } {
  const bytes = randomBytes(size);
  const narHash = "sha256:" + encodeNix32(createHash("sha256").update(bytes).digest());
  const storePath = `/nix/store/${HASH_PART}-test`;
  const info: PathInfo = { storePath, narHash, narSize: size, references: [], sigs: [] };
  const narinfo = { ...info, url: "nar/x.nar", compression: "none" } as unknown as Narinfo;
  return { bytes, info, narinfo };
}

/** A FleetSource over fake holders (peer IDs are their keys, in "fastest first" order). */
function fleet(
  holders: Record<string, FakeHolder>,
  narinfo: Narinfo,
  opts: Options = {},
  table = new FakeFleet(Object.keys(holders), opts),
  local = { pathInfo: async () => undefined, pathInfoNow: () => undefined } as unknown as LocalStore,
  direct: Pick<PeerRequests, "direct" | "redirectedTo"> = {},
) {
  const requests: PeerRequests = {
    ...direct,
    narinfo: async () => narinfo,
    async nar(peer, req, signal) {
      const h = holders[peer]!;
      h.requests.push(req);
      if (h.active >= h.limit) {
        h.busyAnswers++;
        throw new NarFetchError("busy", `peer: more than ${h.limit} transfers`);
      }
      if (h.bytes.length !== req.narSize) throw new NarFetchError("size-mismatch", `peer announced ${h.bytes.length} bytes`);
      h.active++;
      h.maxActive = Math.max(h.maxActive, h.active);
      return (async function* () {
        try {
          for (let o = req.offset; o < h.bytes.length; o += h.chunk) {
            if (h.delayMs) await sleep(h.delayMs);
            signal.throwIfAborted();
            yield h.bytes.subarray(o, Math.min(o + h.chunk, h.bytes.length));
          }
        } finally {
          h.active--;
        }
      })();
    },
  };
  const source = new FleetSource(local, table, requests, log, opts);
  return source;
}

async function collect(chunks: AsyncIterable<Buffer>): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const c of chunks) out.push(Buffer.from(c));
  return Buffer.concat(out);
}

function corrupt(bytes: Buffer, at: number): Buffer {
  const bad = Buffer.from(bytes);
  bad[at] = bad[at]! ^ 0xff;
  return bad;
}

test("16 parallel downloads from one holder that allows 8 transfers: all 16 complete, never more than 8 at once", async () => {
  const { bytes, info, narinfo } = nar(64 * 1024);
  const a = holder(bytes, { limit: 8, delayMs: 2 });
  const source = fleet({ a }, narinfo);
  const got = await Promise.allSettled(Array.from({ length: 16 }, () => collect(source.narStream(info, 0, info.narSize))));
  const ok = got.filter((r) => r.status === "fulfilled" && r.value.equals(bytes)).length;
  assert.equal(ok, 16, got.map((r) => (r.status === "rejected" ? (r.reason as Error).message : "ok")).join("; "));
  assert.ok(a.maxActive <= 8, `at most 8 transfers at once (saw ${a.maxActive})`);
  assert.ok(source.counters.queuedTransfers > 0, "the requests past the limit waited in the queue");
});

test("past one holder's limit, a request goes to another holder that has room", async () => {
  const { bytes, info, narinfo } = nar(32 * 1024);
  const a = holder(bytes, { limit: 2, delayMs: 5 });
  const b = holder(bytes, { limit: 2, delayMs: 5 });
  const source = fleet({ a, b }, narinfo, { transfersPerHolder: 2 });
  const got = await Promise.all(Array.from({ length: 4 }, () => collect(source.narStream(info, 0, info.narSize))));
  for (const g of got) assert.ok(g.equals(bytes));
  assert.equal(a.requests.length, 2, "the fastest holder took what it could");
  assert.equal(b.requests.length, 2, "the rest went to the other holder rather than wait");
  assert.equal(a.busyAnswers + b.busyAnswers, 0, "no holder was asked past its limit");
});

test("a queued request gives up at its deadline with NarUnavailableError (a 502 Nix retries), not a hang", async () => {
  const { bytes, info, narinfo } = nar(16 * 1024);
  const a = holder(bytes, { limit: 1, delayMs: 50 });
  const source = fleet({ a }, narinfo, { transfersPerHolder: 1, queueDeadlineMs: 20 });
  const first = collect(source.narStream(info, 0, info.narSize));
  await assert.rejects(collect(source.narStream(info, 0, info.narSize)), /waited .* for a transfer slot/);
  assert.ok((await first).equals(bytes));
});

test("a holder answering busy anyway (its slot not yet freed) is asked again, not counted as failed", async () => {
  const { bytes, info, narinfo } = nar(8 * 1024);
  const a = holder(bytes, { limit: 1 });
  let refusals = 2;
  const source = fleet({ a }, narinfo);
  const orig = a.limit;
  a.limit = 0; // refuses until we reopen it
  const reopen = setInterval(() => {
    if (--refusals <= 0) {
      a.limit = orig;
      clearInterval(reopen);
    }
  }, 5);
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes));
  assert.ok(a.busyAnswers >= 1);
  assert.equal(source.counters.transferFailures, 0);
});

test("wrong bytes from the first holder: the answer comes from the next one, and the first is penalised for the path", async () => {
  const { bytes, info, narinfo } = nar(20_000);
  const bad = holder(corrupt(bytes, 12_345));
  const good = holder(bytes);
  const source = fleet({ bad, good }, narinfo);
  const got = await collect(source.narStream(info, 0, info.narSize));
  assert.ok(got.equals(bytes), "the client got the right bytes");
  // The next request does not go to the bad holder at all.
  const before = bad.requests.length;
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes));
  assert.equal(bad.requests.length, before, "the bad holder was not asked again for this path");
  const p = source.penalties.status("bad");
  assert.equal(p.badNars, 1);
  assert.equal(source.penalties.status("good").badNars, 0);
  assert.equal(source.counters.verifyFailures, 1);
});

test("a holder announcing the wrong NarSize is penalised and passed over", async () => {
  const { bytes, info, narinfo } = nar(10_000);
  const bad = holder(Buffer.concat([bytes, Buffer.from("x")]));
  const good = holder(bytes);
  const source = fleet({ bad, good }, narinfo);
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes));
  assert.equal(source.penalties.status("bad").badNars, 1);
});

test("after repeated wrong bytes a holder is penalised as a peer: asked last for other paths too", async () => {
  const { bytes, info, narinfo } = nar(4096);
  const bad = holder(corrupt(bytes, 7));
  const good = holder(bytes);
  const source = fleet({ bad, good }, narinfo, { strikesBeforePeerPenalty: 1 });
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes));
  const status = source.penalties.status("bad");
  assert.ok(status.penalisedUntil && status.penalisedUntil > Date.now(), "penalised as a peer");
  assert.equal(source.penalties.peersPenalised(), 1);
});

test("LAN-direct: a NAR Nix was lately redirected for is relayed from that holder first (its bytes checked), not from the one whose narinfo came first", async () => {
  const { bytes, info, narinfo } = nar(20_000);
  const fast = holder(bytes);
  const bad = holder(corrupt(bytes, 12_345));
  const source = fleet({ fast, bad }, narinfo, {}, undefined, undefined, { redirectedTo: () => "bad" });
  const peerInfo = (await source.pathInfo(HASH_PART))!;
  assert.ok(source.fromPeer(peerInfo), "the narinfo came from a peer (fast, asked first)");
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes), "the right bytes, from fast");
  assert.equal(bad.requests.length, 1, "the holder Nix was sent to was asked first");
  assert.equal(source.penalties.status("bad").badNars, 1, "and caught");
  assert.equal(source.counters.verifyFailures, 1);
});

test("LAN-direct: a holder caught with wrong bytes lately gets no redirects (its NARs are relayed, verified) once its bar for that path is over", async () => {
  const { bytes, info, narinfo } = nar(4096);
  const bad = holder(corrupt(bytes, 7));
  const good = holder(bytes);
  const asked: string[] = [];
  const direct = { direct: async (peer: string) => (asked.push(peer), `http://${peer}/`) };
  const fresh = fleet({ bad: holder(bytes), good }, narinfo, {}, undefined, undefined, direct);
  assert.equal(await fresh.directUrl((await fresh.pathInfo(HASH_PART))!), "http://bad/", "an uncaught holder: redirected");
  const source = fleet({ bad, good }, narinfo, { pathPenaltyMs: 1 }, undefined, undefined, direct);
  const peerInfo = (await source.pathInfo(HASH_PART))!;
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes));
  assert.equal(source.penalties.status("bad").badNars, 1);
  await sleep(5);
  assert.equal(source.penalties.barred("bad", HASH_PART), false, "its bar for the path is over");
  assert.ok(source.penalties.caughtLately("bad"));
  assert.equal(await source.directUrl(peerInfo), undefined, "relayed");
  assert.deepEqual(asked, ["bad"], "no ticket asked of the caught holder");
});

test("the only holder serves wrong bytes: NarUnavailableError before any byte, and no complete wrong NAR ever", async () => {
  const { bytes, info, narinfo } = nar(30_000);
  const bad = holder(corrupt(bytes, 29_999));
  const source = fleet({ bad }, narinfo);
  const out: Buffer[] = [];
  await assert.rejects(
    (async () => {
      for await (const c of source.narStream(info, 0, info.narSize)) out.push(c);
    })(),
    /NarHash|no peer could send/,
  );
  assert.equal(Buffer.concat(out).length, 0, "nothing of a wrong NAR reached the client");
});

test("Range from peer data: the bytes are verified against the whole NAR's hash before any is sent", async () => {
  const { bytes, info, narinfo } = nar(50_000);
  // The wrong byte lies inside the range asked for.
  const bad = holder(corrupt(bytes, 40_000));
  const source = fleet({ bad }, narinfo);
  const out: Buffer[] = [];
  await assert.rejects(
    (async () => {
      for await (const c of source.narStream(info, 30_000, 50_000)) out.push(c);
    })(),
  );
  assert.equal(Buffer.concat(out).length, 0, "no unverified byte of a 206");
  // With an intact holder the range is right.
  const good = holder(bytes);
  const source2 = fleet({ bad: holder(corrupt(bytes, 40_000)), good }, narinfo);
  assert.ok((await collect(source2.narStream(info, 30_000, 50_000))).equals(bytes.subarray(30_000, 50_000)));
  assert.ok((await collect(source2.narStream(info, 100, 200))).equals(bytes.subarray(100, 200)));
});

test("a wrong byte before the range start is caught too (the whole NAR is hashed)", async () => {
  const { bytes, info, narinfo } = nar(50_000);
  const bad = holder(corrupt(bytes, 5));
  const good = holder(bytes);
  const source = fleet({ bad, good }, narinfo);
  assert.ok((await collect(source.narStream(info, 30_000, 50_000))).equals(bytes.subarray(30_000, 50_000)));
  assert.equal(source.penalties.status("bad").badNars, 1);
});

test("a holder failing mid-way is replaced at the byte reached, and the stitched NAR is verified", async () => {
  const { bytes, info, narinfo } = nar(40_000);
  const flaky = holder(bytes);
  const good = holder(bytes);
  const source = fleet({ flaky, good }, narinfo);
  // flaky stops after 3 chunks.
  const inner = (source as unknown as { requests: PeerRequests }).requests;
  const orig = inner.nar.bind(inner);
  inner.nar = async (peer, req, signal) => {
    const it = await orig(peer, req, signal);
    if (peer !== "flaky") return it;
    return (async function* () {
      let n = 0;
      for await (const c of it) {
        if (n++ === 3) throw new NarFetchError("interrupted", "cut");
        yield c;
      }
    })();
  };
  assert.ok((await collect(source.narStream(info, 0, info.narSize))).equals(bytes));
  assert.equal(good.requests[0]?.offset, 3 * 4096, "the next holder continued at the byte reached");
  assert.equal(source.counters.failovers, 1);
  assert.equal(source.penalties.status("flaky").badNars, 0, "an interrupted transfer is not a wrong NAR");
});

test("a NAR larger than what is held in memory is spooled until verified: a wrong one sends nothing, and the next holder's bytes follow", async () => {
  const { bytes, info, narinfo } = nar(64 * 1024);
  // The only holder is wrong: nothing at all reaches the client (before: all but the last chunk did).
  const source = fleet({ bad: holder(corrupt(bytes, 60_000)) }, narinfo, { holdBytes: 8192 });
  const out: Buffer[] = [];
  await assert.rejects(
    (async () => {
      for await (const c of source.narStream(info, 0, info.narSize)) out.push(c);
    })(),
    /no peer could send/,
  );
  assert.equal(Buffer.concat(out).length, 0, "no byte of a wrong NAR reached the client");
  // A wrong holder first, an intact one next: the client gets the right NAR on this request (Nix's
  // first try), whole and a Range of it.
  const both = fleet({ bad: holder(corrupt(bytes, 60_000)), good: holder(bytes) }, narinfo, { holdBytes: 8192 });
  assert.ok((await collect(both.narStream(info, 0, info.narSize))).equals(bytes));
  assert.equal(both.penalties.status("bad").badNars, 1);
  const ranged = fleet({ bad: holder(corrupt(bytes, 60_000)), good: holder(bytes) }, narinfo, { holdBytes: 8192 });
  assert.ok((await collect(ranged.narStream(info, 1000, info.narSize))).equals(bytes.subarray(1000)));
});

test("a NAR larger than the spool limit streams with its last chunk held back: a wrong one never arrives complete", async () => {
  const { bytes, info, narinfo } = nar(64 * 1024);
  const source = fleet({ bad: holder(corrupt(bytes, 60_000)) }, narinfo, { holdBytes: 8192, spoolBytes: 32 * 1024 });
  const out: Buffer[] = [];
  await assert.rejects(
    (async () => {
      for await (const c of source.narStream(info, 0, info.narSize)) out.push(c);
    })(),
    /does not match its NarHash/,
  );
  const got = Buffer.concat(out).length;
  assert.ok(got > 0 && got < info.narSize, `cut short (${got} of ${info.narSize} bytes)`);
  const good = fleet({ good: holder(bytes) }, narinfo, { holdBytes: 8192, spoolBytes: 32 * 1024 });
  assert.ok((await collect(good.narStream(info, 0, info.narSize))).equals(bytes));
});

test("transfer slots: waiters are served in arrival order", async () => {
  const { TransferSlots } = await import("../agent/mesh/transfer-slots.js");
  const slots = new TransferSlots(1);
  assert.ok(slots.tryAcquire("p"));
  const order: number[] = [];
  const waits = [1, 2, 3].map((i) => slots.acquire("p", 10_000).then(() => order.push(i)));
  assert.equal(slots.tryAcquire("p"), false, "no jumping the queue");
  for (let i = 0; i < 3; i++) {
    slots.release("p");
    await new Promise((r) => setImmediate(r));
  }
  await Promise.all(waits);
  assert.deepEqual(order, [1, 2, 3]);
  slots.release("p");
  assert.equal(slots.inUse("p"), 0);
});

// --- narinfo lookups: hedging, deadline, in-flight sharing, reuse ---------------------------------

type Answer = "yes" | "no" | "never" | "error";

/** A FleetSource whose holders answer narinfo questions as told; records who was asked. */
function lookupFleet(answers: Record<string, Answer>, opts: Options = {}) {
  const { narinfo } = nar(100);
  const asked: string[] = [];
  const table = new FakeFleet(Object.keys(answers), opts);
  const requests: PeerRequests = {
    narinfo: (peer, _hashPart, signal) => {
      asked.push(peer);
      const a = answers[peer]!;
      if (a === "yes") return Promise.resolve(narinfo);
      if (a === "no") return Promise.resolve(undefined);
      if (a === "error") return Promise.reject(new Error("reset"));
      return new Promise((_, reject) => signal.addEventListener("abort", () => reject(new Error("aborted")))); // never answers
    },
    nar: () => Promise.reject(new Error("not used")),
  };
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const source = new FleetSource(local, table, requests, log, opts);
  return { source, asked, table };
}

test("narinfo: a silent first holder is hedged: the next is asked too, and its answer wins", async () => {
  const { source, asked } = lookupFleet({ slow: "never", fast: "yes" }, { hedgeAfterMs: 1, narinfoDeadlineMs: 60_000 });
  assert.ok(await source.pathInfo(HASH_PART));
  assert.deepEqual(asked, ["slow", "fast"]);
  assert.ok(source.fromPeer((await source.pathInfo(HASH_PART))!));
});

test("narinfo: a lookup whose questions were all answered aborts nothing; one still in flight is cancelled", async () => {
  // Aborting is not free (an AbortError DOMException with its stack, and the abort event run on
  // every dependent signal: about 20 µs of a peer lookup's 1.1 ms): only when a question is pending.
  const { narinfo } = nar(100);
  const signals: AbortSignal[] = [];
  const requests: PeerRequests = {
    narinfo: (peer, _hashPart, signal) => {
      signals.push(signal);
      if (peer === "silent") return new Promise((_, reject) => signal.addEventListener("abort", () => reject(new Error("aborted"))));
      return Promise.resolve(narinfo);
    },
    nar: () => Promise.reject(new Error("not used")),
  };
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const answered = new FleetSource(local, new FakeFleet(["a"]), requests, log, { hedgeAfterMs: 60_000 });
  assert.ok(await answered.pathInfo(HASH_PART));
  assert.equal(signals.length, 1);
  assert.equal(signals[0]!.aborted, false, "nothing was in flight: nothing to cancel");
  signals.length = 0;
  const hedged = new FleetSource(local, new FakeFleet(["silent", "a"]), requests, log, { hedgeAfterMs: 1, narinfoDeadlineMs: 60_000 });
  assert.ok(await hedged.pathInfo(HASH_PART));
  assert.equal(signals.length, 2);
  assert.equal(signals[0]!.aborted, true, "the silent holder's question is cancelled once another answered");
});

test("narinfo: a 'no' or an error moves on to the next holder at once, in order", async () => {
  const { source, asked } = lookupFleet({ a: "no", b: "error", c: "yes" }, { hedgeAfterMs: 60_000 });
  assert.ok(await source.pathInfo(HASH_PART));
  assert.deepEqual(asked, ["a", "b", "c"]);
});

test("narinfo: when no holder answers, the deadline ends the lookup as a miss", async () => {
  const { source, asked } = lookupFleet({ a: "never", b: "never" }, { hedgeAfterMs: 1, narinfoDeadlineMs: 30 });
  assert.equal(await source.pathInfo(HASH_PART), undefined);
  assert.deepEqual(asked, ["a", "b"]);
  assert.equal(source.counters.misses, 1);
});

test("narinfo: over a link with a long measured RTT the deadline stretches (3x the best holder's RTT), up to its cap", async () => {
  // A holder whose answer takes 120 ms (a lookup queued behind NAR bytes on a busy WAN link),
  // against a 30 ms deadline: a miss unless the holder's measured RTT (60 ms) stretches it.
  const { narinfo } = nar(100);
  const slowAnswer = (after: number): PeerRequests => ({
    narinfo: (_peer, _hashPart, signal) =>
      new Promise((resolve, reject) => {
        const t = setTimeout(() => resolve(narinfo), after);
        signal.addEventListener("abort", () => (clearTimeout(t), reject(new Error("aborted"))));
      }),
    nar: () => Promise.reject(new Error("not used")),
  });
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const make = (opts: Options) => new FleetSource(local, new FakeFleet(["a"]), slowAnswer(120), log, { hedgeAfterMs: 1, narinfoDeadlineMs: 30, ...opts });
  assert.equal(await make({}).pathInfo(HASH_PART), undefined, "no RTT known: the configured deadline");
  assert.equal(await make({ rttMs: () => 5 }).pathInfo(HASH_PART), undefined, "a short RTT: the configured deadline");
  assert.ok(await make({ rttMs: () => 60 }).pathInfo(HASH_PART), "RTT 60 ms: waits up to 180 ms, the answer comes at 120");
  assert.equal(await make({ rttMs: () => 60, maxNarinfoDeadlineMs: 50 }).pathInfo(HASH_PART), undefined, "capped");
  assert.equal(await make({ rttMs: (p) => (p === "a" ? undefined : 1000) }).pathInfo(HASH_PART), undefined, "only the holders' RTTs count");
});

test("narinfo: while a NAR from a peer is in flight, a lookup waits up to the cap whatever the last ping said", async () => {
  // The fault suite's wan-latency: B pulls a 64 MiB NAR at the link's full rate, the link's queue
  // fills within a second, and a lookup asked before the next ping (RTT still ~125 ms) queued
  // behind those bytes past the 2 s deadline: a 404 for a held path, which Nix keeps for an hour.
  // Here the holder's answer takes 120 ms against a 30 ms deadline and a measured RTT of 5 ms.
  const { bytes, info, narinfo } = nar(64 * 1024);
  const other = `/nix/store/${"2".repeat(32)}-other`;
  let release = () => {};
  const gate = new Promise<void>((r) => (release = r));
  const requests: PeerRequests = {
    narinfo: (_peer, _hashPart, signal) =>
      new Promise((resolve, reject) => {
        const t = setTimeout(() => resolve(narinfo), 120);
        signal.addEventListener("abort", () => (clearTimeout(t), reject(new Error("aborted"))));
      }),
    // A NAR that sends its first half, then waits for the gate (the transfer stays in flight).
    async nar() {
      return (async function* () {
        yield bytes.subarray(0, bytes.length / 2);
        await gate;
        yield bytes.subarray(bytes.length / 2);
      })();
    },
  };
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const source = new FleetSource(local, new FakeFleet(["a"]), requests, log, { hedgeAfterMs: 1, narinfoDeadlineMs: 30, rttMs: () => 5, maxNarinfoDeadlineMs: 500, cacheTtlMs: 0 });
  assert.equal(await source.pathInfo(HASH_PART), undefined, "no transfer in flight: the configured deadline");
  const transfer = collect(source.narStream({ ...info, storePath: other }, 0, bytes.length));
  await sleep(20); // the NAR's first half is in
  assert.ok(await source.pathInfo(HASH_PART), "a NAR in flight: the lookup waits up to the cap, and the answer at 120 ms is taken");
  release();
  assert.ok((await transfer).equals(bytes));
  assert.equal(await source.pathInfo(HASH_PART), undefined, "the transfer over: the configured deadline again");
});

test("narinfo: with upstream keys, a fleet-only answer in hand is decided at the configured deadline, not held to a stretched one by a silent holder", { timeout: 20_000 }, async () => {
  // A fleet-only answer waits for the other holders' (trust-policy.ts). The lookup's deadline
  // stretches over a slow or busy link so that a held path is not answered 404 for want of any
  // answer; once one is in hand, a stopped holder must not hold the decision to that stretch
  // (here 60 s: the test's 20 s timeout fails first).
  const { narinfo } = nar(100);
  const requests: PeerRequests = {
    narinfo: (peer, _hashPart, signal) =>
      peer === "a" ? Promise.resolve(narinfo) : new Promise((_, reject) => signal.addEventListener("abort", () => reject(new Error("aborted")))),
    nar: () => Promise.reject(new Error("not used")),
  };
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const source = new FleetSource(local, new FakeFleet(["a", "b"]), requests, log, {
    trust: new TrustPolicy([generateKeyPair("upstream-1")]),
    hedgeAfterMs: 1,
    narinfoDeadlineMs: 30,
    rttMs: () => 20_000,
    maxNarinfoDeadlineMs: 60_000,
  });
  const info = await source.pathInfo(HASH_PART);
  assert.equal(info?.narHash, narinfo.narHash, "a's answer, decided without b's");
});

test("narinfo: concurrent lookups share one round of questions, and an answer is reused within its TTL", async () => {
  const { source, asked } = lookupFleet({ a: "yes" }, { cacheTtlMs: 60_000 });
  const [x, y] = await Promise.all([source.pathInfo(HASH_PART), source.pathInfo(HASH_PART)]);
  assert.equal(x, y);
  await source.pathInfo(HASH_PART);
  assert.deepEqual(asked, ["a"], "one question for three lookups");
  const expired = lookupFleet({ a: "yes" }, { cacheTtlMs: 0 });
  await expired.source.pathInfo(HASH_PART);
  await sleep(2);
  await expired.source.pathInfo(HASH_PART);
  assert.deepEqual(expired.asked, ["a", "a"], "asked again once the TTL passed");
});

test("narinfo: a holder barred for the path (wrong bytes) is not asked; with none left it is a miss", async () => {
  const { source, asked } = lookupFleet({ bad: "yes", good: "yes" });
  source.penalties.wrongBytes("bad", HASH_PART);
  assert.ok(await source.pathInfo(HASH_PART));
  assert.deepEqual(asked, ["good"]);
  const only = lookupFleet({ bad: "yes" });
  only.source.penalties.wrongBytes("bad", HASH_PART);
  assert.equal(await only.source.pathInfo(HASH_PART), undefined);
  assert.deepEqual(only.asked, []);
});

test("every holder answers not-found (collected since announcing it): NarGoneError, a 404 Nix does not retry", async () => {
  const { bytes, info, narinfo } = nar(1000);
  const source = fleet({ a: holder(bytes), b: holder(bytes) }, narinfo);
  const inner = (source as unknown as { requests: PeerRequests }).requests;
  inner.nar = async () => {
    throw new NarFetchError("not-found", "peer: no such path with that NAR hash");
  };
  const { NarGoneError, NarUnavailableError } = await import("../agent/source.js");
  await assert.rejects(collect(source.narStream(info, 0, info.narSize)), NarGoneError);
  inner.nar = async (peer) => {
    throw new NarFetchError(peer === "a" ? "not-found" : "interrupted", "x");
  };
  await assert.rejects(collect(source.narStream(info, 0, info.narSize)), NarUnavailableError);
});

// --- a holder reconnecting (its agent restarting): lookups wait for it, briefly ------------------

/** Whether `p` has settled by the next turns of the event loop. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(() => (done = true), () => (done = true));
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  return done;
}

test("reconnect: a lookup for a path whose only holder is reconnecting waits for it, then asks it", async () => {
  const { source, asked, table } = lookupFleet({ a: "yes" }, { reconnectWaitMs: 60_000 });
  table.leave("a");
  const lookup = source.pathInfo(HASH_PART);
  assert.equal(await settled(lookup), false, "held, not a miss at once");
  assert.deepEqual(asked, [], "nobody asked while it is away");
  table.back("a");
  assert.ok(await lookup, "answered once the holder is back");
  assert.deepEqual(asked, ["a"]);
  assert.equal(source.counters.misses, 0);
  assert.equal(table.listeners(), 0, "the wait left no listener behind");
});

test("reconnect: a holder that stays away makes the lookup a miss at the wait's end; one forgotten ends it at once", async () => {
  const short = lookupFleet({ a: "yes" }, { reconnectWaitMs: 20 });
  short.table.leave("a");
  assert.equal(await short.source.pathInfo(HASH_PART), undefined);
  assert.deepEqual(short.asked, []);
  assert.equal(short.source.counters.misses, 1);

  const long = lookupFleet({ a: "yes" }, { reconnectWaitMs: 600_000 });
  long.table.leave("a");
  const lookup = long.source.pathInfo(HASH_PART);
  assert.equal(await settled(lookup), false);
  long.table.forget("a"); // its grace ended: no stale answer, no more waiting
  assert.equal(await lookup, undefined);
  assert.equal(long.table.listeners(), 0);
  // With nobody reconnecting a miss is answered at once (the test would time out otherwise).
  assert.equal(await long.source.pathInfo(HASH_PART), undefined);
});

test("reconnect: a connected holder is asked at once, even while another holder is reconnecting", async () => {
  const { source, asked, table } = lookupFleet({ away: "yes", here: "yes" }, { reconnectWaitMs: 600_000 });
  table.leave("away");
  assert.ok(await source.pathInfo(HASH_PART));
  assert.deepEqual(asked, ["here"]);
});

test("reconnect: a reconnecting holder barred for the path (wrong bytes) is not waited for", async () => {
  const { source, table } = lookupFleet({ bad: "yes" }, { reconnectWaitMs: 600_000 });
  source.penalties.wrongBytes("bad", HASH_PART);
  table.leave("bad");
  assert.equal(await source.pathInfo(HASH_PART), undefined);
});

test("reconnect: the holder goes away while being asked: the lookup waits for it and asks again", async () => {
  const { narinfo } = nar(100);
  const table = new FakeFleet(["a"]);
  const asked: string[] = [];
  const requests: PeerRequests = {
    narinfo: async (peer) => {
      asked.push(peer);
      if (asked.length > 1) return narinfo;
      table.leave(peer); // its agent stops as our question reaches it: the stream is reset
      throw new Error("stream reset");
    },
    nar: () => Promise.reject(new Error("not used")),
  };
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const source = new FleetSource(local, table, requests, log, { reconnectWaitMs: 600_000 });
  const lookup = source.pathInfo(HASH_PART);
  assert.equal(await settled(lookup), false);
  table.back("a");
  assert.ok(await lookup);
  assert.deepEqual(asked, ["a", "a"]);
});

test("reconnect: a NAR whose only holder is reconnecting waits for it and arrives whole", async () => {
  const { bytes, info, narinfo } = nar(10_000);
  const a = holder(bytes);
  const table = new FakeFleet(["a"]);
  const source = fleet({ a }, narinfo, { reconnectWaitMs: 600_000 }, table);
  table.leave("a");
  const got = collect(source.narStream(info, 0, info.narSize));
  assert.equal(await settled(got), false, "held, not a 404 at once");
  assert.equal(a.requests.length, 0);
  table.back("a");
  assert.ok((await got).equals(bytes));
});

test("reconnect: a NAR whose only holder stays away is a NarGoneError (404) at the wait's end", async () => {
  const { bytes, info, narinfo } = nar(1000);
  const table = new FakeFleet(["a"]);
  const source = fleet({ a: holder(bytes) }, narinfo, { reconnectWaitMs: 20 }, table);
  table.leave("a");
  const { NarGoneError } = await import("../agent/source.js");
  await assert.rejects(collect(source.narStream(info, 0, info.narSize)), NarGoneError);
});

test("narinfo: holders are asked in the table's order (fastest first), a peer penalised for wrong bytes last", async () => {
  const { source, asked } = lookupFleet({ fast: "no", shady: "no", slow: "yes" }, { hedgeAfterMs: 60_000, strikesBeforePeerPenalty: 1 });
  source.penalties.wrongBytes("shady", "1".repeat(32)); // another path: a strike against the peer as a whole
  assert.ok(await source.pathInfo(HASH_PART));
  assert.deepEqual(asked, ["fast", "slow"], "the answer came before the penalised peer was asked");
});

test("pathInfoNow: a local hit, a path no peer holds and a peer's cached answer come at once; what needs a peer or the daemon is NOT_NOW", async () => {
  const { bytes, info, narinfo } = nar(1000);
  const table = new FakeFleet(["a"]);
  const source = fleet({ a: holder(bytes) }, narinfo, { reconnectWaitMs: 5000 }, table);
  assert.equal(source.pathInfoNow(HASH_PART), NOT_NOW, "a connected peer holds it: it must be asked");
  const asked = await source.pathInfo(HASH_PART);
  assert.equal(asked?.narHash, info.narHash);
  assert.equal(source.pathInfoNow(HASH_PART), asked, "the peer's answer, cached");
  table.leave("a");
  assert.equal(source.pathInfoNow(HASH_PART), NOT_NOW, "its only holder is reconnecting: the lookup waits for it");
  table.forget("a");
  assert.equal(source.pathInfoNow(HASH_PART), undefined, "nobody holds it: a miss at once");
  assert.deepEqual([source.counters.localHits, source.counters.peerHits, source.counters.misses], [0, 2, 1], "counted as lookups (NOT_NOW is not)");

  const mine: PathInfo = { ...info, sigs: ["local:x"] };
  const withLocal = fleet({ a: holder(bytes) }, narinfo, {}, new FakeFleet(["a"]), { pathInfo: async () => mine, pathInfoNow: () => mine } as unknown as LocalStore);
  assert.equal(withLocal.pathInfoNow(HASH_PART), mine, "this host's own copy comes first, without asking anyone");
  assert.equal(withLocal.counters.localHits, 1);
  const daemonBusy = fleet({}, narinfo, {}, new FakeFleet([]), { pathInfo: async () => undefined, pathInfoNow: () => NOT_NOW } as unknown as LocalStore);
  assert.equal(daemonBusy.pathInfoNow(HASH_PART), NOT_NOW, "the local store cannot say without the daemon");
});
