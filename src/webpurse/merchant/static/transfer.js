// Bank-transfer top-up: wait until settlement has matched the money, then offer the load.
(function () {
  "use strict";
  const root = document.getElementById("transfer");
  if (root.dataset.waiting !== "yes") { return; }
  const texts = JSON.parse(document.getElementById("texts").textContent);
  const orderId = root.dataset.order;
  async function check() {
    try {
      const response = await fetch("/orders/" + orderId + "/status", { cache: "no-store" });
      if (response.ok) {
        const status = await response.json();
        if (status.status === "canceled") {
          document.getElementById("message").textContent = texts.unpaid;
          return;
        }
        if (status.settlement_status && status.settlement_status !== "requires_funding") {
          root.dataset.waiting = "no";
          document.getElementById("message").textContent = texts.arrived;
          document.getElementById("load").hidden = false;
          return;
        }
      }
    } catch (e) { /* offline for a moment: ask again */ }
    setTimeout(check, 2000);
  }
  setTimeout(check, 2000);
})();
