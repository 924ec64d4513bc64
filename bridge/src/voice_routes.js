// /v1/audio/voices: list, create (multipart like OpenAI's SDKs, or JSON with base64), get, delete.
// `caller` is who asks ({owner, admin}, keys.js); null for a public listing (presets only).

import { invalid, notFound } from "./errors.js";
import { json } from "./http.js";
import { readUpload } from "./uploads.js";
import { VOICE_ID, VoiceStore } from "./voices.js";

const PAGE_LIMIT = 100;

// One page (`limit` 1 to 100, `after` the last_id of the page before): shared voices first, then
// the caller's created voices. Open WebUI reads the first page without parameters.
export async function listVoices(request, env, config, caller) {
  const params = new URL(request.url).searchParams;
  const limit = params.has("limit") ? Number(params.get("limit")) : PAGE_LIMIT;
  if (!Number.isInteger(limit) || limit < 1 || limit > PAGE_LIMIT) {
    throw invalid(`'limit' must be an integer from 1 to ${PAGE_LIMIT}.`, "limit");
  }
  const after = params.get("after") || undefined;
  if (after !== undefined && !VOICE_ID.test(after)) {
    throw invalid("'after' must be a created voice's id (the last_id of the page before).", "after");
  }
  const page = await new VoiceStore(env.VOICES, config, caller).list({ presetsOnly: !caller, after, limit });
  return json({
    object: "list",
    voices: page.voices,
    data: page.voices,
    first_id: page.voices[0]?.id ?? null,
    last_id: page.last_id,
    has_more: page.has_more,
  });
}

export async function getVoice(env, config, caller, id) {
  const store = new VoiceStore(env.VOICES, config, caller);
  const voice = (await store.getCreated(id)) || (await store.shared()).find((entry) => entry.id === id);
  if (!voice) throw notFound(`No voice with id '${id.slice(0, 100)}'.`, "voice_id", "voice_not_found");
  return json(voice);
}

export async function createVoice(request, env, config, caller) {
  const store = new VoiceStore(env.VOICES, config, caller);
  store.requireBucket();
  const fields = await readUpload(request, config, "audio_sample", ["name", "type", "consent"]);
  if (fields.type !== undefined && fields.type !== "audio_sample") {
    throw invalid(
      "'type' must be 'audio_sample': VibeVoice clones voices from reference audio and cannot design one from a prompt.",
      "type",
    );
  }
  return json(await store.create({ name: fields.name, audio: fields.audio_sample, consent: fields.consent }));
}

export async function deleteVoice(env, config, caller, id) {
  return json(await new VoiceStore(env.VOICES, config, caller).delete(id));
}
