"use strict";
// The status page's script: polls status/feed about once a second and fills the page in.
// No framework and nothing fetched from elsewhere. A failed poll leaves the last figures
// on screen, marked stale, and the next poll tries again.
(function () {
  var PERIOD_MS = 1000;
  var TIMEOUT_MS = 3000;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var body = document.body;
  var polls = 0;
  var staleSince = null;
  var lastLinks = "";

  function $(id) { return document.getElementById(id); }

  // Sets an element's text and, when given, its raw value (for tests and tooling).
  function set(id, text, raw) {
    var el = $(id);
    if (!el) return;
    el.textContent = text;
    if (raw !== undefined) el.setAttribute("data-value", String(raw));
  }

  function tone(id, value) { var el = $(id); if (el) el.setAttribute("data-tone", value); }

  function fixed(n, digits) { return (n === null || n === undefined) ? "\u2014" : Number(n).toFixed(digits); }

  function meter(id, part, whole, warnAt) {
    var el = $(id);
    if (!el) return;
    var ratio = whole > 0 ? Math.min(1, Math.max(0, part / whole)) : 0;
    el.style.width = (ratio * 100).toFixed(1) + "%";
    el.setAttribute("data-tone", ratio >= warnAt ? (ratio >= 1 ? "bad" : "warn") : "ok");
  }

  function duration(s) {
    s = Math.floor(s);
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h > 0) return h + " h " + String(m).padStart(2, "0") + " min";
    if (m > 0) return m + " min " + String(sec).padStart(2, "0") + " s";
    return sec + " s";
  }

  function clock(date) { return date.toLocaleTimeString([], { hour12: false }); }

  var TONES = {
    healthy: "good", busy: "warn", penalized: "warn", degraded: "bad", draining: "warn",
    closed: "good", half_open: "warn", open: "bad",
    local: "good", shared: "good", fallback: "warn"
  };

  function svg(name, attrs, title) {
    var el = document.createElementNS(SVG_NS, name);
    for (var k in attrs) el.setAttribute(k, attrs[k]);
    if (title) {
      var t = document.createElementNS(SVG_NS, "title");
      t.textContent = title;
      el.appendChild(t);
    }
    return el;
  }

  // One mark per call, at its start: a dot for ok, a triangle for penalised, a cross for an
  // error (shapes as well as colours, and a title on each); penalties as shaded spans.
  function timeline(t) {
    var box = $("timeline");
    var width = Math.max(200, Math.round(box.getBoundingClientRect().width) || 1000);
    var height = 120, mid = 60, span = t.window_seconds;
    box.setAttribute("viewBox", "0 0 " + width + " " + height);
    while (box.lastChild && box.lastChild.nodeName !== "desc") box.removeChild(box.lastChild);
    var x = function (ago) { return width * (1 - Math.min(span, Math.max(0, ago)) / span); };
    for (var g = 1; g < 4; g++) {
      var gx = (width * g / 4).toFixed(1);
      box.appendChild(svg("line", { "class": "grid", x1: gx, x2: gx, y1: 0, y2: height }));
    }
    t.penalties.forEach(function (p) {
      var from = x(p.from_ago_seconds), to = x(Math.max(0, p.until_ago_seconds));
      var left = p.until_ago_seconds < 0 ? ", " + fixed(-p.until_ago_seconds, 1) + " s left" : "";
      box.appendChild(svg("rect", { "class": "span", x: from.toFixed(1), y: 0,
        width: Math.max(1, to - from).toFixed(1), height: height }, "penalty" + left));
    });
    var counts = { ok: 0, penalised: 0, error: 0 };
    t.calls.forEach(function (c) {
      counts[c.outcome] = (counts[c.outcome] || 0) + 1;
      var cx = x(c.ago_seconds);
      var title = c.outcome + (c.detail !== c.outcome ? " (" + c.detail + ")" : "") + ", " +
        Math.round(c.duration_seconds * 1000) + " ms, " + fixed(c.ago_seconds, 1) + " s ago";
      var cls = "mark " + c.outcome;
      var mark;
      if (c.outcome === "ok") {
        mark = svg("circle", { "class": cls, cx: cx.toFixed(1), cy: mid, r: 5 }, title);
      } else if (c.outcome === "penalised") {
        mark = svg("path", { "class": cls, d: "M" + cx.toFixed(1) + " " + (mid - 8) +
          " l7 13 h-14 z" }, title);
      } else {
        mark = svg("path", { "class": cls, d: "M" + (cx - 5).toFixed(1) + " " + (mid - 5) +
          " l10 10 m0 -10 l-10 10" }, title);
      }
      box.appendChild(mark);
      // A long call (a timeout, a slow answer) also shows how long it lasted.
      var end = x(c.ago_seconds - c.duration_seconds);
      if (end - cx > 8) {
        box.appendChild(svg("line", { "class": cls, x1: cx.toFixed(1), x2: end.toFixed(1),
          y1: mid + 12, y2: mid + 12, "stroke-width": 2 }));
      }
    });
    box.setAttribute("data-marks", String(t.calls.length));
    $("timeline-desc").textContent = t.calls.length + " upstream calls in the last " + span +
      " s: " + counts.ok + " ok, " + counts.penalised + " penalised, " + counts.error +
      " error; " + t.penalties.length + " penalties.";
    set("count-ok", String(counts.ok), counts.ok);
    set("count-penalised", String(counts.penalised), counts.penalised);
    set("count-error", String(counts.error), counts.error);
    set("timeline-window", String(span), span);
  }

  function links(list) {
    var key = JSON.stringify(list);
    if (key === lastLinks) return;
    lastLinks = key;
    var ul = $("links");
    ul.textContent = "";
    list.forEach(function (l) {
      var li = document.createElement("li");
      var a = document.createElement("a");
      a.href = l.href;
      a.textContent = l.label;
      li.appendChild(a);
      ul.appendChild(li);
    });
  }

  function render(f) {
    var s = f.status;
    set("version", "v" + s.version, s.version);
    set("uptime", duration(s.uptime_seconds), s.uptime_seconds);
    set("system-status", s.system_status, s.system_status);
    tone("system-status", TONES[s.system_status] || "info");

    set("calls-per-second", fixed(f.budget.calls_per_second, 2), f.budget.calls_per_second);
    set("rate", fixed(s.rate_per_second, 2), s.rate_per_second);
    // Using the whole budget is the point, not a warning.
    meter("budget-fill", f.budget.calls_per_second, s.rate_per_second, Infinity);
    set("rate-window", fixed(f.budget.window_seconds, 0), f.budget.window_seconds);
    set("interval", fixed(s.interval_seconds, 3), s.interval_seconds);
    set("guard", fixed(s.guard_seconds * 1000, 0), s.guard_seconds);
    set("guard-reason", s.guard_reason.replace(/_/g, " "), s.guard_reason);
    set("next-start", fixed(f.budget.next_start_in_seconds, 2), f.budget.next_start_in_seconds);
    if (s.penalty_active) {
      set("penalty", "active, " + fixed(s.penalty_remaining_seconds, 1) + " s left", "active");
      tone("penalty", "bad");
    } else {
      set("penalty", "none", "none");
      tone("penalty", "good");
    }

    timeline(f.timeline);
    set("calls-total", String(f.upstream.calls_total), f.upstream.calls_total);
    set("in-flight", String(s.processing), s.processing);

    set("queue-depth", String(s.queue_size), s.queue_size);
    set("queue-capacity", String(s.queue_capacity), s.queue_capacity);
    meter("queue-fill", s.queue_size, s.queue_capacity, 0.8);
    var oldest = f.queue.oldest_wait_seconds;
    set("oldest-wait", oldest === null ? "none waiting" : fixed(oldest, 1) + " s",
      oldest === null ? "" : oldest);
    set("queue-timeout", fixed(f.queue.timeout_seconds, 0), f.queue.timeout_seconds);
    meter("wait-fill", oldest || 0, f.queue.timeout_seconds, 0.8);
    for (var reason in f.queue.refusals) {
      set("refused-" + reason, String(f.queue.refusals[reason]), f.queue.refusals[reason]);
    }

    var ratio = f.cache.hit_ratio;
    set("hit-ratio", ratio === null ? "no lookups yet" : (ratio * 100).toFixed(1) + " %",
      ratio === null ? "" : ratio);
    set("cache-entries", String(s.cache_size), s.cache_size);
    set("cache-hits", String(f.cache.hits), f.cache.hits);
    set("cache-misses", String(f.cache.misses), f.cache.misses);
    set("cache-coalesced", String(f.cache.coalesced), f.cache.coalesced);

    set("breaker", s.breaker.replace(/_/g, "-"), s.breaker);
    tone("breaker", TONES[s.breaker] || "info");
    set("pacing-mode", f.pacing.mode, f.pacing.mode);
    tone("pacing-mode", TONES[f.pacing.mode] || "info");
    var replicas = f.pacing.expected_replicas;
    var place = s.replica_place === null ? "" : ", this one is place " + s.replica_place;
    set("replicas", replicas === null ? "1 (paces alone)" : replicas + " expected" + place,
      replicas === null ? 1 : replicas);
    set("lifecycle", s.lifecycle, s.lifecycle);
    links(f.links);
  }

  function fresh() {
    staleSince = null;
    body.setAttribute("data-state", "live");
    set("feed-state", "live, updated " + clock(new Date()));
  }

  function stale(why) {
    if (staleSince === null) staleSince = new Date();
    body.setAttribute("data-state", "stale");
    set("feed-state", "stale since " + clock(staleSince) + " (" + why + "); retrying");
  }

  function poll() {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, TIMEOUT_MS) : null;
    fetch("status/feed", { cache: "no-store", headers: { Accept: "application/json" },
      signal: controller ? controller.signal : undefined })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (f) {
        render(f);
        polls += 1;
        body.setAttribute("data-polls", String(polls));
        fresh();
      })
      .catch(function (e) {
        stale(e && e.name === "AbortError" ? "no answer in " + TIMEOUT_MS / 1000 + " s"
          : (e && e.message) || "unreachable");
      })
      .then(function () {
        if (timer) clearTimeout(timer);
        setTimeout(poll, PERIOD_MS);
      });
  }

  poll();
})();
