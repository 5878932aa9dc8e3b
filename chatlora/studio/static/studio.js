"use strict";
// The studio page: plain JS over the studio's API (README "Studio"), the same calls a script makes.
const $ = (id) => document.getElementById(id);
const KNOBS = ["max_steps", "epochs", "lr", "lora_r", "batch_size", "val_size", "max_length", "save_steps", "eval_steps"];
const FINAL = ["done", "failed", "cancelled", "interrupted"];
let info = null, current = null, stream = null, chart = null, chats = {base: [], tuned: []}, models = null;
let estimatedPeak = null;  // the plan's peak memory, from the run's begin line

function auth(extra) {
  const h = {...(extra || {})};
  const key = $("apikey").value || localStorage.getItem("chatlora-studio-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, opts) {
  const o = opts || {};
  const headers = auth(o.json !== undefined ? {"Content-Type": "application/json"} : {});
  const resp = await fetch(path, {method: o.method || (o.body || o.json !== undefined ? "POST" : "GET"), headers,
                                  body: o.json !== undefined ? JSON.stringify(o.json) : o.body});
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch (e) { body = text; }
  if (!resp.ok) throw new Error((body && body.error && body.error.message) || resp.status + " " + resp.statusText);
  return body;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => (k === "class" ? (e.className = v) : e.setAttribute(k, v)));
  children.flat().forEach((c) => e.append(c instanceof Node ? c : String(c)));
  return e;
}

function showError(where, err) {
  $(where).hidden = !err;
  $(where).textContent = err ? String(err.message || err) : "";
}

// ------------------------------------------------------------ 1. bring: options, preview, plan, train

function options() {
  const out = {};
  const extra = $("extra").value.trim();
  if (extra) {
    try { Object.assign(out, JSON.parse(extra)); } catch (e) { throw new Error("More options: not valid JSON: " + e.message); }
  }
  for (const name of KNOBS) {
    const v = $("knob-" + name).value.trim();
    if (v !== "") out[name] = Number(v);
  }
  if ($("model").value.trim()) out.model = $("model").value.trim();
  if ($("device").value !== "auto") out.device = $("device").value;
  return out;
}

function form() {
  const data = $("data").files[0];
  if (!data) throw new Error("choose a dialogues file (JSON or JSONL) first");
  const f = new FormData();
  f.append("data", data);
  if ($("card").files[0]) f.append("card", $("card").files[0]);
  f.append("options", JSON.stringify(options()));
  return f;
}

async function busy(button, work) {
  const b = $(button);
  b.disabled = true;
  showError("bring-error", null);
  try { await work(); } catch (e) { showError("bring-error", e); } finally { b.disabled = false; }
}

function renderRecord(r) {
  const head = el("span", {class: "head"},
    `line ${r.line}: ${r.tokens} tokens, ${r.trained} trained, ${r.control} control` + (r.truncated ? " (cut at max_length)" : ""));
  const body = r.runs.map(([text, control, trained]) =>
    control ? el("span", {class: "ctl" + (trained ? " trn" : "")}, text) : trained ? el("span", {class: "trn"}, text) : text);
  return el("div", {class: "record"}, head, body);
}

async function preview() {
  const p = await api("/api/preview", {body: form()});
  const s = p.stats;
  $("stats").textContent = `${s.records} conversations, ${s.assistant_turns} replies` +
    (s.tokens ? `, tokens per conversation: ${Object.entries(s.tokens).map(([k, v]) => k + " " + v).join(", ")}` : "");
  $("warnings").replaceChildren(...p.warnings.map((w) => el("li", {}, w)));
  $("records").replaceChildren(...p.records.map(renderRecord));
  $("preview").hidden = false;
}

async function plan() {
  const p = await api("/api/plan", {body: form()});
  $("plan").textContent = p.lines.join("\n") + `\n\n${p.steps} optimizer steps (${p.steps_per_epoch} per epoch), ` +
    `${p.train_records} conversations trained, ${p.held_out_records} held out`;
  $("plan").hidden = false;
}

async function train() {
  const run = await api("/api/runs", {body: form()});
  await refreshRuns();
  select(run.id);
}

// ------------------------------------------------------------ 2. runs

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
function duration(s) { return s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`; }

async function refreshRuns() {
  const {runs} = await api("/api/runs");
  $("runs").tBodies[0].replaceChildren(...runs.map((r) => {
    const tr = el("tr", {"data-id": r.id, class: current === r.id ? "selected" : ""},
      el("td", {}, r.id), el("td", {}, r.data + (r.card ? " + " + r.card : "")),
      el("td", {}, el("span", {class: "state " + r.state}, r.state + (r.queue_position ? ` (#${r.queue_position})` : ""))),
      el("td", {}, `${r.step}/${r.max_steps || "?"}`), el("td", {}, fmt(r.loss, 4)),
      el("td", {}, el("button", {}, "open")));
    tr.querySelector("button").onclick = () => select(r.id);
    return tr;
  }));
  return runs;
}

// ------------------------------------------------------------ 3. train and watch

function select(id) {
  if (current !== id) {
    current = id;
    chats = {base: [], tuned: []};
    models = null;
    $("chat-base").replaceChildren();
    $("chat-tuned").replaceChildren();
    $("eval-result").replaceChildren();
    $("export-result").replaceChildren();
    follow(id);
  }
  $("run").hidden = false;
  $("run-id").textContent = id;
  document.querySelectorAll("#runs tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.id === id));
  refreshRun();
}

async function follow(id) {
  // The run's metrics.jsonl as server-sent events, read with fetch so an API key can go along (EventSource can't).
  if (stream) stream.abort();
  const ctrl = new AbortController();
  stream = ctrl;
  chart.clear();
  $("chart").dataset.points = "0";
  try {
    const resp = await fetch(`/api/runs/${id}/events`, {headers: auth(), signal: ctrl.signal});
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = {};
        block.split("\n").forEach((line) => { const i = line.indexOf(": "); ev[line.slice(0, i)] = line.slice(i + 2); });
        onEvent(ev);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError("bring-error", e);
  }
  if (stream === ctrl) refreshRun();
}

function onEvent(ev) {
  if (ev.event === "reset") { chart.clear(); return; }
  if (ev.event === "state") { renderRun(JSON.parse(ev.data)); return; }
  if (ev.event) return;
  const row = JSON.parse(ev.data);
  if ("loss" in row) chart.add("train loss", row.step, row.loss);
  if ("eval_loss" in row) chart.add("held-out loss", row.step, row.eval_loss);
  $("chart").dataset.points = String(chart.count());
  if (row.step !== undefined && !row.event) {
    $("progress").value = row.step;
    if ("loss" in row) $("run-figures").textContent = `step ${row.step}, loss ${fmt(row.loss, 4)}, ` +
      `${fmt(row.tokens_per_second_recent, 0)} tokens/s`;
    if ("peak_memory_gib" in row) {
      estimatedPeak = row.estimated_peak_gib ?? estimatedPeak;
      $("memory").textContent = memoryText(row.peak_memory_gib, row.peak_reserved_gib, estimatedPeak);
    }
  }
  if (row.event === "begin") {
    if (row.max_steps) $("progress").max = row.max_steps;
    estimatedPeak = row.estimated_peak_gib;
  }
}

function memoryText(peak, reserved, estimated) {
  // GPU runs report torch's allocated and reserved peaks, CPU runs the process's peak resident set
  if (peak === null || peak === undefined) return estimated ? `memory: plan estimated ${fmt(estimated, 1)} GiB` : "";
  return `peak memory ${fmt(peak, 2)} GiB` + (reserved !== null && reserved !== undefined ?
    ` allocated, ${fmt(reserved, 2)} GiB reserved` : " (process RSS)") +
    (estimated ? `; plan estimated ${fmt(estimated, 1)} GiB` : "");
}

function renderSamples(samples) {
  const newest = samples[samples.length - 1];
  $("samples").hidden = !newest;
  if (!newest) return;
  $("sample-prompt").textContent = newest.prompt;
  $("sample-newest").textContent = newest.reply;
  $("sample-newest").dataset.step = newest.step;
  $("sample-step").textContent = `step ${newest.step} (${fmt(newest.seconds, 1)} s to generate)`;
  $("sample-list").replaceChildren(...samples.slice(0, -1).reverse().map((s) =>
    el("li", {}, el("span", {class: "note"}, `step ${s.step}: `), s.reply)));
}

function renderRun(r) {
  if (r.id !== current) return;
  $("run").dataset.state = r.state;
  $("run-state").className = "state " + r.state;
  $("run-state").textContent = r.state + (r.queue_position ? ` (waiting, #${r.queue_position} in the queue)` : "");
  if (r.max_steps) $("progress").max = r.max_steps;
  $("progress").value = r.step;
  const eta = r.eta_s === null || r.state !== "running" ? "" :
    `, ETA ${duration(r.eta_s)}` + (r.eta_from === "plan" ? " (plan's estimate)" : "");
  $("run-figures").textContent = `step ${r.step}/${r.max_steps || "?"}, loss ${fmt(r.loss, 4)}` +
    (r.eval_loss !== null ? `, held-out ${fmt(r.eval_loss, 4)}` : "") +
    `, ${fmt(r.tokens_per_s, 0)} tokens/s${eta} on ${r.device}`;
  $("memory").textContent = memoryText(r.peak_memory_gib, r.peak_reserved_gib, r.estimated_peak_gib);
  renderSamples(r.samples || []);
  $("cancel-btn").hidden = FINAL.includes(r.state);
  $("resume-btn").hidden = !r.resumable;
  $("run-log").hidden = !r.log_tail;
  $("run-log").textContent = r.log_tail || "";
  $("after").hidden = r.state !== "done";
  if (r.state === "done") renderAfter(r);
}

async function refreshRun() {
  if (!current) return;
  try { renderRun(await api(`/api/runs/${current}`)); } catch (e) { showError("bring-error", e); }
}

// ------------------------------------------------------------ 4. judge

function renderAfter(r) {
  const ev = r.eval || {}, ex = r.export || {};
  $("eval-state").className = "state " + (ev.state || "");
  $("eval-state").textContent = ev.state || "";
  $("export-state").className = "state " + (ex.state || "");
  $("export-state").textContent = ex.state ? `${ex.state} (${ex.quant})` : "";
  if (ev.state && FINAL.includes(ev.state) && !$("eval-result").dataset.shown) showEval();
  if (ex.state && FINAL.includes(ex.state) && !$("export-result").dataset.shown) showExport();
  const links = [el("li", {}, link(`/api/runs/${r.id}/adapter.zip`, "adapter (zip: PEFT adapter, tokenizer, run card, metrics)"))];
  $("downloads").replaceChildren(...links, ...($("downloads").dataset.export ? JSON.parse($("downloads").dataset.export)
    .map((f) => el("li", {}, link(f.url, `${f.name} (${(f.bytes / 2 ** 20).toFixed(1)} MiB)`))) : []));
  if (!models) loadModels(r.id);
}

function link(url, text) {
  const a = el("a", {href: url, download: ""}, text);
  a.onclick = async (e) => {  // with an API key the download goes through fetch, which can send it
    if (!auth().Authorization) return;
    e.preventDefault();
    const resp = await fetch(url, {headers: auth()});
    const blob = await resp.blob();
    const tmp = el("a", {href: URL.createObjectURL(blob), download: url.split("/").pop()});
    tmp.click();
  };
  return a;
}

async function evaluate() {
  const opts = {persona: $("eval-persona").checked};
  if ($("eval-samples").value) opts.max_samples = Number($("eval-samples").value);
  if ($("eval-tokens").value) opts.max_new_tokens = Number($("eval-tokens").value);
  delete $("eval-result").dataset.shown;
  $("eval-result").replaceChildren();
  await api(`/api/runs/${current}/eval`, {json: opts});
  refreshRun();
}

async function showEval() {
  const res = await api(`/api/runs/${current}/eval`);
  $("eval-result").dataset.shown = "1";
  if (res.state !== "done") {
    $("eval-result").replaceChildren(el("pre", {class: "error"}, res.log_tail || res.state));
    return;
  }
  const m = res.metrics;
  const verdict = (t) => (t.passed === null || t.passed === undefined ? "INFO" : t.passed ? "PASS" : "FAIL");
  const rows = (m.targets || []).map((t) => el("tr", {}, el("td", {class: verdict(t).toLowerCase()}, verdict(t)),
    el("td", {}, t.name), el("td", {}, t.detail)));
  const report = auth().Authorization ? link(res.report, "report.html") :
    el("iframe", {src: res.report, title: "eval report"});
  $("eval-result").replaceChildren(el("table", {id: "targets"}, el("tbody", {}, rows)), report);
}

// ------------------------------------------------------------ 5. use: chat and export

async function loadModels(id) {
  models = "loading";
  try {
    const list = (await api(`/api/runs/${id}/v1/models`)).data.map((m) => m.id);
    models = {tuned: "tuned", base: list.find((m) => m !== "tuned")};
    $("base-name").textContent = "base (" + models.base + ")";
  } catch (e) { models = null; showError("bring-error", e); }
}

function bubble(side, role, text) {
  const d = el("div", {class: "msg " + role}, text);
  $("chat-" + side).append(d);
  $("chat-" + side).scrollTop = 1e9;
  return d;
}

async function reply(side, text) {
  chats[side].push({role: "user", content: text});
  bubble(side, "user", text);
  const d = bubble(side, "assistant", "…");
  try {
    const body = {model: models[side], messages: chats[side], temperature: 0, max_tokens: 96};
    const r = await api(`/api/runs/${current}/v1/chat/completions`, {json: body});
    const answer = r.choices[0].message.content;
    chats[side].push({role: "assistant", content: answer});
    d.textContent = answer + (r.choices[0].finish_reason === "length" ? "  [cut at the length limit]" : "");
  } catch (e) { d.textContent = String(e.message || e); d.classList.add("error"); }
  d.dataset.done = "1";
}

async function chat(e) {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || !models || models === "loading") return;
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  await Promise.all([reply("tuned", text), reply("base", text)]);
  $("chat-send").disabled = false;
}

async function exportRun() {
  delete $("export-result").dataset.shown;
  $("export-result").replaceChildren();
  await api(`/api/runs/${current}/export`, {json: {quant: $("quant").value, samples: Number($("export-samples").value) || 8}});
  refreshRun();
}

async function showExport() {
  const res = await api(`/api/runs/${current}/export`);
  $("export-result").dataset.shown = "1";
  const rows = (res.parity || []).map((c) => el("tr", {}, el("td", {}, c.name),
    el("td", {class: c.status.toLowerCase()}, c.status), el("td", {}, c.detail)));
  const parts = [];
  if (rows.length) parts.push(el("table", {id: "parity"}, el("thead", {}, el("tr", {}, el("th", {}, "check"),
    el("th", {}, "result"), el("th", {}, "detail"))), el("tbody", {}, rows)));
  if (res.commands && res.commands.length) parts.push(el("pre", {}, res.commands.join("\n")));
  if (res.log_tail) parts.push(el("pre", {class: "error"}, res.log_tail));
  $("export-result").replaceChildren(...parts);
  $("downloads").dataset.export = JSON.stringify(res.files || []);
}

// ------------------------------------------------------------ start

function setupKnobs() {
  const byName = Object.fromEntries(info.train_options.map((o) => [o.name, o]));
  $("knobs").replaceChildren(...KNOBS.map((name) => {
    const o = byName[name];
    return el("label", {title: o.help}, name.replace(/_/g, " "),
      el("input", {id: "knob-" + name, type: "number", step: "any", placeholder: o.default === null ? "auto" : o.default}));
  }));
  for (const name of Object.keys(info.presets)) $("preset").append(el("option", {value: name}, name));
  $("preset").onchange = () => {
    const preset = {...(info.presets[$("preset").value] || {})};
    for (const name of KNOBS) { $("knob-" + name).value = name in preset ? preset[name] : ""; delete preset[name]; }
    if ("model" in preset) { $("model").value = preset.model; delete preset.model; }
    $("extra").value = Object.keys(preset).length ? JSON.stringify(preset) : "";
  };
  $("quant").replaceChildren(...info.quants.map((q) => el("option", {value: q}, q)));
  $("quant").value = "q8_0";
}

async function start() {
  $("apikey").value = localStorage.getItem("chatlora-studio-key") || "";
  $("apikey").onchange = () => { localStorage.setItem("chatlora-studio-key", $("apikey").value); start(); };
  chart = new LineChart($("chart"), [{name: "train loss", color: "#2563eb"}, {name: "held-out loss", color: "#ea580c"}]);
  chart.draw();
  try {
    info = await api("/api/info");
  } catch (e) { showError("bring-error", e); return; }
  $("where").textContent = "runs in " + info.runs;
  setupKnobs();
  $("preview-btn").onclick = () => busy("preview-btn", preview);
  $("plan-btn").onclick = () => busy("plan-btn", plan);
  $("train-btn").onclick = () => busy("train-btn", train);
  $("cancel-btn").onclick = () => api(`/api/runs/${current}/cancel`, {json: {}}).then(renderRun, (e) => showError("bring-error", e));
  $("resume-btn").onclick = () => api(`/api/runs/${current}/resume`, {json: {}}).then((r) => { renderRun(r); follow(current); },
    (e) => showError("bring-error", e));
  $("eval-btn").onclick = () => busy("eval-btn", evaluate);
  $("export-btn").onclick = () => busy("export-btn", exportRun);
  $("chat-form").onsubmit = chat;
  $("chat-clear").onclick = () => { chats = {base: [], tuned: []}; $("chat-base").replaceChildren(); $("chat-tuned").replaceChildren(); };
  const runs = await refreshRuns();
  const live = runs.find((r) => r.state === "running") || runs[0];
  if (live && !current) select(live.id);  // re-attach to the run in progress
  setInterval(() => { refreshRuns().catch(() => {}); refreshRun(); }, 2000);
  document.body.dataset.ready = "1";
}

start();
