// /v1/audio/voices: list, create (multipart like OpenAI's SDKs, or JSON with base64), get, delete.

import { invalid, notFound } from "./errors.js";
import { json } from "./http.js";
import { readUpload } from "./uploads.js";
import { VoiceStore } from "./voices.js";

// `presetsOnly`: the public listing (no token sent, PUBLIC_LISTINGS on) leaves created voices out.
export async function listVoices(env, config, { presetsOnly = false } = {}) {
  const voices = await new VoiceStore(env.VOICES, config).list({ presetsOnly });
  return json({ object: "list", voices, data: voices });
}

export async function getVoice(env, config, id) {
  const store = new VoiceStore(env.VOICES, config);
  const voice = (await store.getCreated(id)) || (await store.list()).find((entry) => entry.id === id);
  if (!voice) throw notFound(`No voice with id '${id.slice(0, 100)}'.`, "voice_id", "voice_not_found");
  return json(voice);
}

export async function createVoice(request, env, config) {
  const store = new VoiceStore(env.VOICES, config);
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

export async function deleteVoice(env, config, id) {
  return json(await new VoiceStore(env.VOICES, config).delete(id));
}
