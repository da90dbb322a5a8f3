// vlmkit's chat page: a client of this server's /v1/chat/completions (streaming), like any other client.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  history: [],      // the OpenAI messages of the conversation so far
  attachments: [],  // {name, type, url} read from files the user attached, dropped or pasted
  reading: Promise.resolve(),
  controller: null, // the running answer's AbortController
};

class APIError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function init() {
  const config = await (await fetch("ui/config.json")).json();
  state.model = config.model;
  $("model").textContent = config.model;
  $("notice").textContent = config.notice || "";
  $("notice").hidden = !config.notice;
  $("key-row").hidden = !config.api_key_required;
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", startOver);
  $("files").addEventListener("change", (event) => { attach(event.target.files); event.target.value = ""; });
  document.addEventListener("paste", (event) => {
    if (event.clipboardData.files.length) { event.preventDefault(); attach(event.clipboardData.files); }
  });
  document.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dropping"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dropping");
    attach(event.dataTransfer.files);
  });
  document.body.dataset.ready = "true";
}

function attach(files) {
  const reads = [...files].map((file) => new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, type: file.type, url: reader.result });
    reader.onerror = () => resolve(null);
    reader.readAsDataURL(file);  // sent as it is: the server decides what is an image
  }));
  state.reading = Promise.all([state.reading, ...reads]).then(([, ...read]) => {
    state.attachments.push(...read.filter(Boolean));
    showAttachments();
  });
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren(...state.attachments.map((item, i) => {
    const figure = thumbnail(item);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.title = `Remove ${item.name}`;
    remove.textContent = "×";
    remove.addEventListener("click", () => { state.attachments.splice(i, 1); showAttachments(); });
    figure.append(remove);
    return figure;
  }));
}

function thumbnail(item) {
  const figure = document.createElement("figure");
  if (item.type.startsWith("image/")) {
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.name;
    figure.append(img);
  } else {
    figure.textContent = item.name;  // not displayable: the server will say what is wrong with it
  }
  return figure;
}

function addMessage(role, text, images = []) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    row.append(...images.map(thumbnail));
    div.append(row);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;  // never HTML: model output and user text are shown as text
  div.append(body);
  $("transcript").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function note(message, text) {
  const span = document.createElement("div");
  span.className = "note";
  span.textContent = text;
  message.append(span);
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);  // empty: the server's default
}

function headers() {
  const result = { "Content-Type": "application/json" };  // the server refuses any other POST (CSRF)
  const key = $("key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `Error ${response.status}: ${body.error.message}`;
  } catch {
    return `Error ${response.status}: ${response.statusText}`;
  }
}

// The data of each server-sent event: JSON chunks until "[DONE]".
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function send() {
  await state.reading;
  if (state.controller) return;  // one answer at a time
  const text = $("prompt").value.trim();
  if (!text) { $("prompt").focus(); return; }
  const images = state.attachments;
  const user = {
    role: "user",
    content: [...images.map((item) => ({ type: "image_url", image_url: { url: item.url } })), { type: "text", text }],
  };
  const shown = addMessage("user", text, images);
  state.attachments = [];
  showAttachments();
  $("prompt").value = "";
  const answer = addMessage("assistant", "");
  const output = answer.querySelector(".text");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let reply = "";
  try {
    const request = {
      model: state.model, messages: [...state.history, user], stream: true,
      temperature: number("temperature"), top_p: number("top-p"), max_tokens: number("max-tokens"),
    };
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) throw new APIError(await errorMessage(response), response.status);
    let finish = null;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new APIError(`Error: ${chunk.error.message}`);
      const choice = chunk.choices[0];
      if (!choice) continue;
      reply += choice.delta.content || "";
      output.textContent = reply;
      finish = choice.finish_reason || finish;
      answer.scrollIntoView({ block: "end" });
    }
    if (finish === "length") note(answer, "stopped at the max tokens limit");
    state.history.push(user, { role: "assistant", content: reply });
  } catch (error) {
    if (state.controller !== controller) return;  // started over meanwhile: this conversation is gone
    if (error.name === "AbortError") {
      note(answer, "stopped");
      if (reply) state.history.push(user, { role: "assistant", content: reply });
    } else {
      // the message is not part of the conversation: put it back in the composer to fix and resend
      shown.classList.add("failed");
      answer.className = "message error";
      answer.setAttribute("role", "alert");
      output.textContent = error instanceof APIError ? error.message : `Could not reach the server: ${error.message}`;
      if (!$("prompt").value) $("prompt").value = text;
      state.attachments = [...images, ...state.attachments];
      showAttachments();
      if (error.status === 401) $("key").focus();
    }
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
}

function startOver() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.history = [];
  state.attachments = [];
  showAttachments();
  $("transcript").replaceChildren();
  $("prompt").value = "";
  setBusy(false);
  $("prompt").focus();
}

init();
