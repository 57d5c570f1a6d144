// chatbus dashboard: polls /dashboard.json every 10 s and draws it with uPlot (vendored, MIT).
// Every text that comes from data is set with textContent, never as HTML.
"use strict";

const OUTCOMES = [["answered", "#5cb85c"], ["refused", "#f0ad4e"], ["cancelled", "#999"], ["error", "#d9534f"]];
const plots = {};
const HEIGHT = 220;

function width(el) { return Math.max(300, el.clientWidth || 480); }

function authHeaders() {
  const key = localStorage.getItem("chatbus.apiKey");
  return key ? { Authorization: "Bearer " + key } : {};
}

// stack the series (each point the sum of itself and the series below), so bars drawn last-to-first stack
function stacked(t, series) {
  const out = [];
  let acc = t.map(() => 0);
  for (const s of series) {
    acc = acc.map((v, i) => v + (s[i] || 0));
    out.push(acc);
  }
  return out;
}

function plot(id, opts, data) {
  const el = document.getElementById(id);
  if (plots[id]) {
    plots[id].destroy(); // series or scales may change with the window: redraw from scratch (cheap)
  }
  plots[id] = new uPlot({ width: width(el), height: HEIGHT, ...opts }, data, el);
}

// the x axis covers whole buckets: a bar starts at its bucket's time, so the newest one needs room on the right
const xScale = (t, bucket) => ({ time: true, range: () => [t[0], (t[t.length - 1] ?? t[0]) + bucket] });

function drawOutcomes(o, bucket) {
  const t = o.t;
  const sums = stacked(t, OUTCOMES.map(([k]) => o[k] || []));
  const bars = uPlot.paths.bars({ size: [0.8, 40, 3], align: 1 });
  // drawn top-down so each stacked total paints over by the one beneath it
  const order = OUTCOMES.map((s, i) => i).reverse();
  plot("outcomes", {
    scales: { x: xScale(t, bucket), y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    series: [{}, ...order.map((i) => ({
      label: OUTCOMES[i][0], fill: OUTCOMES[i][1], stroke: OUTCOMES[i][1], width: 0, paths: bars, points: { show: false },
      value: (u, v, si, di) => (di == null ? "–" : String((o[OUTCOMES[i][0]] || [])[di] ?? 0)),
    }))],
    axes: [{}, { size: 50 }],
  }, [t, ...order.map((i) => sums[i])]);
  const rate = t.map((_, i) => {
    const total = OUTCOMES.reduce((a, [k]) => a + ((o[k] || [])[i] || 0), 0);
    return total ? (100 * ((o.refused || [])[i] || 0)) / total : null;
  });
  plot("rate", {
    scales: { x: xScale(t, bucket), y: { range: [0, 100] } },
    series: [{}, { label: "refused %", stroke: "#f0ad4e", width: 2, spanGaps: true, points: { show: true, size: 4 }, value: (u, v) => (v == null ? "–" : v.toFixed(0) + " %") }],
    axes: [{}, { size: 50, values: (u, vals) => vals.map((v) => v + " %") }],
  }, [t, rate]);
  const turns = OUTCOMES.reduce((a, [k]) => a + (o[k] || []).reduce((x, y) => x + y, 0), 0);
  const refused = (o.refused || []).reduce((x, y) => x + y, 0);
  document.getElementById("k-refusal").textContent = turns ? `${((100 * refused) / turns).toFixed(1)} %` : "–";
  document.body.dataset.bucket = String(bucket);
}

function drawThumbs(th) {
  const up = th.up || 0;
  const down = th.down || 0;
  const total = up + down;
  const upEl = document.getElementById("thumbs-up");
  const downEl = document.getElementById("thumbs-down");
  upEl.style.width = total ? `${(100 * up) / total}%` : "50%";
  downEl.style.width = total ? `${(100 * down) / total}%` : "50%";
  upEl.style.opacity = downEl.style.opacity = total ? "1" : "0.25";
  upEl.textContent = up ? `▲ ${up}` : "";
  downEl.textContent = down ? `▼ ${down}` : "";
  document.getElementById("thumbs").setAttribute("aria-label", `${up} up, ${down} down`);
  document.getElementById("thumbs-note").textContent = total ? `${up} up · ${down} down · ${((100 * up) / total).toFixed(0)} % positive` : "no ratings yet";
  document.getElementById("k-up").textContent = total ? `${((100 * up) / total).toFixed(0)} %` : "–";
}

function drawRecords(r, bucket) {
  plot("records", {
    scales: { x: xScale(r.t, bucket), y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    series: [{}, { label: "DPO pairs", stroke: "#337ab7", width: 2, fill: "rgba(51,122,183,.08)" }, { label: "KTO examples", stroke: "#8e44ad", width: 2, dash: [6, 4] }],
    axes: [{}, { size: 50 }],
  }, [r.t, r.dpo || [], r.kto || []]);
}

// GET /v1/usage (OpenAI's usage shape: a bucket per UTC day, results per model): a row per day and model, newest first
async function refreshUsage() {
  const note = document.getElementById("usage-note");
  let d;
  try {
    const r = await fetch("/v1/usage?group_by=model", { cache: "no-store", headers: authHeaders() });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    d = await r.json();
  } catch (e) {
    note.textContent = `cannot load usage: ${e.message}`;
    return;
  }
  const body = document.querySelector("#usage tbody");
  body.replaceChildren();
  let tokens = 0;
  let cost = 0;
  for (const bucket of [...(d.data || [])].reverse()) {
    const day = new Date(bucket.start_time * 1000).toISOString().slice(0, 10);
    for (const u of bucket.results || []) {
      tokens += (u.input_tokens || 0) + (u.output_tokens || 0);
      cost += u.cost_usd || 0;
      const row = document.createElement("tr");
      for (const v of [day, u.model ?? "all", u.num_model_requests, u.input_tokens, u.output_tokens, (u.cost_usd || 0).toFixed(6)]) {
        const cell = document.createElement("td");
        cell.textContent = String(v ?? "");
        row.appendChild(cell);
      }
      body.appendChild(row);
    }
  }
  document.getElementById("k-tokens").textContent = String(tokens);
  document.getElementById("k-cost").textContent = `$${cost.toFixed(4)}`;
  document.body.dataset.usageUpdated = String(Date.now());
}

async function refresh() {
  const err = document.getElementById("error");
  const hours = document.getElementById("hours").value;
  let d;
  try {
    const r = await fetch(`/dashboard.json?hours=${encodeURIComponent(hours)}`, { cache: "no-store", headers: authHeaders() });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg = (await r.json()).error.message || msg; } catch { /* not JSON */ }
      throw new Error(msg);
    }
    d = await r.json();
    err.textContent = "";
  } catch (e) {
    err.textContent = `— cannot load dashboard data: ${e.message}`;
    return;
  }
  drawOutcomes(d.outcomes, d.bucket_s);
  drawThumbs(d.thumbs || {});
  drawRecords(d.records, d.bucket_s);
  const totals = d.totals || {};
  document.getElementById("k-turns").textContent = totals.turns ?? 0;
  document.getElementById("k-dpo").textContent = totals.dpo ?? 0;
  document.getElementById("k-kto").textContent = totals.kto ?? 0;
  document.body.dataset.updated = String(Date.now());
}

const initialHours = new URLSearchParams(location.search).get("hours");
if (initialHours && [...document.getElementById("hours").options].some((o) => o.value === initialHours)) {
  document.getElementById("hours").value = initialHours;
}
document.getElementById("hours").addEventListener("change", refresh);
refresh();
refreshUsage();
setInterval(refresh, 10000);
setInterval(refreshUsage, 10000);
window.addEventListener("resize", () => {
  for (const [id, p] of Object.entries(plots)) p.setSize({ width: width(document.getElementById(id)), height: HEIGHT });
});
