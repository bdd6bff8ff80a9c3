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

  // Detection statistics (Statistics.report on the balancer): per category and per source, the last hour
  // beside the last day as bars; the last hour per minute as a small SVG chart; the top indicators; per
  // instance.  Every figure is also text (the bars and the chart only illustrate it).
  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, String(v)));
    return node;
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function ago(seconds) {
    if (typeof seconds !== "number") return "never";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  // A name that may break after "_", ".", "/", "-", ":" or "@" (categories, file names, URLs), so a long
  // one wraps at a natural place before it wraps anywhere.
  function breakable(text) {
    const frag = document.createDocumentFragment();
    String(text).split(/(?<=[_./\-:@])/).forEach((part, i) => {
      if (i) frag.appendChild(document.createElement("wbr"));
      frag.appendChild(document.createTextNode(part));
    });
    return frag;
  }

  function named(tag, text, cls) {
    const node = el(tag, null, cls);
    node.appendChild(breakable(text));
    return node;
  }

  function wrapped(node, cls) {
    const wrap = el("div", null, "scroll " + (cls || ""));
    wrap.appendChild(node);
    return wrap;
  }

  function head(t, headers, numeric) {
    const row = t.createTHead().insertRow();
    headers.forEach((h, i) => {
      const th = el("th", h, numeric[i] ? "num" : "");
      th.scope = "col";
      row.appendChild(th);
    });
  }

  // One row per key: the key, then a bar and the number for the last hour and for the last day (the
  // bars share one scale: the largest last-day figure).
  function compare(what, hour, day) {
    const keys = [...new Set([...Object.keys(day || {}), ...Object.keys(hour || {})])];
    if (!keys.length) return el("p", "None in the last day.", "note");
    keys.sort((a, b) => ((day[b] || 0) - (day[a] || 0)) || ((hour[b] || 0) - (hour[a] || 0)) || a.localeCompare(b));
    const max = Math.max(1, ...keys.map((k) => Math.max(day[k] || 0, hour[k] || 0)));
    const t = el("table", null, "compare");
    head(t, [what, "Last hour", "Last day"], [false, false, false]);
    const body = t.createTBody();
    keys.forEach((k) => {
      const tr = body.insertRow();
      tr.dataset.key = k;
      const name = named("th", k);
      name.scope = "row";
      tr.appendChild(name);
      [["hour", hour[k] || 0], ["day", day[k] || 0]].forEach(([w, v]) => {
        const td = el("td", null, "meter " + w);
        td.dataset.window = w;
        const track = el("span", null, "track");
        track.setAttribute("aria-hidden", "true");
        const bar = el("span", null, "bar " + w + (v ? "" : " zero"));
        bar.style.width = (100 * v / max).toFixed(1) + "%";
        track.appendChild(bar);
        td.append(track, el("span", num(v), "num value"));
        tr.appendChild(td);
      });
    });
    return wrapped(t);
  }

  // Detections per minute over the last hour: one bar a minute, the peak labelled; the text alternative
  // says the total and the peak.
  function perMinute(series) {
    const box = el("figure", null, "minutes");
    const counts = series.map((m) => m.detections || 0);
    const total = counts.reduce((a, b) => a + b, 0);
    const peak = Math.max(0, ...counts);
    const at = counts.indexOf(peak);
    const summary = series.length
      ? num(total) + " detections in the last " + series.length + " minutes" +
        (peak ? "; peak " + num(peak) + " a minute at " + clock(series[at].minute) : "")
      : "No per-minute figures.";
    const w = 600, h = 100, n = Math.max(1, series.length), step = w / n;
    const chart = svg("svg", { viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", role: "img",
      "aria-label": "Detections per minute: " + summary, class: "spark" });
    const title = svg("title");
    title.textContent = "Detections per minute: " + summary;
    chart.appendChild(title);
    chart.appendChild(svg("line", { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: "axis" }));
    series.forEach((m, i) => {
      const v = m.detections || 0;
      if (!v) return;
      const bh = Math.max(2, (h - 4) * v / Math.max(1, peak));
      const r = svg("rect", { x: (i * step + step * 0.1).toFixed(2), y: (h - bh).toFixed(2),
        width: (step * 0.8).toFixed(2), height: bh.toFixed(2), class: i === at ? "peak" : "" });
      const tip = svg("title");
      tip.textContent = clock(m.minute) + ": " + num(v);
      r.appendChild(tip);
      chart.appendChild(r);
    });
    const caption = el("figcaption");
    caption.append(el("span", series.length ? clock(series[0].minute) : ""), el("span", summary, "summary"),
      el("span", "now"));
    box.dataset.total = String(total);
    box.dataset.peak = String(peak);
    box.append(chart, caption);
    return box;
  }

  function indicators(top) {
    if (!top || !top.length) return el("p", "None matched yet.", "note");
    const t = el("table", null, "indicators");
    head(t, ["Indicator", "Count"], [false, true]);
    const body = t.createTBody();
    top.forEach(([value, count]) => {
      const tr = body.insertRow();
      tr.append(named("td", value, "indicator"), el("td", num(count), "num"));
    });
    return wrapped(t);
  }

  function perInstance(instances) {
    const keys = Object.keys(instances || {});
    if (!keys.length) return el("p", "No instance polled yet.", "note");
    const t = el("table", null, "stat-instances phone-cards");
    const labels = ["Instance", "Last hour", "Last day", "Since its start", "Restarts", "Last poll", "Error"];
    head(t, labels, [false, true, true, true, true, false, false]);
    const body = t.createTBody();
    keys.forEach((k) => {
      const i = instances[k];
      const tr = body.insertRow();
      tr.dataset.instance = k;
      if (i.error) tr.className = "failing";
      const name = el("th", k);
      name.scope = "row";
      if (typeof i.since === "number") name.title = "started " + new Date(i.since * 1000).toLocaleString();
      tr.appendChild(name);
      const cells = [
        ["hour", num(i.last_hour ? i.last_hour.detections : null), "num"],
        ["day", num(i.last_day ? i.last_day.detections : null), "num"],
        ["total", num(i.total ? i.total.detections : null), "num"],
        ["restarts", num(i.restarts), "num"],
        ["age", ago(i.age), ""],
        ["error", i.error || "", "error"],
      ];
      cells.forEach(([field, text, cls]) => {
        const td = el("td", text, cls);
        td.dataset.field = field;
        tr.appendChild(td);
      });
      Array.from(tr.cells).forEach((cell, n) => { cell.dataset.label = labels[n]; });
    });
    return wrapped(t);
  }

  function renderDetections(state) {
    const d = state.detections || {};
    const box = $("detections");
    if (!Object.keys(d).length || !Object.keys(d.instances || {}).length) {  // not polled, or no node asked yet
      box.replaceChildren(el("p", "No detection statistics reported yet (the balancer counted " + num(state.totals.detections) + " detection lines).", "note"));
      return;
    }
    const hour = d.last_hour || {}, day = d.last_day || {}, nodes = d.nodes_total || {};
    const summary = el("dl", null, "pairs stat-summary");
    [["Last hour", hour], ["Last day", day], ["Since the nodes started", nodes]].forEach(([k, c]) => {
      summary.append(el("dt", k), el("dd", num(c.detections ?? 0) + " detections in " + num(c.events ?? 0) + " events"));
    });
    if (typeof d.at === "number") summary.append(el("dt", "Reported at"), el("dd", new Date(d.at * 1000).toLocaleTimeString()));
    const section = (title, ...nodes_) => {
      const div = el("div");
      div.append(el("h3", title), ...nodes_);
      return div;
    };
    box.replaceChildren(
      summary,
      el("div", null, "columns"),
      section("Detections per minute, last hour", perMinute(d.per_minute || [])),
      section("Per instance (each node's own figures)", perInstance(d.instances)),
    );
    const cols = box.children[1];
    cols.append(
      section("By category", compare("Category", hour.by_category || {}, day.by_category || {})),
      section("By source (feed or supplier)", compare("Source", hour.by_source || {}, day.by_source || {})),
      section("Top matched indicators (since each node started)", indicators(d.top_indicators)),
    );
    cols.children[0].id = "stat-categories";
    cols.children[1].id = "stat-sources";
    cols.children[2].id = "stat-indicators";
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
