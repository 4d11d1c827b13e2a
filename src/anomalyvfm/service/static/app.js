// AnomalyVFM inspection page: sends each chosen image to POST /predict?maps=true and shows the answer.
// Plain browser JavaScript, no dependencies. This page's own list lives in the page; a server started with
// --store also keeps every verdict, which store.js shows (it hears of each check by the "inspected" event).
"use strict";

const REQUEST_TIMEOUT_MS = 120000;  // a CPU server scoring a large image can take tens of seconds
// Full-size maps kept for the newest results up to this many base64 characters (~150 MB of PNG); older rows
// keep their thumbnail and score, so a long shift at the line does not exhaust the browser's memory.
const MAPS_BUDGET_CHARS = 200e6;
const THUMB_W = 128, THUMB_H = 96;

const $ = (id) => document.getElementById(id);
const state = {
  apiKey: null,      // asked once, when the server first answers 401; kept in memory only
  keyPrompt: null,   // the open key dialog's promise, if any
  model: null,       // GET /model
  results: [],       // newest last: {id, name, score, isAnomalous, threshold, elapsedMs, roundTripMs, error, ...}
  selected: null,
  sort: "newest",    // newest | desc | asc
  whatIf: null,
  queue: [],
  working: false,
  nextId: 1,
};

// ---------------------------------------------------------------- messages
function showMessage(text) {
  $("message-text").textContent = text;
  $("message").hidden = false;
}
function clearMessage() { $("message").hidden = true; }

function formatBytes(n) {
  if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${n} bytes`;
}
const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toPrecision(4));

// ---------------------------------------------------------------- API
class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

// The key typed, or null when the user cancels. Requests that meet a 401 while the dialog is open
// wait for the same answer instead of opening a second dialog.
function askKey(reason) {
  if (!state.keyPrompt) state.keyPrompt = promptKey(reason).finally(() => { state.keyPrompt = null; });
  return state.keyPrompt;
}

function promptKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = $("key-input").value;
      resolve(dialog.returnValue === "ok" && key ? key : null);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    $("key-input").focus();
  });
}

// fetch with the key, a timeout, and one line of text for every way it can fail.
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const sentKey = state.apiKey;
    if (sentKey) headers.set("X-API-Key", sentKey);
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, { ...options, headers, signal: abort.signal });
    } catch (err) {
      const why = err.name === "AbortError" ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s`
                                            : "the server cannot be reached (stopped, or the network is down)";
      throw new ApiError(0, `${why}: ${location.origin}`);
    } finally {
      clearTimeout(timer);
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (response.status === 401) {
      if (state.apiKey !== sentKey) continue;  // a key was given while this request was under way: use it
      const key = await askKey(state.apiKey ? "The server refused this key. Enter the right one."
                                            : "This server needs an API key (ask whoever runs it).");
      if (key === null) throw new ApiError(401, "no API key given: the server refuses requests without one");
      state.apiKey = key;
      continue;  // same request, now with the key
    }
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
      throw new ApiError(response.status, `${detail} (HTTP ${response.status})`);
    }
    if (body === null) throw new ApiError(response.status, "the server's answer was not JSON");
    return body;
  }
}

// ---------------------------------------------------------------- model card
const CARD = [
  ["model", (m) => m.model],
  ["backbone", (m) => m.backbone],
  ["layers", (m) => (m.layers || []).join(", ")],
  ["image size", (m) => `${m.image_size} px`],
  ["scorer", (m) => `${m.scorer} (top ${m.top_percent} %, σ ${m.sigma})`],
  ["image threshold", (m) => fmt(m.image_threshold)],
  ["pixel threshold", (m) => fmt(m.pixel_threshold)],
  ["image threshold from", (m) => (m.threshold_evidence || {}).image
    ?? `${(m.validation_stats || {}).images ?? "?"} validation images, mean + ${m.threshold_sigma} std`],
  ["pixel threshold from", (m) => (m.threshold_evidence || {}).pixel ?? "validation map pixels"],
  ["train images", (m) => m.train_images ?? "not reported by this server"],
  ["fitted at", (m) => m.fitted_at ?? "not recorded in this model"],
  ["fitted with", (m) => `anomalyvfm ${m.fitted_with_version || "?"}`],
  ["served by", (m) => `anomalyvfm ${m.package_version} on ${m.device} (${m.precision})`],
  ["upload limit", (m) => `${formatBytes(m.limits.max_bytes)}, ${(m.limits.max_pixels / 1e6).toFixed(1)} MP`],
];

function renderCard(model) {
  const card = $("card");
  card.replaceChildren();
  for (const [label, value] of CARD) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    try { dd.textContent = String(value(model)); } catch (err) { dd.textContent = "–"; }
    dd.dataset.field = label;
    card.append(dt, dd);
  }
  $("model-name").textContent = `model “${model.model}” · ${model.scorer} on ${model.image_size} px · image threshold ${fmt(model.image_threshold)}`;
  $("limit-note").textContent = `up to ${formatBytes(model.limits.max_bytes)} and ${(model.limits.max_pixels / 1e6).toFixed(1)} MP per image`;
}

async function loadModel() {
  try {
    state.model = await api("model");
    document.dispatchEvent(new CustomEvent("model", { detail: state.model }));  // store.js: is there a store?
    renderCard(state.model);
    setupWhatIf();
    return true;
  } catch (err) {
    $("model-name").textContent = "model not loaded";
    showMessage(`Could not load the model card: ${err.message}`);
    return false;
  }
}

// ---------------------------------------------------------------- what-if threshold
function threshold() { return state.whatIf ?? (state.model ? state.model.image_threshold : null); }

function setupWhatIf() {
  const t = state.model.image_threshold;
  const scores = state.results.filter((r) => r.score !== null).map((r) => r.score);
  const top = Math.max(2 * Math.abs(t), ...scores.map((s) => 1.1 * s));
  const slider = $("whatif");
  slider.min = "0";
  slider.max = String(top);
  slider.step = String(top / 1000);
  if (state.whatIf === null) slider.value = String(t);
  for (const el of [slider, $("whatif-number"), $("whatif-reset")]) el.disabled = false;
  renderWhatIf();
}

function setWhatIf(value) {
  if (!Number.isFinite(value)) return;
  state.whatIf = Math.abs(value - state.model.image_threshold) < 1e-12 ? null : value;
  renderWhatIf();
}

function renderWhatIf() {
  const t = threshold();
  if (t === null) return;
  if (document.activeElement !== $("whatif-number")) $("whatif-number").value = Number(t).toPrecision(4);
  $("whatif").value = String(t);
  const scored = state.results.filter((r) => r.score !== null);
  const fails = scored.filter((r) => r.score > t).length;
  const modelFails = scored.filter((r) => r.isAnomalous).length;
  $("whatif-summary").textContent = state.whatIf === null
    ? `Model threshold ${fmt(t)}: ${modelFails} of ${scored.length} fail.`
    : `At ${fmt(t)}: ${fails} of ${scored.length} would fail (model threshold ${fmt(state.model.image_threshold)}: ${modelFails}).`;
  renderHistory();
  renderResult();
}

// ---------------------------------------------------------------- checking images
function enqueue(files) {
  clearMessage();
  for (const file of files) state.queue.push(file);
  if (!state.working) work();
}

async function work() {
  state.working = true;
  while (state.queue.length) {
    const file = state.queue.shift();
    $("busy").textContent = `checking ${file.name}…` + (state.queue.length ? ` (${state.queue.length} more waiting)` : "");
    try {
      await check(file);
    } catch (err) {  // a bug on this page must not stop the queue: say so and go on with the next file
      showMessage(`The page failed on ${file.name}: ${err}`);
    }
  }
  $("busy").textContent = "";
  state.working = false;
}

async function check(file) {
  const entry = { id: state.nextId++, name: file.name, score: null, isAnomalous: null, error: null,
                  elapsedMs: null, roundTripMs: null, heat: null, mask: null, imageUrl: null, thumb: null,
                  width: 0, height: 0 };
  const limits = state.model && state.model.limits;
  if (limits && file.size > limits.max_bytes) {
    entry.error = `${formatBytes(file.size)} is over the server's limit of ${formatBytes(limits.max_bytes)}; not sent`;
  } else if (file.size === 0) {
    entry.error = "the file is empty; not sent";
  } else {
    const form = new FormData();
    form.append("file", file, file.name);
    const start = performance.now();
    try {
      const body = await api("predict?maps=true", { method: "POST", body: form });
      entry.roundTripMs = performance.now() - start;
      Object.assign(entry, { score: body.score, isAnomalous: body.is_anomalous, threshold: body.threshold,
                             elapsedMs: body.elapsed_ms, heat: body.anomaly_map_png, mask: body.mask_png });
      if (!state.model) await loadModel();
    } catch (err) {
      entry.error = err.message;
    }
  }
  if (entry.error) {
    showMessage(`Could not check ${file.name}: ${entry.error}`);
  } else {
    entry.imageUrl = URL.createObjectURL(file);
    await makeThumbnail(entry);
  }
  state.results.push(entry);
  forgetOldMaps();
  state.selected = entry.id;
  if (state.model) setupWhatIf(); else { renderHistory(); renderResult(); }
  if (!entry.error) document.dispatchEvent(new CustomEvent("inspected"));
}

function loadImage(src) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = src;
  });
}

// A small picture of the image with its heat map, drawn once so the history costs little memory.
async function makeThumbnail(entry) {
  const heat = await loadImage(`data:image/png;base64,${entry.heat}`);
  const image = await loadImage(entry.imageUrl);
  entry.displayable = image !== null;  // e.g. TIFF: the server reads it, most browsers cannot show it
  const base = image || heat;
  if (!base) return;
  entry.width = base.naturalWidth;
  entry.height = base.naturalHeight;
  const canvas = document.createElement("canvas");
  canvas.width = THUMB_W;
  canvas.height = THUMB_H;
  const ctx = canvas.getContext("2d");
  const scale = Math.min(THUMB_W / base.naturalWidth, THUMB_H / base.naturalHeight);
  const w = base.naturalWidth * scale, h = base.naturalHeight * scale;
  const x = (THUMB_W - w) / 2, y = (THUMB_H - h) / 2;
  if (image) ctx.drawImage(image, x, y, w, h);
  if (heat) { ctx.globalAlpha = image ? 0.45 : 1; ctx.drawImage(heat, x, y, w, h); }
  entry.thumb = canvas.toDataURL("image/png");
}

function forgetOldMaps() {
  let kept = 0;
  for (const r of [...state.results].reverse()) {  // newest first; the newest always keeps its maps
    if (r.heat === null) continue;
    kept += r.heat.length + r.mask.length;
    if (kept <= MAPS_BUDGET_CHARS || r === state.results[state.results.length - 1]) continue;
    r.heat = r.mask = null;
    if (r.imageUrl) URL.revokeObjectURL(r.imageUrl);
    r.imageUrl = null;
  }
}

// ---------------------------------------------------------------- result view
function verdictOf(entry, t) {
  if (entry.score === null) return { text: "ERROR", cls: "error" };
  return entry.score > t ? { text: "FAIL", cls: "fail" } : { text: "PASS", cls: "pass" };
}

function renderResult() {
  const entry = state.results.find((r) => r.id === state.selected);
  $("empty-result").hidden = Boolean(entry);
  $("result-body").hidden = !entry;
  if (!entry) return;
  const verdict = $("verdict");
  $("result-file").textContent = entry.name;
  if (entry.error) {
    verdict.textContent = "NOT CHECKED";
    verdict.className = "verdict fail";
    $("result-score").textContent = entry.error;
    $("result-whatif").textContent = $("result-time").textContent = "";
    $("viewer").hidden = true;
    $("view-note").textContent = "";
    return;
  }
  const model = verdictOf(entry, entry.threshold);
  verdict.textContent = model.text === "FAIL" ? "FAIL · anomalous" : "PASS · good";
  verdict.className = `verdict ${model.cls}`;
  verdict.dataset.verdict = model.text;
  const relation = entry.score > entry.threshold ? "above" : "at or below";
  $("result-score").textContent = `score ${fmt(entry.score)}, ${relation} the threshold ${fmt(entry.threshold)}`;
  const whatIf = verdictOf(entry, threshold());
  $("result-whatif").textContent = state.whatIf === null ? ""
    : `At the what-if threshold ${fmt(threshold())}: ${whatIf.text}${whatIf.text !== model.text ? " (changed)" : ""}`;
  $("result-time").textContent = `${entry.elapsedMs.toFixed(0)} ms on the server, ${entry.roundTripMs.toFixed(0)} ms round trip`;
  showMaps(entry);
}

function showMaps(entry) {
  const viewer = $("viewer");
  viewer.hidden = false;
  if (!entry.heat) {
    viewer.hidden = true;
    $("view-note").textContent = "The maps of this older result were let go to save memory; check the image again to see them.";
    return;
  }
  const ratio = entry.width && entry.height ? entry.width / entry.height : 4 / 3;
  viewer.style.aspectRatio = `${ratio}`;
  viewer.style.width = `min(100%, calc(var(--view-h) * ${ratio}))`;
  const image = $("view-image");
  if (viewer.dataset.entry === String(entry.id)) { applyOverlaySettings(); return; }
  viewer.dataset.entry = String(entry.id);
  image.hidden = !entry.displayable;
  if (entry.displayable) image.src = entry.imageUrl; else image.removeAttribute("src");
  image.alt = entry.name;
  $("view-heat").src = `data:image/png;base64,${entry.heat}`;
  $("view-heat").alt = `anomaly heat map of ${entry.name}`;
  $("view-note").textContent = (entry.displayable ? "" : "This browser cannot display the image format; showing the heat map alone. ")
    + "Heat map: blue is the validation mean, red twice the pixel threshold's distance above it; the outline marks pixels over the pixel threshold.";
  drawOutline(entry);
  applyOverlaySettings();
}

// The defect outline: mask pixels with a neighbour outside the mask, drawn in white with a dark rim.
async function drawOutline(entry) {
  const canvas = $("view-outline");
  const mask = await loadImage(`data:image/png;base64,${entry.mask}`);
  if (!mask || $("viewer").dataset.entry !== String(entry.id)) return;
  const w = mask.naturalWidth, h = mask.naturalHeight;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(mask, 0, 0);
  const src = ctx.getImageData(0, 0, w, h).data;
  const out = ctx.createImageData(w, h);
  const thick = Math.max(1, Math.round(Math.min(w, h) / 200));
  const inside = (x, y) => x >= 0 && y >= 0 && x < w && y < h && src[(y * w + x) * 4] > 127;
  let edges = 0;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!inside(x, y)) continue;
      let edge = false;
      for (let d = 1; d <= thick && !edge; d++) {
        edge = !inside(x - d, y) || !inside(x + d, y) || !inside(x, y - d) || !inside(x, y + d);
      }
      if (!edge) continue;
      const i = (y * w + x) * 4;
      out.data[i] = out.data[i + 1] = out.data[i + 2] = 255;
      out.data[i + 3] = 255;
      edges++;
    }
  }
  ctx.putImageData(out, 0, 0);
  canvas.dataset.edges = String(edges);
}

function applyOverlaySettings() {
  const heat = $("view-heat");
  heat.hidden = !$("show-heat").checked;
  heat.style.opacity = $("view-image").hidden ? "1" : $("heat-opacity").value;
  $("view-outline").hidden = !$("show-outline").checked;
}

// ---------------------------------------------------------------- history
function sortedResults() {
  const rows = [...state.results];
  if (state.sort === "newest") return rows.reverse();
  const key = (r) => (r.score === null ? -Infinity : r.score);
  rows.sort((a, b) => (state.sort === "desc" ? key(b) - key(a) : key(a) - key(b)));
  return rows;
}

function tag(verdict) {
  const span = document.createElement("span");
  span.className = `tag ${verdict.cls}`;
  span.textContent = verdict.text;
  return span;
}

function renderHistory() {
  const body = $("history").tBodies[0];
  // Rows are rebuilt; a keyboard user's focus on a row's button must survive that.
  const focused = body.contains(document.activeElement) ? document.activeElement.closest("tr").dataset.id : null;
  body.replaceChildren();
  const t = threshold();
  for (const entry of sortedResults()) {
    const row = body.insertRow();
    row.dataset.id = String(entry.id);
    if (entry.score !== null) row.dataset.score = String(entry.score);
    row.classList.toggle("selected", entry.id === state.selected);
    const thumb = row.insertCell();
    if (entry.thumb) {
      const img = document.createElement("img");
      img.src = entry.thumb;
      img.alt = "";
      thumb.append(img);
    }
    const name = row.insertCell();
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    pick.textContent = entry.name;
    pick.addEventListener("click", () => { state.selected = entry.id; renderHistory(); renderResult(); });
    name.append(pick);
    const score = row.insertCell();
    score.className = "num score";
    score.textContent = entry.error ? entry.error : fmt(entry.score);
    const model = entry.error ? { text: "ERROR", cls: "error" } : verdictOf(entry, entry.threshold);
    row.insertCell().append(tag(model));
    const whatIfCell = row.insertCell();
    whatIfCell.className = "whatif";
    if (!entry.error) {
      const whatIf = verdictOf(entry, t);
      whatIfCell.append(tag(whatIf));
      row.classList.toggle("changed", whatIf.text !== model.text);
    }
    const time = row.insertCell();
    time.className = "num";
    time.textContent = entry.elapsedMs === null ? "" : `${entry.elapsedMs.toFixed(0)} ms`;
    if (focused === row.dataset.id) pick.focus();
  }
  const scored = state.results.filter((r) => !r.error).length;
  $("history-count").textContent = `(${scored} scored, ${state.results.length - scored} refused)`;
  const order = { newest: ["none", "Score"], desc: ["descending", "Score ▼"], asc: ["ascending", "Score ▲"] }[state.sort];
  $("score-col").setAttribute("aria-sort", order[0]);
  $("sort-score").textContent = order[1];
  $("sort-score").setAttribute("aria-label", `Score, sorted ${order[0] === "none" ? "newest first" : order[0]}; activate to change`);
}

// ---------------------------------------------------------------- wiring
function wire() {
  $("message-close").addEventListener("click", clearMessage);
  $("file-input").addEventListener("change", (event) => {
    enqueue([...event.target.files]);
    event.target.value = "";  // choosing the same file again is a new check
  });
  const drop = $("drop");
  // A file dropped anywhere else must not make the browser navigate away from the page (and its history).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  drop.addEventListener("dragover", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    drop.classList.remove("over");
    const files = [...(event.dataTransfer ? event.dataTransfer.files : [])];
    if (files.length) enqueue(files); else showMessage("Nothing to check: drop image files, not text or links.");
  });
  $("whatif").addEventListener("input", (event) => setWhatIf(Number(event.target.value)));
  $("whatif-number").addEventListener("change", (event) => setWhatIf(Number(event.target.value)));
  $("whatif-reset").addEventListener("click", () => { state.whatIf = null; renderWhatIf(); });
  $("sort-score").addEventListener("click", () => {
    state.sort = { newest: "desc", desc: "asc", asc: "newest" }[state.sort];
    renderHistory();
  });
  for (const id of ["show-heat", "heat-opacity", "show-outline"]) $(id).addEventListener("input", applyOverlaySettings);
  loadModel();
}

document.addEventListener("DOMContentLoaded", wire);
