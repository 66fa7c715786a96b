// What the binary cache protocol says about one store path, independent of where it lives.

/** Metadata of a valid store path, in the forms the narinfo format uses. */
export interface PathInfo {
  /** Full store path, e.g. /nix/store/<32-char hash>-<name>. */
  storePath: string;
  /** "sha256:<nix32>" (52 nix32 characters). */
  narHash: string;
  narSize: number;
  /** Full store paths, sorted by byte order. */
  references: string[];
  /** Full store path of the deriver, if known. */
  deriver?: string;
  /** Signatures "keyname:base64", as stored. */
  sigs: string[];
  /** Content-address assertion, e.g. "fixed:r:sha256:...", if any. */
  ca?: string;
}

export const STORE_DIR = "/nix/store";
