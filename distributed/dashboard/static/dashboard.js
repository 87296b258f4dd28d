// The dashboard's one script: no libraries, nothing from another host.
// The status page listens on /ws (an update a second, see routes.py);
// a worker's page polls /json/worker/<address> every two seconds.
// Text from the cluster (keys, names, tracebacks) only ever goes into
// textContent, never into HTML.
"use strict";

var Dashboard = (function () {
  var STREAM_KEEP = 5000;      // finished tasks the task stream keeps
  var STREAM_WINDOW = 30;      // seconds the task stream shows
  var EVENTS_KEEP = 200;       // events the log keeps

  function el(tag, attrs) {
    var node = document.createElement(tag);
    for (var name in attrs || {}) {
      if (name === "text") node.textContent = attrs[name];
      else if (name === "style") node.style.cssText = attrs[name];
      else node.setAttribute(name, attrs[name]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    var units = ["B", "kB", "MB", "GB", "TB"], i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : n.toFixed(0)) + " " + units[i];
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString();
  }

  // a stable colour per task group, never the red of transfers and errors
  var PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
                 "#9c755f", "#bab0ac", "#17becf", "#8c6d31", "#637939", "#7b4173"];
  var colours = {};
  function colour(prefix) {
    if (!colours[prefix]) {
      var h = 0;
      for (var i = 0; i < prefix.length; i++) h = (h * 31 + prefix.charCodeAt(i)) >>> 0;
      colours[prefix] = PALETTE[h % PALETTE.length];
    }
    return colours[prefix];
  }

  // -- the status page -------------------------------------------------------

  var stream = [];      // [seq, key, prefix, worker, thread, start, stop, t0, t1]
  var latest = null;    // the latest update
  var clockSkew = 0;    // center time - browser time

  function renderSummary(u) {
    var threads = 0, memory = 0;
    u.workers.forEach(function (w) { threads += w.threads; memory += w.memory; });
    document.getElementById("center").textContent = "center " + u.address;
    document.getElementById("summary").textContent =
      u.workers.length + " workers, " + threads + " threads, " + bytes(memory) +
      ", " + u.ntasks + " tasks";
  }

  function renderWorkers(u) {
    var body = document.querySelector("#workers tbody");
    body.textContent = "";
    u.workers.forEach(function (w) {
      var link = el("a", {href: "/worker/" + encodeURIComponent(w.address), text: w.address});
      var mem = bytes(w.memory) + " / " + (w.memory_limit ? bytes(w.memory_limit) : "no limit");
      body.appendChild(el("tr", {"data-address": w.address, "class": w.paused ? "paused" : ""},
        el("td", {}, link), el("td", {text: w.name}), el("td", {text: w.threads}),
        el("td", {text: mem}), el("td", {text: bytes(w.spilled)}),
        el("td", {text: w.cpu === null || w.cpu === undefined ? "–" : w.cpu.toFixed(0) + " %"}),
        el("td", {text: w.processing}), el("td", {text: w.queued}), el("td", {text: w.keys}),
        el("td", {text: w.last_seen.toFixed(1) + " s ago"}),
        el("td", {text: w.paused ? "paused" : "no"})));
    });
    if (!u.workers.length) {
      body.appendChild(el("tr", {}, el("td", {colspan: 11, "class": "empty",
                                               text: "No workers."})));
    }
  }

  function renderGroups(u) {
    var box = document.getElementById("groups");
    box.textContent = "";
    if (!u.groups.length) { box.appendChild(el("p", {"class": "empty", text: "No tasks yet."})); return; }
    u.groups.forEach(function (g) {
      var total = g.waiting + g.processing + g.memory + g.erred;
      var bar = el("div", {"class": "bar"});
      ["memory", "erred", "processing", "waiting"].forEach(function (state) {
        if (g[state]) bar.appendChild(el("div", {"class": "part " + state, title: g[state] + " " + state,
                                                 style: "width:" + (100 * g[state] / total) + "%"}));
      });
      box.appendChild(el("div", {"class": "group", "data-name": g.name, "data-total": total,
                                 "data-memory": g.memory, "data-erred": g.erred,
                                 "data-processing": g.processing, "data-waiting": g.waiting},
        el("span", {"class": "name", text: g.name}), bar,
        el("span", {"class": "count", text: g.memory + " / " + total +
                    (g.erred ? " (" + g.erred + " erred)" : "")})));
    });
  }

  function renderMemory(u) {
    var box = document.getElementById("memory");
    box.textContent = "";
    var top = 1;
    u.workers.forEach(function (w) {
      top = Math.max(top, w.memory_limit || 0, w.managed + w.unmanaged + w.spilled);
    });
    u.workers.forEach(function (w) {
      var pct = function (n) { return (100 * n / top) + "%"; };
      var bar = el("div", {"class": "bar"},
        el("div", {"class": "part managed", style: "width:" + pct(w.managed), title: "managed " + bytes(w.managed)}),
        el("div", {"class": "part unmanaged", style: "width:" + pct(w.unmanaged), title: "unmanaged " + bytes(w.unmanaged)}),
        el("div", {"class": "part spilled", style: "width:" + pct(w.spilled), title: "spilled " + bytes(w.spilled)}));
      if (w.memory_limit) bar.appendChild(el("div", {"class": "limit", style: "left:" + pct(w.memory_limit)}));
      box.appendChild(el("div", {"class": "group", "data-address": w.address},
        el("span", {"class": "name", text: w.name}), bar,
        el("span", {"class": "count", text: bytes(w.managed + w.unmanaged) +
                    (w.spilled ? " + " + bytes(w.spilled) + " on disk" : "")})));
    });
  }

  var KINDS = {"worker-added": "worker added", "worker-removed": "worker removed",
               "worker-died": "worker died", "task-erred": "task erred", "restart": "restart"};

  function addEvents(events) {
    var list = document.getElementById("events");
    events.forEach(function (e) {
      var text = e[4] || "";
      var body = text.indexOf("\n") >= 0
        ? el("details", {}, el("summary", {text: text.split("\n")[0]}), el("pre", {text: text}))
        : el("span", {"class": "text", text: text});
      list.insertBefore(el("li", {"class": e[2], "data-kind": e[2], "data-subject": e[3]},
        el("span", {"class": "time", text: clock(e[1])}),
        el("span", {"class": "kind", text: KINDS[e[2]] || e[2]}),
        el("span", {"class": "subject", text: e[3]}), body), list.firstChild);
    });
    while (list.children.length > EVENTS_KEEP) list.removeChild(list.lastChild);
  }

  function drawStream() {
    var canvas = document.getElementById("stream");
    var width = canvas.clientWidth;
    // one row per (worker, thread), labelled "worker · thread n"
    var threads = {}, names = [], rows = {}, labels = [];
    stream.forEach(function (t) {
      var ids = threads[t[3]] || (threads[t[3]] = []);
      if (ids.indexOf(t[4]) < 0) ids.push(t[4]);
    });
    Object.keys(threads).sort().forEach(function (w) {
      threads[w].sort().forEach(function (id, i) {
        rows[w + " " + id] = names.length;
        names.push(w + " " + id);
        labels.push(w + " · thread " + (i + 1));
      });
    });
    var margin = 170;  // the labels
    var rowHeight = Math.max(8, Math.min(24, Math.floor(240 / Math.max(names.length, 1))));
    var height = Math.max(60, names.length * rowHeight + 20);
    var ratio = window.devicePixelRatio || 1;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    canvas.style.height = height + "px";
    var ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, width, height);
    var now = Date.now() / 1000 + clockSkew;
    // the window spans what there is to see: 5 s at least, STREAM_WINDOW at most
    var earliest = now;
    stream.forEach(function (t) { if (t[6] > now - STREAM_WINDOW) earliest = Math.min(earliest, t[7] !== null ? t[7] : t[5]); });
    var span = Math.max(5, Math.min(STREAM_WINDOW, Math.ceil((now - earliest) * 1.1)));
    var step = span <= 10 ? 1 : 5;
    var left = now - span;
    var x = function (t) { return margin + (t - left) / span * (width - margin); };
    ctx.strokeStyle = "#ddd";
    ctx.fillStyle = "#888";
    ctx.font = "10px sans-serif";
    for (var s = 0; s <= span; s += step) {
      var tx = x(now - s);
      ctx.beginPath(); ctx.moveTo(tx, 0); ctx.lineTo(tx, height - 12); ctx.stroke();
      ctx.fillText(s ? "-" + s + " s" : "now", Math.min(tx, width - 22), height - 2);
      ctx.fillStyle = "#888";
    }
    ctx.fillStyle = "#444";
    ctx.font = Math.min(12, rowHeight - 2) + "px sans-serif";
    labels.forEach(function (label, i) {
      ctx.fillText(label, 0, i * rowHeight + rowHeight / 2 + 4, margin - 8);
    });
    stream.forEach(function (t) {
      if (t[6] < left) return;
      var y = rows[t[3] + " " + t[4]] * rowHeight;
      if (t[7] !== null && t[8] > left) {  // fetching its inputs
        ctx.fillStyle = "#e8443a";
        var x0 = Math.max(margin, x(t[7]));
        ctx.fillRect(x0, y + 1, Math.max(1, x(t[8]) - x0), rowHeight - 2);
      }
      ctx.fillStyle = colour(t[2]);
      var x1 = Math.max(margin, x(t[5]));
      ctx.fillRect(x1, y + 1, Math.max(1, x(t[6]) - x1), rowHeight - 2);
    });
    canvas.setAttribute("data-rows", names.length);
    canvas.setAttribute("data-tasks", stream.length);
    document.getElementById("window").textContent = span;
    var legend = document.getElementById("legend");
    legend.textContent = "";
    var seen = {};
    stream.forEach(function (t) { seen[t[2]] = true; });
    Object.keys(seen).sort().forEach(function (p) {
      legend.appendChild(el("span", {}, el("i", {"class": "sw", style: "background:" + colour(p)}), p));
    });
  }

  // what the tests read: updates handled, the slowest one (ms, drawing included)
  var stats = {updates: 0, slowest: 0};

  function timed(f) {
    return function (arg) {
      var t0 = performance.now();
      f(arg);
      stats.slowest = Math.max(stats.slowest, performance.now() - t0);
    };
  }

  function update(u) {
    stats.updates++;
    latest = u;
    clockSkew = u.time - Date.now() / 1000;
    renderSummary(u);
    renderWorkers(u);
    renderGroups(u);
    renderMemory(u);
    if (u.events.length) addEvents(u.events);
    if (u.stream.length) {
      stream = stream.concat(u.stream);
      if (stream.length > STREAM_KEEP) stream = stream.slice(stream.length - STREAM_KEEP);
    }
    window.requestAnimationFrame(timed(drawStream));
  }

  function connection(text, ok) {
    var c = document.getElementById("connection");
    c.textContent = text;
    c.className = ok ? "on" : "off";
  }

  function status() {
    var proto = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(proto + location.host + "/ws");
    socket.onopen = function () { connection("live", true); };
    socket.onmessage = timed(function (m) { update(JSON.parse(m.data)); });
    socket.onclose = function () {
      connection("disconnected: retrying", false);
      setTimeout(status, 2000);
    };
    window.onresize = function () { if (latest) drawStream(); };
  }

  // -- a worker's page -----------------------------------------------------

  function worker() {
    var address = decodeURIComponent(location.pathname.split("/").pop());
    document.getElementById("address").textContent = address;
    document.title = address + " — distributed dashboard";
    function poll() {
      fetch("/json/worker/" + encodeURIComponent(address), {credentials: "same-origin"})
        .then(function (r) {
          if (!r.ok) throw new Error(r.status === 404 ? "this worker is gone" : "HTTP " + r.status);
          return r.json();
        })
        .then(function (d) { renderWorker(d); connection("live", true); })
        .catch(function (e) { connection(e.message, false); })
        .finally(function () { setTimeout(poll, 2000); });
    }
    poll();
  }

  function renderWorker(d) {
    var w = d.worker, body = document.querySelector("#worker tbody");
    body.textContent = "";
    [["name", w.name], ["threads", w.threads],
     ["memory", bytes(w.memory) + " / " + (w.memory_limit ? bytes(w.memory_limit) : "no limit")],
     ["managed", bytes(w.managed)], ["unmanaged", bytes(w.unmanaged)], ["spilled", bytes(w.spilled)],
     ["CPU", w.cpu === null || w.cpu === undefined ? "–" : w.cpu.toFixed(0) + " %"],
     ["processing", w.processing], ["queued", w.queued], ["keys", w.keys],
     ["last heartbeat", w.last_seen.toFixed(1) + " s ago"], ["paused", w.paused ? "paused" : "no"]
    ].forEach(function (r) {
      body.appendChild(el("tr", {}, el("th", {text: r[0]}), el("td", {text: r[1]})));
    });
    document.getElementById("tasks").textContent =
      d.processing.length ? d.processing.join(", ") : "none";
    document.getElementById("nkeys").textContent =
      d.nkeys + (d.nkeys > d.keys.length ? " (the first " + d.keys.length + " listed)" : "");
    var keys = document.querySelector("#keys tbody");
    keys.textContent = "";
    d.keys.forEach(function (k) {
      keys.appendChild(el("tr", {}, el("td", {text: k.key}), el("td", {text: bytes(k.nbytes)})));
    });
    document.getElementById("logs").textContent = !d.logs.length ? "No log records." : d.logs.map(function (r) {
      return clock(r.time) + " " + r.level + " " + r.name + ": " + r.message;
    }).join("\n");
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.getAttribute("data-page");
    if (page === "status") status();
    else if (page === "worker") worker();
  });

  return {status: status, worker: worker, stats: stats};
})();
