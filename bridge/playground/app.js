// The playground page: a form in front of POST /v1/audio/speech and the voice routes.
//
// Speech is asked for as server-sent events (`stream_format: "sse"`), so audio plays while it is
// generated (player.js) and a failure after the first audio still arrives as a sentence. With
// word highlighting on, it asks for `"timestamps": true` and reads the reply by its content type:
// JSON with words when the bridge has them, plain audio when it does not.

import { ApiError, call, chunks, events, fromBase64, health, onUnauthorized, token } from "./api.js";
import { MAX_RECORDING_SECONDS, Recorder, createVoice, deleteVoice, recordingName } from "./clone.js";
import { FORMATS, createPlayer } from "./player.js";
import { Highlighter, wordsOf } from "./words.js";

const $ = (id) => document.getElementById(id);
const MODEL = "vibevoice-7b";
const MAX_SPEAKERS = 4;
const SAMPLE_TEXT = "Hello! This is VibeVoice, speaking from your own endpoint.";
const SAMPLE_SCRIPT = "Speaker 1: Welcome back to the show.\nSpeaker 2: Thanks! It is good to be here.";
const HINTS = {
  plain:
    "Plain text is read by one voice; long texts are split at sentences and joined. " +
    "[pause] or [pause:750ms] adds a silence.",
  script:
    "One turn per line, each starting with its speaker: “Speaker 1: Hello!”. " +
    `Up to ${MAX_SPEAKERS} speakers; pick a voice for each below. [pause:1s] adds a silence.`,
};

const state = { voices: [], job: null, clip: null, recorder: null, downloadUrl: null };
const highlighter = new Highlighter($("transcript"), $("player"));

// --- start-up and the token -------------------------------------------------------------------

async function connect() {
  let info;
  try {
    info = await health();
  } catch (error) {
    $("connection").textContent = error.message;
    return;
  }
  const runpod = info.runpod || {};
  $("connection").textContent =
    runpod.endpoint_configured && runpod.api_key_configured
      ? "Connected to the bridge."
      : "Connected, but the bridge has no RunPod endpoint or key configured: speech will fail until it has.";
  $("token-change").hidden = !info.auth_required;
  if (info.auth_required && !token.get()) askForToken("");
  else await loadVoices();
}

function askForToken(message) {
  $("token-error").textContent = message;
  $("token-input").value = "";
  if (!$("token-dialog").open) $("token-dialog").showModal();
  $("token-input").focus();
}

async function useToken(event) {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) {
    $("token-error").textContent = "Enter the token.";
    return;
  }
  token.set(value);
  if (await loadVoices()) $("token-dialog").close();
  else if (!$("token-error").textContent) $("token-error").textContent = $("error").textContent;
}

onUnauthorized((message) => {
  token.clear();
  askForToken(message);
});

// --- voices -------------------------------------------------------------------------------------

async function loadVoices() {
  try {
    const body = await (await call("/v1/audio/voices")).json();
    state.voices = body.voices ?? body.data ?? [];
  } catch (error) {
    if (error.status !== 401) showError(error.message);
    return false;
  }
  renderPickers({ voicesChanged: true });
  renderCreated();
  return true;
}

const isCreated = (voice) => /^voice_/.test(voice.id);

// Script labels in the text ("Speaker 1:", ...): the speakers that need a voice.
function speakerLabels() {
  if (!$("script-mode").checked) return [null];
  const numbers = [...$("text").value.matchAll(/^\s*speaker\s*(\d+)\s*:/gim)].map((match) => Number(match[1]));
  const base = numbers.includes(0) ? 0 : 1;
  const count = Math.min(MAX_SPEAKERS, Math.max(2, ...numbers.map((n) => n - base + 1)));
  return Array.from({ length: count }, (_, index) => `Speaker ${base + index}`);
}

// One picker per speaker; rebuilt when the speakers change, refilled when the voices do.
function renderPickers({ voicesChanged = false } = {}) {
  const container = $("voice-pickers");
  const chosen = [...container.querySelectorAll("select")].map((select) => select.value);
  const labels = speakerLabels();
  if (container.dataset.labels === labels.join("|")) {
    if (voicesChanged) refreshOptions(chosen);
    return;
  }
  container.dataset.labels = labels.join("|");
  container.replaceChildren(
    ...labels.map((label, index) => {
      const field = document.createElement("div");
      const text = document.createElement("label");
      const select = document.createElement("select");
      select.id = `voice-${index}`;
      text.htmlFor = select.id;
      text.textContent = label ? `${label} voice` : "Voice";
      field.append(text, select);
      return field;
    }),
  );
  refreshOptions(chosen);
}

// Fills every picker with the voices, keeping what was chosen; speakers get different voices.
function refreshOptions(chosen) {
  const groups = [
    ["Voices", state.voices.filter((voice) => !isCreated(voice))],
    ["Your voices", state.voices.filter(isCreated)],
  ].filter(([, voices]) => voices.length);
  for (const [index, select] of $("voice-pickers").querySelectorAll("select").entries()) {
    select.replaceChildren(
      ...groups.map(([name, voices]) => {
        const group = document.createElement("optgroup");
        group.label = name;
        group.append(...voices.map((voice) => new Option(voice.name || voice.id, voice.id)));
        return group;
      }),
    );
    const known = state.voices.map((voice) => voice.id);
    select.value = known.includes(chosen[index]) ? chosen[index] : (known[index % known.length] ?? "");
  }
}

function renderCreated() {
  const created = state.voices.filter(isCreated);
  $("created-none").hidden = created.length > 0;
  $("created-voices").replaceChildren(
    ...created.map((voice) => {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = voice.name;
      const use = button("Use", `Use ${voice.name}`, () => selectVoice(voice.id));
      const remove = button("Delete", `Delete ${voice.name}`, () => removeVoice(voice));
      item.append(name, use, remove);
      return item;
    }),
  );
}

function button(text, label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "secondary small";
  element.textContent = text;
  element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

function selectVoice(id) {
  $("voice-0").value = id;
  $("voice-0").focus();
}

// --- the text -----------------------------------------------------------------------------------

function updateText() {
  const limit = Number($("text").dataset.limit) || 4096;
  const length = [...$("text").value].length;
  const over = length - limit;
  $("text-count").textContent =
    over > 0 ? `${length} / ${limit} characters: ${over} over the limit.` : `${length} / ${limit} characters.`;
  $("text-count").classList.toggle("over", over > 0);
  renderPickers();
}

function toggleScript() {
  const script = $("script-mode").checked;
  const text = $("text").value.trim();
  if (script && (!text || text === SAMPLE_TEXT)) $("text").value = SAMPLE_SCRIPT;
  if (!script && text === SAMPLE_SCRIPT) $("text").value = SAMPLE_TEXT;
  $("text-hint").textContent = HINTS[script ? "script" : "plain"];
  updateText();
}

// --- speech ---------------------------------------------------------------------------------------

const voiceRef = (id) => (/^voice_/.test(id) ? { id } : id);

function speechRequest() {
  const format = $("format").value;
  const request = { model: MODEL, input: $("text").value, response_format: format };
  const voices = [...$("voice-pickers").querySelectorAll("select")].map((select) => select.value);
  if (voices.some((id) => !id)) throw new ApiError("Choose a voice first: the voice list is empty.");
  if ($("script-mode").checked) request.speakers = voices.map(voiceRef);
  else request.voice = voiceRef(voices[0]);
  const speed = Number($("speed").value);
  if (speed !== 1) request.speed = speed;
  const extras = {
    seed: "seed",
    cfg_scale: "cfg-scale",
    diffusion_steps: "diffusion-steps",
    max_new_tokens: "max-frames",
  };
  for (const [field, id] of Object.entries(extras)) {
    if ($(id).value.trim() !== "") request[field] = Number($(id).value);
  }
  if ($("highlight").checked) request.timestamps = true;
  else request.stream_format = "sse";
  return request;
}

async function speak(event) {
  event.preventDefault();
  if (state.job) return;
  clearError();
  let request;
  try {
    request = speechRequest();
  } catch (error) {
    $("result").dataset.state = "failed";
    return showError(error.message);
  }
  const job = startJob(request);
  try {
    const response = await call("/v1/audio/speech", { method: "POST", json: request, signal: job.abort.signal });
    $("job-id").textContent = response.headers.get("x-runpod-job-id") || "–";
    setStatus("Generating…");
    await receive(response, job);
    job.endedAt = performance.now();
    $("result").dataset.streamEndMs = String(Math.round(job.endedAt - job.startedAt));
    const file = await job.player.finish();
    offerDownload(file, request);
    showWords(job);
    setStatus(doneSentence(job));
    job.outcome = "done";
  } catch (error) {
    job.player.stop();
    job.outcome = error.name === "AbortError" ? "stopped" : "failed";
    setStatus(job.outcome === "stopped" ? "Stopped: the job was cancelled." : "Failed.");
    if (job.outcome === "failed") showError(error.message);
  } finally {
    endJob(job);
  }
}

function startJob(request) {
  const startedAt = performance.now();
  const job = { request, startedAt, abort: new AbortController(), bytes: 0, stalls: 0, words: [], firstSoundAt: null };
  const hooks = {
    firstSound: () => {
      if (job.firstSoundAt !== null) return;
      job.firstSoundAt = performance.now();
      const ms = Math.round(job.firstSoundAt - startedAt);
      $("first-sound").textContent = `${(ms / 1000).toFixed(2)} s`;
      $("result").dataset.firstSoundMs = String(ms);
    },
    stalled: () => job.stalls++,
  };
  // Word highlighting follows the audio element, so with it on the audio plays once complete.
  job.player = createPlayer(request.response_format, $("player"), hooks, { live: !request.timestamps });
  state.job = job;
  $("result").dataset.state = "running";
  for (const id of ["first-sound", "audio-seconds", "elapsed", "job-id"]) $(id).textContent = "–";
  delete $("result").dataset.firstSoundMs;
  delete $("result").dataset.streamEndMs;
  highlighter.clear();
  $("download").hidden = true;
  $("speak").disabled = true;
  $("stop").disabled = false;
  $("progress").hidden = false;
  setStatus("Queued: waiting for a worker and the first audio…");
  job.ticker = setInterval(() => tick(job), 100);
  return job;
}

function tick(job) {
  const now = job.endedAt ?? performance.now();
  $("elapsed").textContent = `${((now - job.startedAt) / 1000).toFixed(1)} s`;
  const seconds = job.player.receivedSeconds;
  if (seconds !== null) $("audio-seconds").textContent = `${seconds.toFixed(1)} s`;
  else if (job.bytes) $("audio-seconds").textContent = `${Math.round(job.bytes / 1000)} KB`;
}

function endJob(job) {
  clearInterval(job.ticker);
  tick(job);
  state.job = null;
  // The outcome, for scripts and tests that drive the page: running, done, failed or stopped.
  $("result").dataset.state = job.outcome;
  $("speak").disabled = false;
  $("stop").disabled = true;
  $("progress").hidden = true;
}

// The reply, by its content type: events (sse), JSON (timestamps) or the audio itself.
async function receive(response, job) {
  const push = (bytes) => {
    job.bytes += bytes.byteLength;
    job.player.push(bytes);
  };
  const type = response.headers.get("content-type") || "";
  if (type.startsWith("text/event-stream")) {
    let done = false;
    for await (const event of events(response)) {
      if (event.type === "speech.audio.delta") push(fromBase64(event.audio));
      else if (event.type === "speech.audio.done") done = true;
      else if (event.type === "error") throw new ApiError(event.error?.message || "The audio stream failed.");
      job.words.push(...(wordsOf(event) ?? []));
    }
    if (!done) throw new ApiError("The audio stream ended before the job finished; the audio is incomplete.");
  } else if (type.startsWith("application/json")) {
    const body = await response.json();
    const audio = body.audio ?? body.audio_base64;
    if (typeof audio !== "string") throw new ApiError("The bridge's reply has no audio in it.");
    push(fromBase64(audio));
    job.words = wordsOf(body) ?? [];
  } else {
    for await (const bytes of chunks(response)) push(bytes);
  }
}

function doneSentence(job) {
  const seconds = job.player.receivedSeconds;
  const took = ((job.endedAt - job.startedAt) / 1000).toFixed(1);
  const what = seconds ? `${seconds.toFixed(1)} s of audio` : `${Math.round(job.bytes / 1000)} KB of audio`;
  const stalls = job.stalls ? ` Playback waited for audio ${job.stalls} time(s).` : "";
  return `Done: ${what} in ${took} s.${stalls}`;
}

function showWords(job) {
  if (job.words.length) highlighter.show(job.words);
  else if (job.request.timestamps) {
    $("highlight-hint").textContent = "This endpoint sent no word timings, so there is nothing to highlight.";
  }
}

function offerDownload(file, request) {
  const voice = request.speakers ? "script" : typeof request.voice === "string" ? request.voice : request.voice.id;
  const stamp = new Date().toISOString().slice(0, 19).replace(/[T:]/g, "-");
  const name = `vibevoice-${voice.toLowerCase().replace(/[^a-z0-9]+/g, "-")}-${stamp}.${FORMATS[request.response_format].extension}`;
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = URL.createObjectURL(file);
  const link = $("download");
  link.href = state.downloadUrl;
  link.download = name;
  link.textContent = `Download ${name.split(".").pop().toUpperCase()} (${Math.max(1, Math.round(file.size / 1000))} KB)`;
  link.hidden = false;
}

// --- cloning --------------------------------------------------------------------------------------

function useClip(blob, fileName) {
  state.clip = { blob, fileName };
  const preview = $("clone-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
}

async function toggleRecording() {
  const record = $("record");
  $("clone-error").textContent = "";
  try {
    if (state.recorder?.recording) {
      const clip = await state.recorder.stop();
      record.textContent = "Record from microphone";
      $("record-time").textContent = `Recorded ${(clip.size / 1000).toFixed(0)} KB.`;
      $("clone-file").value = "";
      useClip(clip, recordingName(clip));
      return;
    }
    state.recorder = new Recorder();
    await state.recorder.start((seconds) => {
      $("record-time").textContent = `Recording: ${seconds.toFixed(0)} s`;
      if (seconds >= MAX_RECORDING_SECONDS) toggleRecording();
    });
    record.textContent = "Stop recording";
  } catch (error) {
    $("clone-error").textContent = error.message;
  }
}

async function createClone(event) {
  event.preventDefault();
  const name = $("clone-name").value.trim();
  const problem = !name
    ? "Give the voice a name."
    : !state.clip
      ? "Choose a reference clip or record one."
      : !$("clone-consent").checked
        ? "Confirm that the person speaking agreed to have their voice cloned."
        : "";
  $("clone-error").textContent = problem;
  if (problem) return;
  $("clone-create").disabled = true;
  $("clone-status").textContent = "Creating the voice…";
  try {
    const voice = await createVoice({ name, clip: state.clip.blob, fileName: state.clip.fileName });
    await loadVoices();
    selectVoice(voice.id);
    $("clone-form").reset();
    $("clone-preview").hidden = true;
    state.clip = null;
    $("clone-status").textContent = `Created “${voice.name}”; it is selected as the voice.`;
  } catch (error) {
    $("clone-status").textContent = "";
    $("clone-error").textContent = error.message;
  } finally {
    $("clone-create").disabled = false;
  }
}

async function removeVoice(voice) {
  $("clone-error").textContent = "";
  try {
    await deleteVoice(voice.id);
    await loadVoices();
    $("clone-status").textContent = `Deleted “${voice.name}”.`;
  } catch (error) {
    $("clone-error").textContent = error.message;
  }
}

// --- messages -------------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
}

function clearError() {
  $("error").textContent = "";
}

// --- wiring -----------------------------------------------------------------------------------------

function init() {
  $("format").append(...Object.entries(FORMATS).map(([id, format]) => new Option(format.label, id)));
  $("text").value = SAMPLE_TEXT;
  $("text-hint").textContent = HINTS.plain;
  const describeFormat = () => {
    const live = FORMATS[$("format").value].live;
    $("format-hint").textContent = live
      ? "Plays while it is generated."
      : "Plays once the whole file has arrived (this browser cannot play it in pieces).";
  };
  $("format").addEventListener("change", describeFormat);
  describeFormat();
  $("speed").addEventListener(
    "input",
    () => ($("speed-value").textContent = `${Number($("speed").value).toFixed(2)}×`),
  );
  $("text").addEventListener("input", updateText);
  $("script-mode").addEventListener("change", toggleScript);
  $("speech-form").addEventListener("submit", speak);
  $("stop").addEventListener("click", () => state.job?.abort.abort());
  $("token-form").addEventListener("submit", useToken);
  $("token-change").addEventListener("click", () => askForToken(""));
  $("clone-file").addEventListener("change", () => {
    const file = $("clone-file").files[0];
    if (file) useClip(file, file.name);
  });
  $("record").addEventListener("click", toggleRecording);
  $("clone-form").addEventListener("submit", createClone);
  updateText();
  renderPickers();
  connect();
}

init();
