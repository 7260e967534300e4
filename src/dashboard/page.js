// kiwimq's dashboard: renders the overview the server sends (server-sent events), with
// DOM methods only (text is never parsed as HTML).
"use strict";
(function () {
  const base = document.querySelector('meta[name="kiwimq-base"]').content;
  const csrf = document.querySelector('meta[name="kiwimq-csrf"]').content;
  const STUCK_SECS = 300;
  let latest = null;
  let pending = null;

  // The token, if the dashboard has one, travels in its cookie (set by opening the page as
  // ?token=…): never in these addresses.
  function url(path) {
    return new URL(base + path, location.href).toString();
  }

  // Says on the page why it shows nothing new: the token is refused (the dashboard was
  // restarted with another, or the browser dropped its cookie).
  async function explain() {
    try {
      const r = await fetch(url("api/overview"));
      if (r.status !== 401) return;
      const alert = document.getElementById("alert");
      alert.textContent = "This dashboard no longer accepts this browser's token: open it again as ?token=… with the token it was started with.";
      alert.hidden = false;
    } catch (e) {
      // The dashboard is away: "reconnecting…" says so.
    }
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function row(cells, cls) {
    const tr = el("tr", null, cls);
    for (const cell of cells) {
      const td = cell instanceof Node ? wrap(cell) : el("td", cell);
      tr.appendChild(td);
    }
    return tr;
  }

  function wrap(node) {
    if (node.tagName === "TD") return node;
    const td = el("td");
    td.appendChild(node);
    return td;
  }

  function fill(id, rows) {
    const body = document.querySelector("#" + id + " tbody");
    body.replaceChildren(...rows);
  }

  function duration(secs) {
    secs = Math.floor(secs);
    if (secs < 60) return secs + " s";
    if (secs < 3600) return Math.floor(secs / 60) + " min " + (secs % 60) + " s";
    return Math.floor(secs / 3600) + " h " + Math.floor((secs % 3600) / 60) + " min";
  }

  function time(ms) {
    return new Date(ms).toLocaleTimeString();
  }

  function glob(pattern) {
    if (!pattern) return null;
    const body = pattern.split("*").map(p => p.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join(".*");
    return new RegExp("^" + body + "$");
  }

  function tasks(member) {
    const td = el("td");
    for (const task of member.presence.in_flight) {
      const stuck = task.age_secs > STUCK_SECS;
      const line = el("span", null, "task" + (stuck ? " stuck" : ""));
      line.title = task.correlation_id || "";
      line.appendChild(document.createTextNode(task.queue + " · " + duration(task.age_secs) + (stuck ? " · stuck?" : "") + " "));
      if (task.progress !== null && task.progress !== undefined) {
        const bar = el("progress");
        bar.max = 1;
        bar.value = task.progress;
        line.appendChild(bar);
        line.appendChild(document.createTextNode(" " + Math.round(task.progress * 100) + "%"));
      }
      if (task.note) line.appendChild(document.createTextNode(" " + task.note));
      td.appendChild(line);
    }
    return td;
  }

  function renderWorkers(o) {
    const note = document.getElementById("presence-note");
    note.hidden = !o.presence;
    note.textContent = o.presence ? "No presence on this backend: " + o.presence : "";
    const live = o.workers.filter(m => m.standing === "live");
    document.getElementById("worker-count").textContent = live.length;
    document.getElementById("lost-count").textContent = o.workers.filter(m => m.standing === "lost").length;
    document.getElementById("in-flight-count").textContent = live.reduce((n, m) => n + m.presence.in_flight.length, 0);
    fill("workers", o.workers.map(m => {
      const p = m.presence;
      const standing = el("td", m.standing === "lost" ? "lost (" + duration(m.silent_secs) + " silent)" : m.standing, "standing-" + m.standing);
      const tr = row([
        standing, p.host, p.program, p.pid, p.backend + (p.connected ? "" : " (down)"),
        p.task_queues.map(q => q.name + " ×" + q.subscribers + " (prefetch " + q.prefetch + ")").join(", "),
        p.rpc_identifiers, p.broadcast_filters.join("; "),
        p.counts.handled, p.counts.failed, p.counts.panicked, p.counts.rejected, p.restarts,
        duration(p.uptime_secs), tasks(m),
      ], m.standing);
      tr.dataset.id = p.id;
      tr.dataset.pid = p.pid;
      tr.dataset.standing = m.standing;
      return tr;
    }));
  }

  function action(queue, what, label) {
    const b = el("button", label, "danger");
    b.type = "button";
    b.dataset.action = what;
    b.addEventListener("click", () => ask(queue, what, label));
    return b;
  }

  function renderQueues(o) {
    fill("queues", o.queues.map(q => {
      const actions = el("td");
      actions.appendChild(action(q.name, "purge", "Purge"));
      if (q.dead_letters !== null && q.dead_letters !== undefined) {
        actions.appendChild(action(q.name, "requeue-dead-letters", "Requeue dead letters"));
        actions.appendChild(action(q.name, "purge-dead-letters", "Drop dead letters"));
      }
      const tr = row([
        q.name, q.ready === null ? "?" : q.ready, q.in_flight, q.consumers === null ? "?" : q.consumers,
        q.rate_in.toFixed(1), q.rate_out.toFixed(1),
        q.dead_letters === null || q.dead_letters === undefined ? "–" : q.dead_letters, actions,
      ]);
      tr.dataset.queue = q.name;
      tr.cells[1].className = "ready";
      tr.cells[6].className = "dead-letters";
      if (q.error) tr.title = q.error;
      return tr;
    }));
  }

  function ask(queue, what, label) {
    pending = { queue, what };
    document.getElementById("confirm-text").textContent = label + " of " + queue + "? This cannot be undone.";
    document.getElementById("confirm").hidden = false;
  }

  async function confirmed() {
    const p = pending;
    pending = null;
    document.getElementById("confirm").hidden = true;
    if (!p) return;
    const result = document.getElementById("action-result");
    try {
      const r = await fetch(url("api/queues/" + encodeURIComponent(p.queue) + "/" + p.what), {
        method: "POST",
        headers: { "X-CSRF-Token": csrf },
      });
      const body = await r.json();
      result.textContent = r.ok ? p.what + " " + p.queue + ": " + body.count : "refused: " + body.error;
    } catch (e) {
      result.textContent = "failed: " + e;
    }
  }

  function chart(id, values, unit) {
    const svg = document.getElementById(id);
    const points = values.filter(v => v !== null);
    const max = Math.max(1e-9, ...points);
    const n = Math.max(values.length - 1, 1);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", values.map((v, i) => v === null ? null : (i / n * 600).toFixed(1) + "," + (115 - v / max * 105).toFixed(1)).filter(Boolean).join(" "));
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    label.setAttribute("x", "4");
    label.setAttribute("y", "12");
    label.textContent = "max " + max.toFixed(1) + " " + unit;
    svg.replaceChildren(line, label);
  }

  function renderSeries(o) {
    const last = o.series[o.series.length - 1];
    document.getElementById("rate").textContent = last ? last.tasks_per_sec.toFixed(1) : "–";
    document.getElementById("round-trip").textContent = last && last.round_trip_ms !== null ? last.round_trip_ms.toFixed(1) + " ms" : "–";
    chart("chart-rate", o.series.map(s => s.tasks_per_sec), "/s");
    chart("chart-rtt", o.series.map(s => s.round_trip_ms), "ms");
  }

  function renderProcesses(o) {
    fill("processes", o.processes.map(p => {
      const tr = row([p.pk, p.state, p.previous, time(p.at_ms)]);
      tr.dataset.pk = p.pk;
      return tr;
    }));
  }

  function renderBroadcasts(o) {
    const subject = glob(document.getElementById("filter-subject").value.trim());
    const sender = glob(document.getElementById("filter-sender").value.trim());
    const shown = o.broadcasts.filter(b =>
      (!subject || (b.subject !== null && subject.test(b.subject))) &&
      (!sender || (b.sender !== null && sender.test(b.sender))));
    fill("broadcasts", shown.map(b => {
      const body = el("td", b.body, "body");
      return row([time(b.at_ms), b.subject, b.sender, body]);
    }));
  }

  function render(o) {
    latest = o;
    document.getElementById("uri").textContent = o.uri + " (" + o.backend + ")";
    renderWorkers(o);
    renderQueues(o);
    renderSeries(o);
    renderProcesses(o);
    renderBroadcasts(o);
    document.body.dataset.updated = o.at_ms;
  }

  function connect() {
    const live = document.getElementById("live");
    const events = new EventSource(url("api/events"));
    events.addEventListener("overview", e => {
      live.dataset.state = "live";
      live.textContent = "live · " + time(Date.now());
      render(JSON.parse(e.data));
    });
    events.onerror = () => {
      live.dataset.state = "down";
      live.textContent = "reconnecting…";
      explain();
    };
  }

  document.getElementById("confirm-yes").addEventListener("click", confirmed);
  document.getElementById("confirm-no").addEventListener("click", () => {
    pending = null;
    document.getElementById("confirm").hidden = true;
  });
  for (const id of ["filter-subject", "filter-sender"]) {
    document.getElementById(id).addEventListener("input", () => latest && renderBroadcasts(latest));
  }
  connect();
})();
