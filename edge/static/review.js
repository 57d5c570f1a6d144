// The safety review page: lists /v1/review items and posts decisions to /v1/review/decisions.
// Every piece of turn text is set with textContent (never innerHTML): model output and prompts are untrusted.
(() => {
  "use strict";
  const LS_KEY = "chatbus.apiKey"; // the chat page's key, when the edge has keys
  const LS_REVIEWER = "chatbus.reviewer";
  const DECISIONS = [
    ["correct_block", "Correct block"],
    ["should_have_answered", "Should have answered"],
    ["harmful_answer", "Harmful answer"],
  ];
  const $ = (id) => document.getElementById(id);

  function headers(extra = {}) {
    const h = { ...extra };
    const key = localStorage.getItem(LS_KEY);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  async function load() {
    $("error").textContent = "";
    const r = await fetch(`/v1/review?status=${encodeURIComponent($("status").value)}`, { headers: headers(), cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      $("error").textContent = (body.error && body.error.message) || `HTTP ${r.status}`;
      return;
    }
    const box = $("items");
    box.replaceChildren();
    if (!body.data.length) box.append(el("p", "sub", "Nothing to review."));
    for (const item of body.data) box.append(render(item));
    document.body.dataset.ready = "1";
  }

  function render(item) {
    const card = el("div", "item");
    card.dataset.id = item.id;
    const h = el("h2");
    h.append(el("span", `kind ${item.kind}`, item.kind), document.createTextNode(item.category || ""));
    card.append(h);
    const margin = item.margin ? `, margin ${Number(item.margin).toFixed(2)}` : "";
    card.append(el("div", "meta", `${item.id} · score ${Number(item.score || 0).toFixed(2)}${margin} · policy ${item.policy_version || "?"} · ${item.reason || ""}`));
    const users = (item.prompt || []).filter((m) => m.role === "user");
    if (users.length) {
      card.append(el("div", "label", "Prompt"), el("div", "text prompt", users[users.length - 1].content));
    }
    if (item.withdrawn) card.append(el("div", "label", "Withdrawn answer (never shown)"), el("div", "text withdrawn", item.withdrawn));
    if (item.response) card.append(el("div", "label", "Shown to the user"), el("div", "text response", item.response));
    const actions = el("div", "actions");
    if (item.decision) actions.append(el("span", "decided", `Decided: ${item.decision.decision} by ${item.decision.reviewer}`));
    for (const [value, label] of DECISIONS) {
      const b = el("button", "decide", label);
      b.type = "button";
      b.dataset.decision = value;
      b.addEventListener("click", () => decide(item, value, card));
      actions.append(b);
    }
    card.append(actions);
    return card;
  }

  async function decide(item, decision, card) {
    const reviewer = $("reviewer").value.trim();
    if (!reviewer) {
      $("error").textContent = "Enter your name as reviewer first.";
      $("reviewer").focus();
      return;
    }
    localStorage.setItem(LS_REVIEWER, reviewer);
    const r = await fetch("/v1/review/decisions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ correlation_id: item.id, decision, reviewer }),
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      $("error").textContent = (body.error && body.error.message) || `HTTP ${r.status}`;
      return;
    }
    card.dataset.decided = decision;
    card.querySelector(".actions").prepend(el("span", "decided", `Recorded: ${decision}`));
  }

  $("reviewer").value = localStorage.getItem(LS_REVIEWER) || "";
  $("refresh").addEventListener("click", load);
  $("status").addEventListener("change", load);
  load().catch((e) => { $("error").textContent = String(e); });
})();
