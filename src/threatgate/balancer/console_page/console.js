// threatgate operator console: renders /console/api/state, live from /console/api/events (server-sent events).
// No framework and nothing from elsewhere: the DOM is built with textContent only (no HTML from data).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const fmt = new Intl.NumberFormat();

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function num(value) {
    return typeof value === "number" ? fmt.format(value) : (value ?? "–");
  }

  function sum(obj) {
    return Object.values(obj || {}).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0);
  }

  function table(headers, rows, numeric) {
    const t = el("table");
    const head = t.createTHead().insertRow();
    headers.forEach((h, i) => {
      const th = el("th", h, numeric && numeric[i] ? "num" : "");
      th.scope = "col";
      head.appendChild(th);
    });
    const body = t.createTBody();
    rows.forEach((r) => {
      const tr = body.insertRow();
      r.forEach((c, i) => tr.appendChild(el("td", typeof c === "number" ? num(c) : c, numeric && numeric[i] ? "num" : "")));
    });
    const wrap = el("div", null, "scroll");
    wrap.appendChild(t);
    return wrap;
  }

  function renderInstances(state) {
    const body = $("instances").tBodies[0];
    const rows = [];
    state.instances.forEach((i) => {
      const tr = document.createElement("tr");
      tr.className = "state-" + i.state;
      tr.dataset.instance = i.instance;
      tr.dataset.state = i.state;
      const name = el("th", i.instance);
      name.scope = "row";
      tr.appendChild(name);
      const st = el("td");
      st.appendChild(el("span", i.state, "badge " + i.state));
      tr.appendChild(st);
      tr.appendChild(el("td", i.why || (i.state === "UP" ? "" : "–")));
      tr.appendChild(el("td", i.role));
      tr.appendChild(el("td", i.revision ?? "–"));
      const dg = el("td");
      const d = el("span", i.digest || "–", "digest" + (i.digest_differs ? " differs" : ""));
      if (i.digest_differs) d.title = "settings digest differs from the other instances'";
      dg.appendChild(d);
      if (i.digest_differs) dg.appendChild(el("span", " differs", "error"));
      tr.appendChild(dg);
      const pin = el("td");
      pin.appendChild(el("div", i.pin_state, i.pin_state.startsWith("refused") ? "pin-refused" : "muted"));
      if (i.pin) {
        const fp = el("div", i.pin.slice(0, 23) + "…", "pin");
        fp.title = "SHA-256 " + i.pin;
        pin.appendChild(fp);
      }
      tr.appendChild(pin);
      tr.appendChild(el("td", num(i.eps), "num"));
      tr.appendChild(el("td", num(i.inflight), "num"));
      tr.appendChild(el("td", num(i.answered), "num"));
      tr.appendChild(el("td", num(i.redispatched), "num"));
      tr.appendChild(el("td", i.last_error || "", "error"));
      const labels = ["Instance", "State", "Why", "Role", "Revision", "Digest", "Pin", "Events/s", "In flight",
        "Answered", "Redispatched", "Last error"];
      Array.from(tr.cells).forEach((cell, n) => { cell.dataset.label = labels[n]; });
      rows.push(tr);
    });
    body.replaceChildren(...rows);
    const differing = state.digests.differing;
    const note = $("digest-note");
    note.hidden = differing.length === 0;
    note.className = "note alarm";
    note.textContent = differing.length
      ? "Settings digest differs on " + differing.join(", ") + " (majority " + (state.digests.majority || "none") + ")"
      : "";
  }

  function renderTotals(state) {
    const t = state.totals;
    const s = state.summary;
    const total = state.instances.length;
    $("instances-up").textContent = s.UP + " / " + total;
    $("card-instances").classList.toggle("alarm", s.DOWN > 0);
    $("clients").textContent = num(t.clients);
    $("eps-in").textContent = num(t.eps_in);
    $("eps-answered").textContent = num(t.eps_answered);
    $("events-answered").textContent = num(t.events_answered);
    $("detections-total").textContent = num(t.detections);
    $("backlog").textContent = num(t.backlog);
    $("pending").textContent = num(t.pending);
    $("redispatched").textContent = num(t.redispatched);
    const drops = sum(t.dropped) + sum(t.dropped_lines);
    $("drops").textContent = num(drops);
    $("card-drops").classList.toggle("alarm", drops > 0);
    const rows = [];
    for (const [kind, table_] of [["dropped", t.dropped], ["instance lines refused", t.dropped_lines], ["unmatched", t.unmatched]]) {
      for (const [reason, count] of Object.entries(table_ || {})) rows.push([kind, reason, count]);
    }
    const box = $("drops-table");
    box.replaceChildren(rows.length ? table(["Kind", "Reason", "Count"], rows, [false, false, true]) : el("p", "None.", "note"));
  }

  function renderCluster(state) {
    const c = state.cluster;
    const dl = $("cluster");
    const pairs = [["Mode", c.mode], ["Control", c.control || "–"], ["Epoch", c.epoch ?? "–"],
      ["Emergency", c.emergency.length ? c.emergency.join("; ") : "no"], ["REST writes go to", c.writes]];
    if (c.cluster_id) pairs.splice(1, 0, ["Cluster id", c.cluster_id]);
    dl.replaceChildren(...pairs.flatMap(([k, v]) => {
      const dd = el("dd", v, k === "Emergency" && c.emergency.length ? "error" : "");
      return [el("dt", k), dd];
    }));
  }

  // Detection statistics: rendered generically.  A mapping of numbers is a bar chart; a mapping of
  // mappings is a table (one row per key); a list of objects is a table of their fields.
  function bars(obj) {
    const entries = Object.entries(obj).filter(([, v]) => typeof v === "number").sort((a, b) => b[1] - a[1]);
    const max = Math.max(1, ...entries.map(([, v]) => v));
    const box = el("div", null, "bars");
    entries.forEach(([k, v]) => {
      const label = el("span", k);
      const track = el("div");
      const bar = el("div", null, "bar");
      bar.style.width = (100 * v / max).toFixed(1) + "%";
      track.appendChild(bar);
      const value = el("span", num(v), "num");
      const item = document.createDocumentFragment();
      item.append(label, track, value);
      box.appendChild(item);
    });
    return box;
  }

  function generic(value) {
    if (Array.isArray(value)) {
      if (!value.length) return el("p", "None.", "note");
      if (typeof value[0] === "object" && value[0] !== null) {
        const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
        return table(keys, value.map((v) => keys.map((k) => fmtCell(v[k]))), keys.map((k) => typeof value[0][k] === "number"));
      }
      return el("p", value.join(", "));
    }
    if (value && typeof value === "object") {
      const vals = Object.values(value);
      if (vals.length && vals.every((v) => typeof v === "number")) return bars(value);
      if (vals.length && vals.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
        const keys = [...new Set(vals.flatMap((v) => Object.keys(v)))];
        const rows = Object.entries(value).map(([k, v]) => [k, ...keys.map((c) => fmtCell(v[c]))]);
        return table(["", ...keys], rows, [false, ...keys.map((c) => typeof vals[0][c] === "number")]);
      }
      const dl = el("dl", null, "pairs");
      Object.entries(value).forEach(([k, v]) => dl.append(el("dt", k), el("dd", fmtCell(v))));
      return dl;
    }
    return el("p", fmtCell(value));
  }

  function fmtCell(v) {
    if (typeof v === "number") return v;
    if (v === null || v === undefined) return "–";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function renderDetections(state) {
    const d = state.detections || {};
    const box = $("detections");
    const keys = Object.keys(d);
    if (!keys.length) {
      box.replaceChildren(el("p", "No detection statistics reported yet (the balancer counted " + num(state.totals.detections) + " detection lines).", "note"));
      return;
    }
    const parts = [];
    keys.forEach((k) => {
      parts.push(el("h3", k.replace(/_/g, " ")));
      parts.push(generic(d[k]));
    });
    box.replaceChildren(...parts);
  }

  function renderAlerts(state) {
    const a = state.alerts;
    const counts = Object.entries(a.counts);
    $("alert-counts").replaceChildren(counts.length ? table(["Alert", "Count"], counts, [false, true]) : el("p", "None received.", "note"));
    const list = $("alerts");
    list.replaceChildren(...a.recent.map((r) => {
      const li = el("li");
      const t = el("time", new Date(r.time * 1000).toLocaleTimeString());
      t.dateTime = new Date(r.time * 1000).toISOString();
      li.append(t, el("span", r.name, "name"), el("span", r.peer + ": " + r.line));
      return li;
    }));
  }

  function render(state) {
    $("user").textContent = state.user;
    renderTotals(state);
    renderInstances(state);
    renderCluster(state);
    renderDetections(state);
    renderAlerts(state);
    const live = $("live");
    live.textContent = "live · " + new Date(state.time * 1000).toLocaleTimeString();
    live.className = "live ok";
    document.body.dataset.updated = String(state.time);
  }

  function stale(why) {
    const live = $("live");
    live.textContent = why;
    live.className = "live stale";
  }

  // The state once at once, then the stream.  EventSource reconnects by itself after a network error;
  // when it gives up (the answer was not a stream: 401 after the session ended, or 503), the state
  // request says which: 401 shows the login form again, anything else is retried in a few seconds.
  function load() {
    return fetch("/console/api/state", { credentials: "same-origin" }).then((r) => {
      if (r.status === 401) {
        location.reload();
        return null;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then((s) => s && render(s));
  }

  function listen() {
    const source = new EventSource("/console/api/events");
    source.addEventListener("state", (e) => render(JSON.parse(e.data)));
    source.addEventListener("logout", () => location.reload());
    source.onerror = () => {
      stale("reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        load().then(() => setTimeout(listen, 3000)).catch(() => setTimeout(listen, 3000));
      }
    };
  }

  function start() {
    load().catch(() => stale("cannot reach the balancer"));
    listen();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
