// The dashboard's favicon: served by the agent so the browser asks no other origin for one.
export const DASHBOARD_ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<circle cx="16" cy="16" r="6" fill="#2f6fdf"/>
<g stroke="#2f9e44" stroke-width="2.5"><line x1="16" y1="16" x2="5" y2="6"/><line x1="16" y1="16" x2="27" y2="6"/><line x1="16" y1="16" x2="16" y2="29"/></g>
<g fill="#2f9e44"><circle cx="5" cy="6" r="4"/><circle cx="27" cy="6" r="4"/><circle cx="16" cy="28" r="4"/></g>
</svg>
`;
