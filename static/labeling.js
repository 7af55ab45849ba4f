// The task page: rank by drag and drop or keyboard, ties, pairwise keys, time on task.
// No inline scripts (the CSP forbids them): everything hooks in from here.
(function () {
  "use strict";

  var timer = { started: 0, hiddenAt: null, hidden: 0 };
  // A task swapped in after a submit ignores submits for this long: the second click of a
  // double click (or a held Ctrl+Enter) must not answer a task the labeler has not seen.
  var SETTLE_MS = 400;
  var arrivedAt = 0;

  function one(selector, root) { return (root || document).querySelector(selector); }
  function all(selector, root) {
    return Array.prototype.slice.call((root || document).querySelectorAll(selector));
  }
  function cardsOf(list) { return all(":scope > li.completion-card", list); }
  function answerForm() { return one("#answer-form"); }
  function rankingList() { return one("#ranking"); }

  function announce(text) {
    var region = one("#rank-status");
    if (!region) {
      region = document.createElement("div");
      region.id = "rank-status";
      region.className = "visually-hidden";
      region.setAttribute("role", "status");
      region.setAttribute("aria-live", "polite");
      document.body.appendChild(region);
    }
    region.textContent = text;
  }

  // --- the ranking ----------------------------------------------------------------------

  // Tiers of completion ids, best first: a card "tied" with the one above joins its tier.
  function tiersOf(list) {
    var tiers = [];
    cardsOf(list).forEach(function (card, index) {
      var id = parseInt(card.dataset.id, 10);
      if (index > 0 && card.dataset.tied === "true") tiers[tiers.length - 1].push(id);
      else tiers.push([id]);
    });
    return tiers;
  }

  function refresh(list) {
    var place = 0;
    var count = cardsOf(list).length;
    cardsOf(list).forEach(function (card, index) {
      if (index === 0) card.dataset.tied = "false";
      var tied = card.dataset.tied === "true";
      if (!tied) place = index + 1; // 1, 2, 2, 4: tied cards share a place
      one(".rank-badge", card).textContent = String(place);
      var badge = one(".tie-badge", card);
      if (badge) badge.hidden = !tied;
      var toggle = one(".tie-toggle", card);
      if (toggle) {
        toggle.setAttribute("aria-pressed", tied ? "true" : "false");
        toggle.disabled = index === 0;
      }
      var up = one(".move-up", card);
      if (up) up.disabled = index === 0;
      var down = one(".move-down", card);
      if (down) down.disabled = index === count - 1;
      card.classList.toggle("tied", tied);
      card.setAttribute("aria-label", "Completion " + card.dataset.label + ", place " + place +
        (tied ? ", tied with the one above" : ""));
    });
    var input = one("#ranking-input");
    if (input) input.value = JSON.stringify(tiersOf(list));
  }

  // The order is shown shuffled: an order nobody changed says nothing about the completions,
  // so submitting it asks first (see the submit listener).
  function touched(list) {
    list.dataset.touched = "true";
    hideConfirm(false);
  }

  function confirmBox() { return one("#confirm-order"); }

  function hideConfirm(refocus) {
    var box = confirmBox();
    if (!box || box.hidden) return;
    box.hidden = true;
    var first = refocus ? one("#ranking li.completion-card") : null;
    if (first) first.focus({ preventScroll: true });
  }

  function moveTo(list, card, target) {
    var cards = cardsOf(list);
    target = Math.max(0, Math.min(cards.length - 1, target));
    var current = cards.indexOf(card);
    if (current < 0 || target === current) return;
    card.dataset.tied = "false"; // a card that moves takes a place of its own
    if (target > current) cards[target].after(card);
    else cards[target].before(card);
    touched(list);
    refresh(list);
    card.focus();
    announce(card.dataset.label + " moved to place " + (target + 1));
  }

  function toggleTie(list, card) {
    var form = answerForm();
    if (!form || form.dataset.allowTies !== "true") return;
    if (cardsOf(list).indexOf(card) === 0) return;
    card.dataset.tied = card.dataset.tied === "true" ? "false" : "true";
    touched(list);
    refresh(list);
    announce(card.dataset.label + (card.dataset.tied === "true" ? " tied with the one above" : " untied"));
  }

  // The edit page starts from the stored ranking.
  function restore(list) {
    var input = one("#ranking-input");
    if (!input || !input.value) return;
    var tiers;
    try { tiers = JSON.parse(input.value); } catch (error) { return; }
    var byId = {};
    cardsOf(list).forEach(function (card) { byId[card.dataset.id] = card; });
    tiers.forEach(function (tier) {
      tier.forEach(function (id, position) {
        var card = byId[String(id)];
        if (!card) return;
        card.dataset.tied = position > 0 ? "true" : "false";
        list.appendChild(card);
      });
    });
  }

  // SortableJS animates cards through element.style and clears it afterwards, which leaves
  // an empty style="" behind. The CSP refuses inline style attributes, so any later copy of
  // that attribute (htmx settling a swap, a snapshot re-parsed) logs a violation: drop it.
  var ANIMATION_MS = 120;
  function dropEmptyStyles(list) {
    all("[style]", list).forEach(function (element) {
      if (!element.getAttribute("style").trim()) element.removeAttribute("style");
    });
  }

  function setUpRanking(list) {
    if (list.dataset.ready) return;
    list.dataset.ready = "true";
    restore(list);
    refresh(list);
    if (window.Sortable) {
      window.Sortable.create(list, {
        handle: ".card-head",
        filter: "button",
        preventOnFilter: false,
        animation: ANIMATION_MS,
        onEnd: function (event) {
          if (event.oldIndex !== event.newIndex) {
            event.item.dataset.tied = "false";
            touched(list);
            announce(event.item.dataset.label + " moved to place " + (event.newIndex + 1));
          }
          refresh(list);
          setTimeout(function () { dropEmptyStyles(list); }, ANIMATION_MS + 50);
        },
      });
    }
    list.addEventListener("click", function (event) {
      var card = event.target.closest("li.completion-card");
      if (!card) return;
      var index = cardsOf(list).indexOf(card);
      if (event.target.closest(".move-up")) moveTo(list, card, index - 1);
      else if (event.target.closest(".move-down")) moveTo(list, card, index + 1);
      else if (event.target.closest(".tie-toggle")) toggleTie(list, card);
    });
  }

  // --- the page ---------------------------------------------------------------------------

  function startTimer() {
    timer.started = Date.now();
    timer.hidden = 0;
    timer.hiddenAt = document.hidden ? Date.now() : null;
  }

  function elapsed() {
    var hidden = timer.hidden + (timer.hiddenAt ? Date.now() - timer.hiddenAt : 0);
    return Math.max(0, Date.now() - timer.started - hidden);
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) timer.hiddenAt = Date.now();
    else if (timer.hiddenAt) { timer.hidden += Date.now() - timer.hiddenAt; timer.hiddenAt = null; }
  });

  function setUp(root) {
    var form = one("#answer-form", root) || (root.id === "answer-form" ? root : null);
    if (!form) form = answerForm();
    if (!form || form.dataset.ready) return;
    form.dataset.ready = "true";
    startTimer();
    // htmx calls this with <body> for the page itself, and with the new #task after a swap.
    arrivedAt = root === document.body || root === document ? 0 : Date.now();
    var list = one("#ranking", form);
    if (list) setUpRanking(list);
    var first = list ? cardsOf(list)[0] : null;
    if (first && !one(".flash-error")) first.focus({ preventScroll: true });
  }

  var helpReturn = null; // what had the focus when the help opened

  function toggleHelp(show) {
    var help = one("#help");
    if (!help) return;
    var open = show === undefined ? help.hidden : show;
    if (open === !help.hidden) return;
    help.hidden = !open;
    if (open) {
      helpReturn = document.activeElement;
      one(".close-help", help).focus();
      return;
    }
    var back = helpReturn && document.body.contains(helpReturn) && helpReturn !== document.body
      ? helpReturn : one("#ranking li.completion-card");
    helpReturn = null;
    if (back) back.focus({ preventScroll: true });
  }

  function showSkip(show) {
    var skip = one("#skip-form");
    if (!skip) return;
    skip.hidden = !show;
    if (show) one("select", skip).focus();
  }

  document.addEventListener("click", function (event) {
    if (event.target.closest(".open-help")) toggleHelp();
    else if (event.target.closest(".close-help")) toggleHelp(false);
    else if (event.target.closest(".open-skip")) showSkip(true);
    else if (event.target.closest(".cancel-skip")) showSkip(false);
    else if (event.target.closest(".keep-ranking")) hideConfirm(true);
    else if (event.target.closest(".confirm-as-shown")) {
      var form = answerForm();
      if (!form) return;
      form.dataset.asShown = "true";
      hideConfirm(false);
      var submit = one("button[type=submit]", form);
      if (submit) submit.focus({ preventScroll: true }); // the focus must not vanish with the box
      form.requestSubmit();
    }
  });

  // Fill in the measured time (and the ranking) just before the form is sent. Capture phase:
  // this runs before htmx's own submit listener reads the form.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.id !== "answer-form") return;
    if (form.classList.contains("htmx-request") || Date.now() - arrivedAt < SETTLE_MS) {
      // Already on its way, or a click meant for the task that was just answered.
      event.preventDefault();
      event.stopPropagation(); // capture phase on document: htmx on the form never sees it
      return;
    }
    var list = one("#ranking", form);
    var box = one("#confirm-order", form);
    if (box && list && list.dataset.touched !== "true" && form.dataset.asShown !== "true") {
      event.preventDefault();
      event.stopPropagation();
      box.hidden = false;
      one(".confirm-as-shown", box).focus();
      return;
    }
    var time = one(".time-on-task", form);
    if (time) time.value = String(elapsed());
    if (list) { refresh(list); dropEmptyStyles(list); }
  }, true);

  function typing(target) {
    if (!target || !target.closest) return false;
    var field = target.closest("input, textarea, select, [contenteditable]");
    return !!field && !(field.type === "checkbox" || field.type === "radio");
  }

  document.addEventListener("keydown", function (event) {
    var form = answerForm();
    if (!form) return;
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      if (!event.repeat) form.requestSubmit(); // the submit listener drops a double submit
      return;
    }
    if (event.key === "Escape") { toggleHelp(false); showSkip(false); hideConfirm(true); return; }
    if (typing(event.target) || event.ctrlKey || event.metaKey) return;
    if (event.key === "?") { event.preventDefault(); toggleHelp(); return; }
    if (event.key === "g") {
      var guidelines = one("#guidelines");
      if (guidelines) { event.preventDefault(); guidelines.open = !guidelines.open; }
      return;
    }
    var digit = /^[1-9]$/.test(event.key) ? parseInt(event.key, 10) : 0;
    if (form.dataset.mode === "pairwise") {
      // 1..7 is the scale from -3 to 3 whatever is offered: 4 is "about the same", which a
      // campaign without ties leaves out, and then 4 chooses nothing.
      if (!digit) return;
      event.preventDefault();
      var option = one("input[name=strength][value='" + (digit - 4) + "']", form);
      if (option) {
        option.checked = true;
        option.focus();
        announce(option.parentNode.textContent.trim());
      }
      return;
    }
    var list = one("#ranking", form);
    if (!list) return;
    var cards = cardsOf(list);
    var card = event.target.closest ? event.target.closest("#ranking li.completion-card") : null;
    var index = card ? cards.indexOf(card) : -1;
    var key = event.key;
    if (!card) {
      if (digit || key === "j" || key === "k" || key === "ArrowDown" || key === "ArrowUp") {
        event.preventDefault();
        cards[0].focus();
      }
      return;
    }
    if (digit) { event.preventDefault(); moveTo(list, card, digit - 1); }
    else if (event.altKey && key === "ArrowUp") { event.preventDefault(); moveTo(list, card, index - 1); }
    else if (event.altKey && key === "ArrowDown") { event.preventDefault(); moveTo(list, card, index + 1); }
    else if (key === "ArrowDown" || key === "j") {
      event.preventDefault();
      if (cards[index + 1]) cards[index + 1].focus();
    } else if (key === "ArrowUp" || key === "k") {
      event.preventDefault();
      if (cards[index - 1]) cards[index - 1].focus();
    } else if (key === "t" || key === "=") { event.preventDefault(); toggleTie(list, card); }
  });

  if (window.htmx) window.htmx.onLoad(setUp);
  else document.addEventListener("DOMContentLoaded", function () { setUp(document); });
})();
