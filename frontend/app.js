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
  clearTrace("Click a cell in the frame to plot its dF/F trace.");
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
  moveMarker();
}

// ---- click a cell: its dF/F trace as an inline SVG line plot
const SVG_NS = "http://www.w3.org/2000/svg";
let trace = null; // {jobId, cell_id, time_s, dff} of the plotted cell
let traceRequest = 0;

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

function clearTrace(message) {
  trace = null;
  traceRequest += 1;
  $("trace-plot").replaceChildren();
  $("trace-caption").textContent = message;
}

// The image pixel (column x, row y) under a click on #frame-img, or null outside the picture.
// The element is scaled (CSS height, object-fit: contain) so the displayed size differs from
// the natural size; with the ground-truth panel beside, a click on it maps to the same pixel.
function clickToPixel(ev) {
  const img = ev.currentTarget;
  const nw = img.naturalWidth, nh = img.naturalHeight;
  if (!nw || !nh) return null;
  const rect = img.getBoundingClientRect();
  const cw = img.clientWidth, ch = img.clientHeight; // content + padding, without border
  const scale = Math.min(cw / nw, ch / nh);
  const ox = img.clientLeft + (cw - nw * scale) / 2;
  const oy = img.clientTop + (ch - nh * scale) / 2;
  let x = Math.floor((ev.clientX - rect.left - ox) / scale);
  const y = Math.floor((ev.clientY - rect.top - oy) / scale);
  if (x < 0 || y < 0 || x >= nw || y >= nh) return null;
  if ($("gt-toggle").checked && !$("gt-label").hidden) {
    const panel = (nw - 4) / 2; // GAP_PX = 4 in api/frames.py
    if (x >= panel && x < panel + 4) return null;
    if (x >= panel + 4) x -= panel + 4;
  }
  return { x, y };
}

async function cellClicked(ev) {
  const p = clickToPixel(ev);
  if (!p || !selectedId) return;
  const t = Number($("frame-slider").value);
  const jobId = selectedId;
  const req = ++traceRequest;
  try {
    const at = await api(`/api/jobs/${jobId}/cells/at?t=${t}&x=${p.x}&y=${p.y}`);
    if (req !== traceRequest) return;
    if (at.cell_id === null) { clearTrace(`no cell here (pixel x ${p.x}, y ${p.y}, frame ${t})`); return; }
    $("trace-caption").textContent = `cell ${at.cell_id}: loading trace…`;
    const tr = await api(`/api/jobs/${jobId}/cells/${at.cell_id}/trace`);
    if (req !== traceRequest) return;
    trace = { jobId, ...tr };
    drawTrace();
    $("trace-caption").textContent = `cell ${tr.cell_id}`;
  } catch (e) {
    if (req === traceRequest) clearTrace(`could not load the trace: ${e.message}`);
  }
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

function drawTrace() {
  const box = $("trace-plot");
  if (!trace) { box.replaceChildren(); return; }
  const W = 640, H = 240, L = 58, R = 14, T = 12, B = 42;
  const ts = trace.time_s, ys = trace.dff;
  const finite = ys.filter((v) => v !== null);
  let lo = finite.length ? Math.min(0, ...finite) : 0;
  let hi = finite.length ? Math.max(...finite) : 1;
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const t0 = ts.length ? ts[0] : 0, t1 = ts.length > 1 ? ts[ts.length - 1] : t0 + 1;
  const sx = (t) => L + ((t - t0) / (t1 - t0 || 1)) * (W - L - R);
  const sy = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  let d = "";
  let pen = false;
  ys.forEach((v, i) => {
    if (v === null || ts[i] === null) { pen = false; return; }
    d += `${pen ? "L" : "M"}${sx(ts[i]).toFixed(1)},${sy(v).toFixed(1)}`;
    pen = true;
  });
  const n = finite.length;
  const peak = n ? Math.max(...finite) : NaN;
  const plot = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `dF/F trace of cell ${trace.cell_id}: ${ys.length} frames over ${t1.toFixed(1)} s`
      + (n ? `, peak dF/F ${peak.toFixed(2)}` : ", no finite dF/F values"),
  });
  plot.append(svg("title", {}, `dF/F of cell ${trace.cell_id}`));
  for (const v of niceTicks(lo, hi)) {
    plot.append(svg("line", { class: "axis", x1: L - 4, x2: L, y1: sy(v), y2: sy(v) }),
      svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, String(v)));
  }
  for (const v of niceTicks(t0, t1)) {
    plot.append(svg("line", { class: "axis", x1: sx(v), x2: sx(v), y1: H - B, y2: H - B + 4 }),
      svg("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle" }, String(v)));
  }
  if (lo < 0 && hi > 0) plot.append(svg("line", { class: "zero", x1: L, x2: W - R, y1: sy(0), y2: sy(0) }));
  plot.append(
    svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }),
    svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }),
    svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "time (s)"),
    svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle",
                  transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "dF/F"),
    svg("path", { class: "trace-line", d }),
    svg("line", { id: "trace-marker", class: "marker", x1: 0, x2: 0, y1: T, y2: H - B }));
  box.replaceChildren(plot);
  trace.sx = sx;
  moveMarker();
}

// The vertical marker at the time of the frame shown in the viewer.
function moveMarker() {
  const m = document.getElementById("trace-marker");
  if (!m || !trace) return;
  const t = Number($("frame-slider").value);
  const time = trace.time_s[t];
  m.style.display = time === null || time === undefined ? "none" : "";
  if (time === null || time === undefined) return;
  const x = trace.sx(time).toFixed(1);
  m.setAttribute("x1", x);
  m.setAttribute("x2", x);
  m.setAttribute("data-frame", String(t));
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
  selectedJob = null; // render this job even if it is the one shown before (and ended)
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
    // e.g. a stale #job= link: say so instead of leaving the section hidden
    $("detail").hidden = false;
    $("viewer").hidden = true;
    $("detail-title").textContent = `job ${selectedId}`;
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
$("frame-img").addEventListener("click", cellClicked);
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

function jobFromHash() {
  const id = decodeURIComponent(location.hash.replace(/^#job=/, ""));
  if (id && id !== selectedId) selectJob(id);
}
window.addEventListener("hashchange", jobFromHash); // links, Back and Forward
jobFromHash();
checkService();
refreshJobs();
setInterval(() => { refreshJobs(); refreshDetail(); }, POLL_MS);
setInterval(checkService, 15000);
