// Nix's NAR listing (the `<hash>.ls` file a binary cache may serve): which files a NAR holds and
// where each regular file's contents start, so a client can fetch one file with a Range request.
//
// Shape, as Nix 2.8 writes it (checked with `nix copy --to file://...?write-nar-listing=true`):
//   {"version":1,"root":NODE}
//   NODE = {"type":"directory","entries":{NAME:NODE,...}}            entries in raw byte order
//        | {"type":"regular","size":N[,"executable":true],"narOffset":N}
//        | {"type":"symlink","target":STRING}
// Names and targets are raw bytes, so the listing is bytes, not a JS string: Nix escapes only
// '"', '\\', control characters below 0x20 (\n \r \t short, the rest as \u00xx) and copies every
// other byte as is, including 0x7f and bytes that are not valid UTF-8.

export interface ListingRegular {
  type: "regular";
  size: number;
  executable: boolean; // written only when true
  /** Offset of the first content byte within the NAR. */
  narOffset: number;
}
export interface ListingSymlink {
  type: "symlink";
  target: Buffer;
}
export interface ListingDirectory {
  type: "directory";
  /** Sorted by raw byte order of the names (as in the NAR). */
  entries: ListingEntry[];
}
export interface ListingEntry {
  name: Buffer;
  node: ListingNode;
}
export type ListingNode = ListingRegular | ListingSymlink | ListingDirectory;
export interface Listing {
  version: 1;
  root: ListingNode;
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;

/** A JSON string literal for raw bytes, escaped exactly as Nix does. */
function jsonString(bytes: Buffer): Buffer {
  // Fast path: nothing to escape.
  if (!bytes.some((c) => c < 0x20 || c === QUOTE || c === BACKSLASH)) {
    return Buffer.concat([Buffer.from('"'), bytes, Buffer.from('"')]);
  }
  const out: number[] = [QUOTE];
  for (const c of bytes) {
    if (c === QUOTE || c === BACKSLASH) out.push(BACKSLASH, c);
    else if (c === 0x0a) out.push(BACKSLASH, 0x6e); // \n
    else if (c === 0x0d) out.push(BACKSLASH, 0x72); // \r
    else if (c === 0x09) out.push(BACKSLASH, 0x74); // \t
    else if (c < 0x20) for (const e of Buffer.from(`\\u${c.toString(16).padStart(4, "0")}`)) out.push(e);
    else out.push(c);
  }
  out.push(QUOTE);
  return Buffer.from(out);
}

function writeNode(node: ListingNode, out: Buffer[]): void {
  switch (node.type) {
    case "regular":
      out.push(
        Buffer.from(
          `{"type":"regular","size":${node.size}${node.executable ? ',"executable":true' : ""},"narOffset":${node.narOffset}}`,
        ),
      );
      return;
    case "symlink":
      out.push(Buffer.from('{"type":"symlink","target":'), jsonString(node.target), Buffer.from("}"));
      return;
    case "directory":
      out.push(Buffer.from('{"type":"directory","entries":{'));
      node.entries.forEach((e, i) => {
        if (i > 0) out.push(Buffer.from(","));
        out.push(jsonString(e.name), Buffer.from(":"));
        writeNode(e.node, out);
      });
      out.push(Buffer.from("}}"));
      return;
  }
}

/** The listing as the bytes Nix writes to `<hash>.ls` (no trailing newline). */
export function serializeListing(listing: Listing): Buffer {
  const out: Buffer[] = [Buffer.from(`{"version":${listing.version},"root":`)];
  writeNode(listing.root, out);
  out.push(Buffer.from("}"));
  return Buffer.concat(out);
}
