// Voices in a speech request: OpenAI's single `voice`, and `speakers`, a VibeVoice extra that gives
// a multi-speaker script one voice per speaker:
//
//   {"input": "Speaker 1: Hi!\nSpeaker 2: Hello.", "speakers": ["alloy", {"id": "voice_..."}]}
//
// Each entry is what `voice` accepts and is resolved the same way (voices.json, a created voice, or
// a worker preset); the worker gets them as its `speakers` list, in label order. With `speakers`,
// `voice` may be left out; when given it is not used (OpenAI's SDKs require one).

import { invalid } from "./errors.js";

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

// The worker's voice fields: {speaker} | {voice_url} for one voice, or {speakers: [...]} for a
// script (a preset name or {audio_url} each; created clips go as signed URLs, like `voice`).
export async function resolveVoices(store, { voice, speakers }) {
  if (!speakers) return store.resolve(voice);
  const resolved = await Promise.all(speakers.map((entry) => store.resolve(entry)));
  return { speakers: resolved.map((entry) => entry.speaker ?? { audio_url: entry.voice_url }) };
}
