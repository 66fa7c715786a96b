// Range answers built from peer bytes (issue 10, scenario 4): Nix resumes a cut download with
// `Range: bytes=N-`, and the agent answers from a peer's NAR. A NarHash covers the whole NAR, so
// a 206 is sound only if the whole NAR behind it was verified. A holds paths whose store file has
// one wrong byte (its database keeps the old NarHash); B is asked for ranges of them with curl.
// Counted: bytes that reached the client in a 206 whose NAR failed verification ("unverified"),
// and of those, bytes that differ from the true NAR. With an intact holder next to A, the 206
// must be complete and right.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { announcedTo, eventually } from "../../test/helpers/fleet.js";
import { dumpPath } from "../../test/helpers/nix.js";
import { addBlob, corruptOnDisk, holdersAroundB, narinfoVia } from "../fleet-tools.js";
import { ProcessMeter, type Scenario } from "../scenario.js";

interface Case {
  name: string;
  size: number;
  /** Byte of the store file flipped on A. */
  wrongAt: number;
  /** Range start. */
  from: number;
  /** Whether C holds the path intact too. */
  intactHolder: boolean;
}

const CASES: Case[] = [
  { name: "1 MiB, only holder, wrong byte inside the range", size: 1 << 20, wrongAt: 900_000, from: 800_000, intactHolder: false },
  { name: "1 MiB, only holder, wrong byte before the range", size: 1 << 20, wrongAt: 10, from: 800_000, intactHolder: false },
  { name: "24 MiB, only holder, wrong byte 20 MiB in", size: 24 << 20, wrongAt: 20 << 20, from: 1_000_000, intactHolder: false },
  { name: "24 MiB, corrupted + intact holder", size: 24 << 20, wrongAt: 20 << 20, from: 1_000_000, intactHolder: true },
];

async function nar(root: string, path: string): Promise<Buffer> {
  const d = dumpPath(root, path);
  const parts: Buffer[] = [];
  d.on("data", (x: Buffer) => parts.push(x));
  await d.done;
  return Buffer.concat(parts);
}

export const rangeCheck: Scenario = {
  name: "range-check",
  title: "Range requests for NARs whose only (or first) holder serves a wrong byte",
  goal: "no byte of a 206 reaches the client unless the whole NAR checked out; with an intact holder, the 206 is complete and right",
  async run({ log }) {
    const { fleet, a, b, c } = await holdersAroundB();
    try {
      const meterB = ProcessMeter.of(b.agent!);
      const figures: [string, string | number][] = [];
      let unverifiedTotal = 0;
      let ok = true;
      for (const [i, k] of CASES.entries()) {
        log(k.name);
        const path = await addBlob(a, `range-${i}`, k.size);
        const truth = await nar(a.storeRoot, path);
        await announcedTo(b, a);
        const info = await eventually("B answers the path (from A)", () => narinfoVia(b, path), 30_000);
        if (k.intactHolder) {
          await addBlob(c, `range-${i}`, k.size);
          await announcedTo(b, c);
        }
        await corruptOnDisk(a, path, k.wrongAt);
        const out = join(b.dir, `range-${i}.out`);
        // curl prints the status even when the body is cut short (then it exits non-zero: said too).
        const curl = b.net.spawn("curl", ["-sS", "-o", out, "-w", "%{http_code}", "-H", `Range: bytes=${k.from}-`, `${b.agent!.url}/${info.url}`], { stdio: ["ignore", "pipe", "pipe"] });
        let said = "";
        let err = "";
        curl.stdout!.on("data", (d: Buffer) => (said += d.toString()));
        curl.stderr!.on("data", (d: Buffer) => (err += d.toString()));
        const exit = await new Promise<number | null>((r) => curl.once("close", r));
        const code = `${said.trim()}${exit === 0 ? "" : ` (${err.trim()})`}`;
        const body = (() => {
          try {
            return readFileSync(out);
          } catch {
            return Buffer.alloc(0);
          }
        })();
        const want = truth.subarray(k.from);
        let differing = 0;
        for (let j = 0; j < body.length && j < want.length; j++) if (body[j] !== want[j]) differing++;
        const complete = body.length === want.length && createHash("sha256").update(body).digest().equals(createHash("sha256").update(want).digest());
        const is206 = code.startsWith("206");
        if (k.intactHolder) {
          // Bytes of a 206 cut short came from a NAR that failed verification: unverified too.
          const unverified = is206 && !complete ? body.length : 0;
          unverifiedTotal += unverified;
          if (!(is206 && complete)) ok = false;
          figures.push([k.name, `${code}, ${body.length} of ${want.length} bytes, ${complete ? "complete and right" : `cut short: ${unverified} unverified, ${differing} wrong`}`]);
        } else {
          const unverified = is206 ? body.length : 0;
          unverifiedTotal += unverified;
          if (unverified > 0) ok = false;
          figures.push([k.name, `${code}; ${body.length} bytes received${is206 ? `, ${unverified} of them unverified, ${differing} wrong` : ""}`]);
        }
      }
      figures.push(["unverified bytes in 206 answers", unverifiedTotal]);
      figures.push(["agent b", meterB.summary()]);
      return { ok, figures };
    } finally {
      await fleet.destroy();
    }
  },
};
