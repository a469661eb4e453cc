// The page talks to the same OpenAI-style endpoint as any client: POST /v1/completions with
// stream: true, read as server-sent events ("data: {...}" lines, ending with "data: [DONE]").
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const promptBox = $("prompt");
const temperature = $("temperature");
const maxTokens = $("max-tokens");
const generateButton = $("generate");
const stopButton = $("stop");
const story = $("story");
const storyPrompt = $("story-prompt");
const completion = $("completion");
const status = $("status");
let controller = null;

function setStatus(text, isError = false) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function bindOutput(input, output) {
  const update = () => { $(output).textContent = input.value; };
  input.addEventListener("input", update);
  update();
}
bindOutput(temperature, "temperature-value");
bindOutput(maxTokens, "max-tokens-value");

// Learn the model name and the server's max_tokens cap.
fetch("/health").then((r) => r.json()).then((info) => {
  $("model-info").textContent = `Model: ${info.model}, context ${info.block_size} tokens.`;
  maxTokens.max = info.max_tokens_cap;
  if (Number(maxTokens.value) > info.max_tokens_cap) maxTokens.value = info.max_tokens_cap;
  $("max-tokens-value").textContent = maxTokens.value;
}).catch(() => {});

function setBusy(busy) {
  generateButton.disabled = busy;
  stopButton.disabled = !busy;
  story.classList.toggle("generating", busy);
}

async function generate() {
  controller = new AbortController();
  storyPrompt.textContent = promptBox.value;
  completion.textContent = "";
  setBusy(true);
  setStatus("Writing…");
  let pieces = 0;
  let finish = null;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        prompt: promptBox.value,
        max_tokens: Number(maxTokens.value),
        temperature: Number(temperature.value),
        stream: true,
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {  // one event per blank-line-terminated block
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (!chunk.choices || chunk.choices.length === 0) continue;
          completion.textContent += chunk.choices[0].text;
          pieces += 1;
          if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
        }
      }
    }
    const why = finish === "stop" ? "the story ended" : "reached the length limit";
    setStatus(`Done: ${why}.`);
    status.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("Stopped.");
      status.dataset.state = "stopped";
    } else {
      setStatus(`Error: ${err.message}`, true);
      status.dataset.state = "error";
    }
  } finally {
    setBusy(false);
    controller = null;
  }
  return pieces;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  status.dataset.state = "running";
  generate();
});
stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
