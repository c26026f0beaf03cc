// studioserve status page: polls GET / as JSON once a second and redraws the numbers and the
// SVG charts. No dependencies, nothing fetched from anywhere but this server.
(function () {
  "use strict";
  var POLL_MS = 1000;
  var SVG = "http://www.w3.org/2000/svg";
  var W = 480, H = 180, PAD_L = 44, PAD_R = 8, PAD_T = 10, PAD_B = 20;
  var shutdownAt = null;   // performance.now() at which the inactivity timer fires
  var updates = 0;

  function $(id) { return document.getElementById(id); }

  function setText(id, value) {
    var el = $(id);
    if (el) { el.textContent = value; el.setAttribute("data-value", value); }
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || isNaN(x)) { return "–"; }
    if (Math.abs(x) >= 1000) { return Math.round(x).toLocaleString("en-US"); }
    return Number(x).toFixed(digits === undefined ? 1 : digits);
  }

  function niceMax(v) {
    if (!(v > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * p >= v) { return steps[i] * p; }
    }
    return 10 * p;
  }

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function axes(svg, ymax, xlabels) {
    var plotH = H - PAD_T - PAD_B;
    [0, 0.5, 1].forEach(function (f) {
      var y = PAD_T + plotH * (1 - f);
      svg.appendChild(el("line", { x1: PAD_L, x2: W - PAD_R, y1: y, y2: y, "class": "grid" }));
      svg.appendChild(el("text", { x: PAD_L - 4, y: y + 4, "text-anchor": "end", "class": "tick" },
        fmt(ymax * f, ymax * f >= 10 || f === 0 ? 0 : 1)));
    });
    xlabels.forEach(function (lab) {
      svg.appendChild(el("text", { x: lab[0], y: H - 5, "text-anchor": lab[2] || "middle",
        "class": "tick" }, lab[1]));
    });
  }

  // series: [{name, values: [number|null]}]; draws one path per series, broken at nulls.
  function lineChart(svg, series, emptyText) {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var n = 0, ymax = 0;
    series.forEach(function (s) {
      n = Math.max(n, s.values.length);
      s.values.forEach(function (v) { if (v !== null && v > ymax) { ymax = v; } });
    });
    ymax = niceMax(ymax);
    var plotW = W - PAD_L - PAD_R, plotH = H - PAD_T - PAD_B;
    axes(svg, ymax, [[PAD_L, "-" + n + " s", "start"], [PAD_L + plotW / 2, "-" + Math.round(n / 2) + " s"],
      [W - PAD_R, "now", "end"]]);
    var drawn = 0;
    series.forEach(function (s, idx) {
      var d = "", pen = false, points = 0;
      s.values.forEach(function (v, i) {
        if (v === null || v === undefined) { pen = false; return; }
        var x = PAD_L + (n > 1 ? plotW * i / (n - 1) : plotW);
        var y = PAD_T + plotH * (1 - v / ymax);
        d += (pen ? " L" : " M") + x.toFixed(1) + " " + y.toFixed(1);
        pen = true;
        points++;
      });
      if (points) {
        var path = el("path", { d: d.trim(), "class": "line s" + idx, "data-series": s.name,
          "data-points": points });
        svg.appendChild(path);
        drawn += points;
      }
    });
    if (!drawn) {
      svg.appendChild(el("text", { x: PAD_L + plotW / 2, y: PAD_T + plotH / 2, "text-anchor": "middle",
        "class": "empty" }, emptyText || "no requests in the last minute"));
    }
    svg.setAttribute("data-points", drawn);
  }

  function barChart(svg, hist, emptyText) {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var keys = Object.keys(hist || {}).map(Number).sort(function (a, b) { return a - b; });
    var plotW = W - PAD_L - PAD_R, plotH = H - PAD_T - PAD_B;
    if (!keys.length) {
      axes(svg, 1, []);
      svg.appendChild(el("text", { x: PAD_L + plotW / 2, y: PAD_T + plotH / 2, "text-anchor": "middle",
        "class": "empty" }, emptyText));
      svg.setAttribute("data-bars", 0);
      return;
    }
    var ymax = 0;
    keys.forEach(function (k) { ymax = Math.max(ymax, hist[k]); });
    ymax = niceMax(ymax);
    var bw = plotW / keys.length;
    var every = Math.ceil(keys.length / 12);
    var labels = [];
    keys.forEach(function (k, i) {
      if (i % every === 0 || i === keys.length - 1) { labels.push([PAD_L + bw * (i + 0.5), String(k)]); }
    });
    axes(svg, ymax, labels);
    keys.forEach(function (k, i) {
      var h = plotH * hist[k] / ymax;
      var rect = el("rect", { x: PAD_L + bw * i + bw * 0.1, width: Math.max(1, bw * 0.8),
        y: PAD_T + plotH - h, height: h, "class": "bar", "data-size": k, "data-count": hist[k] });
      rect.appendChild(el("title", {}, k + " rows: " + hist[k] + " calls"));
      svg.appendChild(rect);
    });
    svg.setAttribute("data-bars", keys.length);
  }

  function clock(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    var mm = (h ? String(m).padStart(2, "0") : String(m)) + ":" + String(s).padStart(2, "0");
    return h ? h + ":" + mm : mm;
  }

  function tick() {
    var c = $("countdown");
    if (!c) { return; }
    if (shutdownAt === null) {
      c.textContent = "off";
      c.setAttribute("data-seconds", "");
      return;
    }
    var left = (shutdownAt - performance.now()) / 1000;
    c.textContent = clock(left);
    c.setAttribute("data-seconds", Math.max(0, Math.round(left)));
  }

  function modelStage(pipe) {
    if (!pipe || !pipe.stages) { return null; }
    for (var i = 0; i < pipe.stages.length; i++) {
      if (pipe.stages[i].name === pipe.model_stage) { return pipe.stages[i]; }
    }
    return null;
  }

  function render(info) {
    var ready = $("ready");
    ready.textContent = info.ready ? "ready" : "not ready";
    ready.className = "pill " + (info.ready ? "ok" : "bad");
    setText("in-flight", info.in_flight);
    setText("uptime", fmt(info.uptime_seconds, 0) + " s");
    shutdownAt = (info.shutdown_in_seconds === null || info.shutdown_in_seconds === undefined)
      ? null : performance.now() + info.shutdown_in_seconds * 1000;
    tick();
    var live = info.live;
    if (live) {
      var t = live.totals, r = live.recent, s = live.series;
      setText("total-requests", t.requests);
      setText("errors", t.errors);
      setText("rps", fmt(r.rps, 1));
      setText("p50", fmt(r.p50_ms, 2));
      setText("p99", fmt(r.p99_ms, 2));
      setText("batch-mean", fmt(r.batch_mean, 1));
      lineChart($("chart-throughput"), [{ name: "req/s", values: s.requests },
        { name: "rows/s", values: s.rows }]);
      lineChart($("chart-latency"), [{ name: "p50", values: s.p50_ms },
        { name: "p99", values: s.p99_ms }]);
      lineChart($("chart-batch"), [{ name: "mean batch", values: s.batch_mean }],
        "no model calls in the last minute");
    } else {
      setText("total-requests", info.requests_accepted);
    }
    var stage = modelStage(info.pipe);
    barChart($("chart-batch-hist"), stage ? stage.batch_sizes : {},
      info.pipe ? "no model calls yet" : "no pipe: the model is called per request");
    (info.pipe ? info.pipe.stages : []).forEach(function (st) {
      var row = document.querySelector("tr[data-stage='" + CSS.escape(st.name) + "']");
      if (!row) { return; }
      ["limit", "items", "batches", "depth"].forEach(function (cls) {
        var key = { limit: "batch_limit", items: "items", batches: "batches", depth: "queue_depth" }[cls];
        var cell = row.querySelector("." + cls);
        if (cell) { cell.textContent = st[key]; }
      });
    });
    updates++;
    document.body.setAttribute("data-updates", updates);
  }

  function setConn(ok, detail) {
    var c = $("conn");
    c.textContent = ok ? "live" : "disconnected" + (detail ? " (" + detail + ")" : "");
    c.className = "conn " + (ok ? "ok" : "bad");
  }

  function poll() {
    var headers = { Accept: "application/json" };
    var token = null;
    try { token = sessionStorage.getItem("studioserve-token"); } catch (e) { token = null; }
    token = token || window.studioserveToken || null;
    if (token) { headers.Authorization = "Bearer " + token; }
    fetch("./", { headers: headers, cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (info) { render(info); setConn(true); })
      .catch(function (e) { setConn(false, e.message); })
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  var initial = $("initial");
  if (initial) {
    try { render(JSON.parse(initial.textContent)); } catch (e) { setConn(false, e.message); }
  }
  setInterval(tick, 250);
  poll();
})();
