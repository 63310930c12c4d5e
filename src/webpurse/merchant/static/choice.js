// Top-up page: bank transfer or cash at the till, a visible choice remembered in this browser.
(function () {
  "use strict";
  const KEY = "wp_topup_method";
  const root = document.getElementById("topup-method");
  function show(value) {
    document.querySelectorAll("section.method").forEach(function (section) {
      section.hidden = section.dataset.method !== value;
    });
  }
  let initial = root.dataset.chosen;
  if (!initial) {
    try { initial = localStorage.getItem(KEY) || ""; } catch (e) { initial = ""; }
  }
  if (initial !== "cash") { initial = "bank_transfer"; }
  root.querySelectorAll("input").forEach(function (input) {
    input.checked = input.value === initial;
    input.addEventListener("change", function () {
      if (!input.checked) { return; }
      try { localStorage.setItem(KEY, input.value); } catch (e) { /* private mode */ }
      show(input.value);
    });
  });
  show(initial);
})();
