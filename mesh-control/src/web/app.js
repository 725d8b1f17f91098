// The topology page: polls /api/snapshot and redraws. Hand-written, no
// dependencies; elements carry data-* attributes that tests select on.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 400;

function el(name, attrs, text) {
  const e = name.startsWith("svg:") ? document.createElementNS(SVG, name.slice(4)) : document.createElement(name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(2); }
function pct(v) { return (v * 100).toFixed(0) + "%"; }
function when(unix) { return unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) : "-"; }
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
}
function age(msv) { return msv === null || msv === undefined ? "never" : (msv / 1000).toFixed(0) + " s"; }

// Green, amber or red by p95 RTT and loss; red for a link seen down.
function colour(l) {
  if (!l || !l.up || l.p95_ms === null) return "#c22";
  if (l.p95_ms < 10 && l.loss === 0) return "#3a3";
  if (l.p95_ms < 50 && l.loss < 0.05) return "#e90";
  return "#c22";
}

function worse(a, b) {
  if (!a) return b;
  if (!b) return a;
  const rank = (l) => (l.up ? 0 : 1e9) + (l.p95_ms === null ? 1e6 : l.p95_ms) + l.loss * 1e4;
  return rank(a) >= rank(b) ? a : b;
}

function drawTopology(s) {
  const svg = document.getElementById("topology");
  svg.replaceChildren();
  const W = 1000, H = 560, cx = W / 2, cy = H / 2;
  const n = Math.max(s.sites.length, 1);
  const R = n === 1 ? 0 : Math.min(W, H) * 0.33;
  const pos = {};
  const boxes = s.sites.map((site, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / n;
    const x = cx + R * 1.25 * Math.cos(a), y = cy + R * Math.sin(a);
    // Room for each gateway's two label lines side by side.
    const w = Math.max(180, 135 * site.gateways.length + 30), h = 130;
    site.gateways.forEach((g, j) => {
      pos[g] = [x - w / 2 + 15 + 67 + j * 135, y + 8];
    });
    return { site, x, y, w, h };
  });
  const links = el("svg:g", { id: "links" });
  const byPair = {};
  for (const l of s.links) {
    const key = [l.from, l.to].sort().join("|");
    byPair[key] = worse(byPair[key], l);
  }
  for (const [key, l] of Object.entries(byPair)) {
    const [a, b] = key.split("|");
    if (!pos[a] || !pos[b]) continue;
    const line = el("svg:line", {
      class: "link", x1: pos[a][0], y1: pos[a][1], x2: pos[b][0], y2: pos[b][1],
      stroke: colour(l), "data-link": key, "data-up": l.up,
    });
    line.appendChild(el("svg:title", {}, `${a} - ${b}: p50 ${ms(l.p50_ms)} ms, p95 ${ms(l.p95_ms)} ms, loss ${pct(l.loss)}`));
    links.appendChild(line);
  }
  for (const b of boxes) {
    const g = el("svg:g", { class: "site", "data-site": b.site.name });
    g.appendChild(el("svg:rect", { x: b.x - b.w / 2, y: b.y - b.h / 2, width: b.w, height: b.h, rx: 8 }));
    g.appendChild(el("svg:text", { class: "name", x: b.x - b.w / 2 + 8, y: b.y - b.h / 2 + 18 }, b.site.name));
    g.appendChild(el("svg:text", { x: b.x - b.w / 2 + 8, y: b.y - b.h / 2 + 32, "font-size": 10 }, b.site.prefixes.join("  ")));
    svg.appendChild(g);
  }
  svg.appendChild(links);
  for (const gw of s.gateways) {
    const p = pos[gw.name];
    if (!p) continue;
    const g = el("svg:g", {
      class: "gw", id: "gw-" + gw.name, "data-gateway": gw.name, "data-state": gw.state,
      "data-role": gw.role, "data-owner": gw.owner, "data-online": gw.online,
    });
    g.appendChild(el("svg:circle", { cx: p[0], cy: p[1], r: 14 }));
    g.appendChild(el("svg:text", { x: p[0], y: p[1] + 28, "text-anchor": "middle" }, gw.name));
    g.appendChild(el("svg:text", { x: p[0], y: p[1] + 40, "text-anchor": "middle" }, `${gw.role} · ${gw.backend || "?"}`));
    g.appendChild(el("svg:title", {}, `${gw.name}: ${gw.state}${gw.down_reason ? " (" + gw.down_reason + ")" : ""}`));
    svg.appendChild(g);
  }
}

function rows(id, items, cells) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...items.map((it) => {
    const tr = el("tr");
    for (const [text, attrs] of cells(it)) tr.appendChild(el("td", attrs || {}, text));
    return tr;
  }));
}

function draw(s) {
  drawTopology(s);
  rows("pairs", s.site_pairs, (p) => {
    const l = p.link;
    return [[p.from], [p.to], [l ? `${l.from} → ${l.to}` : "-"],
      [l ? ms(l.p50_ms) : "-", { class: "num" }], [l ? ms(l.p95_ms) : "-", { class: "num" }],
      [l ? pct(l.loss) : "-", { class: "num" }], [l ? age(l.handshake_age_ms) : "-", { class: "num" }]];
  });
  document.querySelectorAll("#pairs tbody tr").forEach((tr, i) => {
    tr.dataset.pair = s.site_pairs[i].from + "|" + s.site_pairs[i].to;
  });
  rows("gateways", s.gateways, (g) => [[g.name, { "data-gateway-row": g.name, "data-state": g.state }], [g.site],
    [g.role + (g.owner ? ", owner" : "")], [g.state + (g.down_reason ? ` (${g.down_reason})` : ""), g.state === "down" ? { class: "bad" } : {}],
    [g.backend], [when(g.key_expiry)]]);
  rows("routes", s.routes, (r) => [[r.prefix], [r.gateway], [r.rank, { class: "num" }],
    [r.refusal ? "refused: " + r.refusal : (r.healthy ? "healthy" : "unhealthy"), r.healthy && !r.refusal ? {} : { class: "bad" }],
    [when(r.owner_since)], [when(r.last_change)]]);
  rows("expiring", s.expiring, (e) => [[e.name], [when(e.key_expiry) + (e.expired ? " (expired)" : ""), e.expired ? { class: "bad" } : {}]]);
  rows("links", s.links, (l) => [[l.from, { "data-link": l.from + "|" + l.to }], [l.to], [l.endpoint || "-"],
    [l.path ? l.path + (l.path_switches ? ` (${l.path_switches} switches)` : "") : "-"],
    [age(l.handshake_age_ms), { class: "num" }], [bytes(l.rx_bytes), { class: "num" }], [bytes(l.tx_bytes), { class: "num" }],
    [l.report_age_secs + " s ago", { class: "num" }]]);
  rows("audit", s.audit, (a) => [[a.id, { class: "num" }], [when(a.at)], [a.actor], [a.action], [a.subject]]);
}

async function poll() {
  const status = document.getElementById("updated");
  try {
    const r = await fetch("/api/snapshot", { cache: "no-store", credentials: "same-origin" });
    if (r.status === 401) { location.reload(); return; }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const s = await r.json();
    draw(s);
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
    document.body.dataset.snapshotAt = String(Date.now());
  } catch (e) {
    status.textContent = "control unreachable: " + e.message;
    status.className = "stale";
  }
  setTimeout(poll, POLL_MS);
}

poll();
