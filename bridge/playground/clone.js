// Voice cloning: a reference clip from a file or the microphone, sent to POST /v1/audio/voices.

import { ApiError, call } from "./api.js";

// The page stops a recording here: VibeVoice needs 10 to 30 seconds, the bridge takes 5 MB.
export const MAX_RECORDING_SECONDS = 60;
const RECORDING_TYPES = ["audio/webm;codecs=opus", "audio/mp4", "audio/webm"];

// One microphone recording: `start(onTick)` (called with the seconds so far), then `stop()`
// resolves to the clip as a Blob.
export class Recorder {
  async start(onTick) {
    if (!navigator.mediaDevices?.getUserMedia || !globalThis.MediaRecorder) {
      throw new ApiError("This browser cannot record audio here (recording needs https or localhost).");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch {
      throw new ApiError("The microphone is not available: allow this page to use it, or upload a clip instead.");
    }
    const mimeType = RECORDING_TYPES.find((type) => MediaRecorder.isTypeSupported(type));
    this.recorder = new MediaRecorder(this.stream, mimeType ? { mimeType } : {});
    this.parts = [];
    this.recorder.addEventListener("dataavailable", (event) => event.data.size && this.parts.push(event.data));
    this.done = new Promise((resolve) => this.recorder.addEventListener("stop", resolve, { once: true }));
    this.recorder.start(250);
    const started = performance.now();
    this.timer = setInterval(() => onTick((performance.now() - started) / 1000), 200);
  }

  get recording() {
    return this.recorder?.state === "recording";
  }

  async stop() {
    clearInterval(this.timer);
    if (this.recording) this.recorder.stop();
    await this.done;
    for (const track of this.stream.getTracks()) track.stop();
    const type = (this.recorder.mimeType || "audio/webm").split(";")[0];
    return new Blob(this.parts, { type });
  }
}

// The file name a recording is uploaded under (the bridge checks the bytes, not the name).
export function recordingName(blob) {
  return blob.type.includes("mp4") ? "recording.m4a" : "recording.webm";
}

// Creates the voice; resolves to the bridge's voice object {id, name, ...}.
export async function createVoice({ name, clip, fileName }) {
  const form = new FormData();
  form.append("name", name);
  form.append("audio_sample", clip, fileName);
  const response = await call("/v1/audio/voices", { method: "POST", form });
  return response.json();
}

export async function deleteVoice(id) {
  await call(`/v1/audio/voices/${encodeURIComponent(id)}`, { method: "DELETE" });
}
