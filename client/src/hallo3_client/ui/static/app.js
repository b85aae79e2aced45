// The page of `hallo3 ui`. It talks only to its own backend (same origin), never to the API itself.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "hallo3-ui-history";
const GUARD = { "X-Hallo3-UI": "1" };
const TIMINGS = ["fetch", "validate", "prepare", "generate", "encode", "mux", "deliver"];

let config = null;
let imageFile = null;
let audioFile = null;
let recorder = null;
let job = null;          // {id, pollTimer, segmentsShown, segmentNext, fields}
let lastFields = null;

// ------------------------------------------------------------------------------- helpers

function show(el, visible) { el.hidden = !visible; }
function text(id, value) { $(id).textContent = value; }
function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${r}` : `${m}:${r}`;
}
function sizeText(bytes) { return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${Math.round(bytes / 1e3)} kB`; }

// ------------------------------------------------------------ the API's checks, in its words
// Values are read as JSON would read them; messages are the worker's own (its job schema).

function asJson(raw) {
  const t = raw.trim();
  if (!/^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/.test(t)) return { kind: "string" };
  const value = Number(t), isFloat = /[.eE]/.test(t);
  let repr = String(value);
  if (isFloat && !/[.e]/.test(repr)) repr += ".0";   // Python shows floats with a decimal point
  return { kind: "number", value, isFloat, repr };
}
function g(x) { return String(x); }   // Python's {:g} for the API's bounds

function intField(name, raw, lo, hi) {
  const v = asJson(raw);
  if (v.kind !== "number") return { error: `'${name}' must be an integer, got string.` };
  if (v.isFloat && !Number.isInteger(v.value)) return { error: `'${name}' must be an integer, got number.` };
  const n = v.isFloat && Number.isFinite(v.value) ? BigInt(v.value).toString() : v.repr;
  if (!(v.value >= lo && v.value <= hi)) return { error: `'${name}' must be between ${lo} and ${hi}, got ${n}.` };
  return { value: v.value };
}
function floatField(name, raw, lo, hi) {
  const v = asJson(raw);
  if (v.kind !== "number") return { error: `'${name}' must be a number, got string.` };
  if (!(Number.isFinite(v.value) && v.value >= lo && v.value <= hi)) {
    return { error: `'${name}' must be between ${g(lo)} and ${g(hi)}, got ${v.repr}.` };
  }
  return { value: v.value };
}

function readFields() {
  const f = config.fields, fields = {}, errors = [];
  const check = (id, result, key) => {
    $(id).classList.toggle("invalid", Boolean(result.error));
    if (result.error) errors.push(result.error); else fields[key] = result.value;
  };
  const prompt = $("prompt").value.trim();
  $("prompt").classList.remove("invalid");
  if (prompt.length > f.prompt.max_chars) {
    $("prompt").classList.add("invalid");
    errors.push(`'prompt' is longer than ${f.prompt.max_chars} characters.`);
  } else if (prompt) fields.prompt = prompt;          // empty: left out, so the API's default applies
  for (const [id, kind] of [["seed", "int"], ["steps", "int"], ["guidance", "float"]]) {
    const raw = $(id).value;
    $(id).classList.remove("invalid");
    if (!raw.trim()) continue;                          // empty: the API's default (a random seed)
    const r = kind === "int" ? intField(id, raw, f[id].min, f[id].max) : floatField(id, raw, f[id].min, f[id].max);
    check(id, r, id);
  }
  fields.preset = $("preset").value;
  fields.framing = $("framing").value;
  fields.separate_vocals = $("separate-vocals").checked;
  if (!imageFile) errors.push("Choose a portrait image.");
  if (!audioFile) errors.push("Choose an audio file or record one.");
  return { fields, errors };
}

function showErrors(errors) {
  const list = $("form-errors");
  list.replaceChildren(...errors.map((e) => Object.assign(document.createElement("li"), { textContent: e })));
  show(list, errors.length > 0);
}

// -------------------------------------------------------------------------------- inputs

function setImage(file) {
  if (!file) return;
  imageFile = file;
  const preview = $("image-preview");
  preview.src = URL.createObjectURL(file);
  show(preview, true);
  $("image-hint").innerHTML = `${file.name}<br><small>drop or click to change</small>`;
}
function setAudio(file, label) {
  audioFile = file;
  const preview = $("audio-preview");
  preview.src = URL.createObjectURL(file);
  show(preview, true);
  text("audio-name", label || file.name);
}

function wireInputs() {
  const drop = $("image-drop");
  $("image-input").addEventListener("change", (e) => setImage(e.target.files[0]));
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); setImage(e.dataTransfer.files[0]); });
  $("audio-input").addEventListener("change", (e) => { if (e.target.files[0]) setAudio(e.target.files[0]); });
  $("record-button").addEventListener("click", toggleRecording);
}

async function toggleRecording() {
  const button = $("record-button");
  if (recorder) { recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    showErrors([`The microphone is not available: ${err.message || err.name}`]);
    return;
  }
  const type = MediaRecorder.isTypeSupported("audio/webm;codecs=opus") ? "audio/webm;codecs=opus" : "";
  const chunks = [], started = performance.now();
  recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    const seconds = (performance.now() - started) / 1000;
    const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    setAudio(new File([blob], "recording.webm", { type: blob.type }), `recording (${seconds.toFixed(1)} s)`);
    recorder = null;
    button.textContent = "● Record";
    button.classList.remove("recording");
  };
  recorder.start(250);
  button.textContent = "■ Stop";
  button.classList.add("recording");
  text("audio-name", "recording…");
}

// ---------------------------------------------------------------------------------- jobs

async function submit(fields) {
  showErrors([]);
  show($("job-error"), false);
  const body = new FormData();
  body.append("image", imageFile, imageFile.name || "image");
  body.append("audio", audioFile, audioFile.name || "audio");
  body.append("fields", JSON.stringify(fields));
  $("run-button").disabled = true;
  resetJobView();
  text("job-status", "uploading");
  show($("job-panel"), true);
  let answer;
  try {
    const response = await fetch("api/jobs", { method: "POST", body, headers: GUARD });
    answer = await response.json();
  } catch (err) {
    answer = { error: `The hallo3 ui process did not answer: ${err.message}` };
  }
  if (answer.error) { failed(answer.error); return; }
  lastFields = fields;
  job = { id: answer.id, segmentsShown: 0, segmentNext: 0, fields };
  text("job-id", `job ${answer.id}`);
  show($("cancel-button"), true);
  poll();
}

function resetJobView() {
  show($("idle-note"), false);
  show($("result"), false);
  show($("segments"), false);
  show($("cancel-message"), false);
  $("segment-list").replaceChildren();
  $("segment-player").removeAttribute("src");
  $("job-bar").style.width = "0";
  for (const id of ["job-segment", "job-elapsed", "job-left", "job-id"]) text(id, "");
}

function failed(message, code) {
  text("job-error", code ? `${message} (${code})` : message);
  show($("job-error"), true);
  show($("job-panel"), false);
  show($("cancel-button"), false);
  $("run-button").disabled = false;
}

async function poll() {
  if (!job) return;
  let view;
  try {
    const response = await fetch(`api/jobs/${encodeURIComponent(job.id)}`);
    view = await response.json();
  } catch (err) {
    job.pollTimer = setTimeout(poll, 2000);
    return;
  }
  if (view.error && !view.id) { failed(view.error); job = null; return; }
  renderProgress(view);
  renderSegments(view);
  if (view.cancel_message) { text("cancel-message", view.cancel_message); show($("cancel-message"), true); }
  if (!view.done) { job.pollTimer = setTimeout(poll, 1000); return; }
  show($("cancel-button"), false);
  $("run-button").disabled = false;
  if (view.result) {
    const entry = historyEntry(view, job.fields);
    saveHistory(entry);
    renderResult(entry, view.video);
  } else {
    failed(view.error || `The job ended with status ${view.status}.`, view.error_code);
  }
  job = null;
}

function renderProgress(view) {
  const p = view.progress;
  const fraction = view.result ? 1 : (p.fraction || 0);
  $("job-bar").style.width = `${Math.round(fraction * 100)}%`;
  text("job-status", view.done ? view.status.toLowerCase() : p.label);
  text("job-segment", p.segment && !view.done ? `segment ${p.segment}/${p.num_segments}` : "");
  text("job-elapsed", `elapsed ${duration(p.elapsed_s)}`);
  text("job-left", p.left_s != null && !view.done ? `about ${duration(p.left_s)} left` : "");
}

function renderSegments(view) {
  const count = view.segments_saved || 0;
  if (!count) return;
  show($("segments"), true);
  const list = $("segment-list");
  for (let i = job.segmentsShown; i < count; i++) {
    const item = document.createElement("li");
    item.textContent = `segment ${i + 1} ready`;
    list.appendChild(item);
  }
  job.segmentsShown = count;
  const player = $("segment-player");
  if ((!player.getAttribute("src") || player.ended) && job.segmentNext < count) playSegment(job.id, count);
}

function playSegment(jobId, count) {
  const player = $("segment-player");
  const index = job.segmentNext++;
  player.src = `api/jobs/${encodeURIComponent(jobId)}/segments/${index}`;
  player.dataset.index = String(index);
  player.onended = () => { if (job && job.segmentNext < job.segmentsShown) playSegment(jobId, job.segmentsShown); };
  player.play().catch(() => {});
}

// -------------------------------------------------------------------------------- result

function historyEntry(view, fields) {
  const r = view.result;
  return { id: view.id, at: Date.now(), seed: r.seed, duration_s: r.duration_s, width: r.width, height: r.height,
           frames: r.frames, size_bytes: r.size_bytes, timings: r.timings || {}, warnings: r.warnings || [],
           prompt: (fields && fields.prompt) || config.fields.prompt.default,
           video_url: r.video_url || null, video_expires_at: r.video_expires_at || null };
}

function renderResult(entry, videoSrc) {
  show($("idle-note"), false);
  show($("result"), true);
  const video = $("result-video");
  video.src = videoSrc;
  video.dataset.jobId = entry.id;
  const download = $("download-link");
  download.href = `${videoSrc}?download=1`;
  download.setAttribute("download", `${entry.id}.mp4`);
  text("result-seed", String(entry.seed));
  const details = [];
  if (entry.width) details.push(`${entry.width}×${entry.height}`);
  if (entry.frames) details.push(`${entry.frames} frames`);
  if (entry.duration_s != null) details.push(`${entry.duration_s.toFixed(2)} s`);
  if (entry.size_bytes) details.push(sizeText(entry.size_bytes));
  details.push(`job ${entry.id}`);
  text("result-details", details.join(" · "));
  renderTimings(entry.timings);
  const warnings = $("result-warnings");
  warnings.replaceChildren(...entry.warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
}

function renderTimings(timings) {
  const chart = $("timings-chart");
  const shown = TIMINGS.filter((k) => typeof timings[k] === "number");
  const most = Math.max(0.001, ...shown.map((k) => timings[k]));
  const cells = [];
  for (const k of shown) {
    const fill = Object.assign(document.createElement("div"), { className: "fill" });
    fill.style.width = `${(100 * timings[k]) / most}%`;
    const bar = document.createElement("div");
    bar.appendChild(fill);
    cells.push(Object.assign(document.createElement("span"), { textContent: k }), bar,
               Object.assign(document.createElement("span"), { textContent: `${timings[k].toFixed(2)} s` }));
  }
  if (typeof timings.total === "number") {
    cells.push(Object.assign(document.createElement("b"), { textContent: "total" }), document.createElement("span"),
               Object.assign(document.createElement("b"), { textContent: `${timings.total.toFixed(2)} s` }));
  }
  chart.replaceChildren(...cells);
}

// ------------------------------------------------------------------------------- history

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"); } catch (err) { return []; }
}
function saveHistory(entry) {
  const entries = [entry, ...loadHistory().filter((e) => e.id !== entry.id)].slice(0, 30);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(entries));
  renderHistory();
}
function renderHistory() {
  const entries = loadHistory(), list = $("history");
  if (!entries.length) { list.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "none yet" })); return; }
  list.replaceChildren(...entries.map((e) => {
    const item = document.createElement("li");
    item.dataset.id = e.id;
    const open = Object.assign(document.createElement("button"), { type: "button", className: "secondary", textContent: "Open" });
    open.addEventListener("click", () => reopen(e));
    const about = `${new Date(e.at).toLocaleString()} · seed ${e.seed} · ${e.duration_s != null ? e.duration_s.toFixed(2) + " s" : ""} · “${e.prompt}”`;
    item.append(open, Object.assign(document.createElement("span"), { textContent: about }));
    return item;
  }));
}

async function reopen(entry) {
  const note = $("history-note");
  show(note, false);
  const src = `api/jobs/${encodeURIComponent(entry.id)}/video`;
  let held = (await fetch(src, { method: "HEAD" })).ok;
  if (!held && entry.video_url) {
    if (entry.video_expires_at && entry.video_expires_at * 1000 < Date.now()) {
      text("history-note", `The result's URL expired on ${new Date(entry.video_expires_at * 1000).toLocaleString()}; this video can no longer be opened.`);
      show(note, true);
      return;
    }
    const answer = await (await fetch(`api/jobs/${encodeURIComponent(entry.id)}/fetch`,
      { method: "POST", headers: { ...GUARD, "Content-Type": "application/json" }, body: JSON.stringify({ url: entry.video_url }) })).json();
    if (answer.error) { text("history-note", answer.error); show(note, true); return; }
    held = true;
  }
  if (!held) {
    text("history-note", "This video was returned inline and kept only by the hallo3 ui run that made it; it is no longer available.");
    show(note, true);
    return;
  }
  show($("job-panel"), false);
  show($("job-error"), false);
  show($("segments"), false);
  renderResult(entry, src);
}

// ---------------------------------------------------------------------------------- start

async function start() {
  config = await (await fetch("api/config")).json();
  const f = config.fields;
  text("target", `Jobs go to ${config.target}` + (config.upload ? `; files are uploaded to ${config.upload}` : `; files are sent inline (at most ${config.max_body_bytes / 1e6} MB per request)`));
  $("prompt").value = f.prompt.default;
  $("prompt").placeholder = f.prompt.default;
  $("steps").value = String(f.steps.default);
  $("guidance").value = String(f.guidance.default);
  $("separate-vocals").checked = f.separate_vocals.default;
  for (const id of ["preset", "framing"]) {
    $(id).replaceChildren(...f[id].choices.map((c) => Object.assign(document.createElement("option"), { value: c, textContent: c })));
    $(id).value = f[id].default;
  }
  wireInputs();
  $("run-button").addEventListener("click", () => {
    const { fields, errors } = readFields();
    showErrors(errors);
    if (!errors.length) submit(fields);
  });
  $("cancel-button").addEventListener("click", async () => {
    if (!job) return;
    const answer = await (await fetch(`api/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST", headers: GUARD })).json();
    text("cancel-message", answer.message || answer.error);
    show($("cancel-message"), true);
  });
  $("rerun-button").addEventListener("click", () => {
    $("seed").value = $("result-seed").textContent;
    const { fields, errors } = readFields();
    showErrors(errors);
    if (!errors.length) submit(fields);
  });
  renderHistory();
  document.body.dataset.ready = "1";
}

start();
