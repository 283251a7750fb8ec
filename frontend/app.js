// CalSeg page: token sign-in, jobs dashboard (polled), upload, job forms generated from the
// parameter schemas, job detail (training curves, viewer, dF/F trace, metrics, downloads),
// model comparison. Vanilla JS, no build step, no CDN.
//
// Every request sends `Authorization: Bearer <token>`; images and downloads are fetched with
// that header and shown through blob: URLs (an <img src> or <a href> cannot send a header).
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "calseg.token";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const GAP_PX = 4; // white columns between the panels of a side-by-side frame (api/frames.py)
const $ = (id) => document.getElementById(id);

const S = {
  token: null,
  linkedToken: null, // a token from a #token= link, waiting for the user's yes (login CSRF)
  me: null,
  kinds: null, // {kind: JSON schema}
  selectedId: null,
  selectedJob: null,
  jobsCache: [],
  recordings: [],
  datasets: [], // succeeded simulate jobs (the form's dataset picker)
  models: [], // GET /api/models (the form's model picker)
  pollTimer: null,
};

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function detailText(body, fallback) {
  if (!body) return fallback;
  const d = body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  return fallback;
}

function authHeaders(extra = {}) {
  return S.token ? { ...extra, Authorization: `Bearer ${S.token}` } : extra;
}

// fetch with the token; JSON body parsed; errors thrown as ApiError (401 shows the sign-in)
async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (r.status === 401) signedOut("the server refused the token (401): sign in again");
  if (!r.ok) throw new ApiError(r.status, detailText(body, `${r.status} ${r.statusText}`), body);
  return body;
}

// fetch a binary resource with the token: {blob, headers}
async function apiBlob(path, tries = 4) {
  const r = await fetch(path, { headers: authHeaders() });
  if ((r.status === 429 || r.status === 503) && tries > 1) {
    // the server decodes a few frames at once (per user and in all): wait as it says, retry
    const wait = Math.min(Number(r.headers.get("Retry-After")) || 1, 5);
    await new Promise((done) => setTimeout(done, 1000 * wait));
    return apiBlob(path, tries - 1);
  }
  if (r.status === 401) signedOut("the server refused the token (401): sign in again");
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    throw new ApiError(r.status, detailText(body, `${r.status} ${r.statusText}`), body);
  }
  return { blob: await r.blob(), headers: r.headers };
}

function fmtEta(s) {
  if (s === null || s === undefined) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function fmtDate(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return `${d.toLocaleDateString(undefined, { day: "numeric", month: "short" })} ${d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })}`;
}

const plural = (n, word, many = `${word}s`) => `${n} ${n === 1 ? word : many}`;

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

function fmtNum(v) {
  if (v === null || v === undefined) return "–";
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : Number(v.toPrecision(4)).toString();
}

const short = (id) => (id ? String(id).slice(0, 8) : "");

// ------------------------------------------------------------------ sign-in

function tokenFromHash() {
  // #token=<t> (optionally with &job=<id>): take the token out of the address bar and return it
  // (or null). It is NOT stored here: a link must not silently replace the signed-in account
  // (login CSRF); useLinkedToken decides.
  const h = location.hash.replace(/^#/, "");
  if (!h.includes("token=")) return null;
  const q = new URLSearchParams(h);
  const t = (q.get("token") || "").trim();
  q.delete("token");
  const rest = q.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  return t || null;
}

async function useLinkedToken(token) {
  // a token from a link: sign in with it when nobody is signed in; otherwise ask first,
  // naming both accounts (whose token the link carries is asked of the server with it)
  if (!token || token === S.token) return;
  if (!S.token) { await signIn(token); return; }
  let who = "an account this server does not know (the token is refused)";
  try {
    const r = await fetch("/api/me", { headers: { Authorization: `Bearer ${token}` } });
    if (r.ok) {
      const me = await r.json();
      who = me.name + (me.is_admin ? " (admin)" : "");
    }
  } catch (_) { who = "an account that cannot be checked now (service unreachable)"; }
  S.linkedToken = token;
  $("switch-new").textContent = who;
  $("switch-current").textContent = S.me ? S.me.name + (S.me.is_admin ? " (admin)" : "") : "?";
  $("switch-account").hidden = false;
  $("switch-no").focus();
}

function closeSwitch() {
  S.linkedToken = null;
  $("switch-account").hidden = true;
}

function signedOut(message) {
  if (S.pollTimer) clearInterval(S.pollTimer);
  S.pollTimer = null;
  S.token = null;
  S.me = null;
  $("storage-used").textContent = ""; // the next person's is fetched when they sign in
  storageCheckedAt = 0;
  closeSwitch();
  localStorage.removeItem(TOKEN_KEY);
  closeDetail(); // the next person to sign in must not see this one's job
  $("app").hidden = true;
  $("user-box").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("token-input").value = "";
  $("token-input").focus();
}

async function signIn(token) {
  S.token = token;
  try {
    const r = await fetch("/api/me", { headers: authHeaders() });
    if (r.status === 401 || r.status === 403) {
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      // for people, not programmers (the server's text names the Authorization header)
      signedOut("this token is not valid (mistyped, revoked or expired): open the address "
        + "with #token=… that the server printed at start again, or ask its administrator "
        + `for a new token (server: ${detailText(body, r.statusText)})`);
      return false;
    }
    if (!r.ok && r.status !== 404) { // e.g. 429 after too many bad tokens: say so, stay out
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      S.token = null;
      $("signin").hidden = false;
      $("signin-error").textContent = `cannot sign in (${r.status}): ${detailText(body, r.statusText)}`;
      return false;
    }
    S.me = r.ok ? await r.json() : { name: "(this server has no users)", is_admin: false };
  } catch (e) {
    $("signin").hidden = false;
    $("signin-error").textContent = `service unreachable: ${e.message}`;
    return false;
  }
  localStorage.setItem(TOKEN_KEY, token);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("user-box").hidden = false;
  $("user-name").textContent = S.me.name + (S.me.is_admin ? " (admin)" : "");
  startApp();
  return true;
}

// ------------------------------------------------------------------ dashboard

// what a button of the jobs table did, kept until the next action (the table's refresh line
// beside it is rewritten every 2 s: an error written there vanished at once)
function jobsActionSays(text) {
  $("jobs-action").textContent = text;
}

async function jobAction(job, verb) {
  jobsActionSays("");
  try {
    const out = await api(`/api/jobs/${job.id}/${verb}`, { method: "POST" });
    if (verb === "rerun") selectJob(out.id);
  } catch (e) {
    jobsActionSays(`${verb} of ${job.kind} job ${short(job.id)} failed: ${e.message}`);
  }
  refreshJobs();
}

// delete an ended job with its results and files (DELETE /api/jobs/ID), after a confirmation
async function deleteJob(job) {
  jobsActionSays("");
  if (!window.confirm(`Delete the ${job.kind} job ${short(job.id)} with its results and files? ` +
                      "This cannot be undone.")) return;
  try {
    await api(`/api/jobs/${job.id}`, { method: "DELETE" });
    jobsActionSays(`deleted ${job.kind} job ${short(job.id)}`);
    refreshStorage(true);
    if (S.selectedId === job.id) {
      if (location.hash === `#job=${job.id}`) history.replaceState(null, "", location.pathname + location.search);
      closeDetail();
      return;
    }
  } catch (e) {
    jobsActionSays(`delete of ${job.kind} job ${short(job.id)} failed: ${e.message}`);
  }
  refreshJobs();
}

function progressBar(job) {
  const pct = Math.round((job.progress || 0) * 100);
  return el("span", { class: "progress-cell" },
    el("progress", { max: "100", value: String(pct), "aria-label": `${job.kind} job ${short(job.id)} progress` }),
    ` ${pct}%`);
}

function ownerName(job) {
  if (job.owner_name) return job.owner_name;
  if (job.owner && typeof job.owner === "object") return job.owner.name || "";
  if (!job.owner_id) return "";
  return S.me && S.me.id === job.owner_id ? S.me.name : `user ${short(job.owner_id)}`;
}

// What a job is, in words: method · recording · model for infer jobs (so two can be told
// apart), the dataset's size for simulate, steps and dataset for finetune, the models compared.
function recordingName(id) {
  const r = S.recordings.find((x) => x.id === id);
  return r ? r.filename : `recording ${short(id)}`;
}

function datasetName(id) {
  const d = S.datasets.find((x) => x.id === id) || S.jobsCache.find((x) => x.id === id);
  const p = (d && d.params) || {};
  if (p.n_videos === undefined) return `dataset ${short(id)}`;
  return `dataset ${short(id)} (${p.n_videos} × ${p.n_frames} frames, ${p.height}×${p.width})`;
}

function modelName(id) {
  const m = S.models.find((x) => x.job_id === id);
  const steps = m && m.params && m.params.steps ? `, ${m.params.steps} steps` : "";
  return `model of finetune ${short(id)}${steps}`;
}

// what a fine-tune job's model is: "SAM2 fine-tuned", or "SAM2 base, kept" when no training
// step improved on the initial model (the API's label); "SAM2 model" before the list is loaded
function modelLabel(id) {
  const m = S.models.find((x) => x.job_id === id);
  return (m && m.label) || "SAM2 model";
}

// parameters the "What" column names by what they are, not as changed settings
const WHAT_SHOWN = new Set(["recording_id", "dataset_job_id", "video_id", "model_job_id", "method", "target"]);

function changedParams(job) {
  // "threshold_k 3" for each stored parameter that differs from its schema default: two jobs
  // on one recording with different settings must not look the same in the jobs table
  const schema = (S.kinds || {})[job.kind];
  if (!schema) return [];
  const out = [];
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    if (WHAT_SHOWN.has(name) || !(name in (job.params || {}))) continue;
    const p = resolve(schema, raw);
    if (!("default" in p)) continue;
    const v = job.params[name];
    if (JSON.stringify(v) !== JSON.stringify(p.default)) out.push(`${name} ${Array.isArray(v) ? v.join(",") : v}`);
  }
  return out;
}

function jobWhat(job) {
  const p = job.params || {};
  const r = job.result || {};
  if (job.kind === "infer") {
    const method = r.model_label || (p.model_job_id ? modelLabel(p.model_job_id) : p.method === "auto" ? "auto" : p.method);
    const source = r.recording_name || (p.recording_id ? recordingName(p.recording_id)
      : `${p.video_id} of ${datasetName(p.dataset_job_id)}`);
    const bits = [method, source];
    if (p.model_job_id) bits.push(modelName(p.model_job_id));
    if (p.target === "cells") bits.push("all cells on a projection");
    const changed = changedParams(job);
    if (changed.length) bits.push(changed.length > 3 ? `${changed.slice(0, 3).join(", ")} +${changed.length - 3} more` : changed.join(", "));
    return bits.join(" · ");
  }
  const has = (...keys) => keys.every((k) => p[k] !== undefined && p[k] !== null);
  if (job.kind === "simulate") {
    return [has("n_videos", "n_frames") ? `${p.n_videos} videos × ${p.n_frames} frames` : null,
      has("height", "width") ? `${p.height}×${p.width} px` : null,
      p.pattern_classes ? p.pattern_classes.join(", ") : null,
      p.recording_id ? `like ${recordingName(p.recording_id)}` : null].filter(Boolean).join(" · ");
  }
  if (job.kind === "finetune") {
    return [has("steps") ? `${p.steps} steps` : null, p.train_mode || null,
      p.dataset_job_id ? datasetName(p.dataset_job_id) : null].filter(Boolean).join(" · ");
  }
  if (job.kind === "evaluate") {
    const models = [p.model_job_id ? `${modelLabel(p.model_job_id)} (${modelName(p.model_job_id)})` : null, "SAM2 untuned", "classical"];
    return [models.filter(Boolean).join(" vs "), p.split ? `${p.split} split` : null,
      p.dataset_job_id ? datasetName(p.dataset_job_id) : null].filter(Boolean).join(" · ");
  }
  return "";
}

function jobRow(job) {
  const actions = el("td", {},
    el("button", { type: "button", onclick: (ev) => { ev.stopPropagation(); selectJob(job.id); },
                   "aria-label": `open ${job.kind} job ${short(job.id)}` }, "Open"));
  if (!TERMINAL.has(job.state)) {
    actions.append(" ", el("button", { type: "button", onclick: (ev) => { ev.stopPropagation(); jobAction(job, "cancel"); },
                                      "aria-label": `cancel ${job.kind} job ${short(job.id)}` }, "Cancel"));
  } else if (job.state !== "succeeded") {
    actions.append(" ", el("button", { type: "button", onclick: (ev) => { ev.stopPropagation(); jobAction(job, "retry"); },
                                      "aria-label": `retry ${job.kind} job ${short(job.id)}` }, "Retry"));
  }
  if (TERMINAL.has(job.state)) {
    actions.append(" ", el("button", { type: "button", onclick: (ev) => { ev.stopPropagation(); jobAction(job, "rerun"); },
                                      "aria-label": `run ${job.kind} job ${short(job.id)} again as a new job` }, "Rerun"));
    actions.append(" ", el("button", { type: "button", class: "danger", onclick: (ev) => { ev.stopPropagation(); deleteJob(job); },
                                      "aria-label": `delete ${job.kind} job ${short(job.id)} and its files` }, "Delete"));
  }
  const owner = ownerName(job);
  const what = jobWhat(job);
  const row = el("tr", {
    class: `job-row${job.id === S.selectedId ? " selected" : ""}`, "data-job-id": job.id, tabindex: "0",
    "aria-label": `${job.kind} job ${short(job.id)}, ${job.state}`,
    onclick: () => selectJob(job.id),
    onkeydown: (ev) => { if (ev.key === "Enter" && ev.target === row) selectJob(job.id); },
  },
  el("td", { title: job.id }, fmtTime(job.created_at)),
  el("td", {}, job.kind),
  el("td", { class: "what", title: what }, what),
  el("td", { class: `state-${job.state}` }, job.state),
  el("td", { title: job.owner_id || "" }, owner),
  el("td", {}, progressBar(job)),
  // the stage while it runs, where it stopped when it failed; a finished or cancelled job's
  // last stage ("queued" beside "cancelled") read as a contradiction
  el("td", { title: job.message || "" },
    job.state === "running" ? job.stage || "" : job.state === "failed" && job.stage ? `at ${job.stage}` : ""),
  el("td", {}, job.state === "running" ? fmtEta(job.eta_s) : ""),
  actions);
  return row;
}

async function refreshJobs() {
  if (!S.token) return;
  const q = new URLSearchParams({ limit: "100" });
  if ($("filter-kind").value) q.set("kind", $("filter-kind").value);
  if ($("filter-state").value) q.set("state", $("filter-state").value);
  try {
    const page = await api(`/api/jobs?${q}`);
    const body = $("jobs-body");
    const active = document.activeElement;
    const focused = active && active.closest && active.closest("#jobs-body tr[data-job-id]");
    const focusId = focused ? focused.dataset.jobId : null;
    const focusButton = focused && active.tagName === "BUTTON" ? active.textContent : null;
    body.replaceChildren(...(page.items.length ? page.items.map(jobRow)
      : [el("tr", {}, el("td", { colspan: "9" }, "no jobs match"))]));
    if (focusId) { // keep keyboard focus on the same row across refreshes
      const again = body.querySelector(`tr[data-job-id="${focusId}"]`);
      const button = again && focusButton
        ? [...again.querySelectorAll("button")].find((b) => b.textContent === focusButton) : null;
      if (button) button.focus();
      else if (again) again.focus();
    }
    $("jobs-updated").textContent = `${page.total} job(s), updated ${new Date().toLocaleTimeString()}`;
    refreshStorage();
    if (!$("filter-kind").value && !$("filter-state").value) S.jobsCache = page.items;
  } catch (e) {
    $("jobs-updated").textContent = `could not load jobs: ${e.message}`;
  }
}

// the caller's storage against their quota, in the header; at most every 10 s from the jobs
// refresh, and at once after an upload or a delete
let storageCheckedAt = 0;
async function refreshStorage(force = false) {
  if (!S.me || !S.me.id || (!force && Date.now() - storageCheckedAt < 10_000)) return;
  storageCheckedAt = Date.now();
  try {
    const lim = await api(`/api/users/${encodeURIComponent(S.me.name)}/limits`);
    const quota = lim.max_storage_bytes;
    $("storage-used").textContent = `· storage ${fmtBytes(lim.storage_used_bytes || 0)}`
      + (quota ? ` of ${fmtBytes(quota)}` : " (no quota)");
  } catch (_) {
    $("storage-used").textContent = "";
  }
}

async function checkService() {
  try {
    const r = await fetch("/api/ready");
    const b = await r.json();
    $("service-status").textContent = r.ok ? "service ready" : `service not ready: database ${b.database}, broker ${b.broker}`;
  } catch (e) {
    $("service-status").textContent = "service unreachable";
  }
}

// ------------------------------------------------------------------ upload

function uploadWithProgress(file) {
  // XMLHttpRequest: fetch() cannot report upload progress
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/recordings");
    if (S.token) xhr.setRequestHeader("Authorization", `Bearer ${S.token}`);
    const bar = $("upload-progress");
    bar.hidden = false;
    bar.value = 0;
    xhr.upload.onprogress = (ev) => {
      if (!ev.lengthComputable) return;
      bar.value = Math.round((100 * ev.loaded) / ev.total);
      $("upload-status").textContent = `uploading ${file.name}: ${fmtBytes(ev.loaded)} of ${fmtBytes(ev.total)}`;
    };
    xhr.onerror = () => reject(new Error("network error during the upload"));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
      if (xhr.status === 401) signedOut("the server refused the token (401): sign in again");
      if (xhr.status >= 200 && xhr.status < 300) { bar.value = 100; resolve(body); }
      else reject(new ApiError(xhr.status, detailText(body, `${xhr.status} ${xhr.statusText}`), body));
    };
    const form = new FormData();
    form.append("file", file);
    xhr.send(form);
  });
}

async function uploadRecording(ev) {
  ev.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  $("upload-result").hidden = true;
  try {
    const rec = await uploadWithProgress(file);
    $("upload-status").className = "";
    $("upload-status").textContent = rec.duplicate
      ? `${rec.filename} was uploaded before: using that recording`
      : `${rec.filename} uploaded`;
    // the infer form, filled in for this recording
    await chooseKind("infer");
    setFieldValue("infer", "recording_id", rec.id);
    await showRecording(rec);
    loadRecordings();
    refreshStorage(true);
  } catch (e) {
    $("upload-progress").hidden = true; // a full bar beside a failure read as success
    $("upload-status").className = "error";
    $("upload-status").textContent = `upload failed: ${e.message}`;
  }
}

async function showRecording(rec) {
  const dl = $("upload-meta");
  dl.replaceChildren();
  const add = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, v));
  add("file", rec.filename);
  add("recording id", rec.id);
  add("frames", String(rec.n_frames));
  add("size", `${rec.height} × ${rec.width} px (rows × columns)`);
  add("data type", rec.dtype);
  add("file size", fmtBytes(rec.size_bytes));
  add("sha256", rec.sha256);
  if (rec.axes) add("axes as read", rec.axes);
  const opts = Object.entries(rec.read_options || {}).map(([k, v]) => `${k}=${v}`);
  if (opts.length) add("read with", opts.join(", "));
  // what the reader noticed or converted (interleaved channels, series read as frames, ...)
  const warnings = rec.warnings || [];
  if (warnings.length) {
    // information about the reading (calibration applied, Z read as T, ...), not errors
    dl.append(el("dt", {}, "reading notes"),
              el("dd", { id: "upload-warnings" }, warnings.join(" | ")));
  }
  $("upload-result").hidden = false;
  const t = Math.floor(rec.n_frames / 2);
  const img = $("upload-preview");
  try {
    const { blob, headers } = await apiBlob(`/api/recordings/${rec.id}/frames/${t}.png`);
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    img.alt = `preview: frame ${t} of ${rec.filename}`;
    $("upload-preview-caption").textContent =
      `frame ${t}, display range ${headers.get("X-Display-Lo")}–${headers.get("X-Display-Hi")} `
      + `(data ${headers.get("X-Data-Min")}–${headers.get("X-Data-Max")})`;
  } catch (e) {
    $("upload-preview-caption").textContent = `no preview: ${e.message}`;
  }
}

// ------------------------------------------------------------------ job forms from schemas

const PRIMARY = new Set(["method", "split", "n_videos", "n_frames", "height", "width", "steps",
                         "model", "seed", "pattern_classes", "indicator", "image_size"]);

function resolve(schema, prop) {
  // {type, nullable, enum, items, ...} of a property, following $ref and anyOf [X, null]
  let p = prop;
  if (p.$ref) p = refOf(schema, p.$ref);
  let nullable = false;
  if (p.anyOf) {
    const parts = p.anyOf.map((x) => (x.$ref ? refOf(schema, x.$ref) : x));
    nullable = parts.some((x) => x.type === "null");
    const rest = parts.filter((x) => x.type !== "null");
    p = { ...p, ...(rest.length === 1 ? rest[0] : { type: "json" }) };
    delete p.anyOf;
  }
  if (p.allOf && p.allOf.length === 1) p = { ...p, ...(p.allOf[0].$ref ? refOf(schema, p.allOf[0].$ref) : p.allOf[0]) };
  let type = p.type || (p.enum ? "enum" : "json");
  if (p.enum) type = "enum";
  if (type === "array" && !(p.items && p.items.enum)) type = "json";
  if (type === "object") type = "json";
  return { ...p, type, nullable };
}

function refOf(schema, ref) {
  const name = ref.split("/").pop();
  return (schema.$defs || schema.definitions || {})[name] || {};
}

function fieldId(kind, name) { return `f-${kind}-${name}`; }

function hintText(p, required) {
  const bits = [];
  if (p.description) bits.push(p.description);
  if (required) bits.push("required");
  else if ("default" in p) bits.push(`default: ${p.default === null ? "none" : JSON.stringify(p.default)}`);
  const lim = [];
  if (p.minimum !== undefined) lim.push(`≥ ${p.minimum}`);
  if (p.exclusiveMinimum !== undefined) lim.push(`> ${p.exclusiveMinimum}`);
  if (p.maximum !== undefined) lim.push(`≤ ${p.maximum}`);
  if (p.exclusiveMaximum !== undefined) lim.push(`< ${p.exclusiveMaximum}`);
  if (p.multipleOf !== undefined) lim.push(`multiple of ${p.multipleOf}`);
  if (lim.length) bits.push(lim.join(", "));
  return bits.join(" · ");
}

// choices for id fields: [id, text] with names, sizes and dates (typing an id still works)
function suggestions(name) {
  if (name === "recording_id") {
    return S.recordings.map((r) => [r.id, `${r.filename} — ${r.n_frames} frames, ${r.height}×${r.width} px, `
      + `${fmtBytes(r.size_bytes)}, uploaded ${fmtDate(r.created_at)}`]);
  }
  if (name === "dataset_job_id") {
    return S.datasets.map((j) => {
      const p = j.params || {};
      const n = (j.result && j.result.n_videos) || p.n_videos;
      return [j.id, `${n} videos × ${p.n_frames} frames, ${p.height}×${p.width} px`
        + `${p.pattern_classes ? ` (${p.pattern_classes.join(", ")})` : ""}, seed ${p.seed}, ${fmtDate(j.finished_at || j.created_at)}`];
    });
  }
  if (name === "model_job_id") {
    return S.models.map((m) => {
      const iou = (m.metrics || []).find((x) => x.name === "best_val_iou");
      const f1 = (m.metrics || []).find((x) => x.name === "best_val_f1");
      const score = f1 ? `, validation F1 ${fmtNum(f1.value)}` : iou ? `, validation IoU ${fmtNum(iou.value)}` : "";
      const kept = m.best_step === 0 ? " (no step improved on the initial model)" : "";
      return [m.job_id, `${m.label || "SAM2 model"}, ${m.params.steps} steps${kept} on ${datasetName(m.dataset_job_id)}`
        + `${score}, ${fmtDate(m.finished_at || m.created_at)}`];
    });
  }
  if (name === "video_id") {
    const chosen = document.getElementById(fieldId($("job-kind").value, "dataset_job_id"));
    const want = chosen ? chosen.value.trim() : "";
    const ds = S.datasets.find((j) => j.result && j.result.videos && (!want || j.id === want));
    return ds ? ds.result.videos.map((v) => [v.id, `${v.id} — ${v.split}, ${v.pattern_class}, ${v.n_cells} cells`]) : [];
  }
  return null;
}

const PICK_WHAT = { recording_id: "a recording", dataset_job_id: "a dataset", model_job_id: "a model", video_id: "a video" };

// a <select> beside an id field: picking fills the field; typing in the field updates it
function pickerFor(kind, name, input) {
  const pick = el("select", { id: `${fieldId(kind, name)}-pick`, class: "picker", "data-picker": name,
                              "aria-label": `choose ${PICK_WHAT[name] || name} from the list` });
  const fill = () => {
    const list = suggestions(name) || [];
    const keep = input.value.trim();
    pick.replaceChildren(el("option", { value: "" }, list.length ? `choose ${PICK_WHAT[name]}…` : `no ${PICK_WHAT[name].replace(/^an? /, "")} yet`),
      ...list.map(([v, t]) => el("option", { value: v }, t)));
    pick.value = list.some(([v]) => v === keep) ? keep : "";
  };
  pick.addEventListener("change", () => {
    if (!pick.value) return;
    input.value = pick.value;
    input.dispatchEvent(new Event("input", { bubbles: true }));
    if (name === "dataset_job_id") refreshPickers(kind); // its videos
  });
  pick.addEventListener("focus", fill);
  input.addEventListener("input", () => { pick.value = [...pick.options].some((o) => o.value === input.value.trim()) ? input.value.trim() : ""; });
  fill();
  return pick;
}

function refreshPickers(kind) {
  for (const pick of document.querySelectorAll("#job-form select[data-picker]")) {
    pick.dispatchEvent(new Event("focus"));
  }
}

function buildInput(kind, name, p, required) {
  const id = fieldId(kind, name);
  const hintId = `${id}-hint`;
  const errId = `${id}-err`;
  const common = { id, name, "aria-describedby": `${hintId} ${errId}`, "data-field": name };
  let input;
  if (p.type === "enum") {
    const auto = p["x-auto"];
    const text = (v) => (v === "auto" && auto ? `auto (here: ${auto.label})` : String(v));
    input = el("select", common,
      ...(p.nullable || (required && !("default" in p)) ? [el("option", { value: "" }, p.nullable ? "(none)" : "choose…")] : []),
      ...p.enum.map((v) => el("option", { value: JSON.stringify(v) }, text(v))));
    input.value = "default" in p && p.default !== null ? JSON.stringify(p.default) : "";
  } else if (p.type === "boolean" && !p.nullable) {
    input = el("input", { ...common, type: "checkbox" });
    input.checked = Boolean(p.default);
  } else if (p.type === "boolean") {
    input = el("select", common, el("option", { value: "" }, "(automatic)"),
      el("option", { value: "true" }, "true"), el("option", { value: "false" }, "false"));
    input.value = p.default === null || p.default === undefined ? "" : String(p.default);
  } else if (p.type === "integer" || p.type === "number") {
    input = el("input", { ...common, type: "number", inputmode: p.type === "integer" ? "numeric" : "decimal",
      step: p.type === "integer" ? String(p.multipleOf || 1) : "any",
      min: p.minimum, max: p.maximum });
    input.value = "default" in p && p.default !== null ? String(p.default) : "";
    if (p.nullable) input.placeholder = "none";
  } else if (p.type === "array") {
    input = el("fieldset", { id, class: "checks", "aria-describedby": `${hintId} ${errId}`, "data-field": name },
      el("legend", { class: "visually-hidden" }, name),
      ...p.items.enum.map((v) => el("label", {},
        el("input", { type: "checkbox", value: JSON.stringify(v),
                      checked: Array.isArray(p.default) && p.default.includes(v) }), ` ${v}`)));
  } else if (p.type === "json") {
    input = el("textarea", { ...common, rows: "2", cols: "30", spellcheck: "false",
      placeholder: "JSON, e.g. {}" });
    input.value = "default" in p && p.default !== null ? JSON.stringify(p.default) : "";
  } else {
    const list = suggestions(name);
    input = el("input", { ...common, type: "text", spellcheck: "false", autocomplete: "off",
      size: list ? "38" : null, placeholder: list ? "pick above, or type an id" : null });
    input.value = "default" in p && p.default !== null ? String(p.default) : "";
  }
  if (required) input.setAttribute("aria-required", "true");
  const label = p.type === "array"
    ? el("span", { class: "param-label", id: `${id}-label` }, name)
    : el("label", { for: id, class: "param-label" }, name);
  if (p.type === "array") input.setAttribute("aria-labelledby", `${id}-label`);
  const picker = p.type === "string" && suggestions(name) ? pickerFor(kind, name, input) : null;
  let hint = hintText(p, required);
  if (p["x-auto"]) hint = `auto here: ${p["x-auto"].reason} · ${hint}`;
  const wrap = el("div", { class: `param${p.type === "json" ? " param-json" : ""}${picker ? " param-id" : ""}` },
    label, picker, input,
    el("span", { id: hintId, class: "hint" }, hint),
    el("span", { id: errId, class: "field-error", role: "alert" }));
  if (p.type === "json") {
    // a nested object: collapsible
    return el("details", { class: "param-details" }, el("summary", {}, `${name} (JSON)`), wrap);
  }
  return wrap;
}

function renderForm(kind) {
  const schema = S.kinds && S.kinds[kind];
  $("job-fields").replaceChildren();
  $("job-more-fields").replaceChildren();
  $("job-form-error").textContent = "";
  $("job-form-status").textContent = "";
  if (!schema) { $("job-kind-doc").textContent = "no parameter schema for this kind"; return; }
  $("job-kind-doc").textContent = schema.description || "";
  const required = new Set(schema.required || []);
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const p = resolve(schema, raw);
    const node = buildInput(kind, name, p, required.has(name));
    const primary = required.has(name) || name.endsWith("_id") || PRIMARY.has(name);
    (primary ? $("job-fields") : $("job-more-fields")).append(node);
  }
  $("job-more").hidden = !$("job-more-fields").children.length;
  $("job-submit").textContent = `Submit ${kind} job`;
}

async function chooseKind(kind) {
  if (!S.kinds) await loadKinds();
  if ($("job-kind").value !== kind || !$("job-fields").children.length) {
    $("job-kind").value = kind;
    renderForm(kind);
  }
}

function setFieldValue(kind, name, value) {
  const input = document.getElementById(fieldId(kind, name));
  if (input) { input.value = value; input.dispatchEvent(new Event("input")); }
}

function fieldError(kind, name, message) {
  const input = document.getElementById(fieldId(kind, name));
  const err = document.getElementById(`${fieldId(kind, name)}-err`);
  if (!input || !err) return false;
  err.textContent = message || "";
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
  if (message) { const d = input.closest("details"); if (d) d.open = true; }
  return true;
}

// the value of one field: {skip: true} when it is left at its default, {error} when invalid
function readField(kind, name, p, required) {
  const input = document.getElementById(fieldId(kind, name));
  const dflt = "default" in p ? p.default : undefined;
  const same = (v) => JSON.stringify(v) === JSON.stringify(dflt);
  if (p.type === "boolean" && !p.nullable) {
    return same(input.checked) && !required ? { skip: true } : { value: input.checked };
  }
  if (p.type === "array") {
    const vals = [...input.querySelectorAll("input:checked")].map((c) => JSON.parse(c.value));
    if (!vals.length) return p.minItems ? (dflt === undefined ? { skip: true } : { error: "choose at least one" }) : { skip: true };
    // the same set as the default keeps the default's order; otherwise the listed order
    const sameSet = Array.isArray(dflt) && dflt.length === vals.length && vals.every((v) => dflt.includes(v));
    return sameSet ? { skip: true } : { value: vals };
  }
  const raw = input.value.trim();
  if (raw === "") {
    if (required) return { error: "required" };
    return { skip: true }; // the default (or none)
  }
  let v;
  if (p.type === "enum" || (p.type === "boolean")) v = JSON.parse(raw);
  else if (p.type === "json") {
    try { v = JSON.parse(raw); } catch (e) { return { error: `not valid JSON: ${e.message}` }; }
  } else if (p.type === "integer" || p.type === "number") {
    v = Number(raw);
    if (!Number.isFinite(v)) return { error: "not a number" };
    if (p.type === "integer" && !Number.isInteger(v)) return { error: "must be a whole number" };
    if (p.minimum !== undefined && v < p.minimum) return { error: `must be ≥ ${p.minimum}` };
    if (p.maximum !== undefined && v > p.maximum) return { error: `must be ≤ ${p.maximum}` };
    if (p.exclusiveMinimum !== undefined && v <= p.exclusiveMinimum) return { error: `must be > ${p.exclusiveMinimum}` };
    if (p.exclusiveMaximum !== undefined && v >= p.exclusiveMaximum) return { error: `must be < ${p.exclusiveMaximum}` };
    if (p.multipleOf !== undefined && Math.abs(v / p.multipleOf - Math.round(v / p.multipleOf)) > 1e-9) {
      return { error: `must be a multiple of ${p.multipleOf}` };
    }
  } else v = raw;
  return !required && same(v) ? { skip: true } : { value: v };
}

function collectParams(kind) {
  const schema = S.kinds[kind];
  const required = new Set(schema.required || []);
  const params = {};
  let firstBad = null;
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const p = resolve(schema, raw);
    const r = readField(kind, name, p, required.has(name));
    fieldError(kind, name, r.error);
    if (r.error && !firstBad) firstBad = name;
    if (!r.error && !r.skip) params[name] = r.value;
  }
  return { params, firstBad };
}

async function submitJob(ev) {
  ev.preventDefault();
  const kind = $("job-kind").value;
  $("job-form-error").textContent = "";
  $("job-form-status").textContent = "";
  const { params, firstBad } = collectParams(kind);
  if (firstBad) {
    $("job-form-error").textContent = "fix the fields marked above";
    document.getElementById(fieldId(kind, firstBad)).focus();
    return;
  }
  const button = $("job-submit");
  if (button.disabled) return; // a request in flight: a double click submits one job
  button.disabled = true;
  try {
    const job = await api("/api/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ kind, params }),
    });
    $("job-form-status").textContent = `${kind} job ${short(job.id)} queued`;
    refreshJobs();
    selectJob(job.id);
  } catch (e) {
    showServerErrors(kind, e);
  } finally {
    button.disabled = false;
  }
}

function showServerErrors(kind, e) {
  // 422: {"detail": str, "errors": [{"loc": ["body", "params", field, ...], "msg"}]}
  const errs = (e.body && (e.body.errors || (Array.isArray(e.body.detail) ? e.body.detail : null))) || [];
  let placed = 0;
  const loose = [];
  let first = null;
  for (const err of errs) {
    const loc = (err.loc || []).filter((x) => x !== "body" && x !== "params");
    const msg = String(err.msg || "").replace(/^Value error, /, "");
    if (loc.length && fieldError(kind, String(loc[0]), msg + (loc.length > 1 ? ` (${loc.slice(1).join(".")})` : ""))) {
      placed += 1;
      first = first || String(loc[0]);
    } else loose.push(msg);
  }
  if (!errs.length && e.body && typeof e.body.detail === "string") loose.push(e.body.detail);
  // a model-level message (no field in its location) goes next to every field it names
  const names = Object.keys((S.kinds[kind] || {}).properties || {});
  for (const msg of loose) {
    for (const name of names) {
      if (new RegExp(`\\b${name}\\b`).test(msg) && fieldError(kind, name, msg)) first = first || name;
    }
  }
  $("job-form-error").textContent = loose.length ? loose.join("; ")
    : placed ? `the server refused ${placed} field(s): see above` : `submit failed: ${e.message}`;
  if (first) document.getElementById(fieldId(kind, first)).focus();
}

let kindsLoading = null;
function loadKinds() {
  // one request at a time; the form is rebuilt only when the schemas changed, so a late answer
  // never wipes what the user (or the upload) filled in
  if (!kindsLoading) kindsLoading = fetchKinds().finally(() => { kindsLoading = null; });
  return kindsLoading;
}

async function fetchKinds() {
  let kinds;
  try {
    kinds = await api("/api/job-kinds");
  } catch (e) {
    if (!S.kinds) S.kinds = {};
    $("job-kind-doc").textContent = `cannot load the job parameter schemas: ${e.message}`;
    return;
  }
  if (S.kinds && JSON.stringify(kinds) === JSON.stringify(S.kinds) && $("job-fields").children.length) return;
  S.kinds = kinds;
  const sel = $("job-kind");
  const keep = sel.value;
  sel.replaceChildren(...Object.keys(S.kinds).map((k) => el("option", { value: k }, k)));
  if (keep && S.kinds[keep]) sel.value = keep;
  else if (S.kinds.infer) sel.value = "infer";
  renderForm(sel.value);
}

async function loadRecordings() {
  // the pickers' lists: recordings, datasets (succeeded simulate jobs) and fine-tuned models
  const [recs, ds, models] = await Promise.all([
    api("/api/recordings?limit=200").catch(() => []),
    api("/api/jobs?kind=simulate&state=succeeded&limit=200").catch(() => ({ items: [] })),
    api("/api/models?limit=200").catch(() => []),
  ]);
  S.recordings = Array.isArray(recs) ? recs : recs.items || [];
  S.datasets = ds.items || [];
  S.models = Array.isArray(models) ? models : [];
  if (!$("job-fields").contains(document.activeElement)) refreshPickers($("job-kind").value);
}

// ------------------------------------------------------------------ job detail

function field(dl, name, value) {
  if (value === null || value === undefined || value === "") return;
  dl.append(el("dt", {}, name), el("dd", {}, value));
}

function renderMetricsTable(table, metrics, rowKey) {
  const names = [...new Set(metrics.map((m) => m.name))];
  const rows = [...new Set(metrics.map(rowKey))];
  table.tHead.replaceChildren(el("tr", {}, el("th", { scope: "col" }, "model"),
    ...names.map((n) => el("th", { scope: "col", class: "num" }, n))));
  table.tBodies[0].replaceChildren(...rows.map((row) => el("tr", {},
    el("th", { scope: "row" }, row),
    ...names.map((n) => {
      const m = metrics.find((x) => rowKey(x) === row && x.name === n);
      return el("td", { class: "num" }, m ? fmtNum(m.value) : "–");
    }))));
}

function renderDetail(job) {
  $("detail").hidden = false;
  const what = jobWhat(job);
  $("detail-title").textContent = `${job.kind} job ${job.id}${what ? `: ${what}` : ""}`;
  const pct = Math.round((job.progress || 0) * 100);
  $("detail-progress").replaceChildren(
    el("span", { class: `state-${job.state}` }, job.state), " ",
    el("progress", { max: "100", value: String(pct), "aria-label": "job progress" }), ` ${pct}%`,
    job.stage ? ` · ${job.stage}` : "", job.state === "running" && job.eta_s != null ? ` · ETA ${fmtEta(job.eta_s)}` : "");
  const dl = $("detail-fields");
  const openBox = document.getElementById("detail-params");
  const paramsOpen = Boolean(openBox && openBox.open && openBox.dataset.jobId === job.id);
  dl.replaceChildren();
  field(dl, "message", job.message);
  field(dl, "error", job.error);
  field(dl, "owner", ownerName(job));
  field(dl, "attempts", String(job.attempts));
  field(dl, "created", job.created_at ? new Date(job.created_at).toLocaleString() : "");
  field(dl, "code version", job.code_version);
  const set = Object.entries(job.params || {}).filter(([, v]) => v !== null);
  field(dl, "parameters", el("details", { id: "detail-params", open: paramsOpen }, el("summary", {}, `${set.length} set (show)`),
    el("dl", { class: "fields params" }, ...set.flatMap(([k, v]) => [
      el("dt", {}, k), el("dd", {}, el("code", {}, typeof v === "string" ? v : JSON.stringify(v)))]))));
  const paramsBox = document.getElementById("detail-params");
  if (paramsBox) paramsBox.dataset.jobId = job.id;
  const warnings = (job.result && job.result.warnings) || [];
  if (warnings.length) dl.append(el("dt", {}, "warnings"), el("dd", { class: "warn" }, warnings.join(" | ")));
  if (job.result && job.result.table) dl.append(el("dt", {}, "report"), el("dd", {}, el("pre", {}, job.result.table)));
  const flat = (job.metrics || []).filter((m) => m.step === null || m.step === undefined);
  $("metrics").hidden = !flat.length;
  if (flat.length) renderMetricsTable($("metrics-table"), flat, (m) => [m.model, m.subset].filter(Boolean).join(" / ") || "—");
  renderArtifacts(job);
  $("log-tail").textContent = job.log_tail || "";
  renderResult(job);
  setupViewer(job);
  setupAnalysis(job);
  setupCurves(job);
}

// ------------------------------------------------------------------ infer result, in words

function renderResult(job) {
  const r = job.result || {};
  const box = $("result-box");
  const show = job.kind === "infer" && job.state === "succeeded" && r.n_cells !== undefined;
  box.hidden = !show;
  if (!show) return;
  const banner = $("random-banner");
  banner.hidden = !r.random_weights;
  banner.textContent = r.random_weights
    ? `${r.model_label}: SAM2 ran with RANDOM weights, so these masks say nothing about cells. `
      + "Use the classical method, or configure a SAM2 checkpoint (CALSEG_SAM2_CHECKPOINT)." : "";
  const dl = $("result-fields");
  dl.replaceChildren();
  const unit = r.target === "cells" ? "region" : "cell";
  field(dl, "model", r.model_label || r.method);
  field(dl, "why this method", r.method_reason);
  field(dl, "recording", r.recording_name || (r.source && r.source.video_id
    ? `${r.source.video_id} (simulated as ${r.source.pattern_class}, ${r.source.split} split)` : ""));
  // coverage: labelled in any frame; foreground_fraction (the metric): in the mean frame
  const pct = (x) => `${(100 * (x || 0)).toFixed(1)} %`;
  const perFrame = r.foreground_fraction;
  const covered = r.target !== "cells" && perFrame != null && pct(perFrame) !== pct(r.coverage)
    ? `${pct(r.coverage)} of the field labelled in some frame, ${pct(perFrame)} in the mean frame `
      + "(metric foreground_fraction)"
    : `${pct(r.coverage)} of the field labelled`;
  field(dl, r.target === "cells" ? "regions" : "cells found",
    `${plural(r.n_cells, unit)} (${r.target === "cells" ? "found on the projection" : "active"}), `
    + covered);
  if (r.evidence_summary) field(dl, "cell evidence", r.evidence_summary);
  if (r.n_cells) {
    field(dl, "events", `${plural(r.n_events || 0, "event")} detected; ${r.n_significant_events || 0} significant `
      + "(large enough to count for the pattern class)");
    field(dl, "pattern class found", `${r.pattern_class}${r.pattern_reason ? ` — ${r.pattern_reason}` : ""}`);
  }
  const secs = r.frame_interval_known === false ? "not in the file: 1 s assumed" : `${fmtNum(r.frame_interval_s)} s`;
  field(dl, "frame interval", secs);
  field(dl, "pixel size", r.pixel_size_um ? `${fmtNum(r.pixel_size_um)} µm` : "unknown (scale bars in px)");
  const notes = r.notes || [];
  $("notes-box").hidden = !notes.length;
  $("notes-list").replaceChildren(...notes.map((n) => el("li", {}, n)));
  const d = r.diagnosis;
  $("diagnosis-box").hidden = !d;
  if (d) {
    $("diagnosis-reason").textContent = d.reason;
    $("suggestion-list").replaceChildren(...d.suggestions.map((sg, i) => el("li", { "data-suggestion": String(i) },
      el("strong", {}, sg.text), " ", el("code", {}, sg.command.replace(/ OUT /, " OUT_DIR ")), el("br"),
      el("span", { class: "muted" }, sg.expected), " ",
      el("button", { type: "button", onclick: () => useSuggestion(job, sg.params),
                     "aria-label": `Use these settings: ${sg.text}` }, "Use these settings"))));
  }
}

// the infer form, filled with this job's source and a suggestion's parameters
async function useSuggestion(job, params) {
  await chooseKind("infer");
  renderForm("infer");
  const p = job.params || {};
  for (const k of ["recording_id", "dataset_job_id", "video_id", "model_job_id"]) if (p[k]) setFieldValue("infer", k, p[k]);
  for (const [k, v] of Object.entries(params)) {
    const input = document.getElementById(fieldId("infer", k));
    if (!input) continue;
    input.value = input.tagName === "SELECT" ? JSON.stringify(v) : String(v);
    input.dispatchEvent(new Event("input", { bubbles: true }));
    const d = input.closest("details");
    if (d) d.open = true;
  }
  const filled = Object.entries(params).map(([k, v]) => `${k} = ${v}`).join(", ");
  $("job-form-status").textContent = `form filled: ${filled}; review and submit`;
  // the suggestion was for this recording: choosing another one returns the form to the
  // defaults (a new-user check ran later jobs on other recordings at the suggested threshold)
  for (const k of ["recording_id", "dataset_job_id", "video_id"]) {
    const source = document.getElementById(fieldId("infer", k));
    if (!source) continue;
    const original = source.value.trim();
    source.addEventListener("input", () => { // typed, or chosen from the picker beside it
      if (source.value.trim() === original || !document.body.contains(source)) return;
      const keep = Object.fromEntries(["recording_id", "dataset_job_id", "video_id", "model_job_id"]
        .map((n) => [n, document.getElementById(fieldId("infer", n))])
        .filter(([, input]) => input && input.value).map(([n, input]) => [n, input.value]));
      renderForm("infer");
      for (const [n, v] of Object.entries(keep)) setFieldValue("infer", n, v);
      $("job-form-status").textContent = `the suggested ${filled} was for the other recording: `
        + "the form is back to the defaults";
    });
  }
  $("newjob-title").scrollIntoView({ behavior: "smooth", block: "start" });
  $("job-submit").focus({ preventScroll: true });
}

// ------------------------------------------------------------------ activity map, raster, events

const A = { jobId: null, cells: null, events: [], order: [], sigFloor: null };

function artifactOf(job, name) {
  return (job.artifacts || []).find((a) => a.name === name) || null;
}

function setupAnalysis(job) {
  const ok = job.kind === "infer" && job.state === "succeeded";
  $("analysis").hidden = !ok;
  if (!ok || A.jobId === job.id) return;
  A.jobId = job.id;
  A.cells = null;
  A.events = [];
  A.sigFloor = null;
  A.timeKnown = (job.result || {}).frame_interval_known !== false;
  const act = artifactOf(job, "activity.png");
  $("activity-box").hidden = !act;
  if (act) {
    apiBlob(act.url).then(({ blob }) => {
      if (A.jobId !== job.id) return;
      const img = $("activity-img");
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = URL.createObjectURL(blob);
      img.alt = `activity map of ${(job.result || {}).recording_name || "the recording"}: largest z-score per pixel`;
    }).catch((e) => { $("activity-box").hidden = true; console.warn(e); });
  }
  const exports = { "export-traces": "traces.csv", "export-events": "events.csv", "export-rois": "rois.zip", "export-labels": "labels.tif" };
  let any = false;
  for (const [id, name] of Object.entries(exports)) {
    const a = artifactOf(job, name);
    $(id).hidden = !a;
    $(id).onclick = a ? () => download(a) : null;
    any = any || Boolean(a);
  }
  $("exports-box").hidden = !any;
  loadAnalysis(job);
}

function parseCsv(text) {
  const lines = text.trim().split(/\r?\n/);
  if (!lines.length || !lines[0]) return [];
  const head = lines.shift().split(",");
  return lines.filter(Boolean).map((ln) => Object.fromEntries(ln.split(",").map((v, i) => [head[i], v])));
}

async function loadAnalysis(job) {
  const jobId = job.id;
  const ev = artifactOf(job, "events.csv");
  const hasTraces = Boolean(artifactOf(job, "traces.csv"));
  try {
    const [cells, events] = await Promise.all([
      hasTraces && (job.result || {}).n_cells
        ? api(`/api/jobs/${jobId}/cells?dff=true&max_columns=800`) : null,
      ev ? apiBlob(ev.url).then(({ blob }) => blob.text()).then(parseCsv) : [],
    ]);
    if (A.jobId !== jobId) return;
    A.cells = cells;
    A.events = events.map((e) => ({ cell: Number(e.cell_id), onset: Number(e.onset_s), peak: Number(e.peak_s),
      duration: Number(e.duration_s), amplitude: Number(e.amplitude), onsetFrame: Number(e.onset_frame),
      truncated: e.truncated === "1" || e.truncated === "True" }));
    A.sigFloor = (job.result || {}).significant_event_amplitude ?? null;
    renderEvents();
    drawRaster();
  } catch (e) {
    $("raster-note").textContent = `cannot load the traces: ${e.message}`;
  }
}

function firstOnset() {
  const on = new Map();
  for (const e of A.events) if (!on.has(e.cell) || e.onset < on.get(e.cell)) on.set(e.cell, e.onset);
  return on;
}

function rasterOrder(sort) {
  const ids = A.cells.ids.slice();
  const peak = new Map(ids.map((id, i) => [id, A.cells.peak_dff[i] ?? -Infinity]));
  if (sort === "peak") return ids.sort((a, b) => peak.get(b) - peak.get(a) || a - b);
  if (sort === "onset") {
    const on = firstOnset();
    return ids.sort((a, b) => (on.has(a) ? on.get(a) : Infinity) - (on.has(b) ? on.get(b) : Infinity) || a - b);
  }
  return ids.sort((a, b) => a - b);
}

// inferno-like ramp, as calseg.io.overlays.colour_ramp (dark = low, bright = high)
const RAMP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]];
function ramp(x) {
  if (!Number.isFinite(x)) return [128, 128, 128];
  const v = Math.min(1, Math.max(0, x)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(v));
  const f = v - i;
  return RAMP[i].map((c, k) => Math.round(c * (1 - f) + RAMP[i + 1][k] * f));
}

const R = { top: 8, left: 56, right: 64, bottom: 34 };

function drawRaster() {
  const c = A.cells;
  const box = $("raster-box");
  box.hidden = !c || !c.ids.length;
  if (!c || !c.ids.length) return;
  const sort = $("raster-sort").value;
  A.order = rasterOrder(sort);
  const n = A.order.length, cols = c.dff[0] ? c.dff[0].length : 0;
  const canvas = $("raster-canvas");
  const W = Math.max(300, Math.min(900, canvas.parentElement.clientWidth || 640));
  const rowH = Math.max(2, Math.min(22, Math.floor(420 / n)));
  const plotH = Math.max(n * rowH, 60); // room for the colour bar with few cells
  const H = R.top + plotH + R.bottom;
  canvas.width = W;
  canvas.height = H;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  const all = c.dff.flat().filter((v) => v !== null).sort((a, b) => a - b);
  const hi = all.length ? Math.max(all[Math.floor(0.99 * (all.length - 1))], 1e-6) : 1;
  const pw = W - R.left - R.right;
  const row = new Map(c.ids.map((id, i) => [id, i]));
  const img = ctx.createImageData(Math.max(1, cols), n);
  A.order.forEach((id, r) => {
    const vals = c.dff[row.get(id)];
    vals.forEach((v, k) => {
      const [cr, cg, cb] = ramp(v === null ? NaN : v / hi);
      const o = 4 * (r * cols + k);
      img.data[o] = cr; img.data[o + 1] = cg; img.data[o + 2] = cb; img.data[o + 3] = 255;
    });
  });
  const tmp = document.createElement("canvas");
  tmp.width = Math.max(1, cols);
  tmp.height = n;
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, R.left, R.top, pw, n * rowH);
  ctx.fillStyle = "#1d2430";
  ctx.font = "11px system-ui, sans-serif";
  // time axis (s)
  const times = c.time_s.filter((v) => v !== null);
  const t0 = times.length ? times[0] : 0;
  const t1 = times.length ? times[times.length - 1] + (times.length > 1 ? times[1] - times[0] : 1) : 1;
  ctx.textAlign = "center";
  for (const tv of niceTicks(t0, t1)) {
    const x = R.left + ((tv - t0) / (t1 - t0)) * pw;
    if (x < R.left - 1 || x > R.left + pw + 1) continue;
    ctx.fillRect(x, R.top + n * rowH, 1, 4);
    ctx.fillText(String(tv), x, R.top + n * rowH + 15);
  }
  ctx.fillText(A.timeKnown === false ? "time (s; 1 s per frame assumed)" : "time (s)", R.left + pw / 2, H - 4);
  // cell labels
  ctx.textAlign = "right";
  const every = Math.max(1, Math.ceil(12 / rowH));
  A.order.forEach((id, r) => { if (r % every === 0) ctx.fillText(String(id), R.left - 4, R.top + r * rowH + rowH / 2 + 4); });
  ctx.save();
  ctx.translate(12, R.top + (n * rowH) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("cell", 0, 0);
  ctx.restore();
  // colour bar
  const bx = W - R.right + 12, bh = plotH;
  for (let y = 0; y < bh; y++) {
    const [cr, cg, cb] = ramp(1 - y / bh);
    ctx.fillStyle = `rgb(${cr},${cg},${cb})`;
    ctx.fillRect(bx, R.top + y, 10, 1);
  }
  ctx.fillStyle = "#1d2430";
  ctx.textAlign = "left";
  ctx.fillText(fmtNum(hi), bx + 13, R.top + 9);
  ctx.fillText("0", bx + 13, R.top + bh);
  ctx.fillText("dF/F", bx - 4, R.top + bh + 14);
  canvas.dataset.order = A.order.join(",");
  canvas.dataset.sort = sort;
  canvas.dataset.rows = String(n);
  canvas.dataset.rowHeight = String(rowH);
  const on = firstOnset();
  $("raster-title").textContent = `dF/F of all ${plural(n, "cell")} over time`;
  $("raster-note").textContent = `rows sorted by ${$("raster-sort").selectedOptions[0].textContent}; `
    + `${on.size} of ${n} with an event; colour 0 to ${fmtNum(hi)} dF/F (99th percentile)`
    + (c.frames_per_column > 1 ? `; ${c.frames_per_column} frames per column (their maximum)` : "")
    + "; click a row for its trace";
}

function rasterClick(ev) {
  if (!A.order.length) return;
  const canvas = $("raster-canvas");
  const r = canvas.getBoundingClientRect();
  const y = ((ev.clientY - r.top) * canvas.height) / r.height;
  const rowH = Number(canvas.dataset.rowHeight);
  const i = Math.floor((y - R.top) / rowH);
  if (i < 0 || i >= A.order.length) return;
  if (V.jobId) plotCell(A.order[i]);
}

const MAX_EVENT_ROWS = 200;

function renderEvents() {
  const evs = A.events.slice().sort((a, b) => a.onset - b.onset || a.cell - b.cell);
  $("events-box").hidden = false;
  // significant = counted by the pattern class: peak dF/F at or above the result's floor
  const floor = A.sigFloor;
  const isSig = (e) => floor !== null && Number.isFinite(e.amplitude) && e.amplitude >= floor;
  const nSig = evs.filter(isSig).length;
  $("events-title").textContent = evs.length
    ? `Events: ${plural(evs.length, "event")} in ${plural(new Set(evs.map((e) => e.cell)).size, "cell")}`
      + `, ${nSig} significant (${floor === null ? "none reaches the pattern class's floor"
        : `peak dF/F ≥ ${fmtNum(floor)}, counted by the pattern class`})`
      + (evs.length > MAX_EVENT_ROWS ? ` (the first ${MAX_EVENT_ROWS} by onset shown; all in events.csv)` : "")
    : "Events: none detected";
  $("events-body").replaceChildren(...evs.slice(0, MAX_EVENT_ROWS).map((e) => el("tr", {
    class: isSig(e) ? "event-row significant" : "event-row", tabindex: "0", "data-cell": String(e.cell),
    onclick: () => showEvent(e), onkeydown: (k) => { if (k.key === "Enter") showEvent(e); } },
  el("td", {}, `cell ${e.cell}`), el("td", { class: "num" }, fmtNum(e.onset)), el("td", { class: "num" }, fmtNum(e.peak)),
  el("td", { class: "num" }, fmtNum(e.duration)), el("td", { class: "num" }, fmtNum(e.amplitude)),
  el("td", {}, [isSig(e) ? "significant" : "", e.truncated ? "cut by the recording's start or end" : ""]
    .filter(Boolean).join("; ")))));
}

function showEvent(e) {
  if (!V.jobId) return;
  const s = $("frame-slider");
  s.value = String(Math.min(Number(s.max), Math.max(0, e.onsetFrame)));
  showFrame();
  plotCell(e.cell);
}

function renderArtifacts(job) {
  const arts = job.artifacts || [];
  $("artifacts").hidden = !arts.length;
  const body = $("artifact-list");
  if (body.dataset.jobId === job.id && body.children.length === arts.length) return;
  body.dataset.jobId = job.id;
  body.replaceChildren(...arts.map((a) => el("tr", { "data-artifact": a.name },
    el("td", {}, el("button", { type: "button", class: "linklike", "data-size": String(a.size_bytes),
      "aria-label": `download ${a.name} (${fmtBytes(a.size_bytes)})`,
      onclick: () => download(a) }, a.name)),
    el("td", {}, a.kind),
    el("td", { class: "num", title: `${a.size_bytes} bytes` }, fmtBytes(a.size_bytes)),
    el("td", {}, el("code", { title: a.sha256 }, `${a.sha256.slice(0, 12)}…`)))));
}

async function download(a) {
  // fetch with the token -> blob -> a temporary <a download> (a plain link sends no header)
  const status = $("download-status");
  status.textContent = `downloading ${a.name}…`;
  try {
    const { blob } = await apiBlob(a.url);
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: a.name.split("/").pop(), hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    status.textContent = `${a.name}: ${fmtBytes(blob.size)} downloaded`;
  } catch (e) {
    status.textContent = `download of ${a.name} failed: ${e.message}`;
  }
}

async function selectJob(id) {
  S.selectedId = id;
  S.selectedJob = null; // render this job even if it is the one shown before (and ended)
  stopPlay();
  $("viewer").hidden = true;
  $("viewer").dataset.jobId = "";
  $("curves").hidden = true;
  $("analysis").hidden = true;
  $("result-box").hidden = true;
  A.jobId = null;
  $("artifact-list").dataset.jobId = "";
  $("download-status").textContent = "";
  if (location.hash !== `#job=${id}`) history.pushState(null, "", `#job=${encodeURIComponent(id)}`);
  await refreshDetail();
  refreshJobs();
  $("detail-title").focus({ preventScroll: true });
  $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
}

async function refreshDetail() {
  if (!S.selectedId || !S.token) return;
  const cur = S.selectedJob;
  if (cur && cur.id === S.selectedId && TERMINAL.has(cur.state)) return;
  const id = S.selectedId;
  try {
    const job = await api(`/api/jobs/${id}`);
    // another job chosen, or the detail closed (Back), while this answer was on its way:
    // it must not draw over that (Back through several jobs reopened the closed detail)
    if (S.selectedId !== id) return;
    S.selectedJob = job;
    renderDetail(job);
  } catch (e) {
    if (S.selectedId !== id) return;
    // e.g. a stale #job= link: say so instead of leaving the section hidden
    $("detail").hidden = false;
    $("viewer").hidden = true;
    $("curves").hidden = true;
    $("metrics").hidden = true;
    $("artifacts").hidden = true;
    $("detail-progress").replaceChildren();
    $("detail-title").textContent = `job ${id}`;
    $("detail-fields").replaceChildren(el("dt", {}, "error"), el("dd", {}, e.message));
  }
}

// ------------------------------------------------------------------ SVG plots

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, n = 5) {
  const span = hi - lo || 1;
  const step0 = span / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) ticks.push(Number(v.toPrecision(6)));
  return ticks;
}

// A line plot: series [{xs, ys, cls, label}], nulls break the line. Returns {svg, sx}.
function linePlot({ series, xlabel, ylabel, title, zeroLine = true, width = 640, height = 240, points = false }) {
  const W = width, H = height, L = 58, R = 14, T = 12, B = 42;
  const xsAll = series.flatMap((s) => s.xs.filter((v, i) => v !== null && s.ys[i] !== null));
  const ysAll = series.flatMap((s) => s.ys.filter((v) => v !== null));
  let lo = ysAll.length ? Math.min(...ysAll) : 0;
  let hi = ysAll.length ? Math.max(...ysAll) : 1;
  if (zeroLine) lo = Math.min(0, lo);
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const x0 = xsAll.length ? Math.min(...xsAll) : 0;
  let x1 = xsAll.length ? Math.max(...xsAll) : 1;
  if (x1 <= x0) x1 = x0 + 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  plot.append(svg("title", {}, title));
  for (const v of niceTicks(lo, hi)) {
    plot.append(svg("line", { class: "axis", x1: L - 4, x2: L, y1: sy(v), y2: sy(v) }),
      svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, String(v)));
  }
  for (const v of niceTicks(x0, x1)) {
    plot.append(svg("line", { class: "axis", x1: sx(v), x2: sx(v), y1: H - B, y2: H - B + 4 }),
      svg("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle" }, String(v)));
  }
  if (lo < 0 && hi > 0) plot.append(svg("line", { class: "zero", x1: L, x2: W - R, y1: sy(0), y2: sy(0) }));
  plot.append(
    svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }),
    svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }),
    svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, xlabel),
    svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle",
                  transform: `rotate(-90 14 ${(T + H - B) / 2})` }, ylabel));
  for (const s of series) {
    let d = "";
    let pen = false;
    s.ys.forEach((v, i) => {
      const x = s.xs[i];
      if (v === null || x === null || x === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(v).toFixed(1)}`;
      pen = true;
      if (points) plot.append(svg("circle", { class: `${s.cls}-pt`, cx: sx(x).toFixed(1), cy: sy(v).toFixed(1), r: 2.5 }));
    });
    plot.append(svg("path", { class: s.cls, d, "data-points": String(s.ys.filter((v) => v !== null).length),
                              "data-name": s.name || "" }));
  }
  return { svg: plot, sx, T, H, B };
}

// ------------------------------------------------------------------ training curves

let curvesTimer = 0;

function setupCurves(job) {
  const show = job.kind === "finetune";
  $("curves").hidden = !show;
  if (!show) return;
  loadCurves(job);
}

async function loadCurves(job) {
  const now = Date.now();
  if (now - curvesTimer < POLL_MS - 100 && $("curves").dataset.jobId === job.id) return;
  curvesTimer = now;
  $("curves").dataset.jobId = job.id;
  let metrics;
  try {
    metrics = await api(`/api/jobs/${job.id}/metrics`);
  } catch (e) {
    metrics = job.metrics || [];
  }
  if (S.selectedId !== job.id) return;
  const stepped = metrics.filter((m) => m.step !== null && m.step !== undefined);
  const byName = new Map();
  for (const m of stepped) {
    if (!byName.has(m.name)) byName.set(m.name, []);
    byName.get(m.name).push(m);
  }
  const box = $("curve-plots");
  if (!byName.size) {
    box.replaceChildren();
    $("curves-note").textContent = TERMINAL.has(job.state) ? "this job recorded no training curve"
      : "waiting for the first training steps…";
    return;
  }
  // one plot for the loss, one for the IoUs (train, validation and the disc prior together),
  // one per collapse diagnostic (train and val_ series together; mask and target area together)
  const groups = new Map();
  for (const [name, ms] of byName) {
    ms.sort((a, b) => a.step - b.step);
    const bare = name.replace(/^val_/, "");
    const g = /loss/i.test(name) ? "loss" : /iou_pred/i.test(name) ? "IoU head"
      : /iou/i.test(name) ? "IoU" : /_area$/.test(bare) ? "mask area (px)" : bare;
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push([name, ms]);
  }
  const plots = [];
  for (const [g, members] of groups) {
    const isLoss = g === "loss";
    const series = members.map(([name, ms], i) => ({
      xs: ms.map((m) => m.step), ys: ms.map((m) => m.value), name,
      cls: isLoss ? "loss-line" : /^val/i.test(name) ? "iou-line" : `series-${i}`,
    }));
    const desc = members.map(([name, ms]) =>
      `${name}: ${ms.length} values, last ${fmtNum(ms[ms.length - 1].value)} at step ${ms[ms.length - 1].step}`).join("; ");
    const { svg: plot } = linePlot({
      series, xlabel: "step", ylabel: g, zeroLine: !isLoss, width: 480, height: 200,
      points: members.some(([, ms]) => ms.length < 40), title: `${g} by training step (${desc})`,
    });
    plot.setAttribute("data-group", g);
    const legend = el("span", { class: "legend" }, ...series.map((s) => el("span", { class: `key ${s.cls}-key` }, s.name)));
    plots.push(el("figure", { class: "curve" }, el("figcaption", {}, g, " ", legend), plot));
  }
  box.replaceChildren(...plots);
  const last = stepped.reduce((a, m) => Math.max(a, m.step), 0);
  $("curves-note").textContent = `${stepped.length} values up to step ${last}${TERMINAL.has(job.state) ? "" : " (updating)"}`;
}

// ------------------------------------------------------------------ viewer

const V = {
  jobId: null,
  bitmap: null, // the drawn frame (ImageBitmap)
  iw: 0, ih: 0, // its size (px)
  step: 1, // the image shows every step-th row and column of the frame (X-Preview-Step)
  scale: 1, tx: 0, ty: 0, // canvas transform: canvas = image * scale + (tx, ty)
  request: 0,
  cache: new Map(), // url -> {bitmap, headers}, a small LRU
  range: null, // {lo, hi, vmin, vmax} of the recording
  playTimer: null,
  hasGt: false,
};

function setupViewer(job) {
  const ok = job.kind === "infer" && job.state === "succeeded" && job.result;
  const viewer = $("viewer");
  if (!ok) { viewer.hidden = true; stopPlay(); return; }
  const fresh = viewer.hidden || viewer.dataset.jobId !== job.id;
  viewer.hidden = false;
  if (!fresh) return;
  viewer.dataset.jobId = job.id;
  V.jobId = job.id;
  V.cache.clear();
  V.range = null;
  V.bitmap = null;
  V.fitted = false;
  const n = job.result.n_frames || 1;
  V.dt = job.result.frame_interval_s || null;
  V.dtKnown = job.result.frame_interval_known !== false && Boolean(V.dt);
  V.px = job.result.pixel_size_um || null;
  const slider = $("frame-slider");
  slider.max = String(n - 1);
  slider.value = "0";
  V.hasGt = Boolean(job.result.source && job.result.source.gt_relpath);
  $("gt-box").hidden = !V.hasGt;
  $("gt-select").value = "0";
  $("range-lo").value = "";
  $("range-hi").value = "";
  clearTrace("Click a cell in the frame (or choose one above) to plot its dF/F trace.");
  loadCells(job);
  showFrame();
}

function frameUrl(t) {
  const q = new URLSearchParams({
    overlay: $("overlay-toggle").checked ? "1" : "0",
    gt: V.hasGt ? $("gt-select").value : "0",
    alpha: $("opacity").value,
    style: $("style-select").value,
    colors: $("colors-select").value,
  });
  const lo = $("range-lo").value, hi = $("range-hi").value;
  if (lo !== "" && hi !== "" && V.range && (Number(lo) !== V.range.lo || Number(hi) !== V.range.hi)) {
    q.set("lo", lo);
    q.set("hi", hi);
  }
  return `/api/jobs/${V.jobId}/frames/${t}.png?${q}`;
}

async function getFrame(url) {
  if (V.cache.has(url)) {
    const hit = V.cache.get(url);
    V.cache.delete(url);
    V.cache.set(url, hit);
    return hit;
  }
  const { blob, headers } = await apiBlob(url);
  const bitmap = await createImageBitmap(blob);
  const hit = { bitmap, headers };
  V.cache.set(url, hit);
  while (V.cache.size > 96) {
    const oldest = V.cache.keys().next().value;
    V.cache.get(oldest).bitmap.close();
    V.cache.delete(oldest);
  }
  return hit;
}

async function showFrame() {
  if (!V.jobId) return;
  const t = Number($("frame-slider").value);
  const secs = V.dtKnown ? ` · ${fmtNum(t * V.dt)} s` : "";
  $("frame-label").textContent = `${t} of 0–${$("frame-slider").max}${secs}`; // frames count from 0, as in the files
  moveMarker();
  const req = ++V.request;
  const url = frameUrl(t);
  try {
    const { bitmap, headers } = await getFrame(url);
    if (req !== V.request) return;
    if (!V.range) {
      V.range = { lo: Number(headers.get("X-Display-Lo")), hi: Number(headers.get("X-Display-Hi")),
                  vmin: Number(headers.get("X-Data-Min")), vmax: Number(headers.get("X-Data-Max")) };
      for (const id of ["range-lo", "range-hi"]) {
        $(id).min = String(V.range.vmin);
        $(id).max = String(V.range.vmax);
      }
      $("range-lo").value = String(V.range.lo);
      $("range-hi").value = String(V.range.hi);
      $("range-note").textContent = `data ${fmtNum(V.range.vmin)}–${fmtNum(V.range.vmax)}`;
    }
    const resized = bitmap.width !== V.iw || bitmap.height !== V.ih;
    // a frame over 4 Mi px comes as every k-th row and column: image px x is frame px k x
    V.step = Number(headers.get("X-Preview-Step")) || 1;
    V.bitmap = bitmap;
    V.iw = bitmap.width;
    V.ih = bitmap.height;
    const canvas = $("view-canvas");
    canvas.dataset.frame = String(t);
    canvas.dataset.size = `${V.iw}x${V.ih}`;
    canvas.dataset.src = url;
    if (resized || !V.fitted) resetView();
    else draw();
    const panels = V.hasGt && $("gt-select").value === "1" ? "; left: prediction, right: ground truth" : "";
    const decimated = V.step > 1
      ? ` (every ${V.step}th row and column of the ${headers.get("X-Frame-Height")} × ${headers.get("X-Frame-Width")} px frame)` : "";
    $("view-status").textContent = `frame ${t}: ${V.ih} × ${V.iw} px${decimated} shown at ${(V.scale).toFixed(2)}×${panels}`;
  } catch (e) {
    if (req === V.request) $("view-status").textContent = `cannot show frame ${t}: ${e.message}`;
  }
}

function resetView() {
  const canvas = $("view-canvas");
  // as large as the column allows, at most 560 px high, the frame's aspect ratio (no bands)
  const aspect = V.ih && V.iw ? V.ih / V.iw : 0.75;
  const cw = Math.max(160, Math.round(Math.min(canvas.parentElement.clientWidth || 640, 900, 560 / aspect)));
  const ch = Math.round(cw * aspect);
  if (canvas.width !== cw || canvas.height !== ch) { canvas.width = cw; canvas.height = ch; }
  if (!V.iw) return;
  V.scale = Math.min(cw / V.iw, ch / V.ih);
  V.tx = (cw - V.iw * V.scale) / 2;
  V.ty = (ch - V.ih * V.scale) / 2;
  V.fitted = true;
  draw();
}

function draw() {
  const canvas = $("view-canvas");
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!V.bitmap) return;
  ctx.imageSmoothingEnabled = false; // pixels stay pixels when zoomed
  ctx.setTransform(V.scale, 0, 0, V.scale, V.tx, V.ty);
  ctx.drawImage(V.bitmap, 0, 0);
  canvas.dataset.transform = `${V.scale.toFixed(4)} ${V.tx.toFixed(1)} ${V.ty.toFixed(1)}`;
  drawScaleBar(ctx, canvas);
}

function niceLength(target) {
  const mag = 10 ** Math.floor(Math.log10(target));
  return [5, 2, 1].map((m) => m * mag).find((v) => v <= target * (1 + 1e-9)) || mag;
}

// a scale bar in the canvas's bottom right: about a fifth of its width, in µm when the pixel
// size is known, else in image pixels (said so)
function drawScaleBar(ctx, canvas) {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  const imagePx = canvas.width / 5 / V.scale;
  let len, label;
  if (V.px) {
    const um = niceLength(imagePx * V.px);
    len = (um / V.px) * V.scale;
    label = `${um} µm`;
  } else {
    const n = niceLength(Math.max(imagePx, 1));
    len = n * V.scale;
    label = `${n} px (pixel size unknown)`;
  }
  const x1 = canvas.width - 10, y1 = canvas.height - 10;
  ctx.font = "12px system-ui, sans-serif";
  const tw = ctx.measureText(label).width;
  ctx.fillStyle = "rgba(0,0,0,0.7)";
  ctx.fillRect(Math.min(x1 - len, x1 - tw) - 4, y1 - 22, Math.max(len, tw) + 8, 26);
  ctx.fillStyle = "#fff";
  ctx.fillRect(x1 - len, y1 - 4, len, 4);
  ctx.textAlign = "right";
  ctx.fillText(label, x1, y1 - 8);
  canvas.dataset.scaleBar = label;
}

function zoomAt(factor, cx, cy) {
  const s = Math.min(64, Math.max(0.1, V.scale * factor));
  const f = s / V.scale;
  V.tx = cx - (cx - V.tx) * f;
  V.ty = cy - (cy - V.ty) * f;
  V.scale = s;
  draw();
  $("view-status").textContent = `zoom ${V.scale.toFixed(2)}× (Reset view to fit)`;
}

function canvasPoint(ev) {
  const canvas = $("view-canvas");
  const r = canvas.getBoundingClientRect();
  return { x: ((ev.clientX - r.left) * canvas.width) / r.width, y: ((ev.clientY - r.top) * canvas.height) / r.height };
}

// image pixel (column x, row y) under a canvas point, or null; side by side: the same pixel
function toPixel(p) {
  if (!V.bitmap) return null;
  let x = Math.floor((p.x - V.tx) / V.scale);
  const y = Math.floor((p.y - V.ty) / V.scale);
  if (x < 0 || y < 0 || x >= V.iw || y >= V.ih) return null;
  if (V.hasGt && $("gt-select").value === "1") {
    const panel = (V.iw - GAP_PX) / 2;
    if (x >= panel && x < panel + GAP_PX) return null;
    if (x >= panel + GAP_PX) x -= panel + GAP_PX;
  }
  return { x, y };
}

let drag = null;

function onPointerDown(ev) {
  if (ev.button !== 0) return;
  drag = { p: canvasPoint(ev), tx: V.tx, ty: V.ty, moved: false };
  $("view-canvas").setPointerCapture(ev.pointerId);
}

function onPointerMove(ev) {
  if (!drag) return;
  const p = canvasPoint(ev);
  const dx = p.x - drag.p.x, dy = p.y - drag.p.y;
  if (!drag.moved && Math.hypot(dx, dy) < 4) return;
  drag.moved = true;
  V.tx = drag.tx + dx;
  V.ty = drag.ty + dy;
  draw();
}

function onPointerUp(ev) {
  if (!drag) return;
  const wasDrag = drag.moved;
  drag = null;
  if (!wasDrag) cellClicked(toPixel(canvasPoint(ev)));
}

function onWheel(ev) {
  ev.preventDefault();
  const p = canvasPoint(ev);
  zoomAt(ev.deltaY < 0 ? 1.25 : 0.8, p.x, p.y);
}

function onCanvasKey(ev) {
  const c = $("view-canvas");
  const mid = [c.width / 2, c.height / 2];
  if (ev.key === "+" || ev.key === "=") { zoomAt(1.25, ...mid); ev.preventDefault(); }
  else if (ev.key === "-") { zoomAt(0.8, ...mid); ev.preventDefault(); }
  else if (ev.key === "0") { resetView(); ev.preventDefault(); }
  else if (ev.shiftKey && ev.key.startsWith("Arrow")) {
    const d = 40;
    if (ev.key === "ArrowLeft") V.tx += d;
    if (ev.key === "ArrowRight") V.tx -= d;
    if (ev.key === "ArrowUp") V.ty += d;
    if (ev.key === "ArrowDown") V.ty -= d;
    draw();
    ev.preventDefault();
    ev.stopPropagation();
  }
}

function stopPlay() {
  if (V.playTimer) clearTimeout(V.playTimer);
  V.playTimer = null;
  $("play").textContent = "Play";
  $("play").setAttribute("aria-pressed", "false");
}

function togglePlay() {
  if (V.playTimer) { stopPlay(); return; }
  $("play").textContent = "Pause";
  $("play").setAttribute("aria-pressed", "true");
  const step = async () => {
    const s = $("frame-slider");
    s.value = String((Number(s.value) + 1) % (Number(s.max) + 1));
    await showFrame();
    getFrame(frameUrl((Number(s.value) + 1) % (Number(s.max) + 1))).catch(() => {}); // prefetch
    if (V.playTimer) V.playTimer = setTimeout(step, 120);
  };
  V.playTimer = setTimeout(step, 0);
}

function stepFrame(delta) {
  const s = $("frame-slider");
  s.value = String(Math.min(Number(s.max), Math.max(0, Number(s.value) + delta)));
  showFrame();
}

let rangeTimer = null;
function rangeChanged() {
  clearTimeout(rangeTimer);
  rangeTimer = setTimeout(() => {
    const lo = Number($("range-lo").value), hi = Number($("range-hi").value);
    if (!(hi > lo)) { $("range-note").textContent = "the high value must be above the low value"; return; }
    $("range-note").textContent = V.range ? `data ${fmtNum(V.range.vmin)}–${fmtNum(V.range.vmax)}` : "";
    showFrame();
  }, 250);
}

// ------------------------------------------------------------------ cells and dF/F traces

let trace = null; // {jobId, cell_id, time_s, dff} of the plotted cell
let traceRequest = 0;
let markerSx = null;

function clearTrace(message) {
  trace = null;
  traceRequest += 1;
  $("trace-plot").replaceChildren();
  $("trace-caption").textContent = message;
}

async function loadCells(job) {
  const sel = $("cell-select");
  sel.replaceChildren(el("option", { value: "" }, "choose a cell…"));
  try {
    const out = await api(`/api/jobs/${job.id}/cells`);
    const ids = out.ids || [];
    const peaks = out.peak_dff || [];
    sel.append(...ids.map((id, i) => el("option", { value: String(id) },
      `cell ${id}${peaks[i] === null || peaks[i] === undefined ? "" : ` (peak dF/F ${fmtNum(peaks[i])})`}`)));
    sel.disabled = !ids.length;
  } catch (_) {
    sel.disabled = true;
  }
}

async function cellClicked(p) {
  if (!p || !V.jobId) return;
  const t = Number($("frame-slider").value);
  const jobId = V.jobId;
  const req = ++traceRequest;
  const x = p.x * (V.step || 1), y = p.y * (V.step || 1); // frame px
  try {
    const at = await api(`/api/jobs/${jobId}/cells/at?t=${t}&x=${x}&y=${y}`);
    if (req !== traceRequest) return;
    if (at.cell_id === null) { clearTrace(`no cell here (pixel x ${x}, y ${y}, frame ${t})`); return; }
    await plotCell(at.cell_id, req);
  } catch (e) {
    if (req === traceRequest) clearTrace(`could not load the trace: ${e.message}`);
  }
}

async function plotCell(cellId, req = ++traceRequest) {
  const jobId = V.jobId;
  $("trace-caption").textContent = `cell ${cellId}: loading trace…`;
  try {
    const tr = await api(`/api/jobs/${jobId}/cells/${cellId}/trace`);
    if (req !== traceRequest) return;
    trace = { jobId, ...tr };
    drawTrace();
    $("trace-caption").textContent = `cell ${tr.cell_id}`;
    const sel = $("cell-select");
    if ([...sel.options].some((o) => o.value === String(tr.cell_id))) sel.value = String(tr.cell_id);
  } catch (e) {
    if (req === traceRequest) clearTrace(`could not load the trace: ${e.message}`);
  }
}

function drawTrace() {
  const box = $("trace-plot");
  if (!trace) { box.replaceChildren(); return; }
  const ts = trace.time_s, ys = trace.dff;
  const finite = ys.filter((v) => v !== null);
  const t1 = ts.length > 1 ? ts[ts.length - 1] : 1;
  const peak = finite.length ? Math.max(...finite) : NaN;
  const plot = linePlot({
    series: [{ xs: ts, ys, cls: "trace-line" }], width: 480, height: 260, ylabel: "dF/F (dimensionless)",
    xlabel: V.dtKnown === false ? "time (s; 1 s per frame assumed)" : "time (s)",
    title: `dF/F trace of cell ${trace.cell_id}: ${ys.length} frames over ${Number(t1).toFixed(1)} s`
      + (finite.length ? `, peak dF/F ${peak.toFixed(2)}` : ", no finite dF/F values"),
  });
  plot.svg.append(svg("line", { id: "trace-marker", class: "marker", x1: 0, x2: 0, y1: plot.T, y2: plot.H - plot.B }));
  box.replaceChildren(plot.svg);
  markerSx = plot.sx;
  moveMarker();
}

// The vertical marker at the time of the frame shown in the viewer.
function moveMarker() {
  const m = document.getElementById("trace-marker");
  if (!m || !trace || !markerSx) return;
  const t = Number($("frame-slider").value);
  const time = trace.time_s[t];
  m.style.display = time === null || time === undefined ? "none" : "";
  if (time === null || time === undefined) return;
  const x = markerSx(time).toFixed(1);
  m.setAttribute("x1", x);
  m.setAttribute("x2", x);
  m.setAttribute("data-frame", String(t));
}

// ------------------------------------------------------------------ model comparison

async function refreshCompare() {
  // GET /api/metrics?kind=evaluate: final numbers of the caller's evaluate jobs, with the
  // dataset each used; one row per model, split and job, optionally one dataset only
  const table = $("compare-table");
  try {
    const all = await api("/api/metrics?kind=evaluate&limit=2000");
    const sel = $("compare-dataset");
    const keep = sel.value;
    const datasets = [...new Set(all.map((m) => m.dataset_job_id || ""))];
    sel.replaceChildren(el("option", { value: "" }, "all"),
      ...datasets.filter(Boolean).map((d) => el("option", { value: d }, `simulate ${short(d)}`)));
    if (datasets.includes(keep)) sel.value = keep;
    const rows = all.filter((m) => !sel.value || m.dataset_job_id === sel.value).map((m) => ({
      ...m, key: `${m.model || "—"} · ${m.subset || ""} · dataset ${short(m.dataset_job_id) || "—"} · evaluate ${short(m.job_id)}`,
    }));
    const jobs = new Set(rows.map((m) => m.job_id));
    $("compare-note").textContent = rows.length
      ? `${jobs.size} evaluate job(s); rows are model · split · dataset · job, columns are metrics`
      : "no evaluate job has metrics yet: start one (kind evaluate) on a simulate job's held-out videos";
    table.hidden = !rows.length;
    if (rows.length) renderMetricsTable(table, rows, (m) => m.key);
  } catch (e) {
    $("compare-note").textContent = `cannot load the evaluations: ${e.message}`;
  }
}

// ------------------------------------------------------------------ wiring

function jobFromHash() {
  const h = location.hash.replace(/^#/, "");
  const id = new URLSearchParams(h).get("job");
  if (id && id !== S.selectedId) selectJob(id);
  else if (!id && S.selectedId) closeDetail(); // Back past the first job opened
}

// the job detail closed: nothing selected, its section and what it drew hidden
function closeDetail() {
  S.selectedId = null;
  S.selectedJob = null;
  stopPlay();
  for (const id of ["detail", "viewer", "curves", "analysis", "result-box"]) $(id).hidden = true;
  $("viewer").dataset.jobId = "";
  A.jobId = null;
  $("artifact-list").dataset.jobId = "";
  refreshJobs();
}

let started = false;
async function startApp() {
  refreshJobs();
  await Promise.all([loadRecordings(), loadKinds()]);
  refreshCompare();
  jobFromHash();
  if (S.pollTimer) clearInterval(S.pollTimer);
  S.pollTimer = setInterval(() => {
    if (document.hidden) return;
    refreshJobs();
    refreshDetail();
    if (S.selectedJob && S.selectedJob.kind === "finetune" && !TERMINAL.has(S.selectedJob.state)) loadCurves(S.selectedJob);
  }, POLL_MS);
  if (started) return;
  started = true;
  setInterval(checkService, 15000);
  setInterval(() => { if (S.token && !document.hidden) { loadRecordings(); refreshCompare(); } }, 15000);
}

function wire() {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (t) signIn(t);
  });
  $("sign-out").addEventListener("click", () => signedOut("signed out"));
  for (const id of ["filter-kind", "filter-state"]) { // kept across reloads (this browser)
    const select = $(id);
    const saved = localStorage.getItem(`calseg.${id}`);
    if (saved !== null && [...select.options].some((o) => o.value === saved)) select.value = saved;
    select.addEventListener("change", () => {
      localStorage.setItem(`calseg.${id}`, select.value);
      refreshJobs();
    });
  }
  $("upload-form").addEventListener("submit", uploadRecording);
  $("job-kind").addEventListener("change", () => renderForm($("job-kind").value));
  $("job-form").addEventListener("submit", submitJob);
  $("job-form").addEventListener("input", (ev) => {
    const name = ev.target.dataset.field || (ev.target.closest("[data-field]") || {}).dataset?.field;
    if (name) fieldError($("job-kind").value, name, "");
  });
  $("compare-refresh").addEventListener("click", refreshCompare);
  $("compare-dataset").addEventListener("change", refreshCompare);

  $("frame-slider").addEventListener("input", showFrame);
  for (const id of ["overlay-toggle", "style-select", "colors-select", "gt-select"]) $(id).addEventListener("change", showFrame);
  $("opacity").addEventListener("input", showFrame);
  $("range-lo").addEventListener("input", rangeChanged);
  $("range-hi").addEventListener("input", rangeChanged);
  $("range-auto").addEventListener("click", () => {
    if (!V.range) return;
    $("range-lo").value = String(V.range.lo);
    $("range-hi").value = String(V.range.hi);
    showFrame();
  });
  $("play").addEventListener("click", togglePlay);
  const canvas = $("view-canvas");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", () => { drag = null; });
  canvas.addEventListener("wheel", onWheel, { passive: false });
  canvas.addEventListener("keydown", onCanvasKey);
  const mid = () => [canvas.width / 2, canvas.height / 2];
  $("zoom-in").addEventListener("click", () => zoomAt(1.25, ...mid()));
  $("zoom-out").addEventListener("click", () => zoomAt(0.8, ...mid()));
  $("zoom-reset").addEventListener("click", resetView);
  $("raster-sort").addEventListener("change", drawRaster);
  $("raster-canvas").addEventListener("click", rasterClick);
  window.addEventListener("resize", () => { if (!$("analysis").hidden && A.cells) drawRaster(); });
  $("cell-select").addEventListener("change", () => {
    const v = $("cell-select").value;
    if (v) plotCell(Number(v));
  });
  window.addEventListener("resize", () => { if (!$("viewer").hidden) resetView(); });
  document.addEventListener("keydown", (ev) => {
    // ArrowLeft/Right step frames while the viewer is open (the slider does it natively)
    if ($("viewer").hidden || $("app").hidden) return;
    const a = document.activeElement;
    if (a && (["INPUT", "SELECT", "TEXTAREA"].includes(a.tagName) || a.isContentEditable)) return;
    if (ev.key === "ArrowRight" && !ev.shiftKey) { stepFrame(1); ev.preventDefault(); }
    else if (ev.key === "ArrowLeft" && !ev.shiftKey) { stepFrame(-1); ev.preventDefault(); }
  });
  window.addEventListener("hashchange", () => { // links, Back, Forward, a pasted #token= address
    const t = tokenFromHash();
    if (t && t !== S.token) useLinkedToken(t);
    else if (S.token) jobFromHash();
  });
  $("switch-yes").addEventListener("click", () => {
    const t = S.linkedToken;
    closeSwitch();
    if (t) signIn(t);
  });
  $("switch-no").addEventListener("click", closeSwitch);
}

wire();
const linked = tokenFromHash();
checkService();
const saved = localStorage.getItem(TOKEN_KEY);
if (saved) {
  // signed in already: a different token in the link is offered, never taken silently
  signIn(saved).then((ok) => { if (linked && linked !== saved) (ok ? useLinkedToken(linked) : signIn(linked)); });
} else if (linked) signIn(linked);
else signedOut("");
