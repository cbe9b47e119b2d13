// Bastion's chat page: a client of this server's own /v1/models and /v1/chat/completions.
// Served under a strict Content-Security-Policy (same-origin scripts, styles and fetches
// only; no inline code, no eval; Trusted Types with no policy, so no HTML-parsing sink
// accepts a string). Model output and error messages reach the page only as text nodes
// (append / textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    newChat: $("new-chat"), keyRow: $("key-row"), apiKey: $("api-key"), useKey: $("use-key"),
    messages: $("messages"), status: $("status"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"),
  };

  // The API key lives in this variable only: not in sessionStorage or localStorage, which
  // browsers write to disk (session restore), and not in a cookie, which would be sent
  // without the page asking. A reload forgets it.
  let apiKey = "";
  let conversation = []; // {role, content}: what the next request sends; "New chat" replaces it
  let inFlight = null; // the AbortController of the request being answered

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  }

  function showStatus(text, isError = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", isError);
  }

  // The message of an OpenAI-style error body {"error": {"message": ...}}, or the HTTP status.
  async function errorOf(response) {
    let message = `HTTP ${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") message = body.error.message;
    } catch (_) {
      // not JSON: the status line says enough
    }
    return new ApiError(message, response.status);
  }

  function askForKey(message) {
    ui.keyRow.hidden = false;
    showStatus(message, true);
    ui.apiKey.focus();
  }

  async function loadModels() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      showStatus(`cannot reach the server: ${err.message}`, true);
      return;
    }
    if (response.status === 401) {
      askForKey(apiKey ? (await errorOf(response)).message : "This server needs an API key.");
      return;
    }
    if (!response.ok) {
      showStatus(`listing models failed: ${(await errorOf(response)).message}`, true);
      return;
    }
    const ids = ((await response.json()).data || []).map((m) => m.id).filter((id) => typeof id === "string");
    fillModels(ids);
  }

  function fillModels(ids) {
    const previous = ui.model.value;
    ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(previous)) ui.model.value = previous;
    ui.send.disabled = ids.length === 0 || inFlight !== null;
    showStatus(ids.length ? `${ids.length} model${ids.length === 1 ? "" : "s"} available` : "the server lists no model",
      ids.length === 0);
  }

  // A number input's value: undefined when empty (the server's default applies), else
  // checked against [min, max]; an Error naming the field otherwise.
  function numberFrom(input, name, { min, max, minExclusive = false, integer = false }) {
    const raw = input.value.trim();
    if (raw === "" && !input.validity.badInput) return undefined;
    const value = Number(raw);
    const low = minExclusive ? value > min : value >= min;
    if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value)) || !low
        || (max !== undefined && value > max)) {
      const range = `${minExclusive ? "over" : "at least"} ${min}${max === undefined ? "" : ` and at most ${max}`}`;
      throw new Error(`${name} must be ${integer ? "a whole number" : "a number"} ${range}`);
    }
    return value;
  }

  function samplingFields() {
    const fields = {
      temperature: numberFrom(ui.temperature, "temperature", { min: 0, max: 2 }),
      top_p: numberFrom(ui.topP, "top_p", { min: 0, max: 1, minExclusive: true }),
      max_tokens: numberFrom(ui.maxTokens, "max tokens", { min: 1, integer: true }),
    };
    return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
  }

  function addBubble(role, content) {
    const bubble = document.createElement("div");
    bubble.className = `msg ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = content;
    bubble.append(label, text);
    ui.messages.append(bubble);
    scrollToEnd();
    return { bubble, text };
  }

  function addNote(bubble, note) {
    const element = document.createElement("span");
    element.className = "note";
    element.textContent = note;
    bubble.append(element);
  }

  function scrollToEnd() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // The `data:` payloads of a server-sent-event stream, in order, as they arrive; events
  // split across network chunks are reassembled. A partial event at the end is dropped (SSE).
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
        const events = buffer.split("\n\n");
        buffer = events.pop();
        for (const event of events) {
          const lines = event.split("\n").filter((line) => line.startsWith("data:"));
          if (lines.length) yield lines.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // Streams one reply into `text` (a text node at a time); resolves to the finish reason.
  async function streamReply(response, text, onText) {
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") return;
      let event;
      try {
        event = JSON.parse(data);
      } catch (_) {
        throw new ApiError("the server sent an event that is not JSON");
      }
      if (event.error) throw new ApiError(event.error.message || "the server reported an error in the stream");
      const choice = (event.choices || [])[0];
      if (!choice) continue; // the usage chunk
      const piece = choice.delta && choice.delta.content;
      if (typeof piece === "string" && piece) {
        text.append(piece); // a Text node: never parsed as HTML
        onText(piece);
        scrollToEnd();
      }
      if (choice.finish_reason === "length") onText("", "length");
    }
    throw new ApiError("the stream ended before the server finished (connection lost?)");
  }

  async function send(content) {
    let sampling;
    try {
      sampling = samplingFields();
    } catch (err) {
      showStatus(err.message, true);
      return false;
    }
    if (!ui.model.value) {
      showStatus("no model to talk to yet", true);
      return false;
    }
    const history = conversation; // this chat's, even if "New chat" is pressed meanwhile
    history.push({ role: "user", content });
    const asked = addBubble("user", content);
    const { bubble, text } = addBubble("assistant", "");
    bubble.dataset.state = "streaming";
    setBusy(new AbortController());
    showStatus("");
    let reply = "";
    let truncated = false;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify({ model: ui.model.value, messages: history, stream: true, ...sampling }),
        signal: inFlight.signal,
        cache: "no-store",
      });
      if (!response.ok) throw await errorOf(response);
      await streamReply(response, text, (piece, reason) => {
        reply += piece;
        truncated = truncated || reason === "length";
      });
      bubble.dataset.state = "done";
      if (truncated) addNote(bubble, "(cut at max tokens)");
    } catch (err) {
      const stopped = err.name === "AbortError";
      bubble.dataset.state = stopped ? "stopped" : "error";
      addNote(bubble, stopped ? "(stopped)" : `Error: ${err.message}`);
      if (err.status === 401) askForKey(err.message);
      else if (!stopped) showStatus(err.message, true);
    } finally {
      setBusy(null);
    }
    // What was shown is what the conversation holds: a partial reply stays; a turn without
    // reply text is taken back (the server refuses a blank assistant message, so keeping it
    // would make every later request fail).
    if (reply.trim()) {
      history.push({ role: "assistant", content: reply });
    } else {
      history.pop();
      addNote(asked.bubble, "(not kept in the conversation: no reply text)");
    }
    return true;
  }

  function setBusy(controller) {
    inFlight = controller;
    ui.send.disabled = controller !== null || !ui.model.value;
    ui.stop.disabled = controller === null;
  }

  ui.composer.addEventListener("submit", async (event) => {
    event.preventDefault(); // never a navigation (the CSP's form-action 'none' forbids it anyway)
    const content = ui.input.value;
    if (inFlight || !content.trim()) return;
    ui.input.value = "";
    if (!(await send(content))) ui.input.value = content;
  });

  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });

  ui.stop.addEventListener("click", () => inFlight && inFlight.abort());

  ui.newChat.addEventListener("click", () => {
    if (inFlight) inFlight.abort();
    conversation = [];
    ui.messages.replaceChildren();
    showStatus("");
  });

  function useKey() {
    apiKey = ui.apiKey.value.trim();
    loadModels();
  }
  ui.useKey.addEventListener("click", useKey);
  ui.apiKey.addEventListener("keydown", (event) => {
    if (event.key === "Enter") useKey();
  });

  loadModels();
})();
