// chatbus chat page. No build step, no framework: marked (Markdown) and DOMPurify (sanitiser) are vendored.
// Safety rule of this file: model output and retrieved text become HTML only through renderMarkdown(), which
// escapes raw HTML in marked and sanitises the result with DOMPurify; every other text from the server is
// set with textContent.
"use strict";

(() => {
  const REASONS = {
    not_factual: "Not factually correct",
    ignored_instructions: "Didn't follow instructions",
    refused_unnecessarily: "Refused when it shouldn't have",
    unsafe: "Unsafe or harmful",
    style: "Style or tone",
    other: "Other",
  };
  const LS_USER = "chatbus.user";
  const LS_KEY = "chatbus.apiKey";
  const SS_INFLIGHT = "chatbus.inflight"; // {id, conv, lastId, text, messages, siblingOf, stopRequested}
  const params = new URLSearchParams(location.search);
  const MAX_TOKENS = Math.max(0, parseInt(params.get("max_tokens") || "", 10) || 0) || null;
  const RESUME_TRIES = 6;

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // --- Markdown, safely ---------------------------------------------------------------------------------

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  const markdown = new marked.Marked({
    gfm: true,
    breaks: true,
    renderer: {
      // raw HTML in model output or retrieved text is shown as text, never rendered
      html({ text, block }) { return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text); },
      // no remote images from model output (a classic exfiltration channel): show a link instead
      image({ href, text }) { return `<a href="${escapeHtml(href || "")}">${escapeHtml("[image: " + (text || href || "") + "]")}</a>`; },
    },
  });
  const PURIFY = { FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe"], FORBID_ATTR: ["style"] };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  /** Markdown → sanitised HTML string. */
  function renderMarkdown(text) {
    return DOMPurify.sanitize(markdown.parse(String(text ?? ""), { async: false }), PURIFY);
  }

  /** Replace el's children with the rendered Markdown (a sanitised DOM fragment: no innerHTML). */
  function renderInto(el, text) {
    const frag = DOMPurify.sanitize(markdown.parse(String(text ?? ""), { async: false }), { ...PURIFY, RETURN_DOM_FRAGMENT: true });
    el.replaceChildren(frag);
  }

  // --- identity, API key, HTTP --------------------------------------------------------------------------

  function userId() {
    let u = localStorage.getItem(LS_USER);
    if (!u) {
      const b = crypto.getRandomValues(new Uint8Array(12));
      u = "anon-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
      localStorage.setItem(LS_USER, u);
    }
    return u;
  }
  const USER = userId();

  function authHeaders(extra = {}) {
    const h = { ...extra };
    const key = localStorage.getItem(LS_KEY);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  class ApiError extends Error {
    constructor(status, error, retryAfter) {
      super((error && error.message) || `HTTP ${status}`);
      this.status = status;
      this.type = error && error.type;
      this.code = error && error.code;
      this.retryAfter = retryAfter || null;
    }
    describe() {
      let s = this.message;
      if (this.status === 429) s = `Too many requests: ${s}` + (this.retryAfter ? ` — retry after ${this.retryAfter} s` : "");
      else if (this.status) s = `Error ${this.status}: ${s}`;
      if (this.code && this.status !== 429) s += ` (${this.code})`;
      return s;
    }
  }

  async function errorFrom(r) {
    let body = null;
    try { body = await r.json(); } catch { /* not JSON */ }
    const err = (body && body.error) || { message: `${r.status} ${r.statusText}`.trim() };
    if (r.status === 401) askForKey();
    return new ApiError(r.status, err, r.headers.get("Retry-After"));
  }

  async function request(method, path, body, extraHeaders = {}) {
    let r;
    try {
      r = await fetch(path, {
        method,
        headers: authHeaders(body !== undefined ? { "Content-Type": "application/json", ...extraHeaders } : extraHeaders),
        body: body !== undefined ? JSON.stringify(body) : undefined,
        cache: "no-store",
      });
    } catch (e) {
      throw new ApiError(0, { message: `network error (${e.message})`, type: "network_error" });
    }
    if (!r.ok) throw await errorFrom(r);
    return r;
  }
  const getJSON = async (path) => (await request("GET", path)).json();
  const postJSON = async (path, body) => (await request("POST", path, body)).json();

  /** POST /v1/feedback. A response finished a moment ago may not be recorded yet (the recorder consumes the
   * bus): a 404 is retried for a few seconds before it is shown. */
  async function postFeedback(body) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await postJSON("/v1/feedback", body);
      } catch (e) {
        if (e.status !== 404 || attempt >= 6) throw e;
        await sleep(250 * 2 ** Math.min(attempt, 3));
      }
    }
  }

  function askForKey() {
    $("key-form").hidden = false;
    $("api-key").focus();
    showBanner("This server needs an API key: enter it above (it stays in this browser's localStorage).");
  }

  function showBanner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.hidden = !text;
  }

  // --- SSE over fetch ------------------------------------------------------------------------------------

  /** Parse a text/event-stream body: yields {id, data} per event; comments (": ping") are skipped. */
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let data = [];
    let id = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          let line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (data.length) yield { id, data: data.join("\n") };
            data = [];
            id = null;
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "data") data.push(val);
          else if (field === "id") id = val;
        }
      }
      if (data.length) yield { id, data: data.join("\n") };
    } finally {
      reader.releaseLock();
    }
  }

  // --- state ---------------------------------------------------------------------------------------------

  const state = {
    model: null,
    conv: null, // {id, title, exchanges: [exchange], known: bool}
    live: null, // the turn streaming now (at most one per page)
    conversations: [],
    votes: new Map(), // response id → {rating, reason, comment} (kept locally: the server is eventually consistent)
    prefs: [], // [{chosen_id, rejected_ids}] voted on this page
  };
  let localSeq = 0;

  function newConvId() {
    const b = crypto.getRandomValues(new Uint8Array(9));
    return "conv-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function lastUser(messages) {
    for (let i = (messages || []).length - 1; i >= 0; i--) if (messages[i].role === "user") return String(messages[i].content ?? "");
    return "";
  }

  function newExchange(key, user) {
    return { key, user, turns: [], sel: 0, preferred: null, el: null };
  }

  function newTurn(messages) {
    return { id: null, messages, text: "", finish: null, citations: [], status: "streaming", error: null, feedback: null, lastId: null, stopRequested: false, exchange: null, view: null };
  }

  function statusOf(finish) {
    return { content_filter: "refused", cancelled: "stopped", error: "error" }[finish] || (finish ? "done" : "pending");
  }

  function turnFromServer(t) {
    const turn = newTurn(t.messages || []);
    turn.id = t.id;
    if (t.answer) {
      turn.text = t.answer.text || "";
      turn.finish = t.answer.finish_reason || null;
      turn.citations = t.answer.citations || [];
      turn.status = statusOf(turn.finish);
      if (turn.status === "error") turn.error = new ApiError(0, { message: "generation failed" });
    } else {
      turn.status = "pending";
    }
    turn.feedback = state.votes.get(t.id) || t.feedback || null;
    return turn;
  }

  /** Exchanges (one per prompt; regenerated siblings grouped) from a stored conversation, with the live turn
   * (streaming, or resuming after a reload) standing in for its stored copy — so it is one bubble, not two. */
  function exchangesFrom(doc, live, siblingOf) {
    const byKey = new Map();
    const out = [];
    for (const t of doc.turns || []) {
      const key = t.prompt_group || t.id;
      let ex = byKey.get(key);
      if (!ex) {
        ex = newExchange(key, lastUser(t.messages));
        byKey.set(key, ex);
        out.push(ex);
      }
      const turn = live && live.id === t.id ? live : turnFromServer(t);
      turn.exchange = ex;
      ex.turns.push(turn);
    }
    if (live && !out.some((ex) => ex.turns.includes(live))) {
      let ex = siblingOf && out.find((e) => e.turns.some((t) => t.id === siblingOf));
      if (!ex) {
        ex = newExchange("local-" + ++localSeq, lastUser(live.messages));
        out.push(ex);
      }
      live.exchange = ex;
      ex.turns.push(live);
    }
    for (const ex of out) {
      ex.sel = live && ex.turns.includes(live) ? ex.turns.indexOf(live) : ex.turns.length - 1;
      const p = (doc.preferences || {})[ex.key];
      if (p) ex.preferred = p.chosen_id;
      for (const mine of state.prefs) if (ex.turns.some((t) => t.id === mine.chosen_id)) ex.preferred = mine.chosen_id;
    }
    return out;
  }

  // --- rendering -----------------------------------------------------------------------------------------

  const BADGES = { refused: "Refused", stopped: "Stopped", error: "Error", pending: "Generating…" };

  function renderConversation() {
    const box = $("messages");
    const conv = state.conv;
    $("conv-title").textContent = (conv && conv.title) || "New conversation";
    document.title = `${(conv && conv.title) || "New conversation"} — chatbus`;
    box.replaceChildren();
    if (!conv || !conv.exchanges.length) {
      box.append(welcome);
    } else {
      for (const ex of conv.exchanges) box.append(renderExchange(ex));
    }
    highlightCurrent();
    scrollToBottom(true);
  }
  const welcome = $("welcome");

  function renderExchange(ex) {
    const node = $("t-exchange").content.firstElementChild.cloneNode(true);
    node.dataset.key = ex.key;
    node.querySelector(".user-bubble").textContent = ex.user;
    if (ex.el) ex.el.replaceWith(node);
    ex.el = node;
    fillAnswer(ex);
    return node;
  }

  function fillAnswer(ex) {
    const node = ex.el;
    const turn = ex.turns[ex.sel];
    const a = node.querySelector(".answer");
    const q = (sel) => a.querySelector(sel);
    for (const t of ex.turns) t.view = null;
    turn.view = { answer: a, content: q(".content") };
    a.dataset.cid = turn.id || "";
    a.dataset.status = turn.status;
    a.dataset.finish = turn.finish || "";
    const look = { refused: "refused", stopped: "stopped", error: "failed", streaming: "streaming", pending: "streaming" }[turn.status];
    a.className = "bubble answer" + (look ? " " + look : "");

    const badge = q(".badge");
    let label = BADGES[turn.status] || "";
    if (turn.status === "done" && turn.finish === "length") label = "Cut off (max tokens)";
    if (turn.status === "streaming" && turn.stopRequested) label = "Stopping…";
    badge.textContent = label;
    badge.hidden = !label;

    const sib = q(".siblings");
    sib.hidden = ex.turns.length < 2;
    q(".sib-pos").textContent = `${ex.sel + 1}/${ex.turns.length}`;
    q(".prev").disabled = ex.sel === 0;
    q(".next").disabled = ex.sel === ex.turns.length - 1;
    q(".prev").onclick = () => { ex.sel = Math.max(0, ex.sel - 1); fillAnswer(ex); };
    q(".next").onclick = () => { ex.sel = Math.min(ex.turns.length - 1, ex.sel + 1); fillAnswer(ex); };

    paintContent(turn);
    paintError(turn);
    paintCitations(turn);

    const finished = !["streaming", "pending"].includes(turn.status) && !!turn.id;
    const busy = !!state.live;
    q(".actions").hidden = turn.status === "streaming" || turn.status === "pending";
    for (const btn of a.querySelectorAll(".thumb")) {
      const r = btn.classList.contains("up") ? "up" : "down";
      btn.setAttribute("aria-pressed", String(!!(turn.feedback && turn.feedback.rating === r)));
      btn.disabled = !finished;
      btn.onclick = () => vote(turn, r);
    }
    const regen = q(".regen");
    regen.disabled = busy || !turn.messages.length;
    regen.onclick = () => regenerate(ex, turn);
    const siblingsDone = ex.turns.filter((t) => t.id && !["streaming", "pending"].includes(t.status));
    const isPreferred = ex.preferred && ex.preferred === turn.id;
    q(".better").hidden = !(finished && siblingsDone.length >= 2) || isPreferred;
    q(".better").onclick = () => prefer(ex, turn);
    q(".preferred").hidden = !isPreferred;
    q(".fb-status").textContent = turn.feedbackStatus || "";
    setupFeedbackForm(a, turn);
  }

  const paintTimers = new WeakMap();
  function paintContent(turn, soon = false) {
    if (!turn.view) return;
    if (soon) {
      // many tokens per frame: repaint at most every 40 ms while streaming
      if (paintTimers.get(turn)) return;
      paintTimers.set(turn, setTimeout(() => { paintTimers.delete(turn); paintContent(turn); }, 40));
      return;
    }
    const stick = nearBottom();
    renderInto(turn.view.content, turn.text);
    turn.view.answer.dataset.chars = String(turn.text.length);
    if (stick) scrollToBottom();
  }

  function paintError(turn) {
    if (!turn.view) return;
    const box = turn.view.answer.querySelector(".error-box");
    box.textContent = turn.error ? (turn.error.describe ? turn.error.describe() : String(turn.error.message || turn.error)) : "";
    box.hidden = !turn.error;
  }

  function safeHref(url) {
    if (typeof url !== "string" || !url) return null;
    try {
      const u = new URL(url);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function paintCitations(turn) {
    if (!turn.view) return;
    const ol = turn.view.answer.querySelector(".citations");
    ol.replaceChildren();
    const cites = Array.isArray(turn.citations) ? turn.citations : [];
    for (const [i, c] of cites.entries()) {
      const li = document.createElement("li");
      const n = Number.isInteger(c.index) ? c.index : i + 1;
      li.value = n;
      li.id = `cite-${turn.id}-${n}`;
      const src = document.createElement("span");
      src.className = "cite-source";
      const label = String(c.title || c.source || "");
      const href = safeHref(c.url);
      if (href) {
        // a title people can follow (docs.python.org/3.11/<page>#<anchor>); only http(s) links, text via textContent
        const a = document.createElement("a");
        a.className = "cite-link";
        a.href = href;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        a.textContent = label;
        src.append(a);
      } else {
        src.textContent = label;
      }
      const meta = document.createElement("span");
      meta.className = "cite-meta";
      const bits = [];
      if (!c.title && c.position !== undefined && c.position !== null) bits.push(`§${c.position}`);
      if (typeof c.score === "number") bits.push(`score ${c.score.toFixed(3)}`);
      meta.textContent = bits.join(" · ");
      li.append(src, meta);
      if (c.snippet) {
        const snip = document.createElement("div");
        snip.className = "cite-snippet";
        snip.textContent = String(c.snippet);
        li.append(snip);
      }
      ol.append(li);
    }
    ol.hidden = !cites.length;
  }

  function setupFeedbackForm(a, turn) {
    const form = a.querySelector(".fb-form");
    const reasons = form.querySelector(".reasons");
    reasons.replaceChildren();
    const name = "reason-" + (turn.id || "x");
    const current = (turn.feedback && turn.feedback.reason) || "";
    for (const [value, label] of Object.entries(REASONS)) {
      const l = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio";
      input.name = name;
      input.value = value;
      input.checked = value === current;
      // a second click on the chosen reason clears it (reasons are optional)
      input.onclick = () => {
        if (input.dataset.was === "1") { input.checked = false; input.dataset.was = ""; } else {
          for (const o of reasons.querySelectorAll("input")) o.dataset.was = "";
          input.dataset.was = "1";
        }
      };
      if (input.checked) input.dataset.was = "1";
      l.append(input, document.createTextNode(label));
      reasons.append(l);
    }
    form.querySelector(".fb-comment").value = (turn.feedback && turn.feedback.comment) || "";
    form.hidden = !turn.formOpen;
    form.onsubmit = (e) => {
      e.preventDefault();
      const chosen = reasons.querySelector("input:checked");
      const comment = form.querySelector(".fb-comment").value.trim();
      sendRating(turn, (turn.feedback && turn.feedback.rating) || null, chosen ? chosen.value : null, comment, true);
    };
    form.querySelector(".fb-cancel").onclick = () => { turn.formOpen = false; form.hidden = true; };
  }

  function nearBottom() {
    const box = $("messages");
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }
  function scrollToBottom() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function refreshExchange(turn) {
    const ex = turn.exchange; // repaint its exchange even when another sibling shows (navigation, buttons)
    if (ex && ex.el && ex.el.isConnected) fillAnswer(ex);
  }

  // --- conversations -------------------------------------------------------------------------------------

  async function loadConversations() {
    try {
      const d = await getJSON(`/v1/conversations?user=${encodeURIComponent(USER)}&limit=50`);
      state.conversations = Array.isArray(d.data) ? d.data : [];
    } catch (e) {
      showBanner(`Cannot load conversations — ${e.describe ? e.describe() : e.message}`);
      return;
    }
    const ul = $("conv-list");
    ul.replaceChildren();
    for (const c of state.conversations) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.id = c.id;
      const title = document.createElement("span");
      title.className = "conv-title";
      title.textContent = c.title || "Untitled";
      const meta = document.createElement("span");
      meta.className = "conv-meta";
      meta.textContent = `${c.turns ?? 0} turn${c.turns === 1 ? "" : "s"} · ${ago(c.updated_at || c.created_at)}`;
      b.append(title, meta);
      b.onclick = () => { closeSidebar(); openConversation(c.id); };
      li.append(b);
      ul.append(li);
    }
    $("conv-empty").hidden = state.conversations.length > 0;
    highlightCurrent();
  }

  function ago(t) {
    const ms = typeof t === "number" ? (t < 1e12 ? t * 1000 : t) : Date.parse(t);
    if (!Number.isFinite(ms)) return "";
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(ms).toLocaleDateString();
  }

  function highlightCurrent() {
    for (const b of $("conv-list").querySelectorAll("button")) {
      b.setAttribute("aria-current", String(!!state.conv && b.dataset.id === state.conv.id));
    }
  }

  function newConversation() {
    state.conv = { id: newConvId(), title: null, exchanges: [], known: false };
    history.replaceState(null, "", location.pathname + location.search + "#" + state.conv.id);
    renderConversation();
    $("prompt").focus();
  }

  let pendingPoll = null;
  async function openConversation(id, siblingOf) {
    clearTimeout(pendingPoll);
    let doc;
    try {
      doc = await getJSON(`/v1/conversations/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 404) doc = { id, title: null, turns: [], preferences: {} }; // not stored yet
      else {
        showBanner(`Cannot load the conversation — ${e.describe ? e.describe() : e.message}`);
        doc = { id, title: null, turns: [], preferences: {} };
      }
    }
    const live = state.live && state.live.conv === id ? state.live : null;
    state.conv = { id, title: doc.title || null, exchanges: exchangesFrom(doc, live, siblingOf), known: (doc.turns || []).length > 0 };
    history.replaceState(null, "", location.pathname + location.search + "#" + id);
    renderConversation();
    // a turn still generating that this page is not streaming: look again shortly
    const pending = state.conv.exchanges.some((ex) => ex.turns.some((t) => t.status === "pending"));
    if (pending) pendingPoll = setTimeout(() => { if (state.conv && state.conv.id === id && !state.live) openConversation(id); }, 2000);
  }

  // --- sending, streaming, resuming ----------------------------------------------------------------------

  function historyForNext(text) {
    const exs = state.conv.exchanges;
    const last = exs.length ? exs[exs.length - 1] : null;
    const prev = last ? last.turns[last.sel] : null;
    const messages = prev ? prev.messages.map((m) => ({ role: m.role, content: m.content })) : [];
    if (prev && prev.text) messages.push({ role: "assistant", content: prev.text });
    messages.push({ role: "user", content: text });
    return messages;
  }

  function send(text) {
    if (state.live || !text.trim()) return;
    const turn = newTurn(historyForNext(text));
    const ex = newExchange("local-" + ++localSeq, text);
    ex.turns.push(turn);
    turn.exchange = ex;
    state.conv.exchanges.push(ex);
    if (state.conv.exchanges.length === 1) $("messages").replaceChildren();
    $("messages").append(renderExchange(ex));
    scrollToBottom();
    startTurn(turn);
  }

  function regenerate(ex, base) {
    if (state.live) return;
    const turn = newTurn(base.messages.map((m) => ({ role: m.role, content: m.content })));
    turn.siblingOf = base.id;
    turn.exchange = ex;
    ex.turns.push(turn);
    ex.sel = ex.turns.length - 1;
    fillAnswer(ex);
    startTurn(turn);
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("stop").disabled = false;
    for (const b of document.querySelectorAll(".regen")) b.disabled = busy;
  }

  function persist(turn) {
    if (!turn.id) return;
    const rec = { id: turn.id, conv: turn.conv, lastId: turn.lastId, text: turn.text, messages: turn.messages, siblingOf: turn.siblingOf || null, stopRequested: turn.stopRequested };
    try { sessionStorage.setItem(SS_INFLIGHT, JSON.stringify(rec)); } catch { /* storage full: resume is best effort */ }
  }

  async function startTurn(turn) {
    turn.conv = state.conv.id;
    state.live = turn;
    setBusy(true);
    const body = {
      model: state.model || "default",
      messages: turn.messages,
      stream: true,
      conversation_id: turn.conv,
      user: USER,
      stream_options: { include_usage: true },
    };
    if (MAX_TOKENS) body.max_tokens = MAX_TOKENS;
    let r;
    try {
      r = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
      });
    } catch (e) {
      return finishTurn(turn, new ApiError(0, { message: `network error (${e.message})`, type: "network_error" }));
    }
    if (!r.ok) return finishTurn(turn, await errorFrom(r));
    turn.id = r.headers.get("X-Correlation-Id");
    // resumable even if the connection drops before the first event arrives
    turn.lastId = r.headers.get("X-Resume-Event-Id") || turn.lastId;
    refreshExchange(turn);
    await streamTurn(turn, r);
  }

  /** Read a turn's stream to the end, resuming with Last-Event-ID after a dropped connection. */
  async function streamTurn(turn, response) {
    for (let attempt = 0; ; attempt++) {
      const outcome = response ? await readStream(turn, response) : "dropped";
      if (outcome === "done") return finishTurn(turn, null);
      if (!turn.id || !turn.lastId || attempt >= RESUME_TRIES) {
        return finishTurn(turn, new ApiError(0, { message: "the connection dropped and the stream could not be resumed" }));
      }
      await sleep(Math.min(4000, 300 * 2 ** attempt));
      response = null;
      try {
        const r = await fetch(`/v1/chat/completions/${encodeURIComponent(turn.id)}/events`, {
          headers: authHeaders({ "Last-Event-ID": turn.lastId, Accept: "text/event-stream" }),
          cache: "no-store",
        });
        if (r.ok) response = r;
        else if (r.status < 500 && r.status !== 429) return finishTurn(turn, await errorFrom(r));
      } catch { /* still offline: try again */ }
    }
  }

  /** "done" when the stream ended with [DONE] (or a finish/error chunk), "dropped" when the connection broke. */
  async function readStream(turn, response) {
    let ended = false;
    try {
      for await (const ev of sseEvents(response)) {
        if (ev.data === "[DONE]") return "done";
        let chunk;
        try { chunk = JSON.parse(ev.data); } catch { continue; }
        if (chunk.error) {
          // the edge is shutting down: resume from the id it named (turn.lastId is that id) on another edge
          if (chunk.error.code === "edge_draining") return "dropped";
          turn.error = new ApiError(chunk.error.code && Number(chunk.error.code) || 0, chunk.error);
          ended = true;
          continue;
        }
        if (!turn.id && chunk.id) turn.id = chunk.id;
        const choice = (chunk.choices || [])[0];
        if (choice) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            turn.text += piece;
            paintContent(turn, true);
          }
          if (choice.finish_reason) {
            turn.finish = choice.finish_reason;
            ended = true;
          }
        }
        if (chunk.chatbus_retraction) {
          // the output rail withdrew the answer shown so far: show the safety message instead
          turn.text = String(chunk.chatbus_retraction.message || "");
          turn.retracted = true;
          paintContent(turn, true);
        }
        if (Array.isArray(chunk.citations)) turn.citations = chunk.citations;
        if (ev.id) {
          turn.lastId = ev.id; // text and id persisted together: a resume appends exactly the rest
          persist(turn);
        }
      }
    } catch (e) {
      return ended ? "done" : "dropped";
    }
    return ended ? "done" : "dropped";
  }

  function finishTurn(turn, error) {
    if (error) turn.error = error;
    if (turn.error) turn.status = "error";
    else if (turn.finish === "content_filter") turn.status = "refused";
    else if (turn.stopRequested || turn.finish === "cancelled") turn.status = "stopped";
    else turn.status = "done";
    if (state.live === turn) state.live = null;
    sessionStorage.removeItem(SS_INFLIGHT);
    setBusy(false);
    clearTimeout(paintTimers.get(turn));
    paintTimers.delete(turn);
    refreshExchange(turn);
    if (turn.view) turn.view.answer.dataset.status = turn.status;
    if (turn.id) loadConversations().then(() => {
      const c = state.conversations.find((x) => x.id === turn.conv);
      if (c && state.conv && state.conv.id === c.id && c.title && !state.conv.title) {
        state.conv.title = c.title;
        $("conv-title").textContent = c.title;
      }
    });
  }

  async function stop() {
    const turn = state.live;
    if (!turn || !turn.id) return;
    turn.stopRequested = true;
    persist(turn);
    $("stop").disabled = true;
    refreshExchange(turn);
    try {
      await request("POST", `/v1/chat/completions/${encodeURIComponent(turn.id)}/cancel`);
    } catch (e) {
      if (state.live === turn) { // the turn may just have finished (404): only an error while it runs matters
        turn.stopRequested = false;
        $("stop").disabled = false;
        showBanner(`Could not stop the answer — ${e.describe ? e.describe() : e.message}`);
        refreshExchange(turn);
      }
    }
  }

  // --- feedback ------------------------------------------------------------------------------------------

  function vote(turn, r) {
    const current = turn.feedback && turn.feedback.rating;
    const rating = current === r ? null : r;
    turn.formOpen = rating !== null;
    const keep = turn.feedback || {};
    sendRating(turn, rating, rating === current ? keep.reason || null : null, rating === current ? keep.comment || "" : "", false);
  }

  async function sendRating(turn, rating, reason, comment, fromForm) {
    const body = { type: "rating", response_id: turn.id, rating, user: USER };
    if (rating && reason) body.reason = reason;
    if (rating && comment) body.comment = comment.slice(0, 2000);
    const before = turn.feedback;
    turn.feedback = { rating, reason: body.reason || null, comment: body.comment || null };
    turn.feedbackStatus = "Saving…";
    refreshExchange(turn);
    try {
      await postFeedback(body);
      state.votes.set(turn.id, turn.feedback);
      turn.feedbackStatus = rating === null ? "Rating withdrawn" : fromForm ? "Thanks — feedback saved" : "Thanks!";
      if (fromForm) turn.formOpen = false;
    } catch (e) {
      turn.feedback = before;
      turn.feedbackStatus = `Feedback not saved — ${e.describe ? e.describe() : e.message}`;
    }
    refreshExchange(turn);
  }

  async function prefer(ex, chosen) {
    const rejected = ex.turns.filter((t) => t !== chosen && t.id && !["streaming", "pending"].includes(t.status)).map((t) => t.id);
    if (!rejected.length) return;
    chosen.feedbackStatus = "Saving…";
    fillAnswer(ex);
    try {
      await postFeedback({ type: "preference", chosen_id: chosen.id, rejected_ids: rejected, user: USER });
      ex.preferred = chosen.id;
      state.prefs = state.prefs.filter((p) => !ex.turns.some((t) => t.id === p.chosen_id));
      state.prefs.push({ chosen_id: chosen.id, rejected_ids: rejected });
      chosen.feedbackStatus = "Preference saved";
    } catch (e) {
      chosen.feedbackStatus = `Preference not saved — ${e.describe ? e.describe() : e.message}`;
    }
    fillAnswer(ex);
  }

  // --- page wiring ---------------------------------------------------------------------------------------

  function closeSidebar() { $("sidebar").classList.remove("open"); }

  function wire() {
    const prompt = $("prompt");
    const autosize = () => { prompt.style.height = "auto"; prompt.style.height = Math.min(prompt.scrollHeight + 2, window.innerHeight * 0.4) + "px"; };
    prompt.addEventListener("input", autosize);
    prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
    });
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      if (state.live || !prompt.value.trim()) return;
      const text = prompt.value;
      prompt.value = "";
      autosize();
      send(text);
    });
    $("stop").addEventListener("click", stop);
    $("new-conv").addEventListener("click", () => { closeSidebar(); newConversation(); });
    $("toggle-sidebar").addEventListener("click", (e) => { e.stopPropagation(); $("sidebar").classList.toggle("open"); });
    // the drawer (narrow screens) closes on a tap outside it
    document.addEventListener("click", (e) => { if (!$("sidebar").contains(e.target)) closeSidebar(); });
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const v = $("api-key").value.trim();
      if (v) localStorage.setItem(LS_KEY, v); else localStorage.removeItem(LS_KEY);
      showBanner("");
      init();
    });
    if (localStorage.getItem(LS_KEY)) $("key-form").hidden = false;
  }

  async function loadModel() {
    try {
      const d = await getJSON("/v1/models");
      state.model = (d.data && d.data[0] && d.data[0].id) || null;
      $("model-name").textContent = state.model ? `model: ${state.model}` : "";
    } catch (e) {
      showBanner(`Cannot list models — ${e.describe ? e.describe() : e.message}`);
    }
  }

  let started = false;
  async function init() {
    await loadModel();
    await loadConversations();
    if (started) return;
    started = true;
    let inflight = null;
    try { inflight = JSON.parse(sessionStorage.getItem(SS_INFLIGHT) || "null"); } catch { inflight = null; }
    if (inflight && inflight.id && inflight.conv && !inflight.lastId) {
      sessionStorage.removeItem(SS_INFLIGHT); // reloaded before the first event: show the stored turn (polled)
      await openConversation(inflight.conv);
    } else if (inflight && inflight.id && inflight.conv) {
      // a reload mid-stream: the turn resumes where this tab left it, in the same bubble
      const turn = newTurn(inflight.messages || []);
      Object.assign(turn, { id: inflight.id, conv: inflight.conv, lastId: inflight.lastId, text: inflight.text || "", siblingOf: inflight.siblingOf, stopRequested: !!inflight.stopRequested });
      state.live = turn;
      setBusy(true);
      await openConversation(inflight.conv, inflight.siblingOf);
      streamTurn(turn, null);
    } else {
      const id = decodeURIComponent(location.hash.slice(1));
      if (/^[A-Za-z0-9_.:-]{1,128}$/.test(id)) await openConversation(id);
      else newConversation();
    }
    document.body.dataset.ready = "1";
  }

  window.chatbus = { renderMarkdown, state, sseEvents };
  wire();
  init();
})();
