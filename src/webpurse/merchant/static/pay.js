// Payment page: pair the local agent, then follow the order's progress over SSE.
(function () {
  "use strict";
  const root = document.getElementById("pay");
  const texts = JSON.parse(document.getElementById("texts").textContent);
  const orderId = root.dataset.order;
  const message = document.getElementById("message");
  const detail = document.getElementById("detail");
  const steps = { connect: 0, present: 1, confirm: 2, done: 3 };
  const phaseStep = {
    waiting_reader: "connect", present_card: "present", reading: "present",
    authorising: "present", recovering: "present", confirm: "confirm",
    capturing: "confirm", succeeded: "done", declined: "present",
    interrupted: "present", failed: "present",
  };
  let finished = false;

  function fen(amount) {
    const sign = amount < 0 ? "-" : "";
    amount = Math.abs(amount);
    const yuan = Math.floor(amount / 100).toLocaleString("en-US");
    return sign + "¥" + yuan + "." + String(amount % 100).padStart(2, "0");
  }

  function mark(step) {
    const current = steps[step];
    document.querySelectorAll(".steps li").forEach(function (li) {
      const n = steps[li.dataset.step];
      li.classList.toggle("done", n < current || (step === "done" && n === current));
      li.classList.toggle("active", n === current && step !== "done");
    });
  }

  function show(event, replayed) {
    root.dataset.phase = event.phase;
    root.dataset.status = event.status;
    mark(phaseStep[event.phase] || "connect");
    message.textContent = texts[event.phase] || event.phase;
    message.className = "phase-" + event.phase;
    detail.textContent = "";
    if (event.phase !== "waiting_reader") {
      document.getElementById("pairing").hidden = true;
      document.getElementById("reader-choice").hidden = true;
    } else if (event.detail === "repair" && !replayed) {
      repair();
    }
    if (event.phase === "failed") {
      if (event.detail) { detail.textContent = texts.declines[event.detail] || event.detail; }
      document.getElementById("retry").hidden = false;  // reopening the page starts again
    }
    if (event.phase === "declined") {
      detail.textContent = texts.declines[event.detail] || (texts.declines.other + (event.detail ? " (" + event.detail + ")" : ""));
      document.getElementById("retry").hidden = false;
    }
    if (event.phase === "succeeded" && (event.status === "paid" || event.status === "loaded")) {
      if (event.balance_after !== null && event.balance_after !== undefined) {
        detail.textContent = texts.balance_after + ": " + fen(event.balance_after);
      }
      document.getElementById("done").hidden = false;
      finished = true;
    }
  }

  async function repair() {
    // The agent's session ended but the order goes on: get a new token and pair again.
    const response = await fetch("/orders/" + orderId + "/pairing", { method: "POST" });
    if (!response.ok) { return; }
    const fresh = await response.json();
    root.dataset.token = fresh.token;
    document.querySelector("[data-testid=short-code]").textContent =
      fresh.code.slice(0, 4) + " " + fresh.code.slice(4);
    document.querySelectorAll("#code-command .code-value").forEach(function (el) {
      el.textContent = fresh.code;
    });
    document.getElementById("pairing").hidden = false;
    if (root.dataset.reader_choice !== "other") { await pair(); }
  }

  async function pair() {
    const error = document.getElementById("agent-error");
    error.hidden = true;
    try {
      const response = await fetch(root.dataset.agent + "/pair", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: root.dataset.token, server: location.origin + root.dataset.reader }),
      });
      if (!response.ok) { throw new Error("agent answered " + response.status); }
    } catch (e) {
      error.hidden = false;
    }
  }

  function follow() {
    const source = new EventSource("/orders/" + orderId + "/events");
    let first = true;
    source.addEventListener("progress", function (e) {
      const event = JSON.parse(e.data);
      // The stream starts with the latest event again; this page has just paired anyway.
      show(event, first);
      first = false;
      if (finished) { source.close(); }
    });
  }

  // The payment method (patent claims 2 and 10): the card on this device's reader (the
  // page asks the local agent to pair) or on another device's reader (its agent is given
  // the short code). The choice is remembered in this browser.
  const CHOICE = "wp_reader_choice";
  function stored() {
    try { return localStorage.getItem(CHOICE); } catch (e) { return null; }
  }
  function choose(value, save) {
    if (save) { try { localStorage.setItem(CHOICE, value); } catch (e) { /* private mode */ } }
    root.dataset.reader_choice = value;
    document.querySelectorAll("#pairing [data-for]").forEach(function (el) {
      el.hidden = el.dataset.for !== value;
    });
    document.getElementById("connect").hidden = value !== "this";
    document.getElementById("agent-error").hidden = true;
    if (value === "this") { pair(); }
  }
  const initial = stored() === "other" ? "other" : "this";
  document.querySelectorAll("#reader-choice input").forEach(function (input) {
    input.checked = input.value === initial;
    input.addEventListener("change", function () { if (input.checked) { choose(input.value, true); } });
  });

  document.querySelectorAll("#code-command .origin").forEach(function (el) {
    el.textContent = location.origin;
  });
  document.getElementById("connect").addEventListener("click", pair);
  follow();
  choose(initial, false);
})();
