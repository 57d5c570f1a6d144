// chatbus live page: polls /live.json every 2 s and draws it with uPlot (vendored, MIT).
// Every text that comes from data is set with textContent, never as HTML.
"use strict";

const OUTCOMES = [
  ["answered", "#5cb85c"], ["refused", "#f0ad4e"], ["cancelled", "#999"],
  ["error", "#d9534f"], ["rate_limited", "#8e44ad"],
];
const plots = {};
const WINDOW_S = 600;  // the x axis always shows the last 10 minutes
let latest = Date.now() / 1000;

function width(el) { return Math.max(320, el.clientWidth || 500); }

function plot(id, series, data) {
  const el = document.getElementById(id);
  if (!plots[id]) {
    const opts = {
      width: width(el), height: 220,
      scales: { x: { time: true, range: () => [latest - WINDOW_S, latest] } },
      series: [{}, ...series.map(([label, stroke, dash]) => ({ label, stroke, width: 2, dash, spanGaps: true }))],
      axes: [{}, { size: 60 }],
    };
    plots[id] = new uPlot(opts, data, el);
  } else {
    plots[id].setData(data);
  }
}

function bars(id, rows, unit) {
  const el = document.getElementById(id);
  el.replaceChildren();
  const max = Math.max(1, ...rows.map(r => r.p99 ?? r.p50 ?? 0));
  for (const r of rows) {
    const row = document.createElement("div");
    row.className = "row " + (r.kind || "");
    const name = document.createElement("span");
    name.textContent = r.name;
    const track = document.createElement("div");
    track.className = "track";
    if (r.p99 != null) {
      const p99 = document.createElement("div");
      p99.className = "p99";
      p99.style.width = (100 * r.p99 / max) + "%";
      track.append(p99);
    }
    const p50 = document.createElement("div");
    p50.className = "p50";
    p50.style.width = (100 * (r.p50 ?? 0) / max) + "%";
    track.append(p50);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = r.p99 != null ? `${r.p50} / ${r.p99} ${unit}` : `${r.p50} ${unit}`;
    row.append(name, track, num);
    el.append(row);
  }
  if (!rows.length) el.textContent = "no data yet";
}

function fmt(ms) { return ms == null ? "–" : `${Math.round(ms)} ms`; }

async function refresh() {
  const err = document.getElementById("error");
  let d;
  try {
    const key = localStorage.getItem("chatbus.apiKey"); // an operator key when the edge has keys
    const r = await fetch("/live.json", { cache: "no-store", headers: key ? { Authorization: "Bearer " + key } : {} });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    d = await r.json();
    err.textContent = "";
  } catch (e) {
    err.textContent = `— cannot load live data: ${e.message}`;
    return;
  }
  latest = d.now;
  const t = d.series.map(b => b.t);
  plot("ttft", [["p50", "#d9534f"], ["p99", "#f0ad4e", [6, 4]]],
       [t, d.series.map(b => b.ttft_p50_ms), d.series.map(b => b.ttft_p99_ms)]);
  plot("outcomes", OUTCOMES, [t, ...OUTCOMES.map(([k]) => d.series.map(b => b.outcomes[k] || 0))]);
  plot("tps", [["tokens/s", "#337ab7"]], [t, d.series.map(b => b.tokens_per_s)]);
  bars("breakdown", d.breakdown.map(b => ({ kind: b.kind, name: b.kind === "total" ? `TTFT: ${b.name}` : b.name, p50: b.p50_ms, p99: b.p99_ms })), "ms");
  bars("lag", Object.entries(d.lag).map(([name, v]) => ({ kind: "hop", name: name.replace(/^chatbus-/, ""), p50: v })), "");
  const ttft = d.breakdown.find(b => b.kind === "total" && b.name === "ttft");
  document.getElementById("k-inflight").textContent = d.inflight;
  document.getElementById("k-ttft50").textContent = fmt(ttft && ttft.p50_ms);
  document.getElementById("k-ttft99").textContent = fmt(ttft && ttft.p99_ms);
  document.getElementById("k-answered").textContent = d.totals.answered || 0;
  document.getElementById("k-refused").textContent = d.totals.refused || 0;
  document.getElementById("k-429").textContent = d.totals.rate_limited || 0;
  document.body.dataset.updated = String(d.now);
}

refresh();
setInterval(refresh, 2000);
window.addEventListener("resize", () => {
  for (const [id, p] of Object.entries(plots)) p.setSize({ width: width(document.getElementById(id)), height: 220 });
});
