// CalSeg page: jobs table (polled every 2 s), job detail, frame viewer, metrics. No framework.
"use strict";

const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);
let selectedId = null;
let selectedJob = null;
let playTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

async function api(path, options = {}) {
  const r = await fetch(path, options);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.detail) || `${r.status} ${r.statusText}`);
  return body;
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

async function checkService() {
  try {
    const r = await fetch("/api/ready");
    const b = await r.json();
    $("service-status").textContent = r.ok ? "service ready" : `service not ready: database ${b.database}, broker ${b.broker}`;
  } catch (e) {
    $("service-status").textContent = "service unreachable";
  }
}

async function action(jobId, verb) {
  try {
    await api(`/api/jobs/${jobId}/${verb}`, { method: "POST" });
  } catch (e) {
    alert(`${verb} failed: ${e.message}`);
  }
  refreshJobs();
}

function jobRow(job) {
  const pct = Math.round((job.progress || 0) * 100);
  const actions = el("td", {},
    el("button", { type: "button", onclick: () => selectJob(job.id),
                   "aria-label": `view ${job.kind} job ${job.id.slice(0, 8)}` }, "View"));
  if (!TERMINAL.has(job.state)) {
    actions.append(" ", el("button", { type: "button", onclick: () => action(job.id, "cancel"),
                                      "aria-label": `cancel ${job.kind} job` }, "Cancel"));
  } else if (job.state !== "succeeded") {
    actions.append(" ", el("button", { type: "button", onclick: () => action(job.id, "retry"),
                                      "aria-label": `retry ${job.kind} job` }, "Retry"));
  }
  return el("tr", { class: job.id === selectedId ? "selected" : "", "data-job-id": job.id },
    el("td", { title: job.id }, fmtTime(job.created_at)),
    el("td", {}, job.kind),
    el("td", { class: `state-${job.state}` }, job.state),
    el("td", {}, el("progress", { max: "100", value: String(pct), "aria-label": `${job.kind} progress ${pct}%` }), ` ${pct}%`),
    el("td", { title: job.message || "" }, job.stage || ""),
    el("td", {}, job.state === "running" ? fmtEta(job.eta_s) : ""),
    actions);
}

async function refreshJobs() {
  const q = new URLSearchParams({ limit: "100" });
  if ($("filter-kind").value) q.set("kind", $("filter-kind").value);
  if ($("filter-state").value) q.set("state", $("filter-state").value);
  try {
    const page = await api(`/api/jobs?${q}`);
    const body = $("jobs-body");
    body.replaceChildren(...(page.items.length ? page.items.map(jobRow)
      : [el("tr", {}, el("td", { colspan: "7" }, "no jobs yet"))]));
    $("jobs-updated").textContent = `${page.total} job(s), updated ${new Date().toLocaleTimeString()}`;
    const models = page.items.filter((j) => j.kind === "finetune" && j.state === "succeeded");
    const sel = $("upload-model");
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "base model"),
      ...models.map((m) => el("option", { value: m.id }, `fine-tuned ${m.id.slice(0, 8)}`)));
    sel.value = keep;
  } catch (e) {
    $("jobs-updated").textContent = `could not load jobs: ${e.message}`;
  }
}

function field(dl, name, value) {
  if (value === null || value === undefined || value === "") return;
  dl.append(el("dt", {}, name), el("dd", {}, value));
}

function renderMetrics(metrics) {
  const box = $("metrics");
  box.hidden = !metrics.length;
  if (!metrics.length) return;
  const names = [...new Set(metrics.map((m) => m.name))];
  const models = [...new Set(metrics.map((m) => m.model || "—"))];
  const table = $("metrics-table");
  table.tHead.replaceChildren(el("tr", {}, el("th", { scope: "col" }, "model"),
    ...names.map((n) => el("th", { scope: "col" }, n))));
  table.tBodies[0].replaceChildren(...models.map((model) => el("tr", {},
    el("th", { scope: "row" }, model),
    ...names.map((n) => {
      const m = metrics.find((x) => (x.model || "—") === model && x.name === n);
      return el("td", {}, m && m.value !== null ? m.value.toFixed(3) : "–");
    }))));
}

function renderDetail(job) {
  $("detail").hidden = false;
  $("detail-title").textContent = `${job.kind} job ${job.id}`;
  const dl = $("detail-fields");
  dl.replaceChildren();
  field(dl, "state", job.state);
  field(dl, "progress", `${Math.round(job.progress * 100)}%${job.stage ? ` (${job.stage})` : ""}`);
  field(dl, "message", job.message);
  field(dl, "error", job.error);
  field(dl, "attempts", String(job.attempts));
  field(dl, "code version", job.code_version);
  field(dl, "parameters", JSON.stringify(job.params));
  const warnings = (job.result && job.result.warnings) || [];
  if (warnings.length) {
    dl.append(el("dt", {}, "warnings"), el("dd", { class: "warn" }, warnings.join(" | ")));
  }
  if (job.result && job.result.table) {
    dl.append(el("dt", {}, "report"), el("dd", {}, el("pre", {}, job.result.table)));
  }
  renderMetrics(job.metrics || []);
  const arts = job.artifacts || [];
  $("artifacts").hidden = !arts.length;
  $("artifact-list").replaceChildren(...arts.map((a) => el("li", {},
    el("a", { href: a.url, target: "_blank", rel: "noopener" }, a.name),
    ` (${a.kind}, ${(a.size_bytes / 1024).toFixed(1)} KiB, sha256 ${a.sha256.slice(0, 12)}…)`)));
  $("log-tail").textContent = job.log_tail || "";
  setupViewer(job);
}

function setupViewer(job) {
  const ok = job.kind === "infer" && job.state === "succeeded" && job.result;
  const viewer = $("viewer");
  if (!ok) { viewer.hidden = true; stopPlay(); return; }
  const fresh = viewer.hidden || viewer.dataset.jobId !== job.id;
  viewer.hidden = false;
  if (!fresh) return;
  viewer.dataset.jobId = job.id;
  const n = job.result.n_frames || 1;
  const slider = $("frame-slider");
  slider.max = String(n - 1);
  slider.value = "0";
  $("gt-label").hidden = !(job.result.source && job.result.source.gt_relpath);
  $("gt-toggle").checked = false;
  showFrame();
}

function frameUrl() {
  const t = $("frame-slider").value;
  const overlay = $("overlay-toggle").checked ? 1 : 0;
  const gt = $("gt-toggle").checked && !$("gt-label").hidden ? 1 : 0;
  return `/api/jobs/${selectedId}/frames/${t}.png?overlay=${overlay}&gt=${gt}`;
}

function showFrame() {
  const t = $("frame-slider").value;
  $("frame-label").textContent = `${t} / ${Number($("frame-slider").max) + 1}`; // as on the contact sheets
  $("frame-img").src = frameUrl();
  $("frame-img").alt = `frame ${t}${$("overlay-toggle").checked ? " with predicted cells overlaid" : ""}`;
}

function stopPlay() {
  if (playTimer) clearInterval(playTimer);
  playTimer = null;
  $("play").textContent = "Play";
  $("play").setAttribute("aria-pressed", "false");
}

function togglePlay() {
  if (playTimer) { stopPlay(); return; }
  $("play").textContent = "Pause";
  $("play").setAttribute("aria-pressed", "true");
  playTimer = setInterval(() => {
    const s = $("frame-slider");
    s.value = String((Number(s.value) + 1) % (Number(s.max) + 1));
    showFrame();
  }, 150);
}

async function selectJob(id) {
  selectedId = id;
  stopPlay();
  $("viewer").hidden = true;
  await refreshDetail();
  refreshJobs();
  $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
}

async function refreshDetail() {
  if (!selectedId) return;
  if (selectedJob && selectedJob.id === selectedId && TERMINAL.has(selectedJob.state)) return;
  try {
    selectedJob = await api(`/api/jobs/${selectedId}`);
    renderDetail(selectedJob);
  } catch (e) {
    $("detail-fields").replaceChildren(el("dt", {}, "error"), el("dd", {}, e.message));
  }
}

async function uploadAndSegment(ev) {
  ev.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  const status = $("upload-status");
  status.textContent = `uploading ${file.name}…`;
  try {
    const form = new FormData();
    form.append("file", file);
    const rec = await api("/api/recordings", { method: "POST", body: form });
    status.textContent = `${rec.filename}: ${rec.n_frames} frames of ${rec.height}×${rec.width}; submitting…`;
    const params = { recording_id: rec.id, method: $("upload-method").value };
    if ($("upload-model").value) params.model_job_id = $("upload-model").value;
    const job = await api("/api/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ kind: "infer", params }),
    });
    status.textContent = `infer job ${job.id.slice(0, 8)} queued`;
    selectJob(job.id);
  } catch (e) {
    status.textContent = `failed: ${e.message}`;
  }
}

$("frame-slider").addEventListener("input", showFrame);
$("overlay-toggle").addEventListener("change", showFrame);
$("gt-toggle").addEventListener("change", showFrame);
$("play").addEventListener("click", togglePlay);
$("filter-kind").addEventListener("change", refreshJobs);
$("filter-state").addEventListener("change", refreshJobs);
$("upload-form").addEventListener("submit", uploadAndSegment);
document.addEventListener("keydown", (ev) => {
  if ($("viewer").hidden || ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
  const s = $("frame-slider");
  if (ev.key === "ArrowRight") { s.value = String(Math.min(Number(s.max), Number(s.value) + 1)); showFrame(); }
  else if (ev.key === "ArrowLeft") { s.value = String(Math.max(0, Number(s.value) - 1)); showFrame(); }
  else if (ev.key === " " && document.activeElement.tagName !== "BUTTON") { ev.preventDefault(); togglePlay(); }
});

const hash = location.hash.replace(/^#job=/, "");
if (hash) selectJob(hash);
checkService();
refreshJobs();
setInterval(() => { refreshJobs(); refreshDetail(); }, POLL_MS);
setInterval(checkService, 15000);
