// The dashboard's stylesheet: system fonts, light and dark palettes from the OS preference.
// Colours of state are paired with words in the page (never colour alone).
export const DASHBOARD_CSS = `:root {
  color-scheme: light dark;
  --bg: #f6f7f9; --card: #ffffff; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de;
  --ok: #1a7f37; --off: #8c959f; --self: #2f6fdf; --warn: #b35900; --bad: #cf222e;
  --local: #2f6fdf; --peer: #1a7f37; --miss: #8c959f;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0d1117; --card: #161b22; --fg: #e6edf3; --muted: #9da7b3; --line: #30363d;
    --ok: #3fb950; --off: #6e7681; --self: #58a6ff; --warn: #d29922; --bad: #f85149;
    --local: #58a6ff; --peer: #3fb950; --miss: #6e7681;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif; }
header { padding: 12px 20px 0; }
h1 { font-size: 20px; margin: 0 0 2px; }
h1 #host-name { font-weight: 400; color: var(--muted); }
h2 { font-size: 16px; margin: 0 0 10px; }
h3 { font-size: 13px; margin: 14px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
header p { margin: 0; }
.muted { color: var(--muted); }
#conn-state.ok::before { content: "● "; color: var(--ok); }
#conn-state.bad { color: var(--bad); font-weight: 600; }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 14px; padding: 14px 20px 20px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; min-width: 0; }
.card.wide { grid-column: 1 / -1; }
main.stale .card { opacity: .6; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
figure { margin: 0; }
#graph { width: 100%; max-width: 900px; max-height: 440px; display: block; margin: 0 auto; }
figcaption { display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 12px; color: var(--muted); margin: 4px 0 10px; }
.key { display: inline-flex; align-items: center; gap: 5px; }
.swatch { display: inline-block; width: 18px; height: 0; border-top: 3px solid var(--ok); }
.swatch.disconnected { border-top: 3px dashed var(--off); }
.edge { stroke-width: 3; }
.edge.connected { stroke: var(--ok); }
.edge.disconnected { stroke: var(--off); stroke-dasharray: 7 6; stroke-width: 2; }
.node { stroke: var(--card); stroke-width: 3; }
.node.self { fill: var(--self); }
.node.connected { fill: var(--ok); }
.node.disconnected { fill: var(--off); }
svg text { fill: var(--fg); font-size: 13px; paint-order: stroke; stroke: var(--card); stroke-width: 4px; stroke-linejoin: round; }
svg text .name { font-weight: 600; }
svg text.sub { fill: var(--muted); font-size: 12px; }
svg text.rtt { font-size: 12px; font-weight: 600; fill: var(--ok); }
svg text.empty { fill: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: var(--muted); padding-bottom: 4px; }
th, td { text-align: left; padding: 5px 10px 5px 0; border-bottom: 1px solid var(--line); white-space: nowrap; }
thead th { font-size: 12px; color: var(--muted); font-weight: 600; }
.num { text-align: right; }
td.state.connected { color: var(--ok); font-weight: 600; }
td.state.disconnected { color: var(--muted); }
.bar { display: flex; height: 16px; border-radius: 4px; overflow: hidden; background: var(--line); }
.bar span { display: block; height: 100%; }
.bar .local, .legend .local::before { background: var(--local); }
.bar .peer, .legend .peer::before { background: var(--peer); }
.bar .miss, .legend .miss::before { background: var(--miss); }
.legend { list-style: none; padding: 0; margin: 8px 0 0; display: flex; flex-wrap: wrap; gap: 4px 16px; }
.legend li::before { content: ""; display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.legend li.total::before { display: none; }
.events { list-style: none; padding: 0; margin: 0; max-height: 260px; overflow-y: auto; }
.events li { padding: 4px 0; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
.events li.none { color: var(--muted); border: 0; }
#errors li .msg { color: var(--bad); }
.events time { color: var(--muted); margin-right: 8px; font-variant-numeric: tabular-nums; }
`;
