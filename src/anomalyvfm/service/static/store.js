// Stored inspections (serve --store): the history kept by the server, one-click labels, and a chart of the
// score distribution and pass rate over time with the threshold. Uses api(), $, fmt and tag from app.js.
// GET /model names the store (null without one: then this section stays hidden and nothing is asked).
"use strict";

const STORED_PAGE = 500;  // newest records shown and plotted
const PASS_BINS = 12;     // pass rate: records split into this many consecutive groups
const SVG_NS = "http://www.w3.org/2000/svg";
const stored = { items: [], total: 0, filter: "", available: false };

async function loadStored() {
  const query = new URLSearchParams({ limit: String(STORED_PAGE) });
  if (stored.filter === "anomalous") query.set("verdict", "anomalous");
  else if (stored.filter) query.set("label", stored.filter);
  try {
    const page = await api(`inspections?${query}`);
    Object.assign(stored, { items: page.inspections, total: page.total });
  } catch (err) {
    showMessage(`Could not load the stored inspections: ${err.message}`);
    return;
  }
  $("stored-section").hidden = false;
  renderStored();
}

async function setLabel(item, label) {
  try {
    const updated = await api(`inspections/${encodeURIComponent(item.id)}/label`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label }),
    });
    Object.assign(item, updated);
    renderStored();
  } catch (err) {
    showMessage(`Could not label ${item.source}: ${err.message}`);
  }
}

function labelButton(item, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `label-${label}`;
  button.textContent = label === "good" ? "Good" : "Defect";
  button.setAttribute("aria-pressed", String(item.label === label));
  button.setAttribute("aria-label", `label ${item.source} ${label}`);
  button.addEventListener("click", () => setLabel(item, label));
  return button;
}

function renderStored() {
  const body = $("stored").tBodies[0];
  body.replaceChildren();
  for (const item of stored.items) {
    const row = body.insertRow();
    row.dataset.id = item.id;
    row.dataset.label = item.label || "";
    const time = row.insertCell();
    time.className = "num";
    time.textContent = new Date(item.time).toLocaleString();
    time.title = `${item.time}, model version ${item.model_version || "unknown"}`;
    row.insertCell().textContent = item.source;
    const score = row.insertCell();
    score.className = "num";
    score.textContent = fmt(item.score);
    row.insertCell().append(tag(item.is_anomalous ? { text: "FAIL", cls: "fail" } : { text: "PASS", cls: "pass" }));
    const labels = row.insertCell();
    labels.className = "labels";
    labels.append(labelButton(item, "good"), labelButton(item, "defect"));
  }
  const labelled = stored.items.filter((i) => i.label).length;
  $("stored-count").textContent = `(${stored.total} stored; newest ${stored.items.length} shown, ${labelled} of them labelled)`;
  renderChart([...stored.items].reverse());
}

function svg(name, attributes, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
  if (parent) parent.append(el);
  return el;
}

// Scores over time (dots, red when flagged), the threshold in force (dashed), and the pass rate of
// consecutive groups of records (green line, right axis): a drift on good parts shows as rising dots.
function renderChart(items) {
  const chart = $("stored-chart");
  chart.replaceChildren();
  const W = 560, H = 180, L = 44, R = 40, T = 10, B = 22;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!items.length) return;
  const scores = items.map((i) => i.score), limits = items.map((i) => i.image_threshold);
  const top = Math.max(...scores, ...limits) * 1.1 || 1, bottom = Math.min(0, ...scores);
  const x = (k) => L + (items.length === 1 ? 0.5 : k / (items.length - 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - bottom) / (top - bottom)) * (H - T - B);
  const rate = (v) => T + (1 - v) * (H - T - B);
  svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }, chart);
  for (const [value, text] of [[bottom, fmt(bottom)], [top, fmt(top)]]) {
    svg("text", { x: L - 4, y: y(value) + 4, "text-anchor": "end", class: "axis" }, chart).textContent = text;
  }
  for (const [value, text] of [[0, "0 %"], [1, "100 %"]]) {
    svg("text", { x: W - R + 4, y: rate(value) + 4, class: "axis" }, chart).textContent = text;
  }
  svg("polyline", { points: items.map((i, k) => `${x(k)},${y(i.image_threshold)}`).join(" "), class: "threshold" }, chart);
  items.forEach((i, k) => {
    const dot = svg("circle", { cx: x(k), cy: y(i.score), r: 2.5, class: i.is_anomalous ? "dot fail" : "dot pass" }, chart);
    svg("title", {}, dot).textContent = `${i.source}: ${fmt(i.score)}`;
  });
  const size = Math.max(1, Math.ceil(items.length / PASS_BINS)), points = [];
  for (let start = 0; start < items.length; start += size) {
    const group = items.slice(start, start + size);
    const passed = group.filter((i) => !i.is_anomalous).length / group.length;
    points.push(`${x(start + (group.length - 1) / 2)},${rate(passed)}`);
  }
  svg("polyline", { points: points.join(" "), class: "pass-rate" }, chart);
  const passed = items.filter((i) => !i.is_anomalous).length;
  chart.dataset.points = String(items.length);
  $("stored-chart-note").textContent = `${items.length} records from ${new Date(items[0].time).toLocaleString()}: `
    + `${(100 * passed / items.length).toFixed(1)} % passed; dashed: the threshold in force; green: pass rate.`;
}

function wireStored() {
  $("stored-filter").addEventListener("change", (event) => { stored.filter = event.target.value; loadStored(); });
  $("stored-refresh").addEventListener("click", loadStored);
  document.addEventListener("inspected", () => { if (stored.available) loadStored(); });
  document.addEventListener("model", (event) => {
    if (!event.detail.store || stored.available) return;
    stored.available = true;
    loadStored();
  });
}

document.addEventListener("DOMContentLoaded", wireStored);
