// tandem studio: plain JS, no build step. Reads the JSON API of tandem/studio/app.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { run: 0, offset: 0, limit: 20, session: null };

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? Number(value.toFixed(digits)).toString() : String(value);
}

// Every token a span coloured by its author; a red bar where the writer changed (a hand-off).
function renderTokens(tokens) {
  const box = el("div", { class: "text" });
  tokens.forEach(([text, author], i) => {
    const handoff = i > 0 && tokens[i - 1][1] !== author;
    const span = el("span", { class: `tok ${author}${handoff ? " handoff" : ""}`,
      title: `${author} · token ${i}` }, text);
    box.appendChild(span);
  });
  return box;
}

function renderEpisode(row, withGroupButton = true) {
  const card = el("div", { class: "episode", "data-step": row.step, "data-group": row.group });
  const meta = el("div", { class: "meta" });
  const parts = [["step", row.step], ["group", row.group], ["reward", fmt(row.reward)],
    ["verdict", row.verdict], ["advantage", fmt(row.advantage)],
    ["weights", row.weight_version], ["senior share", fmt(row.senior_share, 2)],
    ["hand-offs", row.handoffs.length], ["finish", row.finish_reason]];
  meta.innerHTML = parts.map(([k, v]) => `${k} <b>${String(v ?? "–")
    .replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" })[c])}</b>`).join(" · ");
  if (withGroupButton) {
    const button = el("button", { class: "group-button" }, "group side by side");
    button.onclick = () => showGroup(row.step, row.group).catch(showError);
    meta.append(" ", button);
  }
  card.appendChild(meta);
  const prompt = el("details", { class: "prompt" });
  prompt.appendChild(el("summary", {}, "prompt"));
  prompt.appendChild(el("div", { class: "text" }, row.prompt));
  card.appendChild(prompt);
  card.appendChild(renderTokens(row.tokens));
  return card;
}

async function loadRuns() {
  const { runs } = await api("/api/runs");
  const select = $("run-select");
  select.innerHTML = "";
  for (const run of runs) select.appendChild(el("option", { value: run.id }, run.name));
  select.onchange = () => { state.run = Number(select.value); state.offset = 0; openRun(); };
  return runs;
}

async function openRun() {
  showError(null);
  $("group").hidden = true;
  try {
    const { steps } = await api(`/api/runs/${state.run}/steps`);
    const stepSelect = $("f-step");
    stepSelect.innerHTML = '<option value="">all</option>';
    for (const step of steps) stepSelect.appendChild(el("option", { value: step }, step));
    await loadEpisodes();
  } catch (error) {
    $("episodes").innerHTML = "";
    showError(error);
  }
  loadRunPanel().catch(showError);
}

function filterQuery() {
  const fields = { step: "f-step", min_reward: "f-min-reward", max_reward: "f-max-reward",
    min_senior: "f-min-senior", max_senior: "f-max-senior", q: "f-text" };
  const query = new URLSearchParams({ offset: state.offset, limit: state.limit });
  for (const [key, id] of Object.entries(fields)) if ($(id).value !== "") query.set(key, $(id).value);
  return query;
}

async function loadEpisodes() {
  const page = await api(`/api/runs/${state.run}/episodes?${filterQuery()}`);
  const box = $("episodes");
  box.innerHTML = "";
  if (!page.rows.length) box.appendChild(el("p", {}, "No episode matches these filters."));
  for (const row of page.rows) box.appendChild(renderEpisode(row));
  $("page-info").textContent = page.rows.length
    ? `episodes ${page.offset + 1}–${page.offset + page.rows.length}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = !page.more;
}

async function showGroup(step, group) {
  const { rows } = await api(`/api/runs/${state.run}/group?step=${step}&group=${group}`);
  $("group-title").textContent = `step ${step}, group ${group}: ${rows.length} episodes of one prompt`;
  const columns = $("group-columns");
  columns.innerHTML = "";
  for (const row of rows) columns.appendChild(renderEpisode(row, false));
  $("group").hidden = false;
  $("group").scrollIntoView();
}

// ---------------------------------------------------------------- runs: metrics and reports

let metricRows = [];

async function loadRunPanel() {
  const [{ rows }, { reports }] = await Promise.all([
    api(`/api/runs/${state.run}/metrics`), api(`/api/runs/${state.run}/reports`)]);
  metricRows = rows;
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((k) => k !== "step");
  const select = $("metric-select");
  select.innerHTML = "";
  for (const key of keys) select.appendChild(el("option", { value: key }, key));
  if (keys.includes("reward/mean")) select.value = "reward/mean";
  select.onchange = drawChart;
  drawChart();
  const box = $("reports");
  box.innerHTML = "";
  for (const report of reports) {
    box.appendChild(el("h2", {}, report.name));
    const body = el("div");
    body.innerHTML = report.html; // rendered server-side with raw HTML disabled
    box.appendChild(body);
    for (const src of report.plots) box.appendChild(el("img", { src, alt: src }));
  }
}

function drawChart() {
  const key = $("metric-select").value;
  const points = metricRows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
  const chart = $("chart");
  if (!points.length) { chart.textContent = key ? "no values" : "no metrics.jsonl in this run"; return; }
  const [w, h, pad] = [640, 260, 40];
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / (y1 - y0)) * (h - 2 * pad);
  const line = points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
  chart.innerHTML = `<svg width="${w}" height="${h}" role="img" aria-label="${key}">
    <polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="${line}"/>
    ${points.map(([x, y]) => `<circle cx="${sx(x)}" cy="${sy(y)}" r="2.5" fill="#2a6fdb"/>`).join("")}
    <text x="${pad}" y="${pad - 10}" font-size="12">${key}: ${fmt(y0)} … ${fmt(y1)}</text>
    <text x="${w / 2}" y="${h - 8}" font-size="12" text-anchor="middle">step ${x0} … ${x1}</text>
  </svg>`;
}

// ---------------------------------------------------------------- co-write

async function setupCowrite() {
  const info = await api("/api/cowrite");
  if (!info.enabled) {
    $("cw-off").textContent = info.why;
    $("cw-off").hidden = false;
    $("cw-setup").hidden = true;
    return;
  }
  $("cw-senior").textContent = info.senior;
  for (const p of info.problems) {
    $("cw-problem").appendChild(el("option", { value: p.index }, `${p.uid}: ${p.problem.slice(0, 80)}`));
  }
  for (const s of info.schedules) $("cw-schedule").appendChild(el("option", { value: s }, s));
  for (const f of info.first_writers) $("cw-first").appendChild(el("option", { value: f }, f));
  $("cw-start").onclick = () => startCowrite().catch(showError);
  $("cw-send").onclick = () => cowriteTurn("turn").catch(showError);
  $("cw-finish").onclick = () => cowriteTurn("finish").catch(showError);
  $("cw-turn").onkeydown = (event) => {  // Ctrl+Enter sends the turn
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("cw-send").disabled) {
      event.preventDefault();
      cowriteTurn("turn").catch(showError);
    }
  };
}

function showSession(session) {
  state.session = session.id;
  $("cw-episode").hidden = false;
  $("cw-problem-text").textContent = session.problem;
  const text = $("cw-text");
  text.replaceWith(Object.assign(renderTokens(session.tokens), { id: "cw-text" }));
  const over = session.finish !== null;
  $("cw-send").disabled = over || session.writer !== "human";
  $("cw-finish").disabled = over;
  $("cw-turn").disabled = over;
  $("cw-status").textContent = over ? `over (${session.finish})`
    : `your turn · ${session.left} tokens of the shared budget left`;
  $("cw-result").textContent = session.row
    ? `reward ${fmt(session.row.reward)} · verdict ${session.row.verdict} · saved as an episode of the co-write run`
    : "";
}

async function startCowrite() {
  showError(null);
  const index = $("cw-problem").value;
  const session = await api("/api/cowrite/start", {
    index: index === "" ? null : Number(index), problem: $("cw-typed").value,
    answer: $("cw-answer").value, schedule: $("cw-schedule").value,
    handoff_p: Number($("cw-p").value || 0), first: $("cw-first").value });
  showSession(session);
}

async function cowriteTurn(kind) {
  showError(null);
  const session = await api(`/api/cowrite/${state.session}/${kind}`, { text: $("cw-turn").value });
  $("cw-turn").value = "";
  showSession(session);
}

// ---------------------------------------------------------------- wiring

function showPanel(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.panel === name);
    $(`panel-${tab.dataset.panel}`).hidden = tab.dataset.panel !== name;
  }
}

window.addEventListener("DOMContentLoaded", async () => {
  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => showPanel(tab.dataset.panel);
  $("filters").onsubmit = (event) => { event.preventDefault(); state.offset = 0; loadEpisodes().catch(showError); };
  $("prev").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); loadEpisodes().catch(showError); };
  $("next").onclick = () => { state.offset += state.limit; loadEpisodes().catch(showError); };
  $("group-close").onclick = () => { $("group").hidden = true; };
  try {
    await loadRuns();
    await openRun();
    await setupCowrite();
  } catch (error) {
    showError(error);
  }
  document.body.dataset.ready = "1";
});
