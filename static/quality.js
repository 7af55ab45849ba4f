// The quality dashboard's charts, drawn with the vendored Chart.js. Every number is already
// on the page (stat cards, the daily table, the heatmap); this only draws them. No inline
// script (the CSP forbids it): the data comes from <script type="application/json">.
(function () {
  "use strict";

  var FIGURES = [
    // [key in report.agreement, label (two lines, so four fit side by side), as a percentage?]
    ["pairwise_agreement", ["Pairwise", "agreement"], true],
    ["krippendorff_alpha", ["Krippendorff's α", "(ordinal)"], false],
    ["fleiss_kappa", ["Fleiss' κ", "(on pairs)"], false],
    ["kendall_tau", ["Kendall's τ", "(mean)"], false],
  ];
  // InstructGPT (Ouyang et al. 2022): labelers agreed on 72.6 +/- 1.5 % of comparisons.
  var INSTRUCTGPT = { value: 0.726, plusMinus: 0.015 };

  function one(selector) { return document.querySelector(selector); }

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  // "#3355dd" + 0.25 -> "rgba(51, 85, 221, 0.25)"
  function tint(hex, alpha) {
    var match = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex);
    if (!match) return hex;
    return "rgba(" + parseInt(match[1], 16) + ", " + parseInt(match[2], 16) + ", " +
      parseInt(match[3], 16) + ", " + alpha + ")";
  }

  function isNumber(x) { return typeof x === "number" && isFinite(x); }
  function percent(x) { return isNumber(x) ? (x * 100).toFixed(1) + " %" : "–"; }
  function decimal(x) { return isNumber(x) ? x.toFixed(3) : "–"; }

  function palette() {
    return {
      text: cssVar("--text", "#1d2430"),
      muted: cssVar("--muted", "#5f6b7a"),
      border: cssVar("--border", "#dde2e8"),
      accent: cssVar("--accent", "#3355dd"),
      ok: cssVar("--ok", "#1f7a4d"),
      warn: cssVar("--warn", "#a86a00"),
    };
  }

  // A card is shown just before its chart is made, so Chart.js measures a visible box.
  function draw(name, config) {
    var card = one('[data-chart="' + name + '"]');
    var canvas = card && card.querySelector("canvas");
    if (!canvas) return null;
    card.hidden = false;
    return new window.Chart(canvas, config);
  }

  function baseOptions() {
    return {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12, boxHeight: 12 } } },
    };
  }

  // --- agreement: an estimate per figure, its 95 % interval as a floating bar ----------

  function agreementChart(agreement, colors) {
    var values = [], intervals = [], lowest = 0;
    FIGURES.forEach(function (figure) {
      var entry = agreement[figure[0]] || {};
      var value = isNumber(entry.value) ? entry.value : null;
      var range = entry.interval;
      var bar = range && isNumber(range[0]) && isNumber(range[1]) ? [range[0], range[1]] : null;
      values.push(value);
      intervals.push(bar);
      [value, bar && bar[0]].forEach(function (x) { if (isNumber(x)) lowest = Math.min(lowest, x); });
    });
    if (!values.some(isNumber)) return null;
    var reference = [INSTRUCTGPT.value - INSTRUCTGPT.plusMinus, INSTRUCTGPT.value + INSTRUCTGPT.plusMinus];
    var options = baseOptions();
    options.interaction = { mode: "nearest", intersect: true };
    options.scales = {
      x: { grid: { display: false }, ticks: { maxRotation: 0, autoSkip: false } },
      y: { min: Math.floor(lowest * 5) / 5, max: 1, grid: { color: colors.border },
           ticks: { stepSize: 0.2, callback: function (value) { return value.toFixed(1); } } },
    };
    options.plugins.tooltip = {
      callbacks: {
        title: function (items) { return items.length ? FIGURES[items[0].dataIndex][1].join(" ") : ""; },
        label: function (context) {
          var asPercent = FIGURES[context.dataIndex][2];
          var show = asPercent ? percent : decimal;
          var raw = context.raw;
          if (Array.isArray(raw)) return context.dataset.label + ": " + show(raw[0]) + " – " + show(raw[1]);
          return context.dataset.label + ": " + show(raw);
        },
      },
    };
    return draw("agreement", {
      type: "bar",
      data: {
        labels: FIGURES.map(function (figure) { return figure[1]; }),
        datasets: [
          {
            type: "line", label: "Estimate", data: values, showLine: false, order: 1,
            pointStyle: "rectRot", pointRadius: 7, pointHoverRadius: 8,
            backgroundColor: colors.text, borderColor: colors.text,
          },
          {
            label: "95 % interval", data: intervals, order: 2, grouped: false,
            barPercentage: 0.28, categoryPercentage: 1, borderSkipped: false, borderWidth: 1,
            minBarLength: 3, // an interval of one value still shows
            borderRadius: 3, backgroundColor: tint(colors.accent, 0.35), borderColor: colors.accent,
          },
          {
            label: "InstructGPT 72.6 ± 1.5 %", data: [reference, null, null, null], order: 3,
            grouped: false, barPercentage: 0.7, categoryPercentage: 1, borderSkipped: false,
            borderWidth: 1, backgroundColor: tint(colors.warn, 0.18), borderColor: colors.warn,
          },
        ],
      },
      options: options,
    });
  }

  // --- per day ----------------------------------------------------------------------------

  function throughputChart(trend, colors) {
    var options = baseOptions();
    options.scales = {
      x: { grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 12 } },
      y: { beginAtZero: true, title: { display: true, text: "judgments" }, grid: { color: colors.border },
           ticks: { precision: 0 } },
      labelers: { position: "right", beginAtZero: true, title: { display: true, text: "labelers" },
                  grid: { display: false }, ticks: { precision: 0 } },
    };
    return draw("throughput", {
      type: "bar",
      data: {
        labels: trend.map(function (day) { return day.day; }),
        datasets: [
          {
            type: "line", label: "Active labelers", yAxisID: "labelers", order: 1,
            data: trend.map(function (day) { return day.labelers; }),
            borderColor: colors.ok, backgroundColor: colors.ok, borderWidth: 2,
            pointRadius: trend.length > 60 ? 0 : 3,
          },
          {
            label: "Judgments", yAxisID: "y", order: 2,
            data: trend.map(function (day) { return day.judgments; }),
            backgroundColor: tint(colors.accent, 0.55), borderRadius: 2,
          },
        ],
      },
      options: options,
    });
  }

  function trendChart(trend, colors) {
    if (!trend.some(function (day) { return isNumber(day.agreement); })) return null;
    var options = baseOptions();
    options.scales = {
      x: { grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 12 } },
      y: { min: 0, max: 1, grid: { color: colors.border },
           ticks: { callback: function (value) { return Math.round(value * 100) + " %"; } } },
    };
    options.plugins.tooltip = {
      callbacks: {
        label: function (context) {
          if (context.datasetIndex === 1) return context.dataset.label;
          var day = trend[context.dataIndex];
          return "Agreement: " + percent(day.agreement) + " (" + day.pairs + " pairs)";
        },
      },
    };
    return draw("trend", {
      type: "line",
      data: {
        labels: trend.map(function (day) { return day.day; }),
        datasets: [
          {
            label: "Pairwise agreement",
            data: trend.map(function (day) { return isNumber(day.agreement) ? day.agreement : null; }),
            borderColor: colors.accent, backgroundColor: colors.accent, borderWidth: 2,
            pointRadius: trend.length > 60 ? 0 : 3, tension: 0.2, spanGaps: false,
          },
          {
            label: "InstructGPT 72.6 %", data: trend.map(function () { return INSTRUCTGPT.value; }),
            borderColor: colors.warn, borderDash: [6, 4], borderWidth: 1.5, pointRadius: 0,
            pointHitRadius: 0, fill: false,
          },
        ],
      },
      options: options,
    });
  }

  function start() {
    var source = one("#quality-data");
    var holder = one("#quality-charts");
    if (!source || !holder || !window.Chart) return; // no Chart.js: the tables stand alone
    var data = JSON.parse(source.textContent);
    var colors = palette();
    window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    window.Chart.defaults.color = colors.muted;
    var charts = [agreementChart(data.agreement || {}, colors)];
    var trend = data.trend || [];
    if (trend.length) {
      charts.push(throughputChart(trend, colors), trendChart(trend, colors));
      var table = one('[data-testid="daily-table"]');
      if (table) table.open = false; // the charts tell it now; the table is one click away
    }
    holder.dataset.ready = String(charts.filter(Boolean).length); // for tests: charts drawn
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
