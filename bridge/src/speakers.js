// Voices in a speech request: OpenAI's single `voice`, and `speakers`, a VibeVoice extra that gives
// a multi-speaker script one voice per speaker:
//
//   {"input": "Speaker 1: Hi!\nSpeaker 2: Hello.", "speakers": ["alloy", {"id": "voice_..."}]}
//
// Each entry is what `voice` accepts and is resolved the same way (voices.json, a created voice, or
// a worker preset); the worker gets them as its `speakers` list, in label order. With `speakers`,
// `voice` may be left out; when given it is not used (OpenAI's SDKs require one).

import { VOICE_BYTES_CEILING } from "./config.js";
import { ApiError, invalid } from "./errors.js";
import { formatBytes } from "./http.js";

// VibeVoice scripts have at most four speakers.
export const MAX_SPEAKERS = 4;

// A voice reference: a name ("alloy") or {"id": "voice_..."}; `field` names it in errors.
export function parseVoice(voice, field = "voice") {
  if (typeof voice === "string") {
    if (!voice.trim() || voice.length > 200)
      throw invalid(`'${field}' must be a voice name of 1 to 200 characters.`, field);
    return voice.trim();
  }
  if (voice && typeof voice === "object" && !Array.isArray(voice) && typeof voice.id === "string" && voice.id) {
    return { id: voice.id };
  }
  throw invalid(`'${field}' must be a voice name or an object {"id": "voice_..."}.`, field);
}

// `speakers` as a list of voice references, or undefined when absent.
export function parseSpeakers(speakers) {
  if (speakers === undefined || speakers === null) return undefined;
  if (!Array.isArray(speakers) || speakers.length < 1 || speakers.length > MAX_SPEAKERS) {
    throw invalid(
      `'speakers' must be a list of 1 to ${MAX_SPEAKERS} voices, one per script speaker in label order.`,
      "speakers",
    );
  }
  return speakers.map((entry, index) => parseVoice(entry, `speakers[${index}]`));
}

// The worker's voice fields: {speaker} | {voice_audio_base64} | {voice_url} for one voice, or
// {speakers: [...]} for a script.
export async function resolveVoices(store, { voice, speakers }) {
  if (!speakers) return store.resolve(voice);
  const resolved = await Promise.all(speakers.map((entry) => store.resolve(entry)));
  // All clips travel inside one /run payload (10 MB), as base64.
  const clipBytes = resolved.reduce((sum, entry) => sum + ((entry.voice_audio_base64?.length ?? 0) * 3) / 4, 0);
  if (clipBytes > VOICE_BYTES_CEILING) {
    throw new ApiError(
      413,
      `The speakers' reference clips are ${formatBytes(clipBytes)} together, over the ` +
        `${formatBytes(VOICE_BYTES_CEILING)} a request can carry.`,
      { param: "speakers", code: "voice_too_large" },
    );
  }
  return { speakers: resolved.map(workerSpeaker) };
}

function workerSpeaker(entry) {
  if (entry.speaker) return entry.speaker;
  if (entry.voice_url) return { audio_url: entry.voice_url };
  return { audio_base64: entry.voice_audio_base64 };
}
