// Keeps the page current without a reload: every element with data-refresh="URL" is replaced by
// a fresh server-rendered fragment of the same origin (escaped by the server) every few seconds.
"use strict";
(function () {
  const every = Number(document.body.dataset.refreshMs) || 5000;
  const live = document.getElementById("live");
  const targets = Array.from(document.querySelectorAll("[data-refresh]"));
  document.documentElement.dataset.script = "loaded";
  if (!targets.length) {
    return;
  }
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    try {
      for (const el of targets) {
        const r = await fetch(el.dataset.refresh, { credentials: "same-origin", cache: "no-store" });
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        el.innerHTML = await r.text();
      }
      live.textContent = "live";
      live.className = "live ok";
      live.title = "last refreshed " + new Date().toLocaleTimeString();
    } catch (e) {
      live.textContent = "not refreshing";
      live.className = "live stale";
      live.title = "the agent did not answer: " + e.message;
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
  live.textContent = "live";
  live.className = "live ok";
})();
