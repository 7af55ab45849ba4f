// Copy buttons: <button data-copy="ID"> copies the value (or text) of the element #ID.
// No inline handlers (the CSP forbids them): this file hooks in on its own.
(function () {
  "use strict";

  function say(button, text) {
    var status = document.getElementById(button.getAttribute("aria-describedby") || "");
    if (status) status.textContent = text;
  }

  function fallbackCopy(source) {
    // Without the async clipboard (a plain-http address other than localhost): select the
    // text and let the browser copy its selection.
    source.focus();
    if (source.select) source.select();
    return document.execCommand && document.execCommand("copy");
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-copy]") : null;
    if (!button) return;
    var source = document.getElementById(button.dataset.copy);
    if (!source) return;
    var text = "value" in source ? source.value : source.textContent;
    var done = function () { say(button, "Copied to the clipboard."); };
    var failed = function () {
      if (fallbackCopy(source)) done();
      else say(button, "Could not copy: select the token and copy it by hand.");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, failed);
    } else {
      failed();
    }
  });
})();
