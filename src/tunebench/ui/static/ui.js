// tunebench ui: the only script the pages run (the Content-Security-Policy allows no other).
// - [data-refresh]: re-fetch the element's content from its URL every few seconds (studies while runs write).
// - form[data-live]: on change, fetch the form's fragment URL with the form's values, swap it into the target,
//   and put the values in the address bar so a copied link reproduces the view.
(function () {
  "use strict";
  function swap(el, url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { el.innerHTML = html; });
  }
  document.querySelectorAll("[data-refresh]").forEach(function (el) {
    var every = parseInt(el.getAttribute("data-every") || "3000", 10);
    setInterval(function () { swap(el, el.getAttribute("data-refresh")).catch(function () {}); }, every);
  });
  document.querySelectorAll("form[data-live]").forEach(function (form) {
    var target = document.getElementById(form.getAttribute("data-target"));
    function update() {
      var query = new URLSearchParams(new FormData(form)).toString();
      history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
      swap(target, form.getAttribute("data-live") + "?" + query).catch(function () { form.submit(); });
    }
    form.addEventListener("change", update);
    form.addEventListener("submit", function (e) { e.preventDefault(); update(); });
  });
})();
