// NAR (Nix ARchive) tokens. Pure: no I/O, so the dumper, a future parser and offset arithmetic
// all share one definition of the layout.
//
// Every token is a string: u64 little-endian length, the bytes, zero padding to a multiple of 8.
//   "nix-archive-1" node
//   node      = "(" "type" kind ... ")"
//   regular   = "type" "regular" ["executable" ""] "contents" <u64 size> <bytes> <pad>
//   symlink   = "type" "symlink" "target" <target>
//   directory = "type" "directory" { "entry" "(" "name" <name> "node" node ")" }

/** Zero bytes needed after `len` bytes to reach a multiple of 8. */
export function padding(len: number): number {
  return (8 - (len % 8)) % 8;
}

/** u64 little-endian; exact for every size a JS number can hold (< 2^53). */
export function u64le(n: number): Buffer {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`not a u64: ${n}`);
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

/** Length of a string token carrying `len` bytes. */
export function tokenLength(len: number): number {
  return 8 + len + padding(len);
}

/** One string token: length, bytes, zero padding. */
export function stringToken(s: Buffer | string): Buffer {
  const bytes = typeof s === "string" ? Buffer.from(s, "utf8") : s;
  const out = Buffer.alloc(tokenLength(bytes.length)); // zero-filled, so the padding is already there
  out.writeBigUInt64LE(BigInt(bytes.length));
  bytes.copy(out, 8);
  return out;
}

function tokens(...parts: string[]): Buffer {
  return Buffer.concat(parts.map((p) => stringToken(p)));
}

export const NAR_MAGIC = tokens("nix-archive-1");
export const NODE_OPEN = tokens("(");
export const NODE_CLOSE = tokens(")");
/** "(" "type" "regular": a regular node's start (the "(" is included). */
export const REGULAR_OPEN = tokens("(", "type", "regular");
export const EXECUTABLE_MARKER = tokens("executable", "");
/** Followed by the u64 size and the contents. */
export const CONTENTS_TAG = tokens("contents");
/** "(" "type" "symlink" "target": followed by the target token and ")". */
export const SYMLINK_OPEN = tokens("(", "type", "symlink", "target");
export const DIRECTORY_OPEN = tokens("(", "type", "directory");
/** "entry" "(" "name": followed by the name token and ENTRY_NODE. */
export const ENTRY_OPEN = tokens("entry", "(", "name");
export const ENTRY_NODE = tokens("node");
export const ENTRY_CLOSE = tokens(")");

const ZEROS = Buffer.alloc(8);

/** Everything of a regular node before its contents: "(" ... "contents" <u64 size>. */
export function regularHead(executable: boolean, size: number): Buffer {
  return executable
    ? Buffer.concat([REGULAR_OPEN, EXECUTABLE_MARKER, CONTENTS_TAG, u64le(size)])
    : Buffer.concat([REGULAR_OPEN, CONTENTS_TAG, u64le(size)]);
}

/** Everything of a regular node after its contents: padding and ")". */
export function regularTail(size: number): Buffer {
  const pad = padding(size);
  return pad === 0 ? NODE_CLOSE : Buffer.concat([ZEROS.subarray(0, pad), NODE_CLOSE]);
}

/** A whole symlink node. */
export function symlinkNode(target: Buffer): Buffer {
  return Buffer.concat([SYMLINK_OPEN, stringToken(target), NODE_CLOSE]);
}

/** A directory entry up to where its node starts: "entry" "(" "name" <name> "node". */
export function entryHead(name: Buffer): Buffer {
  return Buffer.concat([ENTRY_OPEN, stringToken(name), ENTRY_NODE]);
}

/**
 * Order of directory entries: raw byte order, as C's strcmp/memcmp on the names (not locale,
 * not UTF-16 code units, so non-UTF-8 names sort like Nix sorts them).
 */
export function compareNames(a: Buffer, b: Buffer): number {
  return Buffer.compare(a, b);
}

const DOT = 0x2e;
const SLASH = 0x2f;

/** Why `name` may not be a NAR entry name, or undefined if it may. */
export function entryNameProblem(name: Buffer): string | undefined {
  if (name.length === 0) return "empty entry name";
  if (name.length === 1 && name[0] === DOT) return 'entry name "."';
  if (name.length === 2 && name[0] === DOT && name[1] === DOT) return 'entry name ".."';
  if (name.includes(SLASH)) return "entry name contains '/'";
  if (name.includes(0)) return "entry name contains NUL";
  return undefined;
}

/** Throws unless `name` is a valid NAR entry name (no "", ".", "..", "/" or NUL). */
export function validateEntryName(name: Buffer): void {
  const problem = entryNameProblem(name);
  if (problem !== undefined) throw new Error(`invalid NAR ${problem}: ${JSON.stringify(name.toString("latin1"))}`);
}
