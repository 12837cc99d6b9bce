/* Sendit's live pages: render a JSON snapshot, then poll the API every few seconds. No build step. */
"use strict";
var Sendit = (function () {
  var EVERY_MS = 2000;
  // only the actions the user's role allows (set on <body> by the server)
  var ACTIONS = (document.body.getAttribute("data-actions") || "").split(" ").filter(Boolean);
  var CONFIRM = "Discard the ERROR and QUARANTINED images of this series? Their files are deleted.";

  function esc(value) {
    return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function $(id) { return document.getElementById(id); }
  function badge(status) { return '<span class="badge ' + esc(status) + '">' + esc(status) + "</span>"; }
  // one time format everywhere: "YYYY-MM-DD HH:MM:SS" in UTC (the pages say UTC)
  function clock(iso) { return iso ? new Date(iso).toISOString().slice(0, 19).replace("T", " ") : ""; }
  function seconds(s) {
    if (s === null || s === undefined) return "";
    return s < 120 ? s.toFixed(1) + " s" : s < 7200 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(1) + " h";
  }
  function cap(word) { return word.charAt(0).toUpperCase() + word.slice(1); }
  function bytes(n) {
    if (n === null || n === undefined) return "unknown";
    var units = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }
  function csrf() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  async function get(url) {
    var response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (response.status === 401) {
      window.location.href = "/login/?next=" + encodeURIComponent(window.location.pathname);
      throw new Error("logged out");
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    return response.json();
  }

  function poll(step) {
    var busy = false;
    async function tick() {
      if (busy) return;
      busy = true;
      try {
        await step();
        $("updated").textContent = "live · updated " + clock(new Date().toISOString()) + " UTC";
      } catch (error) {
        $("updated").textContent = "connection lost (" + error.message + "); retrying";
      } finally {
        busy = false;
      }
    }
    window.setInterval(tick, EVERY_MS);
  }

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  });

  function progressBar(row) {
    var c = row.counts || {}, total = row.total || 0;
    function part(n, cls) { return n && total ? '<span class="' + cls + '" style="width:' + (100 * n / total) + '%"></span>' : ""; }
    var problems = (c.ERROR || 0) + (c.QUARANTINED || 0);
    return '<div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="' + total + '" aria-valuenow="' +
      row.finished + '" title="' + row.finished + " of " + total + ' finished">' +
      // finished parts only: 0 of 10 finished is an empty bar; in-flight images are the grey rest
      part(c.DONE, "done") + part(c.SKIPPED, "skip") + part(problems, "prob") + "</div>";
  }

  function chart(points, tickEvery, label) {
    var width = 600, height = 90, top = 6, bottom = 16, n = points.length;
    var max = Math.max.apply(null, points.map(function (p) { return p.n; }).concat([1]));
    var w = width / n, svg = ['<svg class="chart" viewBox="0 0 ' + width + " " + (height + bottom) +
      '" width="100%" height="' + (height + bottom) + '" role="img">'];
    points.forEach(function (p, i) {
      var h = (height - top) * p.n / max;
      svg.push('<rect x="' + (i * w + 1) + '" y="' + (height - h) + '" width="' + Math.max(1, w - 2) + '" height="' + h +
        '"><title>' + esc(label(p.t)) + ": " + p.n + "</title></rect>");
      if (i % tickEvery === 0) svg.push('<text x="' + i * w + '" y="' + (height + 12) + '">' + esc(label(p.t)) + "</text>");
    });
    svg.push('<text x="2" y="10">max ' + max + "</text></svg>");
    return svg.join("");
  }
  function sum(points) { return points.reduce(function (a, p) { return a + p.n; }, 0); }

  function forms(seriesId, next) {
    return ACTIONS.map(function (action) {
      return '<form class="inline" method="post" action="/series/' + seriesId + "/" + action + '"' +
        (action === "discard" ? ' data-confirm="' + esc(CONFIRM) + '"' : "") + ">" +
        '<input type="hidden" name="csrfmiddlewaretoken" value="' + esc(csrf()) + '">' +
        '<input type="hidden" name="next" value="' + esc(next) + '">' +
        '<button class="act ' + action + '" type="submit">' + cap(action) + "</button></form>";
    }).join(" ");
  }

  // Each panel renders on its own: one the server could not compute (d.unavailable) says so, and a
  // panel that fails to render does not take the others with it.
  var PANELS = {
    counts: ["counts"], files: ["file-counts"], throughput: ["chart-hour", "chart-day", "hour-total", "day-total"], queue: ["queue"],
    workers: ["workers"], destinations: ["destinations"], disk: ["disk"], scans: ["scans"], recent: ["recent"],
    attention: ["attention", "attention-count"], problems: ["problems"],
  };
  function unavailable(name, reason) {
    var text = '<span class="unavailable">unavailable (' + esc(reason) + ")</span>";
    PANELS[name].forEach(function (id) {
      var el = $(id);
      if (!el) return;
      if (el.tBodies) el.tBodies[0].innerHTML = '<tr><td colspan="9">' + text + "</td></tr>";
      else el.innerHTML = id === "hour-total" || id === "day-total" || id === "attention-count" ? "" : text;
    });
  }
  function panel(d, name, render) {
    var reason = d.unavailable && d.unavailable[name];
    if (reason || d[name] === null || d[name] === undefined) { unavailable(name, reason || "no data"); return; }
    try { render(d[name]); } catch (error) { unavailable(name, "display error"); }
  }

  function renderDisk(disk) {
    var rows = disk.filesystems.map(function (fs) {
      return '<div title="' + esc(fs.paths.join("\n")) + '"><span class="' + (fs.low ? "bad" : "ok") + '">' +
        bytes(fs.free_bytes) + "</span> free of " + bytes(fs.total_bytes) + (fs.low ? ' <span class="bad">low space</span>' : "") +
        ' <span class="muted small">' + esc(fs.folders.join(", ")) + "</span></div>";
    });
    disk.missing.forEach(function (m) {
      rows.push('<div title="' + esc(m.path) + '"><span class="warn">' + esc(m.problem) + '</span> <span class="muted small">' +
        esc(m.folder) + "</span></div>");
    });
    $("disk").innerHTML = rows.join("") || '<span class="muted">no folder</span>';
  }

  function renderScans(scans) {
    $("scans").tBodies[0].innerHTML = scans.length ? scans.map(function (s) {
      var result = s.ok ? '<span class="ok">ok</span>' : '<span class="bad">failed</span> ' +
        (s.failures > 1 ? s.failures + " times in a row " : "") + '<span class="small">' + esc(s.error) + "</span>";
      if (s.stale) result += ' <span class="bad">no scan lately</span>';
      var ignored = Object.keys(s.ignored).filter(function (k) { return s.ignored[k]; }).map(function (k) {
        return s.ignored[k] + " " + esc(k.replace(/_/g, " "));
      }).join(", ");
      return '<tr data-watcher="' + esc(s.name) + '"><td>' + esc(s.name) + '</td><td class="small">' +
        esc((s.finished || "").slice(0, 19).replace("T", " ")) + "</td><td>" + result + '</td><td class="small">' +
        (ignored || '<span class="muted">none</span>') + "</td></tr>";
    }).join("") : '<tr><td colspan="4" class="muted">No scan recorded yet.</td></tr>';
  }

  function renderDashboard(d) {
    $("warnings").innerHTML = (d.warnings || []).map(function (line) { return '<p class="alert">' + esc(line) + "</p>"; }).join("");
    var missing = Object.keys(d.unavailable || {});
    $("unavailable").hidden = !missing.length;
    $("unavailable").textContent = "Unavailable right now: " + missing.map(function (name) {
      return name + " (" + d.unavailable[name] + ")";
    }).join(", ");
    panel(d, "counts", function (counts) {
      $("counts").innerHTML = Object.keys(counts).map(function (status) {
        return '<div data-status="' + esc(status) + '">' + badge(status) + "<b>" + counts[status] + "</b></div>";
      }).join("");
    });
    panel(d, "files", function (files) {
      $("file-counts").innerHTML = Object.keys(files).map(function (status) {
        return '<div data-status="' + esc(status) + '">' + badge(status) + "<b>" + files[status] + "</b></div>";
      }).join("");
    });
    panel(d, "throughput", function (t) {
      $("chart-hour").innerHTML = chart(t.hour, 10, function (x) { return x.slice(11, 16); });
      $("chart-day").innerHTML = chart(t.day, 4, function (x) { return x.slice(11, 16); });
      $("hour-total").textContent = sum(t.hour) + " images";
      $("day-total").textContent = sum(t.day) + " images";
    });
    panel(d, "queue", function (q) {
      $("queue").textContent = (q.pending_tasks === null ? "queue unreadable" : q.pending_tasks + " task(s) waiting, " +
        q.scheduled_tasks + " scheduled") + "; " + q.series_in_flight + " series in flight";
    });
    panel(d, "workers", function (w) {
      var alive = w.alive.length;
      $("workers").innerHTML = '<span class="' + (alive ? "ok" : "bad") + '">' + alive + "</span>" +
        ' <span class="muted small">seen in the last ' + w.alive_seconds + " s</span>";
    });
    panel(d, "disk", renderDisk);
    panel(d, "destinations", function (dests) {
      $("destinations").innerHTML = dests.length ? dests.map(function (dest) {
        return '<div data-destination="' + esc(dest.name) + '"><span class="' + (dest.reachable ? "ok" : "bad") + '">' +
          (dest.reachable ? "reachable" : "unreachable") + "</span> <b>" + esc(dest.name) + "</b>" +
          (dest.target ? ' <span class="small">' + esc(dest.target) + "</span>" : "") +
          (dest.problem ? ' <span class="muted small">' + esc(dest.problem) + "</span>" : "") +
          '<div class="muted small">last success ' + (dest.last_success ? clock(dest.last_success) + " UTC" : "never") +
          " · " + (dest.last_hour || 0) + " image(s) in the last hour</div></div>";
      }).join("") : '<span class="muted">none configured</span>';
    });
    panel(d, "scans", renderScans);
    panel(d, "recent", function (recent) {
      $("recent").tBodies[0].innerHTML = recent.length ? recent.map(function (s) {
        return '<tr data-series="' + s.id + '"><td><a href="/series/' + s.id + '/">#' + s.id + "</a></td><td>" + esc(s.modality) +
          (s.description ? ' <span class="muted small">' + esc(s.description) + "</span>" : "") +
          '</td><td class="status">' + badge(s.status) + "</td><td>" + esc(s.stage) + "</td><td>" + progressBar(s) +
          '</td><td class="n">' + s.finished + "/" + s.total + '</td><td class="small">' + esc(s.study_date || "") +
          '</td><td class="small n">' + seconds(s.duration) + '</td><td class="small">' + clock(s.updated) + "</td></tr>";
      }).join("") : '<tr><td colspan="9" class="muted">No series yet.</td></tr>';
    });
    panel(d, "attention", function (a) {
      $("attention-count").textContent = a.count + " series";
      $("attention").tBodies[0].innerHTML = a.series.length ? a.series.map(function (s) {
        return '<tr data-series="' + s.id + '"><td><a href="/series/' + s.id + '/">#' + s.id + "</a></td><td>" + esc(s.modality) +
          '</td><td class="n">' + s.errors + '</td><td class="n">' + s.quarantined + '</td><td class="small">' + esc(s.reason) +
          "</td><td>" + forms(s.id, "/") + "</td></tr>";
      }).join("") : '<tr><td colspan="6" class="muted">Nothing needs attention.</td></tr>';
    });
    panel(d, "problems", function (problems) {
      $("problems").tBodies[0].innerHTML = problems.length ? problems.map(function (p) {
        return "<tr><td>" + badge(p.status) + '</td><td class="small">' + esc(p.reason) + '</td><td class="n">' + p.n + "</td></tr>";
      }).join("") : '<tr><td colspan="3" class="muted">None.</td></tr>';
    });
  }

  function dashboard(snapshot) {
    renderDashboard(snapshot);
    poll(async function () { renderDashboard(await get("/api/dashboard")); });
  }

  function renderSeries(s, images, events, eventsPage) {
    var status = $("series-status");
    status.className = "badge " + s.status;
    status.textContent = s.status;
    $("series-stage").textContent = s.stage;
    $("series-progress").textContent = s.finished + "/" + s.total + " finished, " + s.done + " DONE";
    $("series-counts").innerHTML = Object.keys(s.counts).map(function (k) { return badge(k) + " " + s.counts[k]; }).join(" ");
    $("series-attempts").textContent = s.attempts;
    $("series-error").textContent = s.last_error;
    $("series-next-attempt").textContent = s.next_attempt_at ? s.next_attempt_at.slice(0, 19).replace("T", " ") + " UTC" : "";
    if ($("series-retry-now")) $("series-retry-now").hidden = !(s.stage === "retrying" && s.next_attempt_at);
    $("series-actions").hidden = !(s.counts.ERROR || s.counts.QUARANTINED);
    function secs(v) { return v === null || v === undefined ? "" : v.toFixed(2); }
    $("stages").tBodies[0].innerHTML = s.stages.map(function (st) {
      return "<tr><td>" + esc(st.stage) + '</td><td class="n">' + (st.images === null ? "" : st.images) +
        '</td><td class="n">' + secs(st.mean) + '</td><td class="n">' + secs(st.max) + "</td></tr>";
    }).join("");
    $("images").tBodies[0].innerHTML = images.items.map(function (i) {
      var review = document.body.getAttribute("data-review") === "1" && (i.status === "QUARANTINED" || i.status === "ERROR");
      return '<tr data-image="' + i.id + '"><td>#' + i.id + "</td><td>" + badge(i.status) + '</td><td class="small">' +
        esc(i.reason) + (i.requarantined ? ' <b class="bad">quarantined again after release</b>' : "") +
        (review ? ' <a href="/images/' + i.id + '/review" data-testid="review-link">review</a>' : "") + '</td><td class="n">' + i.attempts + '</td><td class="small">' + clock(i.updated) + "</td></tr>";
    }).join("");
    $("images-count").textContent = images.count;
    if (eventsPage === 1) {
      $("events-count").textContent = events.count;
      $("events").tBodies[0].innerHTML = events.items.map(function (e) {
        return '<tr><td class="small">' + esc((e.created || "").slice(0, 19)) + "</td><td>" + (e.image_id ? "#" + e.image_id : "series") +
          "</td><td>" + esc(e.from_status) + "</td><td>" + esc(e.to_status) + '</td><td class="small">' + esc(e.reason) +
          "</td><td>" + esc(e.user || "") + "</td></tr>";
      }).join("");
    }
  }

  function series(id, imagesPage, eventsPage, imagesSize, eventsSize) {
    poll(async function () {
      var results = await Promise.all([
        get("/api/series/" + id),
        get("/api/images?series=" + id + "&page=" + imagesPage + "&size=" + imagesSize),
        eventsPage === 1 ? get("/api/series/" + id + "/events?page=1&size=" + eventsSize) : Promise.resolve(null),
      ]);
      renderSeries(results[0], results[1], results[2], eventsPage);
    });
  }

  return { dashboard: dashboard, series: series };
})();
