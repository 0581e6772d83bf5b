"use strict";
// llamalab's chat page. It talks to this server's /v1/chat/completions with stream: true,
// keeps conversations and settings in localStorage, and shows replies as markdown: marked
// turns the text into HTML and DOMPurify cleans that HTML every time before it is shown,
// because a model's reply is untrusted text.

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input");
const narrow = matchMedia("(max-width: 760px)");  // as in chat.css: the sidebar slides in
const STORE = "llamalab-chats";  // {current: id or null, chats: [{id, title, updated, messages}]}
const SETTINGS = { key: "llamalab-api-key", system: "llamalab-system",
                   temperature: "llamalab-temperature", "max-tokens": "llamalab-max-tokens" };

// ---------------------------------------------------------------- markdown, sanitised
const canRender = typeof marked !== "undefined" && typeof DOMPurify !== "undefined"
  && DOMPurify.isSupported;
const PURIFY = {
  // Styles and form controls could dress a reply up as part of the page (a fake key prompt).
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style"],
};
if (canRender) {
  marked.use({ gfm: true, breaks: true });
  // DOMPurify already drops javascript: URLs; the links left open in a new tab that
  // cannot reach back into this one.
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
}

function renderMarkdown(el, text) {
  if (!canRender) { el.textContent = text; return; }  // the libraries failed to load: plain text
  el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY);
  // Each code block gets a bar above it with its language and a copy button.
  for (const pre of el.querySelectorAll("pre")) {
    const code = pre.textContent;
    const head = document.createElement("div");
    head.className = "code-head";
    const language = /language-(\S+)/.exec(pre.firstElementChild?.className || "");
    head.textContent = language ? language[1] : "";
    const copy = button("Copy", "copy-code", async () => flash(copy, await copyText(code)));
    head.appendChild(copy);
    const wrap = document.createElement("div");
    wrap.className = "code";
    pre.replaceWith(wrap);
    wrap.append(head, pre);
  }
}

// ---------------------------------------------------------------- small helpers
function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function flash(b, ok) {
  const label = b.textContent;
  b.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => { b.textContent = label; }, 1200);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No async clipboard outside a secure context (plain http on a LAN address).
    const area = document.createElement("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

// Keep the newest text in view, unless the reader has scrolled up to read something.
function follow(update) {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  update();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

// ---------------------------------------------------------------- settings
for (const [id, name] of Object.entries(SETTINGS)) {
  const saved = localStorage.getItem(name);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("input", () => localStorage.setItem(name, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function requestBody(conversation) {
  const messages = conversation.messages.map(({ role, content }) => ({ role, content }));
  const system = $("system").value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// ---------------------------------------------------------------- conversations
function loadStore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && Array.isArray(saved.chats)) return saved;
  } catch { /* unreadable: start afresh */ }
  return { current: null, chats: [] };
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(store));
  } catch (err) {
    console.warn("could not save the conversations", err);  // full storage: the page still works
  }
}

function fresh() {
  return { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7),
           title: "New chat", updated: Date.now(), messages: [] };
}

const store = loadStore();
// A new chat joins the store with its first message, so empty ones do not pile up.
let chat = store.chats.find((c) => c.id === store.current) || fresh();
let active = null;  // {controller, conversation} while a reply streams

function renderList() {
  const nav = $("conversations");
  nav.replaceChildren();
  for (const c of [...store.chats].sort((a, b) => b.updated - a.updated)) {
    const row = document.createElement("div");
    row.className = "conv" + (c === chat ? " current" : "");
    const open = button(c.title, "open", () => show(c));
    open.title = c.title;
    const del = button("✕", "delete", () => remove(c));
    del.title = "Delete this conversation";
    del.setAttribute("aria-label", "Delete this conversation");
    row.append(open, del);
    nav.appendChild(row);
  }
}

function bubble(role, text) {
  log.querySelector(".empty")?.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") {
    const body = document.createElement("div");
    body.className = "body";
    div.appendChild(body);
  } else {
    div.textContent = text;  // the user's own text and error messages: shown as text, never HTML
  }
  log.appendChild(div);
  return div;
}

function addFooter(div, message, isLast) {
  const footer = document.createElement("div");
  footer.className = "footer";
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = message.meta || "";
  const actions = document.createElement("span");
  actions.className = "actions";
  const copy = button("Copy", "copy", async () => flash(copy, await copyText(message.content)));
  actions.appendChild(copy);
  if (isLast) actions.appendChild(button("Regenerate", "regenerate", regenerate));
  footer.append(meta, actions);
  div.appendChild(footer);
  div.classList.add("done");
}

function renderChat({ replying = false } = {}) {
  log.replaceChildren();
  $("title").textContent = chat.title;
  if (!chat.messages.length) {
    const hint = document.createElement("p");
    hint.className = "empty";
    hint.textContent = "Ask anything. Enter sends, Shift+Enter starts a new line.";
    log.appendChild(hint);
  }
  chat.messages.forEach((m, i) => {
    const div = bubble(m.role, m.content);
    if (m.role !== "assistant") return;
    renderMarkdown(div.firstChild, m.content);
    addFooter(div, m, i === chat.messages.length - 1);
  });
  // A reply that never came (the page was reloaded or left while it streamed) can be asked for.
  const last = chat.messages[chat.messages.length - 1];
  if (last && last.role === "user" && !replying) {
    const note = bubble("note", "No reply to this message yet. ");
    note.appendChild(button("Get a reply", "retry", () => { note.remove(); generate(chat); }));
  }
  log.scrollTop = log.scrollHeight;
}

function show(conversation) {
  if (conversation === chat) { document.body.classList.remove("sidebar-open"); return; }
  if (active) active.controller.abort();  // its partial reply is kept in its own conversation
  chat = conversation;
  store.current = chat.messages.length ? chat.id : null;
  save();
  renderChat();
  renderList();
  document.body.classList.remove("sidebar-open");
}

function remove(conversation) {
  if (active && active.conversation === conversation) active.controller.abort();
  store.chats = store.chats.filter((c) => c !== conversation);
  if (conversation === chat) show(fresh());
  else { save(); renderList(); }
}

function showError(message, needsKey = false) {
  follow(() => {
    const div = bubble("error", message);
    if (needsKey) div.appendChild(button("Enter the API key", "enter-key", openSettings));
  });
  // Where the settings are on screen, go straight to the key; on a phone the button opens them.
  if (needsKey && !narrow.matches) $("key").focus();
}

// ---------------------------------------------------------------- talking to the server
async function errorText(response) {
  if (response.status === 401) {
    return ($("key").value ? "The server refused this API key." : "This server needs an API key.")
      + " Enter it under Settings → API key, then send again.";
  }
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
  } catch { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// Read server-sent events from a fetch body: onData for each event's data, onBatch after
// each read (so the reply is rendered once per network read, not once per token).
async function readEvents(response, onData, onBatch) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) onData(line.slice(5).trimStart());
      }
    }
    onBatch();
  }
}

function describe(tokens, first, end, started, finish) {
  const parts = [tokens + (tokens === 1 ? " token" : " tokens")];
  // Decoding speed after the first token, which waits for the whole prompt to be read.
  if (tokens > 1 && end > first) parts.push(((tokens - 1) / ((end - first) / 1000)).toFixed(1) + " tok/s");
  if (first) parts.push(((first - started) / 1000).toFixed(2) + " s to first token");
  // A reply that ended by itself needs no note; one that was cut short does.
  if (finish !== "stop") parts.push({ length: "cut off at max tokens", stopped: "stopped" }[finish] || finish || "ended");
  return parts.join(" · ");
}

// Stream a reply to `conversation` (whose last message is the user's). On an error the
// conversation goes back to how it was: the user's text returns to the input box, or the
// reply that was being regenerated comes back.
async function generate(conversation, { userText = null, replaced = null } = {}) {
  if (active) return;
  const reply = bubble("assistant");
  reply.classList.add("streaming");
  reply.setAttribute("aria-busy", "true");  // screen readers wait for the whole reply
  const body = reply.firstChild;
  const controller = new AbortController();
  active = { controller, conversation };
  $("send").hidden = true;
  $("stop").hidden = false;
  const started = performance.now();
  let content = "", pieces = 0, first = 0, end = 0, finish = null, usage = null, failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(requestBody(conversation)),
    });
    if (!response.ok) throw Object.assign(new Error(await errorText(response)), { status: response.status });
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          content += piece;
          pieces += 1;
          if (!first) first = performance.now();
        }
        if (choice.finish_reason) {
          finish = choice.finish_reason;
          end = performance.now();
        }
      }
    }, () => follow(() => renderMarkdown(body, content)));
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else failure = err.name === "TypeError" ? new Error("Could not reach the server: " + err.message) : err;
  } finally {
    controller.abort();  // after an error mid-stream, this lets the server free the slot
    active = null;
    $("send").hidden = false;
    $("stop").hidden = true;
    reply.classList.remove("streaming");
    reply.removeAttribute("aria-busy");
  }
  const here = conversation === chat;
  if (failure || !content) {
    reply.remove();
    if (userText !== null && here) {  // elsewhere, the message stays and can get a reply later
      conversation.messages.pop();
      if (!conversation.messages.length) {
        store.chats = store.chats.filter((c) => c !== conversation);
        conversation.title = "New chat";
      }
      if (!input.value) input.value = userText;
    } else if (replaced) {
      conversation.messages.push(replaced);
    }
    save();
    if (here) {
      renderChat();
      renderList();
      if (failure) showError(failure.message, failure.status === 401);
      else if (finish !== "stopped") showError("The model gave an empty reply.");
    }
    return;
  }
  if (!end) end = performance.now();
  const tokens = usage ? usage.completion_tokens : pieces;
  const message = { role: "assistant", content, meta: describe(tokens, first, end, started, finish) };
  conversation.messages.push(message);
  conversation.updated = Date.now();
  save();
  if (here) {
    follow(() => {
      renderMarkdown(body, content);
      addFooter(reply, message, true);
    });
    renderList();
  }
}

function send() {
  const text = input.value.trim();
  if (!text || active) return;
  input.value = "";
  autosize();
  if (!chat.messages.length) chat.title = text.split("\n")[0].slice(0, 60);
  chat.messages.push({ role: "user", content: text });
  chat.updated = Date.now();
  if (!store.chats.includes(chat)) store.chats.push(chat);
  store.current = chat.id;
  save();
  renderList();
  $("title").textContent = chat.title;
  for (const old of log.querySelectorAll(".error, .note, .regenerate")) old.remove();
  follow(() => bubble("user", text));
  generate(chat, { userText: text });
}

function regenerate() {
  const last = chat.messages[chat.messages.length - 1];
  if (active || !last || last.role !== "assistant") return;
  chat.messages.pop();
  renderChat({ replying: true });
  generate(chat, { replaced: last });
}

// ---------------------------------------------------------------- page wiring
function autosize() {
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight + 2, 192) + "px";
}

function openSettings() {
  $("settings").open = true;
  document.body.classList.add("sidebar-open");  // only visible on narrow screens
  $("key").focus();
}

$("form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
input.addEventListener("input", autosize);
$("stop").addEventListener("click", () => { if (active) active.controller.abort(); });
$("new-chat").addEventListener("click", () => { show(fresh()); input.focus(); });
$("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
$("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
$("scrim").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (document.body.classList.contains("sidebar-open")) document.body.classList.remove("sidebar-open");
  else if (active) active.controller.abort();
});
// Another tab saved its conversations: take them, so that saving here does not undo its work.
window.addEventListener("storage", (event) => {
  if (event.key !== STORE || active) return;
  store.chats = loadStore().chats;
  chat = store.chats.find((c) => c.id === chat.id) || (chat.messages.length ? fresh() : chat);
  renderChat();
  renderList();
});

renderChat();
renderList();
fetch("/health").then((r) => r.json()).then((h) => {
  $("model").textContent = h.model;
  document.title = h.model + " · llamalab chat";
})
  .catch(() => { $("model").textContent = "server unreachable"; });
