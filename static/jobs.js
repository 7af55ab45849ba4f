// A job's live metric charts, drawn with the vendored Chart.js. The page's status panel
// polls itself with htmx; this polls GET /api/v1/jobs/{id}/metrics with a cursor, appends
// the new points, and stops once the job has finished. No inline script (CSP).
(function () {
  "use strict";

  var POLL_MS = 3000;
  var FINISHED = { succeeded: true, dead: true, cancelled: true };
  // Which chart each metric goes on: [chart id, title, names' prefix or exact names].
  var GROUPS = [
    ["loss", "Loss", ["train/loss", "eval/loss"]],
    ["accuracy", "Pair accuracy", ["train/accuracy", "eval/accuracy", "gold/accuracy"]],
    ["learning_rate", "Learning rate", ["train/learning_rate"]],
    ["calibration", "Calibration error (ECE)", ["eval/ece"]],
    ["throughput", "Pairs per second", ["train/pairs_per_second"]],
    ["grad_norm", "Gradient norm", ["train/grad_norm"]],
    // DPO: the implicit rewards beta * (log pi - log pi_ref), on the training and held-out pairs
    ["reward_accuracy", "Implicit reward accuracy", ["rewards/accuracy", "eval/rewards/accuracy"]],
    ["reward_margin", "Implicit reward margin", ["rewards/margin", "eval/rewards/margin"]],
    ["implicit_rewards", "Implicit rewards",
      ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"]],
    ["logps", "Log-probability of the answers", ["logps/chosen", "logps/rejected"]],
    // generation: a rate and running counts do not share an axis
    ["generate_rate", "Completions per second", ["generate/completions_per_second"]],
    ["generate_counts", "Generation so far",
      ["generate/tasks_created", "generate/duplicates_resampled", "generate/short_prompts"]],
  ];
  var COLORS = ["#3355dd", "#1f7a4d", "#a86a00", "#b3261e", "#6b4fbb", "#00838f"];

  // PPO and generation metrics are charted by their prefix (reward/, kl/, policy/, ...).
  var PREFIX_TITLES = {
    reward: "Reward", kl: "KL and beta", policy: "Policy", value: "Value", response: "Responses",
    time: "Seconds per step, by phase", tokens: "Tokens", generate: "Generation",
    train: "Training", eval: "Evaluation", gold: "Gold tasks",
  };

  function groupOf(name) {
    for (var i = 0; i < GROUPS.length; i++) {
      if (GROUPS[i][2].indexOf(name) >= 0) return GROUPS[i][0];
    }
    return "p:" + name.split("/")[0];
  }

  function titleOf(group) {
    for (var i = 0; i < GROUPS.length; i++) {
      if (GROUPS[i][0] === group) return GROUPS[i][1];
    }
    var prefix = group.slice(2);
    return PREFIX_TITLES[prefix] || prefix;
  }

  // A tick label short enough to read: 3e-6 rather than 3.0000000E-6, 0.25 rather than
  // 0.25000000000000006.
  function compact(value) {
    if (value === 0) return "0";
    var size = Math.abs(value);
    if (size < 1e-3 || size >= 1e6) return Number(value.toPrecision(3)).toExponential();
    return String(Number(value.toPrecision(4)));
  }

  function start(root) {
    var url = root.getAttribute("data-metrics-url");
    var charts = {};
    var after = 0;
    var timer = null;

    function chartFor(group, title) {
      if (charts[group]) return charts[group];
      var empty = root.querySelector("[data-empty]");
      if (empty) empty.remove();
      var card = document.createElement("div");
      card.className = "chart-card";
      card.setAttribute("data-chart", group);
      var heading = document.createElement("h3");
      heading.textContent = title;
      var box = document.createElement("div");
      box.className = "chart-box";
      var canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", title + " by step; the latest values are listed above.");
      box.appendChild(canvas);
      card.appendChild(heading);
      card.appendChild(box);
      root.appendChild(card);
      charts[group] = new window.Chart(canvas, {
        type: "line",
        data: { datasets: [] },
        options: {
          animation: false,
          responsive: true,
          maintainAspectRatio: false,
          parsing: false,
          scales: {
            // steps are whole numbers: no 1.1, 1.2, ... ticks between them
            x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
            y: { ticks: { callback: compact } },
          },
          plugins: { legend: { position: "bottom" } },
        },
      });
      return charts[group];
    }

    function add(name, points) {
      var group = groupOf(name);
      var chart = chartFor(group, titleOf(group));
      var dataset = chart.data.datasets.filter(function (d) { return d.label === name; })[0];
      if (!dataset) {
        var color = COLORS[chart.data.datasets.length % COLORS.length];
        dataset = { label: name, data: [], borderColor: color, backgroundColor: color, pointRadius: 2, tension: 0 };
        chart.data.datasets.push(dataset);
      }
      points.forEach(function (p) { dataset.data.push({ x: p[0], y: p[1] }); });
    }

    function poll() {
      fetch(url + "?after=" + after, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (body) {
          if (!body) return;
          Object.keys(body.series).forEach(function (name) { add(name, body.series[name]); });
          Object.keys(charts).forEach(function (key) { charts[key].update("none"); });
          after = body.next_after;
          root.setAttribute("data-after", String(after));
          if (!FINISHED[body.state]) timer = window.setTimeout(poll, POLL_MS);
        })
        .catch(function () { timer = window.setTimeout(poll, POLL_MS * 2); });
    }
    poll();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("job-charts");
    if (root && window.Chart) start(root);
  });
})();
