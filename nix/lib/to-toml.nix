# Renders the agent's settings (a flat attribute set: strings, integers, booleans and lists of
# them; null means "not set") as TOML. Written with builtins only, so the configuration can be
# produced by plain evaluation (no remarshal build), read with `nix eval`, and checked by the
# test suite on machines without nixpkgs.
settings:
let
  inherit (builtins) attrNames concatStringsSep filter isAttrs isBool isInt isList isString map match replaceStrings toJSON typeOf;

  # JSON string escapes are TOML basic-string escapes, except that TOML also forbids a raw DEL.
  del = builtins.fromJSON ''"\u007f"'';
  string = s: replaceStrings [ del ] [ "\\u007f" ] (toJSON s);

  key = k: if match "[A-Za-z0-9_-]+" k != null then k else string k;

  value = name: v:
    if isString v then string v
    else if isBool v then (if v then "true" else "false")
    else if isInt v then toString v
    else if isList v then "[" + concatStringsSep ", " (map (value name) v) + "]"
    else throw "fleetcache settings: ${name} is a ${typeOf v}; expected a string, integer, boolean or list";

  names = filter (k: settings.${k} != null) (attrNames settings);
in
assert isAttrs settings;
concatStringsSep "" (map (k: "${key k} = ${value k settings.${k}}\n") names)
