// chatcore dashboard: reads the JSON endpoints (docs/dashboard.md) and draws with uPlot.
// Text from users is only ever set with textContent, never as HTML.
"use strict";

const state = { csrf: null };
window.dashboardCharts = {};  // name -> uPlot instance (the browser test reads their data)

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (r.status === 401) { showLogin(); throw new Error("login required"); }
  if (!r.ok) throw new Error((await r.json()).error || r.statusText);
  return r.json();
}

async function act(action, body, question) {
  if (!window.confirm(question)) return;
  const r = await fetch("/api/actions/" + action, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
    body: JSON.stringify({ ...body, confirm: true }),
  });
  const data = await r.json();
  // A checkpoint holding forgotten users' data serves again only after a second, explicit yes.
  if (r.status === 409 && data.forgotten_users && !body.allow_forgotten) {
    return act(action, { ...body, allow_forgotten: true },
      data.error + "\n\nServe it anyway, bringing their data back?");
  }
  flash(r.ok ? data.detail : "Refused: " + data.error, !r.ok);
  await showTab(currentTab());
}

function flash(text, isError) {
  const f = $("#flash");
  f.textContent = text; f.className = isError ? "error" : ""; f.hidden = false;
}

function showLogin() {
  $("#app").hidden = true; $("#login").hidden = false;
  $("#login-failed").hidden = !location.search.includes("failed");
}

const when = (t) => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 16) : "";
const num = (x, d = 2) => x == null ? "–" : Number(x).toFixed(d);
const dayTs = (day) => Date.parse(day + "T00:00:00Z") / 1000;

function chart(name, target, title, labels, xs, ys, colors, opts = {}) {
  if (window.dashboardCharts[name]) window.dashboardCharts[name].destroy();
  target.textContent = "";
  const series = [{}].concat(labels.map((label, i) => ({ label, stroke: colors[i], width: 2, points: { show: true } })));
  const u = new uPlot({
    title, width: Math.max(400, target.clientWidth - 20 || 800), height: 220, series,
    scales: { x: { time: opts.time !== false } }, axes: [{}, {}],
  }, [xs, ...ys], target);
  window.dashboardCharts[name] = u;
  return u;
}

function card(label, value) { return el("div", { class: "card" }, label, el("b", {}, value)); }

async function overview() {
  const d = await api("/api/overview");
  const cards = $("#cards"); cards.textContent = "";
  const q = d.queue, l = d.latency;
  cards.append(
    card("serving model", d.serving_model),
    card("uptime", Math.round(d.uptime_seconds / 60) + " min"),
    card("exchanges", d.totals.exchanges),
    card("conversations", d.totals.conversations),
    card("users", d.totals.users),
    card("new since fine-tune", d.totals.since_finetune),
    card("queue / batch", q.waiting + " / " + q.running),
    card("busy answers", q.busy),
    card("tokens/s", num(l.tokens_per_second, 1)),
    card("latency p50 / p95", num(l.p50_seconds) + " / " + num(l.p95_seconds) + " s"),
    card("fine-tune", d.finetune.running ? "running" : "idle"),
  );
  const xs = d.days.map((r) => dayTs(r.day));
  chart("activity", $("#chart-activity"), "Conversations, exchanges and active users per day",
    ["exchanges", "conversations", "active users"], xs,
    [d.days.map((r) => r.exchanges), d.days.map((r) => r.conversations), d.days.map((r) => r.active_users)],
    ["#2a6fdb", "#7a4cc2", "#1f9d55"]);
  chart("feedback", $("#chart-feedback"), "Feedback per day", ["good (thumbs up)", "bad (thumbs down)"], xs,
    [d.days.map((r) => r.good), d.days.map((r) => r.bad)], ["#1f9d55", "#c0392b"]);
}

async function learning() {
  const d = await api("/api/learning");
  $("#job-status").textContent = d.finetune.running ? "job " + d.finetune.job + ": " + (d.finetune.progress || "starting") : "no fine-tune running";
  const tl = $("#timeline"); tl.textContent = "";
  for (const e of d.timeline) tl.append(el("li", {}, when(e.at) + " " + e.event + " " + e.name));
  if (!d.timeline.length) tl.append(el("li", {}, "no promotion or rejection yet"));
  const runs = $("#runs"); runs.textContent = "";
  for (const k of Object.keys(window.dashboardCharts)) if (k.startsWith("loss:")) { window.dashboardCharts[k].destroy(); delete window.dashboardCharts[k]; }
  d.runs.forEach((run, i) => {
    const box = el("div", { class: "run" });
    const cls = "status " + (run.status || "").split(" ")[0];
    box.append(el("h3", {}, run.name + " ", el("span", { class: cls }, run.status)));
    const g = run.gate || {};
    const data = run.data || {};
    box.append(el("p", {},
      `created ${run.created_at || "?"}; ${data.train_exchanges ?? "?"} training / ${data.val_exchanges ?? "?"} validation exchanges; ` +
      `validation loss ${num(run.initial_val_loss, 3)} → ${num(run.val_loss, 3)}` + (run.stopped ? " (stopped early)" : "")));
    const guards = Object.entries(data.guards || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    box.append(el("p", {}, "guards removed: " + (guards || "nothing")));
    if (g.reason) box.append(el("p", {}, `gate: ${g.reason} (candidate ${num(g.candidate_val_loss, 4)}, serving ${num(g.serving_val_loss, 4)})`));
    if (run.lineage) box.append(el("p", {}, "lineage: " + JSON.stringify(run.lineage)));
    if ((run.status === "rejected" || run.status === "rolled back") && run.on_disk) {
      const b = el("button", {}, "Promote this candidate");
      b.addEventListener("click", () => act("promote", { name: run.name }, `Promote ${run.name}? It will serve from the next message.`));
      box.append(b);
    }
    const h = run.history || [];
    if (h.length) {
      const target = el("div", { class: "chart" });
      box.append(target); runs.append(box);
      chart("loss:" + i, target, "Loss per evaluation", ["train", "validation"], h.map((p) => p.iter),
        [h.map((p) => p.train_loss ?? null), h.map((p) => p.val_loss ?? null)], ["#2a6fdb", "#e67e22"], { time: false });
    } else {
      box.append(el("p", {}, "no loss curve recorded for this run"));
      runs.append(box);
    }
  });
  if (!d.runs.length) runs.append(el("p", {}, "No fine-tune yet."));
}

async function conversations(before) {
  const p = new URLSearchParams();
  if (typeof before === "number") p.set("before", before);
  if ($("#q").value) p.set("q", $("#q").value);
  const [adapter, channel] = ($("#channel").value || "/").split("/");
  if (adapter) p.set("adapter", adapter);
  if (channel) p.set("channel", channel);
  if ($("#user").value) p.set("user", $("#user").value);
  const d = await api("/api/conversations?" + p);
  const sel = $("#channel"), keep = sel.value;
  sel.textContent = ""; sel.append(el("option", { value: "" }, "every adapter / channel"));
  for (const c of d.channels) sel.append(el("option", { value: c.adapter + "/" + c.channel }, `${c.adapter} / ${c.channel} (${c.exchanges})`));
  sel.value = keep;
  const body = $("#exchanges tbody");
  if (typeof before !== "number") body.textContent = "";
  const older = $("#older");
  older.hidden = d.exchanges.length < 50;
  older.dataset.before = d.exchanges.length ? d.exchanges[d.exchanges.length - 1].id : "";
  for (const e of d.exchanges) {
    const forget = el("button", {}, "Forget user");
    forget.addEventListener("click", () => act("forget", { user_key: e.user_key },
      `Delete every message of ${e.user_key} and never train on them again?`));
    const fb = e.feedback > 0 ? "good" : e.feedback < 0 ? "bad" : "";
    body.append(el("tr", {}, el("td", {}, when(e.created_at)), el("td", {}, e.adapter + " / " + e.channel),
      el("td", {}, e.user_key), el("td", {}, e.user_text), el("td", {}, e.reply_text), el("td", {}, fb), el("td", {}, forget)));
  }
  if (!d.exchanges.length && typeof before !== "number") body.append(el("tr", {}, el("td", { colspan: "7" }, "nothing found")));
}

async function settings() {
  const d = await api("/api/settings");
  $("#config").textContent = JSON.stringify(d.config, null, 2);
  const a = await api("/api/audit");
  const body = $("#audit tbody"); body.textContent = "";
  for (const e of a.entries) body.append(el("tr", {}, el("td", {}, when(e.at)), el("td", {}, e.who),
    el("td", {}, e.action), el("td", {}, e.target ?? ""), el("td", {}, (e.ok ? "done: " : "refused: ") + (e.detail || ""))));
}

const tabs = { overview, learning, conversations, settings };
const currentTab = () => (location.hash || "#overview").slice(1).split("?")[0];

async function showTab(name) {
  if (!tabs[name]) name = "overview";
  for (const t of Object.keys(tabs)) $("#tab-" + t).hidden = t !== name;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === name));
  try { await tabs[name](); } catch (err) { if (err.message !== "login required") flash(err.message, true); }
  document.body.dataset.loaded = name;  // for the browser test: this tab has drawn its data
}

async function start() {
  let s;
  try { s = await api("/api/session"); } catch (err) { return; }
  state.csrf = s.csrf;
  $("#bot-name").textContent = s.bot;
  $("#who").textContent = "logged in as " + s.user;
  $("#login").hidden = true; $("#app").hidden = false;
  window.addEventListener("hashchange", () => showTab(currentTab()));
  $("#finetune-start").addEventListener("click", () => act("finetune/start", {}, "Start a fine-tune on the new conversations now?"));
  $("#finetune-cancel").addEventListener("click", () => act("finetune/cancel", {}, "Cancel the running fine-tune? The serving model stays."));
  $("#rollback").addEventListener("click", () => act("rollback", {}, "Roll back to the previously promoted model?"));
  $("#search").addEventListener("submit", (ev) => { ev.preventDefault(); conversations(); });
  $("#older").addEventListener("click", () => conversations(Number($("#older").dataset.before)));
  $("#logout").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": state.csrf } });
    location.href = "/";
  });
  await showTab(currentTab());
}

start();
