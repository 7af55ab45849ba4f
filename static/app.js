// prefloop's small amount of page glue. No inline scripts anywhere: the CSP forbids them.
(function () {
  "use strict";

  function toast(text, level) {
    var box = document.getElementById("toasts");
    if (!box) return;
    var item = document.createElement("div");
    item.className = "flash flash-" + (level || "error");
    item.textContent = text; // never innerHTML: messages may echo user input
    box.appendChild(item);
    setTimeout(function () { item.remove(); }, 8000);
  }
  window.prefloopToast = toast;

  // htmx does not swap 4xx/5xx answers, so a failed save would be silent: say so instead,
  // and leave the page (and whatever the user was doing) as it is.
  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    if (xhr.status === 401) return; // HX-Redirect to the login page is on its way
    var text = "The server refused the request (" + xhr.status + ").";
    var doc = new DOMParser().parseFromString(xhr.responseText || "", "text/html");
    var alert = doc.querySelector("[role=alert]");
    if (alert && alert.textContent.trim()) text = alert.textContent.trim();
    toast(text, "error");
  });
  document.addEventListener("htmx:sendError", function () {
    toast("Could not reach the server. Check your connection; nothing was lost on this page.", "error");
  });
})();
