// batchd's web view: reads /api/status (the document `batchd status --json` prints)
// every few seconds and fills the page. No library, nothing fetched from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(200, Number(params.get("refresh_ms")) || 3000);

const $ = (id) => document.getElementById(id);
const number = (n) => Number(n).toLocaleString("en-US");
const usd = (n) => "$" + (n < 1 ? n.toFixed(4) : n.toFixed(2));

function duration(seconds) {
  const s = Math.abs(seconds);
  const text = s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min`
    : `${(s / 3600).toFixed(1)} h`;
  return seconds < 0 ? `${text} ago` : text;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function emptyRow(body, columns, text) {
  const td = body.insertRow().insertCell();
  td.colSpan = columns;
  td.className = "empty";
  td.textContent = text;
}

function showTasks(tasks) {
  let total = 0;
  for (const [status, count] of Object.entries(tasks)) {
    total += count;
    const cell = document.querySelector(`#tasks tr[data-status="${status}"] .count`);
    if (!cell) continue;
    cell.textContent = number(count);
    cell.classList.toggle("zero", count === 0);
  }
  $("tasks-total").textContent = number(total);
}

function showBudget(doc) {
  const budget = doc.budget;
  const meter = $("budget-meter");
  if (!budget) {
    const cost = doc.usage ? doc.usage.cost_usd : 0;
    $("spent").textContent = usd(cost);
    $("spent").dataset.usd = String(cost);
    $("budget-limit").textContent = "all time";
    $("budget-note").textContent = "no [budget] set";
    meter.hidden = true;
    showUsage(null);
    return;
  }
  $("spent").textContent = usd(budget.spent_usd);
  $("spent").dataset.usd = String(budget.spent_usd);
  const period = budget.period === "total" ? "in total" : `this ${budget.period} (UTC)`;
  $("budget-limit").textContent = `of ${usd(budget.max_spend_usd)} ${period}`;
  const share = budget.max_spend_usd > 0 ? budget.spent_usd / budget.max_spend_usd : 1;
  const fill = $("budget-fill");
  fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  fill.className = "fill" + (share >= 1 ? " over" : share >= 0.8 ? " high" : "");
  meter.hidden = false;
  const flying = budget.in_flight_max_usd ? ` · up to ${usd(budget.in_flight_max_usd)} in flight` : "";
  $("budget-note").textContent = (budget.paused ? `paused: ${budget.paused_reason}` : "submitting") + flying;
  showUsage(doc.usage);
}

function showUsage(usage) {
  const line = $("usage");
  if (!usage) { line.textContent = ""; return; }
  line.textContent = `all results so far: ${usd(usage.cost_usd)} for ${number(usage.requests)} requests` +
    (usage.saving_usd ? `, ${usd(usage.saving_usd)} less than standard prices` : "") +
    // Paid results no task holds (a duplicate batch's, a deleted task's): in the total.
    (usage.kept_aside && usage.kept_aside.requests
      ? `; of which ${usd(usage.kept_aside.cost_usd)} for ${number(usage.kept_aside.requests)} no task holds`
      : "");
}

function svg(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function showThroughput(throughput) {
  const chart = $("chart");
  chart.replaceChildren();
  const ok = throughput.succeeded, bad = throughput.failed;
  const sums = ok.map((value, i) => value + bad[i]);
  const total = sums.reduce((a, b) => a + b, 0);
  $("throughput-total").textContent = `${number(total)} in the hour`;
  chart.dataset.total = String(total);
  // Drawn at the size it is shown, so text is never stretched.
  const width = Math.max(320, Math.round(chart.clientWidth || 720));
  chart.setAttribute("viewBox", `0 0 ${width} 180`);
  const left = 48, right = width - 8, top = 10, bottom = 150;
  const peak = Math.max(1, ...sums);
  const step = (right - left) / sums.length;
  const scale = (bottom - top) / peak;
  chart.append(svg("line", { class: "axis", x1: left, x2: right, y1: bottom, y2: bottom }));
  chart.append(svg("line", { class: "axis", x1: left, x2: right, y1: top, y2: top }));
  chart.append(svg("text", { x: left - 6, y: top + 4, "text-anchor": "end" }, number(peak)));
  chart.append(svg("text", { x: left - 6, y: bottom, "text-anchor": "end" }, "0"));
  sums.forEach((_, i) => {
    const x = left + i * step + 1, width = Math.max(1, step - 2);
    const okHeight = ok[i] * scale, badHeight = bad[i] * scale;
    if (okHeight) chart.append(svg("rect", { class: "ok", x, width, y: bottom - okHeight, height: okHeight }));
    if (badHeight) {
      chart.append(svg("rect", { class: "bad", x, width, y: bottom - okHeight - badHeight, height: badHeight }));
    }
  });
  for (const [minutes, anchor] of [[60, "start"], [30, "middle"], [0, "end"]]) {
    const x = right - (minutes / 60) * (right - left);
    chart.append(svg("text", { x, y: bottom + 18, "text-anchor": anchor },
      minutes ? `${minutes} min ago` : "now"));
  }
}

function showBatches(batches) {
  const body = $("batch-rows");
  body.replaceChildren();
  $("batches-total").textContent = number(batches.length);
  if (!batches.length) emptyRow(body, 6, "none");
  for (const batch of batches) {
    const row = body.insertRow();
    row.dataset.batch = batch.batch_id || `local-${batch.local_id}`;
    // The raw figures beside the rounded text, for tests and for copying.
    row.dataset.ageS = String(batch.age_s);
    row.dataset.expiresInS = String(batch.expires_in_s);
    cell(row, batch.batch_id || "(creating)");
    cell(row, batch.state);
    cell(row, number(batch.requests), "num");
    const counts = batch.request_counts || {};
    const done = ["succeeded", "errored", "canceled", "expired"]
      .filter((key) => counts[key]).map((key) => `${key} ${number(counts[key])}`);
    cell(row, done.join(", ") || "–");
    cell(row, duration(batch.age_s), "num age");
    const expiry = batch.expires_in_s;
    cell(row, expiry === null ? "–" : duration(expiry), "num expires" + (expiry !== null && expiry < 3 * 3600 ? " soon" : ""));
  }
}

function showErrors(errors) {
  const body = $("error-rows");
  body.replaceChildren();
  if (!errors.length) emptyRow(body, 4, "none");
  for (const error of errors) {
    const row = body.insertRow();
    row.dataset.customId = error.custom_id;
    cell(row, error.custom_id);
    cell(row, error.status);
    cell(row, error.completed_at ? error.completed_at.replace("T", " ").slice(0, 19) : "–");
    cell(row, error.error || "", "error");
  }
}

function showAlerts(doc) {
  const items = [];
  for (const w of doc.retention || []) {
    items.push(`Results near archival: ${w.batch_id} (${w.state}), archived in ${w.archived_in_days} days`);
  }
  for (const d of doc.duplicate_batches || []) {
    const harvest = d.origin === "foreign" ? "another client's batch"
      : d.harvest_state === "completed" ? `harvested: ${number(d.written)} result(s) written from it`
      : d.harvest_state ? `harvest: ${d.harvest_state}` : "";
    items.push(`Possible duplicate batch ${d.batch_id}: ${d.note}${harvest ? `; ${harvest}` : ""}`);
  }
  const shared = doc.shared_key || {};
  if (shared.batches_not_ours) {
    items.push(`Key appears shared: ${number(shared.batches_not_ours)} batch(es) on this API key were not created by batchd; give batchd a dedicated workspace key (docs/operations.md, "One key, one batchd")`);
  }
  const results = doc.results || {};
  if (results.unmatched) items.push(`${number(results.unmatched)} result line(s) matched no task`);
  if (results.missing_requeued) items.push(`${number(results.missing_requeued)} request(s) had no result line: requeued`);
  const list = $("alert-list");
  list.replaceChildren(...items.map((text) => { const li = document.createElement("li"); li.textContent = text; return li; }));
  $("alerts").hidden = !items.length;
}

async function refresh() {
  const state = $("state");
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const doc = await response.json();
    showTasks(doc.tasks);
    showBudget(doc);
    showThroughput(doc.throughput);
    showBatches(doc.batches_in_flight);
    showErrors(doc.latest_errors);
    showAlerts(doc);
    state.dataset.state = "live";
    state.dataset.generatedAt = doc.generated_at;
    state.textContent = `live · ${new Date(doc.generated_at).toLocaleTimeString("en-GB")} · every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    state.dataset.state = "stale";
    state.textContent = `not answering (${error.message}); retrying`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
