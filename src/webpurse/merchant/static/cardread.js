// Online top-up: read the card number off the card through the shopper's agent.
(function () {
  "use strict";
  const box = document.getElementById("read-card");
  if (!box) { return; }
  const texts = JSON.parse(document.getElementById("read-texts").textContent);
  const status = document.getElementById("read-card-status");
  const input = document.getElementById("card-number");

  async function poll(id) {
    for (let i = 0; i < 180; i++) {
      const response = await fetch("/topup/card-reads/" + id, { cache: "no-store" });
      if (!response.ok) { break; }
      const read = await response.json();
      if (read.status === "read") {
        input.value = read.card_number;
        status.textContent = texts.read;
        return;
      }
      if (read.status === "failed") { break; }
      await new Promise(function (done) { setTimeout(done, 700); });
    }
    status.textContent = texts.failed;
  }

  async function start() {
    status.textContent = texts.waiting;
    const response = await fetch("/topup/card-reads", { method: "POST" });
    if (!response.ok) { status.textContent = texts.failed; return; }
    const read = await response.json();
    try {
      const paired = await fetch(box.dataset.agent + "/pair", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: read.token, server: location.origin + box.dataset.reader }),
      });
      if (!paired.ok) { throw new Error("agent answered " + paired.status); }
    } catch (e) {
      status.textContent = texts.no_agent;
      return;
    }
    await poll(read.id);
  }

  document.getElementById("read-card-button").addEventListener("click", start);
})();
