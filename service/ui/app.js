// fsar's page: register support sets, classify a clip, and show why (scores, heat map, alignment).
// Same origin only; the API key (when the gateway needs one) lives in this tab's sessionStorage.
"use strict";

const KEY_STORAGE = "fsar.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = { clips: [], query: null, sets: [], lastResult: null, explainedIndex: 0 };

// ---------------------------------------------------------------- HTTP
function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, { method, body, headers, credentials: "omit", cache: "no-store" });
  if (response.status === 401) {
    askForKey(apiKey() ? "That key was refused. Enter a valid key." : null);
    throw new Error("This gateway needs an API key.");
  }
  if (response.status === 204) return null;
  let payload = null;
  try { payload = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = payload && payload.error ? `${payload.error.message} (${payload.error.code})` : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return payload;
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

function askForKey(message) {
  const dialog = $("key-dialog");
  if (message) dialog.querySelector("p").textContent = message;
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

// ---------------------------------------------------------------- helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value; else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function jpeg(base64) { return `data:image/jpeg;base64,${base64}`; }

function thumbStrip(thumbnails) {
  const strip = el("span", { class: "thumbs" });
  for (const t of thumbnails) strip.append(el("img", { src: jpeg(t), alt: "sampled frame", width: "40", height: "40" }));
  return strip;
}

async function thumbnailsOf(file) {
  const form = new FormData();
  form.append("video", file, file.name);
  return (await api("POST", "/thumbnails", form)).thumbnails;
}

function guessLabel(name) {
  return name.replace(/\.[^.]+$/, "").replace(/[_-]+\d*$/, "").replace(/[_-]+/g, " ").trim();
}

// ---------------------------------------------------------------- model card and sets
async function loadModel() {
  const card = await api("GET", "/model");
  $("model-line").textContent = `${card.description} · ${card.num_frames} frames per clip · metric ${card.metric} · backend ${card.backend}`;
}

async function loadSets() {
  const { support_sets: sets } = await api("GET", "/support-sets");
  state.sets = sets;
  const list = $("set-list");
  const select = $("set-select");
  const chosen = select.value;
  list.replaceChildren();
  select.replaceChildren();
  for (const set of sets) {
    const classes = set.classes.map((c) => `${c.label} (${c.shots})`).join(", ");
    const remove = el("button", { type: "button", class: "secondary small", "data-set": set.id, text: "Delete" });
    remove.addEventListener("click", () => deleteSet(set.id).catch(showError));
    list.append(el("li", { "data-set": set.id },
      el("strong", { text: set.name || set.id.slice(0, 8) }), " ", el("span", { class: "muted", text: classes }), " ", remove));
    select.append(el("option", { value: set.id, text: `${set.name || set.id.slice(0, 8)} — ${set.classes.length} classes` }));
  }
  if (sets.some((s) => s.id === chosen)) select.value = chosen;
  $("no-sets").hidden = sets.length > 0;
  updateButtons();
}

async function deleteSet(id) {
  await api("DELETE", `/support-sets/${encodeURIComponent(id)}`);
  await loadSets();
}

function addSupportFiles(files) {
  for (const file of files) {
    const clip = { file, label: guessLabel(file.name), thumbnails: null };
    state.clips.push(clip);
    const labelInput = el("input", { type: "text", value: clip.label, "aria-label": `label of ${file.name}`, class: "clip-label" });
    labelInput.addEventListener("input", () => { clip.label = labelInput.value; updateButtons(); });
    const remove = el("button", { type: "button", class: "secondary small", text: "×", "aria-label": "remove" });
    const thumbs = el("span", { class: "thumbs muted", text: "sampling frames…" });
    const row = el("li", {}, el("span", { class: "file", text: file.name }), labelInput, thumbs, remove);
    remove.addEventListener("click", () => { state.clips = state.clips.filter((c) => c !== clip); row.remove(); updateButtons(); });
    $("clip-list").append(row);
    thumbnailsOf(file).then((t) => { clip.thumbnails = t; thumbs.replaceWith(thumbStrip(t)); })
      .catch((err) => { thumbs.textContent = `cannot read: ${err.message}`; thumbs.classList.add("error-text"); });
  }
  updateButtons();
}

async function register() {
  const form = new FormData();
  for (const clip of state.clips) {
    form.append("videos", clip.file, clip.file.name);
    form.append("labels", clip.label.trim());
  }
  if ($("set-name").value.trim()) form.append("name", $("set-name").value.trim());
  $("register-status").textContent = "registering…";
  try {
    const created = await api("POST", "/support-sets", form);
    $("register-status").textContent = `registered ${created.num_videos} clips in ${created.classes.length} classes`;
    state.clips = [];
    $("clip-list").replaceChildren();
    $("set-name").value = "";
    await loadSets();
    $("set-select").value = created.id;
  } catch (err) { $("register-status").textContent = ""; throw err; }
  finally { updateButtons(); }
}

// ---------------------------------------------------------------- classify
function mode() { return document.querySelector("input[name=mode]:checked").value; }

function updateButtons() {
  const m = mode();
  $("set-choice").hidden = m === "zero-shot";
  $("labels-choice").hidden = m === "few-shot";
  const labels = $("labels").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const ready = state.query && (m === "zero-shot" || $("set-select").value) && (m === "few-shot" || labels.length);
  $("classify").disabled = !ready;
  $("register").disabled = !state.clips.length || state.clips.some((c) => !c.label.trim());
}

async function classify() {
  const form = new FormData();
  form.append("video", state.query, state.query.name);
  const m = mode();
  if (m !== "zero-shot") form.append("support_set_id", $("set-select").value);
  if (m !== "few-shot") for (const label of $("labels").value.split("\n").map((s) => s.trim()).filter(Boolean)) form.append("labels", label);
  if ($("explain").checked) form.append("explain", "true");
  $("classify-status").textContent = "classifying…";
  try {
    const result = await api("POST", "/classify", form);
    $("classify-status").textContent = `${result.mode} · ${result.num_candidates} candidates · ${Math.round(result.timings_ms.decode + result.timings_ms.encode + result.timings_ms.match)} ms`;
    renderResult(result);
  } catch (err) { $("classify-status").textContent = ""; throw err; }
}

// ---------------------------------------------------------------- results
function renderResult(result) {
  state.lastResult = result;
  state.explainedIndex = 0;
  $("result-section").hidden = false;
  const top = result.predictions[0];
  const verdict = $("verdict");
  if (result.unknown === true) {
    verdict.textContent = "None of these: the clip matches no candidate well enough";
    verdict.className = "verdict unknown";
  } else {
    verdict.textContent = top ? `Looks like: ${top.label}` : "No prediction";
    verdict.className = "verdict";
  }
  if (typeof result.open_set_score === "number") verdict.append(el("span", { class: "muted", text: ` (open-set score ${result.open_set_score.toFixed(3)})` }));
  renderScores($("scores"), result.predictions);
  renderTimeline(result.segments, result.events);
  renderExplanation(result.explanation);
}

function renderScores(list, predictions) {
  list.replaceChildren();
  for (const p of predictions) {
    const bar = el("span", { class: `bar ${p.source}` });
    bar.style.width = `${Math.max(0.5, p.score * 100).toFixed(1)}%`;
    list.append(el("li", { class: "score", "data-label": p.label },
      el("span", { class: "score-label", text: p.label }),
      el("span", { class: "bar-track" }, bar),
      el("span", { class: "score-value", text: `${(p.score * 100).toFixed(1)}%` }),
      el("span", { class: "muted source", text: p.source })));
  }
}

function renderTimeline(segments, events) {
  const box = $("timeline");
  if (!Array.isArray(segments) || !segments.length) { box.hidden = true; return; }
  box.hidden = false;
  const area = $("timeline-svg");
  area.replaceChildren();
  const end = Math.max(...segments.map((s) => s.end_s), 1e-6);
  const width = 800, height = 48;
  area.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const labels = [...new Set(segments.map((s) => (s.unknown ? "unknown" : (s.predictions[0] || {}).label)))];
  segments.forEach((s) => {
    const label = s.unknown ? "unknown" : (s.predictions[0] || {}).label;
    const x = (s.start_s / end) * width, w = Math.max(1, ((s.end_s - s.start_s) / end) * width);
    const rect = svg("rect", { x, y: 4, width: w, height: 28, class: "segment", fill: s.unknown ? "#bbb" : palette(labels.indexOf(label)) });
    const title = svg("title");
    title.textContent = `${s.start_s.toFixed(1)}–${s.end_s.toFixed(1)} s: ${label}`;
    rect.append(title);
    area.append(rect);
  });
  const axis = svg("text", { x: width - 4, y: 46, "text-anchor": "end", class: "axis" });
  axis.textContent = `${end.toFixed(1)} s`;
  area.append(axis);
  const list = $("events");
  list.replaceChildren();
  for (const e of events || []) list.append(el("li", { text: `${e.start_s.toFixed(1)}–${e.end_s.toFixed(1)} s: ${e.label} (${(e.score * 100).toFixed(0)}%)` }));
}

function palette(i) { return ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"][i % 7]; }

function renderExplanation(explanation) {
  const box = $("explanation");
  if (!explanation) { box.hidden = true; return; }
  box.hidden = false;
  const tabs = $("class-tabs");
  tabs.replaceChildren();
  explanation.classes.forEach((c, i) => {
    const tab = el("button", { type: "button", class: i === state.explainedIndex ? "tab active" : "tab", text: `${c.label} ${(c.score * 100).toFixed(1)}%` });
    tab.addEventListener("click", () => { state.explainedIndex = i; renderExplanation(explanation); });
    tabs.append(tab);
  });
  const note = {
    otam_path: "OTAM aligns frames in order; its path (hard-min backtrace) is drawn over the similarities.",
    nearest_frames: "Bi-MHM matches each frame with its nearest frame, both ways.",
    none: `The ${explanation.metric} metric does not align frames; the similarities alone are shown.`,
  }[explanation.alignment];
  $("explain-note").textContent = explanation.classes.length
    ? `${note} Rows: the query's sampled frames; columns: the prototype's frames.`
    : "No support class to align with (zero-shot): the frames the model sampled are shown.";
  drawHeatmap($("heatmap"), explanation, explanation.classes[state.explainedIndex]);
}

function heatColour(value, low, high) {
  const t = high > low ? Math.min(1, Math.max(0, (value - low) / (high - low))) : 0.5;
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawHeatmap(area, explanation, entry) {
  area.replaceChildren();
  const T = explanation.num_frames, thumbs = explanation.query_thumbnails;
  const cell = 56, margin = thumbs.length ? cell + 8 : 36, top = 44;
  const size = T * cell;
  const width = Math.max(margin + size + 8, 360);
  area.setAttribute("viewBox", `0 0 ${width} ${top + size + 8}`);
  area.setAttribute("width", width);
  area.setAttribute("height", top + size + 8);
  const heading = svg("text", { x: margin, y: 14, class: "axis axis-title" });
  heading.textContent = entry ? `prototype "${entry.label}" frames →` : "query frames ↓";
  area.append(heading);
  for (let j = 0; j < T; j++) {
    const label = svg("text", { x: margin + j * cell + cell / 2, y: top - 8, "text-anchor": "middle", class: "axis" });
    label.textContent = `p${j}`;
    area.append(label);
  }
  for (let i = 0; i < T; i++) {
    if (thumbs[i]) area.append(svg("image", { href: jpeg(thumbs[i]), x: 0, y: top + i * cell + 2, width: cell - 4, height: cell - 4, class: "query-thumb" }));
    else { const l = svg("text", { x: margin - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end", class: "axis" }); l.textContent = `q${i}`; area.append(l); }
  }
  if (!entry) return;
  const values = entry.similarity.flat();
  const low = Math.min(...values), high = Math.max(...values);
  const cells = svg("g", { class: "cells" });
  entry.similarity.forEach((row, i) => row.forEach((v, j) => {
    const rect = svg("rect", { x: margin + j * cell, y: top + i * cell, width: cell, height: cell, fill: heatColour(v, low, high), class: "cell" });
    const title = svg("title");
    title.textContent = `query frame ${i} · prototype frame ${j}: cos ${v.toFixed(3)}`;
    rect.append(title);
    cells.append(rect);
  }));
  area.append(cells);
  const centre = ([i, j]) => `${margin + j * cell + cell / 2},${top + i * cell + cell / 2}`;
  const drawPath = (pairs, kind) => {
    if (!pairs.length) return;
    const group = svg("g", { class: `path ${kind}`, "data-pairs": pairs.length });
    if (explanation.alignment === "otam_path") group.append(svg("polyline", { points: pairs.map(centre).join(" "), class: "path-line" }));
    for (const p of pairs) {
      const [x, y] = centre(p).split(",").map(Number);
      group.append(svg("circle", { cx: x, cy: y, r: kind === "forward" ? 7 : 4, class: "path-dot" }));
    }
    area.append(group);
  };
  drawPath(entry.query_to_prototype, "forward");
  drawPath(entry.prototype_to_query, "backward");
}

// ---------------------------------------------------------------- wiring
function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const files = [...e.dataTransfer.files].filter((f) => f.size > 0);
    if (files.length) onFiles(files);
  });
}

function setQuery(files) {
  state.query = files[0];
  $("query-name").textContent = state.query.name;
  updateButtons();
}

function guarded(fn) { return () => { showError(null); fn().catch(showError); }; }

async function start() {
  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    guarded(refresh)();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); $("key-dialog").close(); });
  $("key-button").addEventListener("click", () => askForKey(null));
  dropZone($("support-drop"), addSupportFiles);
  dropZone($("query-drop"), setQuery);
  $("support-files").addEventListener("change", (e) => { addSupportFiles([...e.target.files]); e.target.value = ""; });
  $("query-file").addEventListener("change", (e) => { if (e.target.files.length) setQuery([...e.target.files]); });
  for (const input of document.querySelectorAll("input[name=mode]")) input.addEventListener("change", updateButtons);
  $("labels").addEventListener("input", updateButtons);
  $("set-select").addEventListener("change", updateButtons);
  $("register").addEventListener("click", guarded(register));
  $("classify").addEventListener("click", guarded(classify));
  updateButtons();
  await refresh();
}

async function refresh() {
  await loadModel();
  await loadSets();
}

document.addEventListener("DOMContentLoaded", () => { start().catch(showError); });
