// /v1/audio/voices: list, create (multipart like OpenAI's SDKs, or JSON with base64), get, delete.

import { invalid, notFound } from "./errors.js";
import { fromBase64, json, readBody } from "./http.js";
import { VoiceStore } from "./voices.js";

// Multipart and base64 overhead on top of the clip itself.
const FORM_OVERHEAD = 64 * 1024;

export async function listVoices(env, config) {
  const voices = await new VoiceStore(env.VOICES, config).list();
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
  const type = (request.headers.get("content-type") || "").toLowerCase();
  let fields;
  if (type.startsWith("multipart/form-data")) {
    fields = await multipartFields(request, config);
  } else if (type.startsWith("application/json")) {
    fields = await jsonFields(request, config);
  } else {
    throw invalid(
      "Send the voice as multipart/form-data (name, audio_sample) or as JSON with base64 audio.",
      null,
      "unsupported_content_type",
    );
  }
  if (fields.type !== undefined && fields.type !== "audio_sample") {
    throw invalid(
      "'type' must be 'audio_sample': VibeVoice clones voices from reference audio and cannot design one from a prompt.",
      "type",
    );
  }
  return json(await store.create(fields));
}

export async function deleteVoice(env, config, id) {
  return json(await new VoiceStore(env.VOICES, config).delete(id));
}

async function multipartFields(request, config) {
  const bytes = await readBody(request, config.MAX_VOICE_BYTES + FORM_OVERHEAD);
  let form;
  try {
    form = await new Response(bytes, { headers: { "content-type": request.headers.get("content-type") } }).formData();
  } catch {
    throw invalid("The multipart body could not be read.");
  }
  const file = form.get("audio_sample") ?? form.get("file") ?? form.get("audio");
  let audio;
  if (file && typeof file === "object" && typeof file.arrayBuffer === "function") {
    audio = new Uint8Array(await file.arrayBuffer());
  } else if (typeof file === "string") {
    throw invalid("'audio_sample' must be a file part, not a text field.", "audio_sample");
  }
  return {
    name: textField(form, "name"),
    type: textField(form, "type"),
    consent: textField(form, "consent"),
    audio,
  };
}

async function jsonFields(request, config) {
  const bytes = await readBody(request, Math.ceil((config.MAX_VOICE_BYTES * 4) / 3) + FORM_OVERHEAD);
  let body;
  try {
    body = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw invalid("The request body is not valid JSON.");
  }
  if (!body || typeof body !== "object" || Array.isArray(body))
    throw invalid("The request body must be a JSON object.");
  const encoded = body.audio_sample ?? body.audio_base64;
  let audio;
  if (encoded !== undefined && encoded !== null) {
    if (typeof encoded !== "string") throw invalid("'audio_sample' must be a base64 string.", "audio_sample");
    audio = fromBase64(encoded.replace(/^data:[^,]*,/, ""));
    if (!audio) throw invalid("'audio_sample' is not valid base64.", "audio_sample");
  }
  return {
    name: body.name,
    type: body.type ?? undefined,
    consent: typeof body.consent === "string" ? body.consent : undefined,
    audio,
  };
}

function textField(form, name) {
  const value = form.get(name);
  return typeof value === "string" ? value : undefined;
}
